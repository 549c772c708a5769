"""A provisioned broker's refusals explained: a run id outside the ACL fails at connect with "not authorized"
and the setting to fix (it once waited 60 s in silence and blamed max_message_bytes on SIGTERM); a wrong
password is named; `doctor` tries the run's own topics and fails the same way."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from fl_processes import Procs, write_config

from fedpeft_edge.client.doctor import check_run_topics
from fedpeft_edge.config import CommArgs
from fedpeft_edge.errors import TransportError
from fedpeft_edge.transport.broker import find_mosquitto, start_broker
from fedpeft_edge.transport.mqtt import MqttCommManager
from fedpeft_edge.transport.probe import probe_broker
from fedpeft_edge.transport.provision import provision

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180),
              pytest.mark.skipif(find_mosquitto() is None, reason="needs mosquitto")]


def _creds(root: Path, node: str) -> dict[str, Any]:
    return dict(yaml.safe_load((root / node / "comm_args.yaml").read_text())["comm_args"])


def _args(port: int, creds: dict[str, Any], **kw: Any) -> CommArgs:
    return CommArgs(broker_port=port, keepalive_s=5, **{**creds, "require_signatures": False, **kw})


def test_a_run_id_outside_the_acl_fails_at_connect_with_the_fix(tmp_path: Path) -> None:
    prov = provision(tmp_path / "prov", ["dev-a"], run_id="run1")
    with start_broker(secure_dir=prov.root) as broker:
        creds = _creds(prov.root, "dev-a")
        t0 = time.monotonic()
        with pytest.raises(TransportError) as err:
            MqttCommManager(_args(broker.port, creds), "run2", "dev-a", connect_timeout_s=10.0)
        assert time.monotonic() - t0 < 10
        text = str(err.value)
        assert "not authorized" in text and "'run2'" in text and "common_args.run_id" in text
        assert "max_message_bytes" not in text and err.value.reason_code == 0x87
        ok = MqttCommManager(_args(broker.port, creds), "run1", "dev-a", connect_timeout_s=10.0)  # its own run
        ok.close()
        wrong = {k: v for k, v in creds.items() if k != "password_file"}  # the keystore's file would win
        with pytest.raises(TransportError, match="not authorized.*password"):
            MqttCommManager(_args(broker.port, {**wrong, "password": "wrong"}), "run1", "dev-a",
                            connect_timeout_s=10.0)


def test_doctor_tries_the_run_topics(tmp_path: Path) -> None:
    prov = provision(tmp_path / "prov", ["dev-a"], run_id="run1")
    with start_broker(secure_dir=prov.root) as broker:
        args = _args(broker.port, _creds(prov.root, "dev-a"))
        refused = check_run_topics(probe_broker(args, "run2", timeout_s=5.0, node="dev-a"))
        allowed = check_run_topics(probe_broker(args, "run1", timeout_s=5.0, node="dev-a"))
    assert refused.status == "FAIL" and "0x87" in refused.detail and "'run2'" in refused.detail
    assert allowed.status == "OK", allowed.detail


@pytest.mark.slow  # a real agent builds its model first (~45 s on a loaded machine)
def test_an_agent_outside_the_acl_exits_non_zero_saying_why(tmp_path: Path) -> None:
    prov = provision(tmp_path / "prov", ["dev-a"], run_id="run1")
    with start_broker(secure_dir=prov.root) as broker:
        base = write_config(tmp_path / "run.yaml", broker.port, "run2")
        node = tmp_path / "node.yaml"  # the provisioned snippet, used as it is (an overlay)
        node.write_text(yaml.safe_dump({"comm_args": {**_creds(prov.root, "dev-a"), "require_signatures": False}}))
        procs = Procs(tmp_path / "logs")
        try:
            agent = procs.start("dev-a", "device_agents.main", "--config", str(base), "--config", str(node),
                                "--device-id", "dev-a", "--client-index", "0")
            code = agent.wait(timeout=120)
        finally:
            procs.stop_all()
    assert code != 0
    assert "not authorized" in procs.log("dev-a") and "common_args.run_id" in procs.log("dev-a")

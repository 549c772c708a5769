"""Confidentiality end to end (issue 25, item 6): a provisioned mosquitto, a real server and two real agents, and a
spy holding broker credentials that read the whole topic tree (what the broker operator sees). The spy records every
payload of the run; in an encrypted run it finds no tensor blob header and no run of the global model's fp32 bytes,
in tasks, updates or the shared model, and every round completes. The same search on a run with `encrypt: false`
finds both (the search can fail); the global tensors of all three runs are bit-identical."""

from __future__ import annotations

import re
import threading
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import torch
import yaml
from fl_processes import Procs, aggregated_rounds, records, run_dir_of, wait_for, write_config
from paho.mqtt.enums import CallbackAPIVersion

from fedpeft_edge.server.checkpoint import load_checkpoint
from fedpeft_edge.transport.broker import find_mosquitto, start_broker
from fedpeft_edge.transport.provision import Provisioned, hash_password, provision

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900),
              pytest.mark.skipif(find_mosquitto() is None, reason="needs mosquitto")]

ROUNDS = 2
DEVICES = ("d1", "d2")
SPY, SPY_PASSWORD = "spy", "spy-" + uuid.uuid4().hex
TENSOR_BLOB = re.compile(rb"FPT1\x01[\x00-\x0f]\x00\x00")  # wire.codec's tensor blob header (magic, version)


class Spy:
    """A plain MQTT subscriber to every topic under the prefix, with its own broker credentials."""

    def __init__(self, port: int) -> None:
        self.payloads: list[tuple[str, bytes]] = []
        self._lock, self._ready = threading.Lock(), threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=SPY, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(SPY, SPY_PASSWORD)
        self.client.on_connect = lambda c, *_: c.subscribe("fedpeft/#", qos=1)
        self.client.on_subscribe = lambda *_: self._ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._ready.wait(10), "the spy could not subscribe"

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        with self._lock:
            self.payloads.append((msg.topic, bytes(msg.payload)))

    def stop(self) -> list[tuple[str, bytes]]:
        self.client.disconnect()
        self.client.loop_stop()
        with self._lock:
            return list(self.payloads)


def _add_spy(prov: Provisioned) -> None:
    """A broker user who may read everything: the broker operator's view, or a leaked admin credential."""
    with (prov.root / "broker/passwd").open("a") as fh:
        fh.write(f"{SPY}:{hash_password(SPY_PASSWORD)}\n")
    with (prov.root / "broker/acl").open("a") as fh:
        fh.write(f"\nuser {SPY}\ntopic read fedpeft/#\n")


def _run(tmp: Path, prov: Provisioned, port: int, run_id: str, **comm: Any) -> dict[str, Any]:
    cfgs = {}
    for node in ("0", *DEVICES):
        snippet = yaml.safe_load((prov.node_dir(node) / "comm_args.yaml").read_text())["comm_args"]
        cfgs[node] = write_config(tmp / f"{run_id}-{node}.yaml", port, run_id,
                                  train_args={"comm_round": ROUNDS, "min_updates": 2, "round_timeout_s": 300},
                                  comm_args={"broker_port": port, **snippet, **comm})
    procs, run_dir = Procs(tmp / f"logs-{run_id}"), run_dir_of(cfgs["0"])
    spy = Spy(port)
    try:
        server = procs.server(cfgs["0"])
        wait_for("the server to connect", lambda: "connected; waiting" in procs.log("server"), 120, procs)
        for i, d in enumerate(DEVICES):
            procs.agent(cfgs[d], d, i)
        wait_for("the run to finish", lambda: (run_dir / "summary.json").exists() and server.poll() is not None,
                 600, procs)
        return {"run_dir": run_dir, "rc": server.returncode, "logs": procs.logs(), "payloads": spy.stop()}
    finally:
        spy.stop()
        procs.stop_all()


def _model_windows(run_dir: Path) -> list[bytes]:
    """64-byte runs of the fp32 global model that round 2's tasks carried (the checkpoint after round 1)."""
    state = load_checkpoint(run_dir, 1).state
    out = [t.detach().float().contiguous().numpy().tobytes()[:64] for t in state.values() if t.numel() >= 16]
    assert out, "the checkpoint holds no tensor of 16 values or more"
    return out


def _leaks(res: dict[str, Any]) -> dict[str, set[str]]:
    windows = _model_windows(res["run_dir"])
    found: dict[str, set[str]] = {"tensor_blob": set(), "global_model": set()}
    for topic, payload in res["payloads"]:
        kind = topic.split("/")[2]
        if TENSOR_BLOB.search(payload):
            found["tensor_blob"].add(kind)
        if any(w in payload for w in windows):
            found["global_model"].add(kind)
    return found


def _check_completed(res: dict[str, Any]) -> None:
    assert res["rc"] == 0, res["logs"]
    assert aggregated_rounds(res["run_dir"]) == list(range(1, ROUNDS + 1)), res["logs"]
    drops = [r for r in records(res["run_dir"], "dropped_message") if r["reason"] in ("undecryptable", "unencrypted")]
    assert not drops, drops


def test_a_broker_wide_reader_finds_no_tensor_in_an_encrypted_run(tmp_path: Path) -> None:
    prov = provision(tmp_path / "prov", DEVICES)
    _add_spy(prov)
    with start_broker(secure_dir=prov.root) as broker:
        plain = _run(tmp_path, prov, broker.port, "plain", encrypt=False)
        sealed = _run(tmp_path, prov, broker.port, "sealed")
        shared = _run(tmp_path, prov, broker.port, "shared", model_delivery="shared")
    for res in (plain, sealed, shared):
        _check_completed(res)
        assert {t.split("/")[2] for t, _ in res["payloads"]} >= {"d2s", "s2d"}, "the spy saw nothing"
    assert _leaks(plain) == {"tensor_blob": {"d2s", "s2d"}, "global_model": {"s2d"}}  # the search finds plaintext
    assert any(t.split("/")[2] == "model" for t, _ in shared["payloads"]), "no shared model crossed the broker"
    assert _leaks(sealed) == {"tensor_blob": set(), "global_model": set()}
    assert _leaks(shared) == {"tensor_blob": set(), "global_model": set()}
    for rnd in range(1, ROUNDS + 1):  # encryption is lossless: the same seed gives the same bits
        want = load_checkpoint(plain["run_dir"], rnd).state
        for res in (sealed, shared):
            got = load_checkpoint(res["run_dir"], rnd).state
            assert all(torch.equal(want[k], got[k]) for k in want), (rnd, res["run_dir"].name)

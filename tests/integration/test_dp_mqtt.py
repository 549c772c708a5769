"""DP-SGD devices over a real mosquitto: epsilon reported per round, budgets enforced, ledgers on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fl_processes import Procs, aggregated_rounds, records, run_dir_of, wait_for, write_config

from fedpeft_edge.privacy import PrivacyLedger, ledger_path_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

BUDGET = 3.7  # 64 samples per device, q = 0.25: one round (4 steps, eps 3.17) fits, two (4.22) do not


@pytest.fixture
def procs(tmp_path: Path):  # type: ignore[no-untyped-def]
    p = Procs(tmp_path / "logs")
    yield p
    p.stop_all()


def _ledger(state: Path, device_id: str) -> PrivacyLedger:
    path = ledger_path_for(state / device_id)
    assert path is not None and path.exists(), f"no ledger for {device_id} under {state}"
    return PrivacyLedger.from_file(path)


def test_dp_devices_report_growing_epsilon_and_a_spent_budget_leaves_the_run(
    mosquitto_broker: Any, tmp_path: Path, procs: Procs
) -> None:
    state = tmp_path / "state"
    # all three start together (min_devices 3); after the capped one leaves, the other two carry on
    common: dict[str, Any] = {
        "train_args": {"comm_round": 3, "min_updates": 1, "min_devices": 3, "client_num_in_total": 3,
                       "client_num_per_round": 3},
        "device_args": {"num_threads": 1, "state_dir": str(state)},
    }
    open_cfg = write_config(tmp_path / "open.yaml", mosquitto_broker.port, "dp",
                            dp_args={"enabled": True, "noise_multiplier": 1.0}, **common)
    capped_cfg = write_config(tmp_path / "capped.yaml", mosquitto_broker.port, "dp",
                              dp_args={"enabled": True, "noise_multiplier": 1.0, "epsilon_budget": BUDGET},
                              **common)
    run_dir = run_dir_of(open_cfg)
    procs.server(open_cfg)
    procs.agent(capped_cfg, "dev1", 1)  # joins first, so it is surely sampled in round 1
    wait_for("dev1 to join", lambda: any(r["device_id"] == "dev1" for r in records(run_dir, "join")), 180, procs)
    procs.agent(open_cfg, "dev0", 0)
    procs.agent(open_cfg, "dev2", 2)
    wait_for("summary.json", (run_dir / "summary.json").exists, 240, procs)
    assert aggregated_rounds(run_dir) == [1, 2, 3]

    rows = [r for r in records(run_dir, "device_round") if r["status"] == "accepted"]
    open_eps = [r["epsilon"] for r in sorted(rows, key=lambda r: r["round"]) if r["device_id"] == "dev0"]
    assert len(open_eps) >= 2 and open_eps == sorted(set(open_eps)) and open_eps[0] > 0  # strictly growing
    assert open_eps[-1] == _ledger(state, "dev0").epsilon()  # what the server got is what the ledger holds

    capped_rounds = [r["round"] for r in rows if r["device_id"] == "dev1"]
    assert capped_rounds == [1], capped_rounds  # trained once, then its budget could not cover a round
    status = [r for r in records(run_dir, "device_status") if r["device_id"] == "dev1"]
    assert status and status[0]["status"] == "BUDGET_EXHAUSTED" and status[0]["epsilon"] <= BUDGET
    assert 0 < _ledger(state, "dev1").epsilon() <= BUDGET

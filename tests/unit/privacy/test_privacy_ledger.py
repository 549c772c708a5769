"""Accounting: epsilon equals opacus' accountants, grows per round, survives restarts, stops at the budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedpeft_edge.config import DpArgs
from fedpeft_edge.errors import BudgetExhaustedError, PrivacyError
from fedpeft_edge.privacy import PrivacyLedger, build_privatizer, ledger_path_for, plan_dp


def _train_round(priv_args: DpArgs, ledger: Path, steps: int, n: int = 40, batch: int = 4) -> list[float]:
    """Build a privatizer on a tiny model, run `steps` DP steps per round for 3 rounds; epsilon per round."""
    torch.manual_seed(0)
    priv = build_privatizer(priv_args, sample_size=n, batch_size=batch, epochs_per_round=1, planned_rounds=3,
                            ledger_path=ledger)
    assert priv is not None
    model = nn.Linear(3, 2)
    data = TensorDataset(torch.randn(n, 3), torch.randint(0, 2, (n,)))
    model, opt, _ = priv.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(data, batch))
    eps = []
    for rnd in range(3):
        for _ in range(steps):
            x, y = data[:batch]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        eps.append(priv.end_round(rnd))
    return eps


def test_reported_epsilon_equals_opacus_rdp_accountant_and_grows(tmp_path: Path) -> None:
    args = DpArgs(enabled=True, noise_multiplier=1.1, max_grad_norm=1.0, target_delta=1e-3)
    eps = _train_round(args, tmp_path / "l.json", steps=5)
    for rnd, value in enumerate(eps):
        ref = RDPAccountant()
        ref.history = [(1.1, 4 / 40, 5 * (rnd + 1))]
        assert value == ref.get_epsilon(delta=1e-3)
    assert 0 < eps[0] < eps[1] < eps[2]


def test_prv_accountant_matches_opacus_prv(tmp_path: Path) -> None:
    args = DpArgs(enabled=True, noise_multiplier=1.5, accountant="prv", target_delta=1e-3)
    eps = _train_round(args, tmp_path / "l.json", steps=2)
    ref = PRVAccountant()
    ref.history = [(1.5, 0.1, 6)]
    assert eps[-1] == pytest.approx(ref.get_epsilon(delta=1e-3), rel=1e-9)
    assert eps[0] < eps[1] < eps[2]


def test_ledger_survives_a_restart_as_json(tmp_path: Path) -> None:
    path = ledger_path_for(tmp_path / "state")
    assert path is not None
    args = DpArgs(enabled=True, noise_multiplier=1.0)
    eps = _train_round(args, path, steps=3)
    raw = json.loads(path.read_text())  # plain JSON on disk, never pickle
    assert raw["history"] == [[1.0, 0.1, 9]] and [r["round"] for r in raw["rounds"]] == [0, 1, 2]
    reopened = PrivacyLedger.from_file(path)
    assert reopened.steps == 9 and reopened.epsilon() == eps[-1]
    # a restarted agent (new privatizer, same file) continues from the spent epsilon
    more = _train_round(args, path, steps=3)
    assert more[0] > eps[-1] and PrivacyLedger.from_file(path).steps == 18


def test_each_step_is_on_disk_before_its_update(tmp_path: Path) -> None:
    path = tmp_path / "l.json"
    ledger = PrivacyLedger(path, delta=1e-3)
    ledger.record_step(1.0, 0.05)
    ledger.record_step(1.0, 0.05)
    assert PrivacyLedger.from_file(path).steps == 2  # a crash before end_round loses nothing


def test_budget_stops_training_and_is_never_exceeded(tmp_path: Path) -> None:
    args = DpArgs(enabled=True, target_epsilon=2.0, target_delta=1e-3)
    n, batch, rounds = 40, 4, 3
    priv = build_privatizer(args, sample_size=n, batch_size=batch, epochs_per_round=1, planned_rounds=rounds,
                            ledger_path=tmp_path / "l.json")
    assert priv is not None and priv.plan.steps_per_round == 10
    assert priv.plan.planned_epsilon <= 2.0
    for rnd in range(rounds):  # the planned rounds fit the budget exactly
        priv.check_budget()
        for _ in range(priv.plan.steps_per_round):
            priv.ledger.record_step(priv.plan.noise_multiplier, priv.plan.sample_rate)
        priv.end_round(rnd)
    with pytest.raises(BudgetExhaustedError, match="must not train again"):
        priv.check_budget()
    spent = priv.epsilon()
    with pytest.raises(BudgetExhaustedError):
        for _ in range(1000):
            priv.ledger.record_step(priv.plan.noise_multiplier, priv.plan.sample_rate)
    assert spent <= priv.epsilon() <= 2.0
    assert PrivacyLedger.from_file(tmp_path / "l.json").epsilon() <= 2.0


def test_step_past_the_budget_raises_from_the_optimizer_before_the_update(tmp_path: Path) -> None:
    args = DpArgs(enabled=True, noise_multiplier=2.0, epsilon_budget=3.0)
    priv = build_privatizer(args, sample_size=20, batch_size=10, epochs_per_round=1, planned_rounds=1,
                            ledger_path=tmp_path / "l.json")
    assert priv is not None
    model = nn.Linear(2, 2)
    data = TensorDataset(torch.randn(20, 2), torch.randint(0, 2, (20,)))
    model, opt, _ = priv.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(data, 10))
    with pytest.raises(BudgetExhaustedError):
        for _ in range(10_000):
            before = model.weight.detach().clone()
            opt.zero_grad()
            nn.functional.cross_entropy(model(data[:10][0]), data[:10][1]).backward()
            opt.step()
    assert torch.equal(before, model.weight)  # the refused step changed nothing
    assert 0 < priv.epsilon() <= 3.0 and priv.ledger.steps > 3


def test_target_epsilon_calibrates_noise_like_opacus() -> None:
    args = DpArgs(enabled=True, target_epsilon=5.0, target_delta=1e-3)
    plan = plan_dp(args, sample_size=781, batch_size=64, epochs_per_round=10, planned_rounds=50)
    assert plan.steps_per_round == 10 * int(781 / 64) and plan.planned_steps == 50 * plan.steps_per_round
    ref = get_noise_multiplier(target_epsilon=5.0, target_delta=1e-3, sample_rate=64 / 781,
                               steps=plan.planned_steps, accountant="rdp")
    assert plan.noise_multiplier == ref
    assert 4.95 <= plan.planned_epsilon <= 5.0


def test_max_steps_per_round_caps_the_plan() -> None:
    args = DpArgs(enabled=True, noise_multiplier=1.0)
    plan = plan_dp(args, sample_size=100, batch_size=10, epochs_per_round=5, planned_rounds=2,
                   max_steps_per_round=7)
    assert plan.steps_per_round == 7 and plan.planned_steps == 14


def test_disabled_dp_builds_no_privatizer(tmp_path: Path) -> None:
    assert build_privatizer(DpArgs(), sample_size=10, batch_size=2, epochs_per_round=1, planned_rounds=1,
                            ledger_path=tmp_path / "l.json") is None


_BAD_HISTORY = '{"format": "fedpeft-privacy-ledger", "version": 1, "history": [[1, 2]]}'


@pytest.mark.parametrize("content", ["{not json", "[]", '{"format": "other"}', _BAD_HISTORY])
def test_corrupt_ledger_is_a_privacy_error_naming_the_fix(tmp_path: Path, content: str) -> None:
    path = tmp_path / "l.json"
    path.write_text(content)
    with pytest.raises(PrivacyError, match="restore"):
        PrivacyLedger(path)


def test_unwritable_state_dir_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    ledger = PrivacyLedger(blocker / "l.json")  # parent is a file: cannot be created
    with pytest.raises(PrivacyError, match="state_dir"):
        ledger.record_step(1.0, 0.1)

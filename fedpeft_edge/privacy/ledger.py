"""Per-device privacy ledger: the accountant's history in a JSON file, so a restart never resets epsilon."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from fedpeft_edge.errors import BudgetExhaustedError, PrivacyError

logger = logging.getLogger(__name__)

LEDGER_FILENAME = "privacy_ledger.json"
_FORMAT = "fedpeft-privacy-ledger"
_VERSION = 1
_MECHANISMS = ("rdp", "prv")
# Slack on the budget comparison only: accountants' binary searches land a hair under the target.
_BUDGET_RTOL = 1e-9


def ledger_path_for(state_dir: str | os.PathLike[str] | None) -> Path | None:
    """Where an agent keeps its ledger: `<DeviceArgs.state_dir>/privacy_ledger.json` (None = memory only)."""
    return None if state_dir is None else Path(state_dir) / LEDGER_FILENAME


class PrivacyLedger:
    """The composed DP-SGD steps a device has taken, their epsilon, and the budget it may not exceed.

    Every step is recorded (and written to disk) BEFORE the noisy gradient is applied, so a crash can
    only over-count. History entries are (noise_multiplier, sample_rate, steps), opacus' own format.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        *,
        accountant: str = "rdp",
        delta: float = 1e-3,
        budget: float | None = None,
    ) -> None:
        if accountant not in _MECHANISMS:
            raise PrivacyError(f"unknown accountant {accountant!r}; use one of {', '.join(_MECHANISMS)}")
        if not 0.0 < delta < 1.0:
            raise PrivacyError(f"delta must be in (0, 1), got {delta!r}; set dp_args.target_delta")
        if budget is not None and not budget > 0:
            raise PrivacyError(f"epsilon budget must be > 0, got {budget!r}; set dp_args.epsilon_budget")
        self.path = None if path is None else Path(path)
        self.mechanism = accountant
        self.delta = delta
        self.budget = budget
        self.rounds: list[dict[str, Any]] = []
        self._accountant: IAccountant = create_accountant(mechanism=accountant)
        self._steps_at_round_start = 0
        self._allowance: dict[tuple[float, float], int] = {}
        self._eps_cache: dict[tuple[Any, ...], float] = {}
        self._rdp_unit: dict[tuple[float, float], np.ndarray] = {}
        if self.path is not None and self.path.exists():
            self._load(self.path)

    # --- queries ---------------------------------------------------------------------------------------

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """(noise_multiplier, sample_rate, steps) runs, in order."""
        return [(float(n), float(q), int(s)) for n, q, s in self._accountant.history]

    @property
    def steps(self) -> int:
        """DP-SGD steps recorded so far, over all rounds and restarts."""
        return sum(s for _, _, s in self.history)

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far at `delta` (default: the ledger's delta); 0.0 before any step."""
        return self._epsilon_of(self.history, self.delta if delta is None else delta)

    def projected_epsilon(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon after `steps` more steps at this noise and sample rate (nothing is recorded)."""
        return self._epsilon_of(_compose(self.history, noise_multiplier, sample_rate, steps), self.delta)

    @property
    def exhausted(self) -> bool:
        """True when not even one more step fits the budget at the last-used noise and sample rate."""
        if self.budget is None:
            return False
        if not self.history:
            return self.budget <= 0
        noise, rate, _ = self.history[-1]
        return self.remaining_steps(noise, rate) == 0

    def remaining_steps(self, noise_multiplier: float, sample_rate: float) -> int | None:
        """How many more steps at this noise and sample rate fit the budget (None = no budget)."""
        if self.budget is None:
            return None
        key = (float(noise_multiplier), float(sample_rate))
        if key not in self._allowance:
            self._allowance[key] = self._search_allowance(*key)
        return self._allowance[key]

    def check_budget(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Raise BudgetExhaustedError unless `steps` more steps fit the budget."""
        left = self.remaining_steps(noise_multiplier, sample_rate)
        if left is not None and steps > left:
            raise BudgetExhaustedError(
                f"privacy budget epsilon={self.budget:g} (delta={self.delta:g}) cannot cover {steps} more "
                f"DP-SGD steps: {self.epsilon():.4g} spent over {self.steps} steps, {left} step(s) left; "
                "this device must not train again (raise dp_args.epsilon_budget only if your privacy "
                "policy allows it)"
            )

    # --- recording -------------------------------------------------------------------------------------

    def record_step(self, noise_multiplier: float, sample_rate: float) -> None:
        """Record one step (and persist it) before its update is applied; refuse it past the budget."""
        self.check_budget(noise_multiplier, sample_rate, 1)
        self._accountant.step(noise_multiplier=float(noise_multiplier), sample_rate=float(sample_rate))
        key = (float(noise_multiplier), float(sample_rate))
        if key in self._allowance:
            self._allowance[key] -= 1
        self.save()

    def end_round(self, round_idx: int) -> float:
        """Close a training round: log its steps and the epsilon spent so far, persist, return epsilon."""
        eps = self.epsilon()
        self.rounds.append({"round": int(round_idx), "steps": self.steps - self._steps_at_round_start,
                            "epsilon": eps, "time": time.time()})
        self._steps_at_round_start = self.steps
        self.save()
        logger.info("round %s: epsilon %.4g (delta %g) after %s steps", round_idx, eps, self.delta,
                    self.steps)
        return eps

    # --- state -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The ledger as plain JSON-able data."""
        return {"format": _FORMAT, "version": _VERSION, "accountant": self.mechanism, "delta": self.delta,
                "budget": self.budget, "history": [list(h) for h in self.history],
                "rounds": list(self.rounds)}

    def load_state_dict(self, state: Mapping[str, Any], source: str = "state") -> None:
        """Restore history and rounds from `state_dict()` output; a mismatch is a PrivacyError."""
        if state.get("format") != _FORMAT or state.get("version") != _VERSION:
            raise PrivacyError(f"{source} is not a version-{_VERSION} privacy ledger; restore the agent's "
                               "original ledger file (deleting it would reset the device's epsilon)")
        try:
            history = [(float(n), float(q), int(s)) for n, q, s in state["history"]]
            rounds = [dict(r) for r in state.get("rounds", [])]
        except (KeyError, TypeError, ValueError) as exc:
            raise PrivacyError(f"{source}: malformed ledger history ({exc}); "
                               "restore the original file") from exc
        if any(not (n >= 0 and 0 < q <= 1 and s > 0) for n, q, s in history):
            raise PrivacyError(f"{source}: ledger history has an invalid entry; restore the original file")
        if state.get("accountant") != self.mechanism:
            logger.warning("ledger %s was accounted with %s, now %s: re-accounting its history",
                           source, state.get("accountant"), self.mechanism)
        self._accountant.history = history
        self.rounds = rounds
        self._steps_at_round_start = self.steps
        self._allowance.clear()

    def save(self) -> None:
        """Write the ledger atomically (temp file, fsync, rename); no-op for an in-memory ledger."""
        if self.path is None:
            return
        data = json.dumps(self.state_dict(), indent=1).encode("utf-8")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".ledger_", dir=self.path.parent)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            raise PrivacyError(f"cannot write privacy ledger {self.path}: {exc}; make device_args.state_dir "
                               "writable (training without a ledger is refused)") from exc

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> PrivacyLedger:
        """Open an existing ledger file with the accountant, delta and budget it was saved with."""
        p = Path(path)
        raw = _read_json(p)
        return cls(p, accountant=str(raw.get("accountant", "rdp")), delta=float(raw.get("delta", 1e-3)),
                   budget=raw.get("budget"))

    def _load(self, path: Path) -> None:
        raw = _read_json(path)
        self.load_state_dict(raw, source=str(path))
        stored_delta, stored_budget = raw.get("delta"), raw.get("budget")
        if stored_delta != self.delta or stored_budget != self.budget:
            logger.warning("ledger %s was kept at delta=%s budget=%s; now delta=%s budget=%s",
                           path, stored_delta, stored_budget, self.delta, self.budget)
        logger.info("privacy ledger %s: %s steps, epsilon %.4g so far", path, self.steps, self.epsilon())

    # --- accounting ------------------------------------------------------------------------------------

    def _epsilon_of(self, history: list[tuple[float, float, int]], delta: float) -> float:
        if not history:
            return 0.0
        key = (tuple(history), delta)
        if key not in self._eps_cache:
            if self.mechanism == "rdp":
                self._eps_cache[key] = self._rdp_epsilon(history, delta)
            else:
                acc = create_accountant(mechanism=self.mechanism)
                acc.history = list(history)
                self._eps_cache[key] = float(acc.get_epsilon(delta=delta))
        return self._eps_cache[key]

    def _rdp_epsilon(self, history: list[tuple[float, float, int]], delta: float) -> float:
        # opacus' RDPAccountant.get_privacy_spent, with the per-step RDP curve cached: compute_rdp is
        # (per-step curve) * steps, so the sum (and epsilon) is identical but costs no series per query.
        orders = RDPAccountant.DEFAULT_ALPHAS
        rdp = sum(self._unit_rdp(noise, rate, orders) * steps for noise, rate, steps in history)
        eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
        return float(eps)

    def _unit_rdp(self, noise: float, rate: float, orders: list[float]) -> np.ndarray:
        key = (noise, rate)
        if key not in self._rdp_unit:
            self._rdp_unit[key] = np.asarray(
                rdp_analysis.compute_rdp(q=rate, noise_multiplier=noise, steps=1, orders=orders))
        return self._rdp_unit[key]

    def _fits(self, noise: float, rate: float, steps: int) -> bool:
        if self.budget is None:
            return True
        eps = self.projected_epsilon(noise, rate, steps)
        return math.isfinite(eps) and eps <= self.budget * (1 + _BUDGET_RTOL)

    def _search_allowance(self, noise: float, rate: float) -> int:
        """Largest k with epsilon(history + k steps) <= budget (epsilon grows with k)."""
        if noise <= 0 or not self._fits(noise, rate, 1):
            return 0
        lo, hi = 1, 2
        while self._fits(noise, rate, hi):
            lo, hi = hi, hi * 2
            if hi > 1 << 40:
                return hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self._fits(noise, rate, mid) else (lo, mid)
        return lo


def _compose(history: list[tuple[float, float, int]], noise: float, rate: float,
             steps: int) -> list[tuple[float, float, int]]:
    """History plus `steps` steps, merged the way opacus' accountants merge repeated steps."""
    out = list(history)
    if steps <= 0:
        return out
    if out and out[-1][0] == noise and out[-1][1] == rate:
        out[-1] = (noise, rate, out[-1][2] + steps)
    else:
        out.append((noise, rate, steps))
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PrivacyError(f"cannot read privacy ledger {path}: {exc}; restore the original file "
                           "(deleting it would reset the device's epsilon and void its guarantee)") from exc
    if not isinstance(raw, dict):
        raise PrivacyError(f"privacy ledger {path} does not hold a JSON object; restore the original file")
    return raw

"""Insider robustness of aggregation: the robust defaults of a provisioned run, the sample-weight cap and the
update-norm bound derived from the first rounds' updates (docs/security.md).

A provisioned run (`comm_args.require_signatures`) knows every device by its key, so one device holding its own
valid key is the adversary that is left: it may send any tensors and claim any sample count. Robust mode
bounds what one such update can do: FedAvg aggregates as a trimmed mean (at least one update cut from each
end per coordinate from 3 updates on), each update's distance from the global model is bounded, and a
device's sample count weighs at most `sample_weight_clip` times the lower median of the declared counts.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from collections.abc import Iterable

from fedpeft_edge.config import RunConfig, TrainArgs

log = logging.getLogger(__name__)

ROBUST_WEIGHT_CLIP = 2.0  # sample_weight_clip of a robust run that sets none


def is_robust(train_args: TrainArgs, require_signatures: bool) -> bool:
    """Whether the run aggregates robustly: `robust: true`, or unset in a provisioned run."""
    return train_args.robust if train_args.robust is not None else require_signatures


def effective_train_args(cfg: RunConfig) -> TrainArgs:
    """train_args as the server applies them: in a robust run FedAvg becomes FedTrimmedAvg (trim_ratio, at
    least one from each end from n >= 3) and an unset sample_weight_clip becomes ROBUST_WEIGHT_CLIP."""
    t = cfg.train_args
    if not is_robust(t, cfg.comm_args.require_signatures):
        return t
    changes: dict[str, object] = {}
    if t.federated_optimizer == "FedAvg":
        changes["federated_optimizer"] = "FedTrimmedAvg"
    if t.sample_weight_clip is None:
        changes["sample_weight_clip"] = ROBUST_WEIGHT_CLIP
    return dataclasses.replace(t, **changes) if changes else t  # type: ignore[arg-type]


def weight_cap(declared: Iterable[int], clip: float | None) -> int | None:
    """The most samples one update may weigh: `clip` x the lower median of the declared counts (a minority
    cannot move the lower median above the honest ones); None without a clip or a declaration."""
    counts = [c for c in declared if c > 0]
    if clip is None or not counts:
        return None
    return max(1, int(clip * statistics.median_low(counts)))


class NormBound:
    """The update-norm bound: configured, or derived once `rounds` aggregated rounds reported their updates'
    norms (`factor` x their median: a minority of large updates cannot raise a median)."""

    def __init__(self, configured: float | None, derive: bool, rounds: int, factor: float) -> None:
        self.bound = configured
        self._derive = derive and configured is None
        self._rounds, self._factor = rounds, factor
        self._norms: list[float] = []
        self._seen = 0

    @property
    def measuring(self) -> bool:
        """Norms are needed: a bound applies or one is being derived."""
        return self.bound is not None or self._derive

    def observe(self, norms: Iterable[float | None]) -> float | None:
        """One aggregated round's accepted update norms; returns the bound once it is fixed."""
        if not self._derive or self.bound is not None:
            return self.bound
        self._norms.extend(n for n in norms if n is not None)
        self._seen += 1
        if self._seen >= self._rounds and self._norms:
            self.bound = self._factor * statistics.median(self._norms)
            log.info("update-norm bound derived from %d rounds' %d updates: %.4g (train_args.norm_bound_factor="
                     "%g x their median)", self._seen, len(self._norms), self.bound, self._factor)
        return self.bound

    def state(self) -> float | None:
        return self.bound

    def restore(self, bound: float | None) -> None:
        """A resumed run keeps the bound it had derived (its first rounds are not seen again)."""
        if bound is not None and self._derive:
            self.bound = float(bound)

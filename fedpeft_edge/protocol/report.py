"""The typed per-round device report: the agent fills it, the update carries it, the server records it."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from fedpeft_edge.errors import ProtocolError
from fedpeft_edge.protocol.fields import (
    MAX_SAMPLES,
    check_int,
    check_json,
    check_opt_int,
    check_opt_mapping,
    check_opt_number,
    check_opt_text,
    check_text,
    fail,
)

_MAX_RESOURCES_CHARS = 64 * 1024


@dataclasses.dataclass(frozen=True)
class EvalReport:
    """Loss and top-1 of a model on a test split (a device's local split, or the server's test set)."""

    loss: float
    top1: float
    samples: int
    backend: str | None = None
    eval_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"loss": self.loss, "top1": self.top1, "samples": self.samples}
        if self.backend is not None:
            out["backend"] = self.backend
        if self.eval_s is not None:
            out["eval_s"] = self.eval_s
        return out

    @classmethod
    def from_dict(cls, raw: Any, field: str = "global_eval") -> EvalReport:
        if not isinstance(raw, Mapping):
            raise fail(field, raw, "is not a mapping", "send {loss, top1, samples} or null")
        return cls(
            loss=_finite(raw.get("loss"), f"{field}.loss"),
            top1=_finite(raw.get("top1"), f"{field}.top1", 0.0, 1.0),
            samples=check_int(raw.get("samples"), f"{field}.samples", 0, MAX_SAMPLES),
            backend=check_opt_text(raw.get("backend"), f"{field}.backend", 64),
            eval_s=check_opt_number(raw.get("eval_s"), f"{field}.eval_s", 0.0),
        )


def _finite(value: Any, field: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    out = check_opt_number(value, field, lo, hi)
    if out is None:
        raise fail(field, value, "is missing", "send a finite number")
    return out


# Float fields a device may have measured as NaN/Inf (a diverging loss): sent as null, named in `nonfinite`.
_FLOATS = ("train_loss", "train_loss_end", "train_acc", "train_s", "set_state_s", "encode_s", "images_per_s", "epsilon",
           "download_s")


@dataclasses.dataclass(frozen=True)
class DeviceReport:
    """What a device measured in one round (all optional: a device reports what it could measure)."""

    train_loss: float | None = None
    train_loss_end: float | None = None  # mean over the last quarter of the local steps (divergence checks)
    train_acc: float | None = None
    steps: int | None = None
    samples_seen: int | None = None
    train_s: float | None = None
    set_state_s: float | None = None
    encode_s: float | None = None
    images_per_s: float | None = None
    epsilon: float | None = None
    resources: Mapping[str, Any] | None = None  # ResourceMonitor summary
    global_eval: EvalReport | None = None  # the received global model on the device's local test split
    download_s: float | None = None  # the round task's transfer time, measured by the device's transport
    nonfinite: tuple[str, ...] = ()  # float fields the device measured as NaN or Infinity (sent as null)

    def to_dict(self) -> dict[str, Any]:
        """The wire form (the update's `metrics`); non-finite floats become null and are named in nonfinite."""
        out: dict[str, Any] = {}
        bad = list(self.nonfinite)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _FLOATS and isinstance(value, float) and not math.isfinite(value):
                bad.append(f.name)
                value = None
            if f.name == "global_eval":
                value = value.to_dict() if value is not None else None
            if f.name == "resources" and value is not None:
                value = dict(value)
            out[f.name] = value
        out["nonfinite"] = sorted(set(bad))
        return out

    @classmethod
    def from_dict(cls, raw: Any, field: str = "metrics") -> DeviceReport:
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise fail(field, raw, "is not a mapping", "send the device report as a JSON object")
        # resources is walked once, by check_opt_mapping below with its own size cap (the hot path at 1000s
        # of updates a round); everything else here
        check_json({k: v for k, v in raw.items() if k != "resources"}, field)
        floats: dict[str, Any] = {name: check_opt_number(raw.get(name), f"{field}.{name}") for name in _FLOATS}
        ge = raw.get("global_eval")
        nonfinite = raw.get("nonfinite") or []
        if not isinstance(nonfinite, list):
            raise fail(f"{field}.nonfinite", nonfinite, "is not a list", "send a list of field names")
        names = tuple(check_text(n, f"{field}.nonfinite", 64) for n in nonfinite)
        return cls(
            steps=check_opt_int(raw.get("steps"), f"{field}.steps", 0, 10**12),
            samples_seen=check_opt_int(raw.get("samples_seen"), f"{field}.samples_seen", 0, 10**12),
            resources=check_opt_mapping(raw.get("resources"), f"{field}.resources", _MAX_RESOURCES_CHARS),
            global_eval=None if ge is None else EvalReport.from_dict(ge, f"{field}.global_eval"),
            nonfinite=names,
            **floats,
        )

    def with_download_s(self, download_s: float | None) -> DeviceReport:
        return dataclasses.replace(self, download_s=download_s)

    def record_fields(self) -> dict[str, Any]:
        """The fields of a `device_round` record this report fills (docs/design.md, Run directory)."""
        return {
            "download_s": self.download_s, "train_s": self.train_s, "train_loss": self.train_loss,
            "train_loss_end": self.train_loss_end,
            "train_acc": self.train_acc, "epsilon": self.epsilon, "images_per_s": self.images_per_s,
            "resources": dict(self.resources) if self.resources is not None else None,
            "global_eval": self.global_eval.to_dict() if self.global_eval is not None else None,
            "steps": self.steps, "nonfinite": list(self.nonfinite) or None,
            "set_state_s": self.set_state_s, "encode_s": self.encode_s,  # the device's compute beside train_s
        }

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> DeviceReport:
        """Read a device_round record back (the run report), tolerating records of older runs."""
        ge = rec.get("global_eval")
        num: dict[str, Any] = {n: rec.get(n) if isinstance(rec.get(n), (int, float)) else None for n in _FLOATS}
        try:
            ev = EvalReport.from_dict(ge) if isinstance(ge, Mapping) else None
        except ProtocolError:  # an older or hand-edited record: the report shows it as missing
            ev = None
        res = rec.get("resources")
        return cls(global_eval=ev, resources=res if isinstance(res, Mapping) else None,
                   steps=rec.get("steps") if isinstance(rec.get("steps"), int) else None, **num)

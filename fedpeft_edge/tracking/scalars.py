"""The numbers a tracker logs, taken from run-log records: per round and per device, named once for both."""

from __future__ import annotations

import math
from typing import Any

from fedpeft_edge.records import DeviceRoundRecord, RoundRecord, parse_record


def round_scalars(record: RoundRecord, epsilons: list[float]) -> dict[str, float]:
    """Scalars of an aggregated `round` record; epsilons are its devices' reported epsilons (max is logged)."""
    ev = _mapping(record.eval)
    out = {
        "round/top1": ev.get("top1"),
        "round/loss": ev.get("loss"),
        "round/perplexity": ev.get("perplexity"),  # causal LMs (top1 is then next-token accuracy)
        **{f"round/perplexity/{name}": _mapping(c).get("perplexity")
           for name, c in _mapping(ev.get("per_category")).items()},
        "round/bytes_down": record.bytes_down,
        "round/bytes_up": record.bytes_up,
        "round/cum_bytes": record.cum_bytes,
        "round/round_s": record.round_s,
        "round/aggregate_s": record.aggregate_s,
        "round/accepted": record.accepted,
        "round/dropped": sum(int(n) for n in (record.dropped or {}).values()),
        "round/devices_online": record.devices_online,
        "round/attempt": record.attempt,
        "round/epsilon_max": max(epsilons) if epsilons else None,
    }
    return _numbers(out)


def device_scalars(record: DeviceRoundRecord) -> dict[str, float]:
    """Scalars of an accepted `device_round` record, under `device/<id>/...`."""
    res = _mapping(record.resources)
    prefix = f"device/{record.device_id}/"
    out = {
        "train_loss": record.train_loss,
        "train_acc": record.train_acc,
        "epsilon": record.epsilon,
        "bytes_down": record.bytes_down,
        "bytes_up": record.bytes_up,
        "train_s": record.train_s,
        "download_s": record.download_s,
        "upload_s": record.upload_s,
        "cpu_s": res.get("cpu_s"),
        "rss_peak_mb": res.get("rss_peak_mb"),
        "energy_j": res.get("energy_j"),
    }
    return _numbers({prefix + k: v for k, v in out.items()})


def flatten_config(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config sections as dotted `section.key` -> string (MLflow params, TensorBoard text)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_config(value, name + "."))
        else:
            out[name] = str(value)
    return out


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    """Only real, finite numbers: a figure a record lacks is left out, never logged as 0."""
    out = {}
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            out[k] = float(v)
    return out


class ScalarFolder:
    """Turns the record stream into (scalars, step) pairs: a device's figures when its update is accepted,
    the round's when it aggregates (with the max epsilon its devices reported). Failed attempts log nothing:
    their bytes reach the next aggregated round's cum_bytes."""

    def __init__(self) -> None:
        self._epsilons: dict[tuple[Any, Any], list[float]] = {}

    def feed(self, record: dict[str, Any]) -> list[tuple[dict[str, float], int]]:
        rec = parse_record(record)
        if not isinstance(rec, (DeviceRoundRecord, RoundRecord)):
            return []
        step = rec.round
        if not isinstance(step, int):
            return []
        key = (step, rec.attempt)
        if isinstance(rec, DeviceRoundRecord):
            if rec.status != "accepted":
                return []
            eps = rec.epsilon
            if isinstance(eps, (int, float)) and math.isfinite(eps):
                self._epsilons.setdefault(key, []).append(float(eps))
            return [(device_scalars(rec), step)]
        epsilons = self._epsilons.pop(key, [])
        if "status" not in record or rec.aggregated:  # records of older runs had no status: all aggregated
            return [(round_scalars(rec, epsilons), step)]
        return []


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}

"""The energy table of a run: per device, energy per round, per trained sample and per MB sent.

Built from `device_round` records alone (their `resources` summary, `bytes_up`, training throughput), so any
report can call it. The energy is what the device's sensor measured over local training (the window its
ResourceMonitor wraps), so "per MB sent" is training energy per MB of update the device then sent, not
the radio's energy. A device whose board has no energy sensor gets a row with "not available" (None)
figures, never 0.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

MB = 1e6  # decimal megabytes, as in the report

ENERGY_COLUMNS = ("run", "device_id", "energy_source", "energy_basis", "rounds", "rounds_measured",
                  "energy_j_total", "j_per_round", "samples_trained", "j_per_sample", "mb_sent", "j_per_mb_sent",
                  "power_mean_w", "gpu_energy_j_total")


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def samples_trained(record: Mapping[str, Any]) -> float | None:
    """Samples the device trained on in that round: `samples_seen` when recorded, else the product of the
    two figures the device measured and sent (images_per_s = samples / train_s)."""
    seen = _num(record.get("samples_seen"))
    if seen is not None:
        return seen
    rate, train_s = _num(record.get("images_per_s")), _num(record.get("train_s"))
    return round(rate * train_s) if rate is not None and train_s is not None else None


def energy_rows(device_rounds: Iterable[Mapping[str, Any]], run: str = "") -> list[dict[str, Any]]:
    """One row per device of a run, from its `device_round` records (in any order)."""
    per_dev: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for rec in device_rounds:
        per_dev[str(rec.get("device_id"))].append(rec)
    return [_device_row(run, dev, recs) for dev, recs in sorted(per_dev.items())]


def _device_row(run: str, device_id: str, recs: list[Mapping[str, Any]]) -> dict[str, Any]:
    measured = [(r, r.get("resources") or {}) for r in recs
                if _num((r.get("resources") or {}).get("energy_j")) is not None]
    joules = sum(float(res["energy_j"]) for _r, res in measured) if measured else None
    samples = [samples_trained(r) for r, _res in measured]
    sent = [_num(r.get("bytes_up")) for r, _res in measured]
    n_samples = sum(s for s in samples if s is not None) if measured and None not in samples else None
    mb_sent = sum(b for b in sent if b is not None) / MB if measured and None not in sent else None
    walls = [_num(res.get("wall_s")) for _r, res in measured]
    wall_s = sum(w for w in walls if w is not None) if measured and None not in walls else None
    gpu = [_num((r.get("resources") or {}).get("gpu_energy_j")) for r in recs]
    gpu_known = [g for g in gpu if g is not None]
    sources = sorted({str(res.get("energy_source")) for _r, res in measured})
    bases = sorted({str(res.get("energy_basis")) for _r, res in measured})
    return {
        "run": run, "device_id": device_id,
        "energy_source": "+".join(sources) or None, "energy_basis": "; ".join(bases) or None,
        "rounds": len(recs), "rounds_measured": len(measured),
        "energy_j_total": joules,
        "j_per_round": joules / len(measured) if joules is not None else None,
        "samples_trained": n_samples,
        "j_per_sample": joules / n_samples if joules is not None and n_samples else None,
        "mb_sent": mb_sent,
        "j_per_mb_sent": joules / mb_sent if joules is not None and mb_sent else None,
        "power_mean_w": joules / wall_s if joules is not None and wall_s else None,
        "gpu_energy_j_total": sum(gpu_known) if gpu_known else None,
    }

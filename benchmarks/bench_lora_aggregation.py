"""LoRA aggregation modes side by side, from a finished `configs/studies/lora_aggregation.yaml` study directory.

Prints (Markdown) the server's top-1 per round against the cumulative MB on the wire per mode (mean over seeds),
the final top-1 per seed, the bytes each device sent and received per round per mode, and for flexlora the rank
each device was given, its memory and why. Reads only what the runs wrote (config.yaml, metrics.jsonl,
summary.json); runs nothing. Run the study first:

    nice -n 10 fedpeft-edge study configs/studies/lora_aggregation.yaml --study-dir DIR
    python benchmarks/bench_lora_aggregation.py DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedpeft_edge.config import load_config
from fedpeft_edge.rundir import read_metrics

MB = 1e6


def _runs(study_dir: Path) -> dict[str, list[Path]]:
    """Finished run directories by aggregation mode (flexlora also by its rank range)."""
    out: dict[str, list[Path]] = defaultdict(list)
    for run in sorted((study_dir / "runs").iterdir()):
        if (run / "summary.json").is_file() and (run / "config.yaml").is_file():
            lora = load_config(run / "config.yaml").peft_args.lora
            low = lora.r if lora.rank_min is None else lora.rank_min
            label = f"flexlora {low}..{lora.r}" if lora.aggregation == "flexlora" else lora.aggregation
            out[label].append(run)
    return out


def _mean(values: Iterable[float]) -> float | None:
    vals = list(values)
    return statistics.fmean(vals) if vals else None


def _fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def per_round(runs: dict[str, list[Path]]) -> None:
    print("| round | " + " | ".join(f"{m} top-1 % (cum MB)" for m in runs) + " |")
    print("|---|" + "---|" * len(runs))
    curves = {m: [{r["round"]: r for r in read_metrics(p, "round") if r.get("status", "aggregated") == "aggregated"}
                  for p in paths] for m, paths in runs.items()}
    rounds = sorted({k for per in curves.values() for c in per for k in c})
    for rnd in rounds:
        cells = []
        for per in curves.values():
            top = _mean(100 * c[rnd]["eval"]["top1"] for c in per if rnd in c and c[rnd].get("eval"))
            cum = _mean(c[rnd]["cum_bytes"] / MB for c in per if rnd in c)
            cells.append(f"{_fmt(top)} ({_fmt(cum, 2)})")
        print(f"| {rnd} | " + " | ".join(cells) + " |")


def finals(runs: dict[str, list[Path]]) -> None:
    print("| mode | final top-1 % per seed | mean | total MB (mean) | shared params | server aggregate s per round |")
    print("|---|---|---|---|---|---|")
    for mode, paths in runs.items():
        sums = [json.loads((p / "summary.json").read_text()) for p in paths]
        seeds = [load_config(p / "config.yaml").common_args.random_seed for p in paths]
        tops = [100 * s["final_top1"] for s in sums if s.get("final_top1") is not None]
        per_seed = ", ".join(f"seed {sd}: {_fmt(100 * s['final_top1'])}" for sd, s in zip(seeds, sums, strict=True)
                             if s.get("final_top1") is not None)
        agg = _mean(r["aggregate_s"] for p in paths for r in read_metrics(p, "round") if r.get("aggregate_s"))
        print(f"| {mode} | {per_seed} | {_fmt(_mean(tops))} | {_fmt(_mean(s['bytes_total'] / MB for s in sums), 2)} "
              f"| {sums[0].get('shared_params', 'n/a')} | {_fmt(agg, 3)} |")


def device_bytes(runs: dict[str, list[Path]]) -> None:
    print("| mode | upload per device-round, kB: mean (min..max) | download per device-round, kB: mean |")
    print("|---|---|---|")
    for mode, paths in runs.items():
        recs = [r for p in paths for r in read_metrics(p, "device_round") if r.get("status") == "accepted"]
        up = [r["bytes_up"] / 1e3 for r in recs]
        down = [r["bytes_down"] / 1e3 for r in recs]
        print(f"| {mode} | {_fmt(_mean(up))} ({_fmt(min(up))}..{_fmt(max(up))}) | {_fmt(_mean(down))} |")


def flexlora_ranks(paths: list[Path]) -> None:
    print("| run | device | memory MB (source) | rank | upload per round, kB | reason |")
    print("|---|---|---|---|---|---|")
    for p in paths:
        given: dict[str, dict[str, Any]] = {}
        for a in read_metrics(p, "assignment"):
            given[a["device_id"]] = a  # the last assignment
        ups: dict[str, list[float]] = defaultdict(list)
        for r in read_metrics(p, "device_round"):
            if r.get("status") == "accepted":
                ups[r["device_id"]].append(r["bytes_up"] / 1e3)
        for dev in sorted(given, key=lambda d: (len(d), d)):
            a = given[dev]
            print(f"| {p.name} | {dev} | {_fmt(a.get('memory_mb'), 0)} ({a.get('memory_source')}) | {a['rank']} | "
                  f"{_fmt(_mean(ups[dev]))} | {a['reason']} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study_dir", type=Path, help="the study directory (--study-dir of fedpeft-edge study)")
    args = parser.parse_args(argv)
    runs = _runs(args.study_dir)
    if not runs:
        print(f"no finished runs under {args.study_dir / 'runs'}", file=sys.stderr)
        return 1
    print("## Top-1 per round against the cumulative MB on the wire (mean over seeds)\n")
    per_round(runs)
    print("\n## Final top-1\n")
    finals(runs)
    print("\n## Bytes per device per round\n")
    device_bytes(runs)
    for label, paths in runs.items():
        if label.startswith("flexlora"):
            print(f"\n## {label}: the rank each device was given\n")
            flexlora_ranks(paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Lab benchmark: head, bias and full on EfficientNet-Lite0 over shaped 1, 10 and 100 Mbit/s links.

One lab run per method, three devices on symmetric 1, 10 and 100 Mbit/s links (real namespaces, tbf-shaped
veths, the real server and agents). Per link it prints the measured round time of that device (round opened ->
its update arrived at the server) beside the `profile --link` prediction (planning.round_seconds for the same
update, plus the training time the device measured), target within 15%; and the round-time efficiency =
(compute + ideal transfer at the link rate) / measured round time, target >= 0.9. Needs root (CAP_NET_ADMIN).

    python benchmarks/bench_lab.py [--methods head,bias,full] [--rounds 1] [--max-steps 2] [--links 1mbit,...]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LINKS = ["1mbit", "10mbit", "100mbit"]


def _config(path: Path, method: str, rounds: int, max_steps: int, links: list[str]) -> Path:
    n = len(links)
    cfg = {
        "common_args": {"run_id": f"bench-lab-{method}", "random_seed": 0},
        "data_args": {"dataset": "digits", "partition_method": "iid", "image_size": 64, "batch_size": 16,
                      "max_train_samples": 600, "max_test_samples": 64, "min_samples_per_client": 5},
        "model_args": {"model": "tf_efficientnet_lite0", "num_classes": 10, "weights": "efficientnet_lite0_package"},
        "peft_args": {"method": method},
        "train_args": {"client_num_in_total": n, "client_num_per_round": n, "comm_round": rounds, "min_devices": n,
                       "min_updates": n, "round_timeout_s": 900, "max_steps": max_steps, "learning_rate": 0.003,
                       "eval_every": 1000},
        # comm_args: the defaults (a full update takes ~113 s each way at 1 Mbit/s)
        "device_args": {"num_threads": 1, "measure_latency": False},
        "tracking_args": {"run_dir": str(path.parent / "runs"), "log_level": "WARNING"},
        "lab_args": {"devices": n, "links": links, "timeout_s": 1800},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def bench_method(method: str, rounds: int, max_steps: int, links: list[str]) -> list[dict[str, float | str]]:
    from fedpeft_edge.config import load_config
    from fedpeft_edge.lab.report import link_rows, write_lab_report
    from fedpeft_edge.lab.runner import LabRun

    work = Path(tempfile.mkdtemp(prefix=f"bench-lab-{method}-"))
    path = _config(work / "run.yaml", method, rounds, max_steps, links)
    cfg = load_config(path)
    t0 = time.perf_counter()
    result = LabRun(cfg, path, work / "lab").run()
    if result.server_rc != 0:
        raise SystemExit(f"{method}: the server exited with {result.server_rc}; logs in {work / 'lab'}")
    report = write_lab_report(result, cfg)
    print(f"\n{method}: lab run {time.perf_counter() - t0:.0f} s, run directory {result.run_dir}")
    print(report.table)
    preds = {p.link: p for p in report.predictions}
    out: list[dict[str, float | str]] = []
    for link in dict.fromkeys(links):
        rows = [r for r in link_rows(result.run_dir, result.links) if r.link == link]
        measured = statistics.median(r.response_s or 0.0 for r in rows)
        compute = statistics.median(r.compute_s or 0.0 for r in rows)  # set_state + train + encode, device-timed
        ideal = statistics.median((r.ideal_down_s or 0) + (r.ideal_up_s or 0) for r in rows)
        predicted = preds[link].predicted_s + compute
        out.append({"method": method, "link": link, "mb": preds[link].update_bytes / 1e6, "measured": measured,
                    "predicted": predicted, "ratio": measured / predicted, "efficiency": (compute + ideal) / measured,
                    "transfer_ratio": preds[link].ratio})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--methods", default="head,bias,full")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=2)
    p.add_argument("--links", default=",".join(LINKS), help="one device per link profile (configs/links/)")
    p.add_argument("--before", action="append", default=[], metavar="FILE",
                   help="the saved output of an earlier bench_lab run (e.g. on main): printed beside this one")
    args = p.parse_args()
    from fedpeft_edge.lab.netns import missing_privileges

    why = missing_privileges()
    if why:
        print(f"bench_lab: skipped: {why}")
        return 0
    links = [x.strip() for x in args.links.split(",")]
    rows = [r for m in args.methods.split(",") for r in bench_method(m.strip(), args.rounds, args.max_steps, links)]
    print("\nround time per link = round opened -> that device's update at the server; compute = its set_state +"
          " train + encode; predicted = compute + profile transfer")
    print(f"{'method':<7}{'link':<9}{'update MB':>10}{'measured s':>11}{'predicted s':>12}{'ratio':>7}"
          f"{'target':>9}{'xfer ratio':>11}{'efficiency':>11}{'target':>8}")
    for r in rows:
        ok_ratio = "ok" if abs(float(r["ratio"]) - 1) <= 0.15 else "MISSED"
        ok_eff = "ok" if float(r["efficiency"]) >= 0.9 else "MISSED"
        print(f"{r['method']:<7}{r['link']:<9}{r['mb']:>10.3f}{r['measured']:>11.2f}{r['predicted']:>12.2f}"
              f"{r['ratio']:>7.3f}{'±15% ' + ok_ratio:>9}{r['transfer_ratio']:>11.3f}{r['efficiency']:>11.3f}"
              f"{'≥0.9 ' + ok_eff:>8}")
    if args.before:
        _print_before_after(args.before, rows)
    return 0


def _read_rows(paths: list[str]) -> dict[tuple[str, str], list[float]]:
    """(method, link) -> [update MB, measured s, predicted s, ratio, xfer ratio, efficiency] from saved outputs."""
    out = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            words = line.split()
            if len(words) > 8 and words[0] in ("head", "bias", "full", "adapter", "prompt", "lora") \
                    and "%" in line and "≥0.9" in line:
                nums = [float(x) for x in re.findall(r"\d+\.\d+", line)]
                out[(words[0], words[1])] = [*nums[:4], nums[-3], nums[-2]]  # the last is the 0.9 target
    return out


def _print_before_after(paths: list[str], rows: list[dict[str, float | str]]) -> None:
    before = _read_rows(paths)
    print(f"\nbefore ({', '.join(paths)}) -> after (this run)")
    print(f"{'method':<7}{'link':<9}{'measured s':>17}{'ratio (±15%)':>17}{'efficiency (≥0.9)':>20}")
    for r in rows:
        b = before.get((str(r["method"]), str(r["link"])))
        if b is None:
            continue
        print(f"{r['method']:<7}{r['link']:<9}{b[1]:>8.2f} -> {float(r['measured']):<6.2f}"
              f"{b[3]:>8.3f} -> {float(r['ratio']):<6.3f}{b[5]:>10.3f} -> {float(r['efficiency']):<6.3f}")


if __name__ == "__main__":
    sys.exit(main())

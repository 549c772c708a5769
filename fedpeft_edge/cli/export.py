"""`fedpeft-edge export`: write a run's fine-tuned global model as ONNX, after a parity check."""

from __future__ import annotations

import argparse
import json

from fedpeft_edge.export.parity import DEFAULT_ATOL, DEFAULT_MIN_AGREEMENT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The export subcommand's options."""
    parser.add_argument("--run", required=True, metavar="RUN_DIR", help="run directory the server wrote")
    parser.add_argument("--round", type=int, default=None, metavar="N",
                        help="round to export (default: the latest)")
    parser.add_argument("--out", required=True, metavar="MODEL.onnx",
                        help="ONNX file to write (a causal-LM run: a directory for safetensors + tokenizer)")
    parser.add_argument("--parity-samples", type=int, default=64, help="real inputs for the parity check")
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="largest allowed |logit difference|")
    parser.add_argument("--min-agreement", type=float, default=DEFAULT_MIN_AGREEMENT,
                        help="smallest allowed top-1 agreement with PyTorch (0..1)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--latency-runs", type=int, default=0,
                        help="if > 0, also measure batch-1 onnxruntime latency over this many runs")


def run(args: argparse.Namespace) -> int:
    """Export, print the parity figures and the metadata; errors propagate as FedPeftError (exit code 2)."""
    from pathlib import Path

    from fedpeft_edge.export.exporter import METADATA_PREFIX, export_run, load_run_config
    from fedpeft_edge.export.inference import measure_latency

    if load_run_config(Path(args.run)).model_args.family == "causal_lm":
        return _export_text(args)

    result = export_run(
        args.run, args.out, round_idx=args.round, parity_samples=args.parity_samples,
        atol=args.atol, min_agreement=args.min_agreement, num_threads=args.threads,
    )
    p = result.parity
    print(f"wrote {result.path} ({result.size_bytes / 1e6:.2f} MB, exported in {result.export_s:.1f} s)")
    print(f"parity: {p.samples} inputs, max |diff| {p.max_abs_diff:.3g} (tolerance {p.atol:.3g}), "
          f"top-1 agreement {p.top1_agreement:.2%}  -> {'OK' if p.passed else 'FAILED'}")
    for key, value in result.metadata.items():
        print(f"  {key:32s} {value}")
    if args.latency_runs > 0:
        shape = tuple(int(s) for s in json.loads(result.metadata[METADATA_PREFIX + "input_size"]))
        lat = measure_latency(result.path, shape, runs=args.latency_runs, num_threads=args.threads)
        print(f"batch-1 latency (onnxruntime): median {lat['median_ms']:.2f} ms, p90 {lat['p90_ms']:.2f} ms "
              f"over {lat['runs']} runs")
    return 0


def _export_text(args: argparse.Namespace) -> int:
    """A causal LM: the adapter merged into the base, written as safetensors + tokenizer into --out (a dir)."""
    from fedpeft_edge.export.text import export_text_run

    r = export_text_run(args.run, args.out, round_idx=args.round)
    print(f"wrote {r.path} (merged round {r.round}, {r.size_bytes / 1e6:.1f} MB: safetensors, config, tokenizer)")
    print(f"parity with PyTorch (adapter unmerged) on {r.positions} prompt positions: max |logit diff| "
          f"{r.max_abs_diff:.3g} (tolerance {r.atol:g}), greedy agreement {r.agreement:.2%} -> "
          f"{'OK' if r.passed else 'FAILED'}")
    if r.gguf is not None:
        print(f"GGUF for llama.cpp: {r.gguf} ({r.gguf.stat().st_size / 1e6:.1f} MB), loaded back: max |logit diff| "
              f"{r.gguf_max_abs_diff:.3g}, greedy agreement {r.gguf_agreement:.2%}")
    return 0

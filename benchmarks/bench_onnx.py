"""Batch-1 inference latency of the demo's model: onnxruntime vs PyTorch eager on this CPU, and the ratio."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from fedpeft_edge.backbone import build_backbone
from fedpeft_edge.config import RunConfig, load_config
from fedpeft_edge.export import (
    check_parity,
    export_onnx,
    measure_latency,
    open_session,
    parity_inputs,
    resolve_input_size,
)

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def torch_latency(model: torch.nn.Module, shape: tuple[int, ...], runs: int, warmup: int) -> dict[str, float]:
    """Median and p90 wall time (ms) of PyTorch eager forward passes on one input."""
    x = torch.randn(shape)
    model.eval()
    times = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            start = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000.0)
    return {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(DEMO_CONFIG), help="run config whose model to measure")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    cfg = load_config(args.config) if Path(args.config).exists() else RunConfig()
    backbone = build_backbone(cfg.model_args)
    torch.manual_seed(0)
    with torch.no_grad():  # a fresh head is zero (all logits 0): give it trained-like values so parity means something
        for p in backbone.model.get_classifier().parameters():
            p.normal_(0.0, 0.05)
    spec = backbone.data_config
    input_size = resolve_input_size(spec.input_size, cfg.data_args.image_size)
    start = time.perf_counter()
    data = export_onnx(backbone.model, input_size)
    export_s = time.perf_counter() - start
    print(f"model {backbone.name} ({cfg.model_args.num_classes} classes, weights {backbone.weights_source}), "
          f"input {input_size}; ONNX {len(data) / 1e6:.2f} MB exported in {export_s:.2f} s")
    inputs = parity_inputs(input_size, spec.mean, spec.std)
    parity = check_parity(backbone.model, open_session(data, 1), inputs)
    print(parity.describe())
    print(f"{'threads':>7} {'torch median':>13} {'torch p90':>10} {'ort median':>11} {'ort p90':>8} "
          f"{'speed-up':>9}")
    shape = (1, *input_size)
    for threads in args.threads:
        torch.set_num_threads(threads)
        eager = torch_latency(backbone.model, shape, args.runs, args.warmup)
        ort_lat = measure_latency(open_session(data, threads), shape, runs=args.runs, warmup=args.warmup)
        ratio = eager["median_ms"] / ort_lat["median_ms"]
        print(f"{threads:>7} {eager['median_ms']:>10.2f} ms {eager['p90_ms']:>7.2f} ms "
              f"{ort_lat['median_ms']:>8.2f} ms {ort_lat['p90_ms']:>5.2f} ms {ratio:>8.2f}x")


if __name__ == "__main__":
    main()

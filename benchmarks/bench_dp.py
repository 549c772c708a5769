"""DP-SGD slowdown per PEFT method: the same data and loop (LocalTrainer) with and without the privatizer."""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from fedpeft_edge.backbone import build_backbone
from fedpeft_edge.config import DpArgs, ModelArgs, PeftArgs, TrainArgs
from fedpeft_edge.peft.registry import build_method
from fedpeft_edge.privacy import PrivacyLedger, build_privatizer
from fedpeft_edge.privacy.grad_sample import GradSampleMode, choose_mode
from fedpeft_edge.training import LocalTrainer

METHODS = ("head", "bias", "adapter", "prompt", "lora")
SMALL_VIT = {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3}


def _loader(n: int, batch: int) -> DataLoader[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(data, batch_size=batch, shuffle=True)


def _images_per_s(method_name: str, dp_mode: GradSampleMode | None, steps: int, n: int, batch: int,
                  state: Path) -> tuple[float, int, str]:
    """Training throughput (images per compute second) after a warm-up; the engine used; shared params."""
    torch.manual_seed(0)
    model_args = ModelArgs(model="vit_tiny_patch16_224", num_classes=10, weights="none", model_kwargs=SMALL_VIT)
    method = build_method(PeftArgs(method=method_name))  # type: ignore[arg-type]
    model = method.apply(build_backbone(model_args).model)
    shared = method.manifest(model).num_params
    priv = None
    engine = "none"
    if dp_mode is not None:
        engine = choose_mode(model, dp_mode)
        priv = build_privatizer(DpArgs(enabled=True, noise_multiplier=1.0), sample_size=n, batch_size=batch,
                                epochs_per_round=1, planned_rounds=1, ledger_path=state / f"{method_name}.json",
                                grad_sample_mode=dp_mode)
    trainer = LocalTrainer(model, TrainArgs(learning_rate=0.01), "cpu", _loader(n, batch), privatizer=priv,
                           seed=0)
    trainer.train(max_steps=2)  # warm-up (first-call allocations, functorch tracing)
    result = trainer.train(max_steps=steps)
    return result.images_per_s, shared, engine


def _ledger_overhead_ms(state: Path, steps: int = 200) -> float:
    ledger = PrivacyLedger(state / "overhead.json", budget=1e6)
    t0 = time.perf_counter()
    for _ in range(steps):
        ledger.record_step(1.0, 0.05)  # JSON write + fsync before each update
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("fedpeft_edge").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    n = args.batch * 8
    print(f"ViT {SMALL_VIT}, CPU, {args.threads} thread(s), batch {args.batch} (Poisson q={args.batch / n:.3f} "
          f"under DP), {args.steps} timed steps after 2 warm-up steps")
    header = (f"{'method':<8} {'shared':>8} {'plain img/s':>12} {'DP engine':>10} {'DP img/s':>9} "
              f"{'slowdown':>9} {'torch.func img/s':>17} {'slowdown':>9}")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        for name in METHODS:
            plain, shared, _ = _images_per_s(name, None, args.steps, n, args.batch, state)
            dp, _, engine = _images_per_s(name, "auto", args.steps, n, args.batch, state)
            if engine == "hooks":
                func, _, _ = _images_per_s(name, "functorch", args.steps, n, args.batch, state)
            else:
                func = dp
            print(f"{name:<8} {shared:>8,} {plain:>12.1f} {engine:>10} {dp:>9.1f} {plain / dp:>8.2f}x "
                  f"{func:>17.1f} {plain / func:>8.2f}x")
        print(f"\nledger write-ahead cost: {_ledger_overhead_ms(state):.2f} ms per DP step (JSON + fsync)")


if __name__ == "__main__":
    main()

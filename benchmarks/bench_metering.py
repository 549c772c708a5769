"""Cost of the resource-metering thread: training throughput of a small timm CNN, sampling at 10 Hz vs off."""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import timm
import torch

from fedpeft_edge.metering.resources import ResourceMonitor


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, batch: int) -> float:
    """Images per second over `steps` SGD steps on random 32x32 images."""
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--interval", type=float, default=0.1)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = timm.create_model(args.model, pretrained=False, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    monitor = ResourceMonitor(args.interval)
    _train(model, opt, 5, args.batch)  # warm-up
    off: list[float] = []
    on: list[float] = []
    samples = 0
    for _ in range(args.repeats):  # interleaved so drift in machine load hits both arms alike
        for arm in (off, on):
            ctx = monitor.measure() if arm is on else nullcontext()
            with ctx as m:
                arm.append(_train(model, opt, args.steps, args.batch))
            if m is not None:
                samples = m.summary()["samples"]
    med_off, med_on = statistics.median(off), statistics.median(on)
    paired = statistics.median(a / b for a, b in zip(on, off, strict=True))
    cpu_us = _sample_cost_us(monitor)
    print(f"model {args.model}, batch {args.batch}, {args.steps} steps x {args.repeats} repeats, "
          "1 torch thread")
    print(f"sources: {[s.name for s in monitor.sources]}, {samples} samples in the last measured run")
    print(f"metering off : {med_off:8.1f} img/s (median; spread {min(off):.1f}..{max(off):.1f})")
    print(f"metering on  : {med_on:8.1f} img/s (median; spread {min(on):.1f}..{max(on):.1f}), "
          f"{1 / args.interval:.0f} Hz")
    print(f"ratio on/off : {med_on / med_off:.4f} of medians, {paired:.4f} median of paired runs "
          f"(cost {100 * (1 - paired):+.2f}% of throughput; shared machines add noise of several %)")
    print(f"sampling cost: {cpu_us:.0f} us CPU per sample -> {cpu_us / args.interval / 1e4:.3f}% of one core "
          f"at {1 / args.interval:.0f} Hz (direct measure, immune to load from other processes)")


def _sample_cost_us(monitor: ResourceMonitor, n: int = 2000) -> float:
    """CPU microseconds the sampling thread spends per tick, measured on this thread's own clock."""
    for src in monitor.sources:
        src.begin(time.monotonic())
    t0 = time.thread_time()
    for _ in range(n):
        now = time.monotonic()
        for src in monitor.sources:
            src.sample(now)
    cost = (time.thread_time() - t0) / n * 1e6
    for src in monitor.sources:
        src.end(time.monotonic())
    return cost


if __name__ == "__main__":
    main()

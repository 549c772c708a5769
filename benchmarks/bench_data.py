"""Is data loading ever the bottleneck of local training? Loader images/s against training images/s.

Runs one client of a Dirichlet(0.5) partition over 4 clients (Fashion-MNIST if installed, else digits) at
the demo's input (64x64, batch 32, 1 thread) and the demo's model (timm tf_efficientnet_lite0, random init,
bias-style training: only biases and the head require grad, BatchNorm statistics frozen). Prints figures and
ratios; nothing is asserted.

    .venv/bin/python benchmarks/bench_data.py [--dataset digits] [--image-size 64] [--train-steps 12]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import SimpleNamespace

import timm
import torch
from torch import nn

from fedpeft_edge.config import DataArgs
from fedpeft_edge.data import build_client_data, load_source
from fedpeft_edge.data.idx import FASHION_MNIST_DIR


def loader_images_per_s(loader: torch.utils.data.DataLoader, max_batches: int) -> float:  # type: ignore[type-arg]
    n, start = 0, time.perf_counter()
    for i, (x, _) in enumerate(loader):
        n += x.shape[0]
        if i + 1 >= max_batches:
            break
    return n / (time.perf_counter() - start)


def bias_model(num_classes: int) -> nn.Module:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(".bias") or name.startswith("classifier."))
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def train_images_per_s(model: nn.Module, loader: torch.utils.data.DataLoader, steps: int) -> float:  # type: ignore[type-arg]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    batches = iter(loader)
    n, start = 0, 0.0
    for step in range(steps + 2):  # two warm-up steps
        if step == 2:
            n, start = 0, time.perf_counter()
        x, y = next(batches)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += x.shape[0]
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = "fashion_mnist" if Path(FASHION_MNIST_DIR).is_dir() else "digits"
    parser.add_argument("--dataset", default=default, choices=["digits", "fashion_mnist"])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=12)
    parser.add_argument("--loader-batches", type=int, default=150)
    a = parser.parse_args()
    torch.set_num_threads(1)
    spec = SimpleNamespace(input_size=(3, a.image_size, a.image_size), mean=(0.5,) * 3, std=(0.5,) * 3,
                           interpolation="bicubic")  # tf_efficientnet_lite0's timm data config, resized

    t0 = time.perf_counter()
    source = load_source(DataArgs(dataset=a.dataset))
    load_s = time.perf_counter() - t0
    print(f"load {a.dataset}: {load_s:.2f} s ({len(source.train)} train, {len(source.test)} test)")
    results: dict[str, float] = {}
    for label, cache_mb in (("cached floats", 4096), ("per-batch resize", 0)):
        args = DataArgs(dataset=a.dataset, partition_method="dirichlet", partition_alpha=0.5,
                        batch_size=a.batch_size, cache_max_mb=cache_mb)
        t0 = time.perf_counter()
        client = build_client_data(args, spec, num_clients=4, seed=0, client_index=0, source=source)
        build_s = time.perf_counter() - t0
        results[label] = loader_images_per_s(client.train_loader, a.loader_batches)
        print(f"loader [{label}]: build {build_s:.2f} s for {client.stats()['num_train']} images, "
              f"{results[label]:,.0f} images/s")

    model = bias_model(source.num_classes)
    train = train_images_per_s(model, client.train_loader, a.train_steps)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"train step [tf_efficientnet_lite0, bias+head ({trainable:,} params), {a.image_size}px, "
          f"batch {a.batch_size}, 1 thread]: {train:,.1f} images/s")
    for label, ips in results.items():
        print(f"ratio loader/train [{label}]: {ips / train:,.1f}x  (loader share of a step: "
              f"{100 * train / (ips + train):.1f}%)")


if __name__ == "__main__":
    main()

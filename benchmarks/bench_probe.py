"""Linear probe on frozen EfficientNet-Lite0 features: package ImageNet weights vs random init.

Prints top-1 of a ridge/logistic linear probe on pooled features for sklearn digits (8x8 upsampled) and
Fashion-MNIST (28x28 upsampled), for tf_efficientnet_lite0 and efficientnet_lite0, pretrained and random.
Usage: python benchmarks/bench_probe.py [--size 64] [--digits-train 1000] [--fashion-train 5000] [--fashion-test 2000]
"""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedpeft_edge.backbone import build_backbone
from fedpeft_edge.config import ModelArgs

FASHION = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def to_input(images: np.ndarray, scale: float, size: int) -> torch.Tensor:
    """Grey images -> 3 x size x size, normalised with mean = std = 0.5 (the Lite0 package's input)."""
    x = torch.tensor(images, dtype=torch.float32) / scale
    x = nn.functional.interpolate(x.unsqueeze(1), size=(size, size), mode="bilinear").repeat(1, 3, 1, 1)
    return (x - 0.5) / 0.5


def features(model: nn.Module, x: torch.Tensor, batch: int = 250) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        parts = [model.forward_head(model.forward_features(x[i:i + batch]), pre_logits=True)
                 for i in range(0, len(x), batch)]
    return torch.cat(parts).numpy()


def probe(train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train)
    clf = LogisticRegression(max_iter=500, C=0.05).fit(scaler.transform(train), y_train)
    return float(clf.score(scaler.transform(test), y_test))


def datasets(args: argparse.Namespace) -> dict[str, tuple[torch.Tensor, np.ndarray, int]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = {"digits": (to_input(digits.images, 16.0, args.size), digits.target, args.digits_train)}
    if FASHION.is_dir():
        n = args.fashion_train + args.fashion_test
        images = read_idx(FASHION / "train-images-idx3-ubyte.gz")[:n]
        labels = read_idx(FASHION / "train-labels-idx1-ubyte.gz")[:n]
        out["fashion_mnist"] = (to_input(images, 255.0, args.size), labels, args.fashion_train)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--digits-train", type=int, default=1000)
    parser.add_argument("--fashion-train", type=int, default=5000)
    parser.add_argument("--fashion-test", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="tf_efficientnet_lite0,efficientnet_lite0")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = datasets(args)
    print(f"linear probe on frozen pooled features, input {args.size}x{args.size}, mean=std=0.5")
    print(f"{'dataset':<15}{'model':<24}{'train/test':>12}{'pretrained':>12}{'random':>10}{'gap':>8}{'s':>7}")
    for name, (x, y, n_train) in data.items():
        for model_name in args.models.split(","):
            start = time.perf_counter()
            scores = {}
            for weights in ("efficientnet_lite0_package", "none"):
                torch.manual_seed(0)
                model = build_backbone(ModelArgs(model=model_name, weights=weights)).model  # type: ignore[arg-type]
                f = features(model, x)
                scores[weights] = probe(f[:n_train], y[:n_train], f[n_train:], y[n_train:])
            pre, rnd = scores["efficientnet_lite0_package"], scores["none"]
            print(f"{name:<15}{model_name:<24}{f'{n_train}/{len(y) - n_train}':>12}{pre:>12.3f}{rnd:>10.3f}"
                  f"{pre - rnd:>+8.3f}{time.perf_counter() - start:>7.1f}", flush=True)


if __name__ == "__main__":
    main()

"""End-to-end encryption cost per message (wire/seal.py): seal + open of an update, in ms and bytes of overhead,
beside the codec's encode + decode of the same update and the update's transfer time on a 100 Mbit/s link.

Payloads: the quickstart's bias update (configs/quickstart.yaml: EfficientNet-Lite0, bias tuning, fp32), 10 MB
and 300 MB (one fp32 tensor each), and the shared model sealed to 100 devices (one encryption, 100 wrapped keys).
Targets: seal + open <= 5% of the update's transfer time at 100 Mbit/s (the crypto never paces a round);
overhead <= 128 bytes for one receiver; each device a shared model is sealed to beyond the first <= 1 ms (one
X25519 agreement, HKDF and a 32-byte wrap), against a whole encryption per device for separate copies.
Also printed (no target): seal + open against encode + decode, which are near-memcpy for fp32.

    PYTHONPATH=. python benchmarks/bench_crypto.py            # all sizes, medians of 5
    PYTHONPATH=. python benchmarks/bench_crypto.py --tiny     # 1 MB only, 1 repeat: proves it runs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from bench_wire import side_by_side  # benchmarks/ is on sys.path as the script's folder
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedpeft_edge.peft.base import Manifest, TensorSpec
from fedpeft_edge.protocol import keys as M
from fedpeft_edge.wire.codec import decode_tensors, encode_update
from fedpeft_edge.wire.seal import blob_aad, open_blob, seal_blob

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
LINK_BPS = 100e6  # the reference link (bits/s)
SUMMARY: list[tuple[str, str, str, bool]] = []  # figure, measured, target, met


def quickstart_update() -> tuple[dict[str, torch.Tensor], Manifest]:
    """The quickstart's bias tensors and manifest (random init: the same shapes without loading weights)."""
    from fedpeft_edge.config import load_config
    from fedpeft_edge.server.app import build_server_model

    cfg = load_config(QUICKSTART, {"model_args.weights": "none"})
    model = build_server_model(cfg)
    manifest = model.method.manifest(model.model)
    return model.method.get_state(model.model), manifest


def synthetic(nbytes: int) -> tuple[dict[str, torch.Tensor], Manifest]:
    state = {"blocks.0.weight": torch.randn(nbytes // 4)}
    return state, Manifest("full", tuple(TensorSpec.of(k, v) for k, v in state.items()))


def bench(name: str, state: dict[str, torch.Tensor], manifest: Manifest, repeats: int) -> None:
    server, device = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    aad = blob_aad("run", M.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER, "d1", 0, 3, "0123456789abcdef")
    blob = bytes(encode_update(state, manifest))
    sealed = seal_blob(blob, aad, receiver=("0", server.public_key()))
    fleet = {f"device-{i}": X25519PrivateKey.generate().public_key() for i in range(99)} | {"d1": device.public_key()}
    shared = seal_blob(blob, aad, recipients=fleet)
    t = side_by_side({
        "encode": lambda: bytes(encode_update(state, manifest)),
        "decode": lambda: decode_tensors(blob, manifest, manifest.hash, copy=False),
        "seal": lambda: seal_blob(blob, aad, receiver=("0", server.public_key())),
        "open": lambda: open_blob(sealed, aad, "0", server),
        "seal_100": lambda: seal_blob(blob, aad, recipients=fleet),
        "open_100": lambda: open_blob(shared, aad, "d1", device),
    }, repeats)
    crypto, codec = t["seal"] + t["open"], t["encode"] + t["decode"]
    link = 8 * len(sealed) / LINK_BPS
    overhead, overhead_100 = len(sealed) - len(blob), len(shared) - len(blob)
    print(f"{name:<22} {len(blob) / 1e6:9.3f} MB  seal {t['seal'] * 1e3:8.2f} ms  open {t['open'] * 1e3:8.2f} ms  "
          f"(encode {t['encode'] * 1e3:8.2f} ms, decode {t['decode'] * 1e3:8.2f} ms; seal+open = "
          f"{crypto / codec:5.1f}x encode+decode, {crypto / link:6.2%} of {link * 1e3:.1f} ms at 100 Mbit/s)  "
          f"overhead {overhead} B; shared to 100: seal {t['seal_100'] * 1e3:.2f} ms, open {t['open_100'] * 1e3:.2f} "
          f"ms, overhead {overhead_100} B")
    SUMMARY.append((f"{name}: seal+open / transfer at 100 Mbit/s", f"{crypto / link:.2%}", "<= 5%",
                    crypto <= 0.05 * link))
    SUMMARY.append((f"{name}: overhead, one receiver", f"{overhead} B", "<= 128 B", overhead <= 128))
    per_device = (t["seal_100"] - t["seal"]) / 99
    SUMMARY.append((f"{name}: shared model, each device beyond one", f"{per_device * 1e3:.3f} ms", "<= 1 ms",
                    per_device <= 1e-3))
    SUMMARY.append((f"{name}: shared to 100 / 100 separate seals", f"{t['seal_100'] / (100 * t['seal']):.2f}x",
                    "(info)", True))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="1 MB only, one repeat (proves the script runs)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"== seal + open per update (ChaCha20-Poly1305, X25519; medians of {1 if args.tiny else args.repeats}) ==")
    if args.tiny:
        bench("1 MB fp32", *synthetic(1_000_000), repeats=1)
    else:
        bench("quickstart bias update", *quickstart_update(), repeats=args.repeats)
        bench("10 MB fp32", *synthetic(10_000_000), repeats=args.repeats)
        bench("300 MB fp32", *synthetic(300_000_000), repeats=max(1, args.repeats // 2))
    print("\n== targets ==")
    for figure, measured, target, met in SUMMARY:
        verdict = "" if target == "(info)" else "met" if met else "MISSED"
        print(f"  {figure:<52} {measured:>9}  target {target:<8} {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

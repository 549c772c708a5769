"""`fedpeft-edge profile`: parameters per PEFT method, and encoded update bytes and round times for planning.

The byte figures are measured: each method's update is built on the real model, encoded by the codec in each
encoding, framed and split into MQTT packets as the transport does. Nothing is parameters x 4.
"""

from __future__ import annotations

import argparse
import json

from fedpeft_edge.errors import ConfigError
from fedpeft_edge.peft.registry import MethodRow, method_table, paper_variants

MIB = 1024 * 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="vit_base_patch16_224", help="timm model name (built without weights)")
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--model-kwargs", default="{}", help='JSON passed to timm.create_model, e.g. {"img_size": 32}')
    parser.add_argument("--adapter-width", type=int, default=96, help="adapter bottleneck width (paper: 96)")
    parser.add_argument("--prompt-tokens", type=int, default=10, help="prompt tokens per layer (paper: 10)")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (alpha = 2r)")
    parser.add_argument("--params-only", action="store_true", help="only the parameter table (fast, no encoding)")
    parser.add_argument("--encodings", default="fp32,fp16,int8", help="wire encodings to measure")
    parser.add_argument("--devices", type=int, default=8, help="devices per round (the paper: 8 of 64)")
    parser.add_argument("--link", default="10mbit,100mbit,lte",
                        help="links to time a round on: names (lte, 3g, wifi, ethernet), '10mbit', or DOWN/UP")
    parser.add_argument("--max-message-bytes", type=int, default=268_435_455,
                        help="the broker's packet limit (chunking above it); e.g. 131072 for AWS IoT Core")


def run(args: argparse.Namespace) -> int:
    try:
        kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--model-kwargs is not JSON ({exc}); pass e.g. '{{\"img_size\": 32}}'") from exc
    if not isinstance(kwargs, dict):
        raise ConfigError(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}")
    variants = paper_variants(args.adapter_width, args.prompt_tokens, args.lora_r)
    rows = method_table(args.model, args.num_classes, kwargs, variants)
    print(f"{args.model}, {args.num_classes} classes: parameters each device trains and sends per round")
    print(format_table(rows))
    if not args.params_only:
        print()
        print(bandwidth_table(args, kwargs, dict(variants), rows))
    return 0


def format_table(rows: list[MethodRow]) -> str:
    """A plain-text table: method, settings, params, % of full, fp32 MiB."""
    header = f"{'method':<22}{'settings':<26}{'params':>14}{'% of full':>11}{'fp32 MiB':>11}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.label:<22}{r.settings:<26}{r.num_params:>14,}{100 * r.fraction:>10.3f}%"
                     f"{r.fp32_bytes / MIB:>11.3f}")
    return "\n".join(lines)


def bandwidth_table(args: argparse.Namespace, kwargs: dict, variants: dict, rows: list[MethodRow]) -> str:
    """Measured MQTT bytes per update, per round for N devices, and seconds per round on each link."""
    from fedpeft_edge.config import CommArgs, ModelArgs
    from fedpeft_edge.metering.planning import measure_updates, parse_link, round_seconds
    from fedpeft_edge.wire.codec import ENCODINGS

    encodings = [e.strip() for e in args.encodings.split(",") if e.strip()]
    bad = [e for e in encodings if e not in ENCODINGS]
    if bad:
        raise ConfigError(f"--encodings {bad} unknown; choose from {', '.join(ENCODINGS)}")
    links = [parse_link(x) for x in args.link.split(",") if x.strip()]
    comm = CommArgs(max_message_bytes=args.max_message_bytes)
    model_args = ModelArgs(model=args.model, num_classes=args.num_classes, weights="none", model_kwargs=kwargs)
    n = args.devices
    round_col = f"round MB ({n} dev)"
    head = (f"{'method':<22}{'enc':<6}{'update MB':>11}{'packets':>8}{'vs full':>9}{round_col:>18}"
            + "".join(f"{'s @ ' + name:>14}" for name, _, _ in links))
    lines = [f"measured on the wire (MQTT bytes per update, each way); a round = {n} devices x (down + up)",
             head, "-" * len(head)]
    full: dict[str, int] = {}
    for r in rows:
        for size in measure_updates(model_args, variants[r.label], comm, encodings):
            full.setdefault(size.encoding, size.mqtt_bytes)  # rows start with full
            ratio = size.mqtt_bytes / full[size.encoding]
            times = "".join(f"{round_seconds(size, d, u):>14.2f}" for _, d, u in links)
            lines.append(f"{r.label:<22}{size.encoding:<6}{size.mqtt_bytes / 1e6:>11.3f}{size.packets:>8}"
                         f"{100 * ratio:>8.2f}%{2 * n * size.mqtt_bytes / 1e6:>18.2f}{times}")
    lines.append("seconds: one device's download + upload of one update on that link (devices in parallel)")
    return "\n".join(lines)

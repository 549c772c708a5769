"""`fedpeft-edge profile`: shared parameters and fp32 size per PEFT method for a model (bandwidth planning)."""

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
    return 0


def format_table(rows: list[MethodRow]) -> str:
    """A plain-text table: method, settings, params, % of full, fp32 MiB."""
    header = f"{'method':<22}{'settings':<26}{'params':>14}{'% of full':>11}{'fp32 MiB':>11}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.label:<22}{r.settings:<26}{r.num_params:>14,}{100 * r.fraction:>10.3f}%"
                     f"{r.fp32_bytes / MIB:>11.3f}")
    return "\n".join(lines)

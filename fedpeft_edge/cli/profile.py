"""`fedpeft-edge profile`: parameters per PEFT method, and encoded update bytes and round times for planning.

The byte figures are measured: each method's update is built on the real model, encoded by the codec in each
encoding, framed and split into MQTT packets as the transport does. Nothing is parameters x 4. With
`--config`, the model, method settings, broker limit, devices per round and rounds come from a run config.
Times are per device: its download and upload at the link's rates plus one round trip each way.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
from typing import Any

from fedpeft_edge.errors import ConfigError
from fedpeft_edge.peft.registry import MethodRow, method_table, paper_variants

MIB = 1024 * 1024
DEFAULTS: dict[str, Any] = {
    "model": "vit_base_patch16_224", "num_classes": 100, "adapter_width": 96, "prompt_tokens": 10, "lora_r": 8,
    "devices": 8, "rounds": 100, "max_message_bytes": 268_435_455, "encodings": "fp32,fp16,int8"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="append", metavar="CONFIG.yaml",
                        help="take the model, method settings, comm_args, devices per round and rounds from a "
                        "run config (repeat to overlay files); flags given as well win")
    parser.add_argument("--model", help=f"timm model name, built without weights (default {DEFAULTS['model']})")
    parser.add_argument("--num-classes", type=int, help=f"default {DEFAULTS['num_classes']}")
    parser.add_argument("--model-kwargs", help='JSON passed to timm.create_model, e.g. {"img_size": 32}')
    parser.add_argument("--adapter-width", type=int, help="adapter bottleneck width (paper: 96)")
    parser.add_argument("--prompt-tokens", type=int, help="prompt tokens per layer (paper: 10)")
    parser.add_argument("--lora-r", type=int, help="LoRA rank (alpha = 2r; default 8)")
    parser.add_argument("--params-only", action="store_true", help="only the parameter table (fast, no encoding)")
    parser.add_argument("--encodings", help=f"wire encodings to measure (default {DEFAULTS['encodings']}, or the "
                        "config's comm_args.encoding)")
    parser.add_argument("--devices", type=int, help="devices per round (default 8, the paper's 8 of 64)")
    parser.add_argument("--rounds", type=int, help="rounds of a run, for the per-run totals (default 100)")
    parser.add_argument("--link", default="10mbit,100mbit,lte",
                        help="links to time a round on: names (lte, 3g, wifi, ethernet), '10mbit', or DOWN/UP, "
                        "each optionally @RTT such as 'lte@80ms' or '50mbit/10mbit@40ms'")
    parser.add_argument("--max-message-bytes", type=int,
                        help="the broker's packet limit (chunking above it); e.g. 131072 for AWS IoT Core")
    parser.add_argument("--format", choices=["text", "csv", "json"], default="text",
                        help="text tables (default), or the bandwidth rows as CSV or JSON")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to profile, resolved from the flags and the config."""

    model_args: Any
    variants: list[tuple[str, Any]]
    comm: Any
    devices: int
    rounds: int
    encodings: list[str]
    links: list[Any]


def resolve_plan(args: argparse.Namespace) -> Plan:
    """Flags over the config over the defaults; links and encodings validated before anything is built."""
    from fedpeft_edge.config import CommArgs, ModelArgs, load_config
    from fedpeft_edge.planning import parse_link
    from fedpeft_edge.wire.codec import ENCODINGS

    links = [parse_link(x) for x in args.link.split(",") if x.strip()]
    if not links:
        raise ConfigError(f"--link {args.link!r} names no link; e.g. --link lte,10mbit")
    cfg = load_config(args.config) if args.config else None
    if args.encodings:
        encodings = [e.strip() for e in args.encodings.split(",") if e.strip()]
    else:
        encodings = [cfg.comm_args.encoding] if cfg else DEFAULTS["encodings"].split(",")
    bad = [e for e in encodings if e not in ENCODINGS]
    if bad:
        raise ConfigError(f"--encodings {bad} unknown; choose from {', '.join(ENCODINGS)}")
    kwargs = _kwargs(args.model_kwargs) if args.model_kwargs else (
        dict(cfg.model_args.model_kwargs) if cfg else {})
    m = cfg.model_args if cfg else None
    model_args = ModelArgs(model=args.model or (m.model if m else DEFAULTS["model"]),
                           num_classes=args.num_classes or (m.num_classes if m else DEFAULTS["num_classes"]),
                           weights="none", model_kwargs=kwargs)
    peft = cfg.peft_args if cfg else None
    variants = paper_variants(args.adapter_width or (peft.adapter.width if peft else DEFAULTS["adapter_width"]),
                              args.prompt_tokens or (peft.prompt.num_tokens if peft else DEFAULTS["prompt_tokens"]),
                              args.lora_r or (peft.lora.r if peft else DEFAULTS["lora_r"]))
    comm = cfg.comm_args if cfg else CommArgs()
    if args.max_message_bytes or not cfg:
        comm = dataclasses.replace(comm, max_message_bytes=args.max_message_bytes or DEFAULTS["max_message_bytes"])
    t = cfg.train_args if cfg else None
    return Plan(model_args, variants, comm, args.devices or (t.client_num_per_round if t else DEFAULTS["devices"]),
                args.rounds or (t.comm_round if t else DEFAULTS["rounds"]), encodings, links)


def _kwargs(text: str) -> dict[str, Any]:
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--model-kwargs is not JSON ({exc}); pass e.g. '{{\"img_size\": 32}}'") from exc
    if not isinstance(kwargs, dict):
        raise ConfigError(f"--model-kwargs must be a JSON object, got {text!r}")
    return kwargs


def run(args: argparse.Namespace) -> int:
    plan = resolve_plan(args)  # a bad --link or --encodings is refused before anything is built or printed
    m = plan.model_args
    rows = method_table(m.model, m.num_classes, m.model_kwargs, plan.variants)
    if args.params_only or args.format == "text":
        print(f"{m.model}, {m.num_classes} classes: parameters each device trains and sends per round")
        print(format_table(rows))
    if args.params_only:
        return 0
    table = bandwidth_rows(plan, rows)
    if args.format == "json":
        print(json.dumps({"links": [dataclasses.asdict(x) for x in plan.links], "devices": plan.devices,
                          "rounds": plan.rounds, "rows": table}, indent=1))
    elif args.format == "csv":
        print(rows_csv(table), end="")
    else:
        print()
        print(format_bandwidth(plan, table))
    return 0


def format_table(rows: list[MethodRow]) -> str:
    """A plain-text table: method, settings, params, % of full, fp32 MiB."""
    header = f"{'method':<22}{'settings':<26}{'params':>14}{'% of full':>11}{'fp32 MiB':>11}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.label:<22}{r.settings:<26}{r.num_params:>14,}{100 * r.fraction:>10.3f}%"
                     f"{r.fp32_bytes / MIB:>11.3f}")
    return "\n".join(lines)


def bandwidth_rows(plan: Plan, rows: list[MethodRow]) -> list[dict[str, Any]]:
    """One row per method and encoding: measured MQTT bytes per update, per round and per run, and seconds per
    round and per run on each link."""
    from fedpeft_edge.planning import measure_updates, round_seconds

    out: list[dict[str, Any]] = []
    full: dict[str, int] = {}
    variants = dict(plan.variants)
    n, rounds = plan.devices, plan.rounds
    for r in rows:
        for size in measure_updates(plan.model_args, variants[r.label], plan.comm, plan.encodings):
            full.setdefault(size.encoding, size.mqtt_bytes)  # rows start with full
            row: dict[str, Any] = {
                "method": r.label, "encoding": size.encoding, "update_bytes": size.mqtt_bytes,
                "packets": size.packets, "vs_full_pct": round(100 * size.mqtt_bytes / full[size.encoding], 3),
                "round_bytes": 2 * n * size.mqtt_bytes, "run_bytes": 2 * n * size.mqtt_bytes * rounds}
            for link in plan.links:
                s = round_seconds(size, link.down_bps, link.up_bps, link.rtt_s)
                row[f"round_s@{link.name}"] = round(s, 4)
                row[f"run_s@{link.name}"] = round(s * rounds, 2)
            out.append(row)
    return out


def rows_csv(table: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(table[0]) if table else [])
    writer.writeheader()
    writer.writerows(table)
    return buf.getvalue()


def format_bandwidth(plan: Plan, table: list[dict[str, Any]]) -> str:
    """The bandwidth rows as text, after the links and counts it assumes."""
    n, rounds = plan.devices, plan.rounds
    lines = ["links assumed (per device, no contention): " + "; ".join(x.describe() for x in plan.links),
             f"measured on the wire (MQTT bytes per update, each way); a round = {n} devices x (down + up); "
             f"a run = {rounds} rounds"]
    round_col, run_col = f"round MB ({n} dev)", f"run MB ({rounds} r)"
    widths = [max(14, len(x.name) + 6) for x in plan.links]
    head = (f"{'method':<22}{'enc':<6}{'update MB':>11}{'packets':>8}{'vs full':>9}{round_col:>18}{run_col:>14}"
            + "".join(f"{'s @ ' + x.name:>{w}}{'run min':>9}" for x, w in zip(plan.links, widths, strict=True)))
    lines += [head, "-" * len(head)]
    for row in table:
        times = "".join(f"{row[f'round_s@{x.name}']:>{w}.2f}{row[f'run_s@{x.name}'] / 60:>9.1f}"
                        for x, w in zip(plan.links, widths, strict=True))
        lines.append(f"{row['method']:<22}{row['encoding']:<6}{row['update_bytes'] / 1e6:>11.3f}{row['packets']:>8}"
                     f"{row['vs_full_pct']:>8.2f}%{row['round_bytes'] / 1e6:>18.2f}{row['run_bytes'] / 1e6:>14.1f}"
                     f"{times}")
    lines.append("seconds: one device's download + upload of one update on that link, plus a round trip each way "
                 "(devices in parallel); run min: that times the rounds, in minutes")
    return "\n".join(lines)

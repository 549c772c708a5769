"""Bandwidth planning: the bytes an update of a method really takes on the wire, measured through the codec.

The update is built (real tensors of the real model), encoded by the codec, framed as the round message and
split into MQTT packets exactly as the transport would; nothing is inferred from parameter counts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from fedpeft_edge.config import CommArgs, ModelArgs, PeftArgs
from fedpeft_edge.protocol import keys as M
from fedpeft_edge.transport.topics import Topics
from fedpeft_edge.wire.chunk import CHUNK_HEADER_BYTES, chunk_count
from fedpeft_edge.wire.codec import encode_tensors, message_parts
from fedpeft_edge.wire.packet import max_chunk_bytes, packet_limit, publish_packet_bytes


@dataclasses.dataclass(frozen=True)
class UpdateSize:
    """One update of one method: parameters, raw tensor bytes, encoded blob, framed message, MQTT bytes."""

    method: str
    encoding: str
    params: int
    raw_bytes: int
    blob_bytes: int
    frame_bytes: int
    mqtt_bytes: int
    packets: int


def measure_update(
    model_args: ModelArgs, method: str, comm_args: CommArgs, peft_args: PeftArgs | None = None,
    encoding: str | None = None,
) -> UpdateSize:
    """Build the model with `method`, encode its shared tensors and count the MQTT packets that carry them."""
    pa = dataclasses.replace(peft_args or PeftArgs(), method=method)  # type: ignore[arg-type]
    return measure_updates(model_args, pa, comm_args, [encoding or comm_args.encoding])[0]


def measure_updates(
    model_args: ModelArgs, peft_args: PeftArgs, comm_args: CommArgs, encodings: Sequence[str]
) -> list[UpdateSize]:
    """One UpdateSize per encoding for one method; the model is built once (random weights: sizes only)."""
    from fedpeft_edge.backbone import build_backbone
    from fedpeft_edge.peft import build_method

    m = build_method(peft_args)
    if model_args.family == "image":
        model = m.apply(build_backbone(dataclasses.replace(model_args, weights="none")).model)
    else:  # a text model's own architecture (its config, random weights): weights="none" would be a test model
        from fedpeft_edge.llm.backbone import build_text_backbone

        model = m.apply(build_text_backbone(model_args, load_weights=False)[0])
    manifest = m.manifest(model)
    state = m.get_state(model)
    out = []
    for enc in encodings:
        blob = encode_tensors(state, manifest, enc)
        params = {M.MSG_ARG_KEY_TYPE: M.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER, M.MSG_ARG_KEY_SENDER: "device-0",
                  M.MSG_ARG_KEY_RECEIVER: M.SERVER_ID, M.MSG_ARG_KEY_ROUND: 1, M.MSG_ARG_KEY_NUM_SAMPLES: 1000,
                  M.MSG_ARG_KEY_MANIFEST_HASH: manifest.hash, M.MSG_ARG_KEY_ENCODING: enc,
                  M.MSG_ARG_KEY_MSG_ID: "0" * 32, M.MSG_ARG_KEY_SENT_AT: 1.8e9}
        frame = sum(memoryview(p).nbytes for p in message_parts(params, blob))
        topic = Topics(comm_args.topic_prefix, "planning").d2s("device-0")
        sizes = packet_sizes(topic, frame, comm_args)
        out.append(UpdateSize(peft_args.method, enc, manifest.num_params, manifest.nbytes, len(blob), frame,
                              sum(sizes), len(sizes)))
    return out


@dataclasses.dataclass(frozen=True)
class Link:
    """A link to plan a round on: rates in bit/s each way and the round-trip time (seconds)."""

    name: str
    down_bps: float
    up_bps: float
    rtt_s: float = 0.0

    def describe(self) -> str:
        return (f"{self.name}: {self.down_bps / 1e6:g} Mbit/s down, {self.up_bps / 1e6:g} Mbit/s up, "
                f"{self.rtt_s * 1000:g} ms round trip")


# Named links: typical figures to plan with (down, up in bit/s; round-trip time in s).
LINKS: dict[str, Link] = {
    "lte": Link("lte", 30e6, 10e6, 0.050),
    "3g": Link("3g", 2e6, 0.5e6, 0.150),
    "wifi": Link("wifi", 100e6, 100e6, 0.005),
    "ethernet": Link("ethernet", 1e9, 1e9, 0.001),
}


def parse_link(spec: str) -> Link:
    """'lte', '10mbit' (both ways) or '50mbit/10mbit' (down/up), each optionally '@40ms' (round-trip time; a
    named link has its own, a bare rate none)."""
    from fedpeft_edge.errors import ConfigError

    name = spec.strip().lower()
    rates_part, _, rtt_part = name.partition("@")
    try:
        rtt = _duration(rtt_part) if rtt_part else None
        if rates_part in LINKS:
            link = LINKS[rates_part]
            return dataclasses.replace(link, name=name, rtt_s=link.rtt_s if rtt is None else rtt)
        rates = [_rate(p) for p in rates_part.split("/")]
    except ValueError as exc:
        raise ConfigError(
            f"link {spec!r} is not understood ({exc}); use a name ({', '.join(LINKS)}), '10mbit', '1gbit' "
            "or 'DOWN/UP' such as '50mbit/10mbit', optionally with a round-trip time: '50mbit/10mbit@40ms'"
        ) from exc
    if len(rates) not in (1, 2):
        raise ConfigError(f"link {spec!r}: give one rate or DOWN/UP")
    return Link(name, rates[0], rates[-1], rtt or 0.0)


def _duration(text: str) -> float:
    for unit, factor in (("ms", 1e-3), ("s", 1.0)):
        if text.endswith(unit):
            value = float(text[: -len(unit)])
            if value < 0:
                raise ValueError("a round-trip time must be >= 0")
            return value * factor
    raise ValueError(f"no unit (ms or s) in round-trip time {text!r}")


def _rate(text: str) -> float:
    units = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3, "bit": 1.0}
    for unit, factor in units.items():
        if text.endswith(unit):
            value = float(text[: -len(unit)])
            if value <= 0:
                raise ValueError("a rate must be positive")
            return value * factor
    raise ValueError(f"no unit in {text!r}")


# MQTT rides TCP/IP: a link carries each 1448-byte TCP segment (MSS of a 1500-byte MTU with TCP timestamps)
# as a 1514-byte Ethernet frame, and a rate is a rate of frames (the lab's tbf counts them so). Measured in
# the lab (benchmarks/bench_lab.py, full EfficientNet-Lite0 update, 13.54 MB of MQTT packets): 113.4 s at
# 1 Mbit/s = 1.047 x size/rate, 1.14-1.17 s at 100 Mbit/s = 1.05-1.08 x; 1514 / 1448 = 1.046.
TCP_SEGMENT_BYTES = 1448
FRAME_OVERHEAD_BYTES = 66  # TCP (32 with timestamps) + IPv4 (20) + Ethernet (14) headers per segment


def link_bytes(mqtt_bytes: int) -> int:
    """Bytes a link carries for `mqtt_bytes` of MQTT packets: every TCP segment with its headers."""
    return mqtt_bytes + -(-mqtt_bytes // TCP_SEGMENT_BYTES) * FRAME_OVERHEAD_BYTES


def round_seconds(size: UpdateSize, down_bps: float, up_bps: float, rtt_s: float = 0.0) -> float:
    """Seconds a device spends moving one round's update down and its own up on a link (no contention):
    the MQTT packets with their TCP/IP framing at the link's rate, plus one round trip each way (the
    message's delivery and its PUBACK)."""
    return 8 * link_bytes(size.mqtt_bytes) / down_bps + 8 * link_bytes(size.mqtt_bytes) / up_bps + 2 * rtt_s


def packet_sizes(topic: str, frame_bytes: int, comm_args: CommArgs) -> list[int]:
    """PUBLISH packet sizes for a frame, chunked above comm_args.max_message_bytes as the transport does."""
    mqtt5 = comm_args.mqtt_version == "5"
    limit = packet_limit(comm_args.max_message_bytes, chunk_bytes=comm_args.chunk_bytes)
    if publish_packet_bytes(topic, frame_bytes, comm_args.qos, mqtt5) <= limit:
        return [publish_packet_bytes(topic, frame_bytes, comm_args.qos, mqtt5)]
    max_chunk = max_chunk_bytes(topic, limit, comm_args.qos, mqtt5)
    max_data = max_chunk - CHUNK_HEADER_BYTES
    n = chunk_count(frame_bytes, max_data)
    sizes = [publish_packet_bytes(topic, CHUNK_HEADER_BYTES + max_data, comm_args.qos, mqtt5)] * (n - 1)
    last = frame_bytes - max_data * (n - 1)
    return [*sizes, publish_packet_bytes(topic, CHUNK_HEADER_BYTES + last, comm_args.qos, mqtt5)]

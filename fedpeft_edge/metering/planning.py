"""Bandwidth planning: the bytes an update of a method really takes on the wire, measured through the codec.

The update is built (real tensors of the real model), encoded by the codec, framed as the round message and
split into MQTT packets exactly as the transport would; nothing is inferred from parameter counts.
"""

from __future__ import annotations

import dataclasses

from fedpeft_edge.config import CommArgs, ModelArgs, PeftArgs
from fedpeft_edge.metering.bandwidth import publish_packet_bytes
from fedpeft_edge.transport import messages as M
from fedpeft_edge.transport.topics import Topics
from fedpeft_edge.wire.chunk import CHUNK_HEADER_BYTES, chunk_count
from fedpeft_edge.wire.codec import encode_tensors, message_parts

_MQTT_MAX_PACKET = 268_435_455 + 5


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
    from fedpeft_edge.backbone import build_backbone
    from fedpeft_edge.peft import build_method

    model_args = dataclasses.replace(model_args, weights="none")  # sizes do not depend on the values
    pa = dataclasses.replace(peft_args or PeftArgs(), method=method)  # type: ignore[arg-type]
    m = build_method(pa)
    model = m.apply(build_backbone(model_args).model)
    manifest = m.manifest(model)
    enc = encoding or comm_args.encoding
    blob = encode_tensors(m.get_state(model), manifest, enc)
    params = {M.MSG_ARG_KEY_TYPE: M.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER, M.MSG_ARG_KEY_SENDER: "device-0",
              M.MSG_ARG_KEY_RECEIVER: M.SERVER_ID, M.MSG_ARG_KEY_ROUND: 1, M.MSG_ARG_KEY_NUM_SAMPLES: 1000,
              M.MSG_ARG_KEY_MANIFEST_HASH: manifest.hash, M.MSG_ARG_KEY_ENCODING: enc,
              M.MSG_ARG_KEY_MSG_ID: "0" * 32, M.MSG_ARG_KEY_MODEL_PARAMS: blob}
    frame = sum(memoryview(p).nbytes for p in message_parts({k: v for k, v in params.items()
                                                             if k != M.MSG_ARG_KEY_MODEL_PARAMS}, blob))
    topic = Topics(comm_args.topic_prefix, "planning").d2s("device-0")
    sizes = packet_sizes(topic, frame, comm_args)
    return UpdateSize(method, enc, manifest.num_params, manifest.nbytes, len(blob), frame, sum(sizes), len(sizes))


def packet_sizes(topic: str, frame_bytes: int, comm_args: CommArgs) -> list[int]:
    """PUBLISH packet sizes for a frame, chunked above comm_args.max_message_bytes as the transport does."""
    mqtt5 = comm_args.mqtt_version == "5"
    limit = min(comm_args.max_message_bytes + 5, _MQTT_MAX_PACKET)
    if publish_packet_bytes(topic, frame_bytes, comm_args.qos, mqtt5) <= limit:
        return [publish_packet_bytes(topic, frame_bytes, comm_args.qos, mqtt5)]
    max_chunk = limit - publish_packet_bytes(topic, 0, comm_args.qos, mqtt5) - 3
    max_data = max_chunk - CHUNK_HEADER_BYTES
    n = chunk_count(frame_bytes, max_data)
    sizes = [publish_packet_bytes(topic, CHUNK_HEADER_BYTES + max_data, comm_args.qos, mqtt5)] * (n - 1)
    last = frame_bytes - max_data * (n - 1)
    return [*sizes, publish_packet_bytes(topic, CHUNK_HEADER_BYTES + last, comm_args.qos, mqtt5)]

"""The receive pipeline: one packet as it arrived -> a FedML Message, a local event (a peer's Presence), or a
recorded drop, never an exception. In order: the topic (this run's, addressed to this node), reassembly, the
signature and replay window, the codec, decryption, the frame's own fields, the trust boundary (what the sender's
role may send on that channel) and the message id (QoS 1 redelivery, a replay). Runs on the receive thread only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fedpeft_edge.drops import DroppedMessage, DropReason
from fedpeft_edge.errors import AuthError, CodecError
from fedpeft_edge.protocol import Channel
from fedpeft_edge.protocol import keys as M
from fedpeft_edge.protocol.roles import check_wire_type
from fedpeft_edge.transport.chunking import Reassembly
from fedpeft_edge.transport.framing import check_frame, message_from_frame
from fedpeft_edge.transport.inbox import Inbound
from fedpeft_edge.transport.metering import LinkMeter
from fedpeft_edge.transport.presence import PresenceReader
from fedpeft_edge.transport.sealing import Sealer
from fedpeft_edge.transport.signing import MessageIds, Signing
from fedpeft_edge.transport.topics import Topics, topic_node
from fedpeft_edge.wire.codec import decode_message
from fedpeft_edge.wire.seal import is_sealed_blob

log = logging.getLogger(__name__)


class Receiver:
    """Node `node_id`'s receive pipeline on the topics of one run; every failure is a drop with its reason."""

    def __init__(self, topics: Topics, node_id: str, is_server: bool, *, max_frame_bytes: int, signing: Signing,
                 sealer: Sealer | None, reassembly: Reassembly, presence: PresenceReader, meter: LinkMeter,
                 drops: Callable[[DroppedMessage], None]) -> None:
        self.topics, self.node_id, self.is_server = topics, node_id, is_server
        self.max_frame_bytes = max_frame_bytes
        self.signing, self.sealer, self.reassembly, self.presence = signing, sealer, reassembly, presence
        self.meter, self.drops = meter, drops
        self.ids = MessageIds()

    def receive(self, item: Inbound) -> Any:
        """Decode one inbound packet: a Message, a Presence, or None (incomplete, not ours, or dropped). Each
        packet is metered once: with its type where it decoded, else as "dropped"."""
        node = topic_node(item.topic)
        metered = self.meter.received_count
        try:
            return self._route(item)
        except AuthError as exc:
            if self.meter.received_count == metered:  # refused before it decoded (a signature, a chunk)
                self.meter.received(node, {}, [item.packet_bytes], item.arrived, item.arrived, len(item.payload))
            self._drop(node, item.topic, exc.reason, str(exc), len(item.payload))
        except CodecError as exc:
            self._drop(node, item.topic, DropReason.MALFORMED, str(exc), len(item.payload))
        except Exception as exc:  # a decoder bug must not end the receive loop either
            log.debug("receive failed", exc_info=True)
            self._drop(node, item.topic, DropReason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}", len(item.payload))
        return None

    def _drop(self, sender: str, topic: str, reason: DropReason, detail: str, nbytes: int) -> None:
        self.drops(DroppedMessage(sender, topic, reason, detail, nbytes))

    def _route(self, item: Inbound) -> Any:
        parsed = self.topics.parse(item.topic)
        if parsed is None:
            log.debug("ignoring a message on foreign topic %s", item.topic)
            return None
        kind, node = parsed
        if kind == "presence":
            return self.presence.read(node, item)
        shared = kind == "model" and not self.is_server
        mine = kind == "d2s" if self.is_server else (kind == "s2d" and node == self.node_id) or shared
        if not mine:
            log.debug("ignoring a message on %s (not addressed to node %s)", item.topic, self.node_id)
            return None
        if not self.is_server:
            node = str(M.SERVER_ID)  # a device's s2d topic names the device; the peer is the server
        return self._decode(node, item, M.BROADCAST if shared else self.node_id, Channel(kind))

    def _decode(self, node: str, item: Inbound, me: str, channel: Channel) -> Any:
        payload, sizes, start = self.reassembly.assemble(node, item)
        if payload is None:
            return None
        try:
            frame = self.signing.open(node, item.topic, payload)
            params, blob = decode_message(frame, self.max_frame_bytes)
        except CodecError:
            self.meter.received(node, {}, sizes, start, item.arrived, len(payload))
            raise
        self.meter.received(node, params, sizes, start, item.arrived, len(payload))
        if blob is not None and (self.sealer is not None or is_sealed_blob(blob)):
            check_frame(node, params, me)  # the fields the blob is bound to, typed, before any decryption
            try:  # after the signature check: a forged frame is refused before anything is decrypted
                if self.sealer is None:
                    raise AuthError(f"encrypted tensors from {node!r} but this node has no encryption key "
                                    "(comm_args.encryption_key_file, from `fedpeft-edge provision`)",
                                    DropReason.UNDECRYPTABLE)
                blob = memoryview(self.sealer.open(params, blob))
            except AuthError as exc:
                self._drop(node, item.topic, exc.reason, str(exc), len(payload))
                return None
        return self._to_message(node, params, blob, me, channel)

    def _to_message(self, node: str, params: dict[str, Any], blob: memoryview | None, me: str,
                    channel: Channel) -> Any:
        check_frame(node, params, me)  # malformed: a frame's own fields
        check_wire_type(channel, params[M.MSG_ARG_KEY_TYPE], node)  # the trust boundary: roles.WIRE_TYPES
        msg_id = params.get(M.MSG_ARG_KEY_MSG_ID)
        if msg_id is not None:
            self.ids.check_new(node, msg_id)  # QoS 1 redelivery or a replay inside the signature window
        return message_from_frame(node, params, blob)

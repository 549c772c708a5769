"""FedML's BaseCommunicationManager in one process: the nodes of a simulation on one deterministic bus.

Messages are framed exactly as on MQTT (`wire.codec.message_parts`, `transport.framing`) and decoded again on
delivery, so a handler sees what it would see from a broker and the meter records the same frame bytes (not
signed and not encrypted: nothing leaves the process, so the bytes are the MQTT run's less the 96-byte envelope
and a sealed blob's 68 bytes; the tensors are the same bits). They
are labelled `bytes_kind = "encoded"`: no MQTT packet header, no PUBACK, no TCP crossed anything. One FIFO
carries every message and presence change, dispatched on the thread that runs the receive loop, in send order:
a seed gives the same run every time.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from fedpeft_edge.drops import DroppedMessage, DropReason, DropRecorder
from fedpeft_edge.errors import AuthError, CodecError, TransportError
from fedpeft_edge.metering.bandwidth import BandwidthMeter, TransferRecord
from fedpeft_edge.protocol import Channel, ConnectionReady, LocalEvent, Presence
from fedpeft_edge.protocol import keys as M
from fedpeft_edge.protocol.roles import check_wire_type
from fedpeft_edge.transport.fedml import BaseCommunicationManager
from fedpeft_edge.transport.framing import check_frame, message_from_frame, pop_blob
from fedpeft_edge.transport.metering import LinkMeter
from fedpeft_edge.wire.codec import decode_message, message_parts

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Delivery:
    receiver: str
    sender: str
    frame: bytes | None  # an encoded message (None: a local event)
    event: LocalEvent | None = None  # a local event: a timer, ConnectionReady, a presence change
    bytes: int = 0  # metered size of a presence payload
    sent_at: float = 0.0
    shared: bool = False  # sent to every device (the run's model topic)


class MemoryBus:
    """Routes framed messages between the nodes attached to it; retains every node's last presence."""

    def __init__(self, max_message_bytes: int = 2_000_000_000 + 1024 * 1024) -> None:
        self.max_message_bytes = max_message_bytes
        self._nodes: dict[str, MemoryCommManager] = {}
        self._presence: dict[str, bytes] = {}  # retained, as a broker keeps it
        self._queue: collections.deque[_Delivery] = collections.deque()
        self._cond = threading.Condition()
        self.delivered = 0

    def attach(self, node: MemoryCommManager) -> None:
        """Connect a node: it gets the others' retained presence, then CONNECTION_IS_READY; they get its."""
        key = str(node.node_id)
        with self._cond:
            if key in self._nodes:
                raise TransportError(f"node id {key!r} is already on this bus; give every device its own id")
            self._nodes[key] = node
            for other, payload in sorted(self._presence.items()):
                if _wants_presence(node, other):
                    self._queue.append(self._presence_delivery(key, other, payload))
            self._queue.append(_Delivery(key, key, None, ConnectionReady(key)))
            self._cond.notify_all()
        self.publish_presence(key, M.PRESENCE_ONLINE)

    def publish_presence(self, node_id: str, status: str) -> None:
        """Retain `node_id`'s presence and deliver it to every node that subscribes to it."""
        payload = json.dumps({"status": status, "node": node_id, "time": time.time()}).encode()
        with self._cond:
            self._presence[node_id] = payload
            for key, node in sorted(self._nodes.items()):
                if key != node_id and _wants_presence(node, node_id):
                    self._queue.append(self._presence_delivery(key, node_id, payload))
            self._cond.notify_all()

    def _presence_delivery(self, receiver: str, sender: str, payload: bytes) -> _Delivery:
        body = json.loads(payload)
        event = Presence(node=sender, online=body["status"] == M.PRESENCE_ONLINE, since=float(body["time"]),
                         receiver=receiver)
        return _Delivery(receiver, sender, None, event, len(payload), time.time())

    def detach(self, node: MemoryCommManager) -> None:
        """Disconnect a node (publishing its OFFLINE presence, as its last will would)."""
        key = str(node.node_id)
        with self._cond:
            if self._nodes.get(key) is not node:
                return
            del self._nodes[key]
        self.publish_presence(key, M.PRESENCE_OFFLINE)

    def put(self, delivery: _Delivery) -> None:
        with self._cond:
            self._queue.append(delivery)
            self._cond.notify_all()

    def broadcast(self, sender: str, frame: bytes, sent_at: float) -> None:
        """One delivery of `frame` to every node but the sender, in node-id order (the model topic)."""
        with self._cond:
            for key in sorted(k for k in self._nodes if k != sender):
                self._queue.append(_Delivery(key, sender, frame, sent_at=sent_at, shared=True))
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def serve(self, owner: MemoryCommManager) -> None:
        """Dispatch every delivery, in order, until `owner` stops its receive loop."""
        while not owner.stopping:
            with self._cond:
                while not self._queue and not owner.stopping:
                    self._cond.wait(1.0)
                if owner.stopping:
                    return
                item = self._queue.popleft()
                node = self._nodes.get(item.receiver)
            if node is None:
                log.debug("no node %s on the bus: message from %s dropped", item.receiver, item.sender)
                continue
            self.delivered += 1
            node.deliver(item)


def memory_backend(bus: MemoryBus) -> Any:
    """A transport.manager backend factory that puts every node on `bus` (for FedPeftCommManager)."""

    def build(_comm_args: Any, _run_id: str, node_id: str | int, meter: BandwidthMeter | None,
              _connect_timeout_s: float, on_drop: Any = None) -> MemoryCommManager:
        return MemoryCommManager(bus, node_id, meter, on_drop)

    return build


def _wants_presence(node: MemoryCommManager, other: str) -> bool:
    """The server hears every node's presence; a device hears only the server's (as the MQTT topics say)."""
    return node.is_server or other == str(M.SERVER_ID)


class MemoryCommManager(BaseCommunicationManager):  # type: ignore[misc, valid-type]
    """One node (the server, id 0, or a device) of an in-process run."""

    bytes_kind = "encoded"  # frame bytes, not MQTT packets on a wire

    def __init__(self, bus: MemoryBus, node_id: str | int = M.SERVER_ID,
                 meter: BandwidthMeter | None = None,
                 on_drop: Callable[[DroppedMessage], None] | None = None) -> None:
        self.bus = bus
        self.drops = on_drop if isinstance(on_drop, DropRecorder) else DropRecorder(sink=on_drop)
        self.node_id = node_id
        self.is_server = str(node_id) == str(M.SERVER_ID)
        self.meter = meter if meter is not None else BandwidthMeter()
        self._link_meter = LinkMeter(self.meter, self.is_server)  # the same records as the MQTT link's
        self._observers: list[Any] = []
        self.stopping = False
        self.closed = False
        bus.attach(self)

    # --- BaseCommunicationManager -----------------------------------------------------------------------
    def add_observer(self, observer: Any) -> None:
        self._observers.append(observer)

    def remove_observer(self, observer: Any) -> None:
        self._observers.remove(observer)

    def handle_receive_message(self) -> None:
        """Run the bus (every node's deliveries) on this thread until this node stops."""
        self.stopping = False
        self.bus.serve(self)

    def stop_receive_message(self) -> None:
        self.stopping = True
        self.bus.wake()

    def post_local(self, event: LocalEvent) -> None:
        """Thread-safe: enqueue a local event (a timer) to ourselves, dispatched in order on the bus's thread."""
        if not isinstance(event, LocalEvent):
            raise TypeError(f"post_local takes a protocol.events.LocalEvent, not {type(event).__name__}")
        key = str(self.node_id)
        self.bus.put(_Delivery(key, key, None, event))

    def close(self, publish_offline: bool = True) -> None:
        """Leave the bus (OFFLINE presence, like a last will). Idempotent."""
        if not self.closed:
            self.closed = True
            self.bus.detach(self)

    # --- sending -------------------------------------------------------------------------------------------
    def send_message(self, msg: Any) -> TransferRecord:
        """Frame the message as MQTT would and queue it for its receiver; meter the frame's bytes."""
        params = dict(msg.get_params())
        params.setdefault(M.MSG_ARG_KEY_MSG_ID, uuid.uuid4().hex)
        blob = pop_blob(params)
        receiver = params.get(M.MSG_ARG_KEY_RECEIVER)
        self._check_route(receiver)
        start = time.time()
        frame = b"".join(message_parts(params, blob))
        if len(frame) > self.bus.max_message_bytes:
            raise TransportError(f"message of {len(frame)} bytes exceeds {self.bus.max_message_bytes}; "
                                 "raise comm_args.max_update_bytes")
        rec = self._link_meter.sent(str(receiver), params, [len(frame)], len(frame), start, time.time())
        if receiver == M.BROADCAST:
            self.bus.broadcast(str(self.node_id), frame, start)
        else:
            self.bus.put(_Delivery(str(receiver), str(self.node_id), frame, sent_at=start))
        return rec

    def _check_route(self, receiver: Any) -> None:
        if self.is_server and receiver == M.BROADCAST:
            return  # a shared model: to every device on the bus (as every device subscribes to the model topic)
        if self.is_server and (receiver is None or str(receiver) == str(M.SERVER_ID)):
            raise TransportError(f"server cannot send to receiver {receiver!r}; address a device id")
        if not self.is_server and str(receiver) != str(M.SERVER_ID):
            raise TransportError(
                f"device {self.node_id} can only send to the server ({M.SERVER_ID}), not to {receiver!r}")

    # --- receiving -----------------------------------------------------------------------------------------
    def deliver(self, item: _Delivery) -> None:
        """Decode one delivery (on the bus's thread) and hand it to the observers; a local event goes to those
        that take local events (`receive_local`), never through the codec."""
        if item.frame is None:
            if isinstance(item.event, Presence):
                self._record_in(item.sender, {M.MSG_ARG_KEY_TYPE: M.MSG_TYPE_PRESENCE}, item.bytes, item.sent_at)
            for observer in list(self._observers):
                receive_local = getattr(observer, "receive_local", None)
                if receive_local is not None and item.event is not None:
                    receive_local(item.event)
            return
        message = self._decode(item.sender, item.frame, item.sent_at, self._channel(item))
        if message is None:
            return
        for observer in list(self._observers):
            observer.receive_message(message.get_type(), message)

    def _channel(self, item: _Delivery) -> Channel:
        if self.is_server:
            return Channel.DEVICE_TO_SERVER
        return Channel.MODEL if item.shared else Channel.SERVER_TO_DEVICE

    def _decode(self, sender: str, frame: bytes, sent_at: float, channel: Channel) -> Any:
        try:
            params, blob = decode_message(frame, self.bus.max_message_bytes)
            check_frame(sender, params)
            check_wire_type(channel, params[M.MSG_ARG_KEY_TYPE], sender)  # roles.WIRE_TYPES
        except CodecError as exc:
            self._record_in(sender, {}, len(frame), sent_at)
            reason = exc.reason if isinstance(exc, AuthError) else DropReason.MALFORMED
            self.drops(DroppedMessage(sender, None, reason, str(exc), len(frame)))
            return None
        self._record_in(sender, params, len(frame), sent_at)
        return message_from_frame(sender, params, blob)

    def _record_in(self, peer: str, params: dict[str, Any], size: int, start: float) -> None:
        self._link_meter.received(peer, params, [size], start, time.time(), size)

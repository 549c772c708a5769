"""FedML's BaseCommunicationManager on paho 2: QoS 1, chunks, presence, reconnect; handlers off paho's thread.

paho's network thread only moves bytes: `on_message` puts the raw payload on a queue. The thread that calls
`handle_receive_message()` reassembles, decodes, drops duplicates and dispatches to observers, so a handler
may train for minutes while keepalive goes on. This is the only module that imports paho.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import json
import logging
import queue
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedpeft_edge.config import CommArgs
from fedpeft_edge.errors import CodecError, TransportError
from fedpeft_edge.metering.bandwidth import BandwidthMeter, TransferRecord
from fedpeft_edge.protocol import ConnectionReady, Presence
from fedpeft_edge.protocol import keys as M
from fedpeft_edge.transport.fedml import BaseCommunicationManager
from fedpeft_edge.transport.framing import check_frame, message_from_frame, pop_blob, round_of
from fedpeft_edge.transport.topics import Topics
from fedpeft_edge.wire.chunk import Reassembler, is_chunk, parse_chunk, split_payload
from fedpeft_edge.wire.codec import decode_message, message_parts
from fedpeft_edge.wire.packet import max_chunk_bytes, packet_limit, publish_packet_bytes

log = logging.getLogger(__name__)

_DEDUP_WINDOW = 4096
_ECHO_INTERVAL_S = 1.0  # at most one presence echo a second (each reaches every device)
_MAX_INFLIGHT = 16  # chunks awaiting PUBACK per client: bounds memory for a 300 MB transfer


class State(enum.Enum):
    """Connection states; reconnects go CONNECTED -> RECONNECTING -> CONNECTED."""

    NEW = "new"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


@dataclasses.dataclass
class _Inbound:
    topic: str
    payload: bytes
    packet_bytes: int
    arrived: float


@dataclasses.dataclass
class _Local:
    message: Any


@dataclasses.dataclass
class _Partial:
    """Metering of a chunked transfer still arriving."""

    chunks: list[int]
    start: float


_STOP = object()


class MqttCommManager(BaseCommunicationManager):  # type: ignore[misc, valid-type]
    """One node (the server, id 0, or a device) of a run, on an MQTT broker."""

    bytes_kind = "wire"  # whole PUBLISH packets as they crossed the network

    def __init__(
        self,
        comm_args: CommArgs,
        run_id: str,
        node_id: str | int = M.SERVER_ID,
        meter: BandwidthMeter | None = None,
        on_connection_change: Callable[[bool], None] | None = None,
        connect_timeout_s: float = 10.0,
        client_id: str | None = None,
    ) -> None:
        self.args = comm_args
        self.node_id = node_id
        self.is_server = str(node_id) == str(M.SERVER_ID)
        self.topics = Topics(comm_args.topic_prefix, run_id)
        self.topics.presence(node_id)  # validates the id as a topic level
        self.meter = meter if meter is not None else BandwidthMeter()
        self.on_connection_change = on_connection_change  # called on paho's thread: keep it quick
        self.state = State.NEW
        self._observers: list[Any] = []
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._connect_error: TransportError | None = None
        self._broker_max_packet: int | None = None
        self._reassembler = Reassembler(comm_args.max_update_bytes + 4096, comm_args.chunk_timeout_s)
        self._partials: dict[tuple[str, bytes], _Partial] = {}
        self._seen: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        self._send_lock = threading.Lock()
        self._ack_cond = threading.Condition()
        self._ack_counter = 0
        self._acks: dict[int, tuple[int, int]] = {}  # mid -> (ack sequence number, reason code)
        self._mqtt5 = comm_args.mqtt_version == "5"
        self._online_payload = b""  # this session's ONLINE presence, re-sent as is by the presence echo
        self._echo_due = False
        self._echo_at = 0.0
        self._client = self._make_client(client_id or f"fedpeft-{run_id}-{node_id}-{uuid.uuid4().hex[:6]}")
        self._connect(connect_timeout_s)

    # --- connection ------------------------------------------------------------------------------------

    def _make_client(self, client_id: str) -> mqtt.Client:
        a = self.args
        protocol = mqtt.MQTTv5 if self._mqtt5 else mqtt.MQTTv311
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        client.max_inflight_messages_set(_MAX_INFLIGHT)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(max(1, round(a.reconnect_min_s)), max(1, round(a.reconnect_max_s)))
        if a.username is not None:
            client.username_pw_set(a.username, a.password)
        if a.tls_ca_file or a.tls_cert_file:
            client.tls_set(ca_certs=a.tls_ca_file, certfile=a.tls_cert_file, keyfile=a.tls_key_file,
                           cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            client.tls_insecure_set(a.tls_insecure)
        client.will_set(self.topics.presence(self.node_id), self._presence_payload(M.PRESENCE_OFFLINE),
                        qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    def _connect(self, timeout_s: float) -> None:
        self.state = State.CONNECTING
        kwargs: dict[str, Any] = {}
        if self._mqtt5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 300  # a device that drops for < 5 min gets its queued messages
            kwargs = {"clean_start": mqtt.MQTT_CLEAN_START_FIRST_ONLY, "properties": props}
        a = self.args
        self._client.connect_async(a.broker_host, a.broker_port, a.keepalive_s, **kwargs)
        self._client.loop_start()
        if not self._connected.wait(timeout_s) or self._connect_error is not None:
            err = self._connect_error
            self.close(publish_offline=False)
            raise err or TransportError(
                f"no connection to MQTT broker {self.args.broker_host}:{self.args.broker_port} within "
                f"{timeout_s:g} s; check comm_args.broker_host/broker_port and that the broker runs"
            )

    def _on_connect(self, client: mqtt.Client, _u: Any, _flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._connect_error = TransportError(
                f"broker {self.args.broker_host}:{self.args.broker_port} refused the connection: {reason}; "
                "check comm_args.username/password/TLS", reason_code=int(reason.value))
            self._connected.set()
            return
        self._broker_max_packet = getattr(props, "MaximumPacketSize", None) if props is not None else None
        _set_nodelay(client)
        if self.is_server:
            client.subscribe([(self.topics.all_d2s(), 1), (self.topics.all_presence(), 1)])
        else:
            client.subscribe([(self.topics.s2d(self.node_id), 1), (self.topics.presence(M.SERVER_ID), 1)])
        self._online_payload = self._presence_payload(M.PRESENCE_ONLINE)
        client.publish(self.topics.presence(self.node_id), self._online_payload, 1, True)
        reconnect = self.state is State.RECONNECTING
        self.state = State.CONNECTED
        self._connected.set()
        log.info("node %s %sconnected to %s:%s", self.node_id, "re" if reconnect else "",
                 self.args.broker_host, self.args.broker_port)
        self._inbox.put(_Local(ConnectionReady(str(self.node_id)).to_message()))
        if self.on_connection_change is not None:
            self.on_connection_change(True)

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.RECONNECTING
        log.warning("node %s lost the broker (%s); paho reconnects with back-off", self.node_id, reason)
        if self.on_connection_change is not None:
            self.on_connection_change(False)

    def _presence_payload(self, status: str) -> bytes:
        return json.dumps({"status": status, "node": self.node_id, "time": time.time()}).encode()

    @property
    def connected(self) -> bool:
        return self.state is State.CONNECTED

    def close(self, publish_offline: bool = True) -> None:
        """Publish OFFLINE presence (retained), disconnect and stop paho's thread. Idempotent."""
        if self.state is State.CLOSED:
            return
        if publish_offline and self.state is State.CONNECTED:
            info = self._client.publish(self.topics.presence(self.node_id),
                                        self._presence_payload(M.PRESENCE_OFFLINE), 1, True)
            self._wait_ack(info.mid, -1, timeout_s=2.0, what="OFFLINE presence", raise_on_timeout=False)
        self.state = State.CLOSED
        self._client.disconnect()
        self._client.loop_stop()

    # --- BaseCommunicationManager -----------------------------------------------------------------------

    def add_observer(self, observer: Any) -> None:
        self._observers.append(observer)

    def remove_observer(self, observer: Any) -> None:
        self._observers.remove(observer)

    def post_local(self, message: Any) -> None:
        """Thread-safe: enqueue a message to ourselves; observers get it on the receive loop's thread."""
        self._inbox.put(_Local(message))

    def stop_receive_message(self) -> None:
        """Make handle_receive_message() return (thread-safe; may be called from a handler)."""
        self._stopping.set()
        self._inbox.put(_STOP)

    def handle_receive_message(self) -> None:
        """Block, dispatching every received message to the observers on this thread, until stopped."""
        self._stopping.clear()
        while not self._stopping.is_set():
            self.poll(timeout_s=1.0)

    def poll(self, timeout_s: float | None = 0.0) -> int:
        """Dispatch what is queued (waiting up to timeout_s for the first item); return how many messages."""
        done = 0
        block = timeout_s is None or timeout_s > 0
        while True:
            try:
                item = self._inbox.get(block=block, timeout=timeout_s if block else None)
            except queue.Empty:
                self._reassembler.expire()
                self._echo_presence()
                return done
            block = False
            if item is _STOP:
                return done
            message = item.message if isinstance(item, _Local) else self._receive(item)
            if message is not None:
                self._dispatch(message)
                done += 1

    def _echo_presence(self) -> None:
        """Re-publish this session's ONLINE presence if a device came online (comm_args.presence_echo)."""
        now = time.monotonic()
        if not self._echo_due or now - self._echo_at < _ECHO_INTERVAL_S or self.state is not State.CONNECTED:
            return
        self._echo_due, self._echo_at = False, now
        self._client.publish(self.topics.presence(self.node_id), self._online_payload, 1, True)
        log.debug("node %s re-announced its presence for devices that came online", self.node_id)

    def _dispatch(self, message: Any) -> None:
        for observer in list(self._observers):
            observer.receive_message(message.get_type(), message)

    # --- sending -------------------------------------------------------------------------------------------

    def send_message(self, msg: Any) -> TransferRecord:
        """Publish a FedML Message (QoS 1, chunked above the packet limit); block until the last PUBACK.

        Params must be JSON-able except at most one bytes-like value (the encoded tensors), which travels as
        the frame's blob without being copied more than once.
        """
        params = dict(msg.get_params())
        params.setdefault(M.MSG_ARG_KEY_MSG_ID, uuid.uuid4().hex)
        blob = pop_blob(params)
        topic, peer = self._route(params)
        parts = message_parts(params, blob)
        total = sum(memoryview(p).nbytes for p in parts)
        limit = self.packet_limit()
        qos = self.args.qos
        with self._send_lock:
            start = time.time()
            if publish_packet_bytes(topic, total, qos, self._mqtt5) <= limit:
                sizes = self._publish_all(topic, iter([b"".join(parts)]))
            else:
                max_chunk = max_chunk_bytes(topic, limit, qos, self._mqtt5)
                sizes = self._publish_all(topic, split_payload(parts, max_chunk))
            end = time.time()
        rec = TransferRecord(
            direction="down" if self.is_server else "up", sent=True, peer=peer,
            round=round_of(params), msg_type=params.get(M.MSG_ARG_KEY_TYPE),
            msg_id=params[M.MSG_ARG_KEY_MSG_ID], chunks=len(sizes), mqtt_bytes=sum(sizes),
            payload_bytes=total, chunk_bytes=tuple(sizes), start=start, end=end,
        )
        self.meter.record(rec)
        return rec

    def packet_limit(self) -> int:
        """Largest PUBLISH packet we send: comm_args.max_message_bytes, or less if the broker said so."""
        return packet_limit(self.args.max_message_bytes, self._broker_max_packet)

    def _route(self, params: dict[str, Any]) -> tuple[str, str]:
        receiver = params.get(M.MSG_ARG_KEY_RECEIVER)
        if self.is_server:
            if receiver is None or str(receiver) == str(M.SERVER_ID):
                raise TransportError(f"server cannot send to receiver {receiver!r}; address a device id")
            return self.topics.s2d(receiver), str(receiver)
        if str(receiver) != str(M.SERVER_ID):
            raise TransportError(
                f"device {self.node_id} can only send to the server ({M.SERVER_ID}), not to {receiver!r}"
            )
        return self.topics.d2s(self.node_id), str(M.SERVER_ID)

    def _publish_all(self, topic: str, packets: Any) -> list[int]:
        window: collections.deque[tuple[int, int, int]] = collections.deque()
        sizes: list[int] = []
        for packet in packets:
            with self._ack_cond:
                seq0 = self._ack_counter
            info = self._client.publish(topic, packet, qos=self.args.qos, retain=False)
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                raise TransportError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}", int(info.rc))
            sizes.append(publish_packet_bytes(topic, len(packet), self.args.qos, self._mqtt5))
            window.append((info.mid, seq0, len(sizes) - 1))
            while len(window) >= _MAX_INFLIGHT - 2:
                self._wait_window(window, topic)
        while window:
            self._wait_window(window, topic)
        return sizes

    def _wait_window(self, window: collections.deque[tuple[int, int, int]], topic: str) -> None:
        mid, seq0, index = window.popleft()
        self._wait_ack(mid, seq0, self.args.publish_timeout_s, f"packet {index} on {topic}")

    def _wait_ack(
        self, mid: int, seq0: int, timeout_s: float, what: str, raise_on_timeout: bool = True
    ) -> None:
        deadline = time.monotonic() + timeout_s
        with self._ack_cond:
            while True:
                got = self._acks.get(mid)
                if got is not None and got[0] > seq0:
                    del self._acks[mid]
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if raise_on_timeout:
                        raise TransportError(
                            f"no PUBACK for {what} within {timeout_s:g} s (state {self.state.value}); "
                            "the broker is unreachable or dropped it; "
                            "raise comm_args.publish_timeout_s if the link is slow"
                        )
                    return
                self._ack_cond.wait(remaining)
        if got[1] >= 0x80:
            raise TransportError(
                f"broker refused {what} with reason code {got[1]:#x}; if it is 0x95 (packet too large) "
                "or 0x97, lower comm_args.max_message_bytes to the broker's limit", reason_code=got[1],
            )

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, reason: Any, _props: Any) -> None:
        code = int(getattr(reason, "value", 0) or 0)
        with self._ack_cond:
            self._ack_counter += 1
            self._acks[mid] = (self._ack_counter, code)
            self._ack_cond.notify_all()
        if self.args.qos:
            self.meter.record_ack(sent=False)

    # --- receiving -----------------------------------------------------------------------------------------

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        props = len(msg.properties.pack()) if self._mqtt5 and msg.properties is not None else None
        size = publish_packet_bytes(msg.topic, len(msg.payload), msg.qos, self._mqtt5, props)
        if msg.qos:
            self.meter.record_ack(sent=True)
        self._inbox.put(_Inbound(msg.topic, bytes(msg.payload), size, time.time()))

    def _receive(self, item: _Inbound) -> Any:
        parsed = self.topics.parse(item.topic)
        if parsed is None:
            log.debug("ignoring a message on foreign topic %s", item.topic)
            return None
        kind, node = parsed
        if kind == "presence":
            return self._presence(node, item)
        mine = kind == "d2s" if self.is_server else (kind == "s2d" and node == str(self.node_id))
        if not mine:
            log.debug("ignoring a message on %s (not addressed to node %s)", item.topic, self.node_id)
            return None
        if not self.is_server:
            node = str(M.SERVER_ID)  # a device's s2d topic names the device; the peer is the server
        try:
            return self._decode(node, item)
        except CodecError as exc:
            log.warning("dropped a message from %s on %s: %s", node, item.topic, exc)
            return None

    def _decode(self, node: str, item: _Inbound) -> Any:
        payload, sizes, start = self._assemble(node, item)
        if payload is None:
            return None
        try:
            params, blob = decode_message(payload, self.args.max_update_bytes + 1024 * 1024)
        except CodecError:
            self._record_in(node, {}, sizes, start, item.arrived, len(payload))
            raise
        self._record_in(node, params, sizes, start, item.arrived, len(payload))
        return self._to_message(node, params, blob)

    def _assemble(self, node: str, item: _Inbound) -> tuple[bytes | bytearray | None, list[int], float]:
        if not is_chunk(item.payload):
            return item.payload, [item.packet_bytes], item.arrived
        try:
            header, _data = parse_chunk(item.payload, self._reassembler.max_total_bytes)
        except CodecError:
            self._record_in(node, {}, [item.packet_bytes], item.arrived, item.arrived, len(item.payload))
            raise
        key = (node, header.transfer_id)
        partial = self._partials.setdefault(key, _Partial([], item.arrived))
        partial.chunks.append(item.packet_bytes)
        try:
            whole = self._reassembler.add(item.payload, source=node)
        except CodecError:
            self._drop_partial(key, item.arrived)
            raise
        for tid in self._reassembler.expire():
            self._drop_partial((node, tid), item.arrived)
        if whole is None:
            return None, [], 0.0
        done = self._partials.pop(key)
        return whole, done.chunks, done.start

    def _drop_partial(self, key: tuple[str, bytes], now: float) -> None:
        partial = self._partials.pop(key, None)
        if partial is not None:
            self._record_in(key[0], {}, partial.chunks, partial.start, now, 0)

    def _record_in(
        self, node: str, params: dict[str, Any], sizes: list[int], start: float, end: float, payload: int
    ) -> None:
        self.meter.record(TransferRecord(
            direction="up" if self.is_server else "down", sent=False, peer=node, round=round_of(params),
            msg_type=params.get(M.MSG_ARG_KEY_TYPE, "dropped"), msg_id=params.get(M.MSG_ARG_KEY_MSG_ID),
            chunks=len(sizes), mqtt_bytes=sum(sizes), payload_bytes=payload, chunk_bytes=tuple(sizes),
            start=start, end=end,
        ))

    def _to_message(self, node: str, params: dict[str, Any], blob: memoryview | None) -> Any:
        check_frame(node, params)
        msg_id = params.get(M.MSG_ARG_KEY_MSG_ID)
        if msg_id is not None:
            if (node, str(msg_id)) in self._seen:
                log.debug("dropping duplicate message %s from %s", msg_id, node)
                return None
            self._seen[(node, str(msg_id))] = None
            while len(self._seen) > _DEDUP_WINDOW:
                self._seen.popitem(last=False)
        return message_from_frame(node, params, blob)

    def _presence(self, node: str, item: _Inbound) -> Any:
        if node == str(self.node_id) or not item.payload:
            return None
        self._record_in(node, {M.MSG_ARG_KEY_TYPE: M.MSG_TYPE_PRESENCE}, [item.packet_bytes], item.arrived,
                        item.arrived, len(item.payload))
        try:
            body = json.loads(item.payload)
            status = str(body["status"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring malformed presence from %s: %r", node, item.payload[:80])
            return None
        if self.is_server and self.args.presence_echo and status == M.PRESENCE_ONLINE:
            self._echo_due = True  # sent from poll(), so a burst of devices coming online costs one echo
        since = body.get("time")
        return Presence(node=node, online=status == M.PRESENCE_ONLINE,
                        since=float(since) if isinstance(since, (int, float)) else None,
                        receiver=str(self.node_id)).to_message()


def _set_nodelay(client: mqtt.Client) -> None:
    """Disable Nagle: a message's last segment and every PUBACK go out at once, not after a delayed ACK."""
    sock = client.socket()
    if isinstance(sock, (socket.socket, ssl.SSLSocket)):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # not TCP (a unix socket or websocket proxy): nothing to tune
            log.debug("TCP_NODELAY not set: %s", exc)

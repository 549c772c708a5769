"""FedML's BaseCommunicationManager on paho 2: QoS 1, chunks, presence, reconnect; handlers off paho's thread.

paho's network thread only moves bytes: `on_message` puts the raw payload on a queue. The thread that calls
`handle_receive_message()` reassembles, decodes, drops duplicates and dispatches to observers, so a handler
may train for minutes while keepalive goes on. This is the only module that imports paho.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import logging
import math
import queue
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedpeft_edge.config import CommArgs, read_password
from fedpeft_edge.drops import DroppedMessage, DropReason, DropRecorder
from fedpeft_edge.errors import AuthError, CodecError, TransportError
from fedpeft_edge.metering.bandwidth import BandwidthMeter, TransferRecord
from fedpeft_edge.protocol import Channel, ConnectionReady, LocalEvent, Presence, Throttled
from fedpeft_edge.protocol import keys as M
from fedpeft_edge.protocol.roles import check_wire_type
from fedpeft_edge.transport.connection import ConnectionState, State
from fedpeft_edge.transport.fedml import BaseCommunicationManager
from fedpeft_edge.transport.framing import (
    ack_timeout_s,
    check_frame,
    is_scalar,
    message_from_frame,
    pop_blob,
    round_of,
)
from fedpeft_edge.transport.reasons import explain_connect_refusal, explain_topic_refusal
from fedpeft_edge.transport.sealing import build_sealer
from fedpeft_edge.transport.shedding import SenderShed
from fedpeft_edge.transport.signing import MessageIds, Signing, build_auth
from fedpeft_edge.transport.topics import Topics
from fedpeft_edge.wire.auth import ENVELOPE_BYTES, SenderRate, is_sealed
from fedpeft_edge.wire.chunk import (
    CHUNK_HEADER_BYTES,
    DIGEST_BYTES,
    MIN_CHUNK_DATA,
    Expired,
    Reassembler,
    chunk_count,
    is_chunk,
    is_manifest,
    manifests_for,
    parse_manifest,
    split_payload,
)
from fedpeft_edge.wire.codec import MAX_HEADER_BYTES, decode_message, message_parts
from fedpeft_edge.wire.limits import sender_burst_for
from fedpeft_edge.wire.packet import MQTT_MAX_PACKET, max_chunk_bytes, packet_limit, publish_packet_bytes
from fedpeft_edge.wire.seal import MAX_WRAPS_BYTES, SEAL_OVERHEAD, is_sealed_blob

log = logging.getLogger(__name__)

_ECHO_INTERVAL_S = 1.0  # at most one presence echo a second (each reaches every device)
# Packets awaiting PUBACK per client (paho's bound); a send's window is bounded in bytes by
# comm_args.inflight_bytes, which also bounds memory for a 300 MB transfer.
_MAX_INFLIGHT = 256


@dataclasses.dataclass
class _Inbound:
    topic: str
    payload: bytes
    packet_bytes: int
    arrived: float


@dataclasses.dataclass
class _Local:
    event: LocalEvent


_STOP = object()


@dataclasses.dataclass
class _Outgoing:
    """One message being sent: its packets (made as they are published), sizes, and acknowledgements."""

    node: MqttCommManager
    topic: str
    peer: str
    params: dict[str, Any]
    total: int  # payload bytes
    count: int  # packets
    packets: Iterator[bytes]
    sizes: list[int] = dataclasses.field(default_factory=list)
    acked: int = 0
    start: float = 0.0
    end: float = 0.0

    def record(self) -> TransferRecord:
        p = self.params
        return TransferRecord(
            direction="down" if self.node.is_server else "up", sent=True, peer=self.peer, round=round_of(p),
            msg_type=p.get(M.MSG_ARG_KEY_TYPE), msg_id=p[M.MSG_ARG_KEY_MSG_ID], chunks=len(self.sizes),
            mqtt_bytes=sum(self.sizes), payload_bytes=self.total, chunk_bytes=tuple(self.sizes), start=self.start,
            end=self.end,
        )


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
        on_drop: Callable[[DroppedMessage], None] | None = None,
    ) -> None:
        self.args = comm_args
        self.node_id = node_id
        self.is_server = str(node_id) == str(M.SERVER_ID)
        self.topics = Topics(comm_args.topic_prefix, run_id)
        self.topics.presence(node_id)  # validates the id as a topic level
        self.meter = meter if meter is not None else BandwidthMeter()
        self.on_connection_change = on_connection_change  # called on paho's thread: keep it quick
        self._conn = ConnectionState()
        self._observers: list[Any] = []
        self._inbox: queue.Queue[Any] = queue.Queue()  # local items never wait; inbound ones take a slot
        self._inbound_lock = threading.Lock()
        self._inbound = [0, 0]  # packets, payload bytes queued
        # (topic, reason) -> (packets, bytes) dropped on paho's thread: a full inbox, a sender over its rate
        self._overflow: dict[tuple[str, DropReason], tuple[int, int]] = {}
        self._inbound_max_bytes = _inbox_bytes(comm_args)
        self._rate = _sender_rate(comm_args)
        # the server passes its run's recorder (logged and written once); a device only logs and counts
        self.drops = on_drop if isinstance(on_drop, DropRecorder) else DropRecorder(sink=on_drop)
        self._signing = Signing(*build_auth(comm_args, self.is_server), comm_args.require_signatures)
        self._sealer = build_sealer(comm_args, node_id, run_id)  # None: tensors travel in plaintext
        verifier = self._signing.verifier
        known = verifier.senders() if self.is_server and comm_args.require_signatures and verifier else None
        self._shed = SenderShed(self.topics, known, comm_args.shed_s)  # per-device subscriptions where known
        self._presence_seen: dict[str, tuple[float, int]] = {}
        self._session = time.time()
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._connect_error: TransportError | None = None
        self._broker_max_packet: int | None = None
        self._sub_topics: list[str] = []
        self._sub_mid: int | None = None
        self._presence_mid, self._presence_seq = -1, 0  # this connection's presence PUBLISH (its PUBACK is awaited)
        most = comm_args.max_update_bytes + MAX_HEADER_BYTES + ENVELOPE_BYTES + 4096
        if self._sealer is not None:  # a sealed blob's header, tag and (the shared model's) wrapped keys
            most += SEAL_OVERHEAD + MAX_WRAPS_BYTES
        # where signatures are required, a chunk is buffered only under a verified signed manifest (its digests
        # count against the sender's quota too: 32 bytes a chunk)
        self._reassembler = Reassembler(
            most, comm_args.chunk_timeout_s,
            max_pending_bytes=most + MAX_HEADER_BYTES + DIGEST_BYTES * chunk_count(most, MIN_CHUNK_DATA),
            max_pending_transfers=comm_args.max_pending_transfers,
            unadmitted_max_bytes=MAX_HEADER_BYTES + ENVELOPE_BYTES + 4096,
            require_manifest=comm_args.require_signatures,
        )
        self._ids = MessageIds()
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
        apply_credentials(client, a)
        client.will_set(self.topics.presence(self.node_id), self._presence_payload(M.PRESENCE_OFFLINE),
                        qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        return client

    def _connect(self, timeout_s: float) -> None:
        self._conn.move(State.CONNECTING)
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
        try:  # a broker grants any subscription but refuses a publish outside the ACL: say so now, not never
            self._wait_ack(self._presence_mid, self._presence_seq, timeout_s, "this node's presence",
                           raise_on_timeout=False, topic=self.topics.presence(self.node_id))
        except TransportError:
            self.close(publish_offline=False)
            raise

    def _on_connect(self, client: mqtt.Client, _u: Any, _flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._connect_error = TransportError(
                f"broker {self.args.broker_host}:{self.args.broker_port} refused the connection: {reason}; "
                f"{explain_connect_refusal(int(reason.value))}", reason_code=int(reason.value))
            self._connected.set()
            return
        self._broker_max_packet = getattr(props, "MaximumPacketSize", None) if props is not None else None
        _set_nodelay(client)
        if self.is_server:
            self._sub_topics = self._shed.subscriptions()
        else:
            self._sub_topics = [self.topics.s2d(self.node_id), self.topics.presence(M.SERVER_ID)]
            if self.args.model_delivery == "shared":
                self._sub_topics.append(self.topics.model())
        # Connected means subscribed: what is published after the constructor returns must reach us, also
        # on a broker cluster where a subscription takes a moment to spread to the other nodes.
        _rc, self._sub_mid = client.subscribe([(t, 1) for t in self._sub_topics])
        self._online_payload = self._presence_payload(M.PRESENCE_ONLINE)
        with self._ack_cond:
            self._presence_seq = self._ack_counter
        self._presence_mid = client.publish(self.topics.presence(self.node_id), self._online_payload, 1, True).mid

    def _on_subscribe(self, _client: mqtt.Client, _u: Any, mid: int, reasons: Any, _props: Any) -> None:
        if mid != self._sub_mid:
            return
        refused = [t for t, r in zip(self._sub_topics, reasons, strict=False) if r.is_failure]
        if refused:
            err = TransportError(
                f"broker {self.args.broker_host}:{self.args.broker_port} refused node {self.node_id}'s "
                f"subscription to {refused}; check the broker's ACL for this username and comm_args.topic_prefix")
            if self.state is State.CONNECTING:
                self._connect_error = err
                self._connected.set()
            else:
                log.error("%s", err)
            return
        left = self._conn.move(State.CONNECTED)
        if left is None:
            return  # closed meanwhile, or already connected: nothing to announce
        reconnect = left is State.RECONNECTING
        self._connected.set()
        log.info("node %s %sconnected to %s:%s", self.node_id, "re" if reconnect else "",
                 self.args.broker_host, self.args.broker_port)
        self._inbox.put(_Local(ConnectionReady(str(self.node_id))))
        if self.on_connection_change is not None:
            self.on_connection_change(True)

    def _on_disconnect(self, client: mqtt.Client, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if self._conn.move(State.RECONNECTING) is None:
            return  # closed
        self._session = time.time()  # the next connection is a new presence session with its own will
        client.will_set(self.topics.presence(self.node_id), self._presence_payload(M.PRESENCE_OFFLINE),
                        qos=1, retain=True)
        log.warning("node %s lost the broker (%s); paho reconnects with back-off", self.node_id, reason)
        if self.on_connection_change is not None:
            self.on_connection_change(False)

    def _presence_payload(self, status: str) -> bytes:
        """Presence of this connection: `time` names the session, `seq` orders ONLINE (1) before OFFLINE (2)."""
        body = json.dumps({"status": status, "node": self.node_id, "time": self._session,
                           "seq": 1 if status == M.PRESENCE_ONLINE else 2}).encode()
        return b"".join(self._signing.seal(self.topics.presence(self.node_id), [body]))

    def set_admission(self, admitted: Callable[[str], bool]) -> None:
        """Accept chunked transfers beyond a join's size only from senders `admitted(sender)` says yes to."""
        self._reassembler.admit = admitted

    @property
    def state(self) -> State:
        """The connection's state (transport.connection's state machine)."""
        return self._conn.current

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
            self._wait_ack(info.mid, -1, timeout_s=2.0, what="OFFLINE presence", raise_on_timeout=False,
                           topic=self.topics.presence(self.node_id))
        if self._conn.move(State.CLOSED) is None:
            return  # another thread closed it meanwhile
        self._client.disconnect()
        self._client.loop_stop()

    # --- BaseCommunicationManager -----------------------------------------------------------------------

    def add_observer(self, observer: Any) -> None:
        self._observers.append(observer)

    def remove_observer(self, observer: Any) -> None:
        self._observers.remove(observer)

    def post_local(self, event: LocalEvent) -> None:
        """Thread-safe: enqueue a local event (a timer) to ourselves; observers that take local events get it
        through `receive_local(event)` on the receive loop's thread."""
        if not isinstance(event, LocalEvent):
            raise TypeError(f"post_local takes a protocol.events.LocalEvent, not {type(event).__name__}")
        self._inbox.put(_Local(event))

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
                if self._overflow:
                    self._report_overflow()
                self._unshed()
                self._expire(self._reassembler.expire())
                self._echo_presence()
                return done
            block = False
            if item is _STOP:
                return done
            if self._overflow:
                self._report_overflow()
            self._unshed()
            if isinstance(item, _Local):
                message: Any = item.event
            else:
                with self._inbound_lock:
                    self._inbound[0] -= 1
                    self._inbound[1] -= len(item.payload)
                message = self._receive(item)
            if isinstance(message, LocalEvent):
                self._dispatch_local(message)
                done += 1
            elif message is not None:
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
        """Hand a message to every observer; whatever a handler raises is a drop, never the loop's end."""
        for observer in list(self._observers):
            try:
                observer.receive_message(message.get_type(), message)
            except Exception as exc:  # the edge: nothing a message causes may end the receive loop
                log.debug("handler failed", exc_info=True)
                self._drop(str(message.get_sender_id()), "", DropReason.HANDLER_ERROR,
                           f"{type(exc).__name__}: {exc}", 0)

    def _dispatch_local(self, event: LocalEvent) -> None:
        """Hand a local event to the observers that take them (`receive_local`); it never passes the codec."""
        for observer in list(self._observers):
            receive_local = getattr(observer, "receive_local", None)
            if receive_local is None:
                continue
            try:
                receive_local(event)
            except Exception as exc:  # the edge: nothing may end the receive loop
                log.debug("local event handler failed", exc_info=True)
                self._drop(str(self.node_id), "", DropReason.HANDLER_ERROR, f"{type(exc).__name__}: {exc}", 0)

    # --- sending -------------------------------------------------------------------------------------------

    def send_message(self, msg: Any) -> TransferRecord:
        """Publish a FedML Message (QoS 1, chunked above the packet limit); block until the last PUBACK.

        Params must be JSON-able except at most one bytes-like value (the encoded tensors), which travels as
        the frame's blob without being copied more than once.
        """
        result = self.send_messages([msg])[0]
        if isinstance(result, TransportError):
            raise result
        return result

    def send_messages(self, msgs: Sequence[Any]) -> list[TransferRecord | TransportError]:
        """Publish several messages at once; block until every PUBACK. One record per message, or the error
        that stopped it (a timeout fails every message not yet acknowledged).

        Their packets are interleaved, one per receiver in turn (one receiver's messages stay in order), so a
        round's fan-out starts every device's download at once: sent one after the other, the last of three
        devices on 100 Mbit/s waited ~0.2 s for the others' 13.5 MB to reach the broker (bench_lab.py).
        """
        outs = [self._outgoing(m) for m in msgs]
        lanes: dict[str, collections.deque[_Outgoing]] = {}
        for o in outs:
            lanes.setdefault(o.topic, collections.deque()).append(o)
        failed: TransportError | None = None
        with self._send_lock:
            try:
                self._publish_lanes(lanes)
            except TransportError as exc:
                failed = exc
        results: list[TransferRecord | TransportError] = []
        for o in outs:
            if o.end:
                rec = o.record()
                self.meter.record(rec)
                results.append(rec)
            else:
                results.append(failed or TransportError(f"message to {o.topic} was not sent"))
        return results

    def _outgoing(self, msg: Any) -> _Outgoing:
        params = dict(msg.get_params())
        params.setdefault(M.MSG_ARG_KEY_MSG_ID, uuid.uuid4().hex)
        blob = pop_blob(params)
        topic, peer = self._route(params)
        if self._sealer is not None and blob is not None:  # encrypt, then sign the frame holding the ciphertext
            blob = memoryview(self._sealer.seal(params, blob if isinstance(blob, memoryview) else bytes(blob)))
        parts = message_parts(params, blob)
        parts = self._signing.seal(topic, parts)
        total = sum(memoryview(p).nbytes for p in parts)
        limit = self.packet_limit()
        if publish_packet_bytes(topic, total, self.args.qos, self._mqtt5) <= limit:
            return _Outgoing(self, topic, peer, params, total, 1, iter([b"".join(parts)]))
        max_chunk = max_chunk_bytes(topic, limit, self.args.qos, self._mqtt5)
        count = chunk_count(total, max_chunk - CHUNK_HEADER_BYTES)
        if self._signing.signer is None:
            return _Outgoing(self, topic, peer, params, total, count, split_payload(parts, max_chunk))
        # Signed: the chunks' manifest goes first, each part in its own signature envelope, so a receiver
        # verifies who sends what (size, count, each chunk's SHA-256) before it buffers a byte of it.
        tid = uuid.uuid4().bytes
        manifests = manifests_for(parts, max_chunk, max_chunk - ENVELOPE_BYTES, tid)
        heads = self._signing.seal_manifests(topic, manifests)
        chunks = split_payload(parts, max_chunk, tid, manifests[0].digest)
        return _Outgoing(self, topic, peer, params, total, len(heads) + count, itertools.chain(heads, chunks))

    def packet_limit(self) -> int:
        """Largest PUBLISH packet we send: comm_args.max_message_bytes, or less if the broker said so."""
        return packet_limit(self.args.max_message_bytes, self._broker_max_packet, self.args.chunk_bytes)

    def _route(self, params: dict[str, Any]) -> tuple[str, str]:
        receiver = params.get(M.MSG_ARG_KEY_RECEIVER)
        if self.is_server:
            if receiver == M.BROADCAST and params.get(M.MSG_ARG_KEY_TYPE) == M.MSG_TYPE_S2C_MODEL:
                return self.topics.model(), M.BROADCAST
            if receiver is None or str(receiver) == str(M.SERVER_ID):
                raise TransportError(f"server cannot send to receiver {receiver!r}; address a device id")
            return self.topics.s2d(receiver), str(receiver)
        if str(receiver) != str(M.SERVER_ID):
            raise TransportError(
                f"device {self.node_id} can only send to the server ({M.SERVER_ID}), not to {receiver!r}"
            )
        return self.topics.d2s(self.node_id), str(M.SERVER_ID)

    def _publish_lanes(self, lanes: dict[str, collections.deque[_Outgoing]]) -> None:
        """Publish one packet per lane (topic) in turn, keeping up to comm_args.inflight_bytes awaiting PUBACK."""
        window: collections.deque[tuple[int, int, int, int, _Outgoing]] = collections.deque()
        inflight = 0
        while lanes:
            for topic in list(lanes):
                out = lanes[topic][0]
                if not out.sizes:
                    out.start = time.time()
                with self._ack_cond:
                    seq0 = self._ack_counter
                packet = next(out.packets)
                info = self._client.publish(topic, packet, qos=self.args.qos, retain=False)
                if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                    raise TransportError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}", int(info.rc))
                out.sizes.append(publish_packet_bytes(topic, len(packet), self.args.qos, self._mqtt5))
                window.append((info.mid, seq0, len(out.sizes) - 1, out.sizes[-1], out))
                inflight += out.sizes[-1]
                if len(out.sizes) == out.count:
                    lanes[topic].popleft()
                    if not lanes[topic]:
                        del lanes[topic]
                while window and (inflight >= self.args.inflight_bytes or len(window) >= _MAX_INFLIGHT - 2):
                    inflight -= self._wait_window(window)
        while window:
            self._wait_window(window)

    def _wait_window(self, window: collections.deque[tuple[int, int, int, int, _Outgoing]]) -> int:
        """Wait for the oldest packet's PUBACK; return its size. Every packet sent before it was acknowledged,
        so what must cross before its PUBACK can come is the packet itself."""
        mid, seq0, index, size, out = window.popleft()
        timeout = ack_timeout_s(self.args, size)
        self._wait_ack(mid, seq0, timeout, f"packet {index} ({size} bytes) on {out.topic}", topic=out.topic,
                       why=f"comm_args.publish_timeout_s {self.args.publish_timeout_s:g} s + {size} bytes at "
                           f"comm_args.min_link_rate_bps {self.args.min_link_rate_bps:g}")
        out.acked += 1
        if out.acked == out.count:
            out.end = time.time()
        return size

    def _wait_ack(
        self, mid: int, seq0: int, timeout_s: float, what: str, raise_on_timeout: bool = True, why: str = "",
        topic: str | None = None,
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
                            f"no PUBACK for {what} within {timeout_s:.1f} s ({why or 'fixed'}; state "
                            f"{self.state.value}): the broker is unreachable or dropped it; if the link is "
                            "slower than comm_args.min_link_rate_bps, lower that (or raise "
                            "comm_args.publish_timeout_s)"
                        )
                    return
                self._ack_cond.wait(remaining)
        if got[1] >= 0x80:
            raise TransportError(
                f"broker refused {what}: "
                f"{explain_topic_refusal(got[1], 'publish', topic or what, self.args.username, self.topics.run_id)}",
                reason_code=got[1],
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
        # A full inbox drops; it never holds paho's thread: that thread also reads the PUBACKs our own sends
        # (from the receive thread) wait for, so waiting here would stall both. Bounded in packets and bytes.
        n = len(msg.payload)
        with self._inbound_lock:
            limited = not self._rate_ok(msg.topic)  # before the inbox: a flood takes neither its room nor CPU
            full = self._inbound[0] >= self.args.inbox_max_messages or self._inbound[1] + n > self._inbound_max_bytes
            if not full and not limited:
                self._inbound[0] += 1
                self._inbound[1] += n
            else:  # reported from the receive thread (sinks are not thread-safe)
                key = (msg.topic, DropReason.RATE_LIMITED if limited else DropReason.INBOX_FULL)
                count, nbytes = self._overflow.get(key, (0, 0))
                if count or len(self._overflow) < 256:
                    self._overflow[key] = (count + 1, nbytes + n)
                return
        self._inbox.put(_Inbound(msg.topic, bytes(msg.payload), size, time.time()))

    def _drop(self, sender: str, topic: str, reason: DropReason, detail: str, nbytes: int, count: int = 1) -> None:
        self.drops(DroppedMessage(sender, topic, reason, detail, nbytes, count))

    def _report_overflow(self) -> None:
        with self._inbound_lock:
            overflow, self._overflow = self._overflow, {}
        for (topic, reason), (count, nbytes) in overflow.items():
            if reason is DropReason.RATE_LIMITED:
                detail = (f"{count} packets over comm_args.sender_rate_per_s={self.args.sender_rate_per_s:g} (burst "
                          f"{self._rate.burst}), dropped before any check")
            else:
                detail = (f"{count} packets arrived while the inbox was full (comm_args.inbox_max_messages "
                          f"{self.args.inbox_max_messages} / inbox_max_bytes {self._inbound_max_bytes})")
            self._drop(_topic_node(topic), topic, reason, detail, nbytes, count)
            if reason is DropReason.RATE_LIMITED:  # whatever that sender had in flight may be among them
                node = self._rate_node(topic)
                shed = self._shed.shed(node)
                self._dispatch_local(Throttled(node, count, receiver=str(self.node_id),
                                               shed_s=self._shed.shed_s if shed else 0.0))
                if shed:
                    self._client.unsubscribe(self._shed.topics_of(node))
                    log.warning("node %s floods its topics over comm_args.sender_rate_per_s=%g: unsubscribed from "
                                "them for comm_args.shed_s=%g s (the broker discards its packets meanwhile); if it "
                                "goes on, revoke it: `fedpeft-edge provision --revoke %s`", node,
                                self.args.sender_rate_per_s, self._shed.shed_s, node)

    def _unshed(self) -> None:
        """Subscribe again to the devices whose shedding time is up (a flood that goes on is shed again)."""
        back = self._shed.due()
        if back and self.state is State.CONNECTED:
            self._client.subscribe([(t, 1) for d in back for t in self._shed.topics_of(d)])
            log.info("subscribed again to %s after comm_args.shed_s", ", ".join(back))

    def _receive(self, item: _Inbound) -> Any:
        """Decode one inbound packet; every failure is recorded as a drop with its reason, never raised."""
        node = _topic_node(item.topic)
        try:
            return self._receive_checked(item)
        except AuthError as exc:
            self._record_in(node, {}, [item.packet_bytes], item.arrived, item.arrived, len(item.payload))
            self._drop(node, item.topic, exc.reason, str(exc), len(item.payload))
        except CodecError as exc:
            self._drop(node, item.topic, DropReason.MALFORMED, str(exc), len(item.payload))
        except Exception as exc:  # a decoder bug must not end the receive loop either
            log.debug("receive failed", exc_info=True)
            self._drop(node, item.topic, DropReason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}", len(item.payload))
        return None

    def _receive_checked(self, item: _Inbound) -> Any:
        parsed = self.topics.parse(item.topic)
        if parsed is None:
            log.debug("ignoring a message on foreign topic %s", item.topic)
            return None
        kind, node = parsed
        if kind == "presence":
            return self._presence(node, item)
        shared = kind == "model" and not self.is_server
        mine = kind == "d2s" if self.is_server else (kind == "s2d" and node == str(self.node_id)) or shared
        if not mine:
            log.debug("ignoring a message on %s (not addressed to node %s)", item.topic, self.node_id)
            return None
        if not self.is_server:
            node = str(M.SERVER_ID)  # a device's s2d topic names the device; the peer is the server
        return self._decode(node, item, M.BROADCAST if shared else str(self.node_id), Channel(kind))

    def _rate_ok(self, topic: str) -> bool:
        """The sender's packet rate (comm_args.sender_rate_per_s), on paho's thread, before the packet is queued,
        verified, buffered or parsed; our own packets (presence echoes) are not counted."""
        node = self._rate_node(topic)
        return node == str(self.node_id) or self._rate.allow(node)

    def _rate_node(self, topic: str) -> str:
        """The sender a packet's topic names (a device's down-link names the device; its sender is the server)."""
        node = _topic_node(topic)
        if node == str(self.node_id) and not self.is_server and "/s2d/" in topic:
            node = str(M.SERVER_ID)
        return node

    def _decode(self, node: str, item: _Inbound, me: str, channel: Channel) -> Any:
        payload, sizes, start = self._assemble(node, item)
        if payload is None:
            return None
        try:
            frame = self._signing.open(node, item.topic, payload)
            params, blob = decode_message(frame, self.args.max_update_bytes + 1024 * 1024)
        except CodecError:
            self._record_in(node, {}, sizes, start, item.arrived, len(payload))
            raise
        self._record_in(node, params, sizes, start, item.arrived, len(payload))
        if blob is not None and (self._sealer is not None or is_sealed_blob(blob)):
            check_frame(node, params, me)  # the fields the blob is bound to, typed, before any decryption
            try:  # after the signature check (in _open): a forged frame is refused before anything is decrypted
                if self._sealer is None:
                    raise AuthError(f"encrypted tensors from {node!r} but this node has no encryption key "
                                    "(comm_args.encryption_key_file, from `fedpeft-edge provision`)",
                                    DropReason.UNDECRYPTABLE)
                blob = memoryview(self._sealer.open(params, blob))
            except AuthError as exc:
                self._drop(node, item.topic, exc.reason, str(exc), len(payload))
                return None
        return self._to_message(node, params, blob, me, channel)

    def _assemble(self, node: str, item: _Inbound) -> tuple[bytes | bytearray | None, list[int], float]:
        if is_sealed(item.payload) and is_manifest(memoryview(item.payload)[ENVELOPE_BYTES:]):
            self._add_manifest(node, item)
            return None, [], 0.0
        if not is_chunk(item.payload):
            return item.payload, [item.packet_bytes], item.arrived
        self._signing.check_chunk_sender(node)
        try:
            done = self._reassembler.add_metered(item.payload, node, item.packet_bytes, item.arrived)
        except AuthError:
            raise  # no verified manifest covers it, or it differs from its signed hash: `_receive` drops it
        except CodecError as exc:
            self._record_in(node, {}, [item.packet_bytes], item.arrived, item.arrived, len(item.payload))
            self._drop(node, item.topic, DropReason.CHUNK_REFUSED, str(exc), len(item.payload))
            return None, [], 0.0
        finally:
            self._expire(self._reassembler.expired)
            self._reassembler.expired = []
        if done is None:
            return None, [], 0.0
        return done.payload, done.packets, done.started

    def _add_manifest(self, node: str, item: _Inbound) -> None:
        """A signed chunk manifest part: verified with the key of the sender its topic names (the role: the server
        on a device's down-link and the model topic, that device on its up-link) and against replay before the
        transfer it declares may hold any memory; AuthError / CodecError otherwise (recorded by `_receive`)."""
        frame = self._signing.open(node, item.topic, item.payload)
        manifest = parse_manifest(frame, self._reassembler.max_total_bytes)
        try:
            self._reassembler.add_manifest(manifest, node, item.packet_bytes, item.arrived)
        except CodecError as exc:
            self._record_in(node, {}, [item.packet_bytes], item.arrived, item.arrived, len(item.payload))
            self._drop(node, item.topic, DropReason.CHUNK_REFUSED, str(exc), len(item.payload))
        finally:
            self._expire(self._reassembler.expired)
            self._reassembler.expired = []

    def _expire(self, expired: list[Expired]) -> None:
        """Meter and report transfers the reassembler freed before they completed."""
        now = time.time()
        for e in expired:
            self._record_in(e.source, {}, e.packets, e.started, now, 0)
            self._drop(e.source, "", DropReason.TRANSFER_EXPIRED,
                       f"transfer {e.transfer_id.hex()} expired with {e.got_chunks}/{e.count} chunks; "
                       f"freed {e.freed_bytes} bytes", sum(e.packets))

    def _record_in(
        self, node: str, params: dict[str, Any], sizes: list[int], start: float, end: float, payload: int
    ) -> None:
        msg_type = params.get(M.MSG_ARG_KEY_TYPE, "dropped")
        msg_id = params.get(M.MSG_ARG_KEY_MSG_ID)
        self.meter.record(TransferRecord(
            direction="up" if self.is_server else "down", sent=False, peer=node, round=round_of(params),
            msg_type=msg_type if is_scalar(msg_type) else "dropped", msg_id=msg_id if is_scalar(msg_id) else None,
            chunks=len(sizes), mqtt_bytes=sum(sizes), payload_bytes=payload, chunk_bytes=tuple(sizes),
            start=start, end=end,
        ))

    def _to_message(self, node: str, params: dict[str, Any], blob: memoryview | None, me: str,
                    channel: Channel) -> Any:
        check_frame(node, params, me)  # malformed: a frame's own fields
        check_wire_type(channel, params[M.MSG_ARG_KEY_TYPE], node)  # the trust boundary: roles.WIRE_TYPES
        msg_id = params.get(M.MSG_ARG_KEY_MSG_ID)
        if msg_id is not None:
            self._ids.check_new(node, msg_id)  # QoS 1 redelivery or a replay inside the signature window
        return message_from_frame(node, params, blob)

    def _presence(self, node: str, item: _Inbound) -> Any:
        if node == str(self.node_id) or not item.payload:
            return None
        self._record_in(node, {M.MSG_ARG_KEY_TYPE: M.MSG_TYPE_PRESENCE}, [item.packet_bytes], item.arrived,
                        item.arrived, len(item.payload))
        signed = is_sealed(item.payload)
        body = _presence_body(node, self._signing.open(node, item.topic, item.payload, replay=False))
        order = (float(body["time"]), int(body.get("seq", 1)))
        if signed:  # retained presence is old by design: its signed (session, seq) must only move forward
            if node in self._presence_seen and order <= self._presence_seen[node]:
                raise AuthError(f"presence {order} from {node!r} is not newer than {self._presence_seen[node]}",
                                DropReason.REPLAYED)
            self._presence_seen[node] = order
        online = body["status"] == M.PRESENCE_ONLINE
        if self.is_server and self.args.presence_echo and online:
            self._echo_due = True  # sent from poll(), so a burst of devices coming online costs one echo
        return Presence(node=node, online=online, since=float(body["time"]), receiver=str(self.node_id))


def _presence_body(node: str, frame: memoryview) -> dict[str, Any]:
    if frame.nbytes > 4096:
        raise CodecError(f"presence from {node} is {frame.nbytes} bytes; a presence payload is under 4 KiB")
    try:
        body = json.loads(bytes(frame), parse_constant=_refuse)
    except (ValueError, RecursionError) as exc:
        raise CodecError(f"presence from {node} is not JSON: {exc}") from exc
    if not isinstance(body, dict) or body.get("status") not in (M.PRESENCE_ONLINE, M.PRESENCE_OFFLINE):
        raise CodecError(f"presence from {node} must be an object with status ONLINE or OFFLINE")
    since, seq = body.get("time"), body.get("seq", 1)
    if not isinstance(since, (int, float)) or isinstance(since, bool) or not math.isfinite(since) \
            or not isinstance(seq, int) or isinstance(seq, bool):
        raise CodecError(f"presence from {node} needs a finite number `time` and an int `seq`")
    return body


def _refuse(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _topic_node(topic: str) -> str:
    return topic.rsplit("/", 1)[-1][:64] if isinstance(topic, str) else "?"


def _inbox_bytes(comm_args: CommArgs) -> int:
    """Queued inbound bytes: inbox_max_bytes, at least one largest packet. The inbox is shared by every sender;
    what bounds one sender's share of it is its packet rate (`_rate_ok`, checked before a packet is queued)."""
    return max(comm_args.inbox_max_bytes, min(comm_args.max_message_bytes, MQTT_MAX_PACKET))


def _sender_rate(comm_args: CommArgs) -> SenderRate:
    # receive_limits() derives the burst from the run's manifest (the server app and every device manager apply
    # it); a bare transport knows no manifest, so the largest message it takes is max_update_bytes: a burst of
    # 256 packets at 20/s would drop a large chunked update it is otherwise configured to accept
    burst = comm_args.sender_burst or sender_burst_for(comm_args, comm_args.max_update_bytes)
    return SenderRate(comm_args.sender_rate_per_s, burst)


def _set_nodelay(client: mqtt.Client) -> None:
    """Disable Nagle: a message's last segment and every PUBACK go out at once, not after a delayed ACK."""
    sock = client.socket()
    if isinstance(sock, (socket.socket, ssl.SSLSocket)):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # not TCP (a unix socket or websocket proxy): nothing to tune
            log.debug("TCP_NODELAY not set: %s", exc)


def apply_credentials(client: mqtt.Client, comm_args: CommArgs) -> None:
    """Broker username/password and TLS (CA, client certificate) from comm_args, on a paho client."""
    a = comm_args
    if a.username is not None:
        client.username_pw_set(a.username, read_password(a))
    if a.tls_ca_file or a.tls_cert_file:
        client.tls_set(ca_certs=a.tls_ca_file, certfile=a.tls_cert_file, keyfile=a.tls_key_file,
                       cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.tls_insecure_set(a.tls_insecure)

"""FedML's BaseCommunicationManager on paho 2: the connection (QoS 1, presence, reconnect) and publishing.

paho's network thread only moves bytes: `on_message` offers the raw packet to the bounded inbox
(`transport.inbox`, which also counts each sender's rate). The thread that calls `handle_receive_message()`
runs the receive pipeline (`transport.inbound`: reassembly, signature, codec, decryption, trust boundary, replay)
and hands what comes out to the observers (`transport.observers`), so a handler may train for minutes while
keepalive goes on. Sending frames, encrypts and signs a message, cuts it into packets (`transport.chunking`) and
publishes them within a window of unacknowledged bytes (`transport.acks`); `transport.metering` records both ways.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedpeft_edge.config import CommArgs
from fedpeft_edge.drops import DroppedMessage, DropReason, DropRecorder
from fedpeft_edge.errors import TransportError
from fedpeft_edge.metering.bandwidth import BandwidthMeter, TransferRecord
from fedpeft_edge.protocol import ConnectionReady, LocalEvent, Presence, Throttled
from fedpeft_edge.protocol import keys as M
from fedpeft_edge.transport.acks import PubAcks
from fedpeft_edge.transport.chunking import Outgoing, Reassembly, build_reassembler, outgoing
from fedpeft_edge.transport.client import apply_credentials, set_nodelay
from fedpeft_edge.transport.connection import ConnectionState, State
from fedpeft_edge.transport.fedml import BaseCommunicationManager
from fedpeft_edge.transport.framing import ack_timeout_s, pop_blob
from fedpeft_edge.transport.inbound import Receiver
from fedpeft_edge.transport.inbox import STOP, Local, build_inbox
from fedpeft_edge.transport.metering import LinkMeter
from fedpeft_edge.transport.observers import Observers
from fedpeft_edge.transport.presence import PresenceEcho, PresenceReader, presence_payload
from fedpeft_edge.transport.reasons import explain_connect_refusal, explain_topic_refusal
from fedpeft_edge.transport.sealing import build_sealer
from fedpeft_edge.transport.shedding import SenderShed
from fedpeft_edge.transport.signing import Signing, build_auth
from fedpeft_edge.transport.topics import Topics, topic_node
from fedpeft_edge.wire.codec import message_parts
from fedpeft_edge.wire.packet import packet_limit, publish_packet_bytes

log = logging.getLogger(__name__)

# Packets awaiting PUBACK per client (paho's bound); a send's window is bounded in bytes by
# comm_args.inflight_bytes, which also bounds memory for a 300 MB transfer.
_MAX_INFLIGHT = 256


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
        # the server passes its run's recorder (logged and written once); a device only logs and counts
        self.drops = on_drop if isinstance(on_drop, DropRecorder) else DropRecorder(sink=on_drop)
        self._observers = Observers(str(node_id), self.drops)
        self._inbox = build_inbox(comm_args, str(node_id), self.is_server)  # paho's thread only offers to it
        self._signing = Signing(*build_auth(comm_args, self.is_server), comm_args.require_signatures)
        self._sealer = build_sealer(comm_args, node_id, run_id)  # None: tensors travel in plaintext
        verifier = self._signing.verifier
        known = verifier.senders() if self.is_server and comm_args.require_signatures and verifier else None
        self._shed = SenderShed(self.topics, known, comm_args.shed_s)  # per-device subscriptions where known
        self._link_meter = LinkMeter(self.meter, self.is_server)
        self._reassembly = Reassembly(build_reassembler(comm_args, self._sealer is not None), self._signing,
                                      self._link_meter, self.drops)
        self._receiver = Receiver(
            self.topics, str(node_id), self.is_server, max_frame_bytes=comm_args.max_update_bytes + 1024 * 1024,
            signing=self._signing, sealer=self._sealer, reassembly=self._reassembly,
            presence=PresenceReader(str(node_id), self._signing, self._link_meter), meter=self._link_meter,
            drops=self.drops)
        self._session = time.time()
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._connect_error: TransportError | None = None
        self._broker_max_packet: int | None = None
        self._sub_topics: list[str] = []
        self._sub_mid: int | None = None
        self._presence_mid, self._presence_seq = -1, 0  # this connection's presence PUBLISH (its PUBACK is awaited)
        self._send_lock = threading.Lock()
        self._acks = PubAcks()
        self._mqtt5 = comm_args.mqtt_version == "5"
        self._online_payload = b""  # this session's ONLINE presence, re-sent as is by the presence echo
        self._echo = PresenceEcho(enabled=self.is_server and comm_args.presence_echo)
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
        set_nodelay(client)
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
        self._presence_seq = self._acks.mark()
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
        self._inbox.post(Local(ConnectionReady(str(self.node_id))))
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
        return presence_payload(self._signing, self.topics.presence(self.node_id), self.node_id, self._session, status)

    def set_admission(self, admitted: Callable[[str], bool]) -> None:
        """Accept chunked transfers beyond a join's size only from senders `admitted(sender)` says yes to."""
        self._reassembly.reassembler.admit = admitted

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
        self._observers.add(observer)

    def remove_observer(self, observer: Any) -> None:
        self._observers.remove(observer)

    def post_local(self, event: LocalEvent) -> None:
        """Thread-safe: enqueue a local event (a timer) to ourselves; observers that take local events get it
        through `receive_local(event)` on the receive loop's thread."""
        if not isinstance(event, LocalEvent):
            raise TypeError(f"post_local takes a protocol.events.LocalEvent, not {type(event).__name__}")
        self._inbox.post(Local(event))

    def stop_receive_message(self) -> None:
        """Make handle_receive_message() return (thread-safe; may be called from a handler)."""
        self._stopping.set()
        self._inbox.post(STOP)

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
                item = self._inbox.get(block, timeout_s)
            except queue.Empty:
                if self._inbox.overflowed:
                    self._report_overflow()
                self._unshed()
                self._reassembly.expire()
                self._echo_presence()
                return done
            block = False
            if item is STOP:
                return done
            if self._inbox.overflowed:
                self._report_overflow()
            self._unshed()
            if isinstance(item, Local):
                message: Any = item.event
            else:
                message = self._receiver.receive(item)
                if isinstance(message, Presence):
                    self._echo.heard(message)
            if isinstance(message, LocalEvent):
                self._observers.dispatch_local(message)
                done += 1
            elif message is not None:
                self._observers.dispatch(message)
                done += 1

    def _echo_presence(self) -> None:
        """Re-publish this session's ONLINE presence if a device came online (comm_args.presence_echo)."""
        if self.state is not State.CONNECTED or not self._echo.take():
            return
        self._client.publish(self.topics.presence(self.node_id), self._online_payload, 1, True)
        log.debug("node %s re-announced its presence for devices that came online", self.node_id)

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
        lanes: dict[str, collections.deque[Outgoing]] = {}
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
                rec = self._link_meter.sent(o.peer, o.params, o.sizes, o.total, o.start, o.end)
                results.append(rec)
            else:
                results.append(failed or TransportError(f"message to {o.topic} was not sent"))
        return results

    def _outgoing(self, msg: Any) -> Outgoing:
        params = dict(msg.get_params())
        params.setdefault(M.MSG_ARG_KEY_MSG_ID, uuid.uuid4().hex)
        blob = pop_blob(params)
        topic, peer = self.topics.route(self.node_id, params.get(M.MSG_ARG_KEY_RECEIVER),
                                        params.get(M.MSG_ARG_KEY_TYPE))
        if self._sealer is not None and blob is not None:  # encrypt, then sign the frame holding the ciphertext
            blob = memoryview(self._sealer.seal(params, blob if isinstance(blob, memoryview) else bytes(blob)))
        parts = self._signing.seal(topic, message_parts(params, blob))
        return outgoing(topic, peer, params, parts, self.packet_limit(), self.args.qos, self._mqtt5, self._signing)

    def packet_limit(self) -> int:
        """Largest PUBLISH packet we send: comm_args.max_message_bytes, or less if the broker said so."""
        return packet_limit(self.args.max_message_bytes, self._broker_max_packet, self.args.chunk_bytes)

    def _publish_lanes(self, lanes: dict[str, collections.deque[Outgoing]]) -> None:
        """Publish one packet per lane (topic) in turn, keeping up to comm_args.inflight_bytes awaiting PUBACK."""
        window: collections.deque[tuple[int, int, int, int, Outgoing]] = collections.deque()
        inflight = 0
        while lanes:
            for topic in list(lanes):
                out = lanes[topic][0]
                if not out.sizes:
                    out.start = time.time()
                seq0 = self._acks.mark()
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

    def _wait_window(self, window: collections.deque[tuple[int, int, int, int, Outgoing]]) -> int:
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
        code = self._acks.wait(mid, seq0, timeout_s)
        if code is None:
            if raise_on_timeout:
                raise TransportError(
                    f"no PUBACK for {what} within {timeout_s:.1f} s ({why or 'fixed'}; state {self.state.value}): "
                    "the broker is unreachable or dropped it; if the link is slower than comm_args.min_link_rate_bps, "
                    "lower that (or raise comm_args.publish_timeout_s)"
                )
            return
        if code >= 0x80:
            raise TransportError(
                f"broker refused {what}: "
                f"{explain_topic_refusal(code, 'publish', topic or what, self.args.username, self.topics.run_id)}",
                reason_code=code,
            )

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, reason: Any, _props: Any) -> None:
        self._acks.acked(mid, int(getattr(reason, "value", 0) or 0))
        if self.args.qos:
            self.meter.record_ack(sent=False)

    # --- receiving -----------------------------------------------------------------------------------------

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        """paho's thread: size the packet and offer it to the inbox, which drops rather than waits (this thread
        also reads the PUBACKs our own sends wait for, so waiting here would stall both)."""
        props = len(msg.properties.pack()) if self._mqtt5 and msg.properties is not None else None
        size = publish_packet_bytes(msg.topic, len(msg.payload), msg.qos, self._mqtt5, props)
        if msg.qos:
            self.meter.record_ack(sent=True)
        self._inbox.offer(msg.topic, bytes(msg.payload), size)

    def _report_overflow(self) -> None:
        """Record, on the receive thread, what paho's thread dropped since the last call: one drop per (topic,
        reason), a sender over its rate or a full inbox, with the count and bytes of its packets."""
        for (topic, reason), (count, nbytes) in self._inbox.take_overflow().items():
            detail = self._inbox.explain(reason, count)
            self.drops(DroppedMessage(topic_node(topic), topic, reason, detail, nbytes, count))
            if reason is DropReason.RATE_LIMITED:  # whatever that sender had in flight may be among them
                self._throttled(self._inbox.sender(topic), count)

    def _throttled(self, node: str, count: int) -> None:
        """Tell this node's logic (a local Throttled event) and, on a server that knows its devices, shed the
        sender at the broker for comm_args.shed_s (transport/shedding.py)."""
        shed = self._shed.shed(node)
        self._observers.dispatch_local(Throttled(node, count, receiver=str(self.node_id),
                                                 shed_s=self._shed.shed_s if shed else 0.0))
        if shed:
            self._client.unsubscribe(self._shed.topics_of(node))
            log.warning("node %s floods its topics over comm_args.sender_rate_per_s=%g: unsubscribed from them "
                        "for comm_args.shed_s=%g s (the broker discards its packets meanwhile); if it goes on, "
                        "revoke it: `fedpeft-edge provision --revoke %s`", node, self.args.sender_rate_per_s,
                        self._shed.shed_s, node)

    def _unshed(self) -> None:
        """Subscribe again to the devices whose shedding time is up (a flood that goes on is shed again)."""
        back = self._shed.due()
        if back and self.state is State.CONNECTED:
            self._client.subscribe([(t, 1) for d in back for t in self._shed.topics_of(d)])
            log.info("subscribed again to %s after comm_args.shed_s", ", ".join(back))

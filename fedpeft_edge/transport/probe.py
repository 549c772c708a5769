"""A join-free broker probe for `fedpeft-agent doctor`: TCP reachability, a real MQTT connect with the run's
credentials and TLS, a timestamped round trip, and the server's retained presence.

The probe never publishes a presence, so the server does not see a device join. It publishes one message to
`<root>/doctor/<random id>`, a topic no node of the run reads, and, given the device's id, tries the run's own
topics as the agent will use them: it subscribes to the device's down-link and publishes one EMPTY, not
retained message on the device's presence topic (every node ignores an empty presence, and a retained one is
left as it is), so that a broker ACL refusing them (reason code 0x87: a run id or device id outside the
provisioning) is found now rather than as a silent wait after joining.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import ssl
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fedpeft_edge.config import CommArgs
from fedpeft_edge.protocol import SERVER_ID
from fedpeft_edge.transport.client import apply_credentials
from fedpeft_edge.transport.topics import Topics


@dataclasses.dataclass(frozen=True)
class BrokerProbe:
    """What the probe saw; None where a step did not run (an earlier one failed)."""

    host: str
    port: int
    tls: bool
    tcp_error: str | None = None  # None: the TCP connection was accepted
    connect_error: str | None = None  # the broker's reason, or the TLS/socket failure
    reason_code: int | None = None
    rtt_s: float | None = None  # publish -> own message back through the broker (QoS 1)
    server_presence: dict[str, Any] | None = None  # the server's retained presence payload, if any
    server_presence_received_at: float | None = None  # local wall clock when it arrived
    node: str | None = None  # the device whose run topics were tried (None: not tried)
    run_id: str = ""
    user: str | None = None
    publish_topic: str | None = None
    publish_code: int | None = None  # the PUBACK's reason code on the device's up-link (None: no answer)
    refused_subscriptions: tuple[str, ...] = ()  # run topics the broker refused in its SUBACK
    mqtt5: bool = True  # MQTT 3.1.1 brokers give no reason code for a refused publish

    @property
    def reachable(self) -> bool:
        return self.tcp_error is None

    @property
    def connected(self) -> bool:
        return self.reachable and self.connect_error is None


def probe_broker(comm_args: CommArgs, run_id: str, timeout_s: float = 5.0, node: str | None = None) -> BrokerProbe:
    """Connect to the run's broker as the agent would (same credentials and TLS settings), then leave; with
    `node`, try that device's run topics too."""
    host, port = comm_args.broker_host, comm_args.broker_port
    tls = bool(comm_args.tls_ca_file or comm_args.tls_cert_file)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        return BrokerProbe(host, port, tls, tcp_error=f"{type(exc).__name__}: {exc}")
    return _mqtt_probe(comm_args, Topics(comm_args.topic_prefix, run_id), tls, timeout_s, node)


class _Session:
    def __init__(self) -> None:
        self.connected = threading.Event()
        self.echo = threading.Event()
        self.presence = threading.Event()
        self.reason: Any = None
        self.echo_at: float | None = None
        self.presence_body: dict[str, Any] | None = None
        self.presence_at: float | None = None
        self.subscribed = threading.Event()
        self.suback: list[Any] = []
        self.pubacks: dict[int, int] = {}  # mid -> reason code
        self.puback = threading.Condition()


def _client(comm_args: CommArgs, session: _Session, topics: Topics, echo_topic: str,
            run_topics: list[str]) -> mqtt.Client:
    a = comm_args
    v5 = a.mqtt_version == "5"
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fedpeft-doctor-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
    apply_credentials(client, a)
    server_presence = topics.presence(SERVER_ID)

    def on_connect(c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        session.reason = reason
        if not reason.is_failure:
            c.subscribe([(t, 1) for t in (echo_topic, server_presence, *run_topics)])
        session.connected.set()

    def on_subscribe(_c: mqtt.Client, _u: Any, _mid: int, reasons: Any, _p: Any) -> None:
        session.suback = list(reasons)
        session.subscribed.set()

    def on_publish(_c: mqtt.Client, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        with session.puback:
            session.pubacks[mid] = int(getattr(reason, "value", 0) or 0)
            session.puback.notify_all()

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        if msg.topic == echo_topic:
            session.echo_at = now
            session.echo.set()
        elif msg.topic == server_presence:
            try:
                body = json.loads(msg.payload)
            except ValueError:
                body = None
            session.presence_body = body if isinstance(body, dict) else None
            session.presence_at = now
            session.presence.set()

    client.on_connect = on_connect
    client.on_message = on_message
    client.on_subscribe = on_subscribe
    client.on_publish = on_publish
    return client


def _mqtt_probe(comm_args: CommArgs, topics: Topics, tls: bool, timeout_s: float, node: str | None) -> BrokerProbe:
    host, port = comm_args.broker_host, comm_args.broker_port
    echo_topic = f"{topics.root}/doctor/{uuid.uuid4().hex}"
    session = _Session()
    run_topics = [topics.s2d(node)] if node else []
    client = _client(comm_args, session, topics, echo_topic, run_topics)
    base = BrokerProbe(host, port, tls, node=node, run_id=topics.run_id, user=comm_args.username,
                       mqtt5=comm_args.mqtt_version == "5")
    try:
        client.connect(host, port, keepalive=max(5, int(timeout_s)))
    except (OSError, ssl.SSLError, ValueError) as exc:
        return dataclasses.replace(base, connect_error=f"{type(exc).__name__}: {exc}")
    client.loop_start()
    try:
        if not session.connected.wait(timeout_s):
            return dataclasses.replace(base, connect_error=f"no CONNACK within {timeout_s:g} s")
        if session.reason.is_failure:
            return dataclasses.replace(base, connect_error=str(session.reason),
                                       reason_code=int(session.reason.value))
        t0 = time.time()
        client.publish(echo_topic, json.dumps({"sent_at": t0}).encode(), qos=1)
        rtt = session.echo_at - t0 if session.echo.wait(timeout_s) and session.echo_at is not None else None
        session.presence.wait(min(1.0, timeout_s))  # a retained message arrives right after SUBACK
        probed = dataclasses.replace(base, rtt_s=rtt, server_presence=session.presence_body,
                                     server_presence_received_at=session.presence_at)
        return _try_run_topics(client, session, probed, topics, timeout_s) if node else probed
    finally:
        client.disconnect()
        client.loop_stop()


def _try_run_topics(client: mqtt.Client, session: _Session, probe: BrokerProbe, topics: Topics,
                    timeout_s: float) -> BrokerProbe:
    """The SUBACK of the device's down-link and the PUBACK of one empty, not retained message on its presence
    topic (a topic the device writes, whose empty messages every node ignores)."""
    node = str(probe.node)
    session.subscribed.wait(timeout_s)
    subscribed = [topics.s2d(node)]
    codes = session.suback[-len(subscribed):] if session.suback else []
    refused = tuple(t for t, r in zip(subscribed, codes, strict=False) if getattr(r, "is_failure", False))
    up = topics.presence(node)
    info = client.publish(up, b"", qos=1, retain=False)
    deadline = time.monotonic() + timeout_s
    with session.puback:
        while info.mid not in session.pubacks and time.monotonic() < deadline:
            session.puback.wait(max(0.0, deadline - time.monotonic()))
    return dataclasses.replace(probe, publish_topic=up, publish_code=session.pubacks.get(info.mid),
                               refused_subscriptions=refused)

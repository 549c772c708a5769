"""A join-free broker probe for `fedpeft-agent doctor`: TCP reachability, a real MQTT connect with the run's
credentials and TLS, a timestamped round trip, and the server's retained presence.

The probe never publishes presence and never subscribes to a device topic, so the server does not see a
device join. It publishes one message, to `<root>/doctor/<random id>`, a topic no node of the run reads.
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
from fedpeft_edge.transport.mqtt import apply_credentials
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

    @property
    def reachable(self) -> bool:
        return self.tcp_error is None

    @property
    def connected(self) -> bool:
        return self.reachable and self.connect_error is None


def probe_broker(comm_args: CommArgs, run_id: str, timeout_s: float = 5.0) -> BrokerProbe:
    """Connect to the run's broker as the agent would (same credentials and TLS settings), then leave."""
    host, port = comm_args.broker_host, comm_args.broker_port
    tls = bool(comm_args.tls_ca_file or comm_args.tls_cert_file)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        return BrokerProbe(host, port, tls, tcp_error=f"{type(exc).__name__}: {exc}")
    return _mqtt_probe(comm_args, Topics(comm_args.topic_prefix, run_id), tls, timeout_s)


class _Session:
    def __init__(self) -> None:
        self.connected = threading.Event()
        self.echo = threading.Event()
        self.presence = threading.Event()
        self.reason: Any = None
        self.echo_at: float | None = None
        self.presence_body: dict[str, Any] | None = None
        self.presence_at: float | None = None


def _client(comm_args: CommArgs, session: _Session, topics: Topics, echo_topic: str) -> mqtt.Client:
    a = comm_args
    v5 = a.mqtt_version == "5"
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fedpeft-doctor-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
    apply_credentials(client, a)
    server_presence = topics.presence(SERVER_ID)

    def on_connect(c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        session.reason = reason
        if not reason.is_failure:
            c.subscribe([(echo_topic, 1), (server_presence, 1)])
        session.connected.set()

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
    return client


def _mqtt_probe(comm_args: CommArgs, topics: Topics, tls: bool, timeout_s: float) -> BrokerProbe:
    host, port = comm_args.broker_host, comm_args.broker_port
    echo_topic = f"{topics.root}/doctor/{uuid.uuid4().hex}"
    session = _Session()
    client = _client(comm_args, session, topics, echo_topic)
    base = BrokerProbe(host, port, tls)
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
        return dataclasses.replace(base, rtt_s=rtt, server_presence=session.presence_body,
                                   server_presence_received_at=session.presence_at)
    finally:
        client.disconnect()
        client.loop_stop()

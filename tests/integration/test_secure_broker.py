"""A provisioned mosquitto: anonymous clients refused, the ACL keeps device A off device B's topics, TLS works,
and signed transport messages flow while forged, replayed and unsigned ones are dropped with a reason."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from fedpeft_edge.config import CommArgs
from fedpeft_edge.drops import DroppedMessage
from fedpeft_edge.errors import TransportError
from fedpeft_edge.protocol import Channel, SharedModel, parse
from fedpeft_edge.protocol import keys as M
from fedpeft_edge.transport.broker import find_mosquitto, start_broker
from fedpeft_edge.transport.fedml import Message, message_of
from fedpeft_edge.transport.mqtt import MqttCommManager
from fedpeft_edge.transport.provision import provision
from fedpeft_edge.transport.topics import Topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90),
              pytest.mark.skipif(find_mosquitto() is None, reason="needs mosquitto")]


def _creds(prov_root: Path, node: str) -> dict[str, Any]:
    d = "server" if node == "0" else node
    return dict(yaml.safe_load((prov_root / d / "comm_args.yaml").read_text())["comm_args"])


def _client(port: int, user: str | None = None, password: str | None = None,
            client_id: str = "") -> tuple[mqtt.Client, Any]:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if user is not None:
        c.username_pw_set(user, password)
    result: dict[str, Any] = {}
    ready = threading.Event()

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        result["reason"] = reason
        ready.set()

    c.on_connect = on_connect
    c.connect("127.0.0.1", port)
    c.loop_start()
    ready.wait(10)
    return c, result.get("reason")


def test_anonymous_refused_and_acl_keeps_devices_apart(tmp_path: Path) -> None:
    prov = provision(tmp_path / "prov", ["dev-a", "dev-b"], run_id="run1")
    topics = Topics("fedpeft", "run1")
    with start_broker(secure_dir=prov.root) as broker:
        anon, reason = _client(broker.port)
        assert reason is not None and reason.is_failure, "the provisioned broker let an anonymous client in"
        anon.loop_stop()
        wrong, reason = _client(broker.port, "dev-a", "not-the-password")
        assert reason.is_failure
        wrong.loop_stop()
        a, b = _creds(prov.root, "dev-a"), _creds(prov.root, "dev-b")
        ca, ra = _client(broker.port, a["username"], prov.password("dev-a"))
        cb, rb = _client(broker.port, b["username"], prov.password("dev-b"))
        assert not ra.is_failure and not rb.is_failure
        got: list[str] = []
        cb.on_message = lambda _c, _u, m: got.append(m.topic)
        cb.subscribe([(topics.s2d("dev-b"), 1), (topics.d2s("dev-b"), 1), (topics.presence("dev-b"), 1)])
        ca.subscribe([(topics.d2s("dev-b"), 1), ("#", 1)])  # not allowed to read these: nothing may arrive
        a_got: list[str] = []
        ca.on_message = lambda _c, _u, m: a_got.append(m.topic)
        time.sleep(0.5)
        for t in (topics.s2d("dev-b"), topics.d2s("dev-b"), topics.presence("dev-b"), topics.presence("0")):
            ca.publish(t, b"forged by dev-a", qos=1).wait_for_publish(5)
        cb.publish(topics.d2s("dev-b"), b"dev-b's own update", qos=1).wait_for_publish(5)
        time.sleep(1.0)
        assert got == [], f"dev-a's publishes reached dev-b's subscribers: {got}"
        assert a_got == [], f"dev-a read topics it may not: {a_got}"
        for c in (ca, cb):
            c.disconnect()
            c.loop_stop()


def _args(port: int, creds: dict[str, Any], **kw: Any) -> CommArgs:
    return CommArgs(broker_port=port, publish_timeout_s=10.0, keepalive_s=5, **{**creds, **kw})


def _serve_until(mgr: MqttCommManager, cond: Any, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not cond():
        mgr.poll(timeout_s=0.2)


def test_signed_messages_over_tls_and_forgeries_dropped(tmp_path: Path) -> None:
    prov = provision(tmp_path / "prov", ["dev-a", "dev-b"], tls=True, run_id="run2")
    drops: list[DroppedMessage] = []
    with start_broker(secure_dir=prov.root) as broker:
        server = MqttCommManager(_args(broker.port, _creds(prov.root, "0")), "run2", M.SERVER_ID,
                                 on_drop=drops.append)
        dev = MqttCommManager(_args(broker.port, _creds(prov.root, "dev-a")), "run2", "dev-a")
        got: list[Any] = []

        class Obs:
            def receive_message(self, t: Any, m: Any) -> None:
                got.append((t, m))

            def receive_local(self, event: Any) -> None:
                got.append((type(event).__name__, event))

        server.add_observer(Obs())
        try:
            msg = Message(M.MSG_TYPE_C2S_CLIENT_STATUS, "dev-a", M.SERVER_ID)
            msg.add_params(M.MSG_ARG_KEY_CLIENT_STATUS, "OK")
            dev.send_message(msg)
            _serve_until(server, lambda: any(t == M.MSG_TYPE_C2S_CLIENT_STATUS for t, _ in got))
            assert [m.get(M.MSG_ARG_KEY_CLIENT_STATUS) for t, m in got if t == M.MSG_TYPE_C2S_CLIENT_STATUS] == ["OK"]
            assert any(t == "Presence" and m.node == "dev-a" for t, m in got)
            # dev-b's credentials, but no valid signature: unsigned and forged messages are dropped
            b = _creds(prov.root, "dev-b")
            hostile = MqttCommManager(_args(broker.port, b, signing_key_file=str(prov.root / "dev-a/signing.key")),
                                      "run2", "dev-b")
            hostile.send_message(Message(M.MSG_TYPE_C2S_CLIENT_STATUS, "dev-b", M.SERVER_ID))  # dev-a's key
            hostile.close(publish_offline=False)
            _serve_until(server, lambda: sum(d.reason == "bad_signature" for d in drops) >= 2)
            assert {d.reason for d in drops} >= {"bad_signature"}, drops
            assert not [m for t, m in got if t == M.MSG_TYPE_C2S_CLIENT_STATUS and m.get_sender_id() == "dev-b"]
        finally:
            dev.close()
            server.close()


def test_tls_broker_refuses_clients_without_a_certificate(tmp_path: Path) -> None:
    prov = provision(tmp_path / "prov", ["dev-a"], tls=True)
    with start_broker(secure_dir=prov.root) as broker:
        creds = _creds(prov.root, "dev-a")
        no_cert = {k: v for k, v in creds.items() if k not in ("tls_cert_file", "tls_key_file")}
        with pytest.raises(TransportError):
            MqttCommManager(_args(broker.port, no_cert), "r", "dev-a", connect_timeout_s=3.0)


def test_the_shared_model_reaches_every_device_signed_and_only_the_server_writes_it(tmp_path: Path) -> None:
    prov = provision(tmp_path / "prov", ["dev-a", "dev-b"], run_id="run4")
    with start_broker(secure_dir=prov.root) as broker:
        shared = {"model_delivery": "shared"}
        server = MqttCommManager(_args(broker.port, _creds(prov.root, "0"), **shared), "run4", M.SERVER_ID)
        devs = {d: MqttCommManager(_args(broker.port, _creds(prov.root, d), **shared), "run4", d)
                for d in ("dev-a", "dev-b")}
        got: dict[str, list[Any]] = {d: [] for d in devs}
        for d, mgr in devs.items():
            class Obs:
                def __init__(self, sink: list[Any]) -> None:
                    self.sink = sink

                def receive_message(self, t: Any, m: Any) -> None:
                    if t == M.MSG_TYPE_S2C_MODEL:
                        self.sink.append(parse(m.get_params(), Channel.MODEL))

            mgr.add_observer(Obs(got[d]))
        try:
            blob = bytes(range(256)) * 40
            model = SharedModel(model_id="m1", round=1, blob=blob, manifest_hash="h" * 64, encoding="fp32")
            rec = server.send_message(message_of(model.to_params()))
            assert rec.peer == M.BROADCAST and rec.chunks == 1
            for d, mgr in devs.items():
                _serve_until(mgr, lambda d=d: bool(got[d]))
                (m,) = got[d]
                assert isinstance(m, SharedModel) and m.model_id == "m1" and bytes(m.blob) == blob
            # A device may read the model topic, never write it: the broker's ACL drops a device's publish.
            a = _creds(prov.root, "dev-a")
            forger, _ = _client(broker.port, a["username"], prov.password("dev-a"))
            forger.publish(Topics("fedpeft", "run4").model(), b"forged model", qos=1).wait_for_publish(5)
            time.sleep(1.0)
            for d, mgr in devs.items():
                mgr.poll(timeout_s=0.5)
                assert len(got[d]) == 1, f"{d} received a model a device published"
            forger.disconnect()
            forger.loop_stop()
        finally:
            for mgr in (*devs.values(), server):
                mgr.close()


def test_a_device_cannot_take_over_another_devices_client_id(tmp_path: Path) -> None:
    """use_username_as_clientid: dev-b connecting with dev-a's client id gets its own; dev-a stays connected."""
    prov = provision(tmp_path / "prov", ["dev-a", "dev-b"], run_id="run5")
    with start_broker(secure_dir=prov.root) as broker:
        lost: list[Any] = []
        a = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fedpeft-run5-dev-a-123456", protocol=mqtt.MQTTv5)
        a.username_pw_set("dev-a", prov.password("dev-a"))
        a.on_disconnect = lambda *args: lost.append(args)
        a.connect(broker.host, broker.port)
        a.loop_start()
        try:
            time.sleep(0.5)
            b, reason = _client(broker.port, "dev-b", prov.password("dev-b"), client_id="fedpeft-run5-dev-a-123456")
            assert not reason.is_failure
            time.sleep(1.0)
            assert not lost, "dev-a was knocked off the broker by a client reusing its client id"
            b.loop_stop()
        finally:
            a.loop_stop()

"""Server (this process) and real agent processes over real brokers: bit-exact updates, chunks, presence."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fedpeft_edge.config import CommArgs
from fedpeft_edge.peft.base import Manifest, TensorSpec
from fedpeft_edge.protocol import Presence
from fedpeft_edge.protocol import keys as M
from fedpeft_edge.transport.broker import start_broker
from fedpeft_edge.transport.fedml import Message
from fedpeft_edge.transport.mqtt import MqttCommManager
from fedpeft_edge.wire.codec import decode_tensors, encode_tensors

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
AGENT = Path(__file__).with_name("transport_agent.py")
LIMIT_128K = 131072


class Inbox:
    """Server-side observer: remembers joins, updates and presence by sender."""

    def __init__(self) -> None:
        self.joins: set[Any] = set()
        self.updates: dict[Any, Any] = {}
        self.presence: list[tuple[Any, str]] = []

    def receive_message(self, msg_type: Any, msg: Any) -> None:
        if msg_type == M.MSG_TYPE_C2S_JOIN:
            self.joins.add(msg.get_sender_id())
        elif msg_type == M.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER:
            self.updates[msg.get_sender_id()] = msg

    def receive_local(self, event: Any) -> None:
        if isinstance(event, Presence):
            # presence names its node by the topic level it came on: always text, even for an int device id
            self.presence.append((event.node, M.PRESENCE_ONLINE if event.online else M.PRESENCE_OFFLINE))


def serve_until(mgr: MqttCommManager, done: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        mgr.poll(0.2)


@pytest.fixture
def agents() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(port: int, run_id: str, device_id: int, *extra: str) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, str(AGENT), "--port", str(port), "--run-id", run_id,
               "--device-id", str(device_id), *extra]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(cmd, env=env))
        return procs[-1]

    yield spawn
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"blocks.0.fc.weight": torch.randn(300, 500, generator=g),
            "blocks.0.fc.bias": torch.randn(500, generator=g),
            "head.weight": torch.randn(10, 64, generator=g).to(torch.bfloat16)}


def _sync(state: dict[str, torch.Tensor], manifest: Manifest, device: int, rnd: int) -> Message:
    msg = Message(M.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT, M.SERVER_ID, device)
    msg.add_params(M.MSG_ARG_KEY_ROUND, rnd)
    msg.add_params(M.MSG_ARG_KEY_MANIFEST, manifest.to_json())
    msg.add_params(M.MSG_ARG_KEY_MANIFEST_HASH, manifest.hash)
    msg.add_params(M.MSG_ARG_KEY_MODEL_PARAMS, encode_tensors(state, manifest))
    return msg


def _round_trip(
    port: int, agents: Any, run_id: str, args: CommArgs, extra: tuple[str, ...], devices: tuple[int, ...] = (1, 2)
) -> None:
    server = MqttCommManager(args, run_id, M.SERVER_ID)
    inbox = Inbox()
    server.add_observer(inbox)
    procs = [agents(port, run_id, d, *extra) for d in devices]
    try:
        serve_until(server, lambda: inbox.joins == set(devices), 60, "the joins")
        state = _state()
        manifest = Manifest("full", tuple(TensorSpec.of(k, v) for k, v in state.items()))
        for d in devices:
            server.send_message(_sync(state, manifest, d, rnd=1))
        serve_until(server, lambda: len(inbox.updates) == len(devices), 60, "the updates")
        for d in devices:
            msg = inbox.updates[d]
            got = decode_tensors(msg.get(M.MSG_ARG_KEY_MODEL_PARAMS), manifest, manifest.hash)
            for k, v in state.items():
                assert torch.equal(got[k], v + float(d)), (d, k)  # bit-exact
            assert msg.get(M.MSG_ARG_KEY_NUM_SAMPLES) == 10 * d
            per = server.meter.totals(round=1, peer=d)
            assert per["bytes_down"] > 600_000 and per["bytes_up"] > 600_000
        for d in devices:
            server.send_message(Message(M.MSG_TYPE_S2C_FINISH, M.SERVER_ID, d))
        assert [p.wait(timeout=30) for p in procs] == [0] * len(devices)
        offline = {str(d) for d in devices}
        serve_until(server, lambda: {s for s, st in inbox.presence if st == M.PRESENCE_OFFLINE} == offline,
                    10, "OFFLINE presence of both agents")
    finally:
        server.close()


def test_server_and_two_agents_through_a_128kb_mosquitto_limit(mosquitto_factory: Any, agents: Any) -> None:
    broker = mosquitto_factory(message_size_limit=LIMIT_128K)
    args = CommArgs(broker_host=broker.host, broker_port=broker.port, max_message_bytes=LIMIT_128K)
    _round_trip(broker.port, agents, "it1", args, ("--max-message-bytes", str(LIMIT_128K)))


def test_server_and_an_agent_with_the_default_limit(mosquitto_broker: Any, agents: Any) -> None:
    args = CommArgs(broker_host=mosquitto_broker.host, broker_port=mosquitto_broker.port)
    _round_trip(mosquitto_broker.port, agents, "it2", args, (), devices=(3,))


def test_server_and_an_agent_on_embedded_amqtt(agents: Any) -> None:
    with start_broker(kind="amqtt") as broker:
        args = CommArgs(broker_host=broker.host, broker_port=broker.port, mqtt_version="3.1.1",
                        max_message_bytes=LIMIT_128K)
        _round_trip(broker.port, agents, "it3", args,
                    ("--mqtt-version", "3.1.1", "--max-message-bytes", str(LIMIT_128K)), devices=(4,))


def test_killed_agent_goes_offline_by_its_last_will(mosquitto_broker: Any, agents: Any) -> None:
    args = CommArgs(broker_host=mosquitto_broker.host, broker_port=mosquitto_broker.port)
    server = MqttCommManager(args, "it4", M.SERVER_ID)
    inbox = Inbox()
    server.add_observer(inbox)
    try:
        proc = agents(mosquitto_broker.port, "it4", 7)
        serve_until(server, lambda: 7 in inbox.joins, 60, "the join")
        proc.send_signal(signal.SIGKILL)
        serve_until(server, lambda: ("7", M.PRESENCE_OFFLINE) in inbox.presence, 20, "the OFFLINE will")
    finally:
        server.close()


@pytest.mark.slow
def test_300mb_update_through_a_128kb_limit(mosquitto_factory: Any, agents: Any) -> None:
    broker = mosquitto_factory(message_size_limit=LIMIT_128K)
    args = CommArgs(broker_host=broker.host, broker_port=broker.port, max_message_bytes=LIMIT_128K,
                    publish_timeout_s=60.0)
    server = MqttCommManager(args, "it5", M.SERVER_ID)
    inbox = Inbox()
    server.add_observer(inbox)
    numel = 75_000_000  # 300 MB of float32
    try:
        proc = agents(broker.port, "it5", 1, "--max-message-bytes", str(LIMIT_128K))
        serve_until(server, lambda: 1 in inbox.joins, 60, "the join")
        ask = Message(M.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT, M.SERVER_ID, 1)
        ask.add_params(M.MSG_ARG_KEY_ROUND, 1)
        ask.add_params(M.MSG_ARG_KEY_CONFIG, {"reply_numel": numel, "seed": 11})
        server.send_message(ask)
        t0 = time.monotonic()
        serve_until(server, lambda: 1 in inbox.updates, 150, "the 300 MB update")
        elapsed = time.monotonic() - t0
        sys.path.insert(0, str(AGENT.parent))
        from transport_agent import seeded_state

        expected = seeded_state(numel, 11)
        manifest = Manifest("full", (TensorSpec.of("w", expected["w"]),))
        got = decode_tensors(inbox.updates[1].get(M.MSG_ARG_KEY_MODEL_PARAMS), manifest, manifest.hash)
        assert torch.equal(got["w"], expected["w"])
        rec = server.meter.transfers(round=1, peer=1)[-1]
        assert rec.chunks >= 300_000_000 // LIMIT_128K and max(rec.chunk_bytes) <= LIMIT_128K + 5
        print(f"300 MB update: {rec.chunks} chunks, {rec.mqtt_bytes / 1e6:.1f} MB at the wire, "
              f"{elapsed:.1f} s from request to decoded ({rec.payload_bytes / rec.duration_s / 1e6:.0f} MB/s "
              "on the wire)")
        server.send_message(Message(M.MSG_TYPE_S2C_FINISH, M.SERVER_ID, 1))
        assert proc.wait(timeout=30) == 0
    finally:
        server.close()

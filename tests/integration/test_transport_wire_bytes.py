"""Metered MQTT bytes agree with what crossed the socket, counted by a TCP proxy between client and broker."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from fedpeft_edge.config import CommArgs
from fedpeft_edge.peft.base import Manifest, TensorSpec
from fedpeft_edge.protocol import keys as M
from fedpeft_edge.transport.fedml import Message
from fedpeft_edge.transport.mqtt import MqttCommManager
from fedpeft_edge.wire.codec import encode_tensors

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


class CountingProxy:
    """Forwards TCP between clients and an upstream port, counting bytes in each direction."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.to_broker = 0
        self.to_client = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._socks: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            broker = socket.create_connection(self.upstream)
            self._socks += [client, broker]
            threading.Thread(target=self._pump, args=(client, broker, "to_broker"), daemon=True).start()
            threading.Thread(target=self._pump, args=(broker, client, "to_client"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, counter: str) -> None:
        while True:
            try:
                data = src.recv(1 << 20)
                if not data:
                    break
                dst.sendall(data)
            except OSError:
                break
            with self._lock:
                setattr(self, counter, getattr(self, counter) + len(data))
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.to_broker, self.to_client

    def close(self) -> None:
        for s in self._socks:
            s.close()


@pytest.fixture
def proxy(mosquitto_broker: Any) -> Iterator[CountingProxy]:
    p = CountingProxy((mosquitto_broker.host, mosquitto_broker.port))
    p.broker = mosquitto_broker  # type: ignore[attr-defined]
    yield p
    p.close()


def _settle(proxy: CountingProxy, quiet_s: float = 0.3, timeout_s: float = 10.0) -> tuple[int, int]:
    """Counters once no byte has moved for quiet_s."""
    deadline = time.monotonic() + timeout_s
    last = proxy.snapshot()
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = proxy.snapshot()
        if now == last:
            return now
        last = now
    return last


@pytest.mark.parametrize("max_bytes", [131072, 268_435_455], ids=["chunked-128k", "whole"])
def test_metered_bytes_match_the_socket_within_1_percent(proxy: CountingProxy, max_bytes: int) -> None:
    broker = proxy.broker  # type: ignore[attr-defined]
    direct = CommArgs(broker_host=broker.host, broker_port=broker.port, max_message_bytes=max_bytes)
    via_proxy = CommArgs(broker_host="127.0.0.1", broker_port=proxy.port, max_message_bytes=max_bytes)
    server = MqttCommManager(direct, "wb", M.SERVER_ID)
    device = MqttCommManager(via_proxy, "wb", 1)
    got: list[Any] = []
    server.add_observer(type("O", (), {"receive_message": lambda self, t, m: got.append(m)})())
    try:
        state = {"w": torch.randn(500_000)}  # 2 MB
        man = Manifest("full", (TensorSpec.of("w", state["w"]),))
        up = Message(M.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER, 1, M.SERVER_ID)
        up.add_params(M.MSG_ARG_KEY_ROUND, 4)
        up.add_params(M.MSG_ARG_KEY_MODEL_PARAMS, encode_tensors(state, man))
        before_up, before_down = _settle(proxy)
        rec_up = device.send_message(up)
        after_up, _ = _settle(proxy)
        socket_up = after_up - before_up
        down = Message(M.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT, M.SERVER_ID, 1)
        down.add_params(M.MSG_ARG_KEY_ROUND, 4)
        down.add_params(M.MSG_ARG_KEY_MODEL_PARAMS, encode_tensors(state, man))
        _, mid_down = _settle(proxy)
        server.send_message(down)
        _, after_down = _settle(proxy)
        socket_down = after_down - mid_down
        device.poll(0.5)
        metered_down = device.meter.totals(round=4)["bytes_down"]
        print(f"up: metered {rec_up.mqtt_bytes} B in {rec_up.chunks} packets, socket {socket_up} B; "
              f"down: metered {metered_down} B, socket {socket_down} B")
        assert abs(rec_up.mqtt_bytes - socket_up) <= 0.01 * socket_up
        assert metered_down > 2_000_000
        assert abs(metered_down - socket_down) <= 0.01 * socket_down
    finally:
        device.close()
        server.close()

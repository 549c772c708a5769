"""Shared test fixtures: a real mosquitto broker on a free loopback port, started and killed per test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from brokers import RunningBroker, start_mosquitto


@pytest.fixture
def mosquitto_broker(tmp_path: Path) -> Iterator[RunningBroker]:
    """A fresh mosquitto on a free loopback port (`.host`, `.port`), killed after the test."""
    broker = start_mosquitto(tmp_path / "mosquitto")
    try:
        yield broker
    finally:
        broker.stop()


BrokerFactory = Callable[..., RunningBroker]


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[BrokerFactory]:
    """Brokers with custom limits: `mosquitto_factory(message_size_limit=131072)`; all stopped at the end."""
    started: list[RunningBroker] = []

    def make(message_size_limit: int | None = None, max_packet_size: int | None = None) -> RunningBroker:
        broker = start_mosquitto(tmp_path / f"mosquitto{len(started)}", message_size_limit, max_packet_size)
        started.append(broker)
        return broker

    try:
        yield make
    finally:
        for broker in started:
            broker.stop()

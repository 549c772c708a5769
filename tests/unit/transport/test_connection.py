"""The connection state machine: allowed moves only, a closed connection stays closed, moves are atomic."""

from __future__ import annotations

import threading

from fedpeft_edge.transport.connection import ConnectionState, State


def test_a_connection_goes_through_its_states_and_reconnects() -> None:
    c = ConnectionState()
    assert c.current is State.NEW
    assert c.move(State.CONNECTED) is None and c.current is State.NEW  # never connected without connecting
    assert c.move(State.CONNECTING) is State.NEW
    assert c.move(State.CONNECTED) is State.CONNECTING
    assert c.move(State.CONNECTED) is None  # a stray subscription ack announces nothing twice
    assert c.move(State.RECONNECTING) is State.CONNECTED
    assert c.move(State.RECONNECTING) is State.RECONNECTING  # paho retries: still reconnecting
    assert c.move(State.CONNECTED) is State.RECONNECTING
    assert c.move(State.CLOSED) is State.CONNECTED


def test_a_closed_connection_never_reopens() -> None:
    c = ConnectionState()
    c.move(State.CONNECTING)
    c.move(State.CLOSED)
    for late in State:
        assert c.move(late) is None
    assert c.current is State.CLOSED


def _race_to_close(c: ConnectionState, n: int) -> list[State | None]:
    wins: list[State | None] = []
    start = threading.Barrier(n)

    def close() -> None:
        start.wait()
        wins.append(c.move(State.CLOSED))

    threads = [threading.Thread(target=close) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return wins


def test_concurrent_moves_leave_exactly_one_winner() -> None:
    for _ in range(50):
        c = ConnectionState()
        c.move(State.CONNECTING)
        c.move(State.CONNECTED)
        wins = _race_to_close(c, 8)
        assert [w for w in wins if w is not None] == [State.CONNECTED]

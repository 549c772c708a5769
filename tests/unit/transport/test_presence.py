"""Presence alone: this node's payload (signed where it signs), the body checks, and the server's echo: due after a
device came online, at most once an interval."""

from __future__ import annotations

import json

import pytest

from fedpeft_edge.errors import CodecError
from fedpeft_edge.protocol import Presence
from fedpeft_edge.protocol import keys as M
from fedpeft_edge.transport.presence import PresenceEcho, presence_body, presence_payload
from fedpeft_edge.transport.signing import Signing


def test_the_payload_names_the_session_and_orders_online_before_offline() -> None:
    plain = Signing(None, None, False)
    body = json.loads(presence_payload(plain, "t", "dev-a", 12.5, M.PRESENCE_OFFLINE))
    assert body == {"status": M.PRESENCE_OFFLINE, "node": "dev-a", "time": 12.5, "seq": 2}
    assert presence_body("dev-a", memoryview(presence_payload(plain, "t", "dev-a", 1.0, M.PRESENCE_ONLINE)))["seq"] == 1
    for bad in (b"[]", b'{"status": "ONLINE", "time": NaN}', b'{"status": "ONLINE", "time": 1, "seq": true}',
                b"x" * 5000):
        with pytest.raises(CodecError):
            presence_body("dev-a", memoryview(bad))


def test_the_echo_is_due_after_an_online_device_at_most_once_an_interval() -> None:
    now = [100.0]
    echo = PresenceEcho(enabled=True, interval_s=1.0, clock=lambda: now[0])
    online, offline = (Presence(node="d", online=o, since=1.0, receiver="0") for o in (True, False))
    echo.heard(offline)
    assert not echo.take()
    echo.heard(online)
    echo.heard(online)
    assert echo.take() and not echo.take()  # a burst costs one echo
    echo.heard(online)
    now[0] += 0.5
    assert not echo.take()
    now[0] += 0.6
    assert echo.take()
    now[0] += 5.0
    assert not echo.take()  # nothing came online since
    off = PresenceEcho(enabled=False, clock=lambda: now[0])
    off.heard(online)
    assert not off.take()

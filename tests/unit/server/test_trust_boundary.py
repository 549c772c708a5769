"""The trust boundary end to end over a real provisioned mosquitto: device d1 itself (an insider: its own broker
connection, password and signing key) publishes, on its own channel, well-formed and correctly signed frames of every
local-event type and every server-only message type. Each is dropped with reason `forbidden_type` before any
handler sees it, and the engine's state (round, attempt, selection, pending deadlines, records) is unchanged."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from engine_harness import FINGERPRINT, MANIFEST, Harness

from fedpeft_edge.config import CommArgs
from fedpeft_edge.metering.bandwidth import BandwidthMeter
from fedpeft_edge.protocol import Join
from fedpeft_edge.protocol import keys as K
from fedpeft_edge.protocol.events import LOCAL_EVENTS
from fedpeft_edge.protocol.roles import FORBIDDEN_TYPE, SERVER_TYPES
from fedpeft_edge.rundir import read_metrics
from fedpeft_edge.server.manager import ServerManager
from fedpeft_edge.server.ports import ThreadTimers
from fedpeft_edge.transport.broker import find_mosquitto, start_broker
from fedpeft_edge.transport.fedml import message_of
from fedpeft_edge.transport.mqtt import MqttCommManager
from fedpeft_edge.transport.provision import provision
from fedpeft_edge.wire.auth import Signer, load_private_key
from fedpeft_edge.wire.codec import encode_message

pytestmark = [pytest.mark.timeout(120), pytest.mark.skipif(find_mosquitto() is None, reason="needs mosquitto")]

RUN = "t"
# every type a device must never be able to make the server handle: the old local-event ids and the server's own
FORGED_TYPES = {
    "timer (deadline of round 1)": (K.MSG_TYPE_LOCAL_TIMER, {K.MSG_ARG_KEY_TIMER: "deadline", K.MSG_ARG_KEY_ROUND: 1,
                                                            K.MSG_ARG_KEY_ATTEMPT: 0}),
    "timer (join timeout)": (K.MSG_TYPE_LOCAL_TIMER, {K.MSG_ARG_KEY_TIMER: "join_timeout"}),
    "presence (d2 offline)": (K.MSG_TYPE_PRESENCE, {K.MSG_ARG_KEY_PRESENCE: K.PRESENCE_OFFLINE,
                                                    K.MSG_ARG_KEY_PRESENCE_SINCE: 1.0}),
    "connection ready": (K.MSG_TYPE_CONNECTION_IS_READY, {}),
    "join ack": (K.MSG_TYPE_S2C_JOIN_ACK, {K.MSG_ARG_KEY_ACCEPTED: True}),
    "round task": (K.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT, {K.MSG_ARG_KEY_ROUND: 1}),
    "finish": (K.MSG_TYPE_S2C_FINISH, {K.MSG_ARG_KEY_REASON: "completed"}),
    "shared model": (K.MSG_TYPE_S2C_MODEL, {K.MSG_ARG_KEY_ROUND: 1}),
    # Throttled has no type id at all (a transport's own event): a frame naming it by any id or name
    "throttled (d2 over its rate, by name)": ("throttled", {"node": "d2", "packets": 10**6, "shed_s": 3600.0}),
    "throttled (d2 over its rate, by a free id)": (106, {"node": "d2", "packets": 10**6, "shed_s": 3600.0}),
}


def test_the_forged_types_cover_every_local_event_and_server_message() -> None:
    forged = {t for t, _ in FORGED_TYPES.values()}
    assert forged >= SERVER_TYPES
    assert {K.MSG_TYPE_LOCAL_TIMER, K.MSG_TYPE_PRESENCE, K.MSG_TYPE_CONNECTION_IS_READY} <= forged
    named = {label.split(" (")[0].replace(" ", "") for label in FORGED_TYPES}  # "connection ready" -> ...
    assert {e.__name__.lower() for e in LOCAL_EVENTS} <= named, named


def _comm(prov: Any, node: str, port: int) -> CommArgs:
    snippet = yaml.safe_load((prov.node_dir(node) / "comm_args.yaml").read_text())["comm_args"]
    return CommArgs(broker_host="127.0.0.1", broker_port=port, publish_timeout_s=10.0, **snippet)


def _wait(what: str, cond: Any, timeout_s: float = 30.0) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _engine_state(h: Harness) -> dict[str, Any]:
    cur, rep = h.engine.rounds.current, h.replies()
    h.runlog.sync()
    return {
        "round": None if cur is None or rep is None else (cur.index, cur.retry, cur.selected, cur.deadline,
                                                          sorted(rep.received), sorted(rep.failed),
                                                          sorted(rep.waiting)),
        "pending_timers": list(h.timers.pending),
        "finished": h.engine.finished,
        "online": sorted(d for d, s in h.engine.rounds.devices.items() if s.online),
        "records": [r for r in read_metrics(h.run_dir) if r.get("kind") != "dropped_message"],
    }


def _signer(prov: Any, device: str) -> Signer:
    creds = yaml.safe_load((prov.node_dir(device) / "comm_args.yaml").read_text())["comm_args"]
    return Signer(load_private_key(creds["signing_key_file"]))


def test_signed_frames_of_local_or_server_types_from_a_device_change_nothing(tmp_path: Path) -> None:
    prov = provision(tmp_path / "prov", ["d1", "d2"])
    with start_broker(secure_dir=prov.root) as broker:
        h = Harness(tmp_path / "run", client_num_in_total=2, client_num_per_round=2, min_devices=2, min_updates=2)
        mgr = ServerManager(h.engine, ThreadTimers(), _comm(prov, "0", broker.port), RUN, BandwidthMeter())
        server = threading.Thread(target=mgr.run_until_done, daemon=True)
        server.start()
        devices = [MqttCommManager(_comm(prov, d, broker.port), RUN, d) for d in ("d1", "d2")]
        insider, signer = devices[0], _signer(prov, "d1")  # device d1 itself: its own connection and key
        try:
            for d in devices:
                join = Join(sender=str(d.node_id), backbone_fingerprint=FINGERPRINT, manifest_hash=MANIFEST.hash,
                            num_samples=5)
                d.send_message(message_of(join.to_params()))
            _wait("round 1 to open", lambda: h.engine.rounds.current is not None)
            time.sleep(0.5)  # let the joins' records settle
            before = _engine_state(h)
            topic = f"fedpeft/{RUN}/d2s/d1"
            for msg_type, extra in FORGED_TYPES.values():
                params = {K.MSG_ARG_KEY_TYPE: msg_type, K.MSG_ARG_KEY_SENDER: "d1", K.MSG_ARG_KEY_RECEIVER: 0,
                          K.MSG_ARG_KEY_MSG_ID: uuid.uuid4().hex, **extra}
                frame = encode_message(params)
                insider._client.publish(topic, signer.envelope(topic, [frame]) + frame, qos=1).wait_for_publish(10)
            drops = lambda: [r for r in h.records("dropped_message") if r.get("sender") == "d1"]  # noqa: E731
            _wait("every forged frame to be dropped", lambda: len(drops()) >= len(FORGED_TYPES))
            time.sleep(0.5)  # anything a forged frame could still cause would show by now
            assert {r["reason"] for r in drops()} == {FORBIDDEN_TYPE}, drops()
            assert _engine_state(h) == before
        finally:
            for d in devices:
                d.close()
            mgr.finish()
            server.join(10)

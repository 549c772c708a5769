"""Signed chunk manifests on a provisioned mosquitto (issue 25): a holder of broker credentials publishing unsigned
or wrongly signed chunks to a device's down-link (or to the server on a device's up-link) makes the receiver
buffer nothing, each chunk is dropped with a reason, and signed chunked messages still arrive bit-exact."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from fedpeft_edge.config import CommArgs
from fedpeft_edge.drops import DroppedMessage
from fedpeft_edge.protocol import keys as M
from fedpeft_edge.transport.broker import find_mosquitto, start_broker
from fedpeft_edge.transport.fedml import Message
from fedpeft_edge.transport.mqtt import MqttCommManager
from fedpeft_edge.transport.provision import provision
from fedpeft_edge.transport.topics import Topics
from fedpeft_edge.wire.auth import ENVELOPE_BYTES, Signer, load_private_key
from fedpeft_edge.wire.chunk import manifests_for, split_payload

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300),
              pytest.mark.skipif(find_mosquitto() is None, reason="needs mosquitto")]

RUN = "runsc"
CHUNK = 4096
CLAIM = 8 * 1024 * 1024  # what each forged transfer claims: under the receivers' limit, so only the manifest stops it
FORGED_TRANSFERS = 4  # comm_args.max_pending_transfers: the most a sender could keep open before
CHUNKS_PER_TRANSFER = 600  # 4 x 600 x ~4 KB = 9.6 MB of chunk data, enough to have filled half of each claim


def _creds(prov_root: Path, node: str) -> dict[str, Any]:
    d = "server" if str(node) == "0" else str(node)
    return dict(yaml.safe_load((prov_root / d / "comm_args.yaml").read_text())["comm_args"])


def _node(port: int, prov_root: Path, node: str, drops: list[DroppedMessage]) -> MqttCommManager:
    # The flood shares its sender's rate bucket with the real sender; the per-sender rate is tested elsewhere
    # (test_sender_rate), so it is lifted here to let every forged chunk reach the manifest check.
    args = CommArgs(broker_port=port, publish_timeout_s=10.0, keepalive_s=5, chunk_bytes=CHUNK,
                    max_update_bytes=2 * CLAIM, sender_rate_per_s=1e6, sender_burst=10**6,
                    **_creds(prov_root, node))
    assert args.require_signatures
    return MqttCommManager(args, RUN, node, on_drop=drops.append)


def _attacker(port: int, user: str, password: str) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"attacker-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv5)
    c.username_pw_set(user, password)
    c.max_inflight_messages_set(1000)
    ready = threading.Event()
    c.on_connect = lambda *_a: ready.set()
    c.connect("127.0.0.1", port)
    c.loop_start()
    assert ready.wait(10)
    return c


def _flood(client: mqtt.Client, topic: str, wrong_key: Path) -> int:
    """Unsigned chunks of transfers claiming CLAIM bytes, then a transfer whose manifest is signed with the wrong
    key and its chunks; returns the packets published."""
    n = 0
    for t in range(FORGED_TRANSFERS):
        tid = uuid.uuid4().bytes
        for index in range(CHUNKS_PER_TRANSFER):
            chunk = bytearray(next(split_payload(b"\0" * (CHUNK - 80), CHUNK, tid)))
            # index, count and offset of a CLAIM-byte transfer cut at CHUNK - 80 bytes
            size = CHUNK - 80
            chunk[24:32] = index.to_bytes(4, "little") + (-(-CLAIM // size)).to_bytes(4, "little")
            chunk[32:48] = CLAIM.to_bytes(8, "little") + (index * size).to_bytes(8, "little")
            client.publish(topic, bytes(chunk), qos=1)
            n += 1
        del t
    payload = b"\1" * 50_000
    tid = uuid.uuid4().bytes
    signer = Signer(load_private_key(wrong_key))
    for part in manifests_for(payload, CHUNK, CHUNK - ENVELOPE_BYTES, tid):
        body = part.encode()
        client.publish(topic, signer.envelope(topic, [body]) + body, qos=1)
        n += 1
    for chunk in split_payload(payload, CHUNK, tid):
        n += 1
        info = client.publish(topic, chunk, qos=1)
    info.wait_for_publish(30)
    return n


def _poll_watching(mgr: MqttCommManager, until: Any, timeout_s: float = 150.0) -> int:
    """Poll until `until()`; return the most bytes the node's reassembly held meanwhile."""
    most, deadline = 0, time.monotonic() + timeout_s
    while time.monotonic() < deadline and not until():
        mgr.poll(timeout_s=0.05)
        most = max(most, mgr._reassembly.reassembler.pending_bytes)
    return most


def _message(sender: str, receiver: str, blob: bytes) -> Message:
    msg = Message(M.MSG_TYPE_C2S_CLIENT_STATUS if receiver == M.SERVER_ID else M.MSG_TYPE_S2C_FINISH,
                  sender, receiver)
    msg.add_params("blob", blob)
    return msg


def test_unsigned_and_wrongly_signed_chunks_are_never_buffered_either_way(tmp_path: Path) -> None:
    prov = provision(tmp_path / "prov", ["dev-a", "dev-b"], run_id=RUN)
    topics = Topics("fedpeft", RUN)
    # The attacker holds a copy of the run directory: the server's broker password (not its signing key) and
    # dev-b's. Client ids are not bound here so that it can connect beside the real server instead of knocking
    # it off (taking over the client id is another attack, refused by use_username_as_clientid).
    with start_broker(secure_dir=prov.root, bind_client_ids=False) as broker:
        server_drops: list[DroppedMessage] = []
        dev_drops: list[DroppedMessage] = []
        server = _node(broker.port, prov.root, M.SERVER_ID, server_drops)
        dev = _node(broker.port, prov.root, "dev-a", dev_drops)
        got: dict[str, list[bytes]] = {"server": [], "dev": []}

        class Obs:
            def __init__(self, sink: list[bytes]) -> None:
                self.sink = sink

            def receive_message(self, _t: Any, m: Any) -> None:
                self.sink.append(bytes(m.get("blob")))

        server.add_observer(Obs(got["server"]))
        dev.add_observer(Obs(got["dev"]))
        rss = psutil.Process()
        try:
            down = _attacker(broker.port, _creds(prov.root, "0")["username"], prov.password(str(M.SERVER_ID)))
            flood: list[int] = []
            thread = threading.Thread(target=lambda: flood.append(
                _flood(down, topics.s2d("dev-a"), prov.root / "dev-b/signing.key")))
            rss0 = rss.memory_info().rss
            thread.start()
            most = _poll_watching(dev, lambda: bool(flood) and sum(d.count for d in dev_drops) >= flood[0])
            thread.join()
            grew = rss.memory_info().rss - rss0
            reasons = {d.reason for d in dev_drops}
            print(f"\ndown-link flood: {flood[0]} packets, {sum(d.bytes for d in dev_drops)} bytes dropped "
                  f"{sorted(reasons)}, most buffered {most} B, RSS {grew / 1e6:+.1f} MB")
            assert most == 0, f"the device buffered {most} bytes of unsigned chunks"
            assert sum(d.count for d in dev_drops) == flood[0], dev_drops[-3:]
            assert reasons == {"unsigned", "bad_signature"}, reasons
            down.disconnect()
            # the real server's signed chunked message still arrives, bit-exact, under its manifest
            blob = bytes(range(256)) * 200
            rec = server.send_message(_message(M.SERVER_ID, "dev-a", blob))
            assert rec.chunks > 12
            _poll_watching(dev, lambda: bool(got["dev"]))
            assert got["dev"] == [blob]

            # the up-link: dev-b's broker password without dev-b's key, on dev-b's own up-link
            up = _attacker(broker.port, "dev-b", prov.password("dev-b"))
            before = sum(d.count for d in server_drops)
            sent = _flood(up, topics.d2s("dev-b"), prov.root / "dev-a/signing.key")
            up.disconnect()
            # every packet of the flood is dropped: wait for all of them (the wrongly signed manifest comes last)
            most = _poll_watching(server, lambda: sum(d.count for d in server_drops) - before >= sent)
            assert most == 0 and {d.reason for d in server_drops} >= {"unsigned", "bad_signature"}
            dev.send_message(_message("dev-a", M.SERVER_ID, blob[::-1]))
            _poll_watching(server, lambda: bool(got["server"]))
            assert got["server"] == [blob[::-1]]
        finally:
            dev.close()
            server.close()


def _flood_during(client: mqtt.Client, topic: str, wrong_key: Path, stop: threading.Event) -> int:
    """Until `stop`: every 20 ms two of the three chunks of a fresh unsigned transfer (never completed, so it
    would have held a pending slot until its timeout) and a manifest part signed with the wrong key."""
    signer, n = Signer(load_private_key(wrong_key)), 0
    while not stop.is_set():
        tid = uuid.uuid4().bytes
        for chunk in list(split_payload(b"\2" * 2500, 1024, tid))[:2]:
            client.publish(topic, chunk, qos=1)
        body = manifests_for(b"\3" * 2500, 1024, 1024 - ENVELOPE_BYTES, uuid.uuid4().bytes)[0].encode()
        client.publish(topic, signer.envelope(topic, [body]) + body, qos=1)
        n += 3
        time.sleep(0.02)
    return n


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_run_completes_while_a_credential_holder_floods_a_device_with_unsigned_chunks(tmp_path: Path) -> None:
    """Real server and agent processes; every update and task travels chunked (chunk_bytes 1024) under signed
    manifests. Before manifests, the forged transfers took the device's pending-transfer slots for the server,
    so the server's own chunked round tasks were refused and the run stalled."""
    from fl_processes import Procs, aggregated_rounds, run_dir_of, wait_for, write_config

    devices, rounds, run_id = ("d1", "d2"), 3, "floodrun"
    prov = provision(tmp_path / "prov", devices)
    with start_broker(secure_dir=prov.root, bind_client_ids=False) as broker:
        cfgs = {}
        for node in ("0", *devices):
            comm = yaml.safe_load((prov.node_dir(node) / "comm_args.yaml").read_text())["comm_args"]
            cfgs[node] = write_config(
                tmp_path / f"{node}.yaml", broker.port, run_id,
                train_args={"comm_round": rounds, "min_updates": 2, "round_timeout_s": 120},
                # the flood shares the server's rate bucket on d1 (per-sender rates: test_sender_rate)
                comm_args={"broker_port": broker.port, "chunk_bytes": 1024, "sender_rate_per_s": 1e9, **comm})
        procs = Procs(tmp_path / "logs")
        run_dir = run_dir_of(cfgs["0"])
        stop, sent = threading.Event(), []
        try:
            server = procs.server(cfgs["0"])
            wait_for("the server to connect", lambda: "connected; waiting" in procs.log("server"), 120, procs)
            attacker = _attacker(broker.port, _creds(prov.root, "0")["username"], prov.password(str(M.SERVER_ID)))
            flood = threading.Thread(target=lambda: sent.append(
                _flood_during(attacker, Topics("fedpeft", run_id).s2d("d1"), prov.root / "d2/signing.key", stop)))
            flood.start()
            for i, d in enumerate(devices):
                procs.agent(cfgs[d], d, i)
            wait_for("the run to finish", lambda: (run_dir / "summary.json").exists() and server.poll() is not None,
                     300, procs)
        finally:
            stop.set()
            procs.stop_all()
        flood.join()
        attacker.disconnect()
        assert server.returncode == 0, procs.logs()
        assert aggregated_rounds(run_dir) == list(range(1, rounds + 1)), procs.logs()
        d1 = procs.log("d1")
        print(f"\n{sent[0]} forged packets during the run; d1's drops logged: unsigned "
              f"{d1.count('(unsigned)')}, bad_signature {d1.count('(bad_signature)')}")
        assert "(unsigned)" in d1 and "(bad_signature)" in d1, d1[-3000:]
        assert "chunk_refused" not in d1 and "transfer_expired" not in d1, d1[-3000:]

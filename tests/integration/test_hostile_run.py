"""A run under attack: a provisioned mosquitto (ACL on, signatures required), a real server and two real
agents; a hostile client, once anonymous and once holding device d2's broker credentials and signing key
(an insider: JSON-bomb headers that verify, partial chunk transfers claiming 200 MB), floods the run's
topics with every kind of bad packet while rounds go on. The run completes every
round, its global tensors equal a clean run's bit for bit, the server's RSS stays bounded, and every attack
packet is either refused by the broker or recorded as a `dropped_message` in metrics.jsonl."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import yaml
from fl_processes import Procs, aggregated_rounds, records, run_dir_of, wait_for, write_config
from hostile_client import HostileClient

from fedpeft_edge.server.checkpoint import load_checkpoint
from fedpeft_edge.transport.broker import find_mosquitto, start_broker
from fedpeft_edge.transport.provision import Provisioned, provision
from fedpeft_edge.wire.auth import load_private_key

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(400),
              pytest.mark.skipif(find_mosquitto() is None, reason="needs mosquitto")]

ROUNDS = 8  # rounds of a tiny ViT close in ~0.3 s on a fast CI machine: the attack stops at half of them
DEVICES = ("d1", "d2")
ATTACK_MESSAGES = 40_000
ATTACK_SECONDS = 40.0


def _configs(tmp: Path, prov: Provisioned, port: int, run_id: str) -> dict[str, Path]:
    out = {}
    for node in ("0", *DEVICES):
        comm = yaml.safe_load((prov.node_dir(node) / "comm_args.yaml").read_text())["comm_args"]
        out[node] = write_config(
            tmp / f"{run_id}-{node}.yaml", port, run_id,
            train_args={"comm_round": ROUNDS, "min_updates": 2, "round_timeout_s": 120},
            # d2's credentials are shared with the attacker: a rate limit per sender would starve d2 itself (what
            # its own credentials allow); this test is about packet classes (tests/unit/transport/test_sender_rate.py)
            comm_args={"broker_port": port, "keepalive_s": 10, "sender_rate_per_s": 1e9, **comm},
        )
    return out


class _RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc, self.peak, self.done = psutil.Process(pid), 0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.1)


def _run(tmp: Path, prov: Provisioned, port: int, run_id: str, attack: bool) -> dict[str, Any]:
    cfgs = _configs(tmp, prov, port, run_id)
    procs = Procs(tmp / f"logs-{run_id}")
    run_dir = run_dir_of(cfgs["0"])
    result: dict[str, Any] = {"run_dir": run_dir}
    try:
        server = procs.server(cfgs["0"])
        sampler = _RssSampler(server.pid)
        sampler.start()
        wait_for("the server to connect", lambda: "connected; waiting" in procs.log("server"), 120, procs)
        attackers = _connect_attackers(port, run_id, prov) if attack else None
        for i, d in enumerate(DEVICES):  # the attackers are in before the devices join: the attack overlaps rounds
            procs.agent(cfgs[d], d, i)
        if attackers is not None:  # until half the rounds closed: the run goes on (the test checks) after it
            result.update(_attack(*attackers, procs, stop=lambda: len(aggregated_rounds(run_dir)) >= ROUNDS // 2))
            result["attack_ended_before_run"] = len(aggregated_rounds(run_dir)) < ROUNDS
            result["rounds_during_attack"] = len(aggregated_rounds(run_dir))
        wait_for("the run to finish", lambda: (run_dir / "summary.json").exists() and server.poll() is not None,
                 240, procs)
        sampler.done.set()
        result["peak_rss"] = sampler.peak
        result["server_rc"] = server.returncode
        result["logs"] = procs.logs()
    finally:
        procs.stop_all()
    return result


def _connect_attackers(port: int, run_id: str, prov: Provisioned) -> tuple[bool, HostileClient]:
    anon = HostileClient(port, run_id, "d2", "d1")
    anon_in = anon.connect()
    creds = yaml.safe_load((prov.node_dir("d2") / "comm_args.yaml").read_text())["comm_args"]
    hostile = HostileClient(port, run_id, "d2", "d1", creds["username"], prov.password("d2"), seed=1,
                            insider_key=load_private_key(prov.node_dir("d2") / "signing.key"))
    assert hostile.connect(), "d2's valid credentials were refused"
    return anon_in, hostile


def _attack(anon_in: bool, hostile: HostileClient, procs: Procs, stop: Any) -> dict[str, Any]:
    # the server's first signed message to d2 (captured for replays) comes as round 1 starts
    wait_for("a signed server message to d2", lambda: len(hostile.captured) > 0, 120, procs)
    t0 = time.monotonic()
    rate = hostile.attack(ATTACK_MESSAGES, ATTACK_SECONDS, stop=stop)
    elapsed = time.monotonic() - t0
    hostile.close()
    return {"anon_in": anon_in, "sent": hostile.sent, "refused": hostile.refused, "rate": rate,
            "elapsed": elapsed, "captured": len(hostile.captured)}


def test_hostile_clients_neither_stop_nor_change_a_run(tmp_path: Path) -> None:
    prov = provision(tmp_path / "prov", DEVICES)
    # The attacker shares d2's credentials while d2 runs: with client ids bound to user names they would knock
    # each other off in turn (what a device's own credentials allow); this one is about packet classes.
    with start_broker(secure_dir=prov.root, bind_client_ids=False) as broker:
        clean = _run(tmp_path, prov, broker.port, "clean", attack=False)
        hostile = _run(tmp_path, prov, broker.port, "hostile", attack=True)
    for res in (clean, hostile):
        assert res["server_rc"] == 0, res["logs"]
        assert aggregated_rounds(res["run_dir"]) == list(range(1, ROUNDS + 1)), res["logs"]
    for rnd in range(1, ROUNDS + 1):
        a, b = load_checkpoint(clean["run_dir"], rnd).state, load_checkpoint(hostile["run_dir"], rnd).state
        assert list(a) == list(b)
        assert all(torch.equal(a[k], b[k]) for k in a), f"round {rnd}'s global tensors differ from the clean run"
    assert hostile["anon_in"] is False, "the provisioned broker let an anonymous client in"
    sent, refused = hostile["sent"], hostile["refused"]
    drops = [r for r in records(hostile["run_dir"], "dropped_message")]
    by_topic: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for r in drops:
        by_topic[r["topic"].split("/")[-2] + ("" if r["topic"].endswith("/d2") else "-other")] += r.get("count", 1)
        reasons[r["reason"]] += r.get("count", 1)
    print(f"\nattack: {sum(sent.values()) + sum(refused.values())} packets at {hostile['rate']:.0f}/s over "
          f"{hostile['elapsed']:.1f}s (rounds closed meanwhile: {hostile['rounds_during_attack']}); broker refused "
          f"{dict(refused)}; broker passed {dict(sent)}; server dropped {dict(by_topic)} by reason {dict(reasons)}; "
          f"server peak RSS clean {clean['peak_rss'] / 2**20:.0f} MiB, attacked {hostile['peak_rss'] / 2**20:.0f} MiB")
    assert hostile["attack_ended_before_run"], "the attack outlasted the run: raise ROUNDS or lower ATTACK_MESSAGES"
    assert hostile["rounds_during_attack"] >= 1, "no round closed while the attack went on"
    assert sum(refused.values()) > 0 and set(refused) <= {"d2s-other", "s2d-other", "presence-other", "s2d"}
    assert by_topic == sent, "every packet the broker passed must be dropped with a reason, and nothing else"
    assert set(reasons) <= {"unsigned", "bad_signature", "malformed", "chunk_refused", "replayed"}
    assert hostile["peak_rss"] < clean["peak_rss"] + 150 * 2**20, "the attack grew the server's memory"

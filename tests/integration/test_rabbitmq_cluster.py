"""A two-node RabbitMQ cluster (MQTT plugin, MQTT 3.1.1): the server on node 1, devices on node 2.

One cluster for the module (a node takes 10-40 s to start). Devices reach node 2 through a TCP proxy that
counts the bytes, so metering is checked against the socket across the cluster link.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fl_processes import Procs, aggregated_rounds, records, run_dir_of, wait_for, write_config
from test_transport_wire_bytes import CountingProxy, _settle

from fedpeft_edge.config import CommArgs
from fedpeft_edge.peft.base import Manifest, TensorSpec
from fedpeft_edge.protocol import keys as M
from fedpeft_edge.transport.fedml import Message
from fedpeft_edge.transport.mqtt import MqttCommManager
from fedpeft_edge.transport.rabbitmq import RabbitCluster, find_rabbitmq, start_rabbitmq_cluster
from fedpeft_edge.wire.codec import decode_tensors, encode_tensors

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,  # the cluster alone takes 30-60 s to form on 2 busy cores
    pytest.mark.timeout(420),
    pytest.mark.skipif(find_rabbitmq() is None, reason="rabbitmq-server is not installed (scripts/setup.sh)"),
]


@pytest.fixture(scope="module")
def cluster() -> Iterator[RabbitCluster]:
    c = start_rabbitmq_cluster(2)
    try:
        status = c.nodes[0].ctl("cluster_status", "--formatter", "json")
        running = json.loads(status)["running_nodes"]
        assert sorted(running) == sorted(n.name for n in c.nodes), status
        yield c
    finally:
        c.stop()


@pytest.fixture
def node2_proxy(cluster: RabbitCluster) -> Iterator[CountingProxy]:
    p = CountingProxy((cluster.nodes[1].host, cluster.nodes[1].port))
    yield p
    p.close()


def _args(port: int, **kw: Any) -> CommArgs:
    return CommArgs(broker_port=port, mqtt_version="3.1.1", publish_timeout_s=20.0, **kw)


def test_metering_matches_the_socket_across_the_cluster(cluster: RabbitCluster,
                                                         node2_proxy: CountingProxy) -> None:
    server = MqttCommManager(_args(cluster.nodes[0].port), "rmqwb", M.SERVER_ID)
    device = MqttCommManager(_args(node2_proxy.port), "rmqwb", 1)
    got: list[Any] = []
    server.add_observer(type("O", (), {"receive_message": lambda self, t, m: got.append(m)})())
    try:
        state = {"w": torch.randn(500_000)}  # 2 MB, one PUBLISH
        man = Manifest("full", (TensorSpec.of("w", state["w"]),))
        up = Message(M.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER, 1, M.SERVER_ID)
        up.add_params(M.MSG_ARG_KEY_ROUND, 2)
        up.add_params(M.MSG_ARG_KEY_MODEL_PARAMS, encode_tensors(state, man))
        before_up = _settle(node2_proxy)
        rec_up = device.send_message(up)
        after_up = _settle(node2_proxy)
        updates: list[Any] = []
        deadline = time.monotonic() + 30.0  # poll() returns once what is queued (presence too) is handled
        while not updates and time.monotonic() < deadline:
            server.poll(1.0)
            updates = [m for m in got if m.get_type() == M.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER]
        assert len(updates) == 1, "the update published on node 2 must reach the server on node 1"
        assert torch.equal(decode_tensors(updates[0].get(M.MSG_ARG_KEY_MODEL_PARAMS), man)["w"], state["w"])
        down = Message(M.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT, M.SERVER_ID, 1)
        down.add_params(M.MSG_ARG_KEY_ROUND, 2)
        down.add_params(M.MSG_ARG_KEY_MODEL_PARAMS, encode_tensors(state, man))
        mid_down = _settle(node2_proxy)
        server.send_message(down)
        after_down = _settle(node2_proxy)
        deadline = time.monotonic() + 30.0
        while device.meter.totals(round=2)["bytes_down"] <= 2_000_000 and time.monotonic() < deadline:
            device.poll(1.0)
        socket_up, socket_down = after_up[0] - before_up[0], after_down[1] - mid_down[1]
        metered_down = device.meter.totals(round=2)["bytes_down"]
        print(f"3.1.1 across nodes: up metered {rec_up.mqtt_bytes} B, socket {socket_up} B; "
              f"down metered {metered_down} B, socket {socket_down} B")
        assert abs(rec_up.mqtt_bytes - socket_up) <= 0.01 * socket_up
        assert metered_down > 2_000_000
        assert abs(metered_down - socket_down) <= 0.01 * socket_down
    finally:
        device.close()
        server.close()


def test_three_rounds_with_devices_on_the_other_node(cluster: RabbitCluster, node2_proxy: CountingProxy,
                                                     tmp_path: Path) -> None:
    comm = {"mqtt_version": "3.1.1", "presence_echo": True}
    server_cfg = write_config(tmp_path / "server.yaml", cluster.nodes[0].port, "rmq3",
                              comm_args=comm)
    device_cfg = write_config(tmp_path / "device.yaml", node2_proxy.port, "rmq3", comm_args=comm)
    run_dir = run_dir_of(server_cfg)
    procs = Procs(tmp_path / "logs")
    try:
        procs.server(server_cfg)
        wait_for("the server on node 1", lambda: "connected to" in procs.log("server"), 120, procs)
        for i in range(2):  # joining after the server: its retained presence is on node 1 only
            procs.agent(device_cfg, f"dev{i}", i)
        wait_for("summary.json", (run_dir / "summary.json").exists, 300, procs)
    finally:
        procs.stop_all()
    assert aggregated_rounds(run_dir) == [1, 2, 3], procs.logs()
    for rnd in (1, 2, 3):
        accepted = sorted(r["device_id"] for r in records(run_dir, "device_round")
                          if r["round"] == rnd and r["status"] == "accepted")
        assert accepted == ["dev0", "dev1"], (rnd, accepted)
    rounds = records(run_dir, "round")
    metered = sum(r["bytes_up"] + r["bytes_down"] for r in rounds)
    to_broker, to_client = node2_proxy.snapshot()
    print(f"server metered {metered} B of round traffic; the devices' sockets to node 2 carried "
          f"{to_broker + to_client} B (all packets: connect, presence, joins, pings, acks too)")
    assert 0 < metered <= to_broker + to_client

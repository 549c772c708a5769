"""Provisioning: mosquitto-compatible password hashes, the ACL's shape, keys, TLS files, snippets, refusals."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedpeft_edge.config import CommArgs
from fedpeft_edge.errors import ConfigError
from fedpeft_edge.transport.provision import SERVER_USER, hash_password, load_provisioned, provision
from fedpeft_edge.wire.auth import load_peer_keys, load_private_key, load_public_key


def test_password_hash_matches_mosquitto_passwd(tmp_path: Path) -> None:
    exe = shutil.which("mosquitto_passwd")
    if exe is None:
        pytest.skip("mosquitto_passwd is not installed")
    f = tmp_path / "pw"
    subprocess.run([exe, "-c", "-b", str(f), "alice", "s3cret"], check=True, capture_output=True)
    line = f.read_text().strip()
    salt = base64.b64decode(line.split("$")[3])
    assert line == "alice:" + hash_password("s3cret", salt)


def test_provision_writes_everything_a_node_needs(tmp_path: Path) -> None:
    prov = provision(tmp_path / "p", ["a", "b"], tls=True, run_id="r1")
    assert load_provisioned(prov.root).devices == ("a", "b")
    acl = (prov.root / "broker/acl").read_text()
    assert "user a\ntopic write fedpeft/r1/d2s/a\ntopic write fedpeft/r1/presence/a\n" \
           "topic read fedpeft/r1/s2d/a\ntopic read fedpeft/r1/presence/0" in acl
    assert f"user {SERVER_USER}\ntopic write fedpeft/r1/s2d/+" in acl
    users = [line.split(":")[0] for line in (prov.root / "broker/passwd").read_text().splitlines()]
    assert users == [SERVER_USER, "a", "b"]
    assert (prov.root / "broker/passwd").stat().st_mode & 0o077 == 0
    assert set(load_peer_keys(prov.root / "peers")) == {"a", "b"}
    for node in ("0", "a"):
        comm = CommArgs(**yaml.safe_load((prov.node_dir(node) / "comm_args.yaml").read_text())["comm_args"])
        assert comm.require_signatures and load_private_key(comm.signing_key_file or "")
        assert Path(comm.tls_cert_file or "").exists() and Path(comm.tls_ca_file or "").exists()
    load_public_key(prov.node_dir("a") / "server.pub")
    assert prov.comm_overrides("a")["comm_args.username"] == "a"


@pytest.mark.parametrize("ids", [[], ["a", "a"], ["0"], ["server"], ["a/b"], ["a b"]])
def test_bad_device_ids_are_refused(tmp_path: Path, ids: list[str]) -> None:
    with pytest.raises(Exception, match="device"):
        provision(tmp_path / "p", ids)


def test_a_directory_is_never_provisioned_twice(tmp_path: Path) -> None:
    provision(tmp_path / "p", ["a"])
    with pytest.raises(ConfigError, match="already provisioned"):
        provision(tmp_path / "p", ["a"])


def test_the_keystore_is_private_and_no_config_holds_a_password(tmp_path: Path) -> None:
    prov = provision(tmp_path / "p", ["a"], tls=True)
    for d in (prov.root, prov.root / "broker", prov.node_dir("0"), prov.node_dir("a")):
        assert d.stat().st_mode & 0o777 == 0o700, d
    for node in ("0", "a"):
        snippet = yaml.safe_load((prov.node_dir(node) / "comm_args.yaml").read_text())["comm_args"]
        assert "password" not in snippet and Path(snippet["password_file"]).stat().st_mode & 0o077 == 0
        assert prov.password(node) and prov.password(node) in Path(snippet["password_file"]).read_text()
    for key in prov.root.rglob("*.key"):
        assert key.stat().st_mode & 0o077 == 0, key


def test_revoke_takes_one_device_out_and_leaves_the_rest(tmp_path: Path) -> None:
    from cryptography import x509

    from fedpeft_edge.transport.provision import revoke

    prov = provision(tmp_path / "p", ["a", "b"], tls=True, run_id="r1")
    serial = x509.load_pem_x509_certificate((prov.node_dir("a") / "tls/node.crt").read_bytes()).serial_number
    b_key = (prov.node_dir("b") / "signing.key").read_bytes()
    after = revoke(prov.root, "a")
    assert after.devices == ("b",) and not prov.node_dir("a").exists()
    users = [line.split(":")[0] for line in (prov.root / "broker/passwd").read_text().splitlines()]
    assert users == [SERVER_USER, "b"]
    assert "user a" not in (prov.root / "broker/acl").read_text() and "user b" in (prov.root / "broker/acl").read_text()
    assert set(load_peer_keys(prov.root / "peers")) == {"b"}
    crl = x509.load_pem_x509_crl((prov.root / "broker/tls/crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert (prov.node_dir("b") / "signing.key").read_bytes() == b_key
    with pytest.raises(ConfigError, match="not provisioned"):
        revoke(prov.root, "a")


def test_rotate_renews_one_devices_secrets_only(tmp_path: Path) -> None:
    from fedpeft_edge.transport.provision import rotate

    prov = provision(tmp_path / "p", ["a", "b"])
    before = {n: (prov.password(n), (prov.node_dir(n) / "signing.key").read_bytes()) for n in ("a", "b")}
    passwd = (prov.root / "broker/passwd").read_text()
    rotate(prov.root, "a")
    assert prov.password("a") != before["a"][0]
    assert (prov.node_dir("a") / "signing.key").read_bytes() != before["a"][1]
    assert (prov.root / "peers/a.pub").read_bytes() == (prov.node_dir("a") / "signing.pub").read_bytes()
    assert (prov.password("b"), (prov.node_dir("b") / "signing.key").read_bytes()) == before["b"]
    new = (prov.root / "broker/passwd").read_text()
    assert [ln for ln in new.splitlines() if ln.startswith("b:")] == [ln for ln in passwd.splitlines()
                                                                      if ln.startswith("b:")]
    assert (prov.node_dir("a") / "signing.key").stat().st_mode & 0o077 == 0


def test_encryption_keys_are_provisioned_rotated_and_revoked_like_signing_keys(tmp_path: Path) -> None:
    from fedpeft_edge.transport.provision import PEERS_X25519, revoke, rotate
    from fedpeft_edge.transport.sealing import build_sealer
    from fedpeft_edge.wire.seal import load_encryption_private_key, load_peer_encryption_keys

    prov = provision(tmp_path / "p", ["a", "b"])
    assert (prov.root / PEERS_X25519).stat().st_mode & 0o777 == 0o700
    assert set(load_peer_encryption_keys(prov.root / PEERS_X25519)) == {"a", "b"}
    for node in ("0", "a"):
        comm = CommArgs(**yaml.safe_load((prov.node_dir(node) / "comm_args.yaml").read_text())["comm_args"])
        assert comm.encrypt and Path(comm.encryption_key_file or "").stat().st_mode & 0o077 == 0
        load_encryption_private_key(comm.encryption_key_file or "")
        assert build_sealer(comm, node, "run") is not None
    a_key = (prov.node_dir("a") / "encryption.key").read_bytes()
    b_key = (prov.node_dir("b") / "encryption.key").read_bytes()
    rotate(prov.root, "a")
    assert (prov.node_dir("a") / "encryption.key").read_bytes() != a_key
    assert (prov.root / PEERS_X25519 / "a.pub").read_bytes() == (prov.node_dir("a") / "encryption.pub").read_bytes()
    assert (prov.node_dir("a") / "encryption.key").stat().st_mode & 0o077 == 0
    assert (prov.node_dir("b") / "encryption.key").read_bytes() == b_key
    revoke(prov.root, "a")
    assert set(load_peer_encryption_keys(prov.root / PEERS_X25519)) == {"b"}


def _as_an_earlier_keystore(prov: Any) -> None:
    """Make a fresh keystore look like one provisioned before encryption and password files existed."""
    from fedpeft_edge.transport.provision import PASSWORD_FILE, PEERS_X25519

    shutil.rmtree(prov.root / PEERS_X25519)
    for node in ("0", *prov.devices):
        d = prov.node_dir(node)
        for name in ("encryption.key", "encryption.pub", "server-x25519.pub"):
            (d / name).unlink()
        comm = yaml.safe_load((d / "comm_args.yaml").read_text())["comm_args"]
        if node == "b":  # the oldest layout: the password inline in the snippet
            comm["password"] = prov.password(node)
            del comm["password_file"]
            (d / PASSWORD_FILE).unlink()
        for key in ("encrypt", "encryption_key_file", "peer_encryption_keys_dir", "server_encryption_key_file"):
            comm.pop(key, None)
        (d / "comm_args.yaml").write_text(yaml.safe_dump({"comm_args": comm}))


def test_upgrade_gives_an_earlier_keystore_encryption_and_keeps_its_secrets(tmp_path: Path) -> None:
    from fedpeft_edge.transport.provision import PEERS_X25519, upgrade
    from fedpeft_edge.transport.sealing import build_sealer

    prov = provision(tmp_path / "p", ["a", "b"])
    passwords = {n: prov.password(n) for n in ("0", "a", "b")}
    signing = {n: (prov.node_dir(n) / "signing.key").read_bytes() for n in ("0", "a", "b")}
    passwd = (prov.root / "broker/passwd").read_text()
    _as_an_earlier_keystore(prov)
    assert not CommArgs(**yaml.safe_load((prov.node_dir("a") / "comm_args.yaml").read_text())["comm_args"]).encrypt

    _, changed = upgrade(prov.root)
    assert any("b: its password moved" in c for c in changed) and any("server: an X25519" in c for c in changed)
    assert (prov.root / "broker/passwd").read_text() == passwd  # broker logins unchanged
    for node in ("0", "a", "b"):
        d = prov.node_dir(node)
        snippet = yaml.safe_load((d / "comm_args.yaml").read_text())["comm_args"]
        assert "password" not in snippet and prov.password(node) == passwords[node]
        assert (d / "signing.key").read_bytes() == signing[node]
        assert (d / "encryption.key").stat().st_mode & 0o077 == 0
        comm = CommArgs(**snippet)
        assert comm.encrypt and build_sealer(comm, node, "run") is not None
    assert (prov.root / PEERS_X25519).stat().st_mode & 0o777 == 0o700
    assert upgrade(prov.root)[1] == []  # a second upgrade changes nothing


def test_upgrade_refuses_a_node_without_any_password(tmp_path: Path) -> None:
    from fedpeft_edge.transport.provision import PASSWORD_FILE, upgrade

    prov = provision(tmp_path / "p", ["a"])
    (prov.node_dir("a") / PASSWORD_FILE).unlink()
    with pytest.raises(ConfigError, match="--rotate a"):
        upgrade(prov.root)

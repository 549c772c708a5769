"""Provisioning: mosquitto-compatible password hashes, the ACL's shape, keys, TLS files, snippets, refusals."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

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

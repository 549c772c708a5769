"""Sealed blobs: one receiver and many (wrapped content key) round-trip; a tampered ciphertext, a wrong key, another
header (AAD), a device the shared blob was not sealed to and garbage are refused as `undecryptable`, never raised
as anything else; the transport's Sealer refuses plaintext where encryption is on."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft_edge.config import CommArgs
from fedpeft_edge.errors import AuthError, ConfigError
from fedpeft_edge.protocol import keys as M
from fedpeft_edge.transport.sealing import Sealer, build_sealer, encryption_on
from fedpeft_edge.wire.seal import SEAL_OVERHEAD, blob_aad, is_sealed_blob, open_blob, seal_blob, sealed_nbytes

SERVER, DEV, OTHER = X25519PrivateKey.generate(), X25519PrivateKey.generate(), X25519PrivateKey.generate()
AAD = blob_aad("run", 103, "dev", 0, 4, "m1")
DATA = bytes(range(256)) * 40


def _reason(sealed: bytes, aad: bytes = AAD, me: str = "dev", key: X25519PrivateKey = DEV) -> str:
    with pytest.raises(AuthError) as info:
        open_blob(sealed, aad, me, key)
    return info.value.reason


def test_one_receiver_round_trips_with_68_bytes_of_overhead_and_hides_the_plaintext() -> None:
    sealed = seal_blob(memoryview(DATA), AAD, receiver=("dev", DEV.public_key()))
    assert is_sealed_blob(sealed) and len(sealed) == len(DATA) + SEAL_OVERHEAD == sealed_nbytes(len(DATA))
    assert SEAL_OVERHEAD == 68 and DATA[:64] not in sealed
    assert open_blob(sealed, AAD, "dev", DEV) == DATA
    assert seal_blob(DATA, AAD, receiver=("dev", DEV.public_key())) != sealed  # fresh ephemeral key and nonce


def test_tampered_wrong_key_wrong_receiver_and_moved_header_are_undecryptable() -> None:
    sealed = seal_blob(DATA, AAD, receiver=("dev", DEV.public_key()))
    for pos in (10, 60, len(sealed) // 2, len(sealed) - 1):  # ephemeral key, nonce, ciphertext, tag
        bad = bytearray(sealed)
        bad[pos] ^= 1
        assert _reason(bytes(bad)) == "undecryptable"
    assert _reason(sealed, key=OTHER) == "undecryptable"
    assert _reason(sealed, me="other") == "undecryptable"  # the receiver's id is in the key derivation
    for moved in (blob_aad("run2", 103, "dev", 0, 4, "m1"), blob_aad("run", 104, "dev", 0, 4, "m1"),
                  blob_aad("run", 103, "dev2", 0, 4, "m1"), blob_aad("run", 103, "dev", 1, 4, "m1"),
                  blob_aad("run", 103, "dev", 0, 5, "m1"), blob_aad("run", 103, "dev", 0, 4, "m2")):
        assert _reason(sealed, aad=moved) == "undecryptable"
    assert _reason(sealed[:40]) == "undecryptable" and _reason(b"FPE1" + bytes(100)) == "undecryptable"


def test_shared_blob_is_encrypted_once_and_wrapped_per_device() -> None:
    devices = {f"d{i}": X25519PrivateKey.generate() for i in range(5)}
    aad = blob_aad("run", 106, 0, M.BROADCAST, 2, "m")
    sealed = seal_blob(DATA, aad, recipients={d: k.public_key() for d, k in devices.items()})
    assert len(sealed) == sealed_nbytes(len(DATA), devices) == len(DATA) + SEAL_OVERHEAD + 5 * (1 + 2 + 48)
    for d, k in devices.items():
        assert open_blob(sealed, aad, d, k) == DATA
    assert _reason(sealed, aad=aad, me="d0", key=devices["d1"]) == "undecryptable"
    with pytest.raises(AuthError, match="one-receiver"):  # an update must not carry a recipient list
        open_blob(sealed, aad, "d0", devices["d0"], shared=False)
    with pytest.raises(AuthError, match="shared"):
        open_blob(seal_blob(DATA, aad, receiver=("d0", devices["d0"].public_key())), aad, "d0", devices["d0"],
                  shared=True)
    with pytest.raises(AuthError, match="none of them 'd9'"):
        open_blob(sealed, aad, "d9", X25519PrivateKey.generate())


@settings(max_examples=25, deadline=None)
@given(st.binary(max_size=2048), st.binary(min_size=1, max_size=64), st.integers(0, 3))
def test_any_blob_round_trips_and_any_flipped_byte_is_refused(data: bytes, aad: bytes, n: int) -> None:
    keys = {f"d{i}": X25519PrivateKey.generate() for i in range(max(n, 1))}
    if n == 0:
        sealed = seal_blob(data, aad, receiver=("d0", keys["d0"].public_key()))
    else:
        sealed = seal_blob(data, aad, recipients={d: k.public_key() for d, k in keys.items()})
    assert open_blob(sealed, aad, "d0", keys["d0"]) == data
    bad = bytearray(sealed)
    bad[len(sealed) // 3] ^= 0x80
    assert _reason(bytes(bad), aad=aad, me="d0", key=keys["d0"]) == "undecryptable"


def test_sealer_binds_the_header_and_refuses_plaintext() -> None:
    server = Sealer("0", SERVER, {"dev": DEV.public_key(), "d2": OTHER.public_key()}, "run", M.BROADCAST)
    device = Sealer("dev", DEV, {"0": SERVER.public_key()}, "run", M.BROADCAST)
    task = {M.MSG_ARG_KEY_TYPE: 103, M.MSG_ARG_KEY_SENDER: 0, M.MSG_ARG_KEY_RECEIVER: "dev",
            M.MSG_ARG_KEY_ROUND: 3, M.MSG_ARG_KEY_MSG_ID: "abc"}
    sealed = server.seal(task, DATA)
    assert device.open(task, sealed) == DATA
    with pytest.raises(AuthError) as info:
        device.open({**task, M.MSG_ARG_KEY_ROUND: 4}, sealed)
    assert info.value.reason == "undecryptable"
    with pytest.raises(AuthError) as info:
        device.open(task, DATA)
    assert info.value.reason == "unencrypted"
    shared = {**task, M.MSG_ARG_KEY_RECEIVER: M.BROADCAST}
    assert device.open(shared, server.seal(shared, DATA)) == DATA
    with pytest.raises(ConfigError, match="no X25519 public key for node 'd3'"):
        server.seal({**task, M.MSG_ARG_KEY_RECEIVER: "d3"}, DATA)


def test_encryption_is_on_where_provisioned_and_needs_its_keys(tmp_path: object) -> None:
    assert not encryption_on(CommArgs())
    assert encryption_on(CommArgs(require_signatures=True, signing_key_file="k", encryption_key_file="e"))
    assert not encryption_on(CommArgs(require_signatures=True, signing_key_file="k"))  # an older keystore
    assert not encryption_on(CommArgs(encrypt=False, require_signatures=True, encryption_key_file="e"))
    assert build_sealer(CommArgs(), "dev", "run") is None
    with pytest.raises(ConfigError, match="encrypt is on"):
        build_sealer(CommArgs(encrypt=True), "dev", "run")

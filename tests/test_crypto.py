"""Crypto: streaming AEAD against an attacker who edits blobs, keys, key files, signatures."""

from __future__ import annotations

import hashlib
import os
import random
import re
import stat
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pluggy
import pytest

from emix_core import crypto, hookspecs
from emix_core.crypto import (
    HEADER_SIZE,
    SEGMENT_SIZE,
    TAG_SIZE,
    KeyFileWrapper,
    SigningKey,
    StreamDecryptor,
    StreamEncryptor,
    canonical_json,
    ciphertext_size,
    create_key_file,
    decrypt_stream,
    derive_item_key,
    encrypt_stream,
    fingerprint_of,
    item_associated_data,
    load_key_file,
    new_data_key,
    open_value,
    seal_value,
    sha256_file,
    sign_document,
    verify_document,
    verify_signature,
)
from emix_core.errors import ConfigError, IntegrityError, InvalidInput

MIB = 1024 * 1024
CT_SEGMENT = SEGMENT_SIZE + TAG_SIZE
PACKAGE = "pkg-7f3a"
AD = item_associated_data(PACKAGE, 1)


def plaintext(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def chunked(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def seal(data: bytes, key: bytes, ad: bytes = AD, chunk: int = SEGMENT_SIZE) -> bytes:
    return b"".join(encrypt_stream(key, ad, chunked(data, chunk)))


def unseal(blob: bytes, key: bytes, ad: bytes = AD, chunk: int = 65537) -> bytes:
    return b"".join(decrypt_stream(key, ad, chunked(blob, chunk)))


@pytest.fixture(scope="module")
def key() -> bytes:
    return new_data_key()


@pytest.fixture(scope="module")
def three_and_a_half(key: bytes) -> tuple[bytes, bytes]:
    """A 3.5 MiB plaintext (four segments, the last one half full) and its ciphertext."""
    data = plaintext(int(3.5 * MIB))
    return data, seal(data, key)


def segment_offset(index: int) -> int:
    return HEADER_SIZE + index * CT_SEGMENT


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "size", [0, 1, SEGMENT_SIZE - 1, SEGMENT_SIZE, SEGMENT_SIZE + 1, int(3.5 * MIB)]
)
@pytest.mark.parametrize("chunk", [1_000_003, SEGMENT_SIZE + 17])
def test_round_trip_restores_every_byte(key: bytes, size: int, chunk: int) -> None:
    data = plaintext(size, seed=size)
    blob = seal(data, key, chunk=chunk)
    assert len(blob) == ciphertext_size(size)
    if size >= 64:
        assert data[:64] not in blob
    assert unseal(blob, key, chunk=chunk - 5) == data


def test_empty_plaintext_is_one_empty_last_segment(key: bytes) -> None:
    blob = seal(b"", key)
    assert len(blob) == HEADER_SIZE + TAG_SIZE == ciphertext_size(0)
    assert unseal(blob, key) == b""


def test_ciphertext_size_counts_a_tag_per_segment() -> None:
    assert ciphertext_size(SEGMENT_SIZE) == HEADER_SIZE + SEGMENT_SIZE + TAG_SIZE
    assert ciphertext_size(SEGMENT_SIZE + 1) == HEADER_SIZE + SEGMENT_SIZE + 1 + 2 * TAG_SIZE
    assert ciphertext_size(3 * SEGMENT_SIZE) == HEADER_SIZE + 3 * CT_SEGMENT


def test_encryptor_holds_back_a_full_segment_until_more_data_follows(key: bytes) -> None:
    encryptor = StreamEncryptor(key, AD)
    assert encryptor.header.startswith(b"EMX1") and len(encryptor.header) == HEADER_SIZE
    assert encryptor.update(bytes(SEGMENT_SIZE)) == b""
    assert len(encryptor.update(b"x")) == CT_SEGMENT
    assert len(encryptor.finalize()) == 1 + TAG_SIZE


def test_same_plaintext_encrypts_differently_each_time(key: bytes) -> None:
    assert seal(b"same bytes", key) != seal(b"same bytes", key)


# --------------------------------------------------------------------------- attacks


@pytest.mark.parametrize(
    "cut",
    [
        pytest.param(segment_offset(3), id="last-segment-dropped"),
        pytest.param(segment_offset(2), id="two-segments-dropped"),
        pytest.param(segment_offset(1) + 1000, id="mid-segment"),
        pytest.param(-1, id="inside-last-tag"),
        pytest.param(HEADER_SIZE + 5, id="inside-first-tag"),
        pytest.param(HEADER_SIZE, id="header-only"),
        pytest.param(10, id="inside-header"),
        pytest.param(0, id="empty"),
    ],
)
def test_truncation_is_detected(key: bytes, three_and_a_half, cut: int) -> None:
    _, blob = three_and_a_half
    with pytest.raises(IntegrityError, match="truncated|failed authentication"):
        unseal(blob[:cut], key)


def test_truncation_of_an_exact_multiple_at_a_segment_boundary_is_detected(key: bytes) -> None:
    blob = seal(plaintext(2 * SEGMENT_SIZE), key)
    assert len(blob) == segment_offset(2)
    with pytest.raises(IntegrityError, match="final segment 0"):
        unseal(blob[: segment_offset(1)], key)


def test_swapping_two_segments_is_detected(key: bytes, three_and_a_half) -> None:
    _, blob = three_and_a_half
    first = blob[segment_offset(0) : segment_offset(1)]
    second = blob[segment_offset(1) : segment_offset(2)]
    swapped = blob[:HEADER_SIZE] + second + first + blob[segment_offset(2) :]
    with pytest.raises(IntegrityError, match="segment 0"):
        unseal(swapped, key)


def test_a_segment_spliced_from_another_encryption_of_the_same_item_is_detected(
    key: bytes, three_and_a_half
) -> None:
    data, blob = three_and_a_half
    other = seal(data, key)
    spliced = blob[: segment_offset(1)] + other[segment_offset(1) :]
    with pytest.raises(IntegrityError, match="segment 1"):
        unseal(spliced, key)


@pytest.mark.parametrize(
    "position",
    [
        pytest.param(0, id="header-magic"),
        pytest.param(6, id="header-salt"),
        pytest.param(HEADER_SIZE - 1, id="header-nonce-prefix"),
        pytest.param(HEADER_SIZE + 12345, id="body-first-segment"),
        pytest.param(segment_offset(1) - 1, id="tag-first-segment"),
        pytest.param(segment_offset(3) + 99, id="body-last-segment"),
        pytest.param(-1, id="tag-last-segment"),
    ],
)
def test_a_single_bit_flip_anywhere_is_detected(
    key: bytes, three_and_a_half, position: int
) -> None:
    _, blob = three_and_a_half
    tampered = bytearray(blob)
    tampered[position] ^= 0x10
    with pytest.raises(IntegrityError):
        unseal(bytes(tampered), key)


@pytest.mark.parametrize("extra", ["one-byte", "copy-of-last-segment", "full-segment"])
def test_data_appended_after_the_last_segment_is_detected(
    key: bytes, three_and_a_half, extra: str
) -> None:
    _, blob = three_and_a_half
    tail = {
        "one-byte": b"\x00",
        "copy-of-last-segment": blob[segment_offset(3) :],
        "full-segment": blob[segment_offset(0) : segment_offset(1)],
    }[extra]
    with pytest.raises(IntegrityError):
        unseal(blob + tail, key)


def test_a_blob_of_another_item_or_package_does_not_open(key: bytes) -> None:
    data = plaintext(5000)
    package_key = new_data_key()
    blob = seal(data, derive_item_key(package_key, PACKAGE, 1), item_associated_data(PACKAGE, 1))
    assert (
        unseal(blob, derive_item_key(package_key, PACKAGE, 1), item_associated_data(PACKAGE, 1))
        == data
    )
    # The same key with another item's associated data: the swap the hub must refuse.
    for ad in (item_associated_data(PACKAGE, 2), item_associated_data("pkg-other", 1), b""):
        with pytest.raises(IntegrityError, match="another item"):
            unseal(blob, derive_item_key(package_key, PACKAGE, 1), ad)
    with pytest.raises(IntegrityError):
        unseal(blob, derive_item_key(package_key, PACKAGE, 2), item_associated_data(PACKAGE, 2))


def test_a_wrong_key_is_detected(key: bytes, three_and_a_half) -> None:
    _, blob = three_and_a_half
    with pytest.raises(IntegrityError, match="wrong key"):
        unseal(blob, new_data_key())


def test_no_plaintext_of_a_failing_segment_is_released(key: bytes, three_and_a_half) -> None:
    data, blob = three_and_a_half
    for bad_segment in (0, 1, 3):
        tampered = bytearray(blob)
        tampered[segment_offset(bad_segment) + 7] ^= 1
        released = bytearray()
        with pytest.raises(IntegrityError, match=f"segment {bad_segment}"):
            for out in decrypt_stream(key, AD, chunked(bytes(tampered), 300_001)):
                released += out
        # Exactly the verified segments before the bad one, not a byte more.
        assert bytes(released) == data[: bad_segment * SEGMENT_SIZE]


def test_decryptor_releases_nothing_until_it_knows_a_segment_is_not_last(
    key: bytes, three_and_a_half
) -> None:
    data, blob = three_and_a_half
    decryptor = StreamDecryptor(key, AD)
    assert decryptor.update(blob[: segment_offset(1)]) == b""
    assert decryptor.update(blob[segment_offset(1) : segment_offset(1) + 1]) == data[:SEGMENT_SIZE]


def test_a_failed_decryptor_stays_failed(key: bytes, three_and_a_half) -> None:
    _, blob = three_and_a_half
    decryptor = StreamDecryptor(key, AD)
    tampered = bytearray(blob[: segment_offset(2)])
    tampered[HEADER_SIZE] ^= 1
    with pytest.raises(IntegrityError):
        decryptor.update(bytes(tampered))
    with pytest.raises(IntegrityError):
        decryptor.update(blob[segment_offset(2) :])
    with pytest.raises(IntegrityError):
        decryptor.finalize()


def test_streaming_memory_stays_flat_for_256_mib() -> None:
    key = new_data_key()
    block = plaintext(SEGMENT_SIZE + 4099)  # chunks straddle segment boundaries
    count = (256 * MIB) // len(block)

    def source() -> Iterator[bytes]:
        for _ in range(count):
            yield block

    expected = hashlib.sha256()
    for chunk in source():
        expected.update(chunk)
    received = hashlib.sha256()
    size = 0
    tracemalloc.start()
    try:
        for out in decrypt_stream(key, AD, encrypt_stream(key, AD, source())):
            received.update(out)
            size += len(out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size == count * len(block) > 255 * MIB
    assert received.hexdigest() == expected.hexdigest()
    assert peak < 8 * MIB, f"peak {peak / MIB:.1f} MiB"


# --------------------------------------------------------------------------- keys


def test_item_keys_differ_per_item_and_per_package() -> None:
    package_key = new_data_key()
    keys = {
        derive_item_key(package_key, PACKAGE, 1),
        derive_item_key(package_key, PACKAGE, 2),
        derive_item_key(package_key, "pkg-other", 1),
        derive_item_key(new_data_key(), PACKAGE, 1),
        derive_item_key(package_key, PACKAGE, "summary"),
    }
    assert len(keys) == 5 and all(len(k) == 32 for k in keys)
    assert derive_item_key(package_key, PACKAGE, 1) == derive_item_key(package_key, PACKAGE, 1)
    assert derive_item_key(package_key, PACKAGE, 1) == derive_item_key(package_key, PACKAGE, "1")


def test_item_associated_data_is_unambiguous() -> None:
    assert item_associated_data("ab", "c") != item_associated_data("a", "bc")
    assert item_associated_data("p1", 23) != item_associated_data("p12", 3)
    assert item_associated_data(PACKAGE, 7) == item_associated_data(PACKAGE, "7")


def test_a_short_key_is_refused() -> None:
    with pytest.raises(InvalidInput, match="32 bytes"):
        StreamEncryptor(b"short", AD)
    with pytest.raises(InvalidInput, match="32 bytes"):
        derive_item_key(b"\x00" * 16, PACKAGE, 1)


def test_sealed_value_round_trip_and_tampering() -> None:
    value_key = new_data_key()
    blob = seal_value(value_key, b"Doe^Jane", b"row-1")
    assert b"Doe" not in blob and blob != seal_value(value_key, b"Doe^Jane", b"row-1")
    assert open_value(value_key, blob, b"row-1") == b"Doe^Jane"
    with pytest.raises(IntegrityError):
        open_value(value_key, blob, b"row-2")
    with pytest.raises(IntegrityError):
        open_value(value_key, blob[:-1] + bytes([blob[-1] ^ 1]), b"row-1")
    with pytest.raises(IntegrityError):
        open_value(new_data_key(), blob, b"row-1")
    with pytest.raises(IntegrityError, match="truncated"):
        open_value(value_key, blob[:20], b"row-1")


# --------------------------------------------------------------------------- key files


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_key_file_is_created_0600_in_a_0700_folder_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "home" / "keys" / "kek.key"
    create_key_file(path)
    assert mode_of(path) == 0o600
    assert mode_of(path.parent) == 0o700
    key = load_key_file(path)
    assert len(key) == 32
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        create_key_file(path)
    assert load_key_file(path) == key
    assert [p.name for p in path.parent.iterdir()] == ["kek.key"]  # no temp file left


def test_a_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "kek.key"
    create_key_file(path)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=re.escape(f"chmod 600 {path}")):
        load_key_file(path)


def test_a_missing_or_damaged_key_file_is_explained(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing.*emix hub init"):
        load_key_file(tmp_path / "kek.key")
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 5)
    short.chmod(0o600)
    with pytest.raises(ConfigError, match="damaged"):
        load_key_file(short)


def test_wrapped_key_round_trips_and_is_bound_to_its_package(tmp_path: Path) -> None:
    create_key_file(tmp_path / "kek.key")
    wrapper = KeyFileWrapper(tmp_path / "kek.key")
    assert isinstance(wrapper, crypto.KeyWrapper)
    data_key = new_data_key()
    wrapped = wrapper.wrap(data_key, b"emix-package:A")
    assert data_key not in wrapped
    assert wrapper.unwrap(wrapped, b"emix-package:A") == data_key
    with pytest.raises(IntegrityError, match="another package"):
        wrapper.unwrap(wrapped, b"emix-package:B")
    create_key_file(tmp_path / "other.key")
    with pytest.raises(IntegrityError, match="key file was replaced"):
        KeyFileWrapper(tmp_path / "other.key").unwrap(wrapped, b"emix-package:A")


def test_key_wrapper_hook_uses_the_hub_kek_and_yields_to_other_plugins(tmp_path: Path) -> None:
    create_key_file(tmp_path / "keys" / "kek.key")
    pm = pluggy.PluginManager("emix")
    pm.add_hookspecs(hookspecs)
    pm.register(crypto, name="emix.keyfile")
    wrapper = pm.hook.emix_key_wrapper(home=str(tmp_path))
    assert isinstance(wrapper, KeyFileWrapper)
    assert wrapper.path == tmp_path / "keys" / "kek.key"
    data_key = new_data_key()
    assert wrapper.unwrap(wrapper.wrap(data_key, b"ctx"), b"ctx") == data_key

    class KmsPlugin:
        @crypto.hookimpl
        def emix_key_wrapper(self, home: str) -> str:
            return "kms"

    pm.register(KmsPlugin(), name="acme-kms")
    assert pm.hook.emix_key_wrapper(home=str(tmp_path)) == "kms"


# --------------------------------------------------------------------------- signatures


def test_signing_key_is_created_once_0600_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "facility-signing.key"
    key = SigningKey.load_or_create(path)
    assert mode_of(path) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    again = SigningKey.load_or_create(path)
    assert again.public_key_b64 == key.public_key_b64
    assert re.fullmatch(r"([0-9a-f]{4}:){7}[0-9a-f]{4}", key.fingerprint)
    assert fingerprint_of(key.public_key_b64) == key.fingerprint
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        SigningKey.load_or_create(path)


def test_signature_tampering_is_detected() -> None:
    key = SigningKey.generate()
    signature = key.sign(b"manifest bytes")
    verify_signature(key.public_key_b64, b"manifest bytes", signature)
    with pytest.raises(IntegrityError):
        verify_signature(key.public_key_b64, b"manifest bytez", signature)
    with pytest.raises(IntegrityError):
        verify_signature(SigningKey.generate().public_key_b64, b"manifest bytes", signature)
    with pytest.raises(IntegrityError):
        verify_signature(key.public_key_b64, b"manifest bytes", "not base64!")


def test_signed_document_verifies_and_tampering_is_detected() -> None:
    key = SigningKey.generate()
    document = {"package": "pkg-1", "items": [{"id": 1, "sha256": "ab" * 32}]}
    signed = sign_document(key, document)
    assert signed["key_fingerprint"] == key.fingerprint
    assert verify_document(signed, key.public_key_b64) == document

    edited = {**signed, "document": {**document, "package": "pkg-2"}}
    with pytest.raises(IntegrityError, match="signature does not verify"):
        verify_document(edited, key.public_key_b64)

    impostor = SigningKey.generate()
    forged = sign_document(impostor, document)
    with pytest.raises(IntegrityError, match="registered key"):
        verify_document(forged, key.public_key_b64)
    # A forger who copies the genuine fingerprint still fails on the signature.
    with pytest.raises(IntegrityError, match="signature does not verify"):
        verify_document({**forged, "key_fingerprint": key.fingerprint}, key.public_key_b64)
    with pytest.raises(IntegrityError, match="no registered signing key"):
        verify_document(signed, "")


def test_fingerprint_of_a_malformed_key_is_refused() -> None:
    with pytest.raises(InvalidInput):
        fingerprint_of("AAAA")
    with pytest.raises(InvalidInput):
        fingerprint_of("not base64 at all, not even close, 44 chars!")


def test_canonical_json_is_stable() -> None:
    one = {"b": 1, "a": {"z": [1, 2], "y": "é"}}
    two = {"a": {"y": "é", "z": [1, 2]}, "b": 1}
    assert canonical_json(one) == canonical_json(two)
    assert canonical_json(one) == '{"a":{"y":"é","z":[1,2]},"b":1}'.encode()
    with pytest.raises(InvalidInput):
        canonical_json({"x": float("nan")})


def test_sha256_file_streams_the_whole_file(tmp_path: Path) -> None:
    data = plaintext(3 * MIB + 5)
    path = tmp_path / "slice.dcm"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(path, chunk=4096) == hashlib.sha256(data).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert sha256_file(empty) == hashlib.sha256(b"").hexdigest()


def test_key_files_leave_no_temporary_copy_behind(tmp_path: Path) -> None:
    SigningKey.load_or_create(tmp_path / "sign.key")
    create_key_file(tmp_path / "kek.key")
    assert sorted(os.listdir(tmp_path)) == ["kek.key", "sign.key"]

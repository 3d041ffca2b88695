"""Cryptography for emix: streaming AEAD, keys, key wrapping, signatures.

Streaming AEAD follows Tink's AES-GCM-HKDF streaming design:

* stream = header || segment 0 || segment 1 || ... || last segment
* header = ``b"EMX1"`` || salt (16 random bytes) || nonce prefix (7 random bytes)
* the segment key is HKDF-SHA256(key, salt), so one key may safely seal many streams
* segment = AES-256-GCM(plaintext of ``SEGMENT_SIZE`` bytes, the last one shorter or empty)
  with nonce = prefix || segment index (4 bytes, big endian) || last-segment flag (1 byte)
  and the caller's associated data on every segment.

Because the index and the last flag are inside the nonce, reordering, dropping,
truncating or extending the stream makes a tag fail. The decryptor releases a segment's
plaintext only after its tag verified, and the final segment only in ``finalize``.

This module is also the built-in plugin ``emix.keyfile``: it provides the default
``emix_key_wrapper`` (the hub's key-encryption key file).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NoReturn, Protocol, runtime_checkable

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from emix_core.content.safe_open import open_regular
from emix_core.errors import ConfigError, IntegrityError, InvalidInput, PayloadTooLarge
from emix_core.plugins import hookimpl

__all__ = [
    "SEGMENT_SIZE",
    "HEADER_SIZE",
    "TAG_SIZE",
    "KEY_SIZE",
    "StreamEncryptor",
    "StreamDecryptor",
    "encrypt_stream",
    "decrypt_stream",
    "ciphertext_size",
    "new_data_key",
    "derive_item_key",
    "item_associated_data",
    "seal_value",
    "open_value",
    "KeyWrapper",
    "KeyFileWrapper",
    "create_key_file",
    "load_key_file",
    "emix_key_wrapper",
    "emix_audit_signing_key",
    "check_signer",
    "SigningKey",
    "fingerprint_of",
    "verify_signature",
    "canonical_json",
    "sign_document",
    "verify_document",
    "sha256_file",
]

#: Plaintext bytes per segment of a stream (the last segment may be shorter).
SEGMENT_SIZE = 1024 * 1024
#: AES-256 key length in bytes.
KEY_SIZE = 32
#: AES-GCM tag length in bytes.
TAG_SIZE = 16

_MAGIC = b"EMX1"
_SALT_SIZE = 16
_PREFIX_SIZE = 7
#: Bytes of the stream header: magic, salt, nonce prefix.
HEADER_SIZE = len(_MAGIC) + _SALT_SIZE + _PREFIX_SIZE
_CIPHER_SEGMENT = SEGMENT_SIZE + TAG_SIZE
_MAX_SEGMENTS = 2**32
_NONCE_SIZE = 12
_STREAM_INFO = b"emix stream segment key v1"
_ITEM_KEY_INFO = b"emix item key v1\x00"
_ITEM_AD_TAG = b"emix-item-v1"
_WRAP_AD_TAG = b"emix key wrap v1\x00"
_DOCUMENT_CONTEXT = b"emix signed document v1\x00"
_FILE_MODE = 0o600
_DIR_MODE = 0o700


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_SIZE:
        raise InvalidInput(f"an AES-256 key must be {KEY_SIZE} bytes")


def _segment_nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def _segment_key(key: bytes, salt: bytes) -> AESGCM:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=salt, info=_STREAM_INFO)
    return AESGCM(hkdf.derive(key))


# --------------------------------------------------------------------------- streaming AEAD


class StreamEncryptor:
    """Encrypt one stream in segments; write ``header``, each ``update``, then ``finalize``.

    It buffers at most one segment; each update returns about as many bytes as it got.

    :param key: 32-byte key (for items: :func:`derive_item_key`).
    :param associated_data: authenticated on every segment (:func:`item_associated_data`).
    """

    def __init__(self, key: bytes, associated_data: bytes) -> None:
        _check_key(key)
        salt = os.urandom(_SALT_SIZE)
        self._prefix = os.urandom(_PREFIX_SIZE)
        self._header = _MAGIC + salt + self._prefix
        self._aead = _segment_key(bytes(key), salt)
        self._ad = bytes(associated_data)
        self._segment = _SegmentBuffer(SEGMENT_SIZE)
        self._index = 0
        self._done = False

    @property
    def header(self) -> bytes:
        """The stream header; it must be written before any ciphertext."""
        return self._header

    def update(self, data: bytes | memoryview) -> bytes:
        """Buffer ``data``; return the ciphertext of segments now known not to be last."""
        if self._done:
            raise RuntimeError("StreamEncryptor.update called after finalize")
        # A full segment is sealed only once a further byte shows that it is not the last.
        return b"".join(self._seal(segment, last=False) for segment in self._segment.feed(data))

    def finalize(self) -> bytes:
        """Seal the buffered rest (possibly empty) as the last segment and return it."""
        if self._done:
            raise RuntimeError("StreamEncryptor.finalize called twice")
        self._done = True
        return self._seal(self._segment.rest(), last=True)

    def _seal(self, plaintext: memoryview, *, last: bool) -> bytes:
        if self._index >= _MAX_SEGMENTS:
            raise PayloadTooLarge(
                "an encrypted stream is limited to 4 PiB (2**32 segments); split the item"
            )
        nonce = _segment_nonce(self._prefix, self._index, last)
        self._index += 1
        return self._aead.encrypt(nonce, plaintext, self._ad)


class StreamDecryptor:
    """Decrypt a stream made by :class:`StreamEncryptor`, releasing only verified plaintext.

    Feed every ciphertext byte (header included) to ``update``, then call ``finalize``;
    both raise :class:`IntegrityError` on tampering, truncation, reordering, appended
    data, or a wrong key or associated data. After an error the decryptor stays failed.

    :param key: the 32-byte key the stream was sealed with.
    :param associated_data: the associated data it was sealed with.
    """

    def __init__(self, key: bytes, associated_data: bytes) -> None:
        _check_key(key)
        self._key = bytes(key)
        self._ad = bytes(associated_data)
        self._aead: AESGCM | None = None
        self._header = bytearray()
        self._prefix = b""
        self._segment = _SegmentBuffer(_CIPHER_SEGMENT)
        self._index = 0
        self._error: IntegrityError | None = None
        self._done = False

    def update(self, data: bytes) -> bytes:
        """Consume ciphertext; return the plaintext of verified segments that are not last."""
        self._check_usable()
        view = memoryview(data)
        if self._aead is None:
            needed = HEADER_SIZE - len(self._header)
            self._header += view[:needed]
            view = view[needed:]
            if len(self._header) < HEADER_SIZE:
                return b""
            self._read_header(bytes(self._header))
        # A full segment followed by more bytes is not the last one.
        return b"".join(self._open(segment, last=False) for segment in self._segment.feed(view))

    def finalize(self) -> bytes:
        """Verify the final segment (it must carry the last flag) and return its plaintext."""
        self._check_usable()
        self._done = True
        if self._aead is None:
            self._fail(
                f"encrypted stream is truncated: it ends inside its header "
                f"({len(self._header)} of {HEADER_SIZE} bytes). The stored copy is damaged or "
                "the transfer was cut; fetch it again from its source."
            )
        rest = self._segment.rest()
        if len(rest) < TAG_SIZE:
            self._fail(
                f"encrypted stream is truncated: segment {self._index} is incomplete. The "
                "stored copy is damaged or the transfer was cut; fetch it again from its source."
            )
        return self._open(rest, last=True)

    def _check_usable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._done:
            raise RuntimeError("StreamDecryptor used after finalize")

    def _fail(self, message: str) -> NoReturn:
        self._error = IntegrityError(message)
        raise self._error

    def _read_header(self, header: bytes) -> None:
        if not header.startswith(_MAGIC):
            self._fail(
                "data is not an emix encrypted stream (unknown header): it was altered, or it "
                "is not an emix blob. Fetch it again from its source."
            )
        salt = header[len(_MAGIC) : len(_MAGIC) + _SALT_SIZE]
        self._prefix = header[len(_MAGIC) + _SALT_SIZE :]
        self._aead = _segment_key(self._key, salt)

    def _open(self, segment: memoryview, *, last: bool) -> bytes:
        assert self._aead is not None
        if self._index >= _MAX_SEGMENTS:
            self._fail("encrypted stream has more segments than any emix stream can have")
        nonce = _segment_nonce(self._prefix, self._index, last)
        try:
            plaintext = self._aead.decrypt(nonce, segment, self._ad)
        except InvalidTag:
            where = "its final segment" if last else "segment"
            self._fail(
                f"encrypted stream failed authentication at {where} {self._index}: it was "
                "altered, reordered, truncated or extended, or it is opened with the wrong key "
                "or for another item. No plaintext from that segment on was released; fetch "
                "it again from its source and report a security incident if it fails again."
            )
        self._index += 1
        return plaintext


class _SegmentBuffer:
    """Cuts a byte stream into segments of ``size``, always holding the latest one back.

    ``feed`` yields each full segment once at least one byte beyond it has arrived, so
    the segment still held at the end (``rest``) is the last one. One fixed buffer, no
    growth; segments wholly inside a chunk are passed on without a copy.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._buffer = bytearray(size)
        self._view = memoryview(self._buffer)
        self._fill = 0

    def feed(self, data: bytes | memoryview) -> Iterator[memoryview]:
        view = memoryview(data)
        pos, end, size = 0, len(view), self._size
        while pos < end:
            if self._fill == size:
                yield self._view
                self._fill = 0
            if self._fill == 0:
                while end - pos > size:
                    yield view[pos : pos + size]
                    pos += size
            take = min(size - self._fill, end - pos)
            self._view[self._fill : self._fill + take] = view[pos : pos + take]
            self._fill += take
            pos += take

    def rest(self) -> memoryview:
        rest = self._view[: self._fill]
        self._fill = 0
        return rest


def encrypt_stream(key: bytes, associated_data: bytes, chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Yield the header and ciphertext of ``chunks`` (plaintext), lazily."""
    encryptor = StreamEncryptor(key, associated_data)
    yield encryptor.header
    for chunk in chunks:
        out = encryptor.update(chunk)
        del chunk  # hold no more than one segment per stage
        if out:
            yield out
        del out
    yield encryptor.finalize()


def decrypt_stream(key: bytes, associated_data: bytes, chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Yield verified plaintext of ``chunks`` (ciphertext); raises :class:`IntegrityError`.

    Plaintext already yielded was verified, but the stream as a whole is authentic only
    once the generator finishes without error: write to a temporary file and commit then.
    """
    decryptor = StreamDecryptor(key, associated_data)
    for chunk in chunks:
        out = decryptor.update(chunk)
        del chunk  # hold no more than one segment per stage
        if out:
            yield out
        del out
    out = decryptor.finalize()
    if out:
        yield out


def ciphertext_size(plaintext_size: int) -> int:
    """Size of the encrypted stream of ``plaintext_size`` bytes, header included."""
    if plaintext_size < 0:
        raise InvalidInput("a plaintext size cannot be negative")
    segments = max(1, -(-plaintext_size // SEGMENT_SIZE))
    return HEADER_SIZE + plaintext_size + segments * TAG_SIZE


# --------------------------------------------------------------------------- keys


def new_data_key() -> bytes:
    """A fresh random 32-byte data key (one per package)."""
    return os.urandom(KEY_SIZE)


def _field(value: str) -> bytes:
    raw = value.encode("utf-8")
    return len(raw).to_bytes(4, "big") + raw


def item_associated_data(package_id: str, item_id: int | str) -> bytes:
    """Associated data binding a blob to its package and item (length-prefixed fields).

    An int item id and its decimal string name the same item (``5`` and ``"5"``).
    """
    return _ITEM_AD_TAG + _field(str(package_id)) + _field(str(item_id))


def derive_item_key(package_key: bytes, package_id: str, item_id: int | str) -> bytes:
    """The 32-byte key of one item: HKDF-SHA256 of the package key, bound to both ids."""
    _check_key(package_key)
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_SIZE,
        salt=None,
        info=_ITEM_KEY_INFO + item_associated_data(package_id, item_id),
    )
    return hkdf.derive(bytes(package_key))


def seal_value(key: bytes, data: bytes, associated_data: bytes = b"") -> bytes:
    """Encrypt a small value (a PHI column, an audit field): nonce (12) || ciphertext+tag."""
    _check_key(key)
    nonce = os.urandom(_NONCE_SIZE)
    return nonce + AESGCM(bytes(key)).encrypt(nonce, data, associated_data)


def open_value(key: bytes, blob: bytes, associated_data: bytes = b"") -> bytes:
    """Decrypt a value from :func:`seal_value`; raises :class:`IntegrityError` on failure."""
    _check_key(key)
    if len(blob) < _NONCE_SIZE + TAG_SIZE:
        raise IntegrityError("an encrypted value is truncated; the stored copy is damaged")
    try:
        return AESGCM(bytes(key)).decrypt(
            bytes(blob[:_NONCE_SIZE]), bytes(blob[_NONCE_SIZE:]), associated_data
        )
    except InvalidTag:
        raise IntegrityError(
            "an encrypted value failed authentication: it was altered, moved from another "
            "record, or the key is wrong (was a key file replaced?)"
        ) from None


# --------------------------------------------------------------------------- key wrapping


@runtime_checkable
class KeyWrapper(Protocol):
    """Protects package data keys; a KMS, an HSM or the recipient's key may stand in."""

    def wrap(self, key: bytes, context: bytes) -> bytes:
        """Encrypt ``key`` bound to ``context`` (e.g. the package id)."""
        ...

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        """Recover a key wrapped for the same ``context``; raise IntegrityError otherwise."""
        ...


class KeyFileWrapper:
    """Wraps data keys with AES-256-GCM under a key-encryption key kept in a 0600 file.

    The key file is read on first use, so building the wrapper never touches the disk.

    :param path: the key-encryption key file (``<home>/keys/kek.key``).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._kek: bytes | None = None

    def _key(self) -> bytes:
        if self._kek is None:
            self._kek = load_key_file(self.path)
        return self._kek

    def wrap(self, key: bytes, context: bytes) -> bytes:
        """Encrypt ``key`` with the KEK; ``context`` is authenticated, not stored."""
        return seal_value(self._key(), key, _WRAP_AD_TAG + context)

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        """Decrypt a wrapped key; :class:`IntegrityError` if the context or KEK differ."""
        try:
            return open_value(self._key(), wrapped, _WRAP_AD_TAG + context)
        except IntegrityError:
            raise IntegrityError(
                "a wrapped data key does not open with the hub's key-encryption key: "
                "the key file was replaced, or the wrapped key was moved from another package. "
                "Restore the original key file from backup."
            ) from None


@hookimpl(trylast=True)
def emix_key_wrapper(home: str) -> KeyWrapper:
    """Default key provider: the hub's key-encryption key file ``<home>/keys/kek.key``."""
    return KeyFileWrapper(Path(home) / "keys" / "kek.key")


@hookimpl(trylast=True)
def emix_audit_signing_key(home: str) -> SigningKey:
    """Default checkpoint signer: the key file ``[hub] audit_signing_key``, else
    ``<home>/keys/hub-signing.key`` (created on first use)."""
    from emix_core.config import load_config

    config = load_config(home)
    path = config.keys_dir / "hub-signing.key"
    if config.hub.audit_signing_key:
        path = Path(config.hub.audit_signing_key).expanduser()
    return SigningKey.load_or_create(path)


def check_signer(signer: Any) -> None:
    """Sign a probe with a provided signer and verify it with its public key.

    :raises ConfigError: the signer lacks a method, or its signature does not verify.
    """
    probe = b"emix audit signer probe " + os.urandom(16)
    try:
        public_key = signer.public_key_b64
        verify_signature(public_key, probe, signer.sign(probe))
        if signer.fingerprint != fingerprint_of(public_key):
            raise IntegrityError("fingerprint mismatch")
    except (AttributeError, TypeError, ValueError, IntegrityError, InvalidInput) as exc:
        raise ConfigError(
            "the audit checkpoint signer provided by a plugin does not sign verifiably "
            f"({type(exc).__name__}); check its key provider configuration"
        ) from None


def _ensure_private_dir(directory: Path) -> None:
    if not directory.exists():
        directory.mkdir(parents=True, mode=_DIR_MODE)
        os.chmod(directory, _DIR_MODE)  # mkdir's mode is filtered by the umask


def _write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, mode 0600; never replace an existing file."""
    path = Path(path)
    _ensure_private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
    try:
        try:
            os.fchmod(fd, _FILE_MODE)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        # link() fails if the target exists: atomic create without overwrite.
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _check_private_mode(path: Path) -> None:
    if os.name == "nt":
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"key file {path} has mode {mode:04o}, so other users can read it; run "
            f"`chmod 600 {path}` and consider the key exposed if others could log in here"
        )


def create_key_file(path: Path) -> None:
    """Create a key file of 32 random bytes (mode 0600, parent folder 0700).

    :raises ConfigError: the file already exists (it is never overwritten).
    """
    path = Path(path)
    try:
        _write_private_file(path, os.urandom(KEY_SIZE))
    except FileExistsError:
        raise ConfigError(
            f"key file {path} already exists; refusing to overwrite it, because everything "
            "it protects would become unreadable. Move it away first if you really mean to."
        ) from None


def load_key_file(path: Path) -> bytes:
    """Read a 32-byte key file, refusing one that is missing or readable by others.

    :raises ConfigError: with the command that fixes it.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"key file {path} is missing; run `emix hub init` for a new home, or restore the "
            "file from backup (without it, the data it protects cannot be decrypted)"
        )
    _check_private_mode(path)
    key = path.read_bytes()
    if len(key) != KEY_SIZE:
        raise ConfigError(
            f"key file {path} holds {len(key)} bytes instead of {KEY_SIZE}; it is damaged, "
            "restore it from backup"
        )
    return key


# --------------------------------------------------------------------------- signatures


def _decode_public_key(public_key_b64: str) -> bytes:
    try:
        raw = base64.b64decode(public_key_b64, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raw = b""
    if len(raw) != 32:
        raise InvalidInput("a public key must be 32 bytes of Ed25519 key, base64 encoded")
    return raw


def _fingerprint(raw_public_key: bytes) -> str:
    digest = hashlib.sha256(raw_public_key).hexdigest()[:32]
    return ":".join(digest[i : i + 4] for i in range(0, 32, 4))


def fingerprint_of(public_key_b64: str) -> str:
    """Readable, stable fingerprint of a base64 Ed25519 public key.

    The first 128 bits of SHA-256 over the raw key, as 8 groups of 4 hex digits
    (``1a2b:3c4d:...``). :raises InvalidInput: the key is malformed.
    """
    return _fingerprint(_decode_public_key(public_key_b64))


class SigningKey:
    """An Ed25519 signing key (a facility's or the hub's), kept in a PEM PKCS8 file."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        self._public_raw = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def generate(cls) -> SigningKey:
        """A new random key, not saved anywhere."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> SigningKey:
        """Load the key at ``path``, or create it there (mode 0600, atomically).

        :raises ConfigError: the file is readable by others or is not an Ed25519 key.
        """
        path = Path(path)
        if not path.exists():
            key = cls.generate()
            pem = key._private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            try:
                _write_private_file(path, pem)
                return key
            except FileExistsError:
                pass  # created concurrently by another process: use that one
        _check_private_mode(path)
        try:
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except ValueError:
            private = None
        if not isinstance(private, Ed25519PrivateKey):
            raise ConfigError(
                f"signing key file {path} is not an Ed25519 PEM key; restore it from backup"
            )
        return cls(private)

    @property
    def public_key_b64(self) -> str:
        """The raw 32-byte public key, base64."""
        return base64.b64encode(self._public_raw).decode("ascii")

    @property
    def fingerprint(self) -> str:
        """See :func:`fingerprint_of`."""
        return _fingerprint(self._public_raw)

    def sign(self, data: bytes) -> str:
        """Ed25519 signature of ``data``, base64."""
        return base64.b64encode(self._private.sign(data)).decode("ascii")


def verify_signature(public_key_b64: str, data: bytes, signature_b64: str) -> None:
    """Check an Ed25519 signature; :class:`IntegrityError` unless it is valid."""
    try:
        public = Ed25519PublicKey.from_public_bytes(_decode_public_key(public_key_b64))
        signature = base64.b64decode(signature_b64, validate=True)
        public.verify(signature, data)
    except (InvalidInput, InvalidSignature, binascii.Error, TypeError, ValueError):
        raise IntegrityError(
            "signature does not verify: the data was altered, or it was signed by another "
            "key than the one registered for its sender"
        ) from None


def canonical_json(obj: Any) -> bytes:
    """Stable JSON bytes for signing: sorted keys, compact, UTF-8, no NaN."""
    try:
        text = json.dumps(
            obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"document cannot be signed as JSON: {exc}") from exc
    return text.encode("utf-8")


def sign_document(key: SigningKey, document: dict[str, Any]) -> dict[str, Any]:
    """Sign a JSON document (manifest, receipt, checkpoint).

    :return: ``{"document", "signature", "key_fingerprint"}``; the signature covers
        a fixed context string followed by :func:`canonical_json` of the document.
    """
    signature = key.sign(_DOCUMENT_CONTEXT + canonical_json(document))
    return {"document": document, "signature": signature, "key_fingerprint": key.fingerprint}


def verify_document(signed: dict[str, Any], public_key_b64: str) -> dict[str, Any]:
    """Verify a document from :func:`sign_document` against the sender's public key.

    :return: the document.
    :raises IntegrityError: malformed, tampered, or signed by another key.
    """
    if not isinstance(signed, dict) or not isinstance(signed.get("document"), dict):
        raise IntegrityError("signed document is malformed: no document in it")
    if not public_key_b64:
        raise IntegrityError("the sender has no registered signing key; nothing can be verified")
    try:
        expected = fingerprint_of(public_key_b64)
    except InvalidInput:
        raise IntegrityError("the sender's registered signing key is malformed") from None
    if signed.get("key_fingerprint") != expected:
        raise IntegrityError(
            f"document was signed by key {signed.get('key_fingerprint')!s:.39}, not by the "
            f"sender's registered key {expected}; refuse it and ask the sender"
        )
    document = signed["document"]
    verify_signature(
        public_key_b64, _DOCUMENT_CONTEXT + canonical_json(document), signed.get("signature", "")
    )
    return document


# --------------------------------------------------------------------------- hashing


def sha256_file(path: Path, chunk: int = 1024 * 1024) -> str:
    """Hex SHA-256 of a file, read in ``chunk``-byte pieces."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk)
    with open_regular(path, buffering=0) as fh, memoryview(buffer) as view:
        raw: Any = fh  # unbuffered: a FileIO, which reads into the buffer
        while n := raw.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()

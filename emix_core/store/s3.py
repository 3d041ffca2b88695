"""S3 blob store (``s3://BUCKET/PREFIX``): Ceph RADOS Gateway, MinIO, AWS and the like.

Only ciphertext ever reaches it, and it reaches it streaming: a writer buffers one part
(8 MiB by default) in memory and sends it as a part of a multipart upload, so nothing
is written to a local disk and memory stays flat whatever the item's size. An upload
becomes visible only when :meth:`_S3Writer.commit` completes it; an aborted or crashed
upload leaves no object (an aborted multipart upload is removed, a crashed one is
collected by the bucket's lifecycle rule for incomplete uploads, see docs/scale.md).

Credentials and endpoint come from the variables boto3 reads: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` (for anything but AWS itself),
``AWS_CA_BUNDLE`` (a private CA), ``AWS_DEFAULT_REGION``. Requests are signed SigV4.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from emix_core.errors import ConfigError, NotFoundError, StorageUnavailable
from emix_core.store.blobs import CHUNK, check_key

#: Multipart part size; S3 needs at least 5 MiB for every part but the last.
PART_SIZE = 8 * 1024 * 1024


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://BUCKET/PREFIX`` -> ``(bucket, "PREFIX/")`` (prefix may be empty)."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ConfigError("the S3 blob store URL must look like s3://BUCKET/PREFIX")
    prefix = parts.path.strip("/")
    return parts.netloc, f"{prefix}/" if prefix else ""


def _client() -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ConfigError("the S3 blob store needs boto3: pip install 'emix-core[scale]'") from exc
    # a session of its own: credentials are read from the environment now, not cached
    # process-wide by boto3's default session
    return boto3.session.Session().client(
        "s3",
        region_name=os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 5, "mode": "standard"},
            max_pool_connections=32,
            connect_timeout=10,
            read_timeout=120,
        ),
    )


def _unavailable(exc: Exception) -> StorageUnavailable:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)
    return StorageUnavailable(
        f"the S3 object store refused or did not answer ({code}); check AWS_ENDPOINT_URL, "
        "the credentials and that the bucket exists"
    )


class _S3Writer:
    """A multipart upload of one blob; parts are sent as they fill."""

    def __init__(self, store: S3BlobStore, key: str, part_size: int) -> None:
        self.store = store
        self.key = key
        self.part_size = part_size
        self.buffer = bytearray()
        self.parts: list[dict[str, Any]] = []
        self.upload_id: str | None = None

    def write(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= self.part_size:
            self._send(bytes(self.buffer[: self.part_size]))
            del self.buffer[: self.part_size]

    def _send(self, body: bytes) -> None:
        s3, bucket = self.store.client, self.store.bucket
        try:
            if self.upload_id is None:
                self.upload_id = s3.create_multipart_upload(Bucket=bucket, Key=self.key)["UploadId"]
            number = len(self.parts) + 1
            etag = s3.upload_part(
                Bucket=bucket, Key=self.key, UploadId=self.upload_id, PartNumber=number, Body=body
            )["ETag"]
        except Exception as exc:
            raise _unavailable(exc) from exc
        self.parts.append({"PartNumber": number, "ETag": etag})

    def sync(self) -> None:
        """Nothing to do: the object store makes an object durable when it completes."""

    def commit(self) -> None:
        """Make the blob visible (the last part sent, the upload completed)."""
        s3, bucket = self.store.client, self.store.bucket
        try:
            if self.upload_id is None:  # small blob: one plain PUT
                s3.put_object(Bucket=bucket, Key=self.key, Body=bytes(self.buffer))
            else:
                if self.buffer:
                    self._send(bytes(self.buffer))
                s3.complete_multipart_upload(
                    Bucket=bucket,
                    Key=self.key,
                    UploadId=self.upload_id,
                    MultipartUpload={"Parts": self.parts},
                )
        except StorageUnavailable:
            raise
        except Exception as exc:
            raise _unavailable(exc) from exc
        self.buffer = bytearray()

    def abort(self) -> None:
        self.buffer = bytearray()
        if self.upload_id is not None:
            # on failure, the bucket's lifecycle rule collects the parts later
            with contextlib.suppress(Exception):
                self.store.client.abort_multipart_upload(
                    Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id
                )
            self.upload_id = None


class S3BlobStore:
    """Blobs as objects under ``s3://BUCKET/PREFIX/<package-id>/<item-id>``."""

    def __init__(self, url: str, client: Any | None = None, part_size: int = PART_SIZE) -> None:
        self.url = url
        self.bucket, self.prefix = parse_s3_url(url)
        self.client = client or _client()
        self.part_size = max(part_size, 5 * 1024 * 1024)

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def writer(self, key: str) -> _S3Writer:
        return _S3Writer(self, self._key(key), self.part_size)

    def read(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """Stream a blob with ranged GETs of a few MiB, so a long read survives a
        dropped connection and no response is held whole."""
        name = self._key(key)
        total = self._head(name)
        step = max(chunk_size, 4 * 1024 * 1024)
        offset = 0
        while offset < total:
            end = min(offset + step, total) - 1
            try:
                body = self.client.get_object(
                    Bucket=self.bucket, Key=name, Range=f"bytes={offset}-{end}"
                )["Body"]
                for chunk in body.iter_chunks(chunk_size):
                    offset += len(chunk)
                    yield chunk
            except Exception as exc:
                raise _unavailable(exc) from exc

    def read_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes of a blob from ``start`` (one ranged GET)."""
        if length <= 0:
            return b""
        response = self.client.get_object(
            Bucket=self.bucket, Key=self._key(key), Range=f"bytes={start}-{start + length - 1}"
        )
        return response["Body"].read()

    def _head(self, name: str) -> int:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=name)["ContentLength"])
        except Exception as exc:
            status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404:
                raise NotFoundError("stored item is missing from the blob store") from exc
            raise _unavailable(exc) from exc

    def size(self, key: str) -> int:
        return self._head(self._key(key))

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except NotFoundError:
            return False
        return True

    def sync(self, prefix: str) -> None:
        """Nothing to do: a completed upload is durable (the cluster acknowledged it)."""

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``<prefix>/`` (a package's blobs), in batches of 1000."""
        folder = self._key(prefix) + "/"
        count = 0
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=folder
            )
            for page in pages:
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    self.client.delete_objects(
                        Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True}
                    )
                    count += len(keys)
            self._abort_uploads(folder)
        except Exception as exc:
            raise _unavailable(exc) from exc
        return count

    def _abort_uploads(self, folder: str) -> None:
        """Drop unfinished multipart uploads under a folder (a crashed instance's)."""
        listing = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=folder)
        for upload in listing.get("Uploads", []):
            self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
            )

    def check(self) -> None:
        """Readiness: the bucket answers with these credentials."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise _unavailable(exc) from exc


def open_s3_store(url: str, _home: Path) -> S3BlobStore:
    return S3BlobStore(url)

"""The package zip: stored entries, exact size up front, Zip64 beyond 65,535 entries."""

from __future__ import annotations

import hashlib
import io
import struct
import zipfile

from emix_core.content.archive import MANIFEST_NAME, package_zip


def _manifest(contents: list[bytes]) -> dict:
    items = [
        {
            "id": i,
            "name": f"note-{i}.txt",
            "media_type": "text/plain",
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        for i, data in enumerate(contents, start=1)
    ]
    return {
        "document": {"format": "emix-manifest/1", "package": "p" * 32, "items": items},
        "signature": "x",
        "key_fingerprint": "y",
    }


def test_zip_with_more_than_65535_entries_uses_zip64_and_opens():
    contents = [f"report {i}\n".encode() for i in range(66_000)]
    archive = package_zip(_manifest(contents), lambda item: [contents[item.id - 1]])
    expected_size = len(archive)
    data = b"".join(archive)
    assert len(data) == expected_size
    # the Zip64 end-of-central-directory record is present
    assert struct.pack("<I", 0x06064B50) in data[-200:]
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
        assert len(infos) == 66_001
        assert infos[0].filename == MANIFEST_NAME
        assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
        assert zf.read(infos[-1]) == contents[-1]
        assert infos[-1].filename.startswith("documents/66000-")


def test_items_are_read_lazily_one_at_a_time():
    opened: list[int] = []
    contents = [b"a" * 10, b"b" * 20, b"c" * 30]

    def open_item(item):
        opened.append(item.id)
        yield contents[item.id - 1]

    archive = package_zip(_manifest(contents), open_item)
    assert opened == []  # building the archive reads nothing
    stream = iter(archive)
    next(stream)
    assert len(opened) <= 1
    b"".join(stream)
    assert opened == [1, 2, 3]

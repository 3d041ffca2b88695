"""A small in-process cache of instance metadata (DICOM JSON), bounded in bytes and time.

A viewer asks for a series' metadata each time a study is opened, and building it means
decrypting and parsing every instance's header. The answer for one stored instance never
changes (packages are immutable once sealed), so the JSON of recently read instances is
kept in memory (never on disk) for a few minutes. Access is still checked on every
request before the cache is consulted; entries expire, so nothing lingers long after a
package is purged.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

__all__ = ["MetadataCache", "metadata_cache"]


class MetadataCache:
    """Least recently used, at most ``max_bytes`` of values, each kept ``ttl`` seconds.

    :param max_bytes: total size of the cached values.
    :param ttl: seconds an entry stays valid.
    """

    def __init__(self, max_bytes: int = 16 * 1024 * 1024, ttl: float = 600) -> None:
        self.max_bytes, self.ttl = max_bytes, ttl
        self._entries: OrderedDict[tuple[str, ...], tuple[float, bytes]] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[str, ...]) -> bytes | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            stored, value = entry
            if time.monotonic() - stored > self.ttl:
                self._drop(key)
                return None
            self._entries.move_to_end(key)
            return value

    def put(self, key: tuple[str, ...], value: bytes) -> None:
        if len(value) > self.max_bytes // 16:
            return
        with self._lock:
            if key in self._entries:
                self._drop(key)
            self._entries[key] = (time.monotonic(), value)
            self._size += len(value)
            while self._size > self.max_bytes:
                self._drop(next(iter(self._entries)))

    def _drop(self, key: tuple[str, ...]) -> None:
        _, value = self._entries.pop(key)
        self._size -= len(value)

    def __len__(self) -> int:
        return len(self._entries)


#: The hub process's cache.
metadata_cache = MetadataCache()

"""Opening outside files without following links: what emix reads is what was checked.

A drop folder, an inbox or a CD folder may be writable by others. Between the moment a
file is checked (``lstat``) and the moment it is read, someone could swap it for a
symbolic link to ``/etc/shadow`` or to another facility's folder; ``O_NOFOLLOW`` makes
the open itself refuse the link, and ``fstat`` on the opened descriptor says what was
really opened.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

from emix_core.errors import UnsafePathError

__all__ = ["open_regular"]

_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def open_regular(path: str | os.PathLike[str], buffering: int = -1) -> BinaryIO:
    """Open a regular file for reading; refuse a symbolic link, a device or a pipe.

    :raises UnsafePathError: the last component is a link, or not a regular file (the
        message names no file: names can carry PHI).
    :raises OSError: any other reason the file cannot be opened.
    """
    try:
        # O_NONBLOCK: opening a planted FIFO must not hang the reader
        fd = os.open(Path(path), _FLAGS | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(
                "a symbolic link where a file was expected; emix never follows links "
                "(copy the file itself)"
            ) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePathError("not a regular file (a device, pipe or folder); not read")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise

"""The inbox folder destination: each arrived package appears at once, complete.

A package lands in ``<inbox>/<sender-address>/<package-id>/`` with the received layout
(``DICOM/<study>/<series>/<instance>.dcm``, ``documents/…``, ``emix-manifest.json``). It
is assembled in a hidden ``.<package-id>.partial-*`` folder and renamed into place, so an
importer watching the inbox never sees half a package; an existing package folder is
never overwritten (after a crash, finding it means it was delivered).
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emix_core import (
    PACKAGE_ID_RE,
    EmixError,
    Package,
    UnsafePathError,
    is_valid_address,
    log_event,
)
from emix_folder_watch.files import fsync_dir, quarantine, real_folder
from emix_folder_watch.settings import inbox_settings, require_folder

if TYPE_CHECKING:
    from emix_core import Gateway

log = logging.getLogger("emix.folder_watch")

PLANTED_REASON = (
    "a symbolic link or file was found where emix delivers a package; emix never follows "
    "links in the inbox and put it aside. Check who can write into the inbox folder."
)

#: Errors of ``os.link`` that mean "cannot link here": copy instead.
NO_LINK = frozenset({errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK, errno.EACCES})


class FolderDestination:
    """Writes arrived packages into an inbox folder (``[[destinations]] kind = "folder"``)."""

    kind = "folder"

    def __init__(self, raw: dict[str, Any], gateway: Gateway) -> None:
        self.settings = inbox_settings(raw, gateway)
        self.name = self.settings.name
        self.root = self.settings.path
        require_folder(self.root, self.settings.create, f"[[destinations]] {self.name!r}", gateway)

    def deliver(self, package: Package, path: Path) -> dict[str, Any]:
        """Place the package at ``<inbox>/<sender>/<package-id>/`` (atomically, once)."""
        if not is_valid_address(package.sender) or not PACKAGE_ID_RE.match(package.id):
            raise UnsafePathError("the package's sender or id cannot be used as a folder name")
        folder = self.root / package.sender
        final = folder / package.id
        try:
            folder, planted = real_folder(self.root, package.sender)
            if _is_real_folder(final):
                return {"path": str(final), "already_delivered": True}
            if os.path.lexists(final):  # a link planted under the package's name
                planted.append(quarantine(final, PLANTED_REASON))
            for _ in planted:
                log_event(log, "inbox.link_quarantined", logging.WARNING, destination=self.name)
            for leftover in folder.glob(f".{package.id}.partial-*"):
                shutil.rmtree(leftover, ignore_errors=True)
            staging = folder / f".{package.id}.partial-{secrets.token_hex(4)}"
            staging.mkdir(mode=0o750)
            try:
                files = self._fill(path, staging)
                if os.path.lexists(final):  # never overwrite, even a folder made meanwhile
                    raise FileExistsError(errno.EEXIST, "exists", str(final))
                os.rename(staging, final)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            fsync_dir(folder)
        except FileExistsError:
            return {"path": str(final), "already_delivered": True}
        except OSError as exc:
            raise EmixError(
                f"cannot write into the inbox folder {folder} ({exc.strerror}); check that it "
                "exists, is writable by the gateway and has free space"
            ) from exc
        return {"path": str(final), "files": files}

    def _fill(self, source: Path, staging: Path) -> int:
        """Link (or copy) every file of the received package into ``staging``."""
        count = 0
        for directory, subdirs, names in os.walk(source):
            subdirs.sort()
            relative = Path(directory).relative_to(source)
            target_dir = staging / relative
            target_dir.mkdir(parents=True, exist_ok=True)
            for name in sorted(names):
                self._place(Path(directory) / name, target_dir / name)
                count += 1
            fsync_dir(target_dir)
        return count

    def _place(self, source: Path, target: Path) -> None:
        if self.settings.mode == "link":
            try:
                os.link(source, target, follow_symlinks=False)
                return
            except OSError as exc:
                if exc.errno not in NO_LINK:
                    raise
        shutil.copyfile(source, target, follow_symlinks=False)
        with open(target, "rb") as handle:
            os.fsync(handle.fileno())


def _is_real_folder(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False

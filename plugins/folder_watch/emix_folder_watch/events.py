"""watchdog events → a nudge for the drop folder's worker (which then looks for itself)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from watchdog.events import FileSystemEvent, FileSystemEventHandler

from emix_folder_watch.files import is_in_progress

if TYPE_CHECKING:
    from emix_folder_watch.outbox import FolderSource

#: Events caused by reading files (emix's own reads included): nothing changed.
READ_ONLY_EVENTS = frozenset({"opened", "closed_no_write"})


class Wakeup(FileSystemEventHandler):
    """Pass each changed path to the source; note files renamed from a temporary name
    (``x.part`` → ``x``, ``.x`` → ``x``): they are complete at once."""

    def __init__(self, source: FolderSource) -> None:
        self.source = source

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in READ_ONLY_EVENTS:
            return
        source_path = _text(event.src_path)
        destination = _text(getattr(event, "dest_path", "") or "")
        if destination:
            finished = is_in_progress(Path(source_path).name) and not is_in_progress(
                Path(destination).name
            )
            self.source.notice(destination, renamed_from_temporary=finished)
        self.source.notice(source_path)


def _text(path: str | bytes) -> str:
    return path.decode(errors="surrogateescape") if isinstance(path, bytes) else path

"""Storing an imported medium into a PACS, through the DICOMweb adapter (STOW-RS).

The ``emix-dicomweb`` plugin already speaks STOW-RS the careful way (batches streamed
from disk, per-instance outcomes, retries, a QIDO-RS check that every instance is
listed afterwards); the import uses its public store API rather than a second client.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emix_core import ConfigError

if TYPE_CHECKING:
    from emix_cd_import.catalog import Instance

__all__ = ["pacs_settings", "store_into_pacs"]


def _adapter() -> Any:
    try:
        import emix_dicomweb.connection as connection
        import emix_dicomweb.store as store
    except ImportError as exc:  # pragma: no cover - a dependency of this distribution
        raise ConfigError(
            "storing into a PACS needs the DICOMweb adapter: pip install emix-dicomweb"
        ) from exc
    return connection, store


def pacs_settings(url: str, **more: Any) -> Any:
    """The DICOMweb adapter's settings for a PACS base URL."""
    connection, _ = _adapter()
    return connection.PacsSettings(url=url, **more)


def store_into_pacs(
    settings: Any,
    staged: list[tuple[Instance, Path]],
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Any:
    """STOW-RS the staged instances; the adapter's report says per instance."""
    connection, store = _adapter()
    conn = connection.PacsConnection(settings)
    instances = [
        store.InstanceToStore(path=path, sop_instance_uid=i.sop_instance_uid, study_uid=i.study_uid)
        for i, path in staged
    ]
    return store.store_instances(conn, instances, store.StoreSettings(), progress=progress)

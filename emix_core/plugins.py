"""The plugin manager factory. Nothing is loaded at import time.

Built-in behaviour is itself a set of plugins registered with ``trylast=True`` hook
implementations, so any installed plugin (entry-point group ``emix``) answers first.
``EMIX_DISABLED_PLUGINS`` (comma separated plugin names) blocks plugins, built-in or not.
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points
from typing import Any

import pluggy

from emix_core import hookspecs
from emix_core.errors import ConfigError

PROJECT = "emix"
ENTRY_POINT_GROUP = "emix"

#: Public marker for hook implementations: ``@hookimpl def emix_notify(...)``.
hookimpl = pluggy.HookimplMarker(PROJECT)

#: Built-in plugins: (name, module). Each module implements hooks at module level.
BUILTIN_PLUGINS: tuple[tuple[str, str], ...] = (
    ("emix.tokens", "emix_core.hub.auth"),
    ("emix.smtp", "emix_core.hub.notify"),
    ("emix.filesystem-store", "emix_core.store.blobs"),
    ("emix.keyfile", "emix_core.crypto"),
    ("emix.reports", "emix_core.reports.builtin"),
)

__all__ = ["hookimpl", "get_plugin_manager", "plugin_info", "disabled_plugins"]


def disabled_plugins() -> set[str]:
    """Plugin names listed in ``EMIX_DISABLED_PLUGINS``."""
    raw = os.environ.get("EMIX_DISABLED_PLUGINS", "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def get_plugin_manager(*, load_entry_points: bool = True) -> pluggy.PluginManager:
    """Build a fresh plugin manager: specs, blocked names, built-ins, then entry points.

    :param load_entry_points: also load third-party plugins of group ``emix``.
    :raises ConfigError: a plugin failed to import, or implements a hook that does
        not exist (the message names the plugin).
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in disabled_plugins():
        pm.set_blocked(name)
    for name, module_name in BUILTIN_PLUGINS:
        if pm.is_blocked(name):
            continue
        pm.register(importlib.import_module(module_name), name=name)
    if load_entry_points:
        _load_entry_points(pm)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise ConfigError(f"plugin {exc.plugin!r} implements an unknown hook: {exc}") from exc
    return pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if pm.is_blocked(ep.name) or pm.has_plugin(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # any import failure must name the plugin
            raise ConfigError(
                f"plugin {ep.name!r} ({ep.value}) failed to import: "
                f"{type(exc).__name__}: {exc}. Fix or uninstall it, or set "
                f"EMIX_DISABLED_PLUGINS={ep.name} to skip it."
            ) from exc
        try:
            pm.register(plugin, name=ep.name)
        except pluggy.PluginValidationError as exc:
            raise ConfigError(f"plugin {ep.name!r} is invalid: {exc}") from exc
        dist = getattr(ep, "dist", None)
        if dist is not None:
            pm._emix_versions = getattr(pm, "_emix_versions", {})  # type: ignore[attr-defined]
            pm._emix_versions[ep.name] = (dist.name, dist.version)  # type: ignore[attr-defined]


def plugin_info(pm: pluggy.PluginManager) -> list[dict[str, Any]]:
    """Describe every registered plugin: name, distribution, version, hooks."""
    from emix_core import __version__

    versions: dict[str, tuple[str, str]] = getattr(pm, "_emix_versions", {})
    rows = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda row: row[0]):
        if plugin is None:
            continue
        hooks = sorted(h.name for h in (pm.get_hookcallers(plugin) or []))
        dist, version = versions.get(name, ("emix-core", __version__))
        rows.append(
            {
                "name": name,
                "distribution": dist,
                "version": version,
                "hooks": hooks,
                "builtin": name.startswith("emix."),
            }
        )
    return rows

"""The plugin manager factory and :class:`Hooks`, the one place emix calls its hooks.

Built-in behaviour is itself a set of plugins registered with ``trylast=True`` hook
implementations, so any installed plugin (entry-point group ``emix``) answers first.
``EMIX_DISABLED_PLUGINS`` (comma separated plugin names) blocks plugins, built-in or not.

Every hook is called through :class:`Hooks`, with a policy per kind of hook (as
pynetdicom separates notification and intervention events):

* **notifications** (``package_sealed``, ``package_received``, ``audit_event``): every
  implementation runs; one that raises is logged with its plugin's name and the
  operation goes on.
* **interventions** (``before_send``, ``authorize``, ``authenticate``): the answer
  decides; an exception propagates and stops the operation.
* **answers** (``render_report``, ``parse_report``, ``key_wrapper``, ``notify``): the
  first useful answer wins.
* **registrations** (``register_*``): collect what plugins provide; a plugin that
  raises is a configuration error that names it.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import warnings
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import pluggy

from emix_core import hookspecs
from emix_core.errors import ConfigError

if TYPE_CHECKING:
    import click

    from emix_core.model import AuditEvent, Package, Principal, Recipient
    from emix_core.reports.model import Report

log = logging.getLogger("emix.plugins")

PluginManager = pluggy.PluginManager

PROJECT = "emix"
ENTRY_POINT_GROUP = "emix"

#: Public marker for hook implementations: ``@hookimpl def emix_notify(...)``.
hookimpl = pluggy.HookimplMarker(PROJECT)

#: Built-in plugins: (name, module). Each module implements hooks at module level.
BUILTIN_PLUGINS: tuple[tuple[str, str], ...] = (
    ("emix.tokens", "emix_core.hub.auth"),
    ("emix.sessions", "emix_core.hub.sessions"),
    ("emix.smtp", "emix_core.hub.notify"),
    ("emix.filesystem-store", "emix_core.store.blobs"),
    ("emix.keyfile", "emix_core.crypto"),
    ("emix.reports", "emix_core.reports.builtin"),
)

#: Names that used to be plugins and are now part of the core; disabling them is refused.
CORE_NAMES = frozenset({"emix.audit-recorder"})

__all__ = [
    "Hooks",
    "PluginManager",
    "default_plugin_manager",
    "disabled_plugins",
    "get_plugin_manager",
    "hookimpl",
    "hooks_for",
    "plugin_info",
]


def disabled_plugins() -> set[str]:
    """Plugin names listed in ``EMIX_DISABLED_PLUGINS``."""
    raw = os.environ.get("EMIX_DISABLED_PLUGINS", "")
    names = {name.strip() for name in raw.split(",") if name.strip()}
    for name in sorted(names & CORE_NAMES):
        warnings.warn(
            f"EMIX_DISABLED_PLUGINS names {name!r}: the hash-chained audit log is part of "
            "the core and cannot be disabled; it keeps recording",
            stacklevel=2,
        )
    return names - CORE_NAMES


def get_plugin_manager(
    *, load_entry_points: bool = True, load_builtins: bool = True
) -> pluggy.PluginManager:
    """Build a fresh plugin manager: specs, blocked names, built-ins, then entry points.

    :param load_entry_points: also load third-party plugins of group ``emix``.
    :param load_builtins: also register the built-in plugins (the command line leaves
        them out to list plugin commands: none of them adds one, and they import the hub).
    :raises ConfigError: a plugin failed to import, or implements a hook that does
        not exist (the message names the plugin).
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in disabled_plugins():
        pm.set_blocked(name)
    for name, module_name in BUILTIN_PLUGINS if load_builtins else ():
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


_process_pm: pluggy.PluginManager | None = None
_process_lock = threading.Lock()


def default_plugin_manager() -> pluggy.PluginManager:
    """The process's one plugin manager, made on first use (entry points loaded).

    Commands, homes and the hub share it; tests and embedders that want isolation pass
    their own manager from :func:`get_plugin_manager` instead.
    """
    global _process_pm
    with _process_lock:
        if _process_pm is None:
            _process_pm = get_plugin_manager()
        return _process_pm


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


def hooks_for(pm: pluggy.PluginManager) -> Hooks:
    """The :class:`Hooks` facade of a plugin manager (one per manager, made on first use)."""
    hooks = getattr(pm, "_emix_hooks", None)
    if hooks is None:
        hooks = Hooks(pm)
        pm._emix_hooks = hooks  # type: ignore[attr-defined]
    return hooks


class Hooks:
    """Typed calls to every hook, one method per hook, with the policy of its kind.

    :param pm: the plugin manager whose implementations are called.
    """

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm

    # ------------------------------------------------------------------ policies

    def _each(self, name: str, **kwargs: Any) -> list[str]:
        """Notification policy: call every implementation; return the plugins that failed."""
        caller = getattr(self.pm.hook, name)
        failed: list[str] = []
        # pluggy calls implementations last-registered first, tryfirst before trylast.
        for impl in reversed(caller.get_hookimpls()):
            try:
                impl.function(*[kwargs[arg] for arg in impl.argnames])
            except Exception as exc:  # a notification never stops the operation
                failed.append(impl.plugin_name)
                log.error(
                    "plugin %s failed in %s: %s: %s",
                    impl.plugin_name,
                    name,
                    type(exc).__name__,
                    exc,
                    exc_info=log.isEnabledFor(logging.DEBUG),
                )
        return failed

    def _register(self, name: str, register: Callable[..., None]) -> None:
        """Registration policy: a plugin that raises is a configuration error naming it."""
        caller = getattr(self.pm.hook, name)
        for impl in reversed(caller.get_hookimpls()):
            try:
                impl.function(*[{"register": register}.get(a) for a in impl.argnames])
            except ConfigError:
                raise
            except Exception as exc:
                raise ConfigError(
                    f"plugin {impl.plugin_name!r} failed in {name}: {type(exc).__name__}: {exc}"
                ) from exc

    # ------------------------------------------------------------------ exchange

    def register_sources(self, register: Callable[..., None]) -> None:
        """Collect gateway source kinds (``emix_register_sources``)."""
        self._register("emix_register_sources", register)

    def register_destinations(self, register: Callable[..., None]) -> None:
        """Collect gateway destination kinds (``emix_register_destinations``)."""
        self._register("emix_register_destinations", register)

    def package_sealed(self, package: Package) -> list[str]:
        """Notification: a package was sealed. Returns the names of plugins that failed."""
        return self._each("emix_package_sealed", package=package)

    def package_received(self, package: Package, path: str) -> list[str]:
        """Notification: a package was received and written to ``path``."""
        return self._each("emix_package_received", package=package, path=path)

    def render_report(self, report: Report, format: str) -> bytes | None:
        """Answer: the first plugin that renders ``report`` in ``format``."""
        result: bytes | None = self.pm.hook.emix_render_report(report=report, format=format)
        return result

    def pacs_push(self, content: Any, target: str) -> dict[str, Any] | None:
        """Answer: the first plugin that stores ``content`` into the PACS ``target``."""
        result: dict[str, Any] | None = self.pm.hook.emix_pacs_push(content=content, target=target)
        return result

    def parse_report(self, data: bytes, media_type: str) -> Report | None:
        """Answer: the first plugin that parses ``data``."""
        result: Report | None = self.pm.hook.emix_parse_report(data=data, media_type=media_type)
        return result

    def report_formats(self, register: Callable[..., None]) -> None:
        """Collect report formats (``emix_register_report_formats``)."""
        self._register("emix_register_report_formats", register)

    def notify(self, recipient: Recipient, email: str, package: Package, link: str) -> bool:
        """Answer: notify through the first plugin that delivers; a failing one is skipped.

        :return: ``True`` when some plugin sent the notice.
        """
        caller = self.pm.hook.emix_notify
        args = {"recipient": recipient, "email": email, "package": package, "link": link}
        for impl in reversed(caller.get_hookimpls()):
            try:
                if impl.function(*[args[a] for a in impl.argnames]):
                    return True
            except Exception as exc:
                log.error(
                    "plugin %s failed to notify: %s: %s", impl.plugin_name, type(exc).__name__, exc
                )
        return False

    def reconcile_patient(
        self, patient: dict[str, str], local_patient_id: str | None, source: str
    ) -> dict[str, str]:
        """Answer: the local identity for a foreign patient (``{}``: keep it as it is)."""
        result: dict[str, str] | None = self.pm.hook.emix_reconcile_patient(
            patient=patient, local_patient_id=local_patient_id, source=source
        )
        return dict(result or {})

    # ------------------------------------------------------------------ security

    def authenticate(self, request: Any) -> Principal | None:
        """Intervention: who is calling (``None``: nobody vouches for the caller)."""
        result: Principal | None = self.pm.hook.emix_authenticate(request=request)
        return result

    def authorize(self, principal: Principal, action: str, resource: Any) -> bool:
        """Intervention: deny by default; any ``False`` denies, one ``True`` is needed."""
        answers = self.pm.hook.emix_authorize(principal=principal, action=action, resource=resource)
        return bool(answers) and all(a is not False for a in answers) and any(answers)

    def before_send(self, package: Package) -> None:
        """Intervention: every plugin may raise :class:`~emix_core.errors.PolicyRejected`."""
        self.pm.hook.emix_before_send(package=package)

    def key_wrapper(self, home: str) -> Any | None:
        """Answer: the key provider that wraps package data keys."""
        return self.pm.hook.emix_key_wrapper(home=home)

    def audit_signing_key(self, home: str) -> Any | None:
        """Answer: the key provider that signs the hub's audit checkpoints."""
        return self.pm.hook.emix_audit_signing_key(home=home)

    # ------------------------------------------------------------------ audit

    def audit_event(self, event: AuditEvent, home: str | None = None) -> list[str]:
        """Notification to forwarders, *after* the core appended ``event`` to its chain."""
        return self._each("emix_audit_event", event=event, home=home)

    # ------------------------------------------------------------------ host

    def register_commands(self, cli: click.Group) -> None:
        """Let plugins add commands to the ``emix`` group."""
        caller = self.pm.hook.emix_register_commands
        for impl in reversed(caller.get_hookimpls()):
            try:
                impl.function(*[{"cli": cli}.get(a) for a in impl.argnames])
            except Exception as exc:
                raise ConfigError(
                    f"plugin {impl.plugin_name!r} failed to add its commands: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc

    def register_blueprints(self, register: Callable[..., None]) -> None:
        """Let plugins add HTTP endpoints to the hub."""
        self._register("emix_register_blueprints", register)

    def register_stores(self, register: Callable[..., None]) -> None:
        """Let plugins add blob store engines."""
        self._register("emix_register_stores", register)

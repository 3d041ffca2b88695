"""The gateway: the on-prem process that runs a facility's sources and destinations.

*Sources* (a drop folder, a PACS, a CD station) send studies out through the hub;
the gateway collects the packages that arrive for its facility and hands each one to
every *destination* (an inbox folder, a PACS, an EMR) exactly once, retrying a
failing destination with backoff. Both are plugins: a plugin registers kinds with
``emix_register_sources(register)`` / ``emix_register_destinations(register)`` and the
gateway builds one object per matching ``[[sources]]`` / ``[[destinations]]`` table of
``gateway.toml``. Every setting of ``[gateway]`` is documented in :data:`SETTINGS`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import random
import sqlite3
import threading
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import pluggy

from emix_core.client.home import LocalHome
from emix_core.client.hub import HubClient
from emix_core.errors import ConfigError
from emix_core.model import Package
from emix_core.plugins import hooks_for

if TYPE_CHECKING:
    from emix_core.client.sender import SendResult

__all__ = [
    "SETTINGS",
    "Destination",
    "DestinationFactory",
    "ProgressiveDestination",
    "Gateway",
    "GatewayHome",
    "Source",
    "SourceFactory",
    "find_config",
    "load_gateway",
    "log_event",
    "open_journal",
    "registered_kinds",
    "retry_delay",
]

log = logging.getLogger("emix.gateway")

#: Every setting of the ``[gateway]`` table, with its meaning.
SETTINGS: dict[str, str] = {
    "home": "the facility's home (signing key, pinned keys, audit log); relative to this file",
    "hub_url": "the hub; else EMIX_HUB_URL, else the home's [client] hub_url",
    "token": "the facility's API token; else EMIX_TOKEN, else the home's [client] token",
    "token_file": "a file holding the token (keeps the secret out of gateway.toml)",
    "tls_verify": "verify the hub's certificate: true, false or a CA bundle path",
    "state": "folder for the gateway's journals and spool; default <home>/gateway",
    "poll_seconds": "how often the inbox is checked for arrived packages (default 1)",
    "parallel": "parallel uploads and downloads (default: the home's [client] parallel)",
    "retry_max_seconds": "longest wait between two retries of a failing step (default 300)",
    "max_receive_attempts": "give a package up after this many failed receptions (default 10)",
    "deliver_received": "also deliver packages already received by someone else (default false)",
    "progressive": "send packages batch by batch with signed manifest parts, and let "
    "destinations that can (dicomweb) store each verified batch before the seal (default true)",
    "metrics_port": "serve Prometheus metrics on this port (default: none)",
    "metrics_host": "address of the metrics endpoint (default 127.0.0.1)",
}


# --------------------------------------------------------------------------- protocol


@runtime_checkable
class Source(Protocol):
    """Where studies come from. Built by a factory from one ``[[sources]]`` table."""

    name: str

    def start(self) -> None:
        """Begin watching or polling, in threads of its own."""

    def stop(self) -> None:
        """Stop and join those threads; safe to call twice."""

    def status(self) -> dict[str, Any]:
        """What is pending, sent and failed; readable while another process runs it."""


@runtime_checkable
class Destination(Protocol):
    """Where arrived packages go. Built by a factory from one ``[[destinations]]`` table."""

    name: str

    def deliver(self, package: Package, path: Path) -> dict[str, Any]:
        """Hand over one received, verified package.

        :param package: the package, with its manifest items and study summary.
        :param path: folder holding the package (layout of
            :func:`emix_core.content.layout.item_relative_path`, plus ``emix-manifest.json``).
        :return: a small JSON-able report.
        :raises EmixError: to be retried later with backoff. After a crash the same
            package may be handed over again: a destination must not duplicate it.
        """
        ...


@runtime_checkable
class ProgressiveDestination(Destination, Protocol):
    """A destination that can also take a package batch by batch, before its seal.

    The gateway calls :meth:`deliver_verified` with items whose signed manifest part and
    SHA-256 verified, while the sender still uploads; once the package is sealed and
    received whole, :meth:`Destination.deliver` is called as for any package and must
    not duplicate what was handed over before (a PACS store is idempotent by SOP
    Instance UID). A package that never seals is only ever handed over in part: the
    gateway audits that. ``progressive = false`` in the destination's table opts out.
    """

    progressive: bool

    def deliver_verified(self, package: Package, path: Path) -> None:
        """Store verified items early (``package.items``: only those; files under ``path``).

        May raise: the delivery of the whole package after the seal covers what failed.
        """
        ...


SourceFactory = Callable[[dict[str, Any], "Gateway"], Source]
DestinationFactory = Callable[[dict[str, Any], "Gateway"], Destination]


def registered_kinds(
    pm: pluggy.PluginManager,
) -> tuple[dict[str, SourceFactory], dict[str, DestinationFactory]]:
    """The source and destination kinds the loaded plugins provide.

    When two plugins register the same kind, the first one called wins: an installed
    plugin is called before the built-ins and so overrides them.
    """
    sources: dict[str, SourceFactory] = {}
    destinations: dict[str, DestinationFactory] = {}

    def into(table: dict[str, Any]) -> Callable[[str, Any], None]:
        def register(kind: str, factory: Any) -> None:
            if not isinstance(kind, str) or not callable(factory):
                raise ConfigError("register(kind, factory) needs a name and a callable")
            table.setdefault(kind, factory)

        return register

    hooks = hooks_for(pm)
    hooks.register_sources(into(sources))
    hooks.register_destinations(into(destinations))
    return sources, destinations


# --------------------------------------------------------------------------- helpers


def open_journal(path: Path) -> sqlite3.Connection:
    """A SQLite connection for a crash-safe journal (WAL, fsync on every commit).

    Each thread should open its own; readers (``emix gateway status``) never block
    the writer.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


class JournalConnections:
    """One connection per thread to a journal file (SQLite connections stay in their
    thread); the schema is created on first use."""

    def __init__(self, path: Path, schema: str) -> None:
        self.path = path
        self.schema = schema
        self._local = threading.local()

    def get(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = open_journal(self.path)
            conn.executescript(self.schema)
            self._local.conn = conn
        return conn


def retry_delay(attempts: int, cap: float = 300.0, base: float = 1.0) -> float:
    """Seconds to wait before retry number ``attempts`` (exponential, jittered, capped)."""
    delay = min(cap, base * 2 ** max(attempts - 1, 0))
    return delay * random.uniform(0.8, 1.0)


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log a structured event. Fields must hold no PHI: no names, UIDs, file names.

    Each event is also counted for Prometheus (``emix_gateway_events_total``), by its
    fixed name and level; a numeric ``bytes`` field adds to ``emix_gateway_bytes_total``.
    """
    logger.log(level, event, extra={"emix": fields})
    from emix_core.gateway import metrics

    metrics.count(event, level, fields)


class GatewayHome(LocalHome):
    """A facility home shared by the gateway's threads (audit and key pins serialised)."""

    def __init__(self, path: Path, pm: pluggy.PluginManager | None = None) -> None:
        super().__init__(path, pm)
        self._lock = threading.RLock()

    def audit(self, event: Any) -> None:
        with self._lock:
            super().audit(event)

    def pin(self, name: str, public_key_b64: str) -> str:
        with self._lock:
            return super().pin(name, public_key_b64)


class _RecordingClient:
    """A hub client that reports a new package's id as soon as the hub assigns it.

    The gateway journals that id before any item is uploaded, so that after a crash it
    can ask the hub whether the package got sealed instead of sending it twice.
    """

    def __init__(
        self,
        client: HubClient,
        on_created: Callable[[str], None] | None,
        on_sealing: Callable[[str], None] | None,
    ) -> None:
        self._client = client
        self._on_created = on_created
        self._on_sealing = on_sealing

    def create_package(self, to: list[str], *, expires_days: int | None = None) -> str:
        package_id = self._client.create_package(to, expires_days=expires_days)
        if self._on_created is not None:
            self._on_created(package_id)
        return package_id

    def open_package(self, to: list[str], *, expires_days: int | None = None) -> dict[str, Any]:
        answer = self._client.open_package(to, expires_days=expires_days)
        if self._on_created is not None:
            self._on_created(answer["id"])
        return answer

    def seal(self, package_id: str, signed_manifest: dict[str, Any]) -> dict[str, Any]:
        if self._on_sealing is not None:
            self._on_sealing(package_id)
        return self._client.seal(package_id, signed_manifest)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


# --------------------------------------------------------------------------- gateway


class Gateway:
    """One facility's gateway: its home, its hub client, its sources and destinations.

    :param config_path: the ``gateway.toml`` it was loaded from (relative paths in it
        are resolved against its folder).
    :param settings: the ``[gateway]`` table.
    :param sources: the ``[[sources]]`` tables.
    :param destinations: the ``[[destinations]]`` tables.
    :param pm: plugin manager; a fresh one is built when omitted.
    """

    def __init__(
        self,
        config_path: Path,
        settings: dict[str, Any],
        sources: Sequence[dict[str, Any]] = (),
        destinations: Sequence[dict[str, Any]] = (),
        pm: pluggy.PluginManager | None = None,
    ) -> None:
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise ConfigError(f"unknown setting [gateway] {unknown[0]} in {config_path}")
        _check_types(settings, config_path)
        self.config_path = config_path
        self.base_dir = config_path.parent
        self.settings = dict(settings)
        self.home = GatewayHome(self.resolve_path(settings.get("home", ".")), pm)
        self.pm = self.home.pm
        state = settings.get("state")
        self.state_dir = (self.home.path / state) if state else self.home.path / "gateway"
        self.state_dir = self.state_dir.resolve()
        self.poll_seconds = _number(settings, "poll_seconds", 1.0, minimum=0.05)
        self.retry_max_seconds = _number(settings, "retry_max_seconds", 300.0, minimum=1)
        self.parallel = int(settings.get("parallel", self.home.config.client.parallel))
        self.deliver_received = bool(settings.get("deliver_received", False))
        self.progressive = bool(settings.get("progressive", True))
        self.client = HubClient(
            str(settings.get("hub_url") or self.home.config.client.hub_url),
            self._token(),
            verify=settings.get("tls_verify", self.home.config.tls_verify),
        )
        self.home.keep_checkpoints_from(self.client)
        self._inbound: Any = None
        self.sources: list[Source] = []
        self.destinations: list[Destination] = []
        self._build(list(sources), list(destinations))

    # ------------------------------------------------------------------ config
    def resolve_path(self, value: str | os.PathLike[str]) -> Path:
        """A path from ``gateway.toml``: ``~`` expanded, relative to the file's folder."""
        path = Path(value).expanduser()
        return (path if path.is_absolute() else self.base_dir / path).resolve()

    def _token(self) -> str:
        if self.settings.get("token"):
            return str(self.settings["token"])
        if self.settings.get("token_file"):
            file = self.resolve_path(self.settings["token_file"])
            try:
                return file.read_text("utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"cannot read token_file {file}: {exc.strerror}") from exc
        return self.home.config.client.token

    def _build(self, sources: list[dict[str, Any]], destinations: list[dict[str, Any]]) -> None:
        source_kinds, destination_kinds = registered_kinds(self.pm)
        names: set[str] = set()
        into: list[Any]
        for table, kinds, into, label in (
            (sources, source_kinds, self.sources, "sources"),
            (destinations, destination_kinds, self.destinations, "destinations"),
        ):
            for index, raw in enumerate(table):
                if not isinstance(raw, dict) or not isinstance(raw.get("kind"), str):
                    raise ConfigError(f'[[{label}]] number {index + 1} needs a kind = "..."')
                kind = raw["kind"]
                if kind not in kinds:
                    known = ", ".join(sorted(kinds)) or "none installed"
                    raise ConfigError(
                        f"no installed plugin provides {label[:-1]} kind {kind!r} "
                        f"(available: {known}); install its plugin or fix {self.config_path}"
                    )
                settings = dict(raw)
                settings.setdefault("name", kind if index == 0 else f"{kind}-{index + 1}")
                if settings["name"] in names:
                    raise ConfigError(
                        f"two sources or destinations are named {settings['name']!r}; "
                        'give each a distinct name = "..."'
                    )
                names.add(settings["name"])
                factory: Any = kinds[kind]
                into.append(factory(settings, self))

    # ------------------------------------------------------------------ sending
    def send(
        self,
        paths: Sequence[Path],
        to: Sequence[str],
        *,
        on_package_created: Callable[[str], None] | None = None,
        on_seal_requested: Callable[[str], None] | None = None,
        **kw: Any,
    ) -> SendResult:
        """Send files as one package with the gateway's client and home (``send_paths``).

        :param on_package_created: called with the package id as soon as the hub
            assigned it, before any upload: journal it to resolve a crash mid-send.
        :param on_seal_requested: called just before the seal request leaves: until
            then, a package found open after a crash can be abandoned at once.
        """
        from emix_core.client.sender import send_paths

        client: Any = self.client
        if on_package_created is not None or on_seal_requested is not None:
            client = _RecordingClient(self.client, on_package_created, on_seal_requested)
        kw.setdefault("parallel", self.parallel)
        kw.setdefault("progressive", self.progressive)
        return send_paths(list(paths), list(to), client=client, home=self.home, **kw)

    # ------------------------------------------------------------------ running
    @property
    def inbound(self) -> Any:
        """The inbound delivery (``None`` when no destination is configured)."""
        if self._inbound is None and self.destinations:
            from emix_core.gateway.inbound import InboundDelivery

            self._inbound = InboundDelivery(self)
        return self._inbound

    def run(self, stop: threading.Event | None = None) -> None:
        """Run sources and inbound delivery until ``stop`` is set (or Ctrl-C).

        :raises ConfigError: another gateway runs with the same state folder.
        """
        stop = stop or threading.Event()
        port = self.settings.get("metrics_port")
        if port:
            from emix_core.gateway import metrics

            metrics.serve(int(port), str(self.settings.get("metrics_host", "127.0.0.1")))
            metrics.watch_queues(self)
        with _RunLock(self.state_dir / "gateway.lock"):
            log_event(
                log,
                "gateway.started",
                sources=[s.name for s in self.sources],
                destinations=[d.name for d in self.destinations],
                hub=self.client.base,
            )
            started: list[Source] = []
            try:
                for source in self.sources:
                    source.start()
                    started.append(source)
                failures = 0
                while not stop.is_set():
                    if self.inbound is not None:
                        try:
                            self.inbound.tick()
                            failures = 0
                        except Exception:  # keep the gateway up: log, back off, go on
                            failures += 1
                            log.exception("inbound.tick_failed")
                            stop.wait(retry_delay(failures, self.retry_max_seconds))
                    stop.wait(self.poll_seconds)
            finally:
                for source in reversed(started):
                    try:
                        source.stop()
                    except Exception:  # one source failing to stop must not block the rest
                        log.exception("source.stop_failed")
                log_event(log, "gateway.stopped")

    def queue_depths(self) -> dict[str, dict[str, int]]:
        """Work waiting per queue, for the metrics endpoint: ``inbound`` (packages that
        arrived for this facility) and each source that reports its own (a source may
        implement ``queue_depths() -> {"pending": n, "in_flight": n, "failed": n}``)."""
        queues: dict[str, dict[str, int]] = {}
        if self.inbound is not None:
            queues["inbound"] = self.inbound.queue_depths()
        for source in self.sources:
            depths = getattr(source, "queue_depths", None)
            if not callable(depths):
                continue
            try:
                queues[f"source:{source.name}"] = {k: int(v) for k, v in depths().items()}
            except Exception:  # a broken source must not hide the other queues
                log.warning("source.queue_depths_failed", exc_info=True)
        return queues

    def status(self) -> dict[str, Any]:
        """Pending, sent and failed work, read from the journals (no hub needed)."""
        running, pid = _RunLock.probe(self.state_dir / "gateway.lock")
        sources = []
        for source in self.sources:
            try:
                sources.append({"name": source.name, **source.status()})
            except Exception as exc:  # a broken status must not hide the others
                sources.append({"name": source.name, "error": f"{type(exc).__name__}: {exc}"})
        inbound = self.inbound.status() if self.inbound is not None else None
        return {
            "config": str(self.config_path),
            "home": str(self.home.path),
            "state": str(self.state_dir),
            "hub": self.client.base,
            "running": running,
            "pid": pid,
            "sources": sources,
            "inbound": inbound,
        }


#: The TOML types each ``[gateway]`` setting takes (numbers are checked by :func:`_number`).
_SETTING_TYPES: dict[str, tuple[type, ...]] = {
    "home": (str,),
    "hub_url": (str,),
    "token": (str,),
    "token_file": (str,),
    "tls_verify": (bool, str),
    "state": (str,),
    "parallel": (int,),
    "deliver_received": (bool,),
    "progressive": (bool,),
}


def _check_types(settings: dict[str, Any], config_path: Path) -> None:
    """Refuse a ``[gateway]`` value of the wrong TOML type, naming the setting."""
    for key, types in _SETTING_TYPES.items():
        if key not in settings:
            continue
        value = settings[key]
        wrong = not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
        if key == "parallel" and not wrong and not 1 <= value <= 64:
            wrong = True
        if wrong:
            names = " or ".join("a boolean" if t is bool else f"a {t.__name__}" for t in types)
            if key == "parallel":
                names = "an integer from 1 to 64"
            raise ConfigError(f"[gateway] {key} must be {names} in {config_path}")


def _number(settings: dict[str, Any], key: str, default: float, *, minimum: float) -> float:
    value = settings.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"[gateway] {key} must be a number of at least {minimum}")
    return float(value)


class _RunLock:
    """An exclusive lock on the state folder: one gateway per journal, or exactly-once breaks."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> _RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise ConfigError(
                f"another gateway (pid {pid or '?'}) is running with the state folder "
                f"{self.path.parent}; stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def probe(path: Path) -> tuple[bool, int | None]:
        """``(running, pid)`` of the gateway holding the lock, without taking it."""
        if not path.exists():
            return False, None
        fd = os.open(path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.read(fd, 32).decode(errors="replace").strip()
                return True, int(text) if text.isdigit() else None
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False, None
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- loading

CONFIG_ENV = "EMIX_GATEWAY_CONFIG"


def find_config(path: str | os.PathLike[str] | None = None) -> Path:
    """The gateway config: the argument, else ``$EMIX_GATEWAY_CONFIG``, else
    ``./gateway.toml``, else ``$EMIX_HOME/gateway.toml``.

    :raises ConfigError: none of them exists.
    """
    from emix_core.config import resolve_home

    explicit = path or os.environ.get(CONFIG_ENV)
    if explicit:
        candidates = [Path(explicit).expanduser()]
    else:
        candidates = [Path("gateway.toml"), resolve_home(None) / "gateway.toml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(
        f"no gateway config found (looked for {' and '.join(str(c) for c in candidates)}); "
        "pass --config FILE (see examples/gateway.toml)"
    )


def load_gateway(config_path: Path, pm: pluggy.PluginManager | None = None) -> Gateway:
    """Read ``gateway.toml`` and build the gateway with its sources and destinations.

    :raises ConfigError: unreadable file, unknown setting or kind, no hub configured.
    """
    config_path = Path(config_path).expanduser().resolve()
    try:
        data = tomllib.loads(config_path.read_text("utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"gateway config {config_path} does not exist") from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{config_path} is not a readable TOML file: {exc}") from exc
    extra = sorted(set(data) - {"gateway", "sources", "destinations"})
    if extra:
        raise ConfigError(
            f"unknown table [{extra[0]}] in {config_path}; use [gateway], [[sources]], "
            "[[destinations]]"
        )
    for table in ("sources", "destinations"):
        if not isinstance(data.get(table, []), list):
            raise ConfigError(f"{table} must be written as [[{table}]] tables in {config_path}")
    return Gateway(
        config_path,
        data.get("gateway", {}),
        data.get("sources", []),
        data.get("destinations", []),
        pm,
    )


# --------------------------------------------------------------------------- logging


class LogFormatter(logging.Formatter):
    """One line per event: ``json`` (one object) or ``text`` (``key=value`` pairs)."""

    def __init__(self, style: str = "text") -> None:
        super().__init__()
        self.style_name = style

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = dict(getattr(record, "emix", {}) or {})
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        when += f".{int(record.msecs):03d}Z"
        if record.exc_info:
            # the exception's type and where, not its text: it might echo input data
            exc = record.exc_info[1]
            fields["exception"] = type(exc).__name__ if exc else "unknown"
        if self.style_name == "json":
            body = {"time": when, "level": record.levelname.lower(), "event": record.getMessage()}
            body.update(fields)
            return json.dumps(body, default=str, sort_keys=False)
        pairs = " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        return f"{when} {record.levelname:<7} {record.getMessage()} {pairs}".rstrip()


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return json.dumps(text) if (" " in text or not text) else text


def configure_logging(style: str = "text", level: int = logging.INFO) -> None:
    """Send ``emix.*`` logs to stderr in the given style (``text`` or ``json``)."""
    handler = logging.StreamHandler()
    handler.setFormatter(LogFormatter(style))
    root = logging.getLogger("emix")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def time_now() -> float:
    """Wall-clock seconds (journals store wall time so that status reads across restarts)."""
    return time.time()

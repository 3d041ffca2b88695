"""``emix hub serve``: the hub under gunicorn (streams bodies, speaks TLS), plus periodic purge."""

from __future__ import annotations

import ipaddress
import logging
import threading
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication

from emix_core.errors import ConfigError

log = logging.getLogger("emix.hub")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listener(
    host: str, tls_cert: str | None, tls_key: str | None, behind_proxy: bool
) -> None:
    """Refuse to listen beyond loopback without TLS, unless a TLS proxy is in front."""
    if bool(tls_cert) != bool(tls_key):
        raise ConfigError("give both --tls-cert and --tls-key")
    if not is_loopback(host) and not tls_cert and not behind_proxy:
        raise ConfigError(
            f"refusing to serve on {host} without TLS: give --tls-cert and --tls-key, or "
            "--behind-proxy if a TLS-terminating proxy is the only way in"
        )


class HubApplication(BaseApplication):
    """gunicorn running :func:`emix_core.hub.create_app` in each worker."""

    def __init__(self, home: Path, options: dict[str, Any], purge_interval: int) -> None:
        self.home = home
        self.options = options
        self.purge_interval = purge_interval
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)
        if "control_socket_disable" in self.cfg.settings:
            # gunicorn's control socket lives in $HOME, read-only under ProtectSystem=strict
            self.cfg.set("control_socket_disable", True)
        self.cfg.set("when_ready", self._when_ready)

    def load(self):  # type: ignore[no-untyped-def]
        from emix_core.hub import create_app

        root = logging.getLogger("emix")
        if not root.handlers:  # hub events and the access log (route templates) to stderr
            handler = logging.StreamHandler()
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")
            )
            root.addHandler(handler)
            root.setLevel(logging.INFO)

        return create_app(self.home)

    def _when_ready(self, _server: Any) -> None:
        if self.purge_interval > 0:
            thread = threading.Thread(target=self._purge_loop, name="emix-purge", daemon=True)
            thread.start()

    def _purge_loop(self) -> None:
        from emix_core.hub.context import open_hub
        from emix_core.hub.retention import purge_expired

        stop = threading.Event()
        hub = None
        while not stop.wait(self.purge_interval):
            try:
                hub = hub or open_hub(self.home)  # one pool for the life of the timer
                # several instances: the one holding the retention lock purges
                result = purge_expired(hub)
                if result["purged"]:
                    log.info("retention purged %d packages", len(result["purged"]))
            except Exception:
                log.exception("retention purge failed; will retry")


#: Paths gateways poll every second or so: their successful answers are logged at debug.
POLL_PATHS = frozenset({"/api/v1/inbox/cursor", "/healthz", "/readyz"})


class QuietPolls(logging.Filter):
    """Drop access-log lines of successful polls unless the hub logs at debug level."""

    def __init__(self, level: str = "info") -> None:
        super().__init__()
        self.debug = level.lower() == "debug"

    def filter(self, record: logging.LogRecord) -> bool:
        atoms = record.args if isinstance(record.args, dict) else {}
        if self.debug or atoms.get("U") not in POLL_PATHS:
            return True
        return str(atoms.get("s")) not in ("200", "304")


def logging_config(style: str, level: str) -> dict[str, Any]:
    """``logging.config`` for gunicorn and the hub: every line with a UTC timestamp and level."""
    handler = {"class": "logging.StreamHandler", "formatter": "emix", "stream": "ext://sys.stderr"}
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"emix": {"()": "emix_core.gateway.runner.LogFormatter", "style": style}},
        "filters": {"polls": {"()": "emix_core.hub.serve.QuietPolls", "level": level}},
        "handlers": {"stderr": handler, "access": {**handler, "filters": ["polls"]}},
        "root": {"level": "WARNING", "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": level, "handlers": ["stderr"], "propagate": False},
            # gunicorn's own access lines would carry path values (UIDs): the app logs
            # route templates instead (emix.access), with successful polls at debug level.
            "gunicorn.access": {"level": "CRITICAL", "handlers": [], "propagate": False},
            "emix": {"level": level, "handlers": ["stderr"], "propagate": False},
        },
    }


def _metrics_dir(home: Path) -> None:
    """A fresh folder the gunicorn workers share their Prometheus counters through."""
    import os
    import shutil

    folder = home / "metrics-multiproc"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(mode=0o700)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)


def serve(
    home: Path,
    *,
    host: str,
    port: int,
    workers: int,
    threads: int,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    behind_proxy: bool = False,
    purge_interval: int = 3600,
    log_format: str = "text",
    log_level: str = "info",
) -> None:
    """Run the hub until interrupted.

    :param log_format: ``text`` (timestamp, level, message) or ``json`` (one object a line).
    :param log_level: ``debug``, ``info``, ``warning`` or ``error``.
    """
    check_listener(host, tls_cert, tls_key, behind_proxy)
    from emix_core.config import load_config
    from emix_core.hub import worker
    from emix_core.hub.context import open_hub

    open_hub(home)  # a missing or wrong key is reported here, to the operator, not to clients
    settings = load_config(home).hub
    worker.HEADER_TIMEOUT = float(settings.header_timeout_seconds)
    worker.BODY_IDLE_TIMEOUT = float(settings.body_idle_timeout_seconds)
    if behind_proxy and not settings.trusted_proxy_hops:
        log.warning(
            "behind a proxy without [hub] trusted_proxy_hops: every client has the proxy's "
            "address, so one client's failed sign-ins throttle all (valid tokens still pass)"
        )
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    options: dict[str, Any] = {
        "bind": bind,
        "workers": workers,
        "threads": threads,
        "worker_class": "emix_core.hub.worker.BoundedThreadWorker",
        "timeout": 600,
        "graceful_timeout": 10,
        "keepalive": 30,
        "accesslog": None,  # the app logs route templates (emix.access), never path values
        "errorlog": "-",
        "loglevel": log_level,
        "logconfig_dict": logging_config(log_format, log_level),
        "proc_name": "emix-hub",
        "forwarded_allow_ips": "*" if behind_proxy else "127.0.0.1",
    }
    _metrics_dir(home)
    if tls_cert:
        options["certfile"] = tls_cert
        options["keyfile"] = tls_key
    HubApplication(home, options, purge_interval).run()

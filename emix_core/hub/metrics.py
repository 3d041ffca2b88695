"""Prometheus metrics of the hub, served at ``/metrics``.

Labels carry route templates (``/api/v1/packages/<package_id>/seal``), methods, status
codes and error codes only: never ids, names or anything a request carried. Under
gunicorn the workers share ``PROMETHEUS_MULTIPROC_DIR`` (set by ``emix hub serve``), so
a scrape sees the sum of every worker.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flask import Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

REQUESTS = Counter(
    "emix_hub_requests_total", "HTTP requests answered", ["method", "route", "status"]
)
DURATION = Histogram(
    "emix_hub_request_duration_seconds",
    "Time to answer a request (headers; streamed bodies are in transfer_duration)",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
TRANSFER = Histogram(
    "emix_hub_transfer_duration_seconds",
    "Time from request to the last byte of a response body",
    ["method", "route"],
    buckets=(0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600),
)
BYTES_IN = Counter("emix_hub_bytes_in_total", "Request body bytes received")
BYTES_OUT = Counter("emix_hub_bytes_out_total", "Response body bytes sent")
SEALED = Counter("emix_hub_packages_sealed_total", "Packages sealed by their senders")
RECEIVED = Counter("emix_hub_packages_received_total", "Signed receipts posted by recipients")
FAILURES = Counter("emix_hub_failures_total", "Requests answered with an error", ["kind"])

SEAL_ROUTE = "/api/v1/packages/<package_id>/seal"
RECEIPT_ROUTE = "/api/v1/packages/<package_id>/receipt"


def registry() -> CollectorRegistry | None:
    """The registry to expose: every worker's files in multiprocess mode, else the default."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return merged
    return None


def _route() -> str:
    rule = request.url_rule
    return rule.rule if rule is not None else "unmatched"


class _CountingBody:
    """Passes a WSGI body through, counting its bytes and timing it to the last one."""

    def __init__(self, body: Iterable[bytes], observe: Callable[[int], None]) -> None:
        self._body = body
        self._observe = observe
        self._sent = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._body:
            self._sent += len(chunk)
            yield chunk

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._observe(self._sent)


def _is_loopback(address: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def install(app: Flask) -> None:
    """Count every request and serve ``/metrics``."""

    @app.before_request
    def _start() -> None:
        g.emix_started = time.monotonic()

    @app.after_request
    def _count(response: Response) -> Response:
        route, method = _route(), request.method
        status = response.status_code
        REQUESTS.labels(method, route, str(status)).inc()
        DURATION.labels(method, route).observe(time.monotonic() - g.get("emix_started", 0.0))
        BYTES_IN.inc(request.content_length or 0)
        if status < 300 and method == "POST":
            if route == SEAL_ROUTE:
                SEALED.inc()
            elif route == RECEIPT_ROUTE:
                RECEIVED.inc()
        if status >= 400:
            body = response.get_json(silent=True) if response.is_json else None
            kind = str(body.get("error", status)) if isinstance(body, dict) else str(status)
            FAILURES.labels(kind[:40]).inc()
        request.environ["emix.route"] = route
        return response

    inner = app.wsgi_app

    def counting_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        started = time.monotonic()
        body = inner(environ, start_response)
        if environ.get("PATH_INFO") == "/metrics":
            return body
        method = environ.get("REQUEST_METHOD", "")
        route = environ.get("emix.route", "")

        def observe(sent: int) -> None:
            BYTES_OUT.inc(sent)
            TRANSFER.labels(method, environ.get("emix.route", route) or "unmatched").observe(
                time.monotonic() - started
            )

        return _CountingBody(body, observe)

    app.wsgi_app = counting_app  # type: ignore[method-assign]

    @app.get("/metrics")
    def metrics() -> Response:
        if not _is_loopback(request.remote_addr or ""):
            return Response("not found\n", status=404, mimetype="text/plain")
        merged = registry()
        data = generate_latest(merged) if merged is not None else generate_latest()
        from emix_core.hub.outbox import metrics_text

        data += metrics_text(app.extensions["emix"])
        return Response(data, mimetype=CONTENT_TYPE_LATEST)

"""Prometheus metrics of a gateway: its events by name and level, bytes moved.

Served only when ``[gateway] metrics_port`` is set, on 127.0.0.1 unless ``metrics_host``
says otherwise. Labels are event names and levels, never ids or names.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import Counter, start_http_server

EVENTS = Counter(
    "emix_gateway_events_total", "Gateway events (package.sent, package.failed, ...)",
    ["event", "level"],
)  # fmt: skip
BYTES = Counter("emix_gateway_bytes_total", "Bytes sent or delivered", ["event"])


def count(event: str, level: int, fields: dict[str, Any]) -> None:
    EVENTS.labels(event[:60], logging.getLevelName(level).lower()).inc()
    size = fields.get("bytes")
    if isinstance(size, int | float) and not isinstance(size, bool) and size > 0:
        BYTES.labels(event[:60]).inc(size)


def serve(port: int, host: str = "127.0.0.1") -> None:
    """Start the metrics endpoint in a background thread."""
    start_http_server(port, addr=host)

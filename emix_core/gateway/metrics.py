"""Prometheus metrics of a gateway: its events by name and level, bytes moved, and the
depth of its queues.

Served only when ``[gateway] metrics_port`` is set, on 127.0.0.1 unless ``metrics_host``
says otherwise. Labels are event names, levels, queue names (``inbound`` or
``source:<name>`` as named in ``gateway.toml``) and states, never ids or patient data.
Queue depths are read from the journals at each scrape.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("emix.gateway")

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


#: The states every queue reports, zero when it has none.
QUEUE_STATES = ("pending", "in_flight", "failed")


class QueueCollector(Collector):
    """``emix_gateway_queue_depth{queue, state}``, read from a gateway at each scrape."""

    def __init__(self, gateway: Any) -> None:
        self._gateway = weakref.ref(gateway)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "emix_gateway_queue_depth",
            "Work in the gateway's queues: pending, in_flight, failed (given up); retrying "
            "counts those pending or in flight whose last attempt failed",
            labels=["queue", "state"],
        )
        gateway = self._gateway()
        queues: dict[str, dict[str, int]] = {}
        if gateway is not None:
            try:
                queues = gateway.queue_depths()
            except Exception:  # a scrape never fails for one unreadable journal
                log.warning("metrics.queue_depths_failed", exc_info=True)
        for queue, depths in sorted(queues.items()):
            for state in sorted(set(QUEUE_STATES) | set(depths)):
                family.add_metric([queue[:80], state[:20]], float(depths.get(state, 0)))
        yield family


_watched: list[QueueCollector] = []


def watch_queues(gateway: Any) -> None:
    """Report this gateway's queue depths on the metrics endpoint (one gateway at a time)."""
    for old in _watched:
        REGISTRY.unregister(old)
    _watched[:] = [QueueCollector(gateway)]
    REGISTRY.register(_watched[0])

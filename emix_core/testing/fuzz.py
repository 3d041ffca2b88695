"""Fuzzing helpers: hypothesis settings and the limits every parser of outside bytes keeps.

Each target is a pytest test marked ``fuzz`` that draws inputs with hypothesis and
calls :func:`within_limits`. The property: the parser returns, or raises one of the
project's own errors (:class:`~emix_core.errors.EmixError`) or an exception the target
documents; it stays under :data:`MEMORY_LIMIT` bytes of new Python allocations and under
the per-example deadline.

By default every target runs :data:`EXAMPLES` derandomized examples (the same inputs on
every run, no example database): a few seconds each in ``make test``. For a long hunt::

    EMIX_FUZZ_EXAMPLES=20000 pytest -m fuzz -p no:cacheprovider

runs random examples and keeps failures in ``.hypothesis/`` so the next run retries them.
"""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings

from emix_core.errors import EmixError

__all__ = ["DEADLINE", "EXAMPLES", "MEMORY_LIMIT", "fuzz_settings", "mutated", "within_limits"]

T = TypeVar("T")

_EXPLICIT = os.environ.get("EMIX_FUZZ_EXAMPLES", "").strip()
#: Examples per target.
EXAMPLES = int(_EXPLICIT) if _EXPLICIT else 120
#: Time one example may take.
DEADLINE = timedelta(seconds=float(os.environ.get("EMIX_FUZZ_DEADLINE", "2")))
#: Peak of new Python allocations one example may make.
MEMORY_LIMIT = 64 * 1024 * 1024


def fuzz_settings(**overrides: Any) -> settings:
    """hypothesis settings for a fuzz target (deterministic unless ``EMIX_FUZZ_EXAMPLES``)."""
    values: dict[str, Any] = {
        "max_examples": EXAMPLES,
        "deadline": DEADLINE,
        "derandomize": not _EXPLICIT,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
        "print_blob": True,
    }
    if not _EXPLICIT:
        values["database"] = None
    values.update(overrides)
    return settings(**values)


def within_limits(
    call: Callable[..., T], *args: Any, allowed: tuple[type[BaseException], ...] = ()
) -> T | BaseException:
    """Call a parser and hold it to the fuzzing property.

    :param allowed: exceptions besides :class:`EmixError` the target documents.
    :return: the parser's result, or the allowed exception it raised.
    :raises AssertionError: it allocated more than :data:`MEMORY_LIMIT`.
    """
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    caught: tuple[type[BaseException], ...] = (EmixError, *allowed)
    try:
        try:
            result: T | BaseException = call(*args)
        except caught as exc:
            result = exc
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        if started:
            tracemalloc.stop()
    assert peak <= MEMORY_LIMIT, f"{getattr(call, '__name__', call)} allocated {peak} bytes"
    return result


def mutated(seeds: list[bytes], max_edits: int = 8) -> Any:
    """A hypothesis strategy: one of ``seeds`` with up to ``max_edits`` random edits.

    Edits flip, insert, delete or overwrite bytes, truncate, or splice in a piece of
    another seed, so inputs stay near the valid documents where parsers branch most.
    """
    from hypothesis import strategies as st

    edit = st.tuples(
        st.sampled_from(["flip", "insert", "delete", "overwrite", "truncate", "splice", "repeat"]),
        st.integers(min_value=0, max_value=2**31),
        st.binary(min_size=1, max_size=16),
        st.integers(min_value=0, max_value=len(seeds) - 1),
    )

    def apply(seed_index: int, edits: list[tuple[str, int, bytes, int]]) -> bytes:
        data = bytearray(seeds[seed_index])
        for kind, where, piece, other in edits:
            at = where % (len(data) + 1)
            if kind == "flip" and data:
                data[at % len(data)] ^= piece[0] or 1
            elif kind == "insert":
                data[at:at] = piece
            elif kind == "delete":
                del data[at : at + len(piece)]
            elif kind == "overwrite":
                data[at : at + len(piece)] = piece
            elif kind == "truncate":
                del data[at:]
            elif kind == "splice":
                source = seeds[other]
                start = where % (len(source) + 1)
                data[at:at] = source[start : start + 64]
            elif kind == "repeat":
                data[at:at] = bytes(data[at : at + len(piece)]) * min(piece[0], 64)
        return bytes(data)

    return st.builds(
        apply,
        st.integers(min_value=0, max_value=len(seeds) - 1),
        st.lists(edit, max_size=max_edits),
    )

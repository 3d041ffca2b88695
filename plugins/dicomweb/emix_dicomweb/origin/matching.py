"""QIDO-RS query parameters and attribute matching (PS3.18 8.3.4, PS3.4 C.2.2.2).

Single value matching is exact and case-sensitive, except Person Names, which match
case-insensitively as C.2.2.2.1 allows. ``*`` and ``?`` are wildcards for every VR but
dates, times, UIDs and numbers. Dates and times match ranges (``a-b``, ``-b``, ``a-``),
and a date and a time given together match as one date-time range (C.2.2.2.5). UIDs
match lists (``a,b`` or ``a\\b``, or the parameter repeated). An empty value matches
everything and asks for the attribute to be returned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from werkzeug.datastructures import MultiDict

from emix_core import InvalidInput
from emix_dicomweb.origin.attributes import Record, keyword_of, vr_of

__all__ = ["Query", "parse_query"]

RESERVED = frozenset({"limit", "offset", "includefield", "fuzzymatching", "orderby"})
NO_WILDCARD_VRS = frozenset({"DA", "TM", "DT", "UI", "IS", "DS", "US", "UL", "SS", "SL"})
LIST_VRS = frozenset({"UI", "CS"})
MAX_LIMIT = 10_000
#: Longest value of one search parameter (a UID is 64, a name a few dozen).
MAX_VALUE_CHARS = 1024
PAIRS = (("StudyDate", "StudyTime"), ("SeriesDate", "SeriesTime"))


@dataclass
class Query:
    """A parsed QIDO-RS query."""

    filters: dict[str, list[str]] = field(default_factory=dict)
    include: set[str] = field(default_factory=set)
    include_all: bool = False
    limit: int | None = None
    offset: int = 0
    fuzzy: bool = False

    def returned(self, required: tuple[str, ...], record: Record) -> set[str] | None:
        """Keywords to answer with: required, matched and included (``None``: all)."""
        if self.include_all:
            return None
        return set(required) | set(self.filters) | (self.include & set(record))

    def matches(self, record: Record, level: set[str]) -> bool:
        """True when the record matches every filter on an attribute of this level."""
        done: set[str] = set()
        for date_key, time_key in PAIRS:
            if date_key in self.filters and time_key in self.filters and date_key in level:
                done |= {date_key, time_key}
                if not _date_time(
                    self.filters[date_key], self.filters[time_key], record, date_key, time_key
                ):
                    return False
        for keyword, wanted in self.filters.items():
            if keyword in done or keyword not in level:
                continue
            if not _match(keyword, wanted, record.get(keyword, [])):
                return False
        return True

    def page(self, rows: list[Any]) -> tuple[list[Any], int]:
        """``(this page, how many more there are)``."""
        end = None if self.limit is None else self.offset + self.limit
        return rows[self.offset : end], max(len(rows) - (end or len(rows)), 0)


def parse_query(args: MultiDict[str, str]) -> Query:
    """Read the query string of a QIDO-RS request.

    :raises InvalidInput: an unknown attribute, or a malformed ``limit``/``offset``.
    """
    query = Query()
    for name in args:
        values = args.getlist(name)
        lowered = name.lower()
        if lowered == "includefield":
            for value in values:
                for part in value.split(","):
                    if part.strip().lower() == "all":
                        query.include_all = True
                    elif part.strip():
                        query.include.add(keyword_of(part))
        elif lowered in ("limit", "offset"):
            try:
                number = int(values[-1])
            except ValueError:
                raise InvalidInput(f"{lowered} must be a whole number") from None
            if number < 0:
                raise InvalidInput(f"{lowered} must not be negative")
            if lowered == "limit":
                query.limit = min(number, MAX_LIMIT)
            else:
                query.offset = number
        elif lowered == "fuzzymatching":
            query.fuzzy = values[-1].strip().lower() == "true"
        elif lowered in RESERVED:
            continue
        else:
            keyword = keyword_of(name)
            if any(len(value) > MAX_VALUE_CHARS for value in values):
                raise InvalidInput(
                    f"the value of {keyword} is longer than {MAX_VALUE_CHARS} characters"
                )
            query.filters.setdefault(keyword, []).extend(values)
    return query


def wildcard_match(pattern: str, text: str, *, ignore_case: bool = False) -> bool:
    """``*`` (any run) and ``?`` (one character) matching in O(len(pattern) * len(text)).

    Not a regular expression: a pattern such as ``*?*?*?…x`` made the regex engine
    backtrack for minutes on one request.
    """
    if len(pattern) > MAX_VALUE_CHARS:
        raise InvalidInput(f"a search value is longer than {MAX_VALUE_CHARS} characters")
    if ignore_case:
        pattern, text = pattern.casefold(), text.casefold()
    p = t = 0
    star, mark = -1, 0
    while t < len(text):
        if p < len(pattern) and pattern[p] in ("?", text[t]) and pattern[p] != "*":
            p, t = p + 1, t + 1
        elif p < len(pattern) and pattern[p] == "*":
            star, mark = p, t
            p += 1
        elif star >= 0:  # let the last star swallow one more character
            p, mark = star + 1, mark + 1
            t = mark
        else:
            return False
    return all(c == "*" for c in pattern[p:])


def _values(wanted: list[str], vr: str) -> list[str]:
    out: list[str] = []
    for value in wanted:
        parts = re.split(r"[\\,]", value) if vr in LIST_VRS else [value]
        out += [p.strip() for p in parts]
    return out


def _match(keyword: str, wanted: list[str], actual: list[Any]) -> bool:
    vr = vr_of(keyword)
    queries = [q for q in _values(wanted, vr) if q != ""]
    if not queries:
        return True  # universal matching
    texts = [str(a).strip() for a in actual if a not in (None, "")]
    if not texts:
        return False
    for query in queries:
        for text in texts:
            if vr in ("DA", "TM", "DT"):
                if _in_range(query, text, vr):
                    return True
            elif vr in ("IS", "US", "UL", "SS", "SL"):
                try:
                    if int(query) == int(text):
                        return True
                except ValueError:
                    raise InvalidInput(f"{keyword} must be a whole number") from None
            elif vr == "PN":
                if wildcard_match(_pn(query), _pn(text), ignore_case=True):
                    return True
            elif vr in NO_WILDCARD_VRS:
                if query == text:
                    return True
            elif wildcard_match(query, text):
                return True
    return False


def _pn(name: str) -> str:
    """A person name without trailing empty components (``DOE^JOHN^^`` is ``DOE^JOHN``)."""
    return "=".join(group.rstrip("^") for group in name.split("=")).rstrip("=")


def _bounds(query: str, vr: str) -> tuple[str, str]:
    low, sep, high = query.partition("-") if vr != "DT" else _dt_split(query)
    if not sep:
        low = high = query
    return _norm(low, vr, "0"), _norm(high, vr, "9")


def _dt_split(query: str) -> tuple[str, str, str]:
    # a DT may carry a "-hhmm" offset; a range separator has digits (or nothing) both sides
    match = re.fullmatch(r"([0-9.]*(?:[+-][0-9]{4})?)-([0-9.]*(?:[+-][0-9]{4})?)", query)
    return (match.group(1), "-", match.group(2)) if match else (query, "", "")


def _norm(value: str, vr: str, fill: str) -> str:
    """Fixed-width text so that ranges compare as strings; an open end is extreme."""
    value = value.replace(":", "").replace(".", "").strip()
    width = {"DA": 8, "TM": 12, "DT": 20}[vr]
    if not value:
        return fill * width
    if not value.isdigit():
        raise InvalidInput(f"a date or time in a search is malformed (expected {vr} digits)")
    return (value + fill * width)[:width]


def _in_range(query: str, text: str, vr: str) -> bool:
    low, high = _bounds(query, vr)
    value = _norm(text, vr, "0")
    return low <= value <= high


def _date_time(
    dates: list[str], times: list[str], record: Record, date_key: str, time_key: str
) -> bool:
    """Combined date-time range matching (PS3.4 C.2.2.2.5.1)."""
    date_value = next((str(v) for v in record.get(date_key, []) if v), "")
    time_value = next((str(v) for v in record.get(time_key, []) if v), "")
    date_query = next((q for q in dates if q), "")
    time_query = next((q for q in times if q), "")
    if not date_query and not time_query:
        return True
    if not date_value:
        return False
    dlow, dhigh = _bounds(date_query, "DA") if date_query else ("0" * 8, "9" * 8)
    tlow, thigh = _bounds(time_query, "TM") if time_query else ("0" * 12, "9" * 12)
    value = _norm(date_value, "DA", "0") + _norm(time_value, "TM", "0")
    return dlow + tlow <= value <= dhigh + thigh

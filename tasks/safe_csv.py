"""CSV cells a spreadsheet shows as text: the OWASP rule against formula (CSV) injection.

Class names, tag values and other strings in the CSVs the project writes come from users'
datasets. A spreadsheet reads a cell starting with = + - @ as a formula (and skips a leading
tab or carriage return before looking), so such a string cell is written with a leading
single quote, which spreadsheets show as text. Numbers stay numbers: -0.5 written from a float
is data, not a formula; only str cells are changed.

A string that already starts with a quote gets one more, so `restore` undoes `cell` exactly:
files the project reads back (curation/<version>.csv) survive write -> read unchanged.

Used by: tasks/evaluate.py (reports/evaluate/plots/*.csv), tasks/tune_report.py (trials.csv),
tasks/curation.py (curation/<version>.csv, read back by the curate stage).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from typing import Any

TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
QUOTE = "'"


def cell(value: Any) -> Any:
    """`value` safe as a CSV cell: a str starting with = + - @ tab CR (or ') gets a leading '."""
    if isinstance(value, str) and value.startswith((*TRIGGERS, QUOTE)):
        return QUOTE + value
    return value


def restore(value: Any) -> Any:
    """The value `cell` was given: drops the quote `cell` added, and only that one.

    A quote followed by anything else (a hand-written `'s-Hertogenbosch`) is kept as written;
    a value that is not a str (None for a missing field) is returned as it is.
    """
    if isinstance(value, str) and value.startswith(QUOTE) and value[1:].startswith((*TRIGGERS, QUOTE)):
        return value[1:]
    return value


def row(values: Iterable[Any]) -> list[Any]:
    return [cell(v) for v in values]


class Writer:
    """csv.writer whose every row goes through `cell`."""

    def __init__(self, handle, **kwargs):
        self._w = csv.writer(handle, **kwargs)

    def writerow(self, values: Iterable[Any]):
        return self._w.writerow(row(values))

    def writerows(self, rows: Iterable[Iterable[Any]]) -> None:
        for values in rows:
            self.writerow(values)


def writer(handle, **kwargs) -> Writer:
    """Like csv.writer(handle, **kwargs), with cells neutralized."""
    return Writer(handle, **kwargs)

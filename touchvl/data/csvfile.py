"""A CSV file read record by record, as a real CSV parser sees it, so one bad record costs only itself.

Why not ``pandas.read_csv`` or one ``csv.reader`` over the file: both stop at the first malformed record (or,
without ``strict``, let an unterminated quote swallow every record after it into one field), and both decode
the whole file at once, so one non-UTF-8 byte would cost every id.  Splitting into lines first is worse: a quoted
newline then cuts a caption in two and turns its second half into a row.  Here:

* the file is decoded once with ``surrogateescape``: every undecodable byte becomes one lone surrogate and every
  ASCII byte (``"``, ``,``, newlines: all of CSV's structure) decodes as itself, so records split exactly where
  they do in the bytes, and a record holding a surrogate is the one that is not UTF-8;
* the stdlib ``csv`` reader parses it in ``strict`` mode (quoted newlines, doubled quotes); on a malformed record
  (a quote that never closes, or text after a closing quote) that record alone is reported and parsing resumes
  on the physical line after the one it started on;
* each record carries the physical line it starts on, for the quarantine report.
"""
from __future__ import annotations

import contextlib
import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

BOM = "\ufeff"


@dataclass(frozen=True)
class Record:
    line: int  # 1-based physical line the record starts on
    fields: list[str]
    error: str | None = None  # why the record is unusable; ``fields`` is then the best reading of its first line
    kind: str | None = None  # "bad_encoding" | "bad_row" when ``error`` is set


@contextlib.contextmanager
def _field_limit(limit: int) -> Iterator[None]:
    # csv's field limit (131,072 by default) is a module global: a longer field would raise mid-file.  The whole
    # file is in memory already, so a field as long as the file costs nothing more; restored afterwards
    # (prepare reads its CSV files from one thread).
    previous = csv.field_size_limit()
    csv.field_size_limit(max(limit, previous))
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _undecodable(text: str) -> str | None:
    """The UTF-8 error of a surrogate-escaped string (reason and byte offset), or None when it is clean UTF-8."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8", errors="surrogateescape").decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not UTF-8: {exc.reason} at byte {exc.start} of the record"
    return None


def read_records(path: Path) -> list[Record]:
    """Every non-blank record of ``path``, the header first; malformed ones come with ``error`` set.

    A list, parsed while the raised field limit holds (a generator would keep the module global raised
    for as long as its caller takes).  ``OSError`` from reading the file propagates.
    """
    return list(_records(Path(path).read_bytes()))


def _records(data: bytes) -> Iterator[Record]:
    text = data.decode("utf-8", errors="surrogateescape")
    if text.startswith(BOM):
        text = text[1:]
    # physical lines, terminators kept, split on \n, \r\n and \r exactly as csv.reader counts them
    lines = list(io.StringIO(text, newline=""))
    pos = 0  # index in ``lines`` where the current reader started
    with _field_limit(len(text) + 1):
        while pos < len(lines):
            reader = csv.reader((lines[i] for i in range(pos, len(lines))), strict=True)
            while True:
                start = pos + reader.line_num  # 0-based index of the next record's first line
                try:
                    fields = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    # report the record on its first line and resume on the line after it: a quote that
                    # never closes (or closes mid-field) must not take the records below with it
                    first = next(csv.reader([lines[start].rstrip("\r\n")]), [])
                    yield Record(start + 1, first, f"malformed CSV record ({exc}): a quote that does not close "
                                 "where its field ends", "bad_row")
                    pos = start + 1
                    break
                if not any(f.strip() for f in fields):
                    continue  # blank line
                end = pos + reader.line_num
                problem = _undecodable("".join(lines[start:end]))
                yield Record(start + 1, fields, problem, "bad_encoding" if problem else None)


def printable(text: str) -> str:
    """A surrogate-escaped field made safe to print and write as UTF-8 (undecodable bytes as U+FFFD)."""
    return text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")

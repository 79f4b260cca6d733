"""Text that is not Unicode, found where it is read: a lone surrogate in a JSON value, bytes that are not UTF-8 in
an Arrow string column (Parquet, save_to_disk). Each is refused naming the file and its line or row, instead of
crashing the run much later with a traceback that names no file. Part of epi.data.sources.
"""

from __future__ import annotations

import re
from typing import Any

from epi.errors import UserError

Row = dict[str, Any]

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")  # \\ud800-\\udfff as JSON writes them
_SURROGATE_PAIR = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}")  # high then low: one character


def _may_hold_surrogate(text: str) -> bool:
    """Whether JSON `text` may decode to a lone surrogate, so that its values must be checked one by one.

    Text decoded from UTF-8 holds one only through an escape that is not half of a pair (high \\ud800-\\udbff
    then low \\udc00-\\udfff: one character, an emoji written with ensure_ascii). Text without a \\u escape,
    nearly all, costs one substring search; otherwise the pairs are taken out and what is left searched, both
    at C speed. An escaped backslash can make text look like an escape, or hide a lone one behind what looks
    like its pair, so a text holding one is checked whenever it has any surrogate escape.
    """
    if "\\u" not in text:
        return False
    if "\\\\" in text:
        return _SURROGATE_ESCAPE.search(text) is not None
    return _SURROGATE_ESCAPE.search(_SURROGATE_PAIR.sub("", text)) is not None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _surrogate(value: Any) -> str | None:
    """The first surrogate code point in any string of `value` (keys and nested lists and objects too); None when
    every string is valid Unicode. ASCII strings, nearly all of them, are passed over at C speed."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return value[e.start]
        return None
    if isinstance(value, dict):
        return next((found for k, v in value.items() if (found := _surrogate(k) or _surrogate(v))), None)
    if isinstance(value, (list, tuple)):
        return next((found for v in value if (found := _surrogate(v))), None)
    return None


def _unicode_problem(row: Row) -> str | None:
    """What is wrong with the first column of `row` whose name or value holds a lone surrogate; None when none does."""
    for column, value in row.items():
        char = _surrogate(column) or _surrogate(value)
        if char is not None:
            escape = f"\\u{ord(char):04x}"
            return (
                f"column {column!r} is not valid Unicode text (an unpaired surrogate, {escape}: half of a UTF-16 pair "
                "without the other half); repair or remove that value"
            )
    return None


def check_unicode(where: str, row: Row) -> None:
    """A row whose text is not valid Unicode is refused where it is read, naming `where` (file and line or row).

    JSON may escape a lone surrogate (`"\\ud800"`, e.g. an emoji cut in half by a UTF-16 substring) and `json.loads`
    returns it in a str that no UTF-8 encoder accepts: kept, it would crash the run much later (hashing the prompt
    for the holdout split, tokenizing, writing predictions) with a traceback that names no file.
    """
    problem = _unicode_problem(row)
    if problem:
        raise UserError(f"{where}: {problem}")


def check_json_columns(where: str, features: Any, rows: list[Row]) -> None:
    """`check_unicode` for the columns of a `datasets` dataset that hold a `Json` feature, row by row.

    Its other strings come out of Arrow, which Python decodes as strict UTF-8 (no surrogate gets through), but
    `to_list` decodes a Json column from JSON text with pandas' ujson, which keeps a lone low surrogate escape
    (`"\\udc00"`). Only those columns are walked, so a dataset without one costs nothing.
    """
    import datasets

    def holds_json(feature: Any) -> bool:
        if isinstance(feature, datasets.Json):
            return True
        if isinstance(feature, dict):
            return any(holds_json(f) for f in feature.values())
        if isinstance(feature, (list, tuple)):
            return any(holds_json(f) for f in feature)
        inner = getattr(feature, "feature", None)  # List, LargeList, Sequence
        return inner is not None and holds_json(inner)

    columns = [name for name, feature in features.items() if holds_json(feature)]
    if columns:
        for index, row in enumerate(rows):
            check_unicode(f"{where}: row {index + 1}", {name: row[name] for name in columns})


def check_utf8(where: str, table: Any) -> None:
    """Every string of an Arrow table (Parquet, save_to_disk, ...) is UTF-8, or a UserError names the row and column.

    Arrow stores a string column's bytes unchecked and Python decodes them only when the rows are converted, so
    bytes that are not UTF-8 (or UTF-8-encoded surrogates) would fail inside `to_pylist` with a traceback. A full
    validation checks them all at C speed; only when it fails are the failing chunk's values decoded one by one
    to find the first bad one.
    """
    import pyarrow as pa

    try:
        table.validate(full=True)
        return
    except pa.ArrowInvalid:
        pass
    for name, column in zip(table.column_names, table.columns):
        offset = 0
        for chunk in column.chunks:
            try:
                chunk.validate(full=True)
            except pa.ArrowInvalid as e:
                if "UTF8" not in str(e):  # damaged offsets or lengths: decoding the values could read out of bounds
                    raise UserError(f"{where}: column {name!r} is damaged ({_first_line(e)}); write the file again") from e
                for index in range(len(chunk)):
                    try:
                        chunk[index].as_py()
                    except UnicodeDecodeError as bad:
                        raise UserError(
                            f"{where}: row {offset + index + 1}: column {name!r} is not UTF-8 text (byte {bad.object[bad.start]:#04x} "
                            f"at byte offset {bad.start} of its value); write that value as UTF-8"
                        ) from bad
                raise UserError(f"{where}: column {name!r} is damaged ({_first_line(e)}); write the file again") from e
            offset += len(chunk)

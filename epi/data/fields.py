"""Rows -> examples: a task's `fields` map columns to prompt and response (optionally options), or to a chat's
messages, and for a code task its tests (optionally their entry point); null or empty prompts and responses are
dropped and counted, numbers and bools converted and counted. Part of epi.data.sources.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from epi.data.format import Chat
from epi.data.tasks import CodeTests, Example
from epi.data.text import Row
from epi.errors import UserError

ROLES = ("system", "user", "assistant")
LETTERS = "ABCDEFGHIJ"
MAX_DROPPED = 0.5  # a file that loses more than this fraction of its rows to null or empty fields is mapped wrong


def _column(row: Row, column: str, key: str, task: str, origin: str, index: int) -> Any:
    if column not in row:
        raise UserError(
            f"task {task!r}: field {key}={column!r} is not a column of {origin} (row {index + 1}); "
            f"its columns: {sorted(row)}. Set data.sources.{task}.fields.{key} to one of them."
        )
    return row[column]


def _letter(value: Any, n_options: int, task: str, origin: str, index: int) -> str:
    """The correct option as a letter, from a 0-based index (int or digit string) or a letter."""
    text = str(value).strip()
    position = int(text) if text.isdigit() else LETTERS.find(text.upper()) if len(text) == 1 else -1
    if not 0 <= position < n_options:
        raise UserError(f"task {task!r}: {origin} row {index + 1}: correct option {value!r} is neither an index below {n_options} nor a letter A-{LETTERS[n_options - 1]}")
    return LETTERS[position]


@dataclass
class Tally:
    """What turning rows into examples changed: rows dropped for a null or empty field (by field), values converted to text."""

    rows: int = 0
    dropped: Counter = field(default_factory=Counter)
    converted: int = 0

    def add(self, other: Tally) -> None:
        self.rows += other.rows
        self.dropped.update(other.dropped)
        self.converted += other.converted


def _is_null(value: Any) -> bool:
    """None, or NaN: how pandas writes a missing value into a float column."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _text(task: str, value: Any, column: str, where: str) -> str | None:
    """A prompt or response value as text, None for a null.

    A number becomes str(value) and a bool JSON's `true`/`false` (the file's own spelling); the caller
    counts them. A list or an object has no one text form: stringifying it would train on its repr.
    """
    if isinstance(value, str) or _is_null(value):
        return value
    if isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return str(value)
    raise UserError(
        f"{where}: column {column!r} holds a {type(value).__name__}, not text; "
        f"point data.sources.{task}.fields at a text column (a chat's turns go in fields.messages)"
    )


def _converted(values: list[Any]) -> int:
    return sum(isinstance(v, (int, float)) and not _is_null(v) for v in values)


def _chat(task: str, value: Any, column: str, where: str) -> tuple[tuple[tuple[str, str], ...], int] | None:
    """(turns, contents converted from numbers), or None for a null turn or an empty reply: nothing to learn from."""
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        raise UserError(f"{where}: messages must be a list of {{role, content}} objects")
    contents = [_text(task, m["content"], column, where) for m in value]
    if any(c is None or (m["role"] == "assistant" and not c.strip()) for m, c in zip(value, contents)):
        return None
    messages = [(str(m["role"]), c) for m, c in zip(value, contents)]
    bad = sorted({role for role, _ in messages} - set(ROLES))
    if bad:
        raise UserError(f"{where}: messages: unknown role(s) {bad}; roles are {list(ROLES)}")
    while messages and messages[-1][0] != "assistant":
        messages.pop()  # a trailing question without its answer teaches nothing
    if not messages:
        raise UserError(f"{where}: messages has no assistant turn to train on")
    return tuple(messages), _converted([m["content"] for m in value[: len(messages)]])


def _code_tests(task: str, row: Row, fields: DictConfig, origin: str, index: int) -> CodeTests | None:
    """The row's tests (`fields.tests`: text, or a list of texts such as MBPP's assert lines, joined by newlines) and
    their entry point (`fields.entry_point`); None when the task maps no tests or the row's are null or empty (a
    pass_at_1 task refuses such rows in its val/test splits, `Task`)."""
    if "tests" not in fields:
        return None
    where = f"task {task!r}: {origin} row {index + 1}"
    value = _column(row, fields.tests, "tests", task, origin, index)
    lines = value if isinstance(value, list) else [value]
    code = "\n".join(_text(task, v, fields.tests, where) for v in lines if not _is_null(v))
    if not code.strip():
        return None
    entry = None
    if "entry_point" in fields:
        entry = _text(task, _column(row, fields.entry_point, "entry_point", task, origin, index), fields.entry_point, where)
    return CodeTests(code, entry.strip() if entry and entry.strip() else None)


def to_example(task: str, row: Row, fields: DictConfig, origin: str, index: int, tally: Tally) -> Example | Chat | None:
    """One row as an example, by the task's field mapping; None, counted in `tally`, for a null or empty prompt or response."""
    where = f"task {task!r}: {origin} row {index + 1}"

    def get(key: str, column: str) -> Any:
        return _column(row, column, key, task, origin, index)

    def drop(key: str) -> None:
        tally.dropped[key] += 1

    if "messages" in fields:
        value = get("messages", fields.messages)
        chat = None if _is_null(value) else _chat(task, value, fields.messages, where)
        if chat is None:
            return drop("messages")
        tally.converted += chat[1]
        return Chat(task, chat[0], _code_tests(task, row, fields, origin, index))
    columns = [fields.prompt] if isinstance(fields.prompt, str) else list(fields.prompt)
    values = [get("prompt", c) for c in columns]
    parts = [t for t in (_text(task, v, c, where) for v, c in zip(values, columns)) if t is not None and t.strip()]
    if not parts:
        return drop("prompt")
    answer = get("response", fields.response)
    if _is_null(answer) or (isinstance(answer, str) and not answer.strip()):
        return drop("response")
    if "options" in fields:
        options = get("options", fields.options)
        if not isinstance(options, list) or not options or len(options) > len(LETTERS):
            raise UserError(f"{where}: options must be a list of 1 to {len(LETTERS)} answers")
        parts.append("\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options)))
        response = _letter(answer, len(options), task, origin, index)  # an index is the option's position, not text
    else:
        response = _text(task, answer, fields.response, where)
        values.append(answer)
    tally.converted += _converted(values)
    return Example(task, "\n\n".join(parts), response, _code_tests(task, row, fields, origin, index))


def _check_dropped(task: str, origin: str, fields: DictConfig, tally: Tally) -> None:
    """More than MAX_DROPPED of a file lost to null or empty fields is a wrong column or a broken file, not noise."""
    total = sum(tally.dropped.values())
    if total > MAX_DROPPED * tally.rows:
        keys = [key for key, _ in tally.dropped.most_common()]
        raise UserError(
            f"task {task!r}: {total} of {tally.rows} rows of {origin} have a null or empty "
            + " or ".join(f"{key} (column {OmegaConf.to_container(fields)[key]!r})" for key in keys)
            + f"; more than {MAX_DROPPED:.0%} of a file is not dropped silently: check data.sources.{task}.fields.{keys[0]}"
        )

"""Real datasets: rows from the Hugging Face hub or local files, mapped to examples by a task's `fields`.

A task config (`conf/data/task/*.yaml`, under `data.sources.<task>`) names where its rows
come from and which columns hold what (keys it leaves out take `SOURCE_DEFAULTS`):

- `hub` + `config` + split names in `train`/`val`/`eval`, or `hub: null` and local files
  (a path, a glob or a list of them; JSONL, JSON, CSV or Parquet, each possibly gzipped,
  or a `datasets` save_to_disk directory) in `train`/`val`/`eval`;
- `fields`: `prompt` (a column or a list of columns joined by a blank line) and
  `response`; optionally `options` (a list column, rendered `A. ...` under the prompt,
  the response column then holding the correct option as an index or a letter); or
  `messages` (a list of {role, content}: a multi-turn chat, every assistant turn trained).

Splits: `val` rows are the val split and `eval` rows the test split; each one left null is
a `holdout` of the training rows instead (by a hash of the prompt, so no prompt is in two
splits), val first. Each split is then shuffled with `data.seed` and
cut to `data.n_<split>`.

Values are read as written: a row with a null or empty prompt or response is dropped and
counted (an error past `MAX_DROPPED` of a file), numbers and bools become text and are
counted, a list or an object where text belongs is an error. A row that cannot be read one way
only is refused when it is read, naming the file and its line (or row): a JSON object with a key
twice, a string that is not valid Unicode (an unpaired surrogate escape in JSON, bytes that are
not UTF-8 in a Parquet or Arrow string column).

Reading runs no code from the data: JSON through the standard library's decoder, CSV through
`csv`, Parquet and save_to_disk directories through pyarrow (whose pickle-based extension types
are gone) and `datasets.load_from_disk` (JSON state files and Arrow files), hub datasets through
`datasets.load_dataset`, which since `datasets` 4 refuses a loading script.
"""

from __future__ import annotations

import codecs
import csv
import glob
import gzip
import io
import json
import math
import random
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from epi import hub
from epi.data.format import Chat
from epi.data.scorers import SCORERS
from epi.data.tasks import SPLITS, Example, Task
from epi.errors import UserError

FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
GZIP_MAGIC = b"\x1f\x8b"
SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")  # what datasets' save_to_disk writes
SAVED_SPLITS = {"train": "train", "val": "validation", "eval": "test"}  # the split of a saved DatasetDict each key reads
ROLES = ("system", "user", "assistant")
LETTERS = "ABCDEFGHIJ"
FIELD_SETS = ({"prompt", "response"}, {"prompt", "response", "options"}, {"messages"})
MAX_DROPPED = 0.5  # a file that loses more than this fraction of its rows to null or empty fields is mapped wrong
# Every key of a data source and its default: a source need not inherit a task config; `train` and `fields` are required.
SOURCE_DEFAULTS: dict[str, Any] = {
    "hub": None, "config": None, "train": None, "val": None, "eval": None, "holdout": 0.05, "format": None, "fields": None, "scorer": "exact_match",
}

Row = dict[str, Any]


class _DuplicateKey(ValueError):
    """A JSON object that names a key twice; raised while decoding, turned into a UserError naming the file and line."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object's key/value pairs as a dict; a key given twice is an error, not "the last one wins".

    `json.loads` silently keeps the last value, so `{"prompt": "a", "prompt": "b"}` would train on "b"
    while another reader (or the person who wrote the file) means "a": an ambiguous row is a bug in the
    data, and the run refuses it rather than guess (task.yaml, read by OmegaConf, refuses duplicate keys too).
    """
    row = dict(pairs)
    if len(row) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return row


# One decoder for every JSON value read (json.loads with a hook would build one per line): the duplicate-key check
# then costs about a tenth of the decoding.
_JSON = json.JSONDecoder(object_pairs_hook=_unique_keys)
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


# --------------------------------------------------------------------------- the source's keys


def _require(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise UserError(f"{key}={value!r}: {rule}")


def with_defaults(source: DictConfig) -> DictConfig:
    """The source with `SOURCE_DEFAULTS` for the keys it leaves out."""
    return OmegaConf.merge(SOURCE_DEFAULTS, source)


def validate_source(key: str, source: DictConfig) -> None:
    """A task read from a dataset: known keys only, where its rows are, which columns hold what, how it is scored."""
    for name in source:
        _require(name in SOURCE_DEFAULTS, f"{key}.{name}", source[name], f"unknown key; valid keys: {sorted(SOURCE_DEFAULTS)}")
    source = with_defaults(source)
    _require(source.scorer in SCORERS, f"{key}.scorer", source.scorer, f"unknown scorer; valid scorers: {sorted(SCORERS)}")
    fields = set(source.fields or {})
    _require(
        fields in FIELD_SETS, f"{key}.fields", sorted(fields),
        "must map prompt and response (optionally options), or messages, to columns (e.g. {prompt: question, response: answer})",
    )
    _require(source.train is not None, f"{key}.train", source.train, "must name a hub split, or local file(s) when hub is null")
    _require(0 <= source.holdout < 0.5, f"{key}.holdout", source.holdout, "must be in [0, 0.5), the fraction of training rows held out for val (and test) when no file gives it")
    _require(source.format is None or source.format in FORMATS.values(), f"{key}.format", source.format, f"must be one of {sorted(set(FORMATS.values()))} or null")


# --------------------------------------------------------------------------- reading rows


def file_format(path: Path, fmt: str | None) -> str:
    """`format` when set, else the extension under any `.gz` (`rows.jsonl.gz` is JSONL)."""
    found = fmt or FORMATS.get(Path(path.name.lower().removesuffix(".gz")).suffix)
    if found is None:
        raise UserError(f"{path}: cannot tell the format from the extension; name it with format=jsonl|json|csv|parquet")
    return found


def read_file(path: Path, fmt: str | None) -> list[Row]:
    """All rows of one local file, gunzipped if it is gzip whatever its name; a malformed or empty file is a UserError naming it."""
    fmt = file_format(path, fmt)
    data = path.read_bytes()
    compressed = data.startswith(GZIP_MAGIC)
    if compressed:
        data = _gunzip(path, data)
    if fmt == "parquet":
        rows = _parquet(path, data)
    else:
        text = _decode(path, data, compressed)
        rows = _jsonl(path, text) if fmt == "jsonl" else _json(path, text) if fmt == "json" else _csv(path, text)
    if not rows:
        raise UserError(f"{path}: empty file, no rows")
    return rows


def _gunzip(path: Path, data: bytes) -> bytes:
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a cut-off file is an EOFError
        raise UserError(f"{path}: corrupt gzip file ({e}); re-compress it or give the uncompressed file") from e


def _decode(path: Path, data: bytes, compressed: bool) -> str:
    """UTF-8 text; utf-8-sig, because a byte-order mark (as Excel and Notepad write) is not part of the first value."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        offset = e.start + len(codecs.BOM_UTF8) * data.startswith(codecs.BOM_UTF8)  # utf-8-sig counts after the mark
        where = " of the decompressed data" if compressed else ""
        raise UserError(f"{path}: not UTF-8 text (byte {data[offset]:#04x} at byte offset {offset}{where}); re-save it as UTF-8") from e


def _jsonl(path: Path, text: str) -> list[Row]:
    """One object per line; lines end at "\n" only (U+2028 or U+0085 inside a string is text, not a line end)."""
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            row = _JSON.decode(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: malformed JSON line ({e.msg}); each line must be one JSON object") from e
        except _DuplicateKey as e:
            raise UserError(f"{path}:{number}: {_duplicate(e.key)}") from e
        if not isinstance(row, dict):
            raise UserError(f"{path}:{number}: a JSON {type(row).__name__}, not an object; each line must be one JSON object")
        if _may_hold_surrogate(line):
            check_unicode(f"{path}:{number}", row)
        rows.append(row)
    return rows


def _duplicate(key: str) -> str:
    return f"key {key!r} appears twice in one object; keep one (which of the two values is meant is ambiguous)"


def _json(path: Path, text: str) -> list[Row]:
    if not text.strip():
        return []
    try:
        data = _JSON.decode(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); a .json file holds one list of objects") from e
    except _DuplicateKey as e:
        raise UserError(f"{_json_row(path, text, None)}: {_duplicate(e.key)}") from e
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise UserError(f"{path}: a .json file must hold one list of objects (for one object per line use .jsonl)")
    if _may_hold_surrogate(text):
        for index, row in enumerate(data):
            if _unicode_problem(row):
                check_unicode(_json_row(path, text, index), row)
    return data


_JSON_SPACE = re.compile(r"[ \t\r\n]*")
_BETWEEN_ROWS = re.compile(r"[ \t\r\n,]*")


def _json_row(path: Path, text: str, index: int | None) -> str:
    """Where row `index` of a .json file is ("<path>: row 3 (line 12)"), or the first row naming a key twice when
    `index` is None; `path` alone when the file is not a list.

    Only called once the file is known to hold the problem: the decoder reports no positions, so the top-level
    list is decoded again, one object at a time, to find where that one starts.
    """
    position = _JSON_SPACE.match(text).end()
    if not text.startswith("[", position):
        return str(path)
    position, row = position + 1, 0
    while True:
        start = _BETWEEN_ROWS.match(text, position).end()
        try:
            _, position = _JSON.raw_decode(text, start)
        except _DuplicateKey:
            if index is None:
                break
            raise
        if row == index:
            break
        row += 1
    line = text.count("\n", 0, start) + 1
    return f"{path}: row {row + 1} (line {line})"


def _csv(path: Path, text: str) -> list[Row]:
    """Parsed as a whole file, so a quoted value keeps its line breaks; a row of the wrong length is malformed."""
    reader = csv.DictReader(io.StringIO(text, newline=""))  # extra values go under the key None, missing ones are None
    rows = []
    try:
        for row in reader:
            if None in row or None in row.values():
                raise UserError(
                    f"{path}:{reader.line_num}: a row with {'more' if None in row else 'fewer'} values than the header's "
                    f"{len(reader.fieldnames)} columns; quote values that hold a comma"
                )
            rows.append(row)
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: malformed CSV ({e})") from e
    return rows


def _parquet(path: Path, data: bytes) -> list[Row]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise UserError(f"{path}: reading Parquet needs pyarrow: pip install -r requirements.txt") from e
    try:
        table = pq.read_table(pa.BufferReader(data))
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise UserError(f"{path}: not a readable Parquet file ({e})") from e
    check_utf8(str(path), table)
    try:
        return table.to_pylist()
    except Exception as e:  # a value Python cannot hold, e.g. a timestamp past the year 9999
        raise UserError(f"{path}: not a readable Parquet file ({_first_line(e)})") from e


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


# --------------------------------------------------------------------------- text that is not Unicode


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


def is_saved_dataset(path: Path) -> bool:
    return any((path / name).is_file() for name in SAVED_DATASET_FILES)


def read_saved_dataset(path: Path, key: str, split: str) -> list[Row]:
    """Rows of a `datasets` save_to_disk directory; of a saved DatasetDict, `split` (the one `key` reads)."""
    try:
        import datasets
    except ImportError as e:
        raise UserError(f"{path}: reading a save_to_disk directory needs the `datasets` package: pip install -r requirements.txt") from e
    try:
        saved = datasets.load_from_disk(str(path))
    except Exception as e:  # missing or damaged arrow files, a newer format: the directory is the user's to fix
        raise UserError(f"{path}: not a readable datasets save_to_disk directory ({_first_line(e)})") from e
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            other = [s for s in sorted(saved) if s != "train"] or sorted(saved)
            raise UserError(
                f"{key}={str(path)!r}: a DatasetDict without a {split!r} split (its splits: {sorted(saved)}); "
                f"name one split's directory, e.g. {path / other[0]}"
            )
        saved = saved[split]
    if not len(saved):
        raise UserError(f"{path}: empty dataset, no rows")
    check_utf8(str(path), saved.data.table)
    try:
        rows = saved.to_list()
    except Exception as e:  # a value Python cannot hold, e.g. a timestamp past the year 9999
        raise UserError(f"{path}: not a readable datasets save_to_disk directory ({_first_line(e)})") from e
    check_json_columns(str(path), saved.features, rows)
    return rows


def local_files(task: str, key: str, spec: str | list[str]) -> list[Path]:
    """The files (or save_to_disk directories) a `train`/`val`/`eval` entry names: paths or globs, each matching at least one."""
    paths = []
    for pattern in [spec] if isinstance(spec, str) else spec:
        found = sorted(glob.glob(str(Path(pattern).expanduser()))) if glob.has_magic(pattern) else [pattern]
        for f in found:
            path = Path(f).expanduser()
            if path.is_dir() and not is_saved_dataset(path):
                raise UserError(
                    f"data.sources.{task}.{key}={pattern!r}: {path} is a directory, not a file; name the files in it "
                    f"(a glob such as '{path}/*.jsonl') or a datasets save_to_disk directory"
                )
            if not path.exists():
                raise UserError(f"data.sources.{task}.{key}={pattern!r}: no such file")
            paths.append(path)
        if not found:
            raise UserError(f"data.sources.{task}.{key}={pattern!r}: no file matches")
    return paths


def hub_rows(task: str, path: str, config: str | None, split: str) -> list[Row]:
    """One split of a hub dataset; without the hub this fails in seconds and says how to use local files."""
    fix = (
        f"Point the task at local files instead: data.sources.{task}.hub=null "
        f"data.sources.{task}.train=/path/train.jsonl data.sources.{task}.eval=/path/test.jsonl "
        "(JSONL, JSON, CSV or Parquet with the columns named in fields)."
    )
    where = f"task {task!r}: hub dataset {path!r}" + (f" (config {config!r}, split {split!r})" if config else f" (split {split!r})")
    offline = hub.offline_env(hub.DATASETS)
    reason = None if offline else hub.unreachable_reason(hub.DATASETS)  # offline: `datasets` tries its cache, fast
    if reason:
        raise UserError(f"{where} cannot be fetched: {reason}. {fix}")
    try:
        import datasets
    except ImportError as e:
        raise UserError(f"{where}: loading hub datasets needs the `datasets` package: pip install -r requirements.txt") from e
    try:
        dataset = datasets.load_dataset(path, config, split=split)
        rows = dataset.to_list()
    except Exception as e:  # connection, missing dataset / config / split: all the user's to fix
        raise UserError(f"{where} cannot be loaded ({_first_line(e)}" + (f"; {offline}" if offline else "") + f"). {fix}") from e
    check_json_columns(where, dataset.features, rows)
    return rows


def _origins(task: str, source: DictConfig, key: str) -> list[tuple[str, list[Row]]]:
    """(where the rows came from, rows) for each file, or for the hub split, of `train`, `val` or `eval`."""
    spec = source[key]
    if source.hub:
        return [(f"hub dataset {source.hub} split {spec}", hub_rows(task, source.hub, source.config, spec))]
    spec = OmegaConf.to_container(spec) if isinstance(spec, ListConfig) else spec
    return [
        (str(path), read_saved_dataset(path, f"data.sources.{task}.{key}", SAVED_SPLITS[key]) if path.is_dir() else read_file(path, source.format))
        for path in local_files(task, key, spec)
    ]


# --------------------------------------------------------------------------- rows -> examples


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
        return Chat(task, chat[0])
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
    return Example(task, "\n\n".join(parts), response)


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


def _examples(task: str, source: DictConfig, key: str, tally: Tally) -> list[Example | Chat]:
    """The examples of every file (or the hub split) of `train`, `val` or `eval`; each file's dropped rows are checked and added to `tally`."""
    examples = []
    for origin, rows in _origins(task, source, key):
        counts = Tally(rows=len(rows))
        examples += [ex for i, row in enumerate(rows) if (ex := to_example(task, row, source.fields, origin, i, counts)) is not None]
        _check_dropped(task, origin, source.fields, counts)
        tally.add(counts)
    return examples


def holdout_key(ex: Example | Chat) -> str:
    """What a split is assigned by: the prompt, or everything but the replies (a shared system prompt alone would put all in one split)."""
    if isinstance(ex, Chat):
        return "\n".join(content for role, content in ex.messages if role != "assistant")
    return ex.prompt


def _holdout_bucket(ex: Example | Chat) -> float:
    """A stable number in [0, 1) from the prompt: the same prompt always lands in the same split."""
    return zlib.crc32(holdout_key(ex).encode()) % 100_000 / 100_000


def load_source_task(name: str, source: DictConfig, data: DictConfig) -> Task:
    """Read, map, split, shuffle with data.seed and cut a task to data.n_train / n_val / n_test.

    What reading changed (rows dropped for a null or empty field, values converted to text) is printed
    when anything was, and kept in `Task.input_stats` for the run's log.
    """
    source, tally = with_defaults(source), Tally()
    train = _examples(name, source, "train", tally)
    splits: dict[str, list] = {s: [] for s in SPLITS}
    held_out = [split for split, key in (("val", "val"), ("test", "eval")) if source[key] is None]
    for ex in train:
        bucket = _holdout_bucket(ex)
        slot = next((split for i, split in enumerate(held_out) if bucket < (i + 1) * source.holdout), "train")
        splits[slot].append(ex)
    for split, key in (("val", "val"), ("test", "eval")):
        if source[key] is not None:
            splits[split] = _examples(name, source, key, tally)
    for split in SPLITS:
        random.Random(f"{name}:{split}:{data.seed}").shuffle(splits[split])
        splits[split] = splits[split][: data[f"n_{split}"]]
        if not splits[split]:
            raise UserError(
                f"task {name!r}: no {split} examples (from {len(train)} training rows, holdout={source.holdout}); "
                f"give more rows, a larger data.sources.{name}.holdout, or its own rows in data.sources.{name}.{'val' if split == 'val' else 'eval'}"
            )
    stats = {"rows": tally.rows, "empty_dropped": sum(tally.dropped.values()), "converted": tally.converted}
    if stats["empty_dropped"] or stats["converted"]:
        print(
            f"task {name!r}: {stats['empty_dropped']} of {stats['rows']} rows dropped for a null or empty prompt or response, "
            f"{stats['converted']} numbers or booleans converted to text"
        )
    return Task(name=name, splits=splits, scorer=source.scorer, input_stats=stats)

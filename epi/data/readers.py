"""Reading rows: local files of each format (JSONL, JSON, CSV, Parquet, each possibly gzipped), `datasets`
save_to_disk directories and hub splits, each problem one UserError naming the file and its line (or row).
Part of epi.data.sources (whose docstring states what reading guarantees).
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import re
import zlib
from pathlib import Path
from typing import Any

from epi import hub
from epi.data.text import Row, _first_line, _may_hold_surrogate, _unicode_problem, check_json_columns, check_unicode, check_utf8
from epi.errors import UserError

FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
GZIP_MAGIC = b"\x1f\x8b"
SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")  # what datasets' save_to_disk writes


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

"""Real datasets: rows from the Hugging Face hub or local files, mapped to examples by a task's `fields`.

A task config (`conf/data/task/*.yaml`, under `data.sources.<task>`) names where its rows
come from and which columns hold what:

- `hub` + `config` + split names in `train`/`eval`, or `hub: null` and local files
  (a path, a glob or a list of them; JSONL, JSON, CSV or Parquet) in `train`/`eval`;
- `fields`: `prompt` (a column or a list of columns joined by a blank line) and
  `response`; optionally `options` (a list column, rendered `A. ...` under the prompt,
  the response column then holding the correct option as an index or a letter); or
  `messages` (a list of {role, content}: a multi-turn chat, every assistant turn trained).

Splits: `eval` rows are the test split; `holdout` of the training rows (by a hash of
the prompt, so no prompt is in two splits) is the val split, and with `eval: null` a
second `holdout` is the test split. Each split is then shuffled with `data.seed` and
cut to `data.n_<split>`.
"""

from __future__ import annotations

import csv
import glob
import json
import random
import zlib
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from epi import hub
from epi.data.format import Chat
from epi.data.tasks import SPLITS, Example, Task
from epi.errors import UserError

FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
ROLES = ("system", "user", "assistant")
LETTERS = "ABCDEFGHIJ"
FIELD_SETS = ({"prompt", "response"}, {"prompt", "response", "options"}, {"messages"})

Row = dict[str, Any]


# --------------------------------------------------------------------------- reading rows


def read_file(path: Path, fmt: str | None) -> list[Row]:
    """All rows of one local file; a malformed line or an empty file is a UserError naming the file."""
    fmt = fmt or FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: cannot tell the format from the extension; name it with format=jsonl|json|csv|parquet")
    if fmt == "parquet":
        rows = _parquet(path)
    else:
        text = path.read_text(encoding="utf-8")
        if fmt == "jsonl":
            rows = _jsonl(path, text)
        elif fmt == "json":
            rows = _json(path, text)
        else:
            rows = list(csv.DictReader(text.splitlines()))
    if not rows:
        raise UserError(f"{path}: empty file, no rows")
    return rows


def _jsonl(path: Path, text: str) -> list[Row]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: malformed JSON line ({e.msg}); each line must be one JSON object") from e
        if not isinstance(row, dict):
            raise UserError(f"{path}:{number}: a JSON {type(row).__name__}, not an object; each line must be one JSON object")
        rows.append(row)
    return rows


def _json(path: Path, text: str) -> list[Row]:
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); a .json file holds one list of objects") from e
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise UserError(f"{path}: a .json file must hold one list of objects (for one object per line use .jsonl)")
    return data


def _parquet(path: Path) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise UserError(f"{path}: reading Parquet needs pyarrow: pip install -r requirements.txt") from e
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise UserError(f"{path}: not a readable Parquet file ({e})") from e


def local_files(task: str, key: str, spec: str | list[str]) -> list[Path]:
    """The files a `train`/`eval` entry names: paths or globs, each matching at least one file."""
    paths = []
    for pattern in [spec] if isinstance(spec, str) else spec:
        found = sorted(glob.glob(str(Path(pattern).expanduser()))) if glob.has_magic(pattern) else [pattern]
        for f in found:
            if not Path(f).expanduser().is_file():
                raise UserError(f"data.sources.{task}.{key}={pattern!r}: no such file")
            paths.append(Path(f).expanduser())
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
        return datasets.load_dataset(path, config, split=split).to_list()
    except Exception as e:  # connection, missing dataset / config / split: all the user's to fix
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{where} cannot be loaded ({first_line}" + (f"; {offline}" if offline else "") + f"). {fix}") from e


def _origins(task: str, source: DictConfig, key: str) -> list[tuple[str, list[Row]]]:
    """(where the rows came from, rows) for each file, or for the hub split, of `train` or `eval`."""
    spec = source[key]
    if source.hub:
        return [(f"hub dataset {source.hub} split {spec}", hub_rows(task, source.hub, source.config, spec))]
    spec = OmegaConf.to_container(spec) if isinstance(spec, ListConfig) else spec
    return [(str(path), read_file(path, source.format)) for path in local_files(task, key, spec)]


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


def _chat(value: Any, task: str, origin: str, index: int) -> tuple[tuple[str, str], ...]:
    where = f"task {task!r}: {origin} row {index + 1}: messages"
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        raise UserError(f"{where} must be a list of {{role, content}} objects")
    messages = [(str(m["role"]), str(m["content"])) for m in value]
    bad = sorted({role for role, _ in messages} - set(ROLES))
    if bad:
        raise UserError(f"{where}: unknown role(s) {bad}; roles are {list(ROLES)}")
    while messages and messages[-1][0] != "assistant":
        messages.pop()  # a trailing question without its answer teaches nothing
    if not messages:
        raise UserError(f"{where} has no assistant turn to train on")
    return tuple(messages)


def to_example(task: str, row: Row, fields: DictConfig, origin: str, index: int) -> Example | Chat:
    """One row as an example, by the task's field mapping."""
    def get(key: str, column: str) -> Any:
        return _column(row, column, key, task, origin, index)

    if "messages" in fields:
        return Chat(task, _chat(get("messages", fields.messages), task, origin, index))
    columns = [fields.prompt] if isinstance(fields.prompt, str) else list(fields.prompt)
    parts = [str(v) for v in (get("prompt", c) for c in columns) if v is not None and str(v).strip()]
    response = get("response", fields.response)
    if "options" in fields:
        options = get("options", fields.options)
        if not isinstance(options, list) or not options or len(options) > len(LETTERS):
            raise UserError(f"task {task!r}: {origin} row {index + 1}: options must be a list of 1 to {len(LETTERS)} answers")
        parts.append("\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options)))
        response = _letter(response, len(options), task, origin, index)
    return Example(task, "\n\n".join(parts), "" if response is None else str(response))


def holdout_key(ex: Example | Chat) -> str:
    """What a split is assigned by: the prompt, or everything but the replies (a shared system prompt alone would put all in one split)."""
    if isinstance(ex, Chat):
        return "\n".join(content for role, content in ex.messages if role != "assistant")
    return ex.prompt


def _holdout_bucket(ex: Example | Chat) -> float:
    """A stable number in [0, 1) from the prompt: the same prompt always lands in the same split."""
    return zlib.crc32(holdout_key(ex).encode()) % 100_000 / 100_000


def load_source_task(name: str, source: DictConfig, data: DictConfig) -> Task:
    """Read, map, split, shuffle with data.seed and cut a task to data.n_train / n_val / n_test."""
    train = [to_example(name, row, source.fields, origin, i) for origin, rows in _origins(name, source, "train") for i, row in enumerate(rows)]
    splits: dict[str, list] = {s: [] for s in SPLITS}
    for ex in train:
        bucket = _holdout_bucket(ex)
        held = "val" if bucket < source.holdout else "test" if source.eval is None and bucket < 2 * source.holdout else "train"
        splits[held].append(ex)
    if source.eval is not None:
        splits["test"] = [to_example(name, row, source.fields, origin, i) for origin, rows in _origins(name, source, "eval") for i, row in enumerate(rows)]
    for split in SPLITS:
        random.Random(f"{name}:{split}:{data.seed}").shuffle(splits[split])
        splits[split] = splits[split][: data[f"n_{split}"]]
        if not splits[split]:
            raise UserError(
                f"task {name!r}: no {split} examples (from {len(train)} training rows, holdout={source.holdout}); "
                f"give more rows, a larger data.sources.{name}.holdout, or an eval split"
            )
    return Task(name=name, splits=splits, scorer=source.scorer)

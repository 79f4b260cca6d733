"""Real datasets: rows from the Hugging Face hub or local files, mapped to examples by a task's `fields`.

A task config (`conf/data/task/*.yaml`, under `data.sources.<task>`) names where its rows
come from and which columns hold what (keys it leaves out take `SOURCE_DEFAULTS`):

- `hub` + `config` + split names in `train`/`val`/`eval`, or `hub: null` and local files
  (a path, a glob or a list of them; JSONL, JSON, CSV or Parquet, each possibly gzipped,
  or a `datasets` save_to_disk directory) in `train`/`val`/`eval`; a path `pkg:NAME/FILE`
  is FILE inside the installed Python package NAME (HumanEval's data file, say), found
  without importing it;
- `fields`: `prompt` (a column or a list of columns joined by a blank line) and
  `response`; optionally `options` (a list column, rendered `A. ...` under the prompt,
  the response column then holding the correct option as an index or a letter); or
  `messages` (a list of {role, content}: a multi-turn chat, every assistant turn trained).
  A code task adds `tests` (the test code, or a list of assert lines) and optionally
  `entry_point` (the function they check), which the `pass_at_1` scorer runs.

Splits: `val` rows are the val split and `eval` rows the test split; each one left null is
a `holdout` of the training rows instead (by a hash of the prompt, so no prompt is in two
splits), val first. `train: null` makes an evaluation-only task (HumanEval): no training
split, `eval` rows as the test split and, unless `val` names its own, as the val split too.
Each split is then shuffled with `data.seed` and cut to `data.n_<split>`.

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

import glob
import importlib.util
import random
import zlib
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from epi.data.fields import LETTERS, MAX_DROPPED, ROLES, Tally, _check_dropped, to_example
from epi.data.format import Chat
from epi.data.readers import (
    FORMATS,
    GZIP_MAGIC,
    SAVED_DATASET_FILES,
    file_format,
    hub_rows,
    is_saved_dataset,
    read_file,
    read_saved_dataset,
)
from epi.data.scorers import BY_EXECUTION, SCORERS
from epi.data.tasks import SPLITS, Example, Task
from epi.data.text import Row, check_json_columns, check_unicode, check_utf8
from epi.errors import UserError

# The names other modules and the tests import from here; reading files, mapping fields and the Unicode checks
# live in epi.data.readers, epi.data.fields and epi.data.text.
__all__ = [
    "FIELD_SETS", "FORMATS", "GZIP_MAGIC", "LETTERS", "MAX_DROPPED", "ROLES", "SAVED_DATASET_FILES", "SAVED_SPLITS",
    "SOURCE_DEFAULTS", "Row", "Tally", "check_json_columns", "check_unicode", "check_utf8", "file_format", "holdout_key",
    "hub_rows", "is_saved_dataset", "load_source_task", "local_files", "read_file", "read_saved_dataset", "to_example",
    "validate_source", "with_defaults",
]

SAVED_SPLITS = {"train": "train", "val": "validation", "eval": "test"}  # the split of a saved DatasetDict each key reads
FIELD_SETS = ({"prompt", "response"}, {"prompt", "response", "options"}, {"messages"})
CODE_FIELDS = {"tests", "entry_point"}  # what a code task maps besides one of FIELD_SETS (pass_at_1)
# Every key of a data source and its default: a source need not inherit a task config; `fields` is required, and
# `train` unless `eval` names the rows of an evaluation-only task.
SOURCE_DEFAULTS: dict[str, Any] = {
    "hub": None, "config": None, "train": None, "val": None, "eval": None, "holdout": 0.05, "format": None, "fields": None, "scorer": "exact_match",
}


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
        fields - CODE_FIELDS in FIELD_SETS, f"{key}.fields", sorted(fields),
        "must map prompt and response (optionally options), or messages, to columns (e.g. {prompt: question, response: answer}); "
        "a code task also tests (and optionally entry_point)",
    )
    _require("entry_point" not in fields or "tests" in fields, f"{key}.fields", sorted(fields),
             "entry_point names the function the tests check: map tests too")
    _require(source.scorer not in BY_EXECUTION or "tests" in fields, f"{key}.scorer", source.scorer,
             "runs each example's tests: map the column that holds them with fields.tests")
    _require(source.train is not None or source.eval is not None, f"{key}.train", source.train,
             "must name a hub split, or local file(s) when hub is null; null only for an evaluation-only task, whose rows `eval` names")
    _require(0 <= source.holdout < 0.5, f"{key}.holdout", source.holdout, "must be in [0, 0.5), the fraction of training rows held out for val (and test) when no file gives it")
    _require(source.format is None or source.format in FORMATS.values(), f"{key}.format", source.format, f"must be one of {sorted(set(FORMATS.values()))} or null")


def local_files(task: str, key: str, spec: str | list[str]) -> list[Path]:
    """The files (or save_to_disk directories) a `train`/`val`/`eval` entry names: paths or globs, each matching at least one."""
    paths = []
    for pattern in [spec] if isinstance(spec, str) else spec:
        if pattern.startswith(PACKAGE):
            paths.append(package_file(task, key, pattern))
            continue
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



PACKAGE = "pkg:"  # pkg:NAME/FILE: a file inside an installed Python package, as model.name_or_path=pkg:NAME names its directory


def package_file(task: str, key: str, spec: str) -> Path:
    """The file `pkg:NAME/FILE` names, inside the installed package NAME; the package is found, not imported."""
    package, _, inner = spec[len(PACKAGE) :].partition("/")
    found = importlib.util.find_spec(package) if package.isidentifier() else None
    if found is None or not found.submodule_search_locations:
        raise UserError(f"data.sources.{task}.{key}={spec!r}: Python package {package!r} is not installed "
                        f"(pip install {package.replace('_', '-')})")
    path = Path(found.submodule_search_locations[0]) / inner
    if not inner or not path.is_file():
        raise UserError(f"data.sources.{task}.{key}={spec!r}: package {package!r} has no file {inner!r}")
    return path


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
    evaluation_only = source.train is None
    train = [] if evaluation_only else _examples(name, source, "train", tally)
    splits: dict[str, list] = {s: [] for s in SPLITS}
    held_out = [split for split, key in (("val", "val"), ("test", "eval")) if source[key] is None]
    for ex in train:
        bucket = _holdout_bucket(ex)
        slot = next((split for i, split in enumerate(held_out) if bucket < (i + 1) * source.holdout), "train")
        splits[slot].append(ex)
    for split, key in (("val", "val"), ("test", "eval")):
        if source[key] is not None:
            splits[split] = _examples(name, source, key, tally)
    if evaluation_only and source.val is None:
        splits["val"] = list(splits["test"])  # no other rows to hold out: val is the test rows (HumanEval has no val split)
    for split in SPLITS:
        random.Random(f"{name}:{split}:{data.seed}").shuffle(splits[split])
        splits[split] = splits[split][: data[f"n_{split}"]]
        if not splits[split] and not (evaluation_only and split == "train"):
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
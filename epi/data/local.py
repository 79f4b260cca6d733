"""A directory of task folders as data sources: `python train.py data=local data.root=/path/to/tasks`.

Every folder under `data.root` is a task named after it; `data.tasks` picks some of them (null or
empty: all, sorted). A folder's files are found by name, `train.*`, `validation.*` or `val.*` and
`test.*`, in any format `read_file` reads (JSONL, JSON, CSV, Parquet, each possibly gzipped). Its
fields come from the first training row's columns (`FIELD_STYLES`, the first match wins) and its
scorer is `exact_match`. Over what was found, an optional `task.yaml` in the folder sets any source
key, and `data.sources.<task>` sets any key over both; each key replaces the one below it whole, so
a `fields` of another kind never mixes with the detected one. A directory (or a broken link) named like
a split's file is an error, not passed over. task.yaml is read by OmegaConf's YAML loader, a
yaml.SafeLoader (no Python tags, a key given twice refused), and nothing under `data` is instantiated.

The result is plain `data.sources` entries and a `data.tasks` list, so validation, loading, the run's
saved config and resume see an ordinary dataset mixture. Expanding an expanded config changes nothing
(every key is then given), which is what lets `eval.py run_dir=...` expand a run's saved config again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from epi.data.sources import FORMATS, SOURCE_DEFAULTS, local_files, read_file, read_saved_dataset, validate_source
from epi.errors import UserError

TASK_FILE = "task.yaml"
# source key -> the file names (before the extension) that fill it; `eval` is the test split
FILE_STEMS = {"train": ("train",), "val": ("validation", "val"), "eval": ("test",)}
PATH_KEYS = tuple(FILE_STEMS)
# The columns each style needs, in the order tried, and the fields it maps them to.
FIELD_STYLES: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = (
    (("messages",), {"messages": "messages"}),
    (("prompt", "response"), {"prompt": "prompt", "response": "response"}),
    (("instruction", "input", "output"), {"prompt": ["instruction", "input"], "response": "output"}),
    (("instruction", "output"), {"prompt": "instruction", "response": "output"}),
    (("question", "answer"), {"prompt": "question", "response": "answer"}),
)
EXTENSIONS = "train.jsonl (or .json, .csv, .parquet, any of them .gz)"


def expand_root(data: DictConfig) -> DictConfig:
    """`data` with each chosen folder under `data.root` as a source and `data.tasks` naming them; `data` itself when root is null.

    It runs before validation because the schema wants `data.tasks` as a list and each source whole.
    Prints one line per task: the files it reads and the fields it maps, so a wrong guess shows at once.
    """
    if OmegaConf.is_missing(data, "root"):
        raise UserError("data.root is not set; data=local reads one folder per task: data.root=/path/to/tasks")
    if data.get("root") is None:
        return data
    root = Path(data.root).expanduser()
    folders = task_folders(root)
    chosen = chosen_tasks(list(data.tasks or []), folders, root)
    given = OmegaConf.to_container(data.sources) if data.sources else {}
    expanded = data.copy()
    expanded.tasks = chosen
    expanded.sources = {**given, **{name: folder_source(name, folders[name], given.get(name) or {}) for name in chosen}}
    return expanded


def task_folders(root: Path) -> dict[str, Path]:
    """Every folder under `root` by name, sorted; hidden ones (`.git`) are not tasks."""
    if not root.is_dir():
        raise UserError(f"data.root={str(root)!r}: no such directory; point data.root at a directory holding one folder per task")
    folders = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")}
    if not folders:
        raise UserError(f"data.root={str(root)!r}: no task folders in it; put each task's files in a folder of its own ({root}/<task>/train.jsonl)")
    return folders


def chosen_tasks(tasks: list[str], folders: dict[str, Path], root: Path) -> list[str]:
    """`data.tasks` when it names folders, every folder when it is empty.

    A chosen folder's name must be UTF-8: it names the task in every line printed and logged, and a name Python
    decoded from other bytes (into lone surrogates) cannot be written to any of them.
    """
    for name in tasks:
        if name not in folders:
            raise UserError(f"data.tasks={tasks}: no folder {name!r} under data.root={str(root)!r}; its task folders: {list(folders)}")
    chosen = tasks or list(folders)
    for name in chosen:
        if not is_utf8(name):
            raise UserError(f"{root}: the folder name {os.fsencode(name)!r} is not UTF-8; rename it (the folder's name is the task's name)")
    return chosen


def is_utf8(name: str) -> bool:
    """False for a name read from bytes that are not UTF-8: Python keeps each such byte as a lone surrogate."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def folder_source(name: str, folder: Path, given: dict[str, Any]) -> dict[str, Any]:
    """One task's source: found files, detected fields and `exact_match`, under task.yaml, under `data.sources.<task>`."""
    in_folder = task_yaml(folder)
    overrides = {**in_folder, **given}
    source = {**SOURCE_DEFAULTS, **overrides}
    if source["hub"] is None:
        for key in PATH_KEYS:
            if key not in overrides:
                source[key] = found_file(folder, key, source["format"])
    origin = f"data.sources.{name}" if "fields" in given else TASK_FILE if "fields" in in_folder else "detected"
    if "fields" not in overrides:
        source["fields"] = detect_fields(name, folder, source)
    validate_source(f"data.sources.{name}", OmegaConf.create(source))  # before describing it: a bad task.yaml value names its key
    print(describe(name, folder, source, origin))
    return source


def task_yaml(folder: Path) -> dict[str, Any]:
    """The folder's task.yaml, {} without one; its train/val/eval paths are read from the folder, where the user wrote them."""
    path = folder / TASK_FILE
    if not path.is_file():
        return {}
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path)) or {}
    except yaml.YAMLError as e:  # problem and mark: "found duplicate key scorer" at its line, not "while constructing a mapping"
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None) or str(e).splitlines()[0]
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: not valid YAML ({problem}); it holds task keys, e.g. scorer: numeric") from e
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: must map task keys to values (e.g. scorer: numeric); valid keys: {sorted(SOURCE_DEFAULTS)}")
    unknown = sorted(set(loaded) - set(SOURCE_DEFAULTS))
    if unknown:
        raise UserError(f"{path}: unknown key(s) {unknown}; valid keys: {sorted(SOURCE_DEFAULTS)}")
    if loaded.get("hub") is None:  # a hub source's train/val/eval are split names, not paths
        loaded.update({key: under(folder, loaded[key]) for key in PATH_KEYS if loaded.get(key) is not None})
    return loaded


def under(folder: Path, spec: str | list[str]) -> str | list[str]:
    """A task.yaml path (or glob, or list of them) relative to its folder, as the user reads it there."""
    if isinstance(spec, list):
        return [under(folder, s) for s in spec]
    return str(folder / Path(spec).expanduser())  # an absolute path stays as it is


def found_file(folder: Path, key: str, fmt: str | None) -> str | None:
    """The one file in `folder` named for `key` (train.jsonl, val.csv.gz, ...); a second one, or no train file, is an error.

    So is anything else of that name (a directory, a broken link): passed over, it would be reported as a missing
    split, or a validation directory would silently turn into a held-out share of train.
    """
    matches = [p for p in sorted(folder.iterdir()) if file_stem(p, fmt) in FILE_STEMS[key]]
    for path in matches:
        if not path.is_file():
            raise UserError(not_a_file(folder, key, path))
    split = {"train": "train", "val": "validation", "eval": "test"}[key]
    if len(matches) > 1:
        names = [p.name for p in matches]
        raise UserError(
            f"{folder}: {len(matches)} {split} files {names}; keep one, or name them all in {folder / TASK_FILE} ({key}: [{', '.join(names)}])"
        )
    if not matches and key == "train":
        files = sorted(p.name for p in folder.iterdir())
        raise UserError(f"{folder}: no train file (files here: {files}); add {EXTENSIONS}, or name it in {folder / TASK_FILE} (train: <file>)")
    return str(matches[0]) if matches else None


def not_a_file(folder: Path, key: str, path: Path) -> str:
    """Why `path`, named like a `key` file, cannot be read, and the fix: a directory of shards is named by a glob."""
    if path.is_dir():
        suffix = Path(path.name.lower().removesuffix(".gz")).suffix
        return (
            f"{path} is a directory, not a file; put the rows in a file, or name the files in it in {folder / TASK_FILE} "
            f"({key}: '{path.name}/*{suffix}')"
        )
    if path.is_symlink() and not path.exists():
        return f"{path} is a broken symbolic link (to {os.readlink(path)}); point it at the file, or remove it"
    return f"{path} is not a regular file; put the rows in a file of that name"


def file_stem(path: Path, fmt: str | None) -> str | None:
    """`train` for train.jsonl, train.csv.gz, and for any train.<ext> when `format` names the format; None for other files."""
    name = Path(path.name.lower().removesuffix(".gz"))
    return name.stem if name.suffix in FORMATS or (fmt is not None and name.suffix) else None


def detect_fields(name: str, folder: Path, source: dict[str, Any]) -> dict[str, Any]:
    """The first style in `FIELD_STYLES` whose columns the first training row has."""
    fix = f"name them in {folder / TASK_FILE}, e.g. fields: {{prompt: <column>, response: <column>}} (or {{messages: <column>}})"
    if source["hub"] is not None:
        raise UserError(f"{folder}: fields are detected from local files only; {fix}")
    path = local_files(name, "train", source["train"])[0]
    row = read_saved_dataset(path, f"data.sources.{name}.train", "train")[0] if path.is_dir() else read_file(path, source["format"])[0]
    for columns, fields in FIELD_STYLES:
        if set(columns) <= set(row):
            return fields
    styles = " | ".join("/".join(columns) for columns, _ in FIELD_STYLES)
    raise UserError(f"{folder}: no known columns in {path.name} (its columns: {sorted(row)}; known: {styles}); {fix}")


def describe(name: str, folder: Path, source: dict[str, Any], origin: str) -> str:
    """One line: which file is each split (or the share held out of train) and which column is each field."""

    def where(key: str) -> str:
        spec = source[key]
        if spec is None:
            return f"{source['holdout']:g} of train"
        paths = spec if isinstance(spec, list) else [spec]
        return ",".join(str(Path(p).relative_to(folder)) if Path(p).parent == folder else str(p) for p in paths)

    fields = ", ".join(f"{k}: {'[' + ', '.join(v) + ']' if isinstance(v, list) else v}" for k, v in source["fields"].items())
    return (
        f"task {name!r} ({folder}): train {where('train')}, val {where('val')}, test {where('eval')}; "
        f"fields {{{fields}}} ({origin}); scorer {source['scorer']}"
    )

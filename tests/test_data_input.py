"""Data input: every file a researcher has lying around is read exactly as written, and every bad one
stops the run with one line naming the file (or key) and the fix."""

from __future__ import annotations

import csv
import gzip
import json
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from transformers import ByT5Tokenizer

from epi.config import validate
from epi.data.contamination import contamination, contamination_warning
from epi.data.format import Chat, encode_task
from epi.data.load import known_tasks, load_tasks
from epi.data.local import expand_root
from epi.data.sources import read_file
from epi.data.tasks import SPLITS, Example, Task
from epi.errors import UserError
from epi.logging import read_metrics
from epi.trainer import Trainer
from tests.helpers import ROOT, TINY, make_cfg, run_main
from tests.paper_files import write_jsonl
from tests.test_sources import CHAT, bad_data, one_task

ROWS = [{"question": f"what is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(40)]


def load_gsm8k(train: Path, *extra: str) -> Task:
    """The one-task config of tests.test_sources, loaded (no model, no run directory), no split cut short."""
    return load_tasks(make_cfg(*one_task(train, "data.n_val=100", "data.n_test=100", *extra)).data)["gsm8k"]


def examples(task: Task) -> dict[str, str]:
    return {ex.prompt: ex.response for split in SPLITS for ex in task.splits[split]}


def write_csv(path: Path, rows: list[dict], **open_args) -> Path:
    with open(path, "w", newline="", **open_args) as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# --- text files: read exactly as written --------------------------------------------------


def test_csv_quoted_newlines_are_kept(tmp_path: Path) -> None:
    rows = [{"question": "line one\nline two", "answer": "a\r\nb"}, {"question": "q, with comma", "answer": '"quoted"'}]
    assert read_file(write_csv(tmp_path / "multi.csv", rows), None) == rows


@pytest.mark.parametrize("line,which", [("what is 1, 2?,3", "more"), ("no answer", "fewer")])
def test_csv_row_of_the_wrong_length_is_one_line(tmp_path: Path, line: str, which: str) -> None:
    path = tmp_path / "ragged.csv"
    path.write_text(f"question,answer\n\"q\",\"multi\nline\"\n{line}\n")
    with pytest.raises(UserError, match=rf"^{path}:4: a row with {which} values than the header's 2 columns; quote values that hold a comma$"):
        read_file(path, None)


def test_jsonl_keeps_unicode_line_separators_and_crlf(tmp_path: Path) -> None:
    rows = [{"question": "a\u2028b", "answer": "c\x85d"}, {"question": "e\u2029f", "answer": "g\x1ch"}]
    path = tmp_path / "seps.jsonl"
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows).encode())
    assert read_file(path, None) == rows


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_utf8_bom_is_not_part_of_the_data(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"bom.{fmt}"
    if fmt == "csv":
        write_csv(path, ROWS[:3], encoding="utf-8-sig")
    else:
        text = json.dumps(ROWS[:3]) if fmt == "json" else "".join(json.dumps(r) + "\n" for r in ROWS[:3])
        path.write_text(text, encoding="utf-8-sig")
    assert read_file(path, None) == ROWS[:3]


def test_not_utf8_is_one_line_naming_file_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"question": "caf\u00e9", "answer": "1"}\n'.encode("latin-1"))
    with pytest.raises(UserError, match=rf"^{path}: not UTF-8 text \(byte 0xe9 at byte offset 17\); re-save it as UTF-8$"):
        read_file(path, None)


# --- compressed files -----------------------------------------------------------------------


def gz(path: Path) -> Path:
    out = path.with_name(path.name + ".gz")
    out.write_bytes(gzip.compress(path.read_bytes()))
    return out


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_gzip_files_by_extension(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"rows.{fmt}"
    if fmt == "csv":
        write_csv(path, ROWS)
    else:
        path.write_text(json.dumps(ROWS) if fmt == "json" else "".join(json.dumps(r) + "\n" for r in ROWS))
    assert read_file(gz(path), None) == ROWS
    assert examples(load_gsm8k(gz(path))) == {r["question"]: r["answer"] for r in ROWS}


def test_gzip_file_by_format_and_magic_bytes(tmp_path: Path) -> None:
    blob = tmp_path / "rows.data"
    blob.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in ROWS).encode()))
    assert read_file(blob, "jsonl") == ROWS
    assert examples(load_gsm8k(blob, "data.sources.gsm8k.format=jsonl")) == {r["question"]: r["answer"] for r in ROWS}


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_gzip_is_one_line(tmp_path: Path, damage: str) -> None:
    packed = gzip.compress(("".join(json.dumps(r) + "\n" for r in ROWS)).encode())
    path = tmp_path / "rows.jsonl.gz"
    path.write_bytes(packed[: len(packed) // 2] if damage == "truncated" else packed[:10] + b"\x00" * 40)
    with pytest.raises(UserError, match=rf"^{path}: corrupt gzip file \(.+\); re-compress it or give the uncompressed file$"):
        read_file(path, None)


# --- directories ---------------------------------------------------------------------------


def test_plain_directory_says_it_is_a_directory(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    msg = bad_data(tmp_path, *one_task(folder))
    assert msg == (
        f"data.sources.gsm8k.train={str(folder)!r}: {folder} is a directory, not a file; name the files in it "
        f"(a glob such as '{folder}/*.jsonl') or a datasets save_to_disk directory"
    )


def test_saved_dataset_directory_is_read(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    assert examples(load_gsm8k(tmp_path / "saved")) == {r["question"]: r["answer"] for r in ROWS}


def test_saved_dataset_dict_gives_train_and_test_splits(tmp_path: Path) -> None:
    import datasets

    test_rows = [{"question": f"test {i}", "answer": "#### 0"} for i in range(5)]
    val_rows = [{"question": f"val {i}", "answer": "#### 1"} for i in range(5)]
    saved = tmp_path / "dict"
    datasets.DatasetDict({s: datasets.Dataset.from_list(r) for s, r in (("train", ROWS), ("test", test_rows), ("validation", val_rows))}).save_to_disk(str(saved))
    task = load_gsm8k(saved, f"data.sources.gsm8k.eval={saved}")
    assert {ex.prompt for ex in task.splits["test"]} == {r["question"] for r in test_rows}
    assert {ex.prompt for s in ("train", "val") for ex in task.splits[s]} == {r["question"] for r in ROWS}
    task = load_gsm8k(saved, f"data.sources.gsm8k.eval={saved / 'validation'}")  # any split: its own directory
    assert {ex.prompt for ex in task.splits["test"]} == {r["question"] for r in val_rows}


def test_saved_dataset_dict_without_the_split_names_its_splits(tmp_path: Path) -> None:
    import datasets

    saved = tmp_path / "dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "validation": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(saved))
    msg = bad_data(tmp_path, *one_task(saved, f"data.sources.gsm8k.eval={saved}"))
    assert msg == (
        f"data.sources.gsm8k.eval={str(saved)!r}: a DatasetDict without a 'test' split (its splits: ['train', 'validation']); "
        f"name one split's directory, e.g. {saved / 'validation'}"
    )


# --- values: nothing stringified silently, empty examples not trained on ------------------------


def test_null_and_empty_prompt_or_response_are_dropped_and_counted(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = [{"question": None, "answer": "#### 1"}, {"question": "", "answer": "#### 2"}, {"question": "q?", "answer": None},
           {"question": "r?", "answer": "  "}, {"question": "s?", "answer": float("nan")}]
    path = write_jsonl(tmp_path / "holes.jsonl", ROWS + bad)
    task = load_gsm8k(path)
    assert examples(task) == {r["question"]: r["answer"] for r in ROWS}
    assert task.input_stats == {"rows": 45, "empty_dropped": 5, "converted": 0}
    assert "task 'gsm8k': 5 of 45 rows dropped for a null or empty prompt or response, 0 numbers or booleans converted to text" in capsys.readouterr().out


def test_numbers_and_bools_are_converted_and_counted(tmp_path: Path) -> None:
    rows = [{"question": f"{i} + 1", "answer": i + 1} for i in range(20)] + [{"question": 1.5, "answer": True}]
    task = load_gsm8k(write_jsonl(tmp_path / "numbers.jsonl", rows))
    assert examples(task) == {**{f"{i} + 1": str(i + 1) for i in range(20)}, "1.5": "true"}
    assert task.input_stats == {"rows": 21, "empty_dropped": 0, "converted": 22}


@pytest.mark.parametrize("value,kind", [(["a", "b"], "list"), ({"text": "a"}, "dict")])
def test_list_or_dict_value_names_row_column_and_type(tmp_path: Path, value, kind: str) -> None:
    path = write_jsonl(tmp_path / "nested.jsonl", ROWS[:5] + [{"question": "q", "answer": value}])
    msg = bad_data(tmp_path, *one_task(path))
    assert msg == (
        f"task 'gsm8k': {path} row 6: column 'answer' holds a {kind}, not text; "
        "point data.sources.gsm8k.fields at a text column (a chat's turns go in fields.messages)"
    )


def test_mostly_empty_file_is_an_error_naming_file_and_column(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "sparse.jsonl", ROWS[:10] + [{"question": f"q{i}", "answer": None} for i in range(11)])
    msg = bad_data(tmp_path, *one_task(path))
    assert msg == (
        f"task 'gsm8k': 11 of 21 rows of {path} have a null or empty response (column 'answer'); more than 50% "
        "of a file is not dropped silently: check data.sources.gsm8k.fields.response"
    )


def test_chat_with_null_or_empty_reply_is_dropped(tmp_path: Path) -> None:
    def chat(i: int, reply) -> dict:
        return {"turns": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": reply}]}

    path = write_jsonl(tmp_path / "chat.jsonl", [chat(i, f"hello {i}") for i in range(20)] + [chat(20, None), chat(21, ""), chat(22, 7)])
    task = load_tasks(make_cfg(*one_task(path), "~data.sources.gsm8k.fields", "+data.sources.gsm8k.fields={messages: turns}").data)["gsm8k"]
    replies = {ex.messages[0][1]: ex.response for split in SPLITS for ex in task.splits[split]}
    assert replies == {**{f"hi {i}": f"hello {i}" for i in range(20)}, "hi 22": "7"}
    assert task.input_stats == {"rows": 23, "empty_dropped": 2, "converted": 1}


# --- rows that cannot be read one way only: refused where they are read ---------------------------

SURROGATE = "column {column!r} is not valid Unicode text (an unpaired surrogate, {escape}: half of a UTF-16 pair without the other half); repair or remove that value"


@pytest.mark.parametrize("row,column,escape", [
    ('{"question": "bad \\ud800", "answer": "x"}', "question", "\\ud800"),
    ('{"question": "q", "answer": "x", "meta": {"note": ["\\uDC00"]}}', "meta", "\\udc00"),  # any string, nested or unused
    ('{"messages": [{"role": "user", "content": "hi \\udfff"}]}', "messages", "\\udfff"),
])
def test_lone_surrogate_in_jsonl_names_file_line_and_column(tmp_path: Path, row: str, column: str, escape: str) -> None:
    """json.loads turns a lone \\ud800 escape into a str no encoder accepts: it crashed the holdout hash with a traceback."""
    path = tmp_path / "surrogate.jsonl"
    path.write_text('{"question": "emoji \\ud83d\\ude00 as a pair", "answer": "fine"}\n\n' + row + "\n")  # a pair is valid
    with pytest.raises(UserError) as err:
        read_file(path, None)
    assert str(err.value) == f"{path}:3: " + SURROGATE.format(column=column, escape=escape)


def test_lone_surrogate_in_a_json_file_names_row_and_line(tmp_path: Path) -> None:
    path = tmp_path / "surrogate.json"
    path.write_text('[\n  {"question": "caf\\u00e9", "answer": "1"},\n\n  {"question": "q",\n   "answer": "\\ud800"}\n]\n')
    with pytest.raises(UserError) as err:
        read_file(path, None)
    assert str(err.value) == f"{path}: row 2 (line 4): " + SURROGATE.format(column="answer", escape="\\ud800")


def test_lone_surrogate_through_load_tasks_is_one_line_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:5]) + '{"question": "bad \\ud800", "answer": "x"}\n')
    msg = bad_data(tmp_path, *one_task(path))
    assert msg == f"{path}:6: " + SURROGATE.format(column="question", escape="\\ud800")


def test_lone_surrogate_from_a_saved_dataset_json_column_is_refused(tmp_path: Path) -> None:
    """A `datasets` Json column is decoded from JSON text on reading, and that decoder keeps a lone low surrogate."""
    import datasets

    features = datasets.Features({"question": datasets.Json(), "answer": datasets.Value("string")})
    rows = {"question": ['"fine"', '"bad \\udc00"'], "answer": ["1", "2"]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "saved"))
    msg = bad_data(tmp_path, *one_task(tmp_path / "saved"))
    assert msg == f"{tmp_path / 'saved'}: row 2: " + SURROGATE.format(column="question", escape="\\udc00")


def not_utf8_table():
    """Arrow checks no string's bytes on writing: row 6 of `question` holds an encoded surrogate (not UTF-8)."""
    import pyarrow as pa

    values = [r["question"].encode() for r in ROWS]
    values[5] = b"bad \xed\xa0\x80"
    return pa.table({"question": pa.array(values, pa.binary()).view(pa.string()), "answer": [r["answer"] for r in ROWS]})


@pytest.mark.parametrize("kind", ["parquet", "saved"])
def test_string_column_not_utf8_names_file_row_and_column(tmp_path: Path, kind: str) -> None:
    """Parquet said "not a readable Parquet file" of a readable file; a save_to_disk directory crashed in to_list."""
    import datasets
    import pyarrow.parquet as pq

    path = tmp_path / ("rows.parquet" if kind == "parquet" else "saved")
    if kind == "parquet":
        pq.write_table(not_utf8_table(), path, row_group_size=4)  # row 6 is in the second row group
    else:
        datasets.Dataset(not_utf8_table()).save_to_disk(str(path))
    msg = bad_data(tmp_path, *one_task(path))
    assert msg == f"{path}: row 6: column 'question' is not UTF-8 text (byte 0xed at byte offset 4 of its value); write that value as UTF-8"


DUPLICATE = "key {key!r} appears twice in one object; keep one (which of the two values is meant is ambiguous)"


@pytest.mark.parametrize("row,key", [
    ('{"question": "a", "question": "b", "answer": "c"}', "question"),
    ('{"messages": [{"role": "user", "content": "a", "content": "b"}]}', "content"),
])
def test_duplicate_key_in_jsonl_is_refused_naming_file_line_and_key(tmp_path: Path, row: str, key: str) -> None:
    """json.loads kept the last value silently: the row trained on one of two answers its writer gave."""
    path = tmp_path / "dup.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + row + "\n")
    with pytest.raises(UserError) as err:
        read_file(path, None)
    assert str(err.value) == f"{path}:2: " + DUPLICATE.format(key=key)


def test_duplicate_key_in_a_json_file_names_row_and_line(tmp_path: Path) -> None:
    path = tmp_path / "dup.json"
    path.write_text('[{"question": "a", "answer": "b"},\n {"question": "c",\n  "answer": "d", "answer": "e"}]')
    with pytest.raises(UserError) as err:
        read_file(path, None)
    assert str(err.value) == f"{path}: row 2 (line 2): " + DUPLICATE.format(key="answer")
    path.write_text('{"rows": 1, "rows": 2}')
    with pytest.raises(UserError) as err:
        read_file(path, None)
    assert str(err.value) == f"{path}: " + DUPLICATE.format(key="rows")


# --- data=local: what a folder holds under a split's name ------------------------------------------


def local_folder(tmp_path: Path) -> Path:
    """data.root with one task folder `t` holding a good train.jsonl."""
    (tmp_path / "tasks/t").mkdir(parents=True)
    write_jsonl(tmp_path / "tasks/t/train.jsonl", ROWS)
    return tmp_path / "tasks"


def expand(root: Path) -> str:
    with pytest.raises(UserError) as err:
        expand_root(make_cfg("data=local", f"data.root={root}").data)
    return str(err.value)


@pytest.mark.parametrize("name,key", [("train.jsonl", "train"), ("validation.jsonl", "val"), ("test.csv.gz", "eval")])
def test_directory_named_like_a_split_file_says_it_is_a_directory(tmp_path: Path, name: str, key: str) -> None:
    """A train.jsonl directory was "no train file"; a validation.jsonl one was passed over and val silently held out of train."""
    root = local_folder(tmp_path)
    if key == "train":
        (root / "t/train.jsonl").unlink()
    (root / "t" / name / "part-0").mkdir(parents=True)
    suffix = ".csv" if name.endswith(".gz") else ".jsonl"
    assert expand(root) == (
        f"{root / 't' / name} is a directory, not a file; put the rows in a file, or name the files in it in "
        f"{root / 't/task.yaml'} ({key}: '{name}/*{suffix}')"
    )


def test_broken_link_named_like_a_split_file_is_named(tmp_path: Path) -> None:
    root = local_folder(tmp_path)
    (root / "t/test.jsonl").symlink_to(tmp_path / "moved.jsonl")
    assert expand(root) == f"{root / 't/test.jsonl'} is a broken symbolic link (to {tmp_path / 'moved.jsonl'}); point it at the file, or remove it"


def test_folder_name_not_utf8_is_one_line(tmp_path: Path) -> None:
    """The folder's name is the task's: Python kept the byte 0xff as a lone surrogate, which crashed the first print."""
    root = local_folder(tmp_path)
    os.rename(root / "t", os.fsencode(root) + b"/t\xff")
    assert expand(root) == f"{root}: the folder name b't\\xff' is not UTF-8; rename it (the folder's name is the task's name)"


def test_task_yaml_duplicate_key_names_key_and_line(tmp_path: Path) -> None:
    """OmegaConf's loader refuses a key twice; its message's first line said only "while constructing a mapping"."""
    root = local_folder(tmp_path)
    (root / "t/task.yaml").write_text("scorer: numeric\nholdout: 0.1\nscorer: exact_match\n")
    assert expand(root) == f"{root / 't/task.yaml'}:3: not valid YAML (found duplicate key scorer); it holds task keys, e.g. scorer: numeric"


# --- source keys: checked like strategy keys, defaults defined once ------------------------------


def test_unknown_source_key_names_the_valid_keys() -> None:
    cfg = make_cfg("data=paper_mix", "+data.sources.gsm8k.holdot=0.1")
    with pytest.raises(UserError) as err:
        validate(cfg, known_tasks(cfg.data))
    assert str(err.value) == (
        "data.sources.gsm8k.holdot=0.1: unknown key; valid keys: "
        "['config', 'eval', 'fields', 'format', 'holdout', 'hub', 'scorer', 'train', 'val']"
    )


def test_minimal_source_takes_the_documented_defaults(tmp_path: Path) -> None:
    rows = [{"question": f"{i} + 2", "answer": str(i + 2)} for i in range(60)]
    path = write_jsonl(tmp_path / "mine.jsonl", rows)
    cfg = make_cfg("data.tasks=[mine]", "data.n_val=100", "data.n_test=100", f"+data.sources.mine={{hub: null, train: '{path}', fields: {{prompt: question, response: answer}}}}")
    validate(cfg, known_tasks(cfg.data))
    task = load_tasks(cfg.data)["mine"]
    assert task.scorer == "exact_match" and all(task.splits[s] for s in SPLITS)  # holdout 0.05, eval null: val and test held out
    assert examples(task) == {r["question"]: r["answer"] for r in rows}


# --- contamination: test prompts that are also training prompts ---------------------------


def test_contamination_counts_eval_prompts_seen_in_training() -> None:
    def ex(prompt: str) -> Example:
        return Example("t", prompt, "r")

    tasks = {
        "t": Task("t", {"train": [ex("a"), ex("b  c")], "val": [ex("d")], "test": [ex(" a\n"), ex("b c"), ex("e"), ex("f")]}, "exact_match"),
        "clean": Task("clean", {"train": [ex("a")], "val": [ex("b")], "test": [ex("c")]}, "exact_match"),
    }
    report = contamination(tasks)
    assert report == {
        "t": {"val_count": 0, "val_fraction": 0.0, "test_count": 2, "test_fraction": 0.5},
        "clean": {"val_count": 0, "val_fraction": 0.0, "test_count": 0, "test_fraction": 0.0},
    }
    assert contamination_warning(report, 0.6) is None
    assert contamination_warning(report, 0.01) == (
        "warning: eval prompts also in the training split: t test 2 (50.0%), above data.contamination_warn=0.01; "
        "scores on them measure memorisation: deduplicate the files"
    )


def test_contamination_of_a_chat_uses_its_non_assistant_turns() -> None:
    other = Chat("c", (("user", "hi"), ("assistant", "different")))
    task = Task("c", {"train": [CHAT], "val": [], "test": [Chat("c", CHAT.messages[:3]), other]}, "perplexity")
    assert contamination({"c": task})["c"] == {"val_count": 0, "val_fraction": 0.0, "test_count": 0, "test_fraction": 0.0}
    task.splits["test"].append(Chat("c", CHAT.messages[:-1] + (("assistant", "5"),)))
    assert contamination({"c": task})["c"]["test_count"] == 1


def test_every_data_config_sets_the_contamination_threshold() -> None:
    for path in sorted((ROOT / "conf" / "data").glob("*.yaml")):
        assert OmegaConf.load(path).contamination_warn == 0.01, path.name


# --- long examples in val/test ------------------------------------------------------------


def test_eval_example_is_kept_when_its_last_prompt_fits() -> None:
    """Under `response` a val/test example stays if what generation continues from fits max_len (its loss
    is over the reply tokens that fit, its score on the full reference); under `drop` it must fit whole."""
    tok = ByT5Tokenizer()
    short, long_reply = Example("t", "p", "ok"), Example("t", "p", "x" * 50)
    late_reply = Chat("t", (("user", "u" * 30), ("assistant", "a"), ("user", "v" * 30), ("assistant", "b")))  # last reply starts at token 64
    task = Task("t", {"train": [short], "val": [long_reply, late_reply, short], "test": [long_reply, short]}, "exact_match")
    kept = encode_task(tok, task, max_len=40, truncate="response")
    assert kept.task.splits["val"] == [long_reply, short] and kept.task.splits["test"] == [long_reply, short]
    assert (kept.stats["val_dropped"], kept.stats["test_dropped"]) == (1, 0)
    dropped = encode_task(tok, task, max_len=40, truncate="drop")
    assert dropped.task.splits["val"] == [short] and dropped.task.splits["test"] == [short]
    assert (dropped.stats["val_dropped"], dropped.stats["test_dropped"]) == (2, 1)


# --- through train.py: exit 2, one line, nothing written -------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "bad,needle",
    [
        ("not_utf8", "latin1.jsonl: not UTF-8 text (byte 0xe9 at byte offset"),
        ("unknown_key", "data.sources.gsm8k.holdot=0.1: unknown key; valid keys: ['config'"),
        ("directory", "is a directory, not a file; name the files in it"),
    ],
)
def test_cli_bad_data_input_exits_2_with_one_line(capfd: pytest.CaptureFixture, tmp_path: Path, bad: str, needle: str) -> None:
    (tmp_path / "latin1.jsonl").write_bytes('{"question": "caf\u00e9", "answer": "1"}\n'.encode("latin-1"))
    good = write_jsonl(tmp_path / "good.jsonl", ROWS)
    args = {
        "not_utf8": one_task(tmp_path / "latin1.jsonl"),
        "unknown_key": one_task(good, "+data.sources.gsm8k.holdot=0.1"),
        "directory": one_task(tmp_path),
    }[bad]
    run = tmp_path / "run"
    proc = run_main("train.py", *TINY, *args, f"hydra.run.dir={run}", cwd=tmp_path, capfd=capfd)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last
    assert {p.name for p in run.iterdir()} <= {".hydra", "train.log", "run.lock"}


@pytest.mark.slow
def test_cli_lone_surrogate_exits_2_with_one_line(capfd: pytest.CaptureFixture, tmp_path: Path) -> None:
    """The reported crash: a UnicodeEncodeError traceback (exit 1) from the holdout hash, long after reading."""
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + '{"question": "bad \\ud800", "answer": "x"}\n')
    proc = run_main("train.py", *TINY, *one_task(path), f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, capfd=capfd)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {path}:41: " + SURROGATE.format(column="question", escape="\\ud800")


def test_eval_prompts_seen_in_training_are_counted_logged_and_warned(tmp_path: Path, capsys) -> None:
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(40)]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = f"+data.sources.mine={{hub: null, train: '{data}', eval: '{data}', fields: {{prompt: question, response: answer}}}}"
    (tmp_path / "run").mkdir()
    Trainer(make_cfg("strategy=none", "data.tasks=[mine]", source), tmp_path / "run")
    assert "warning: eval prompts also in the training split: mine test" in capsys.readouterr().out
    logged = {e["metric"]: e["value"] for e in read_metrics(tmp_path / "run") if e["split"] == "data"}
    # the test file is the training file, less the rows the hash holdout moved to val
    assert logged["test_count"] >= 6 and logged["test_fraction"] == logged["test_count"] / 8 and logged["val_count"] == 0

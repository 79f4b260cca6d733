"""`data=local data.root=...`: a directory of task folders in every supported format and field style
trains in one override; its files, fields and val split are what the printed lines say; every
ambiguous folder stops the run with one line naming the folder and the fix."""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from epi.data.load import load_tasks
from epi.data.local import expand_root
from epi.errors import UserError
from tests.helpers import TINY, make_cfg, run_main
from tests.paper_files import write_jsonl

N = 60  # training rows per folder
FOLDERS = ["alpaca", "chat", "pr", "qa"]  # sorted, as data.tasks defaults to


def qa(i: int) -> dict:
    return {"question": f"what is {i} + 1?", "answer": str(i + 1)}


def alpaca(i: int) -> dict:
    return {"instruction": f"Repeat {i}.", "input": "" if i % 2 else "twice", "output": f"{i}"}


def chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]}


def pr(i: int) -> dict:
    return {"prompt": f"double {i}", "response": str(2 * i)}


def csv_text(rows: list[dict]) -> str:
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def write_tree(root: Path) -> Path:
    """Four task folders: JSONL, JSON, CSV, Parquet and three .gz files; all four field styles;
    val files (validation.*, val.*) where given, a task.yaml in `pr`, a README the search ignores."""
    for folder in FOLDERS:
        (root / folder).mkdir(parents=True)
    write_jsonl(root / "qa/train.jsonl", [qa(i) for i in range(N)])
    write_jsonl(root / "qa/validation.jsonl", [qa(i) for i in range(100, 105)])
    (root / "qa/test.csv").write_text(csv_text([qa(i) for i in range(200, 210)]))
    (root / "alpaca/train.csv.gz").write_bytes(gzip.compress(csv_text([alpaca(i) for i in range(N)]).encode()))
    (root / "alpaca/val.json").write_text(json.dumps([alpaca(i) for i in range(100, 106)]))
    pq.write_table(pa.Table.from_pylist([alpaca(i) for i in range(200, 206)]), root / "alpaca/test.parquet")
    (root / "chat/train.json").write_text(json.dumps([chat(i) for i in range(N)]))
    (root / "chat/validation.jsonl.gz").write_bytes(gzip.compress("\n".join(json.dumps(chat(i)) for i in range(100, 104)).encode()))
    (root / "chat/README.md").write_text("not a split")
    pq.write_table(pa.Table.from_pylist([pr(i) for i in range(N)]), root / "pr/train.parquet")
    (root / "pr/task.yaml").write_text("holdout: 0.2\nscorer: numeric\n")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tree(tmp_path_factory.mktemp("tasks"))


def expanded(root: Path, *overrides: str):
    cfg = make_cfg("data=local", f"data.root={root}", *overrides)
    cfg.data = expand_root(cfg.data)
    return cfg


LINES = [
    "task 'alpaca' ({root}/alpaca): train train.csv.gz, val val.json, test test.parquet; "
    "fields {{prompt: [instruction, input], response: output}} (detected); scorer exact_match",
    "task 'chat' ({root}/chat): train train.json, val validation.jsonl.gz, test 0.05 of train; "
    "fields {{messages: messages}} (detected); scorer exact_match",
    "task 'pr' ({root}/pr): train train.parquet, val 0.2 of train, test 0.2 of train; "
    "fields {{prompt: prompt, response: response}} (detected); scorer numeric",
    "task 'qa' ({root}/qa): train train.jsonl, val validation.jsonl, test test.csv; "
    "fields {{prompt: question, response: answer}} (detected); scorer exact_match",
]


# --- through train.py -------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_trains_on_every_folder_and_prints_each_mapping(capfd: pytest.CaptureFixture, tree: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = run_main("train.py", *TINY, "data=local", f"data.root={tree}", f"hydra.run.dir={run}", cwd=tmp_path, capfd=capfd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout.splitlines()
    assert [line for line in printed if line.startswith("task '")] == [line.format(root=tree) for line in LINES]
    saved = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert saved["tasks"] == FOLDERS and saved["sources"]["qa"]["val"] == str(tree / "qa/validation.jsonl")
    assert set(json.loads((run / "eval_test.json").read_text())) == set(FOLDERS)
    assert "| pr | numeric |" in (run / "eval_test.md").read_text()


@pytest.mark.slow
def test_user_data_config_from_config_dir_picks_a_subset(capfd: pytest.CaptureFixture, tree: Path, tmp_path: Path) -> None:
    """docs/data.md's route for a researcher's own defaults: conf/data/<mine>.yaml outside the repo, on --config-dir."""
    (tmp_path / "my_conf/data").mkdir(parents=True)
    (tmp_path / "my_conf/data/mine.yaml").write_text(
        f"defaults:\n  - local\n  - _self_\n\nroot: {tree}\ntasks: [qa, chat]\nweights: {{qa: 2}}\n"
    )
    run = tmp_path / "run"
    proc = run_main("train.py", f"--config-dir={tmp_path / 'my_conf'}", "data=mine", *TINY, f"hydra.run.dir={run}", cwd=tmp_path, capfd=capfd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line.split(" (")[0] for line in proc.stdout.splitlines() if line.startswith("task '")] == ["task 'qa'", "task 'chat'"]
    saved = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert saved["tasks"] == ["qa", "chat"] and set(saved["sources"]) == {"qa", "chat"} and saved["weights"] == {"qa": 2}
    assert set(json.loads((run / "eval_test.json").read_text())) == {"qa", "chat"}


def broken(root: Path, case: str) -> list[str]:
    """The data overrides of one ambiguous tree (written under `root`)."""
    if case in ("missing_root", "unset_root"):
        return ["data=local", f"data.root={root / 'nowhere'}"] if case == "missing_root" else ["data=local"]
    (root / "t").mkdir(parents=True)
    write_jsonl(root / "t/train.jsonl", [qa(i) for i in range(N)])
    if case == "two_train":
        (root / "t/train.csv").write_text(csv_text([qa(i) for i in range(N)]))
    elif case == "no_train":
        (root / "t/train.jsonl").rename(root / "t/data.jsonl")
    elif case == "no_fields":
        write_jsonl(root / "t/train.jsonl", [{"q": "a", "a": "b"}])
    elif case == "bad_task_yaml":
        (root / "t/task.yaml").write_text("scorer: numeric\nholdot: 0.1\n")
    return ["data=local", f"data.root={root}"] + (["data.tasks=[t,u]"] if case == "unknown_task" else [])


MESSAGES = {
    "two_train": "{root}/t: 2 train files ['train.csv', 'train.jsonl']; keep one, or name them all in {root}/t/task.yaml (train: [train.csv, train.jsonl])",
    "no_train": "{root}/t: no train file (files here: ['data.jsonl']); add train.jsonl (or .json, .csv, .parquet, any of them .gz), or name it in {root}/t/task.yaml (train: <file>)",
    "no_fields": "{root}/t: no known columns in train.jsonl (its columns: ['a', 'q']; known: messages | prompt/response | instruction/input/output | instruction/output | question/answer); name them in {root}/t/task.yaml, e.g. fields: {{prompt: <column>, response: <column>}} (or {{messages: <column>}})",
    "missing_root": "data.root='{root}/nowhere': no such directory; point data.root at a directory holding one folder per task",
    "bad_task_yaml": "{root}/t/task.yaml: unknown key(s) ['holdot']; valid keys: ['config', 'eval', 'fields', 'format', 'holdout', 'hub', 'scorer', 'train', 'val']",
    "unknown_task": "data.tasks=['t', 'u']: no folder 'u' under data.root='{root}'; its task folders: ['t']",
    "unset_root": "data.root is not set; data=local reads one folder per task: data.root=/path/to/tasks",
}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["two_train", "no_train", "no_fields", "missing_root"])
def test_cli_ambiguous_tree_exits_2_with_one_line(capfd: pytest.CaptureFixture, tmp_path: Path, case: str) -> None:
    root, run = tmp_path / "tasks", tmp_path / "run"
    proc = run_main("train.py", *TINY, *broken(root, case), f"hydra.run.dir={run}", cwd=tmp_path, capfd=capfd)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [f"error: {MESSAGES[case].format(root=root)}"]
    assert {p.name for p in run.iterdir()} <= {".hydra", "train.log", "run.lock"}


@pytest.mark.parametrize("case", ["bad_task_yaml", "unknown_task", "unset_root"])
def test_other_bad_trees_name_the_fix(tmp_path: Path, case: str) -> None:
    """The same kind of error as above, raised where the CLI raises it (before validation), without a process each."""
    root = tmp_path / "tasks"
    cfg = make_cfg(*broken(root, case))
    with pytest.raises(UserError) as err:
        expand_root(cfg.data)
    assert str(err.value) == MESSAGES[case].format(root=root)


# --- in process: what each split holds -------------------------------------------------------


def test_val_files_are_the_val_split_and_test_files_the_test_split(tree: Path) -> None:
    tasks = load_tasks(expanded(tree, "data.n_val=100", "data.n_test=100").data)
    sizes = {name: {split: len(examples) for split, examples in task.splits.items()} for name, task in tasks.items()}
    assert sizes["qa"] == {"train": N, "val": 5, "test": 10} and sizes["alpaca"] == {"train": N, "val": 6, "test": 6}
    assert {ex.prompt for ex in tasks["qa"].splits["val"]} == {qa(i)["question"] for i in range(100, 105)}
    assert sizes["chat"]["val"] == 4 and sizes["chat"]["test"] > 0 and sizes["chat"]["train"] + sizes["chat"]["test"] == N  # test held out
    assert sizes["pr"]["val"] > 0 and sizes["pr"]["test"] > 0 and sum(sizes["pr"].values()) == N  # task.yaml: holdout 0.2
    assert tasks["pr"].scorer == "numeric" and tasks["alpaca"].splits["train"][0].prompt.startswith("Repeat")


def test_subset_and_order_follow_data_tasks(tree: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = expanded(tree, "data.tasks=[qa,chat]")
    assert list(cfg.data.tasks) == ["qa", "chat"] and set(cfg.data.sources) == {"qa", "chat"}
    assert [line.split(" (")[0] for line in capsys.readouterr().out.splitlines()] == ["task 'qa'", "task 'chat'"]
    assert list(expanded(tree, "data.tasks=[]").data.tasks) == FOLDERS


def test_task_yaml_overrides_any_key_and_reads_paths_from_its_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Odd column names and split files: task.yaml names them (paths relative to the folder, a list of two
    train files), replaces the whole field mapping and the scorer; `data.sources.<task>` overrides task.yaml."""
    folder = tmp_path / "tasks/odd"
    folder.mkdir(parents=True)
    write_jsonl(folder / "part1.jsonl", [{"q": f"{i}?", "a": str(i), "question": "x", "answer": "y"} for i in range(30)])
    write_jsonl(folder / "part2.jsonl", [{"q": f"{i}?", "a": str(i), "question": "x", "answer": "y"} for i in range(30, 60)])
    write_jsonl(folder / "dev.jsonl", [{"q": "dev?", "a": "d", "question": "x", "answer": "y"}])
    (folder / "task.yaml").write_text(
        "train: [part1.jsonl, part2.jsonl]\nval: dev.jsonl\nfields: {prompt: q, response: a}\nscorer: numeric\nholdout: 0.1\n"
    )
    cfg = expanded(tmp_path / "tasks", "data.n_test=100")
    assert "fields {prompt: q, response: a} (task.yaml); scorer numeric" in capsys.readouterr().out
    source = cfg.data.sources.odd
    assert list(source.train) == [str(folder / "part1.jsonl"), str(folder / "part2.jsonl")] and source.val == str(folder / "dev.jsonl")
    task = load_tasks(cfg.data)["odd"]
    assert [ex.prompt for ex in task.splits["val"]] == ["dev?"] and task.scorer == "numeric"
    assert sum(map(len, (task.splits["train"], task.splits["test"]))) == 60  # test: 0.1 of train
    cli = expanded(tmp_path / "tasks", "+data.sources.odd.scorer=exact_match", "+data.sources.odd.val=null")
    assert cli.data.sources.odd.scorer == "exact_match" and cli.data.sources.odd.val is None


def test_expanding_twice_changes_nothing(tree: Path) -> None:
    """eval.py run_dir=... expands a run's saved (already expanded) data config again."""
    cfg = expanded(tree)
    assert expand_root(cfg.data) == cfg.data


def test_builtin_and_paper_mix_are_untouched() -> None:
    cfg = make_cfg()
    assert expand_root(cfg.data) is cfg.data


def test_bad_task_yaml_value_names_its_key(tmp_path: Path) -> None:
    write_tree(tmp_path)
    (tmp_path / "pr/task.yaml").write_text("scorer: bleu\n")
    with pytest.raises(UserError, match=r"^data.sources.pr.scorer='bleu': unknown scorer"):
        expanded(tmp_path)

"""Data input: every file a researcher has lying around is read exactly as written, and every bad one
stops the run with one line naming the file (or key) and the fix."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from transformers import ByT5Tokenizer

from epi.config import validate
from epi.data.contamination import contamination, contamination_warning
from epi.data.format import Chat, encode_task
from epi.data.load import known_tasks, load_tasks
from epi.data.sources import read_file
from epi.data.tasks import SPLITS, Example, Task
from epi.errors import UserError
from tests.conftest import ROOT, TINY, make_cfg, run_script
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

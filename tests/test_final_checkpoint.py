"""Issue 15: a finished run removes its checkpoint.pt unless `keep_checkpoint=true`.

The final checkpoint is still written before the final evaluation, so a run that dies while it
evaluates, writes model/ or writes its results resumes to the same weights; only once the last
file is written is the checkpoint removed, and resuming the finished run then says so in one line.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from epi import run as train_script
from epi import checkpoint
from epi.errors import UserError
from epi.trainer import Trainer
from tests.helpers import TINY, make_cfg, run_script

COMMON = ("strategy=none",)
RESULTS = ("config.yaml", "metrics.jsonl", "model", "eval_test.json", "eval_test.md", "predictions_test.jsonl")


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run with the default settings, the reference for the crashed and resumed ones."""
    run = tmp_path_factory.mktemp("straight") / "run"
    train_script.train(make_cfg(*COMMON), run)
    return run


@pytest.mark.xdist_group("final_checkpoint_straight")
def test_a_finished_run_has_its_model_and_results_but_no_checkpoint(straight: Path) -> None:
    names = {p.name for p in straight.iterdir()}
    assert set(RESULTS) <= names
    assert checkpoint.FILENAME not in names and f"{checkpoint.FILENAME}.tmp" not in names


@pytest.mark.xdist_group("final_checkpoint_straight")
def test_keep_checkpoint_keeps_a_loadable_final_checkpoint(tmp_path: Path, straight: Path) -> None:
    run = tmp_path / "run"
    train_script.train(make_cfg(*COMMON, "keep_checkpoint=true"), run)
    assert set(RESULTS) <= {p.name for p in run.iterdir()}
    state = checkpoint.load(str(run))
    assert state["step"] == 6
    saved = weights(run)
    assert all(torch.equal(state["model"][name], saved[name]) for name in saved)
    assert all(torch.equal(saved[name], value) for name, value in weights(straight).items())  # the key changes no weights
    # Training on from it is not a resume: a resume must keep the schedule (its steps included).
    with pytest.raises(UserError, match=r"trained with different \['schedule'\]"):
        train_script.train(make_cfg(*COMMON, "schedule.steps=8", f"resume={run}"), run)


def crash_in_final_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    real = Trainer.evaluate

    def evaluate(self, step, split_name, predictions=None):
        if predictions is not None:  # only the final evaluation collects predictions
            raise KeyboardInterrupt
        return real(self, step, split_name, predictions)

    monkeypatch.setattr(Trainer, "evaluate", evaluate)


def crash_writing_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def save_model(self, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save_model", save_model)


def crash_writing_the_results(monkeypatch: pytest.MonkeyPatch) -> None:
    def write_results(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_script, "write_results", write_results)


CRASHES = {"final evaluation": crash_in_final_evaluation, "model": crash_writing_the_model, "results": crash_writing_the_results}


@pytest.mark.parametrize("where", sorted(CRASHES))
def test_a_run_killed_after_its_last_step_keeps_its_checkpoint_and_resumes_to_the_same_weights(
    where: str, tmp_path: Path, straight: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        CRASHES[where](patch)
        with pytest.raises(KeyboardInterrupt):
            train_script.train(make_cfg(*COMMON), run)
    assert checkpoint.load(str(run))["step"] == 6
    assert not (run / "eval_test.json").exists()

    train_script.train(make_cfg(*COMMON, f"resume={run}"), run)
    assert weights(run).keys() == weights(straight).keys()
    assert all(torch.equal(value, weights(straight)[name]) for name, value in weights(run).items())
    assert not (run / checkpoint.FILENAME).exists()  # finished now: removed


def test_a_resume_may_change_keep_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The key decides which files a finished run keeps, not what it trains: not a 'different schedule'."""
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        crash_in_final_evaluation(patch)
        with pytest.raises(KeyboardInterrupt):
            train_script.train(make_cfg(*COMMON), run)
    train_script.train(make_cfg(*COMMON, "keep_checkpoint=true", f"resume={run}"), run)
    assert checkpoint.load(str(run))["step"] == 6 and (run / "eval_test.json").is_file()


@pytest.mark.xdist_group("final_checkpoint_straight")
@pytest.mark.parametrize("target", ["run", f"run/{checkpoint.FILENAME}"])
def test_resuming_a_finished_run_says_it_finished(target: str, straight: Path) -> None:
    resume = straight.parent / target
    with pytest.raises(UserError, match=r"already finished .*nothing left to resume.* eval\.py run_dir=.*model\.name_or_path="):
        train_script.train(make_cfg(*COMMON, f"resume={resume}"), straight)


@pytest.mark.slow
@pytest.mark.xdist_group("final_checkpoint_straight")
def test_resuming_a_finished_run_from_the_command_line_is_one_line_and_touches_nothing(tmp_path: Path, straight: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(straight, run)  # Hydra adds .hydra/ to the directory it runs in: not to the shared run
    before = {name: (run / name).stat().st_mtime_ns for name in RESULTS}
    metrics = (run / "metrics.jsonl").read_bytes()
    proc = run_script("train.py", *TINY, *COMMON, f"resume={run}", f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == proc.stderr.strip().splitlines()[-1] and "Traceback" not in proc.stderr
    assert errors[0].startswith(f"error: resume='{run}': {run} holds a run that already finished")
    assert "keep_checkpoint=false" in errors[0]
    assert {name: (run / name).stat().st_mtime_ns for name in RESULTS} == before
    assert (run / "metrics.jsonl").read_bytes() == metrics and not (run / checkpoint.FILENAME).exists()

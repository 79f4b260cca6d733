"""Issue 12, the training loop: numbers that are right and runs that survive a crash.

Token-weighted loss across micro-batches and ranks, the logged learning rate, divergence,
a full disk, a reused run directory, stage closing work across a resume, plans that would
isolate nothing, NaN importance, and checkpoints that are data rather than code.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from epi import run as train_script
from epi import checkpoint
from epi.errors import TrainingDiverged, UserError
from epi.logging import read_metrics
from epi.masks import NonFiniteScores, top_p
from epi.strategies.epi import EPI
from epi.strategies.none import NoIsolation
from epi.trainer import Trainer
from tests.conftest import TINY, make_cfg, run_script, two_ranks_and_one_process


class GradRecorder(NoIsolation):
    """Keeps a copy of every step's gradients as the strategy sees them (before clipping)."""

    def prepare(self, ctx, stages):
        self.grads: list[dict[str, torch.Tensor]] = []
        return super().prepare(ctx, stages)

    def after_backward(self, step: int) -> None:
        self.grads.append({n: p.grad.clone() for n, p in self.ctx.named_params.items()})


def recorded(tmp_path: Path, *overrides: str) -> Trainer:
    run = tmp_path / "_".join(o.split("=")[-1] for o in overrides)
    run.mkdir()
    trainer = Trainer(make_cfg("strategy=none", "strategy._target_=tests.test_trust.GradRecorder", "schedule.steps=3", *overrides), run)
    trainer.fit()
    return trainer


# --- token-weighted loss -------------------------------------------------------------------


def test_grad_accum_equals_one_batch_k_times_larger(tmp_path: Path) -> None:
    accum = recorded(tmp_path, "schedule.batch_size=4", "schedule.grad_accum=3")
    big = recorded(tmp_path, "schedule.batch_size=12", "schedule.grad_accum=1")
    for step, (a, b) in enumerate(zip(accum.strategy.grads, big.strategy.grads), start=1):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7, msg=f"step {step} {name}")
    assert [e["value"] for e in read_metrics(accum.run_dir) if e["metric"] == "loss"] == pytest.approx(
        [e["value"] for e in read_metrics(big.run_dir) if e["metric"] == "loss"], rel=1e-6
    )
    for (name, a), b in zip(accum.model.state_dict().items(), big.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_two_ranks_equal_one_process_with_the_same_global_batch(tmp_path: Path) -> None:
    two_ranks_and_one_process(tmp_path, [*TINY, "strategy=none", "schedule.steps=3", "schedule.batch_size=8"])


def test_logged_lr_is_the_one_the_step_applied(tmp_path: Path) -> None:
    cfg = make_cfg("strategy=none", "schedule.steps=4", "schedule.warmup_steps=4", "optimizer.lr=1e-3")
    Trainer(cfg, tmp_path).fit()
    lrs = [e["value"] for e in read_metrics(tmp_path) if e["metric"] == "lr"]
    assert lrs == pytest.approx([0.25e-3, 0.5e-3, 0.75e-3, 1e-3])  # linear warm-up: step k applies k/4 of lr


# --- divergence -------------------------------------------------------------------------------

DIVERGING = [*TINY, "strategy=none", "optimizer.lr=1e4", "schedule.steps=8", "schedule.checkpoint_every=1"]


def test_divergence_stops_with_one_line_keeps_the_last_good_checkpoint_and_saves_no_model(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = run_script("train.py", *DIVERGING, f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: step ") and "not finite" in line and "optimizer.lr" in line and "schedule.nonfinite=skip" in line
    bad_step = next(e["step"] for e in read_metrics(run) if e["split"] == "nonfinite")
    state = checkpoint.load(str(run))
    assert state["step"] == bad_step - 1 and f"(step {bad_step - 1})" in line
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert not (run / "model").exists() and not (run / "eval_test.json").exists()


def test_skip_policy_drops_the_updates_counts_them_and_finishes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = run_script("train.py", *DIVERGING, "schedule.nonfinite=skip", f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = read_metrics(run)
    bad = [e["step"] for e in events if e["split"] == "nonfinite" and e["metric"] == "loss"]
    assert bad and bad == list(range(bad[0], 9))  # a skipped update leaves the weights as they were: it recurs
    skipped = [e["value"] for e in events if e["metric"] == "skipped_steps"]
    assert skipped[-1] == len(bad)
    weights = load_file(run / "model" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.parametrize("method", ["exact", "sampled"])
@pytest.mark.parametrize("scope", ["global", "layer", "tensor"])
def test_nan_importance_is_an_error_in_every_selection_method(method: str, scope: str) -> None:
    scores = {"layers.0.w": torch.rand(64, 64), "layers.1.w": torch.rand(64, 64)}
    scores["layers.1.w"][3, 5] = math.nan
    with pytest.raises(NonFiniteScores, match="layers.1.w"):
        top_p(scores, 0.01, scope=scope, method=method, sample_size=100, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_an_inf_score_is_an_error_and_an_overflowing_sum_of_finite_scores_is_not(bad: float) -> None:
    """top_p checks finiteness from the sum first: inf, -inf and NaN are caught; finite scores whose sum
    overflows float32 are still ranked."""
    huge = {"layers.0.w": torch.full((8, 8), 3e38), "layers.1.w": torch.rand(8, 8)}
    assert not torch.isfinite(huge["layers.0.w"].sum())
    assert top_p(huge, 0.5)["layers.0.w"].all()
    huge["layers.1.w"][2, 2] = bad
    with pytest.raises(NonFiniteScores, match="layers.1.w"):
        top_p(huge, 0.5)


class NaNImportanceEPI(EPI):
    def importance(self):
        scores = super().importance()
        next(iter(scores.values())).view(-1)[0] = math.nan
        return scores


def test_nan_importance_stops_epi_with_a_clear_line(tmp_path: Path) -> None:
    cfg = make_cfg("strategy=epi", "strategy._target_=tests.test_trust.NaNImportanceEPI", "strategy.warmup=2")
    with pytest.raises(TrainingDiverged, match=r"step 2: importance .* NaN or inf"):
        Trainer(cfg, tmp_path).fit()


# --- a full disk ------------------------------------------------------------------------------


def test_disk_full_checkpoint_one_line_temp_removed_earlier_checkpoint_intact(tmp_path: Path) -> None:
    path = tmp_path / checkpoint.FILENAME
    checkpoint.save(path, {"step": 1, "w": torch.zeros(4)})
    tmp = path.with_name(path.name + ".tmp")
    tmp.symlink_to("/dev/full")  # every write there fails with ENOSPC, as on a full disk
    with pytest.raises(UserError, match=r"no space left on device writing checkpoint .*checkpoint.pt \(needs about 4.0 MB.*"
                                        r"Free space and continue from its checkpoint"):
        checkpoint.save(path, {"step": 2, "w": torch.zeros(1_000_000)})
    assert not tmp.exists() and not tmp.is_symlink()
    assert checkpoint.load_tensors(path, "checkpoint")["step"] == 1


def test_disk_full_through_train_py_is_one_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt.tmp").symlink_to("/dev/full")
    proc = run_script("train.py", *TINY, "strategy=none", f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: no space left on device writing checkpoint") and "Traceback" not in proc.stderr
    # its first checkpoint: there is nothing to resume from, and the line says how to start again instead
    assert "No checkpoint of this run was written before: free space and start it again (resume=auto" in lines[-1]
    assert "continue from its checkpoint" not in lines[-1]
    assert not (run / "checkpoint.pt.tmp").is_symlink() and not (run / "model").exists()


def test_resume_of_a_run_killed_before_its_first_checkpoint_points_to_resume_auto(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")  # what a run killed while writing its first checkpoint leaves
    (run / "checkpoint.pt.tmp").write_bytes(b"half")
    proc = run_script("train.py", *TINY, "strategy=none", f"resume={run}", f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: resume='{run}': no checkpoint at {run / 'checkpoint.pt'}: the run in {run} stopped before")
    assert "resume=auto" in line


def test_device_cuda_without_cuda_is_one_line(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = run_script("train.py", *TINY, "device=cuda", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: device='cuda': this torch ")


# --- run directories and resume ---------------------------------------------------------------


def test_a_directory_holding_a_run_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    proc = run_script("train.py", *TINY, "strategy=none", f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 2
    assert "already holds a run (metrics.jsonl)" in proc.stderr.strip().splitlines()[-1]
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n' and not (run / "config.yaml").exists()


def test_resume_right_after_a_stage_ends_runs_its_closing_work_exactly_once(tmp_path: Path, monkeypatch) -> None:
    stages = "schedule.stages=[{name: a, tasks: [math], steps: 4}, {name: b, tasks: [code], steps: 4}]"
    overrides = ["strategy=none", stages, "schedule.checkpoint_every=4"]
    run = tmp_path / "run"
    real_save = checkpoint.save

    def save_then_crash(path, state):
        real_save(path, state)
        if state["step"] == 4:
            raise KeyboardInterrupt  # killed right after the checkpoint at stage a's last step

    monkeypatch.setattr(checkpoint, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_script.train(make_cfg(*overrides), run)
    monkeypatch.setattr(checkpoint, "save", real_save)
    train_script.train(make_cfg(*overrides, f"resume={run}"), run)

    events = read_metrics(run)
    closing = Counter((e["split"], e["task"]) for e in events if e["split"].startswith("test/after_stage") and e["metric"] == "score")
    assert set(closing) == {(f"test/after_stage{k}", t) for k in (0, 1) for t in ("math", "code", "logic", "instruct", "format")}
    assert set(closing.values()) == {1}
    assert [e["step"] for e in events if e["split"] == "train" and e["metric"] == "loss"] == list(range(1, 9))
    assert Counter(e["task"] for e in events if e["split"] == "mixture" and e["metric"] == "examples") == {
        t: 2 for t in ("math", "code", "logic", "instruct", "format")
    }


# --- plans that would isolate nothing -------------------------------------------------------


@pytest.mark.parametrize("strategy", ["epi", "random"])
def test_a_run_whose_first_mask_comes_after_its_last_step_is_refused(strategy: str, tmp_path: Path) -> None:
    cfg = make_cfg(f"strategy={strategy}", "schedule.steps=40")  # warmup 100 by default
    with pytest.raises(UserError, match=r"strategy.warmup=100: the first mask would come after the run's last step \(40\)"):
        Trainer(cfg, tmp_path)
    Trainer(make_cfg(f"strategy={strategy}", "schedule.steps=40", "strategy.allow_no_isolation=true"), tmp_path)


def test_a_stage_that_would_start_unprotected_is_refused(tmp_path: Path) -> None:
    stages = "schedule.stages=[{name: a, tasks: [math], steps: 20}, {name: b, tasks: [code], steps: 20}]"
    with pytest.raises(UserError, match=r"after stage 'a' ends at step 20, so stage 'b' would start with nothing isolated"):
        Trainer(make_cfg("strategy=epi", stages, "strategy.warmup=30"), tmp_path)
    Trainer(make_cfg("strategy=epi", stages, "strategy.warmup=20"), tmp_path)


# --- checkpoints are data ---------------------------------------------------------------------


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_whose_pickle_would_run_code_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    shared = tmp_path / "shared"
    shared.mkdir()
    torch.save({key: RunsCode(marker) if key == "config" else {} for key in checkpoint.REQUIRED}, shared / checkpoint.FILENAME)
    proc = run_script("train.py", *TINY, f"resume={shared}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "posix.system" in line and "refused and nothing in it was run" in line
    assert not marker.exists()


def test_a_real_checkpoint_loads_with_the_safe_loader(tmp_path: Path) -> None:
    Trainer(make_cfg("strategy=epi", "strategy.warmup=2", "strategy.refresh_every=2"), tmp_path).fit()
    state = torch.load(tmp_path / checkpoint.FILENAME, weights_only=True)
    assert state["step"] == 6 and state["strategy"]["refreshes"] == 3


def test_a_crafted_probe_cache_file_is_refused(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cpi = ["strategy=cpi", "strategy.probe_steps=1", f"strategy.cache_dir={cache}"]
    (tmp_path / "a").mkdir()
    Trainer(make_cfg(*cpi), tmp_path / "a")
    marker = tmp_path / "code_ran"
    probe = sorted(cache.glob("*.pt"))[0]
    torch.save(RunsCode(marker), probe)
    (tmp_path / "b").mkdir()
    with pytest.raises(UserError, match=r"cached probe .* refused and nothing in it was run"):
        Trainer(make_cfg(*cpi), tmp_path / "b")
    assert not marker.exists()


def test_config_saved_in_a_checkpoint_is_plain_data(tmp_path: Path) -> None:
    Trainer(make_cfg("strategy=none"), tmp_path).fit()
    saved = checkpoint.load(str(tmp_path))["config"]
    assert json.loads(json.dumps(saved)) == saved and OmegaConf.create(saved).schedule.steps == 6


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

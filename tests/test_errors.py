"""Bad input: one readable message naming the key and the fix, a non-zero exit, nothing lost."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from epi import checkpoint
from epi.config import validate
from epi.data.load import known_tasks
from epi.errors import UserError
from epi.models import build_model
from epi.trainer import Trainer
from tests.helpers import TINY, make_cfg, run_main, run_script


@pytest.mark.parametrize(
    "override,needle",
    [
        ("optimizer.lr=-1", "optimizer.lr=-1"),
        ("schedule.steps=0", "schedule.steps=0"),
        ("schedule.decay=exp", "schedule.decay='exp'"),
        ("schedule.clip_norm=-2", "schedule.clip_norm=-2"),
        ("data.tasks=[math,poetry]", "unknown task 'poetry'"),
        ("data.tasks=[]", "data.tasks=[]"),
        ("+data.weights.math=-1", "data.weights.math=-1"),
        ("eval.split=dev", "eval.split='dev'"),
        ("logger.mode=sometimes", "logger.mode='sometimes'"),
        ("isolation.moments=freeze", "isolation.moments='freeze'"),
        ("schedule.nonfinite=ignore", "schedule.nonfinite='ignore'"),
        ("isolation.task_split=tokens", "isolation.task_split='tokens'"),
        ("model.kind=gpt", "model.kind='gpt'"),
        ("model.dtype=fp8", "model.dtype='fp8'"),
        ("data.n_train=60000", "data.n_train=60000: the built-in tasks generate at most 50000"),
        ("data.contamination_warn=2", "data.contamination_warn=2"),
        # non-finite numbers pass every `> 0` rule: refused wherever they stand, group keys and optimizer keys alike
        ("optimizer.lr=inf", "optimizer.lr=inf: must be a finite number"),
        ("optimizer.betas=[0.9,nan]", "optimizer.betas[1]=nan: must be a finite number"),
        ("optimizer.weight_decay=inf", "optimizer.weight_decay=inf: must be a finite number"),
        ("schedule.clip_norm=inf", "schedule.clip_norm=inf: must be a finite number"),
        ("+optimizer.eps=nan", "optimizer.eps=nan: must be a finite number"),
        ("strategy.p=nan", "strategy.p=nan: must be a finite number"),
        # a key only an override brings is refused like a misspelt group key; an experiment's declared variables are not
        ("+foo=1", "config: unknown top-level key(s) ['foo']"),
        ("+sead=3", "config: unknown top-level key(s) ['sead']"),
        ("model=hf", "model.name_or_path=???: must be set"),
    ],
)
def test_bad_config_value_names_the_key(override: str, needle: str) -> None:
    cfg = make_cfg(override)
    with pytest.raises(UserError, match=None) as err:
        validate(cfg, known_tasks(cfg.data))
    assert needle in str(err.value)


def test_probe_lr_must_be_finite() -> None:
    cfg = make_cfg("strategy=cpi", "strategy.probe_lr=inf")
    with pytest.raises(UserError, match=r"strategy.probe_lr=inf: must be a finite number"):
        validate(cfg, known_tasks(cfg.data))


def test_experiment_variables_are_known_keys() -> None:
    cfg = make_cfg("experiment=table_forgetting", "pair=[format,instruct]", "stage_steps=3")
    validate(cfg, known_tasks(cfg.data))


@pytest.mark.slow
def test_weights_made_non_finite_by_a_finite_loss_step_are_never_checkpointed(capfd: pytest.CaptureFixture, tmp_path: Path) -> None:
    """lr=1e300 is a finite config value, but AdamW's fp32 update makes every weight inf at step 1 while that step's
    loss and gradient norm are finite: the run stops there (exit 3) and writes no checkpoint of that state."""
    run = tmp_path / "run"
    proc = run_script("train.py", *TINY, "strategy=none", "optimizer.lr=1e300", "schedule.checkpoint_every=1",
                      f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: step 1: the weights are not finite after the update") and "no checkpoint had been written yet" in line
    assert not (run / checkpoint.FILENAME).exists() and not (run / "model").exists()


def test_unknown_model_id_fails_fast_with_the_fix() -> None:
    cfg = make_cfg("model=hf", "model.name_or_path=no-such-org/no-such-model")
    with pytest.raises(UserError, match="not a local directory.*HF_HUB_OFFLINE=1.*model=smollm2_135m"):
        build_model(cfg.model)


@pytest.mark.slow
def test_cli_exits_non_zero_with_one_line(tmp_path: Path) -> None:
    proc = run_script("train.py", *TINY, "optimizer.lr=-1", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: optimizer.lr=-1: must be > 0")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_corrupt_checkpoint_is_reported_and_left_intact(capfd: pytest.CaptureFixture, tmp_path: Path) -> None:
    bad = tmp_path / "old" / checkpoint.FILENAME
    bad.parent.mkdir()
    bad.write_bytes(b"not a checkpoint")
    proc = run_main("train.py", *TINY, f"resume={bad.parent}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, capfd=capfd)
    assert proc.returncode == 2
    assert "is corrupt or unreadable" in proc.stderr and "left untouched" in proc.stderr
    assert bad.read_bytes() == b"not a checkpoint"


def test_checkpoint_of_another_version_is_refused_by_name(tmp_path: Path) -> None:
    old = tmp_path / checkpoint.FILENAME
    torch.save({"step": 3, "model": {}, "optimizer": {}, "scheduler": {}, "sampler": {}, "strategy": {}, "rng": {}}, old)
    before = old.read_bytes()
    with pytest.raises(UserError, match=r"lacks \['compute', 'config', 'metrics_lines', 'realised', 'skipped'\]: it was not written by this version"):
        checkpoint.load(str(tmp_path))
    assert old.read_bytes() == before


def test_missing_checkpoint_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no checkpoint at"):
        checkpoint.load(str(tmp_path))


def test_unknown_strategy_key_is_named() -> None:
    from epi.strategies import build_strategy

    cfg = make_cfg("strategy=none", "+strategy.omegaa=0.5")  # no strategy has it (CPI's omega would be ignored: tests/test_sweeps.py)
    with pytest.raises(UserError, match=r"strategy=none: unknown key\(s\) \[.omegaa.\]"):
        build_strategy(cfg.strategy)


@pytest.mark.parametrize(
    "strategy,override,needle",
    [
        ("epi", "strategy.p=0", "strategy.p=0"),
        ("epi", "strategy.p=1.5", "strategy.p=1.5"),
        ("epi", "strategy.signal=fisher", "strategy.signal='fisher'"),
        ("epi", "strategy.norm=l2", "strategy.norm='l2'"),
        ("epi", "strategy.refresh_every=0", "strategy.refresh_every=0"),
        ("epi", "strategy.signal=taylor", "strategy.beta=null reuses"),
        ("random", "strategy.p=-0.1", "strategy.p=-0.1"),
        ("cpi", "strategy.p=0", "strategy.p=0"),
        ("cpi", "strategy.tau=-1", "strategy.tau=-1"),
        ("cpi", "strategy.omega=2", "strategy.omega=2"),
        ("cpi", "strategy.space=latent", "strategy.space='latent'"),
        ("cpi", "strategy.order=alphabetical", "strategy.order='alphabetical'"),
        ("cpi", "strategy.stage_data=all", "strategy.stage_data='all'"),
        ("multistage", "strategy.order=given", "needs strategy.given_order"),
    ],
)
def test_bad_strategy_values_name_the_key(strategy: str, override: str, needle: str) -> None:
    from epi.strategies import build_strategy

    with pytest.raises(UserError) as err:
        build_strategy(make_cfg(f"strategy={strategy}", override).strategy)
    assert needle in str(err.value)


@pytest.mark.slow
def test_bad_strategy_value_writes_nothing(capfd: pytest.CaptureFixture, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = run_main("train.py", *TINY, "strategy=epi", "strategy.p=1.5", f"hydra.run.dir={run}", cwd=tmp_path, capfd=capfd)
    assert proc.returncode == 2 and "strategy.p=1.5" in proc.stderr
    assert {p.name for p in run.iterdir()} <= {".hydra", "train.log", "run.lock"}  # Hydra's own record only


@pytest.mark.parametrize(
    "config_json,needle",
    [(None, "the directory has no config.json"), ('{"model_type": "llama", "hidden_size": "x"}', "cannot load a model from it")],
    ids=["empty", "broken"],
)
def test_empty_or_broken_model_directory_is_one_line(tmp_path: Path, config_json: str | None, needle: str) -> None:
    if config_json is not None:
        (tmp_path / "config.json").write_text(config_json)
    with pytest.raises(UserError, match=needle):
        build_model(make_cfg("model=hf", f"model.name_or_path={tmp_path}").model)


@pytest.mark.slow
def test_device_cuda_without_cuda_is_one_line(capfd: pytest.CaptureFixture, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = run_main("train.py", *TINY, "device=cuda", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, capfd=capfd)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: device='cuda': this torch ")


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

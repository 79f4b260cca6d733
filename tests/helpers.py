"""The suite's helpers, in one module: config composition with tiny limits, subprocess runs of train.py / eval.py,
crash-and-resume and two-ranks-versus-one-process harnesses, and the test-only strategies that configs name by
`_target_` (tests.helpers.WatchedEPI). tests/conftest.py only pins the environment and holds the fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from epi.sharding import local
from epi.strategies.epi import EPI
from epi.strategies.none import NoIsolation

if TYPE_CHECKING:
    from epi.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]

# A run small enough for a unit test: ~40k parameters, a handful of steps.
TINY_MODEL = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2", "model.num_heads=2"]
TINY = [
    *TINY_MODEL,
    "data.n_train=64",
    "data.n_val=8",
    "data.n_test=8",
    "schedule.steps=6",
    "schedule.batch_size=4",
    "schedule.warmup_steps=1",
    "schedule.log_every=1",
    "schedule.eval_every=0",
    "schedule.checkpoint_every=0",
    "eval.n_examples=4",
    "eval.max_new_tokens=8",
    "logger.mode=disabled",
    "device=cpu",
]

# EPI and CPI-FT shrunk so that a few steps refresh masks / run stages (tests/test_epi.py, tests/test_cpi.py)
EPI_FAST = ["strategy=epi", "strategy.p=0.2", "strategy.warmup=2", "strategy.refresh_every=3", "schedule.steps=14", "optimizer.weight_decay=0.5", "optimizer.lr=1e-2"]
CPI_FAST = ["strategy=cpi", "strategy.probe_steps=4", "strategy.p=0.1", "strategy.tau=2.0", "schedule.steps=15", "optimizer.weight_decay=0.5", "optimizer.lr=1e-2"]


def short_epi(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """The default strategy (EPI) with its first mask at step 2, so a few-step run isolates something
    (at the default warmup of 100 the run would be refused as plain SFT); other strategies unchanged."""
    chosen = any(o.lstrip("+").startswith(("strategy=", "strategy.warmup=", "experiment=", "arm=")) for o in overrides)
    return [] if chosen else ["strategy.warmup=2"]


def make_cfg(*overrides: str, tiny: bool = True) -> DictConfig:
    """The training config as train.py composes it, shrunk to unit-test size unless `tiny=False`."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        if not tiny:
            return compose("config", overrides=list(overrides))
        other_model = any(o.startswith("model=") for o in overrides)
        base = [o for o in TINY if not (other_model and o in TINY_MODEL)]
        return compose("config", overrides=[*base, *overrides, *short_epi(overrides)])


def run_main(script: str, *args: str, cwd: Path, capfd: pytest.CaptureFixture | None = None) -> subprocess.CompletedProcess:
    """train.py / eval.py's `main` run in this process with `args` as its command line: Hydra's composition, the run
    directory, the wrapper's one `error:` line and exit code, all as `run_script` runs them, without the interpreter's
    start-up (~4 s of imports a subprocess pays). For the many bad-input paths; `python train.py` across a process
    boundary is run_script's (tests/test_errors.py, the torchrun and SLURM tests). Without `capfd` the output is not
    kept (stdout and stderr come back empty)."""
    import runpy

    from hydra.core.global_hydra import GlobalHydra

    if script == "train.py" and "-m" not in args and set(TINY) & set(args):
        args = (*args, *short_epi(args))
    argv, here = sys.argv, os.getcwd()
    if capfd is not None:
        capfd.readouterr()  # what the test printed before: not this run's
    sys.argv, code = [str(ROOT / script), *args], 0
    os.chdir(cwd)
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")  # as `python train.py`: Hydra finds conf/ beside the file
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    finally:
        sys.argv = argv
        os.chdir(here)
        GlobalHydra.instance().clear()
    out, err = capfd.readouterr() if capfd is not None else ("", "")
    return subprocess.CompletedProcess([script, *args], code, out, err)


def run_script(script: str, *args: str, cwd: Path, timeout: int = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs train.py / eval.py as a user would, from `cwd` (where outputs/ lands); `env` adds variables."""
    if script == "train.py" and "-m" not in args and set(TINY) & set(args):
        args = (*args, *short_epi(args))
    # No PYTHONPATH: Python puts the script's folder (ROOT) first on sys.path, which makes `epi` and the
    # test-only classes that configs name by `_target_` (tests.helpers.WatchedEPI) importable, and
    # joblib's sweep workers inherit that sys.path. A test that needs more on the path passes it in `env`
    # (tests/test_resume_cli.py: tests/killer, whose sitecustomize.py Python loads only from PYTHONPATH).
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def eval_report(runs: str | Path, tmp_path: Path, *args: str) -> tuple[Path, str]:
    """`eval.py runs=<runs>` into tmp_path/out as a user runs it: the out directory and its report.md."""
    out = tmp_path / "out"
    proc = run_main("eval.py", f"runs={runs}", *args, f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0
    return out, (out / "report.md").read_text()


# --- test-only strategies and harnesses --------------------------------------------------------


def crash_after(trainer, step: int):
    """Makes `trainer`'s run die (KeyboardInterrupt, as a killed job) right after step `step`, whatever its strategy:
    the strategy's own after_step runs first, so a checkpoint or a mask refresh due at that step is done."""
    real = trainer.strategy.after_step

    def after_step(s: int) -> None:
        real(s)
        if s == step:
            raise KeyboardInterrupt

    trainer.strategy.after_step = after_step
    return trainer


def crash_and_resume(tmp_path: Path, common: list[str], crash_at: int):
    """A straight run, the same run killed after step `crash_at` (crash_after), and that run resumed from its
    checkpoint: (straight, resumed trainers, the checkpoint's state)."""
    from epi import checkpoint
    from epi.trainer import Trainer

    for d in ("straight", "crashed", "resumed"):
        (tmp_path / d).mkdir()
    straight = Trainer(make_cfg(*common), tmp_path / "straight")
    straight.fit()
    with pytest.raises(KeyboardInterrupt):
        crash_after(Trainer(make_cfg(*common), tmp_path / "crashed"), crash_at).fit()
    state = checkpoint.load(str(tmp_path / "crashed"))
    resumed = Trainer(make_cfg(*common), tmp_path / "resumed", resume_state=state)
    resumed.fit()
    return straight, resumed, state


class WatchedEPI(EPI):
    """Real EPI that, after every step, checks each isolated coordinate still holds the value it had when isolated."""

    def after_step(self, step: int) -> None:
        params = {name: local(p) for name, p in self.ctx.named_params.items()}  # parallel=fsdp: this rank's shards
        for name, mask in self.ctx.masks().items():
            assert torch.equal(params[name].detach()[mask], self.frozen_at[name][mask]), f"{name} moved at step {step}"
        before = self.ctx.masks()
        super().after_step(step)
        after = self.ctx.masks()
        if after is not before:
            # value at isolation: kept for coordinates isolated before, current for newly isolated ones
            self.frozen_at = {
                name: torch.where(before.get(name, torch.zeros_like(m)) & m, self.frozen_at.get(name, params[name].detach()), params[name].detach()).clone()
                for name, m in after.items()
            }
            self.released_at = {name: (before[name] & ~after.get(name, torch.zeros_like(before[name]))) for name in before}
            self.snapshot = {name: params[name].detach().clone() for name in params}
        self.history.append((step, after))

    def prepare(self, ctx, stages):
        self.frozen_at, self.history = {}, []
        return super().prepare(ctx, stages)


class Watched:
    """Wraps a trainer's step draw and checks every step: a coordinate whose owners are all absent from the
    step's batch is bit-identical after it; the coordinates of a present task moved."""

    def __init__(self, trainer: Trainer):
        self.trainer, self.checked, self.moved = trainer, 0, 0
        draw = trainer.stepper.draw_step

        def recording(learner, step):
            out = draw(learner, step)
            self.tasks = frozenset().union(*(micro.tasks for micro in out[0]))
            self.before = {n: p.detach().clone() for n, p in trainer.named_params.items()}
            self.owned = trainer.optimizer.exclusive_masks
            return out

        trainer.stepper.draw_step = recording
        after_step = trainer.strategy.after_step

        def check(step: int) -> None:
            params = trainer.named_params
            for task, masks in self.owned.items():
                others = [m for t, m in self.owned.items() if t != task and t in self.tasks]
                for name, mask in masks.items():
                    alone = mask.clone()
                    for m in others:
                        if name in m:
                            alone &= ~m[name]
                    if not alone.any():
                        continue
                    same = torch.equal(params[name].detach()[alone], self.before[name][alone])
                    if task in self.tasks:
                        self.moved += not same
                    else:
                        assert same, f"step {step}: {name}, exclusive to {task!r} (absent from the batch), moved"
                        self.checked += 1
            after_step(step)

        trainer.strategy.after_step = check


class GradRecorder(NoIsolation):
    """Keeps a copy of every step's gradients as the strategy sees them (before clipping)."""

    def prepare(self, ctx, stages):
        self.grads: list[dict[str, torch.Tensor]] = []
        return super().prepare(ctx, stages)

    def after_backward(self, step: int) -> None:
        self.grads.append({n: p.grad.clone() for n, p in self.ctx.named_params.items()})


def recorded(tmp_path: Path, *overrides: str):
    """A 3-step strategy=none run that keeps every step's gradients (GradRecorder), in tmp_path/<override values>."""
    from epi.trainer import Trainer

    run = tmp_path / "_".join(o.split("=")[-1] for o in overrides)
    run.mkdir()
    trainer = Trainer(make_cfg("strategy=none", "strategy._target_=tests.helpers.GradRecorder", "schedule.steps=3", *overrides), run)
    trainer.fit()
    return trainer


def two_ranks_and_one_process(tmp_path: Path, common: list[str]) -> None:
    """Runs `common` under torchrun with 2 gloo ranks and as one process, and checks the logged losses
    (the global batch's) and the final weights agree to float tolerance, and the logged padding is the global batch's."""
    from safetensors.torch import load_file

    from epi.logging import read_metrics

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
         *common, f"hydra.run.dir={tmp_path / 'ddp'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    from epi.run import train

    train(make_cfg(*common), tmp_path / "one")  # the one process in this one: the torchrun above is the CLI's path

    def logged(run: str, metric: str) -> list[float]:
        return [e["value"] for e in read_metrics(tmp_path / run) if e["split"] == "train" and e["metric"] == metric]

    steps = next(int(o.split("=")[1]) for o in reversed(common) if o.startswith("schedule.steps="))
    assert len(logged("ddp", "loss")) == len(logged("ddp", "padding")) == steps
    assert logged("ddp", "loss") == pytest.approx(logged("one", "loss"), rel=1e-5)  # the global batch's loss, not rank 0's shard
    packed = "data.packing=true" in common  # each rank packs its own share: fewer examples to fill its rows with
    for ddp, one in zip(logged("ddp", "padding"), logged("one", "padding")):  # the global batch's cells: each rank pads
        assert 0 <= ddp < 1 and (packed or ddp <= one)  # its own share to its own longest example, never more than one process's batch
    a, b = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("ddp", "one"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)

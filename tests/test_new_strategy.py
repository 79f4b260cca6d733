"""A new built-in strategy is one module in epi/strategies/ plus one YAML in conf/strategy/, nothing else edited.

The proof (docs/new-strategy.md walks through it): a temporary copy of the checkout (train.py, epi/, conf/) gets
exactly two new files, a throwaway strategy `headlock` and its YAML. From that copy, `python -m epi.strategies`
lists it as a built-in with its keys, train.py composes a config with `strategy=headlock`, validates it (a value
its `Config` refuses is one error line) and trains a few steps in which its hooks run. The copy's `epi` is
the one imported: Python puts the script's folder (or, for `-m`, the working directory) first on sys.path,
ahead of the installed package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from epi.logging import read_metrics
from tests.helpers import ROOT, TINY

HEADLOCK_MODULE = '''"""`strategy=headlock`: freeze one module, or everything but it (a throwaway built-in: tests/test_new_strategy.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch

from epi.errors import UserError
from epi.schema import Schema, at_least
from epi.strategies.base import Context, Stage, Strategy


@dataclass
class HeadLockConfig(Schema):
    module: str  # a module name, e.g. model.layers.0: the parameters under it
    side: Literal["freeze", "train"]  # freeze: the module is frozen | train: everything but the module is
    log_every: Annotated[int, at_least(1)]  # steps between two `mask` lines in metrics.jsonl


class HeadLock(Strategy):
    """Freezes one module, or everything but it, for the whole run."""

    name = "headlock"
    Config = HeadLockConfig

    def prepare(self, ctx: Context, stages: list[Stage]) -> list[Stage]:
        super().prepare(ctx, stages)
        under = {n for n in ctx.named_params if n == self.cfg.module or n.startswith(self.cfg.module + ".")}
        if not under:
            raise UserError(f"strategy.module={self.cfg.module!r}: no parameter lies under it")
        frozen = under if self.cfg.side == "freeze" else set(ctx.named_params) - under
        ctx.set_masks({n: torch.ones_like(ctx.named_params[n], dtype=torch.bool) for n in frozen})
        self.frozen = len(frozen)
        self.logged = 0
        ctx.info(f"headlock: {self.frozen} tensors frozen")
        return stages

    def after_step(self, step: int) -> None:
        if step % self.cfg.log_every == 0:
            self.ctx.log(step, "mask", {"frozen_tensors": self.frozen})
            self.logged += 1

    def state_dict(self) -> dict[str, Any]:
        return {"logged": self.logged}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.logged = state["logged"]
'''

HEADLOCK_YAML = """# Freeze one module (or everything but it); types and allowed values: epi.strategies.headlock.HeadLockConfig.
_target_: epi.strategies.headlock.HeadLock
name: headlock
module: model.layers.0   # a module name: the parameters under it
side: freeze             # freeze | train
log_every: 2             # steps between two mask lines in metrics.jsonl
"""


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the checkout's code and configs plus the two files of the new strategy, and nothing else changed."""
    copy = tmp_path_factory.mktemp("checkout")
    for folder in ("epi", "conf"):
        shutil.copytree(ROOT / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "train.py", copy / "train.py")
    (copy / "epi" / "strategies" / "headlock.py").write_text(HEADLOCK_MODULE)
    (copy / "conf" / "strategy" / "headlock.yaml").write_text(HEADLOCK_YAML)
    return copy


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_the_two_files_are_all_a_new_builtin_needs(checkout: Path) -> None:
    added = {str(p.relative_to(checkout)) for p in checkout.rglob("*") if p.is_file() and not (ROOT / p.relative_to(checkout)).exists()}
    assert added == {"epi/strategies/headlock.py", "conf/strategy/headlock.yaml"}
    assert not (ROOT / "epi" / "strategies" / "headlock.py").exists()  # the checkout itself is untouched


def test_a_new_builtin_is_listed_with_its_keys(checkout: Path) -> None:
    proc = run(["-m", "epi.strategies"], cwd=checkout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    block = next(b for b in proc.stdout.split("\n\n") if b.startswith("headlock"))
    assert "Freezes one module, or everything but it" in block
    assert "_target_: epi.strategies.headlock.HeadLock  (from epi-sft)" in block
    assert "module=model.layers.0 side=freeze log_every=2" in block


@pytest.mark.slow
def test_a_new_builtin_composes_validates_and_trains(checkout: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run([str(checkout / "train.py"), *TINY, "strategy=headlock", "schedule.steps=4", f"hydra.run.dir={out}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    strategy = OmegaConf.load(out / "config.yaml").strategy
    assert strategy._target_ == "epi.strategies.headlock.HeadLock" and strategy.side == "freeze"
    masks = [e for e in read_metrics(out) if e["split"] == "mask" and e["metric"] == "frozen_tensors"]
    assert [e["step"] for e in masks] == [2, 4] and all(e["value"] > 0 for e in masks)


@pytest.mark.slow
@pytest.mark.parametrize(("override", "says"), [
    ("strategy.log_every=0", "error: strategy.log_every=0: must be >= 1"),
    ("strategy.side=both", "error: strategy.side='both': must be one of ['freeze', 'train']"),
    ("+strategy.colour=red", "error: strategy=headlock: unknown key(s) ['colour']; valid keys: ['log_every', 'module', 'side']"),
])
def test_a_new_builtin_s_config_is_checked_before_the_run(checkout: Path, tmp_path: Path, override: str, says: str) -> None:
    proc = run([str(checkout / "train.py"), *TINY, "strategy=headlock", override, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode != 0 and says in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

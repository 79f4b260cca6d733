"""General-ability retention (`eval.retention`): held-out text, fixed by its hash, measured on the model
as loaded and after training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from epi import retention
from epi.logging import read_metrics
from epi.models import build_model
from epi.trainer import Trainer
from tests.helpers import crash_and_resume, make_cfg


def test_the_corpus_is_fixed_and_cut_into_equal_passages() -> None:
    cfg = make_cfg()
    _, tok = build_model(cfg.model)
    a, b = retention.build(tok, 5, 64), retention.build(tok, 5, 64)
    assert a.corpus_sha256 == b.corpus_sha256 and a.passages == b.passages
    assert len(a.passages) == 5 and all(len(p) == 64 for p in a.passages)
    assert "JSON" in retention.corpus()  # prose of the standard library, not any built-in task


def test_retention_is_measured_before_anything_changes_the_model_and_after_training(tmp_path: Path) -> None:
    cfg = make_cfg("strategy=none", "eval.retention=4", "schedule.steps=4", "optimizer.lr=1e-2")
    trainer = Trainer(cfg, tmp_path)
    before = retention.perplexity(trainer.model, trainer.retention)
    trainer.fit()
    data = json.loads((tmp_path / "retention.json").read_text())
    assert data["before"]["perplexity"] == pytest.approx(before["perplexity"], rel=1e-6)
    assert data["after"]["perplexity"] != pytest.approx(before["perplexity"], rel=1e-3)  # four steps at lr 1e-2 move it
    steps = sorted(e["step"] for e in read_metrics(tmp_path) if e["split"] == "retention" and e["metric"] == "perplexity")
    assert steps == [0, 4]
    assert data["corpus_sha256"] == trainer.retention.corpus_sha256 and data["passages"] == 4


def test_retention_before_survives_a_resume(tmp_path: Path) -> None:
    crash_and_resume(tmp_path, ["strategy=none", "eval.retention=2", "schedule.steps=6", "schedule.checkpoint_every=3", "optimizer.lr=1e-2"], 4)
    straight, resumed = (json.loads((tmp_path / d / "retention.json").read_text()) for d in ("straight", "resumed"))
    assert resumed == straight

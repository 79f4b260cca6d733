"""CPI-FT and the multi-stage baseline: cores, groups, order, probe cache, frozen earlier cores."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from epi.errors import UserError
from epi.logging import read_metrics
from epi.masks import jaccard
from epi.strategies.cpi import CPI, connected_groups, core_regions, cut_into_stages, order_groups, overlap_matrix
from epi.trainer import Trainer
from tests.helpers import CPI_FAST, make_cfg


def test_cores_are_the_largest_update_magnitudes() -> None:
    base = {"a": torch.zeros(4), "b": torch.zeros(2, 2)}
    tuned = {"a": torch.tensor([0.1, -5.0, 0.2, 0.0]), "b": torch.tensor([[3.0, 0.0], [-0.3, 4.0]])}
    cores = core_regions(base, tuned, p=3 / 8)
    assert cores["a"].tolist() == [False, True, False, False]
    assert cores["b"].tolist() == [[True, False], [False, True]]
    per_tensor = core_regions(base, tuned, p=0.25, scope="tensor")
    assert per_tensor["a"].sum() == 1 and per_tensor["b"].tolist() == [[False, False], [False, True]]


def test_overlap_and_connected_groups_on_hand_made_masks() -> None:
    m = lambda *bits: {"w": torch.tensor(bits, dtype=torch.bool)}  # noqa: E731
    cores = {"x": m(1, 1, 0, 0, 0, 0), "y": m(1, 0, 0, 0, 0, 0), "z": m(0, 0, 0, 0, 1, 1), "u": m(0, 0, 0, 0, 0, 1)}
    overlap = overlap_matrix(cores)
    assert overlap[0][1] == pytest.approx(0.5) and overlap[0][2] == 0.0 and overlap[2][3] == pytest.approx(0.5)
    names = list(cores)
    assert connected_groups(names, overlap, tau=0.1) == [["x", "y"], ["z", "u"]]
    assert connected_groups(names, overlap, tau=0.6) == [["x"], ["y"], ["z"], ["u"]]
    assert connected_groups(names, overlap, tau=0.0) == [names]
    # transitive: a-b and b-c linked, a-c not => one component
    chain = [[1, 0.2, 0.0], [0.2, 1, 0.2], [0.0, 0.2, 1]]
    assert connected_groups(["a", "b", "c"], chain, tau=0.1) == [["a", "b", "c"]]


def test_stage_orders() -> None:
    groups = [["a"], ["b", "c"], ["d"]]
    assert order_groups(groups, "given", seed=0, given=["d", "c", "a", "b"], mass={}) == [["d"], ["b", "c"], ["a"]]
    assert order_groups(groups, "heuristic", seed=0, given=[], mass={"a": 1, "b": 1, "c": 5, "d": 2}) == [["b", "c"], ["d"], ["a"]]
    shuffled = [order_groups(groups, "random", seed=s, given=[], mass={}) for s in range(6)]
    assert shuffled[0] == order_groups(groups, "random", seed=0, given=[], mass={})
    assert len({str(s) for s in shuffled}) > 1


class WatchedCPI(CPI):
    """Real CPI that snapshots the weights at each stage start, to check earlier cores afterwards."""

    def on_stage_start(self, index, stage, step):
        super().on_stage_start(index, stage, step)
        self.snapshots = getattr(self, "snapshots", []) + [{n: p.detach().clone() for n, p in self.ctx.named_params.items()}]


def test_earlier_cores_bit_identical_through_later_stages(tmp_path: Path) -> None:
    cfg = make_cfg(*CPI_FAST, "strategy._target_=tests.test_cpi.WatchedCPI", f"strategy.cache_dir={tmp_path / 'cache'}")
    trainer = Trainer(cfg, tmp_path)
    trainer.fit()
    strategy = trainer.strategy
    assert len(strategy.groups) == 5 and len(strategy.snapshots) == 5  # tau > 1: every task its own stage
    final = {n: p.detach() for n, p in trainer.named_params.items()}
    for j, group in enumerate(strategy.groups[:-1]):
        frozen_from = strategy.snapshots[j + 1]  # group j's cores are frozen from stage j+1 on
        for task in group:
            for name, core in strategy.cores[task].items():
                assert torch.equal(final[name][core], frozen_from[name][core]), f"core of {task} in {name} moved"
    # ... while coordinates outside every frozen core kept training in the last stage
    last = strategy.snapshots[-1]
    moved = sum(int((final[n] != last[n]).sum()) for n in final)
    assert moved > 0.5 * sum(p.numel() for p in final.values() if p.dim() >= 2)
    assert (tmp_path / "cpi" / "overlap.png").is_file() and (tmp_path / "cpi" / "groups.json").is_file()


def test_second_run_hits_the_probe_cache(tmp_path: Path) -> None:
    cfg = make_cfg(*CPI_FAST, f"strategy.cache_dir={tmp_path / 'cache'}", "strategy.tau=0.0", "schedule.steps=3")
    runs = []
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        trainer = Trainer(cfg, tmp_path / name)
        runs.append(trainer)
        hits = [e["value"] for e in read_metrics(tmp_path / name) if e["metric"] == "probe_cache_hit"]
        assert hits == ([0.0] * 5 if name == "first" else [1.0] * 5)
    a, b = runs
    assert all(jaccard(a.strategy.cores[t], b.strategy.cores[t]) == 1.0 for t in a.strategy.cores)
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 5
    # a different probe setting is a different key
    (tmp_path / "third").mkdir()
    Trainer(make_cfg(*CPI_FAST, f"strategy.cache_dir={tmp_path / 'cache'}", "strategy.probe_steps=5", "schedule.steps=3"), tmp_path / "third")
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 10


@pytest.mark.parametrize("content", [[1, 2], {"weights": {}}, {"weights": {"x": 1}, "trained_tokens": 3}, "nan", b"not a torch file"])
def test_a_bad_probe_cache_file_is_named_ignored_and_replaced(tmp_path: Path, content, capsys) -> None:
    cfg = make_cfg(*CPI_FAST, f"strategy.cache_dir={tmp_path / 'cache'}", "strategy.tau=0.0", "schedule.steps=3", "data.tasks=[math,code]")
    (tmp_path / "first").mkdir()
    first = Trainer(cfg, tmp_path / "first")
    path = next((tmp_path / "cache").glob("math-*.pt"))
    if content == "nan":  # a probe of the right structure whose weights are not finite
        cached = torch.load(path, weights_only=True)
        next(iter(cached["weights"].values())).fill_(float("nan"))
        torch.save(cached, path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    (tmp_path / "second").mkdir()
    second = Trainer(cfg, tmp_path / "second")
    said = capsys.readouterr().out
    assert f"cpi: ignored the cached probe of 'math' {path}: " in said
    hits = {e["task"]: e["value"] for e in read_metrics(tmp_path / "second") if e["metric"] == "probe_cache_hit"}
    assert hits == {"math": 0.0, "code": 1.0}  # probed again; the good file still read
    assert all(torch.equal(x, y) for x, y in zip(first.model.state_dict().values(), second.model.state_dict().values()))
    assert torch.load(path, weights_only=True)["trained_tokens"] > 0  # replaced by a good probe


@pytest.mark.parametrize("probe_steps", [1, 3])
def test_a_diverged_probe_is_never_cached_and_names_probe_lr(tmp_path: Path, probe_steps: int) -> None:
    from epi.errors import TrainingDiverged

    cfg = make_cfg(*CPI_FAST, f"strategy.cache_dir={tmp_path / 'cache'}", "strategy.probe_lr=1e300", f"strategy.probe_steps={probe_steps}")
    with pytest.raises(TrainingDiverged, match=r"cpi: the probe of '\w+' diverged .*Lower strategy.probe_lr \(now 1e\+300\)"):
        Trainer(cfg, tmp_path)
    assert not list((tmp_path / "cache").glob("*.pt"))


@pytest.mark.parametrize("stage_data", ["group", "mixed"])
def test_stage_data_decides_what_the_first_stage_draws(tmp_path: Path, stage_data: str) -> None:
    trainer = Trainer(make_cfg(*CPI_FAST, f"strategy.cache_dir={tmp_path / 'cache'}", f"strategy.stage_data={stage_data}"), tmp_path)
    trainer.fit()
    mixture = [e for e in read_metrics(tmp_path) if e["split"] == "mixture" and e["metric"] == "examples"]
    first_stage_end = min(e["step"] for e in mixture)
    drawn = sorted(e["task"] for e in mixture if e["step"] == first_stage_end and e["value"] > 0)
    assert drawn == sorted(trainer.strategy.groups[0] if stage_data == "group" else trainer.tasks)


def test_multistage_same_stages_no_fusion_no_freezing(tmp_path: Path) -> None:
    cache = f"strategy.cache_dir={tmp_path / 'cache'}"
    (tmp_path / "c").mkdir(), (tmp_path / "m").mkdir()
    cpi = Trainer(make_cfg(*CPI_FAST, cache), tmp_path / "c")
    multi = Trainer(make_cfg(*CPI_FAST, cache, "strategy=multistage"), tmp_path / "m")
    assert multi.strategy.groups == cpi.strategy.groups
    assert [s.tasks for s in multi.stages] == [tuple(g) for g in multi.strategy.groups]  # stage_data: group
    assert [s.tasks for s in cpi.stages] == [tuple(cpi.tasks)] * 5  # stage_data: mixed, the paper's reading
    theta0 = Trainer(make_cfg("strategy=none"), tmp_path / "m").model.state_dict()
    assert all(torch.equal(v, theta0[n]) for n, v in multi.model.state_dict().items())  # not fused
    assert not all(torch.equal(v, theta0[n]) for n, v in cpi.model.state_dict().items())  # fused
    multi.fit()
    assert multi.optimizer.index == {}


def test_cut_into_stages_keeps_the_order_and_sizes_differ_by_at_most_one() -> None:
    assert cut_into_stages(["a", "b", "c", "d", "e"], 3) == [["a", "b"], ["c", "d"], ["e"]]
    assert cut_into_stages(["a", "b", "c"], 3) == [["a"], ["b"], ["c"]]
    assert cut_into_stages(["a", "b", "c"], 1) == [["a", "b", "c"]]


def test_multistage_k_cuts_the_seeded_order_into_k_stages_without_probing(tmp_path: Path) -> None:
    """The paper's "multi-stage, random order, K=3": five tasks in three stages, the order a seeded shuffle, no probe
    trained (none charged, nothing cached), and the whole budget left to the stages even under count_probes_in_budget."""
    cfg = make_cfg(*CPI_FAST, f"strategy.cache_dir={tmp_path / 'cache'}", "strategy=multistage", "strategy.k=3",
                   "strategy.count_probes_in_budget=true", "schedule.steps=30")
    trainer = Trainer(cfg, tmp_path)
    groups = trainer.strategy.groups
    shuffled = [[t] for t in trainer.tasks]
    random.Random(cfg.seed).shuffle(shuffled)
    assert groups == cut_into_stages([t for (t,) in shuffled], 3) and [len(g) for g in groups] == [2, 2, 1]
    assert [s.tasks for s in trainer.stages] == [tuple(g) for g in groups] and sum(s.steps for s in trainer.stages) == 30
    assert not (tmp_path / "cache").exists()


def test_k_is_refused_for_cpi_and_beyond_the_number_of_tasks(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"strategy.k=3: cutting the tasks into K stages is the multi-stage baseline's"):
        Trainer(make_cfg(*CPI_FAST, "strategy.k=3"), tmp_path)
    with pytest.raises(UserError, match=r"strategy.k=6: more stages than the 5 tasks"):
        Trainer(make_cfg(*CPI_FAST, "strategy=multistage", "strategy.k=6"), tmp_path)


COMPUTE_TASKS = ("math", "code", "logic", "instruct", "format")


def cpi_run(tmp_path: Path, name: str, *extra: str) -> Trainer:
    (tmp_path / name).mkdir()
    trainer = Trainer(make_cfg("strategy=cpi", "strategy.probe_steps=2", "schedule.steps=20", f"strategy.cache_dir={tmp_path / 'cache'}", *extra), tmp_path / name)
    trainer.fit()
    return trainer


def compute(run: Path) -> dict[str, float]:
    return {e["metric"]: e["value"] for e in read_metrics(run) if e["split"] == "compute"}


def test_compute_counts_the_probes_even_from_the_cache_and_can_charge_them_to_the_budget(tmp_path: Path) -> None:
    first = cpi_run(tmp_path, "first")
    stages = sum(stage.steps for stage in first.stages)
    assert compute(tmp_path / "first")["optimizer_steps"] == stages + 2 * len(COMPUTE_TASKS)
    cpi_run(tmp_path, "again")  # every probe from the cache: the same compute, charged all the same
    assert compute(tmp_path / "again") == compute(tmp_path / "first")
    assert [e["value"] for e in read_metrics(tmp_path / "again") if e["metric"] == "probe_cache_hit"] == [1.0] * len(COMPUTE_TASKS)
    equal = cpi_run(tmp_path, "equal", "strategy.count_probes_in_budget=true")
    assert compute(tmp_path / "equal")["optimizer_steps"] <= 20 and sum(s.steps for s in equal.stages) <= 20 - 2 * len(COMPUTE_TASKS)


def test_the_equal_compute_sequential_arm_spends_what_none_spends(tmp_path: Path) -> None:
    """A then B at stage_steps=6 with 2-step probes: cpi_sequential spends 2 x 6 + 2 x 2 optimizer steps, the
    equal-compute arm 2 x 6 (each stage gives up its own task's probe), as `none` does; an arm whose probes
    would take a whole stage stops in one line."""
    common = ["data.tasks=[math,code]", "+stage_steps=6", "schedule.stages=[{name: A, tasks: [math], steps: 6}, {name: B, tasks: [code], steps: 6}]",
              "schedule.steps=12"]
    probes = ["strategy.probe_steps=2", f"strategy.cache_dir={tmp_path / 'cache'}"]
    spent = {}
    for arm in ("none", "cpi_sequential", "cpi_sequential_equal_compute"):
        (tmp_path / arm).mkdir()
        trainer = Trainer(make_cfg(*common, f"+arm={arm}", *(probes if arm != "none" else [])), tmp_path / arm)
        trainer.fit()
        spent[arm] = compute(tmp_path / arm)["optimizer_steps"]
        if arm.startswith("cpi"):
            assert [s.tasks for s in trainer.stages] == [("math",), ("code",)]
    assert spent == {"none": 12, "cpi_sequential": 16, "cpi_sequential_equal_compute": 12}
    (tmp_path / "x").mkdir()
    with pytest.raises(UserError, match=r"stage_steps=6 leaves nothing after strategy.probe_steps=6"):  # before any probe runs
        Trainer(make_cfg(*common, "+arm=cpi_sequential_equal_compute", *probes, "strategy.probe_steps=6"), tmp_path / "x")
    with pytest.raises(UserError, match=r"the probes of group \['math', 'code'\].*take all of strategy.stage_steps=6"):  # one group of two
        Trainer(make_cfg(*common, "+arm=cpi_sequential_equal_compute", *probes, "strategy.probe_steps=3", "strategy.tau=0.0",
                         "strategy.order=random"), tmp_path / "x")

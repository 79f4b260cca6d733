"""Fully sharded data parallel (`parallel=fsdp`, FSDP2) on CPU with 2 gloo ranks: the same training as one process,
isolated coordinates held bit for bit on every shard, the masks of an unsharded ranking, exact resume from sharded
checkpoints, and a Hugging Face export that loads."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from epi.logging import read_metrics
from epi.masks import churn, jaccard, mask_stats, normalize, top_p
from epi.merge import fuse
from epi.sharding import Shards, local
from epi.strategies.base import Strategy
from epi.strategies.cpi import CPI
from epi import run as train_script
from epi.errors import UserError
from tests.helpers import CPI_FAST, EPI_FAST, ROOT, TINY, make_cfg, two_ranks_and_one_process

pytestmark = pytest.mark.slow


def torchrun(tmp_path: Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"), *overrides],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})},
    )


@pytest.mark.distributed
@pytest.mark.parametrize("settings", [[], ["data.packing=true", "optimizer=sgd"]], ids=["padded", "packed"])
def test_fsdp_none_equals_one_process_and_exports_a_loadable_model(tmp_path: Path, settings: list[str]) -> None:
    """(a) and (e): the global batch's losses and the final weights of 2 sharded ranks equal one process's. Packed, each
    rank packs its own share; SGD keeps the weights a linear image of the gradients there (AdamW divides a near-zero
    gradient's rounding by its near-zero second moment: one coordinate in 65,536 then misses the elementwise tolerance)."""
    from transformers import AutoModelForCausalLM

    two_ranks_and_one_process(tmp_path, [*TINY, "parallel=fsdp", "strategy=none", "schedule.steps=4", "threads=1", *settings])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ddp" / "model")
    assert type(model).__name__ == "LlamaForCausalLM" and sum(p.numel() for p in model.parameters()) > 0


# A sharded EPI run that checkpoints every 5 steps: under WatchedEPI for (a), (b), and the run that was never stopped for (d).
FSDP_EPI = [*TINY, *EPI_FAST, "parallel=fsdp", "threads=1", "schedule.checkpoint_every=5"]
WATCHED = "strategy._target_=tests.helpers.WatchedEPI"


@pytest.fixture(scope="module")
def watched_fsdp_epi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 2-rank FSDP_EPI run under WatchedEPI, finished: read by (a), (b) and, as the straight run, by (d)."""
    tmp = tmp_path_factory.mktemp("fsdp_epi")
    sharded = torchrun(tmp, *FSDP_EPI, WATCHED, f"hydra.run.dir={tmp / 'fsdp'}")
    assert sharded.returncode == 0, sharded.stderr[-4000:]
    return tmp / "fsdp"


@pytest.mark.distributed
@pytest.mark.xdist_group("fsdp_epi")
def test_fsdp_epi_holds_isolated_shards_bit_for_bit_and_selects_the_unsharded_masks(tmp_path: Path, watched_fsdp_epi: Path) -> None:
    """(a), (b): WatchedEPI asserts after every step that each isolated coordinate of this rank's shards holds its
    value exactly (AdamW decay 0.5, refreshes every 3 steps); the run's losses and mask statistics equal one process's."""
    train_script.train(make_cfg(*FSDP_EPI, WATCHED), tmp_path / "one")  # one process, in this one
    runs = {"fsdp": watched_fsdp_epi, "one": tmp_path / "one"}

    def logged(run: str, split: str, metric: str) -> list[float]:
        return [e["value"] for e in read_metrics(runs[run]) if e["split"] == split and e["metric"] == metric]

    assert logged("fsdp", "train", "loss") == pytest.approx(logged("one", "train", "loss"), rel=1e-5)
    refreshes = logged("one", "mask", "isolated_fraction")
    assert len(refreshes) == 5 and logged("fsdp", "mask", "isolated_fraction") == pytest.approx(refreshes, abs=1e-4)
    assert logged("fsdp", "mask", "jaccard_first") == pytest.approx(logged("one", "mask", "jaccard_first"), abs=1e-3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SHAPES = {"model.layers.0.a.weight": (7, 5), "model.layers.0.b.weight": (3, 4), "model.layers.1.c.weight": (9, 3),
          "model.layers.1.d.weight": (1, 6)}  # uneven rows, and one parameter with fewer rows than ranks


def _scores() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(shape, generator=g) for n, shape in SHAPES.items()}
    scores["model.layers.0.a.weight"][2:5] = 0.5  # ties across the rank boundary, at the threshold
    scores["model.layers.1.c.weight"][4] = 0.5
    return scores


def _theta(seed: int, rank: int | None = None, world: int = 1) -> dict[str, torch.Tensor]:
    """A base (seed 0) or task model (seed 1, 2) near it; this rank's rows of it when `rank` is given."""
    g = torch.Generator().manual_seed(100)
    base = {n: torch.randn(shape, generator=g) for n, shape in SHAPES.items()}
    g = torch.Generator().manual_seed(seed)
    full = {n: b + (0.1 * seed) * torch.randn(b.shape, generator=g) for n, b in base.items()}
    return full if rank is None else {n: t[_rows(world, rank, t.shape[0])].contiguous() for n, t in full.items()}


def _rows(world: int, rank: int, rows: int) -> slice:
    chunk = -(-rows // world)
    return slice(min(rank * chunk, rows), min((rank + 1) * chunk, rows))


def _ranked(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    full = _scores()
    mine = {n: s[_rows(world, rank, s.shape[0])].contiguous() for n, s in full.items()}
    shards = Shards(rank, world, {n: s.numel() for n, s in full.items()},
                    {n: _rows(world, rank, s.shape[0]).start * s.shape[1] for n, s in full.items()},
                    {n: s.numel() for n, s in mine.items()})
    results = {}
    for how in ("mean", "max"):
        normed = normalize(mine, how, shards)
        for scope in ("global", "layer", "tensor"):
            for p in (0.1, 0.3):
                results[(how, scope, p, "exact")] = top_p(normed, p, scope, "exact", shards=shards)
                g = torch.Generator().manual_seed(3)
                results[(how, scope, p, "sampled")] = top_p(normed, p, scope, "sampled", sample_size=17, generator=g, shards=shards)
    a, b = results[("mean", "global", 0.1, "exact")], results[("max", "layer", 0.3, "sampled")]
    counts = (jaccard(a, b, shards), churn(a, b, shards), mask_stats(a, shards=shards))
    fused = {space: fuse(_theta(0, rank, world), {t: _theta(t, rank, world) for t in (1, 2)}, {1: a, 2: b}, omega=0.7,
                         eps=1e-12, space=space, reduce=shards.sum) for space in ("task_vector", "weight")}
    gathered = [None] * world
    dist.all_gather_object(gathered, (results, fused))
    if rank == 0:
        out["masks"] = {key: {n: torch.cat([r[key][n] for r, _ in gathered]) for n in full} for key in results}
        out["counts"] = counts
        out["fused"] = {space: ({n: torch.cat([f[space][0][n] for _, f in gathered]) for n in full}, gathered[0][1][space][1])
                        for space in fused}
    dist.destroy_process_group()


@pytest.mark.distributed
def test_sharded_top_p_normalize_and_counts_equal_the_unsharded_ones() -> None:
    """(c): on the same importance, the sharded ranking (exact, with ties across the rank boundary, and sampled),
    the layer normalisation and the mask statistics equal one process's, for every scope."""
    out = mp.Manager().dict()
    mp.spawn(_ranked, args=(2, _free_port(), out), nprocs=2, join=True)
    full = _scores()
    for (how, scope, p, method), sharded in out["masks"].items():
        normed = normalize(full, how)
        g = torch.Generator().manual_seed(3)
        expected = top_p(normed, p, scope, method, sample_size=17, generator=g) if method == "sampled" else top_p(normed, p, scope, "exact")
        for name in full:
            assert torch.equal(sharded[name], expected[name]), (how, scope, p, method, name)
    a = top_p(normalize(full, "mean"), 0.1, "global", "exact")
    b = top_p(normalize(full, "max"), 0.3, "layer", "sampled", sample_size=17, generator=torch.Generator().manual_seed(3))
    assert out["counts"] == (jaccard(a, b), churn(a, b), mask_stats(a))
    for space, (sharded, paths) in out["fused"].items():  # SLERP's norms and dot products summed over the shards
        expected, expected_paths = fuse(_theta(0), {t: _theta(t) for t in (1, 2)}, {1: a, 2: b}, omega=0.7, eps=1e-12, space=space)
        assert paths == expected_paths and any(p["slerp"] for p in paths.values())
        for name in full:
            torch.testing.assert_close(sharded[name], expected[name], rtol=1e-6, atol=1e-7, msg=f"{space} {name}")


class ShardWatchedCPI(CPI):
    """Real CPI that asserts after every step that each frozen core holds, on this rank's shards, its value at freezing."""

    def on_stage_start(self, index, stage, step):
        super().on_stage_start(index, stage, step)
        self.frozen = getattr(self, "frozen", [])
        snapshot = {n: local(p).detach().clone() for n, p in self.ctx.named_params.items()}
        self.frozen += [(self.cores[task], snapshot) for task in (self.groups[index - 1] if index else [])]

    def after_step(self, step):
        super().after_step(step)
        for cores, snapshot in self.frozen:
            for name, core in cores.items():
                assert torch.equal(local(self.ctx.named_params[name]).detach()[core], snapshot[name][core]), f"{name} moved at {step}"
        self.ctx.log(step, "watch", {"frozen_cores": float(len(self.frozen))})


@pytest.mark.distributed
def test_fsdp_cpi_probes_cores_fusion_and_stages_equal_one_process(tmp_path: Path) -> None:
    """(a), (b) for CPI: probes train the run's sharded model and give it back, cores rank over both ranks' shards, the
    fusion sums SLERP's norms over them, and each stage's earlier cores hold bit for bit on every shard; the groups,
    the core overlaps and the losses equal one process's."""
    import json

    common = [*TINY, *CPI_FAST, "strategy._target_=tests.test_fsdp.ShardWatchedCPI", "parallel=fsdp", "threads=1", "schedule.steps=10"]
    sharded = torchrun(tmp_path, *common, f"strategy.cache_dir={tmp_path / 'cache_fsdp'}", f"hydra.run.dir={tmp_path / 'fsdp'}")
    assert sharded.returncode == 0, sharded.stderr[-4000:]
    train_script.train(make_cfg(*common, f"strategy.cache_dir={tmp_path / 'cache_one'}"), tmp_path / "one")  # one process, in this one
    assert len(list((tmp_path / "cache_fsdp").glob("*.rank1of2.pt"))) == 5  # each rank cached its shards of each probe

    def artifact(run: str, name: str) -> dict:
        return json.loads((tmp_path / run / "cpi" / f"{name}.json").read_text())

    assert artifact("fsdp", "groups") == artifact("one", "groups")
    overlap_fsdp, overlap_one = artifact("fsdp", "overlap")["jaccard"], artifact("one", "overlap")["jaccard"]
    for row_fsdp, row_one in zip(overlap_fsdp, overlap_one):
        assert row_fsdp == pytest.approx(row_one, abs=2e-3)

    def losses(run: str) -> list[float]:
        return [e["value"] for e in read_metrics(tmp_path / run) if e["split"] == "train" and e["metric"] == "loss"]

    assert len(losses("one")) == 10 and losses("fsdp") == pytest.approx(losses("one"), rel=1e-4)
    watched = [e["value"] for e in read_metrics(tmp_path / "fsdp") if e["split"] == "watch"]
    assert len(artifact("fsdp", "groups")["groups"]) == 5 and watched == [0.0] * 2 + [1.0] * 2 + [2.0] * 2 + [3.0] * 2 + [4.0] * 2


@pytest.fixture(scope="module")
def crashed_fsdp_epi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FSDP_EPI SIGKILLed in its second checkpoint (step 10: the shards written, checkpoint.pt not yet renamed;
    tests/killer): resumed by (d), tampered with (in a copy) by the shard-refusal test."""
    tmp = tmp_path_factory.mktemp("fsdp_crashed")
    killer = {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests' / 'killer'}", "EPI_KILL_AT_SAVE": "2"}
    crashed = torchrun(tmp, *FSDP_EPI, f"hydra.run.dir={tmp / 'crashed'}", env=killer)
    assert crashed.returncode != 0
    shards = sorted(p.name for p in (tmp / "crashed" / "checkpoint.shards").iterdir())
    assert shards == ["step_00000005", "step_00000010"]  # step 10's is complete, but checkpoint.pt still names step 5
    return tmp / "crashed"


@pytest.mark.distributed
@pytest.mark.xdist_group("fsdp_epi")
def test_fsdp_kill_and_resume_gives_bit_identical_weights(tmp_path: Path, watched_fsdp_epi: Path, crashed_fsdp_epi: Path) -> None:
    """(d): the crashed sharded EPI run resumes from the step-5 checkpoint (masks, strategy state, AdamW shards and
    each rank's RNG from checkpoint.shards/) and ends with exactly the weights of the run that was never stopped (the
    watched run: WatchedEPI only reads)."""
    from safetensors.torch import load_file

    resumed = torchrun(tmp_path, *FSDP_EPI, f"resume={crashed_fsdp_epi}", f"hydra.run.dir={tmp_path / 'resumed'}")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    a, b = (load_file(run / "model" / "model.safetensors") for run in (watched_fsdp_epi, tmp_path / "resumed"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not (tmp_path / "resumed" / "checkpoint.shards").exists()  # a finished run removes its checkpoint


class WholeTensors(Strategy):
    """A plug-in that has not declared `shardable`: it might read whole parameters."""


@pytest.mark.parametrize(("overrides", "says"), [
    (["strategy=none", "strategy._target_=tests.test_fsdp.WholeTensors"], "use parallel=ddp"),
    (["parallel.cpu_offload=true"], "use parallel.cpu_offload=false"),
])
def test_fsdp_refuses_what_it_cannot_run_in_one_line(tmp_path: Path, overrides: list[str], says: str) -> None:
    """A plug-in strategy that has not declared it runs on shards; CPU offload on a CPU-only run. Refused before the run
    writes anything (train.py prints a UserError as one line and exits 2: tests/test_errors.py)."""
    with pytest.raises(UserError, match=re.escape(says)):
        train_script.train(make_cfg("parallel=fsdp", *overrides), tmp_path / "run")
    assert not list(tmp_path.rglob("metrics.jsonl")) and not list(tmp_path.rglob("checkpoint.pt"))


def _checkpoint_files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in [run / "checkpoint.pt", *(run / "checkpoint.shards").rglob("*")]
            if p.is_file()}


@pytest.mark.distributed
@pytest.mark.xdist_group("fsdp_epi")
def test_fsdp_resume_refuses_shards_that_would_run_code(tmp_path: Path, crashed_fsdp_epi: Path) -> None:
    """DCP's reader unpickles .metadata with plain pickle.load and the non-tensor items of the .distcp files with
    torch.load(weights_only=False): a crafted file ran `os.system` on resume. Now each rank refuses it in the one line
    a crafted checkpoint.pt gets, the payload never runs, and the checkpoint is left as it was. The restricted reader
    itself, on crafted .metadata and .distcp items and on a genuine checkpoint, is tests/test_safe_loading.py's; a
    resume through it from untampered shards is the kill-and-resume test's above; this is the wiring, end to end."""
    from tests.test_safe_loading import REFUSED, craft_metadata

    run = tmp_path / "run"
    shutil.copytree(crashed_fsdp_epi, run)  # an attacker's copy of a run directory: the crashed run's, step 5 named
    marker = tmp_path / "ran"
    file = craft_metadata(run / "checkpoint.shards" / "step_00000005", marker)
    before = _checkpoint_files(run)
    proc = torchrun(tmp_path, *FSDP_EPI, f"resume={run}", f"hydra.run.dir={run}")
    assert not marker.exists()
    assert proc.returncode != 0 and re.search(r"exitcode\s*:\s*2\b", proc.stderr), proc.stderr[-4000:]  # torchrun: 1; the rank: 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {run / 'checkpoint.pt'}: shard file {file} {REFUSED} Use files written by this tool."]  # rank 0 says it
    assert _checkpoint_files(run) == before

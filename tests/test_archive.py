"""eval.py runs=<sweep> archive=<dir>: the runs' evidence without their weights, tabulating to the same report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from epi import archive
from tests.helpers import eval_report, run_script
from tests.test_report import fake_job
from tests.test_report_intervals import arm, retention, scores


def heavy_sweep(root: Path) -> Path:
    """A sweep of two settings x two seeds with predictions and retention, each run also holding what an
    archive leaves out (weights, a checkpoint, W&B files, a CPI probe cache), plus a failed job."""
    for seed, right in ((0, 10), (1, 12)):
        for group, gain in (("+arm=none", 0), ("+arm=epi", 8)):
            run = arm(root, group, seed, {"a": scores(right + gain), "b": scores(right)})
            retention(run, 31.0, 35.0 + seed + gain / 8)
            (run / "cpi").mkdir()
            (run / "cpi" / "groups.json").write_text(json.dumps({"groups": [["a", "b"]]}))
            (run / "cpi" / "probe_a.pt").write_bytes(b"\0" * 1000)
            (run / "model").mkdir()
            (run / "model" / "model.safetensors").write_bytes(b"\0" * 4000)
            (run / "model" / "config.json").write_text("{}")
            (run / "checkpoint.pt").write_bytes(b"\0" * 4000)
            (run / "wandb" / "offline-run").mkdir(parents=True)
            (run / "wandb" / "offline-run" / "debug.log").write_text("wandb's own log\n")
            (run / ".hydra").mkdir()
            (run / ".hydra" / "overrides.yaml").write_text(f"- {group}\n- seed={seed}\n")
    fake_job(root, "failed", ["+arm=cpi", "seed=0"], files={"error.txt": "error: strategy.p=2.0 must be in (0, 1]\n"})
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


@pytest.mark.slow
def test_archive_keeps_the_evidence_and_tabulates_to_the_same_report(tmp_path: Path) -> None:
    sweep = heavy_sweep(tmp_path / "sweep")
    dest = tmp_path / "archived"
    out, md = eval_report(sweep, tmp_path, f"archive={dest}")
    copied = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert "multirun.yaml" in copied and "failed/error.txt" in copied and "failed/.hydra/hydra.yaml" in copied
    run = "+arm=epi-1".replace("+", "")
    assert {f"{run}/{f}" for f in ("config.yaml", "metrics.jsonl", "eval_test.json", "predictions_test.jsonl",
                                   "retention.json", "cpi/groups.json", ".hydra/overrides.yaml")} <= set(copied)
    assert not [f for f in copied if f.endswith(".pt") or "/model/" in f or "/wandb/" in f], copied
    assert not (tmp_path / "archived.partial").exists()

    again = tmp_path / "again"
    again.mkdir()
    _, md_archived = eval_report(dest, again)
    assert md_archived == md.replace(str(sweep), str(dest))  # only the listed failed run's path differs
    original = json.loads((out / "report.json").read_text().replace(str(sweep), str(dest)))
    assert json.loads((again / "out" / "report.json").read_text()) == original  # every number, every run
    assert "+0.200" in md and "arm=cpi" in md  # the table compared something, and listed the failed job


@pytest.mark.slow
def test_archive_into_a_used_directory_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    sweep = heavy_sweep(tmp_path / "sweep")
    dest = tmp_path / "archived"
    dest.mkdir()
    (dest / "keep.txt").write_text("an earlier archive")
    out = tmp_path / "out"
    proc = run_script("eval.py", f"runs={sweep}", f"archive={dest}", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(f"error: archive='{dest}' already exists")
    assert [p.name for p in dest.iterdir()] == ["keep.txt"] and not (out / "report.md").exists()
    proc = run_script("eval.py", f"archive={dest}", f"model_dir={tmp_path}", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 2 and "give runs= too" in proc.stderr


def test_a_single_run_keeps_its_directory_name(tmp_path: Path) -> None:
    run = arm(tmp_path / "sweep", "+arm=none", 0, {"a": scores(3)})
    files, size = archive.archive_runs([run], tmp_path / "one")
    assert (tmp_path / "one" / run.name / "predictions_test.jsonl").is_file() and files == 4 and size > 0


@pytest.mark.slow
def test_eval_py_packs_a_sweep_and_tabulates_the_packed_archive(tmp_path: Path) -> None:
    """archive=<file>.tar.xz packs the evidence into one file, and runs=<that file> reads it as the directory."""
    sweep = heavy_sweep(tmp_path / "sweep")
    packed = tmp_path / "sweep.tar.xz"
    _, md = eval_report(sweep, tmp_path, f"archive={packed}")
    assert packed.is_file() and not (tmp_path / "sweep.tar.xz.partial").exists()
    again = tmp_path / "again"
    again.mkdir()
    _, md_packed = eval_report(packed, again)
    assert md_packed == md.replace(str(sweep), str(packed))  # the failed run is named inside the archive

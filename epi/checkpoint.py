"""Atomic save and exact resume of everything that affects a run.

A checkpoint is one `torch.save` file written to a temporary name and renamed into place,
so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from epi.errors import UserError

FILENAME = "checkpoint.pt"
# What Trainer.save_checkpoint writes and a resume reads.
REQUIRED = frozenset({"step", "model", "optimizer", "scheduler", "sampler", "realised", "strategy", "rng", "config"})


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save(path: Path, state: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def find(resume: str) -> Path:
    """`resume` may name a run directory or the checkpoint file itself."""
    path = Path(resume)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise UserError(
            f"resume={resume!r}: no checkpoint at {path}. Pass a run directory that holds {FILENAME} "
            "(runs write one every schedule.checkpoint_every steps and at the end)."
        )
    return path


def load(resume: str) -> dict[str, Any]:
    path = find(resume)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise UserError(
            f"resume={resume!r}: checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {e}). "
            "It was left untouched; resume from an earlier run directory or start afresh."
        ) from e
    missing = sorted(REQUIRED - set(state)) if isinstance(state, dict) else sorted(REQUIRED)
    if missing:
        raise UserError(
            f"resume={resume!r}: checkpoint {path} lacks {missing}: it was not written by this version of the "
            "tool (or not by this tool at all). It was left untouched; start afresh, or resume with the version "
            "that wrote it."
        )
    return state

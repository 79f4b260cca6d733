"""Atomic save and exact, safe resume of everything that affects a run.

A checkpoint is one `torch.save` file written to a temporary name and renamed into place, so a
crash mid-write leaves the previous checkpoint intact; a full disk removes the temporary file and
says how much space the checkpoint needs. Everything in it is a tensor or a plain Python value, so
it loads with `torch.load(weights_only=True)`: a checkpoint is data, and one whose pickle would run
code is refused without running it.

Under `parallel=fsdp` no rank holds the whole model, so the tensors are saved sharded: every rank
writes its shards of the model and optimizer with `torch.distributed.checkpoint` (DCP) and its own
state (isolation masks of its shards, strategy state, RNG) into `checkpoint.shards/step_<N>/`, and
rank 0 then writes `checkpoint.pt` as before, with everything else and the name of that directory.
The directory is complete before `checkpoint.pt` names it, and older ones are removed only after,
so a crash at any point leaves a checkpoint that resumes exactly (at the same number of ranks).
Its files are read by `epi.safe_pickle`, not by DCP's own reader, which would run code a crafted file asks for.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from epi import rundir
from epi.errors import UnsafeFile, UserError

FILENAME, SHARDS = rundir.CHECKPOINT, rundir.SHARDS  # checkpoint.pt, and beside it (parallel=fsdp) one directory per saved step
# What Trainer.save_checkpoint writes and a resume reads.
REQUIRED = frozenset(
    {"step", "model", "optimizer", "scheduler", "sampler", "realised", "skipped", "compute", "strategy", "rng", "config", "metrics_lines"}
)
IN_SHARDS = frozenset({"model", "optimizer", "strategy", "rng"})  # of a sharded checkpoint: in its shards directory


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states as tensors and plain values (no NumPy arrays)."""
    numpy = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(numpy["state"]["key"].astype(np.int64)),
            "pos": int(numpy["state"]["pos"]),
            "has_gauss": int(numpy["has_gauss"]),
            "gauss": float(numpy["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state({
        "bit_generator": "MT19937",
        "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]},
        "has_gauss": numpy["has_gauss"],
        "gauss": numpy["gauss"],
    })
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def nbytes(obj: Any) -> int:
    """Bytes of the tensors in a nested state: about the size of its checkpoint file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC anywhere in the chain: torch's C++ writer reports it inside a RuntimeError's text."""
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_error(path: Path, needed: int, what: str, run_dir: Path) -> UserError:
    """One line for a full disk: what needed how much, and how to go on from what `run_dir` holds now."""
    free = shutil.disk_usage(path.parent).free
    if (Path(run_dir) / FILENAME).is_file():
        then = (f"Free space and continue from its checkpoint {Path(run_dir) / FILENAME} (resume={run_dir} "
                f"hydra.run.dir={run_dir}, or resume=auto)")
    else:
        then = (f"No checkpoint of this run was written before: free space and start it again (resume=auto "
                f"hydra.run.dir={run_dir} starts it afresh there)")
    return UserError(
        f"no space left on device writing {what} {path} (needs about {_size(needed)}, {_size(free)} free there); "
        f"the partial file was removed and earlier files are intact. {then}, or write runs elsewhere (hydra.run.dir=...)."
    )


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def write_atomically(path: Path, write: Callable[[Path], None], needed: int, what: str) -> None:
    """`write(tmp)` then rename over `path`; on failure the temporary is removed and `path` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
    except BaseException as e:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if isinstance(e, Exception) and is_disk_full(e):
            raise disk_full_error(path, needed, what, path.parent) from e
        raise
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    os.replace(tmp, path)


def save(path: Path, state: dict[str, Any]) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    write_atomically(Path(path), write, nbytes(state), "checkpoint")


def find(resume: str) -> Path:
    """`resume` may name a run directory or the checkpoint file itself."""
    path = Path(resume)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file() and path.parent.is_dir() and (path.parent / rundir.CONFIG).is_file():
        raise UserError(
            f"resume={resume!r}: no checkpoint at {path}: the run in {path.parent} stopped before its first checkpoint "
            f"was in place, so there is nothing to continue. Start it afresh in that directory with resume=auto "
            f"hydra.run.dir={path.parent} (and the same overrides), or in a new directory."
        )
    if not path.is_file():
        raise UserError(
            f"resume={resume!r}: no checkpoint at {path}. Pass a run directory that holds {FILENAME} "
            "(runs write one every schedule.checkpoint_every steps and at the end, removed once the run finishes unless "
            "keep_checkpoint=true)."
        )
    return path


def load_tensors(path: Path, what: str, source: IO[bytes] | None = None) -> Any:
    """`torch.load(weights_only=True)`: tensors and plain values only, nothing in the file is executed.

    Reads `source` instead of opening `path` when given (an item inside a DCP `.distcp` file); `path` names it."""
    try:
        return torch.load(path if source is None else source, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read means the file is unusable
        raise unreadable(e, path, what) from e


def unreadable(error: BaseException, path: Path, what: str, kind: str = "a tensor file") -> UserError:
    """The one line for a file that failed to load: refused, if its pickle names code to construct or run (the
    GLOBAL in the unpickler's message), else corrupt (not `kind`, if it is no pickle). Shared by every loader of run
    files (epi.safe_pickle too)."""
    if isinstance(error, pickle.UnpicklingError):
        code = re.search(r"GLOBAL ([\w.]+)", str(error))
        if code:
            return UnsafeFile(
                f"{what} {path} asks to construct or run Python objects ({code.group(1)}), not only tensors and "
                "plain values; it was refused and nothing in it was run. Use files written by this tool."
            )
        return UserError(f"{what} {path} is corrupt or unreadable (not {kind}); it was left untouched.")
    return UserError(f"{what} {path} is corrupt or unreadable ({type(error).__name__}: {_first_line(error)}); it was left untouched.")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def load(resume: str) -> dict[str, Any]:
    path = find(resume)
    state = load_tensors(path, f"resume={resume!r}: checkpoint")
    required = REQUIRED - IN_SHARDS if isinstance(state, dict) and "shards" in state else REQUIRED
    missing = sorted(required - set(state)) if isinstance(state, dict) else sorted(REQUIRED)
    if missing:
        raise UserError(
            f"resume={resume!r}: checkpoint {path} lacks {missing}: it was not written by this version of the "
            "tool (or not by this tool at all). It was left untouched; start afresh, or resume with the version "
            "that wrote it."
        )
    return {**state, "source": str(path)}  # where it was read: a sharded checkpoint's shards lie beside it


def save_shards(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                own: dict[str, Any]) -> str:
    """Every rank, together: the sharded model and optimizer (DCP) and this rank's `own` state, into
    `run_dir/checkpoint.shards/step_<step>/`, written under a temporary name and renamed once every rank is
    done. Returns the directory's name, for `checkpoint.pt` to point at."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    name = f"step_{step:08d}"
    final = Path(run_dir) / SHARDS / name
    tmp = final.with_name(name + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a crash mid-write left it
        tmp.mkdir(parents=True)
    dist.barrier()
    tensors = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    try:
        dcp.save(tensors, checkpoint_id=str(tmp))
        with (tmp / f"rank{rank}.pt").open("wb") as f:
            torch.save(own, f)
            f.flush()
            os.fsync(f.fileno())
    except Exception as e:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise disk_full_error(final, nbytes(tensors) * dist.get_world_size(), "sharded checkpoint", run_dir) from e
        raise
    dist.barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    dist.barrier()
    return name


def prune_shards(run_dir: Path, keep: str) -> None:
    """Rank 0, after `checkpoint.pt` names `keep`: the shards directories of older checkpoints go."""
    for old in (Path(run_dir) / SHARDS).glob("step_*"):
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def load_shards(checkpoint_path: Path, state: dict[str, Any], model: torch.nn.Module,
                optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Every rank: the sharded model and optimizer of the checkpoint `state` (read from `checkpoint_path`)
    loaded in place, and this rank's own state returned. The same number of ranks as the saving run."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from epi import safe_pickle

    shards = state["shards"]
    world = dist.get_world_size() if dist.is_initialized() else 1
    if shards["world"] != world:
        raise UserError(
            f"{checkpoint_path}: a parallel=fsdp checkpoint of {shards['world']} ranks; this run has {world}. Resume with "
            f"--nproc_per_node={shards['world']} (the shards are per rank)."
        )
    directory = Path(checkpoint_path).parent / SHARDS / shards["dir"]
    own_file = directory / f"rank{dist.get_rank()}.pt"
    if not own_file.is_file() or not (directory / safe_pickle.METADATA).is_file():
        raise UserError(f"{checkpoint_path}: its shards directory {directory} is missing or incomplete; it was left untouched.")
    tensors = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    safe_pickle.load(tensors, directory, f"{checkpoint_path}: shard file")  # DCP's own reader would run code in the files
    set_model_state_dict(model, tensors["model"])
    set_optimizer_state_dict(model, optimizer, tensors["optimizer"])
    return load_tensors(own_file, f"{checkpoint_path}: rank state")


def remove(run_dir: Path) -> None:
    """A finished run's checkpoint, sharded or not (keep_checkpoint=false)."""
    (Path(run_dir) / FILENAME).unlink(missing_ok=True)
    shutil.rmtree(Path(run_dir) / SHARDS, ignore_errors=True)

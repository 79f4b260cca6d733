"""A sweep's evidence, small enough to commit: `python eval.py runs=<sweep> archive=<dir or file.tar.xz>`.

A long experiment runs in chunks (a seed per session, say), and a chunk's run directories do not outlive
the machine they ran on: the model weights, checkpoints and W&B files are hundreds of MB per run. The
tables need none of them. They are computed from a run's small text files (its config, metrics, results and
predictions per split for the paired bootstrap, retention, CPI's artifacts, its Hydra record, error lines), so an
archive holds exactly those, in the sweep's own layout, and
`python eval.py 'runs=[<archive of chunk 1>,<archive of chunk 2>,...]'` tabulates every chunk together,
with the same numbers a table over the original directories gives (tests/test_archive.py).

An archive is a directory, or one compressed tar file (`.tar.xz`, `.tar.gz`: PACKED) whose members are that
directory's files: written byte for byte the same from the same files (sorted members, no times, owners or
modes), and read by `opened` into a temporary directory that holds only regular files and directories from it:
a member with an absolute name, a `..`, a link, a device or anything else is refused before anything is written.
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from epi import rundir
from epi.errors import UserError

EVIDENCE_SUFFIXES = (".yaml", ".json", ".jsonl", ".md", ".txt", ".log", ".csv")  # what the report and plots read, and the logs
SKIPPED_DIRS = (rundir.MODEL, "wandb", rundir.SHARDS)  # weights, tokenizer files, W&B's own copy, sharded checkpoints
SWEEP_RECORD = "multirun.yaml"  # Hydra's record of a sweep's command and overrides, beside its job directories
PACKED = (".tar.xz", ".tar.gz")
MAX_UNPACKED = 2**31  # bytes a packed archive may unpack to: a table's evidence is MBs; more is no archive of ours


def is_packed(path: Path) -> bool:
    return str(path).endswith(PACKED)


def check_destination(dest: Path) -> None:
    """Refuses a destination that already holds files (an earlier archive is never overwritten)."""
    if is_packed(dest) and dest.exists():
        raise UserError(f"archive={str(dest)!r} already exists; give a new file name (nothing was written)")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserError(f"archive={str(dest)!r} already exists and is not an empty directory; give a new one (nothing was written)")


def evidence_files(run_dir: Path) -> list[Path]:
    """A run directory's files the tables and plots are computed from, relative to it, in name order."""
    found = []
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir)
        if path.is_file() and path.suffix in EVIDENCE_SUFFIXES and not any(part in SKIPPED_DIRS for part in rel.parts[:-1]):
            found.append(rel)
    return found


def evidence(run_dirs: Sequence[Path]) -> list[tuple[Path, Path]]:
    """(file, its path in the archive) of each run's evidence, keeping the runs' paths relative to their common
    parent (a sweep's job numbers stay its job numbers), the sweep's own record first when it has one."""
    root = Path(os.path.commonpath([p.resolve() for p in run_dirs]))
    if len(run_dirs) == 1:
        root = root.parent  # a single run keeps its own directory name
    files = [(root / SWEEP_RECORD, Path(SWEEP_RECORD))] if (root / SWEEP_RECORD).is_file() else []
    for run_dir in run_dirs:
        files += [(run_dir / rel, run_dir.resolve().relative_to(root) / rel) for rel in evidence_files(run_dir)]
    return files


def archive_runs(run_dirs: Sequence[Path], dest: Path) -> tuple[int, int]:
    """Copies each run's evidence to `dest` (a directory, or a PACKED file); returns (files, bytes before any
    compression). Written to `<dest>.partial` and renamed at the end, so an interrupted archive leaves nothing
    that looks complete."""
    check_destination(dest)
    if not run_dirs:
        raise UserError(f"archive={str(dest)!r}: no run directories to archive")
    files = evidence(run_dirs)
    partial = dest.with_name(dest.name + ".partial")
    if partial.is_dir():
        shutil.rmtree(partial)
    if is_packed(dest):
        size = pack(files, partial)
    else:
        size = 0
        for source, rel in files:
            target = partial / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
            size += target.stat().st_size
        if dest.exists():
            dest.rmdir()  # empty: check_destination said so
    partial.rename(dest)
    return len(files), size


def pack(files: Sequence[tuple[Path, Path]], out: Path) -> int:
    """`files` ((source, name in the archive)) as one compressed tar at `out`, its kind by the final name's
    suffix (xz or gzip at their highest levels): members sorted by name, each a regular file with no time, owner
    or mode of its own, so the same files pack to the same bytes. Returns the bytes packed (before compression)."""
    name = out.name.removesuffix(".partial")
    raw = open(out, "wb")
    if name.endswith(".tar.xz"):
        stream = lzma.open(raw, "wb", preset=9 | lzma.PRESET_EXTREME)
    else:
        stream = gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=raw, mtime=0)
    size = 0
    with raw, stream, tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for source, rel in sorted(files, key=lambda f: f[1].as_posix()):
            data = source.read_bytes()
            info = tarfile.TarInfo(rel.as_posix())
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
            size += len(data)
    return size


def unpack(archive: Path, into: Path) -> int:
    """The members of a PACKED `archive`, written under `into` (which must exist); returns the files written.

    Only regular files and directories with plain relative names are accepted; anything else (an absolute name,
    a `..`, a link, a device, a FIFO) stops the whole archive with a UserError. Files are written, not extracted:
    no mode, owner or time comes from the archive."""
    written = size = 0
    try:
        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                rel = _member_path(archive, member)
                target = into.joinpath(*rel.parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                size += member.size
                if size > MAX_UNPACKED:
                    raise UserError(f"runs={str(archive)!r}: unpacks to more than {MAX_UNPACKED} bytes; no sweep's evidence is that large")
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                with open(target, "wb") as f:
                    shutil.copyfileobj(source, f)
                written += 1
    except (tarfile.TarError, lzma.LZMAError, EOFError, gzip.BadGzipFile, OSError) as e:
        raise UserError(f"runs={str(archive)!r}: not a readable archive ({type(e).__name__}: {e})") from None
    return written


def _member_path(archive: Path, member: tarfile.TarInfo) -> PurePosixPath:
    """The member's name as a safe relative path, or a UserError naming it."""
    rel = PurePosixPath(member.name)
    kind = "a regular file" if member.isreg() else "a directory" if member.isdir() else "a link" if member.issym() or member.islnk() else "a device or special file"
    if kind not in ("a regular file", "a directory"):
        why = f"is {kind}"
    elif rel.is_absolute() or member.name.startswith("/"):
        why = "has an absolute name"
    elif ".." in rel.parts:
        why = "has a '..' in its name"
    elif not rel.parts or rel.parts == (".",) or "\\" in member.name or "\0" in member.name:
        why = "has no plain name"
    else:
        return rel
    raise UserError(f"runs={str(archive)!r}: member {member.name!r} {why}; an archive holds only the runs' files (nothing was read)")


@dataclass
class Sources:
    """The runs' paths as given (`given`), where they are read (`paths`: an archive's temporary copy), and `shown`:
    a read path as the report writes it (inside an archive: `<archive>/<member path>`)."""

    given: list[Path]
    paths: list[Path]
    roots: dict[Path, Path]  # temporary directory -> the archive unpacked there

    def shown(self, path: Path) -> Path:
        path = Path(path)
        for root, archive in self.roots.items():
            if path == root or root in path.parents:
                return archive / path.relative_to(root)
        return path


@contextmanager
def opened(paths: Sequence[Path]) -> Iterator[Sources]:
    """The runs at `paths` (directories or PACKED archives) readable as directories for the `with` block: each
    archive unpacked into a temporary directory removed afterwards."""
    given = [Path(p) for p in paths]
    packed = [p for p in given if is_packed(p)]
    if not packed:
        yield Sources(given, given, {})
        return
    with tempfile.TemporaryDirectory(prefix="epi-runs-") as tmp:
        roots: dict[Path, Path] = {}
        for archive in packed:
            if not archive.is_file():
                raise UserError(f"runs={str(archive)!r}: no such archive file")
            # the archive's own absolute path below the temporary directory: runs from several archives sort as
            # their archives' names do (as the directories they were packed from did)
            root = Path(tmp).joinpath(*archive.resolve().parts[1:])
            root.mkdir(parents=True, exist_ok=True)
            unpack(archive, root)
            roots[root] = archive
        by_archive = {archive: root for root, archive in roots.items()}
        yield Sources(given, [by_archive.get(p, p) for p in given], roots)

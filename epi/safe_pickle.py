"""Reading a sharded (`parallel=fsdp`) checkpoint without running anything in it.

`torch.distributed.checkpoint` (DCP) trusts its files: `FileSystemReader.read_metadata` unpickles
`.metadata` with plain `pickle.load`, and `DefaultLoadPlanner.load_bytes` reads every non-tensor item of
the `.distcp` files (optimizer hyperparameters, AdamW's step counts) with `torch.load(weights_only=False)`.
Either would run whatever a crafted file asks for (`os.system`, ...) as soon as a run resumes. Here
`.metadata` is unpickled by an unpickler that can build only the records DCP writes there (its dataclasses,
`torch.Size`, dtypes, a path) and imports nothing else, and the items are read with
`torch.load(weights_only=True)`, as the tensor items already are. A refused or unreadable file is one
`UserError` line that names it, the same one a crafted `checkpoint.pt` gets.

Imported only by a sharded resume: DCP takes about a second to import.
"""

from __future__ import annotations

import io
import pathlib
import pickle
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.planner import ReadItem

from epi.checkpoint import load_tensors, unreadable
from epi.errors import UserError

METADATA = ".metadata"  # DCP's index of a checkpoint directory: which bytes of which .distcp file hold each item


def _metadata_globals() -> dict[tuple[str, str], Any]:
    """Everything DCP's `.metadata` pickle may name (listed from torch's source and from the GLOBALs of real
    checkpoints), by (module, name) as pickle writes it. None of these does more than build a record."""
    records = [
        dcp_metadata.Metadata, dcp_metadata.MetadataIndex, dcp_metadata.StorageMeta, dcp_metadata.TensorStorageMetadata,
        dcp_metadata.BytesStorageMetadata, dcp_metadata.ChunkStorageMetadata, dcp_metadata.TensorProperties,
        dcp_metadata._MEM_FORMAT_ENCODING, _StorageInfo, torch.Size, pathlib.PosixPath,
    ]
    allowed: dict[tuple[str, str], Any] = {(c.__module__, c.__qualname__): c for c in records}
    allowed[("pathlib", "PosixPath")] = pathlib.PosixPath  # StorageMeta.checkpoint_id; pathlib._local on Python 3.13
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # torch.strided: a table lookup
    allowed.update({("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)})
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the names of `_metadata_globals`, and before importing anything: an import alone can run code."""

    allowed = _metadata_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            # The text torch's weights_only unpickler gives, which `checkpoint.unreadable` turns into the refusal.
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name} is not a DCP metadata record") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("DCP metadata holds no persistent ids")


def read_metadata(stream: IO[bytes], path: Path, what: str) -> dcp_metadata.Metadata:
    """DCP's `.metadata` at `path`, from `stream`; a refusal or a file that is not DCP metadata is a UserError."""
    try:
        metadata = _MetadataUnpickler(stream).load()
    except Exception as e:  # noqa: BLE001 - whatever a damaged pickle raises, the file is unusable
        raise unreadable(e, path, what, kind="DCP metadata") from e
    if not isinstance(metadata, dcp_metadata.Metadata) or not isinstance(metadata.storage_data, dict):
        raise UserError(f"{what} {path} is corrupt or unreadable (not DCP metadata); it was left untouched.")
    return metadata


class SafeReader(FileSystemReader):
    """DCP's file system reader, with `.metadata` read by `read_metadata` instead of `pickle.load`."""

    def __init__(self, path: Path, what: str) -> None:
        super().__init__(path)
        self.what = what

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        """As `FileSystemReader.read_metadata` (the global `.metadata`, or a rank's `__<rank>.metadata`)."""
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = read_metadata(stream, Path(path), self.what)
        if metadata.storage_meta is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DCP's default load planner, with the non-tensor items read as tensors and plain values only."""

    def __init__(self, directory: Path, what: str) -> None:
        super().__init__()
        self.directory = directory
        self.what = what

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        """As `DefaultLoadPlanner.load_bytes`, but `torch.load(weights_only=True)`, naming the .distcp file it refuses."""
        stored = self.metadata.storage_data[read_item.storage_index]
        loaded = load_tensors(self.directory / stored.relative_path, self.what, source=value)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def load(tensors: dict[str, Any], directory: Path, what: str) -> None:
    """`dcp.load(tensors)` from `directory`, in place, running nothing in its files. Every rank calls it.

    `.metadata` is read once before DCP reads it: inside `dcp.load` a failure to read it is only logged and
    retried as per-rank metadata, which would hide the refusal behind DCP's own error. A failure on any rank
    reaches every rank inside a `CheckpointException`; each re-raises it as that one line."""
    reader = SafeReader(directory, what)
    reader.read_metadata()
    try:
        dcp.load(tensors, storage_reader=reader, planner=SafePlanner(directory, what))
    except CheckpointException as e:
        failures = [failure for failure, _ in e.failures.values()]
        refused = next((f for f in failures if isinstance(f, UserError)), None)
        if refused is not None:
            raise refused from e
        if not isinstance(failures[0], Exception):
            raise  # an interrupt on some rank, not a bad file
        # A tensor item (DCP reads those with weights_only=True itself, and does not say from which file) that was
        # refused, or a damaged file.
        raise unreadable(failures[0], directory, f"{what} in") from e

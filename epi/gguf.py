"""A GGUF model's dequantised copy, kept on disk as a plain Hugging Face directory so that it is converted once.

Reading a GGUF file through transformers dequantises every tensor and builds the tokenizer from the file's metadata:
about 15 s for SmolLM2-135M on 2 CPU cores, paid by every run, every `eval.py` and every probe-cached sweep job. The
first load writes what it produced (`save_pretrained`: config.json, model.safetensors, the tokenizer's JSON files)
into `$EPI_CACHE_DIR/gguf/<file stem>-<key>/` (default `~/.cache/epi`); later loads read that directory in about a
second. The key is the SHA-256 of the GGUF file and the transformers version that converted it, so another file, or
another conversion, never reads a stale copy.

What is read back is data only: safetensors (`use_safetensors=True`, no pickle), JSON, and a directory whose
config.json names no Python code (`auto_map`: checked as for any model directory, `trust_remote_code=False`). A
copy that does not load (a partial write, a file someone edited) is converted again and replaced; a cache directory
that cannot be written leaves the run to load from the GGUF file each time. `EPI_CACHE_DIR=""` turns the cache off.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

ENV = "EPI_CACHE_DIR"
DONE = "epi_gguf_copy.txt"  # written last: a directory without it is not a finished copy


def cache_dir(gguf_path: Path) -> Path | None:
    """Where the copy of this GGUF file lives (whether or not it exists yet); None when the cache is off."""
    root = os.environ.get(ENV, str(Path.home() / ".cache" / "epi"))
    if not root:
        return None
    digest = hashlib.sha256()
    with open(gguf_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    key = hashlib.sha256(f"{digest.hexdigest()} transformers {transformers.__version__}".encode()).hexdigest()[:16]
    return Path(root).expanduser() / "gguf" / f"{gguf_path.stem}-{key}"


def load_copy(directory: Path | None, attn_implementation: str, refuse_code: Callable[[str], None],
              tokenizer_only: bool = False) -> tuple[PreTrainedModel | None, PreTrainedTokenizerBase] | None:
    """The cached copy as (model, tokenizer), or (None, tokenizer) with `tokenizer_only`; None when there is no
    finished copy or it does not load (then it is converted again)."""
    if directory is None or not (directory / DONE).is_file():
        return None
    try:
        refuse_code(str(directory))
        tok = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
        if tokenizer_only:
            return None, tok
        model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation=attn_implementation,
                                                     use_safetensors=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - any damage to the copy: convert the GGUF file again
        print(f"epi: ignored the cached GGUF copy {directory} ({type(e).__name__}: {e}); converting the file again",
              file=sys.stderr)
        return None
    return model, tok


def save_copy(directory: Path | None, model: PreTrainedModel, tok: PreTrainedTokenizerBase, source: Path) -> None:
    """Write the copy beside its final place, then rename it there: a reader sees a finished copy or none. Another
    process that finished first wins; a cache that cannot be written is said once and skipped."""
    if directory is None:
        return
    staging = None
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        model.save_pretrained(staging, safe_serialization=True)
        tok.save_pretrained(staging)
        (staging / DONE).write_text(f"dequantised from {source} by transformers {transformers.__version__}\n")
        if (directory / DONE).is_file():
            shutil.rmtree(staging)
            return
        shutil.rmtree(directory, ignore_errors=True)  # a damaged copy that load_copy turned down
        os.replace(staging, directory)
    except OSError as e:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        print(f"epi: could not cache the dequantised GGUF model in {directory.parent} ({e}); loading from the file "
              f"each time (set {ENV} to a writable directory, or {ENV}= to turn the cache off)", file=sys.stderr)

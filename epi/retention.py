"""General-ability retention: perplexity on held-out text that no fine-tuning task touches.

Fine-tuning a pretrained model can erase what it already knew, and the papers' forgetting claim
covers that too. The text must be offline and fixed, so it is the module docstrings of a fixed
list of Python standard-library modules, as the running Python ships them, cut into passages of
`tokens` tokens (plain text, no chat template). The corpus is named by the SHA-256 of its text
(`corpus_sha256`): two numbers compare only when their hashes match (another Python version may
ship other docstrings). It is prose about code, not any built-in task's format.

The text comes from nowhere else: no data file, run directory or config value adds to it, and each module
is imported only from the standard library itself (`stdlib_module`), never from a file of the same name
that happens to come first on sys.path.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from epi.errors import UserError

MODULES = (
    "abc", "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "enum", "fractions", "functools", "glob", "gzip", "hashlib",
    "heapq", "html", "http", "inspect", "io", "itertools", "json", "logging", "math", "operator", "os", "pathlib",
    "pickle", "queue", "random", "re", "shutil", "sqlite3", "statistics", "string", "subprocess", "tempfile",
    "textwrap", "threading", "time", "typing", "unittest", "urllib", "uuid", "zipfile",
)


def corpus() -> str:
    """The docstrings of MODULES, in that order, separated by blank lines."""
    docs = (inspect.getdoc(stdlib_module(name)) for name in MODULES)
    return "\n\n".join(doc.strip() for doc in docs if doc)


def _stdlib_dirs() -> tuple[Path, ...]:
    """The running Python's standard library (pure and compiled), from its base install, not a virtual environment."""
    prefix, exec_prefix = sys.base_prefix, sys.base_exec_prefix
    base = {"base": prefix, "platbase": exec_prefix, "installed_base": prefix, "installed_platbase": exec_prefix}
    return tuple({Path(sysconfig.get_path(key, vars=base)).resolve() for key in ("stdlib", "platstdlib")})


def stdlib_module(name: str) -> ModuleType:
    """Module `name`, checked to come from the standard library before it is imported (the import runs its code).

    sys.path puts the script's directory first, and under `python -m` (submitit's SLURM jobs) the working
    directory: a file there named like a module of MODULES that nothing imported yet (html, sqlite3) would run,
    and its docstring would silently change the corpus. Packages installed over the standard library don't count.
    """
    module = sys.modules.get(name)
    spec = module.__spec__ if module is not None else importlib.util.find_spec(name)
    origin = spec.origin if spec is not None else None
    if origin not in ("built-in", "frozen"):
        path = Path(origin).resolve() if origin else None
        in_stdlib = path is not None and any(path.is_relative_to(d) for d in _stdlib_dirs())
        if not in_stdlib or {"site-packages", "dist-packages"} & set(path.parts):
            raise UserError(
                f"retention corpus: module {name!r} would be imported from {origin}, not from the standard library; "
                "rename that file or run from another directory (eval.retention reads standard-library docstrings)"
            )
    return module if module is not None else importlib.import_module(name)


@dataclass(frozen=True)
class RetentionSet:
    passages: list[list[int]]  # token ids, `tokens` each
    corpus_sha256: str


def build(tokenizer, n_passages: int, tokens: int) -> RetentionSet:
    """The first `n_passages` consecutive windows of `tokens` tokens of the corpus (fewer if it is shorter)."""
    text = corpus()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    passages = [ids[i : i + tokens] for i in range(0, len(ids) - tokens + 1, tokens)][:n_passages]
    if not passages:
        raise ValueError(f"the retention corpus is {len(ids)} tokens, shorter than one passage of {tokens}")
    return RetentionSet(passages, hashlib.sha256(text.encode()).hexdigest())


@torch.no_grad()
def perplexity(model: torch.nn.Module, retention: RetentionSet, batch_size: int = 16) -> dict[str, float]:
    """Mean next-token loss over every predicted token of the passages, and its exp."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(retention.passages), batch_size):
        ids = torch.tensor(retention.passages[i : i + batch_size], device=device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
        count += ids[:, 1:].numel()
    model.train(was_training)
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": float(count)}

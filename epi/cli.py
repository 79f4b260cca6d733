"""What train.py and eval.py share: error reporting, run naming, and writing result tables."""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from epi.errors import UserError
from epi.evaluate import format_table


def say_error(message: str) -> None:
    """`error: <message>` on stderr in one write, so the lines of ranks failing at once never interleave. Under
    torchrun every rank usually fails alike: rank 0's line is the `error:` line, another rank's starts `rank N: `
    (then it is said even when only that rank failed)."""
    rank = int(os.environ.get("RANK", "0"))
    sys.stderr.flush()
    os.write(2, f"{f'rank {rank}: ' if rank else ''}error: {message}\n".encode(errors="replace"))


def exit_on_user_error(fn: Callable) -> Callable:
    """A `UserError` becomes one line on stderr and its exit code (2, or 3 for a diverged run); so does a full
    disk wherever it strikes. Anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            say_error(str(e))
            sys.exit(e.exit_code)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            say_error(f"no space left on device writing {e.filename or 'a run file'}; free space, then run it again with resume=auto "
                      "in its directory (it continues from its last checkpoint, or starts afresh when it has none)")
            sys.exit(2)

    return wrapper


# Overrides that decide where a run's results go and how fast it runs, not what it trains: runs that differ
# only in these are seeds of one setting (a sweep continued with logger=jsonl, or on a machine with more cores).
BOOKKEEPING = ("logger.", "logger=", "threads=")


def is_bookkeeping(override: str) -> bool:
    return override.lstrip("+~").startswith(BOOKKEEPING)


def setting_name(overrides: list[str]) -> str:
    """A run's setting (its W&B group, a row of eval.py's report): its overrides without the seed and the
    bookkeeping ones, so that the seeds of one setting are averaged together."""
    return run_name([o for o in overrides if not is_bookkeeping(o)], drop=("seed",))


def run_name(overrides: list[str], drop: tuple[str, ...] = ()) -> str:
    """Readable W&B name from the command-line overrides, e.g. "strategy=epi,seed=1"."""
    keep = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in drop]
    return ",".join(keep) or "default"


def write_results(out_dir: Path, split: str, results: dict[str, dict[str, float]], scorers: dict[str, str], title: str,
                  predictions: list[dict] | None = None) -> str:
    """Writes eval_<split>.json and .md next to each other, and predictions_<split>.jsonl (one line per
    evaluated example: task, prompt, reference, prediction, score, loss) so any number can be audited
    without code; returns the markdown table."""
    table = format_table(results, scorers, title)
    (out_dir / f"eval_{split}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / f"eval_{split}.md").write_text(table + "\n")
    if predictions is not None:
        lines = (json.dumps(record, ensure_ascii=False) + "\n" for record in predictions)
        (out_dir / f"predictions_{split}.jsonl").write_text("".join(lines), encoding="utf-8")
    return table

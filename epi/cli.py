"""What train.py and eval.py share: one-line errors and their exit codes, and writing a results table."""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path

from epi import rundir
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


def write_results(out_dir: Path, split: str, results: dict[str, dict[str, float]], scorers: dict[str, str], title: str,
                  predictions: list[dict] | None = None) -> str:
    """The results table of `results` (titled), written with the results and predictions (rundir.write_results);
    returns the table."""
    table = format_table(results, scorers, title)
    rundir.write_results(out_dir, split, results, table, predictions)
    return table

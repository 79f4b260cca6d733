"""Test-only crash injection, loaded by Python at start-up when this folder is on PYTHONPATH.

EPI_KILL_AT_SAVE=N: the process SIGKILLs itself at its N-th checkpoint save, after
checkpoint.pt.tmp is written and before it is renamed over checkpoint.pt: a job killed
mid-checkpoint, as a preempted or OOM-killed one is. Nothing in the project reads this.
"""

import os
import signal

_KILL_AT = int(os.environ.get("EPI_KILL_AT_SAVE", "0"))

if _KILL_AT:
    _replace = os.replace
    _saves = 0

    def _replace_or_die(src, dst, *args, **kwargs):
        global _saves
        if str(dst).endswith("checkpoint.pt"):
            _saves += 1
            if _saves == _KILL_AT:
                os.kill(os.getpid(), signal.SIGKILL)
        return _replace(src, dst, *args, **kwargs)

    os.replace = _replace_or_die

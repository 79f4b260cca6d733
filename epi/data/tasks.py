"""Built-in synthetic tasks, one per ability the CPI-FT / EPI papers fine-tune for.

All five read the same kind of input, a short keyword followed by small numbers
or lowercase letters, and answer in the same alphabet. The same list under
another keyword has another answer (`sum 3 7 2` -> `12`, `sort 3 7 2` ->
`2 3 7`, `code sort 3 7 2` -> `sorted([3, 7, 2])`), so a small model can only
keep the tasks apart through the keyword: they compete for the same parameters,
which is the interference this project studies.

Everything is generated from `random.Random(f"{name}:{seed}")`; string seeds are
hashed with SHA-512 by `random`, so unlike `hash()` they are stable across runs.
"""

import random
import string
import zlib
from dataclasses import dataclass, field
from typing import Callable

from epi.data.scorers import BY_EXECUTION, get_scorer
from epi.errors import UserError

SPLITS = ("train", "val", "test")
MAX_EXAMPLE_BYTES = 128  # prompt + response, UTF-8; keeps sequences short for a CPU model
MAX_PER_SPLIT = 50_000  # every generator's space holds millions of prompts; this many is always reachable


@dataclass(frozen=True)
class CodeTests:
    """What decides a code answer under the `pass_at_1` scorer (epi.data.execution.program): test code, and the
    function it checks (HumanEval's `entry_point`; None for assert-style tests, MBPP's)."""

    code: str
    entry_point: str | None = None


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    response: str
    tests: CodeTests | None = None  # a code task's tests (data.sources.<task>.fields.tests); None for every other task


@dataclass
class Task:
    name: str
    splits: dict[str, list[Example]]  # keys "train", "val", "test"
    scorer: str  # a key of epi.data.scorers.SCORERS
    # A dataset task's reading: {"rows": read, "empty_dropped": dropped for a null or empty prompt or
    # response, "converted": numbers and bools turned into text} (epi.data.sources); empty for a built-in task.
    input_stats: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        get_scorer(self.scorer)  # fail at construction, not at the first evaluation
        if self.scorer in BY_EXECUTION:  # an example without tests could only ever score 0
            evaluated = [ex for split in ("val", "test") for ex in self.splits.get(split, [])]
            missing = sum(ex.tests is None for ex in evaluated)
            if missing:
                raise UserError(
                    f"task {self.name!r}: scorer {self.scorer} runs each example's tests, but {missing} of its {len(evaluated)} "
                    f"val/test examples have none; map the column that holds them with data.sources.{self.name}.fields.tests"
                )

    def score(self, prediction: str, example: Example) -> float:
        return get_scorer(self.scorer)(prediction, example.response)


# ---------------------------------------------------------------------------
# Generators: rng -> (prompt, response). The response is a function of the prompt.

Items = list[int] | list[str]


def _numbers(rng: random.Random, lo: int, hi: int, top: int = 99) -> list[int]:
    return [rng.randint(0, top) for _ in range(rng.randint(lo, hi))]


def _items(rng: random.Random, lo: int, hi: int) -> Items:
    """A list of numbers or of letters: the shared input alphabet of all tasks."""
    if rng.random() < 0.5:
        return _numbers(rng, lo, hi)
    return [rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi))]


def _join(xs: Items) -> str:
    return " ".join(map(str, xs))


def _math(rng: random.Random) -> tuple[str, str]:
    """~GSM8K: multi-step arithmetic whose answer has to be computed.

    Numbers up to 19 (not 99): with two-digit carries the experiments' 0.5M model scored 0.05
    even as a single-task expert after 2000 steps (val split); with these it learns the task.
    """
    op = rng.choice(("sum", "diff"))
    xs = _numbers(rng, 2, 3, top=19)
    answer = sum(xs) if op == "sum" else xs[0] - sum(xs[1:])
    return f"{op} {_join(xs)}", str(answer)


_CODE = {"max": "max({})", "min": "min({})", "sum": "sum({})", "sort": "sorted({})", "reverse": "{}[::-1]"}


def _code(rng: random.Random) -> tuple[str, str]:
    """~CodeAlpaca: translate an instruction into a Python expression."""
    op = rng.choice(tuple(_CODE))
    xs = _numbers(rng, 2, 5) if op == "sum" else _items(rng, 2, 5)
    return f"code {op} {_join(xs)}", _CODE[op].format(repr(xs))


def _logic(rng: random.Random) -> tuple[str, str]:
    """~LogiQA: evaluate a conjunction or disjunction of comparisons."""
    conj = rng.choice(("and", "or"))
    clauses = []
    for _ in range(rng.randint(2, 3)):
        a, b, cmp = rng.randint(0, 99), rng.randint(0, 99), rng.choice("<>")
        clauses.append((f"{a} {cmp} {b}", a < b if cmp == "<" else a > b))
    value = all(v for _, v in clauses) if conj == "and" else any(v for _, v in clauses)
    return "logic " + f" {conj} ".join(text for text, _ in clauses), str(value).lower()


def _instruct(rng: random.Random) -> tuple[str, str]:
    """~Alpaca: follow a one-word instruction on a list."""
    op = rng.choice(("reverse", "sort", "max", "min"))
    xs = _items(rng, 3, 5)
    out = {"reverse": xs[::-1], "sort": sorted(xs), "max": [max(xs)], "min": [min(xs)]}[op]
    return f"{op} {_join(xs)}", _join(out)


def _format(rng: random.Random) -> tuple[str, str]:
    """~UltraChat: restate key/value pairs in a requested output format."""
    fmt = rng.choice(("json", "xml"))
    keys = rng.sample(string.ascii_lowercase, rng.randint(2, 4))
    pairs = [(k, rng.randint(0, 99)) for k in keys]
    prompt = f"{fmt} " + " ".join(f"{k}={v}" for k, v in pairs)
    if fmt == "json":
        return prompt, "{" + ", ".join(f'"{k}": {v}' for k, v in pairs) + "}"
    return prompt, "".join(f"<{k}>{v}</{k}>" for k, v in pairs)


_GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "math": _math,
    "code": _code,
    "logic": _logic,
    "instruct": _instruct,
    "format": _format,
}
BUILTIN_TASKS: tuple[str, ...] = tuple(_GENERATORS)


def split_of(prompt: str) -> str:
    """80/10/10 by a stable hash of the prompt: a prompt is in one split whatever the seed or n."""
    bucket = zlib.crc32(prompt.encode()) % 10
    return "train" if bucket < 8 else "val" if bucket == 8 else "test"


def make_builtin_task(name: str, *, seed: int, n_train: int, n_val: int, n_test: int) -> Task:
    """Draw distinct prompts from the task's generator and file each under its hashed split.

    The prompt stream depends only on (name, seed), so the first k examples of a
    split are the same whatever the other splits' sizes.
    """
    if name not in _GENERATORS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {', '.join(BUILTIN_TASKS)}")
    wanted = {"train": n_train, "val": n_val, "test": n_test}
    for split, n in wanted.items():
        if not 0 <= n <= MAX_PER_SPLIT:
            raise ValueError(f"task {name!r}: n_{split}={n} must be in [0, {MAX_PER_SPLIT}]")

    gen, rng = _GENERATORS[name], random.Random(f"{name}:{seed}")
    splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
    seen: set[str] = set()
    budget = 20 * sum(wanted.values()) + 1000  # each split gets >= 10% of draws; 2x slack for duplicates
    for _ in range(budget):
        if all(len(splits[s]) == wanted[s] for s in SPLITS):
            break
        prompt, response = gen(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        split = split_of(prompt)
        if len(splits[split]) < wanted[split]:
            splits[split].append(Example(name, prompt, response))
    for s in SPLITS:
        if len(splits[s]) < wanted[s]:
            raise ValueError(
                f"task {name!r} (seed {seed}): found only {len(splits[s])} of {wanted[s]} distinct "
                f"{s} prompts in {budget} draws; ask for fewer examples"
            )
    return Task(name=name, splits=splits, scorer="exact_match")

"""Scorers: compare a decoded model answer with the gold response, 1.0 = correct.

A plain dict of small functions, so a task names its scorer by a string that
can live in a config file. Three scorers need more than the two texts, and
evaluation (epi.evaluate) computes them itself:

- `perplexity` reads no text: open-ended tasks (Alpaca, UltraChat) have no single
  right answer, so by default evaluation reports exp(response loss) for them
  instead of generating (`FROM_LOSS`);
- `pass_at_1` runs the generated code with the example's tests in a process of
  its own: 1.0 when it exits 0 in time (epi.data.execution, `BY_EXECUTION`);
- `judge` has a local chat model rate an open-ended answer 1-10, opted into per
  task (`data.sources.<task>.scorer=judge`; epi.judge, `BY_JUDGE`). Its tasks
  report a `rating`, not a `score`: a 1-10 scale would swamp the 0-1 average.
"""

import re
from collections.abc import Callable

Scorer = Callable[[str, str], float]

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_OPTION = re.compile(r"\b([A-E])\b")


def exact_match(prediction: str, reference: str) -> float:
    """The whole answer must match; surrounding whitespace is generation noise, not content."""
    return float(prediction.strip() == reference.strip())


def final_number(text: str) -> float | None:
    """GSM8K's convention: the number after the last `####`, else the last number in the text (commas ignored)."""
    text = text.replace(",", "")
    if "####" in text:
        text = text.rsplit("####", 1)[1]
        found = _NUMBER.search(text)
    else:
        found = (list(_NUMBER.finditer(text)) or [None])[-1]
    return float(found.group()) if found else None


def numeric(prediction: str, reference: str) -> float:
    """Chain-of-thought answers: only the final number counts, `72`, `72.0` and `#### 72` alike."""
    gold, guess = final_number(reference), final_number(prediction)
    return float(gold is not None and guess is not None and abs(gold - guess) < 1e-6)


def option_letter(prediction: str, reference: str) -> float:
    """Multiple choice (LogiQA): the first standalone capital A-E in the answer, e.g. `B`, `(B)`, `Answer: B.`"""
    found = _OPTION.search(prediction)
    return float(found is not None and found.group(1) == reference.strip().upper())


def perplexity(prediction: str, reference: str) -> float:
    """Never called on text: evaluation computes exp(response loss) for tasks with this scorer."""
    raise TypeError("the perplexity scorer is computed from the response loss, not from generated text")


def pass_at_1(prediction: str, reference: str) -> float:
    """Never called on text: evaluation runs the generated program with the example's tests (epi.data.execution)."""
    raise TypeError("the pass_at_1 scorer runs the program with the example's tests, it does not compare texts")


def judge(prediction: str, reference: str) -> float:
    """Never called on text: evaluation has the judge model rate the answer (epi.judge)."""
    raise TypeError("the judge scorer asks the judge model (eval.judge), it does not compare texts")


SCORERS: dict[str, Scorer] = {
    "exact_match": exact_match,
    "numeric": numeric,
    "option_letter": option_letter,
    "perplexity": perplexity,
    "pass_at_1": pass_at_1,
    "judge": judge,
}
FROM_LOSS = frozenset({"perplexity"})  # scorers evaluated from the loss: no generation, no `score`
BY_EXECUTION = frozenset({"pass_at_1"})  # the generation run with the example's tests: a 0/1 `score`
BY_JUDGE = frozenset({"judge"})  # the generation rated 1-10 by the judge model: a `rating`, no `score`


def get_scorer(name: str) -> Scorer:
    """Look up a scorer, failing loudly on a typo instead of scoring everything 0."""
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; valid scorers: {', '.join(sorted(SCORERS))}")
    return SCORERS[name]

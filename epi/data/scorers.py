"""Scorers: compare a decoded model answer with the gold response, 1.0 = correct.

A plain dict of small functions, so a task names its scorer by a string that
can live in a config file.
"""

from typing import Callable

Scorer = Callable[[str, str], float]


def exact_match(prediction: str, reference: str) -> float:
    """The whole answer must match; surrounding whitespace is generation noise, not content."""
    return float(prediction.strip() == reference.strip())


SCORERS: dict[str, Scorer] = {
    "exact_match": exact_match,
}


def get_scorer(name: str) -> Scorer:
    """Look up a scorer, failing loudly on a typo instead of scoring everything 0."""
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; valid scorers: {', '.join(sorted(SCORERS))}")
    return SCORERS[name]

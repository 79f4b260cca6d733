"""Eval prompts that are also training prompts: a score on them measures memorisation, not the ability.

The val split of a dataset task is held out by a hash of the prompt and cannot share one with train;
its test split, read from an `eval` file, holds whatever that file holds. Prompts are compared by
`holdout_key` (a chat: its non-assistant turns) with whitespace runs collapsed, so a copy that differs
only in spacing or a trailing newline still counts.
"""

from __future__ import annotations

from epi.data.format import Chat
from epi.data.sources import holdout_key
from epi.data.tasks import Example, Task

EVAL_SPLITS = ("val", "test")


def _key(ex: Example | Chat) -> str:
    return " ".join(holdout_key(ex).split())


def contamination(tasks: dict[str, Task]) -> dict[str, dict[str, float]]:
    """Per task, `{split}_count` and `{split}_fraction` of the val and test examples whose prompt is in its train split."""
    report = {}
    for name, task in tasks.items():
        seen = {_key(ex) for ex in task.splits["train"]}
        report[name] = {}
        for split in EVAL_SPLITS:
            examples = task.splits[split]
            count = sum(_key(ex) in seen for ex in examples)
            report[name] |= {f"{split}_count": count, f"{split}_fraction": count / len(examples) if examples else 0.0}
    return report


def contamination_warning(report: dict[str, dict[str, float]], threshold: float) -> str | None:
    """One line naming each task and split whose fraction is above `threshold` (data.contamination_warn), or None."""
    over = [
        f"{task} {split} {r[f'{split}_count']} ({r[f'{split}_fraction']:.1%})"
        for task, r in report.items()
        for split in EVAL_SPLITS
        if r[f"{split}_fraction"] > threshold
    ]
    if not over:
        return None
    return (
        f"warning: eval prompts also in the training split: {', '.join(over)}, above data.contamination_warn={threshold}; "
        "scores on them measure memorisation: deduplicate the files"
    )

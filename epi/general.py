"""General-ability checks (`eval.general.tasks`): evaluation-only tasks, such as HumanEval, scored before and after training.

Retention (epi/retention.py) measures what fine-tuning does to the model's perplexity on plain text; a general check
measures an ability the model had before it (writing a function that passes its tests) on a benchmark that no task
of the run trains on. Each name is the task config `data.sources.<name>` when the data config has one, else
`conf/data/task/<name>.yaml` (humaneval.yaml ships; epi.data.load.general_source); it is never in `data.tasks`, so
the mixture never draws it.

Its examples are the `eval.split` split, all of them (cut only by `data.n_<split>`, as every task is), generated with
`eval.general.max_new_tokens` new tokens (there is no training reply to fit the length to). An example that
`data.max_len` cannot hold is refused, not dropped, so that every run scores the same problems.

train.py scores them on the model as loaded (step 0, before a strategy changes it; a resume keeps that number) and
after training: logged under split `general`, written to general.json (`before`, `after`) and general.md, with the
final predictions in predictions_general.jsonl. eval.py scores them on the model it evaluates (eval_general.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from epi import rundir
from epi.data.load import encode_tasks
from epi.data.tasks import Task
from epi.errors import UserError
from epi.evaluate import evaluate, format_table

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from epi.config import EvalConfig
    from epi.judge import Judge

SPLIT = "general"  # the metrics' split, and the predictions file's name: predictions_general.jsonl


def encode_general(tokenizer: PreTrainedTokenizerBase, tasks: dict[str, Task], data: DictConfig, split: str) -> dict[str, Task]:
    """The tasks with their `split` checked against data.max_len: all of it must fit (see the module docstring)."""
    encoded = encode_tasks(tokenizer, tasks, data)
    for name, e in encoded.items():
        if dropped := e.stats[f"{split}_dropped"]:
            raise UserError(f"eval.general.tasks: task {name!r}: {dropped} of {len(tasks[name].splits[split])} {split} examples "
                            f"do not fit data.max_len={data.max_len} tokens; raise data.max_len, so that every run scores the same problems")
    return {name: e.task for name, e in encoded.items()}


def evaluate_general(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tasks: dict[str, Task], e: EvalConfig,
                     data: DictConfig, judge: Judge | None) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """({task: metrics}, one prediction record per example) of every example of `eval.split`."""
    records: list[dict[str, Any]] = []
    results = evaluate(
        model, tokenizer, tasks, split=e.split, n_examples=max(len(t.splits[e.split]) for t in tasks.values()),
        batch_size=e.batch_size, max_new_tokens=e.general.max_new_tokens, max_len=data.max_len, truncate=data.truncate,
        predictions=records, execution=e.execution, judge=judge,
    )
    return results, records


def write_general(run_dir: Path, split: str, tasks: dict[str, Task], before: dict[str, dict[str, float]] | None,
                  after: dict[str, dict[str, float]], records: list[dict[str, Any]]) -> str:
    """general.json, general.md (returned) and predictions_general.jsonl of a train.py run."""
    scorers = {name: task.scorer for name, task in tasks.items()}
    tables = [format_table(after, scorers, f"general ability after training ({split} split)")]
    if before is not None:
        tables.insert(0, format_table(before, scorers, f"general ability before training ({split} split)"))
    (run_dir / rundir.GENERAL).write_text(json.dumps({"split": split, "before": before, "after": after}, indent=2) + "\n")
    (run_dir / rundir.GENERAL_TABLE).write_text("\n\n".join(tables) + "\n")
    rundir.write_predictions(run_dir, rundir.predictions(SPLIT), records)
    return "\n\n".join(tables)

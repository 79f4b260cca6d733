"""Per-task evaluation: the task's score from greedy generation and the response loss, and their table.

`score` means what the task's scorer says (exact match, final number, option letter, tests
passed: a fraction correct). Open-ended tasks have no score: by default (scorer `perplexity`)
they report `perplexity` = exp(response loss) and skip generation; scored by `judge` they report
the judge's mean `rating` (1-10) over the judgements it could parse, and `judge_unparseable`,
how many it could not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from epi.data.execution import ExecutionLimits, program, run_all
from epi.data.format import IGNORE_INDEX, Chat, collate, encode_example, prompt_ids
from epi.data.scorers import BY_EXECUTION, BY_JUDGE, FROM_LOSS
from epi.data.tasks import Example, Task
from epi.judge import Judge


@torch.no_grad()
def generate(model: PreTrainedModel, tok: PreTrainedTokenizerBase, examples: list[Example | Chat], max_new_tokens: int) -> list[str]:
    """Greedy completions of everything before each example's last reply; left-padded so every row continues from its last real token."""
    device = next(model.parameters()).device
    rows = [prompt_ids(tok, ex) for ex in examples]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.tensor(r)
        attention_mask[i, width - len(r) :] = 1
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return tok.batch_decode(out[:, width:], skip_special_tokens=True)


@torch.no_grad()
def response_loss(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, examples: list[Example | Chat], max_len: int, truncate: str
) -> tuple[float, list[float]]:
    """Mean cross-entropy per response token over the batch (the training objective, on held-out data),
    and each example's own mean (for its line in the predictions file)."""
    device = next(model.parameters()).device
    batch = collate([encode_example(tok, ex, max_len, truncate) for ex in examples], tok.pad_token_id)
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    labels = batch["labels"][:, 1:].to(device)
    flat_logits = logits[:, :-1].flatten(0, 1).float()
    mean = torch.nn.functional.cross_entropy(flat_logits, labels.flatten(), ignore_index=IGNORE_INDEX).item()
    per_token = torch.nn.functional.cross_entropy(flat_logits, labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    trained = labels != IGNORE_INDEX
    per_example = (per_token.view_as(labels) * trained).sum(1) / trained.sum(1).clamp(min=1)
    return mean, per_example.tolist()


def prompt_text(ex: Example | Chat) -> str:
    """What a reader of the predictions file needs to see of the input: the prompt, or a chat's earlier turns
    (an empty system turn, as data.system_prompt="" adds, shows nothing)."""
    if isinstance(ex, Chat):
        return "\n".join(f"{role}: {content}" for role, content in ex.messages[:-1] if content or role != "system")
    return ex.prompt


def code_prompt(ex: Example | Chat) -> str:
    """The text a code answer continues (HumanEval's prompt is the program's first lines): the prompt, or a chat's last user turn."""
    if isinstance(ex, Chat):
        return next((content for role, content in reversed(ex.messages[:-1]) if role == "user"), "")
    return ex.prompt


def grade(task: Task, examples: list[Example | Chat], generated: list[str], execution: ExecutionLimits | None,
          judge: Judge | None) -> list[dict[str, Any]]:
    """Each generation's fields in its prediction record: `score` (null for a judged task), and for pass_at_1 how the
    program ended (`execution`: passed, timeout, exit N, signal NAME; `stderr`: its last lines), for judge the judge's
    `rating` (null when unparseable) and its whole reply (`judgement`)."""
    if task.scorer in BY_EXECUTION:
        if execution is None:
            raise ValueError(f"task {task.name!r} is scored by running code: evaluate() needs execution limits")
        runs = run_all([program(code_prompt(ex), text, ex.tests) for ex, text in zip(examples, generated)], execution)
        return [{"score": float(r.passed), "execution": r.status, "stderr": r.stderr} for r in runs]
    if task.scorer in BY_JUDGE:
        if judge is None:
            raise ValueError(f"task {task.name!r} is scored by the judge: evaluate() needs a judge")
        replies = generate(judge.model, judge.tokenizer, judge.prompts([prompt_text(ex) for ex in examples], generated),
                           judge.max_new_tokens)
        verdicts = judge.parse(replies)
        return [{"score": None, "rating": v.rating, "judgement": v.text} for v in verdicts]
    return [{"score": task.score(text, ex)} for text, ex in zip(generated, examples)]


def summary(scorer: str, grades: list[dict[str, Any]], loss: float) -> dict[str, float]:
    """A task's quality metric: perplexity from the loss, the judge's mean rating over the judgements it could parse
    (none: no rating) with the count it could not, or the mean score."""
    if scorer in FROM_LOSS:
        return {"perplexity": math.exp(loss)}
    if scorer in BY_JUDGE:
        ratings = [g["rating"] for g in grades if g["rating"] is not None]
        return {**({"rating": sum(ratings) / len(ratings)} if ratings else {}), "judge_unparseable": len(grades) - len(ratings)}
    return {"score": sum(g["score"] for g in grades) / len(grades)}


def generation_limits(longest_replies: Mapping[str, int | None], max_new_tokens: int, fit: bool) -> dict[str, int]:
    """New tokens each task may generate (eval.fit_generation): no more than its longest training reply with
    its EOS, a length read from the training split only, and never more than `max_new_tokens`.

    Generation of a batch stops once every row has produced EOS; a model that does not stop (early in
    training) otherwise spends `max_new_tokens` steps on every task, however short its answers.
    """
    return {
        task: min(max_new_tokens, longest) if fit and longest else max_new_tokens
        for task, longest in longest_replies.items()
    }


def evaluate(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    tasks: dict[str, Task],
    *,
    split: str,
    n_examples: int,
    batch_size: int,
    max_new_tokens: int | Mapping[str, int],
    max_len: int,
    truncate: str,
    predictions: list[dict[str, Any]] | None = None,
    execution: ExecutionLimits | None = None,
    judge: Judge | None = None,
) -> dict[str, dict[str, float]]:
    """{task: {quality metric (`summary`), "loss"}} on the first n examples of `split`.

    `max_new_tokens` caps generation for every task, or per task (`generation_limits`). Tasks scored by
    pass_at_1 need `execution` (eval.execution), tasks scored by judge a `judge` (epi.judge.judge_for).

    With a `predictions` list, every example adds one record to it: task, prompt, reference,
    prediction (null for perplexity-scored tasks, which generate nothing), score (and what `grade`
    adds) and its own loss.
    """
    was_training = model.training
    model.eval()
    results = {}
    for name, task in tasks.items():
        examples = task.splits[split][:n_examples]
        limit = max_new_tokens if isinstance(max_new_tokens, int) else max_new_tokens[name]
        grades: list[dict[str, Any]] = []
        losses = []
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            generated: list[str | None] = [None] * len(chunk)
            chunk_grades: list[dict[str, Any]] = [{"score": None}] * len(chunk)
            if task.scorer not in FROM_LOSS:
                generated = generate(model, tok, chunk, limit)
                chunk_grades = grade(task, chunk, generated, execution, judge)
            grades += chunk_grades
            mean, per_example = response_loss(model, tok, chunk, max_len, truncate)
            losses.append(mean * len(chunk))
            if predictions is not None:
                predictions += [
                    {"task": name, "prompt": prompt_text(ex), "reference": ex.response, "prediction": p, **g, "loss": lo}
                    for ex, p, g, lo in zip(chunk, generated, chunk_grades, per_example)
                ]
        loss = sum(losses) / len(examples)
        results[name] = {**summary(task.scorer, grades, loss), "loss": loss}
    model.train(was_training)
    return results


def average(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each metric averaged over the tasks that report it (`score` over the scored tasks only)."""
    metrics = dict.fromkeys(m for r in results.values() for m in r)
    return {m: sum(r[m] for r in results.values() if m in r) / sum(m in r for r in results.values()) for m in metrics}


OPTIONAL_COLUMNS = ("perplexity", "rating", "judge_unparseable")  # shown when some task reports them


def format_table(results: dict[str, dict[str, float]], scorers: dict[str, str], title: str = "") -> str:
    """A markdown table: one row per task with the scorer that gave its score, plus the average."""
    reported = {m for r in results.values() for m in r}
    columns = ["score", "loss"] + [c for c in OPTIONAL_COLUMNS if c in reported]

    def cells(r: dict[str, float]) -> str:
        return " | ".join(("–" if c not in r else str(r[c]) if isinstance(r[c], int) else f"{r[c]:.3f}") for c in columns)

    lines = [title] if title else []
    lines += ["| task | scorer | " + " | ".join(columns) + " |", "|---|---|" + "---:|" * len(columns)]
    for name, r in results.items():
        lines.append(f"| {name} | {scorers[name]} | {cells(r)} |")
    lines.append(f"| **avg** | | {cells(average(results))} |")
    return "\n".join(lines)

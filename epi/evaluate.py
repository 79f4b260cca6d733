"""Per-task evaluation: the task's score from greedy generation and the response loss, and their table.

`score` means what the task's scorer says (exact match, final number, option letter: a
fraction correct). Open-ended tasks (scorer `perplexity`) have no score: they report
`perplexity` = exp(response loss) and skip generation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from epi.data.format import IGNORE_INDEX, Chat, collate, encode_example, prompt_ids
from epi.data.scorers import FROM_LOSS
from epi.data.tasks import Example, Task


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
) -> dict[str, dict[str, float]]:
    """{task: {"score" or "perplexity", "loss"}} on the first n examples of `split`.

    `max_new_tokens` caps generation for every task, or per task (`generation_limits`).

    With a `predictions` list, every example adds one record to it: task, prompt, reference,
    prediction (null for perplexity-scored tasks, which generate nothing), score and its own loss.
    """
    was_training = model.training
    model.eval()
    results = {}
    for name, task in tasks.items():
        examples = task.splits[split][:n_examples]
        limit = max_new_tokens if isinstance(max_new_tokens, int) else max_new_tokens[name]
        scores, losses = [], []
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            generated: list[str | None] = [None] * len(chunk)
            if task.scorer not in FROM_LOSS:
                generated = generate(model, tok, chunk, limit)
                scores += [task.score(p, ex) for p, ex in zip(generated, chunk)]
            mean, per_example = response_loss(model, tok, chunk, max_len, truncate)
            losses.append(mean * len(chunk))
            if predictions is not None:
                chunk_scores = scores[-len(chunk):] if task.scorer not in FROM_LOSS else [None] * len(chunk)
                predictions += [
                    {"task": name, "prompt": prompt_text(ex), "reference": ex.response, "prediction": p, "score": sc, "loss": lo}
                    for ex, p, sc, lo in zip(chunk, generated, chunk_scores, per_example)
                ]
        loss = sum(losses) / len(examples)
        quality = {"perplexity": math.exp(loss)} if task.scorer in FROM_LOSS else {"score": sum(scores) / len(scores)}
        results[name] = {**quality, "loss": loss}
    model.train(was_training)
    return results


def average(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each metric averaged over the tasks that report it (`score` over the scored tasks only)."""
    metrics = dict.fromkeys(m for r in results.values() for m in r)
    return {m: sum(r[m] for r in results.values() if m in r) / sum(m in r for r in results.values()) for m in metrics}


def format_table(results: dict[str, dict[str, float]], scorers: dict[str, str], title: str = "") -> str:
    """A markdown table: one row per task with the scorer that gave its score, plus the average."""
    columns = ["score", "loss"] + (["perplexity"] if any("perplexity" in r for r in results.values()) else [])

    def cells(r: dict[str, float]) -> str:
        return " | ".join(f"{r[c]:.3f}" if c in r else "–" for c in columns)

    lines = [title] if title else []
    lines += ["| task | scorer | " + " | ".join(columns) + " |", "|---|---|" + "---:|" * len(columns)]
    for name, r in results.items():
        lines.append(f"| {name} | {scorers[name]} | {cells(r)} |")
    lines.append(f"| **avg** | | {cells(average(results))} |")
    return "\n".join(lines)

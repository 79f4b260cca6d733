"""Per-task evaluation: greedy-generation score and response loss, and the table that reports them."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from epi.data.format import IGNORE_INDEX, collate, encode_example, prompt_ids
from epi.data.tasks import Example, Task


@torch.no_grad()
def generate(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy completions; prompts are left-padded so every row continues from its last real token."""
    device = next(model.parameters()).device
    rows = [prompt_ids(tok, p) for p in prompts]
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
def response_loss(model: PreTrainedModel, tok: PreTrainedTokenizerBase, examples: list[Example], max_len: int) -> float:
    """Mean cross-entropy per response token (the training objective, on held-out data)."""
    device = next(model.parameters()).device
    batch = collate([encode_example(tok, ex, max_len) for ex in examples], tok.pad_token_id)
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    labels = batch["labels"][:, 1:].to(device)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX
    ).item()


def evaluate(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    tasks: dict[str, Task],
    *,
    split: str,
    n_examples: int,
    batch_size: int,
    max_new_tokens: int,
    max_len: int,
) -> dict[str, dict[str, float]]:
    """{task: {"score": mean scorer value, "loss": response loss}} on the first n examples of `split`."""
    was_training = model.training
    model.eval()
    results = {}
    for name, task in tasks.items():
        examples = task.splits[split][:n_examples]
        scores, losses = [], []
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            predictions = generate(model, tok, [ex.prompt for ex in chunk], max_new_tokens)
            scores += [task.score(p, ex) for p, ex in zip(predictions, chunk)]
            losses.append(response_loss(model, tok, chunk, max_len) * len(chunk))
        results[name] = {"score": sum(scores) / len(scores), "loss": sum(losses) / len(examples)}
    model.train(was_training)
    return results


def average(results: dict[str, dict[str, float]]) -> dict[str, float]:
    metrics = next(iter(results.values())).keys()
    return {m: sum(r[m] for r in results.values()) / len(results) for m in metrics}


def format_table(results: dict[str, dict[str, float]], title: str = "") -> str:
    """A markdown table: one row per task plus the average."""
    lines = [title] if title else []
    lines += ["| task | score | loss |", "|---|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['score']:.3f} | {r['loss']:.3f} |")
    avg = average(results)
    lines.append(f"| **avg** | {avg['score']:.3f} | {avg['loss']:.3f} |")
    return "\n".join(lines)

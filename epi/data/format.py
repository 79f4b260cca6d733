"""Turn examples into token ids with a loss mask on the assistant's replies only.

An example is a conversation: a prompt/response pair is one user turn and one
assistant turn; a `Chat` (e.g. UltraChat) has several. The model is trained to
produce every assistant reply and end it with EOS; everything else is context,
so its labels are IGNORE_INDEX. The context before the last reply is also what
generation at evaluation time feeds the model, so training and evaluation see
the exact same prompt tokens.

With a chat template (SmolLM2) the text around the replies is the template's;
without one (the byte-level tiny model) a user or system turn is its text and
a newline, and a reply is its text and EOS.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from epi.data.tasks import CodeTests, Example, Task
from epi.errors import UserError

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index
TRUNCATE = ("response", "drop")  # data.truncate: right-truncate an over-long example, or drop it

Turn = tuple[str, str]  # (role, content); role is system, user or assistant


@dataclass(frozen=True)
class Chat:
    """A multi-turn conversation ending with an assistant turn; that last reply is the evaluation reference."""

    task: str
    messages: tuple[Turn, ...]
    tests: CodeTests | None = None  # a code task's tests, as on `Example`

    @property
    def response(self) -> str:
        return self.messages[-1][1]


class TooLong(ValueError):
    """An example that does not fit data.max_len under the truncation policy."""


def turns(ex: Example | Chat) -> tuple[Turn, ...]:
    if isinstance(ex, Chat):
        return ex.messages
    return (("user", ex.prompt), ("assistant", ex.response))


def with_system_prompt(ex: Example | Chat, system: str) -> Example | Chat:
    """`ex` with a leading ("system", `system`) turn unless it has a system turn of its own (data.system_prompt).

    A chat template may add a default system prompt to a conversation without one (SmolLM2's: ~16 tokens
    of every example, never trained on); an explicit turn, even an empty one, replaces it.
    """
    messages = turns(ex)
    if any(role == "system" for role, _ in messages):
        return ex
    return Chat(ex.task, (("system", system), *messages), ex.tests)


def render(tokenizer, context: tuple[Turn, ...]) -> str:
    """The text of `context` followed by whatever opens the next assistant reply."""
    if tokenizer.chat_template:
        messages = [{"role": role, "content": content} for role, content in context]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "".join(content + (tokenizer.eos_token if role == "assistant" else "\n") for role, content in context)


def _encode_turns(tokenizer, conversation: tuple[Turn, ...]) -> tuple[list[int], list[int], int]:
    """(input_ids, labels, index where the last reply starts), untruncated.

    The text between replies is tokenised on its own, reply by reply, so the ids of a
    context never depend on the reply that follows it. A reply is its tokens and EOS; the
    template's own end of turn, when it starts with the EOS text, is that EOS.
    """
    ids: list[int] = []
    labels: list[int] = []
    covered, start = "", 0  # the rendered text that `ids` stand for
    for i, (role, content) in enumerate(conversation):
        if role != "assistant":
            continue
        text = render(tokenizer, conversation[:i])
        if not text.startswith(covered):
            raise UserError(
                "the tokenizer's chat template renders earlier turns differently once later turns follow, so "
                "loss masks cannot be placed on every assistant turn; use prompt/response fields for this task"
            )
        rest = text[len(covered) :]
        if ids:
            rest = rest.removeprefix(tokenizer.eos_token)
        context = tokenizer(rest, add_special_tokens=False)["input_ids"]
        reply = tokenizer(content, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        start = len(ids) + len(context)
        ids += context + reply
        labels += [IGNORE_INDEX] * len(context) + reply
        covered = text + content
    return ids, labels, start


def prompt_ids(tokenizer, ex: Example | Chat) -> list[int]:
    """The tokens generation continues from: everything before the last reply."""
    ids, _, start = _encode_turns(tokenizer, turns(ex))
    return ids[:start]


def _fit(ex: Example | Chat, ids: list[int], labels: list[int], max_len: int, truncate: str) -> dict[str, list[int]]:
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    if first >= max_len:
        raise TooLong(
            f"task {ex.task!r}: the prompt is {first} tokens, max_len={max_len} leaves no room for the response "
            f"(prompt {next(c for r, c in turns(ex) if r != 'system')[:80]!r})"
        )
    if len(ids) > max_len and truncate == "drop":
        raise TooLong(f"task {ex.task!r}: example is {len(ids)} tokens > max_len={max_len} (data.truncate=drop)")
    return {"input_ids": ids[:max_len], "labels": labels[:max_len]}


def encode_example(tokenizer, ex: Example | Chat, max_len: int, truncate: str = "response") -> dict[str, list[int]]:
    """{"input_ids", "labels"} for one example; raises TooLong if it cannot fit `max_len` under `truncate`."""
    ids, labels, _ = _encode_turns(tokenizer, turns(ex))
    return _fit(ex, ids, labels, max_len, truncate)


def _evaluable(tokenizer, ex: Example | Chat, max_len: int, truncate: str) -> bool:
    """Whether a val/test example is kept: what generation continues from (everything before the last
    reply, the reference) must leave max_len room for a reply token, and under `drop` the whole
    example must fit. Under `response` a longer one stays: its loss is over the reply tokens that fit,
    its score compares the generation with the full reference."""
    ids, _, start = _encode_turns(tokenizer, turns(ex))
    return start < max_len and (truncate == "response" or len(ids) <= max_len)


def longest_reply(labels: list[int], eos_id: int) -> int:
    """The most tokens of one reply in `labels`, its EOS included: a reply is a run of trained labels ending
    at EOS (a row of a chat holds several, two of them possibly adjacent), or at the row's end if cut."""
    longest = run = 0
    for label in labels:
        run = 0 if label == IGNORE_INDEX else run + 1
        longest = max(longest, run)
        if label == eos_id:
            run = 0
    return longest


@dataclass
class EncodedTask:
    """A task's training rows and its eval splits, both restricted to what fits max_len, and how much was cut.

    `longest_reply` is the most tokens (EOS included) of one reply in the kept training examples, counted
    before truncation: the most new tokens a generation for this task needs (eval.fit_generation); None
    when no training example is left.
    """

    rows: list[dict[str, list[int]]]
    task: Task
    stats: dict[str, int]
    longest_reply: int | None = None


def encode_task(tokenizer, task: Task, max_len: int, truncate: str) -> EncodedTask:
    """Encode the training split and keep the val/test examples that can be evaluated (`_evaluable`); a split emptied is an error."""
    rows, stats, longest = [], {"truncated": 0, "dropped": 0}, None
    for ex in task.splits["train"]:
        ids, labels, _ = _encode_turns(tokenizer, turns(ex))
        try:
            rows.append(_fit(ex, ids, labels, max_len, truncate))
        except TooLong:
            stats["dropped"] += 1
            continue
        stats["truncated"] += len(ids) > max_len
        longest = max(longest or 0, longest_reply(labels, tokenizer.eos_token_id))
    splits = {"train": task.splits["train"]}
    for split in ("val", "test"):
        splits[split] = [ex for ex in task.splits[split] if _evaluable(tokenizer, ex, max_len, truncate)]
        stats[f"{split}_dropped"] = len(task.splits[split]) - len(splits[split])
    for split, kept in (("train", rows), ("val", splits["val"]), ("test", splits["test"])):
        if task.splits[split] and not kept:
            raise UserError(
                f"task {task.name!r}: all {len(task.splits[split])} {split} examples are longer than "
                f"data.max_len={max_len} allows (data.truncate={truncate}); raise data.max_len"
                + (" or use data.truncate=response" if truncate == "drop" else "")
            )
    stats["examples"] = len(rows)
    stats["tokens"] = sum(len(r["input_ids"]) for r in rows)
    stats["trained_tokens"] = sum(sum(label != IGNORE_INDEX for label in r["labels"]) for r in rows)
    return EncodedTask(rows, replace(task, splits=splits), stats, longest)


def collate(batch: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded labels are IGNORE_INDEX so padding never enters the loss."""
    width = max(len(x["input_ids"]) for x in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for i, x in enumerate(batch):
        n = len(x["input_ids"])
        input_ids[i, :n] = torch.tensor(x["input_ids"], dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.tensor(x["labels"], dtype=torch.long)
    if (labels == IGNORE_INDEX).all():
        raise ValueError("batch has no trained label (all IGNORE_INDEX): the loss would silently be 0")
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _first_fit(order: list[int], lengths: list[int], width: int) -> list[list[int]]:
    """Examples `order` (longest first) each into the first row of at most `width` tokens it fits."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        row = next((r for r, room in enumerate(free) if lengths[i] <= room), None)
        if row is None:
            rows.append([])
            free.append(width)
            row = len(rows) - 1
        rows[row].append(i)
        free[row] -= lengths[i]
    return rows


def plan_rows(lengths: list[int], width: int) -> list[list[int]]:
    """Packed rows as lists of example indices, each row at most `width` tokens, with as few cells (rows x the
    longest row) as the search finds.

    First-fit decreasing (the longest example first, each into the first row it fits) at `width` leaves its last
    row part-empty: a micro-batch of 16 examples of ~40 tokens in rows of 128 is 11% padding. So the rows are
    also balanced: for the fewest rows first-fit needs and one or two more, the narrowest row width at which
    first-fit still needs no more rows (a bisection), and the plan with the fewest cells is kept. The loss is a
    sum over tokens, so the order within a micro-batch changes nothing but float rounding; the micro-batch's
    examples, and so the sampler's order and mix across steps, are those drawn. A row mixes tasks (exclusive
    isolation splits the backward by each task's tokens, not its rows: `epi.task_split`)."""
    for n in lengths:
        if n > width:
            raise ValueError(f"an example of {n} tokens does not fit a packed row of {width}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: drawn order on ties

    def fill(w: int) -> list[list[int]]:
        return _first_fit(order, lengths, w)

    def cells(rows: list[list[int]]) -> int:
        return len(rows) * max(sum(lengths[i] for i in row) for row in rows)

    best = fill(width)
    fewest, longest, total = len(best), max(lengths), sum(lengths)
    for k in range(fewest, min(fewest + 2, len(lengths)) + 1):
        lo, hi = max(longest, -(-total // k)), width  # no k rows narrower than lo hold every example
        while lo < hi:  # the narrowest width at which first-fit needs at most k rows
            mid = (lo + hi) // 2
            if len(fill(mid)) <= k:
                hi = mid
            else:
                lo = mid + 1
        rows = fill(lo)
        if len(rows) <= k and cells(rows) < cells(best):
            best = rows
    return best


def packed_layout(plan: list[list[int]], lengths: list[int]) -> Iterator[tuple[int, int, int]]:
    """Where `pack` puts each example: (row, first token in the row, example index), row by row. The one place the
    layout is spelled, for `pack` and for whoever needs an example's tokens in the packed batch (exclusive isolation's
    per-task tokens, `epi.step`)."""
    for r, row in enumerate(plan):
        start = 0
        for i in row:
            yield r, start, i
            start += lengths[i]


def pack(batch: list[dict[str, list[int]]], plan: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Examples packed into the rows `plan` lists (indices into `batch`, from `plan_rows`), for a loss equal to `collate`'s.

    No attention mask: `position_ids` restart at 0 for every example (and for the padding after the last), which
    transformers' masking turns into a block-diagonal causal mask, so no token attends across its example's
    boundary (SDPA on the CPU, FlashAttention's variable-length path where it is the attention). The first label of
    every example is IGNORE_INDEX: unpacked it is never a target either, and here it would be the previous
    example's last prediction."""
    lengths = [len(x["input_ids"]) for x in batch]
    ends = [sum(lengths[i] for i in row) for row in plan]
    longest = max(ends)
    input_ids = torch.full((len(plan), longest), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(plan), longest), dtype=torch.long)
    labels = torch.full((len(plan), longest), IGNORE_INDEX, dtype=torch.long)
    for r, start, i in packed_layout(plan, lengths):
        n = lengths[i]
        input_ids[r, start : start + n] = torch.tensor(batch[i]["input_ids"], dtype=torch.long)
        position_ids[r, start : start + n] = torch.arange(n)
        labels[r, start + 1 : start + n] = torch.tensor(batch[i]["labels"][1:], dtype=torch.long)
    for r, end in enumerate(ends):
        position_ids[r, end:] = torch.arange(longest - end)  # the padding: a sequence of its own
    if (labels == IGNORE_INDEX).all():
        raise ValueError("batch has no trained label (all IGNORE_INDEX): the loss would silently be 0")
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


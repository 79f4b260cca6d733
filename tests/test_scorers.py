"""Scorers for real tasks: GSM8K's final number, LogiQA's option letter, and perplexity for open-ended tasks."""

import math

import pytest
import torch
from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

from epi.data.scorers import FROM_LOSS, final_number, get_scorer, numeric, option_letter
from epi.data.tasks import Example, Task
from epi.evaluate import evaluate, format_table


@pytest.mark.parametrize(
    "text,number",
    [("#### 72", 72), ("so 3 + 4 = 7\n#### 7", 7), ("The answer is 1,234.", 1234), ("-5 or 2.5", 2.5), ("#### -3 (not 9)", -3), ("none", None)],
)
def test_final_number(text: str, number: float | None) -> None:
    assert final_number(text) == number


def test_numeric_scorer_reads_gsm8k_references() -> None:
    reference = "Natalia sold 48/2 = 24 clips in May.\nAltogether 48 + 24 = 72 clips.\n#### 72"
    assert numeric("48 + 24 = 72 clips.\n#### 72", reference) == 1.0
    assert numeric("The answer is 72.0", reference) == 1.0
    assert numeric("72 clips, then 73", reference) == 0.0  # the last number counts
    assert numeric("no idea", reference) == 0.0


@pytest.mark.parametrize(
    "prediction,score",
    [("B", 1.0), ("(B)", 1.0), ("Answer: B.", 1.0), ("The answer is (B) because", 1.0), ("A", 0.0), ("b", 0.0), ("Both", 0.0), ("", 0.0)],
)
def test_option_letter(prediction: str, score: float) -> None:
    assert option_letter(prediction, "B") == score


def test_perplexity_is_from_the_loss_not_text() -> None:
    assert "perplexity" in FROM_LOSS
    with pytest.raises(TypeError, match="response loss"):
        get_scorer("perplexity")("text", "text")


def test_evaluate_reports_perplexity_for_open_ended_tasks_and_scores_for_the_rest() -> None:
    torch.manual_seed(0)
    tok = ByT5Tokenizer()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, eos_token_id=1, pad_token_id=0))
    examples = [Example("t", "sum 1 2", "3"), Example("t", "sum 2 2", "4")]
    tasks = {
        "math": Task("math", {"train": [], "val": [], "test": examples}, "numeric"),
        "chat": Task("chat", {"train": [], "val": [], "test": examples}, "perplexity"),
    }
    results = evaluate(model, tok, tasks, split="test", n_examples=2, batch_size=2, max_new_tokens=2, max_len=32, truncate="response")
    assert set(results["math"]) == {"score", "loss"} and set(results["chat"]) == {"perplexity", "loss"}
    assert results["chat"]["perplexity"] == pytest.approx(math.exp(results["chat"]["loss"]))
    table = format_table(results, {"math": "numeric", "chat": "perplexity"})
    assert table.splitlines()[0] == "| task | scorer | score | loss | perplexity |"
    assert table.splitlines()[3].startswith("| chat | perplexity | – |")

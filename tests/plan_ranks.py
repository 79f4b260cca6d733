"""What a real run holds after a step, beside what `python -m epi.plan` predicts for it: the harness of tests/test_plan.py,
and, run under torchrun (`python -m torch.distributed.run --nproc_per_node=2 -m tests.plan_ranks <out dir>`), the same
for DDP and FSDP runs on every rank, written to <out dir>/rank<r>.json for the test to compare."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

from epi.config import RunConfig, validate
from epi.data.load import known_tasks
from epi.memory import StateBytes, state_bytes
from epi.plan import make_plan
from epi.trainer import Trainer
from tests.helpers import make_cfg


def held_after(overrides: list[str], step: int, run_dir: Path) -> tuple[StateBytes, RunConfig, Trainer]:
    """A real run of `overrides` (tests.helpers.make_cfg's tiny limits; it ends at `step` unless they set
    schedule.steps): what it holds after that
    step's update and the strategy's hooks (masks refreshed), with the gradients as they were after its backward
    (the step drops them), its config as train.py validates it, and the finished trainer."""
    steps = [] if any(o.startswith("schedule.steps=") for o in overrides) else [f"schedule.steps={step}"]
    cfg = make_cfg(*overrides, *steps, "eval.n_examples=1", "eval.max_new_tokens=1")  # the final evaluation, cut short
    run = validate(cfg, known_tasks(cfg.data))
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(run, run_dir)
    backward, after = trainer.strategy.after_backward, trainer.strategy.after_step
    seen: dict[str, object] = {}

    def after_backward(s: int) -> None:
        backward(s)
        if s == step:
            seen["grads"] = state_bytes(trainer).grads

    def after_step(s: int) -> None:
        after(s)
        if s == step:
            seen["state"] = dataclasses.replace(state_bytes(trainer), grads=seen["grads"])

    trainer.strategy.after_backward, trainer.strategy.after_step = after_backward, after_step
    trainer.fit()
    return seen["state"], run, trainer


# Tiny runs whose isolation after the captured step is fully determined: exact rankings, and (CPI) two tasks that no
# core overlap links (tau > 1), so the second stage freezes exactly the first task's core.
EPI_EXACT = ["strategy=epi", "strategy.warmup=1", "strategy.p=0.2", "strategy.method=exact"]
TWO_PROBED = ["strategy.probe_steps=2", "strategy.p=0.1", "strategy.tau=2.0", "data.tasks=[math,code]"]
CPI_TWO = ["strategy=cpi", *TWO_PROBED]
UNEVEN = "model.intermediate_size=65"  # 65 rows of the MLP's up and gate weights: rank 0 holds 33, rank 1 32
DISTRIBUTED = {  # name: (overrides, step to capture)
    "ddp-epi": ([*EPI_EXACT, UNEVEN, "parallel=ddp"], 1),
    "fsdp-epi": ([*EPI_EXACT, UNEVEN, "parallel=fsdp"], 1),
    "fsdp-cpi": ([*CPI_TWO, UNEVEN, "parallel=fsdp", "schedule.steps=4"], 3),
}


def ddp_bucket_bytes(trainer: Trainer) -> int | None:
    """The bytes of DDP's gradient buckets, as its own logging data reports them (None when not under DDP)."""
    forward = trainer.learner.forward
    if not hasattr(forward, "_get_ddp_logging_data"):
        return None
    return sum(int(n) for n in re.findall(r"\d+", str(forward._get_ddp_logging_data()["bucket_sizes"])))


def main(out: Path) -> None:
    import torch.distributed as dist

    results = {}
    for name, (overrides, step) in DISTRIBUTED.items():
        cache = [f"strategy.cache_dir={out / 'probes'}"] if "cpi" in name else []
        measured, run, trainer = held_after([*overrides, *cache], step, out / name)
        plan = make_plan(run, rank=dist.get_rank())
        results[name] = {
            "measured": dataclasses.asdict(measured),
            "predicted": dataclasses.asdict(plan.state),
            "held": [dataclasses.asdict(h) for h in plan.held if h.phase == "run"],
            "buckets": ddp_bucket_bytes(trainer),
            "planned_buckets": plan.ddp_buckets,
        }
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

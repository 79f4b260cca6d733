"""Where the project's training step spends its time, and what is left to win.

    python bench/profile_step.py                                   # tiny, batch 16, the length-grouped step
    python bench/profile_step.py --models smollm2_135m --batch-size 8 --steps 4
    python bench/profile_step.py --compile                         # + eager vs torch.compile'd decoder
    python bench/profile_step.py --packing --models smollm2_135m   # what data.packing buys, part by part

`bench_trainer.py` compares whole steps; this says why a ratio stops where it does. It runs the
project's `Trainer.train_step` (`strategy=none`, today's defaults plus `schedule.group_by_length=50`,
the `project` row of `bench_trainer.py`) under `torch.profiler` and sorts the step's self time into
matrix products (`aten::mm`/`addmm`/`bmm`: the model's GEMMs, forward and backward), attention,
the optimizer, and everything else (elementwise ops, norms, autograd and Python overhead).

The last line is a bound. `transformers.Trainer` and TRL run the same GEMMs on the same tokens (the
trained-positions head removes only the LM head's share, and HF's grouping gives the same padding),
so no change to the loop, the loss or the optimizer can make the step faster than its GEMM time:
`step / GEMM time` is the most any such change could buy over the step measured here.

`--compile` also times the step with `schedule.compile=true` (the training forward under
`torch.compile(dynamic=True)`: inductor's CPU backend fuses the elementwise work between GEMMs), a second
trainer from the same seed, interleaved with the eager one in the same run; the compile time itself
(the first steps) is printed separately and not amortised.

`--packing` takes `data.packing=true`'s gain over the padded step (stream order, task-mixed batches) apart, on
the same batches: the same examples padded (`collate`) and packed (`pack`), each batch's forward and backward
timed alternately, medians of 3; then the padded trainer's whole step on each (checked to be the same batch),
whose remainder (the step minus its forward and backward, the median over the batches: the optimizer and
clipping over every parameter, the batch's collation, the loop) is work packing leaves as it is. So the gain is three factors: the cells
packing removes, what a packed cell costs against a padded one (a packed row is longer, and attention grows
with it; the LM head's work at the trained positions is the same on fewer cells), and the share of the step
that is not forward and backward. The last line is the most packing could give if it left no padding at all.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

# `python bench/profile_step.py` puts bench/ first on the import path, as for any script.
from bench_trainer import OVERRIDE_HELP, Work, project_trainer, stream
from epi.data.format import collate, pack, plan_rows
from epi.step import StepResult

GEMM = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")
ATTENTION = ("scaled_dot_product", "flash_attention", "efficient_attention")
OPTIMIZER = ("adam", "Optimizer.", "_foreach_")


def category(name: str) -> str:
    if name in GEMM:
        return "matrix products"
    if any(key in name for key in ATTENTION):
        return "attention"
    if any(key.lower() in name.lower() for key in OPTIMIZER):
        return "optimizer"
    return "other"


def timed(trainer, first: int, n: int) -> list[tuple[float, StepResult]]:
    """Wall time and result of `n` steps from step `first` (one length-grouped pool spans them all)."""
    out = []
    for step in range(first, first + n):
        trainer.learner.horizon = first + n - 1
        tic = time.perf_counter()
        result = trainer.train_step(step)
        out.append((time.perf_counter() - tic, result))
    return out


def steps(trainer, first: int, n: int) -> list[float]:
    """Wall time of `n` steps from step `first`."""
    return [seconds for seconds, _ in timed(trainer, first, n)]


def breakdown(trainer, first: int, n: int) -> tuple[float, dict[str, float]]:
    """Mean step time outside the profiler, and each category's share of the profiled self time."""
    plain = statistics.median(steps(trainer, first, n))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        steps(trainer, first + n, n)
    shares: dict[str, float] = {}
    for event in prof.key_averages():
        shares[category(event.key)] = shares.get(category(event.key), 0.0) + event.self_cpu_time_total
    total = sum(shares.values())
    return plain, {k: v / total for k, v in sorted(shares.items(), key=lambda kv: -kv[1])}


def packing_parts(work: Work, tmp: Path, n: int) -> None:
    """`--packing`: data.packing's gain over the padded step on `n` batches, factor by factor (the module's docstring)."""
    trainer = project_trainer(work, tmp)  # padded, stream order
    steps(trainer, 1, 3)  # optimizer state, lazy initialisation
    stepper, learner = trainer.stepper, trainer.learner

    def forward_backward(batch: dict[str, torch.Tensor]) -> float:
        tic = time.perf_counter()
        stepper.backward_batch(learner.forward, batch).sum().backward()
        seconds = time.perf_counter() - tic
        learner.optimizer.zero_grad(set_to_none=True)
        return seconds

    parts: dict[str, list[tuple[int, float]]] = {"padded": [], "packed": []}  # (cells, forward + backward s) per batch
    whole: list[float] = []  # the padded trainer's whole step on each batch
    tokens = 0
    for i, rows in enumerate(stream(trainer, n)):  # the batches the trainer's next n steps draw, one at a time
        lengths = [len(x["input_ids"]) for x in rows]
        tokens += sum(lengths)
        batches = {"padded": collate(rows, stepper.pad_id), "packed": pack(rows, plan_rows(lengths, work.max_len), stepper.pad_id)}
        times: dict[str, list[float]] = {name: [] for name in batches}
        for _ in range(3):
            for name, batch in batches.items():
                times[name].append(forward_backward(batch))
        for name, batch in batches.items():
            parts[name].append((batch["input_ids"].numel(), statistics.median(times[name])))
        [(seconds, result)] = timed(trainer, 4 + i, 1)
        if result.cells != batches["padded"]["input_ids"].numel():
            raise RuntimeError("the trainer's step drew another batch than the one timed alone")
        whole.append(seconds)
    # per step, means over the batches; the rest (what a step does besides its forward and backward) the median,
    # robust to one slow forward or step
    rest = max(0.0, statistics.median(w - fb for w, (_, fb) in zip(whole, parts["padded"])))
    cells = {name: statistics.mean(c for c, _ in run) for name, run in parts.items()}
    fb = {name: statistics.mean(t for _, t in run) for name, run in parts.items()}
    per_cell = {name: fb[name] / cells[name] for name in parts}
    tokens /= n
    print(f"\n{work.model}, data.packing, batch {work.batch_size}, max_len {work.max_len}, {n} batches:")
    print("| layout | cells/step | padding | forward + backward (s/step) | per 1000 cells (s) |\n|---|---:|---:|---:|---:|")
    for name in parts:
        print(f"| {name} | {cells[name]:.0f} | {1 - tokens / cells[name]:.1%} | {fb[name]:.4f} | {per_cell[name] * 1e3:.4f} |")
    print(f"{work.model}: whole padded step {statistics.mean(whole):.4f} s, of which {rest:.4f} s is not forward and backward "
          f"({rest / statistics.mean(whole):.1%}: optimizer, clipping, collation, the loop)")
    removed, dearer = cells["padded"] / cells["packed"], per_cell["packed"] / per_cell["padded"]
    padded_step = fb["padded"] + rest  # the step as its parts: forward and backward, and the rest
    step = padded_step / (fb["packed"] + rest)
    print(f"{work.model}: packed / padded = {removed:.3f} (cells) / {dearer:.3f} (a packed cell's cost) -> {fb['padded'] / fb['packed']:.3f}x "
          f"forward and backward -> {step:.3f}x the step with the rest unchanged")
    no_padding = padded_step / (per_cell["packed"] * tokens + rest)
    print(f"{work.model}: with no padding left at all (every cell a token, at a packed cell's cost) at most {no_padding:.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--steps", type=int, default=20, help="steps per measurement (after 3 warm-up steps)")
    parser.add_argument("--compile", action="store_true", help="also time the decoder under torch.compile")
    parser.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE", help=OVERRIDE_HELP)
    parser.add_argument("--packing", action="store_true", help="instead: data.packing's gain over the padded step, part by part")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}; cpu, {args.threads} threads, {args.precision}, batch {args.batch_size}, "
          f"max_len {args.max_len}; load average {os.getloadavg()[0]:.2f} at the start"
          + (f"; overrides: {' '.join(args.override)}" if args.override else ""))
    for model in args.models:
        work = Work(model, args.batch_size, args.max_len, args.precision, 4 * args.steps + 3, torch.device("cpu"),
                    overrides=tuple(args.override))
        with tempfile.TemporaryDirectory() as tmp:
            if args.packing:
                packing_parts(work, Path(tmp), args.steps)
                continue
            trainer = project_trainer(work, Path(tmp), ["schedule.group_by_length=50"])
            steps(trainer, 1, 3)  # optimizer state, lazy initialisation
            step_s, shares = breakdown(trainer, 4, args.steps)
            print(f"\n{model}: {step_s:.4f} s/step (median of {args.steps}); share of the profiled step's self time:")
            print("| part | share |\n|---|---:|")
            for name, share in shares.items():
                print(f"| {name} | {share:.1%} |")
            gemm = shares.get("matrix products", 0.0)
            print(f"{model}: bound: with everything but the GEMMs free, a step could be at most {1 / gemm:.2f}x "
                  "faster than this one (every side runs the same GEMMs)")
            if args.compile:
                compiled = project_trainer(work, Path(tmp) / "compiled", ["schedule.group_by_length=50", "schedule.compile=true"])
                tic = time.perf_counter()
                steps(compiled, 1, 3)
                compile_s = time.perf_counter() - tic
                eager, fast = [], []
                next_step = {id(trainer): 4 + 2 * args.steps, id(compiled): 4}
                for block in range(4):  # interleaved blocks, each trainer on along its own stream: eager, compiled, ...
                    runner, into = (compiled, fast) if block % 2 else (trainer, eager)
                    into.extend(steps(runner, next_step[id(runner)], args.steps // 2))
                    next_step[id(runner)] += args.steps // 2
                e, c = statistics.median(eager), statistics.median(fast)
                print(f"{model}: schedule.compile=true: {c:.4f} s/step vs eager {e:.4f} "
                      f"({c / e:.2f}x; compile and the first compiled steps: {compile_s:.0f} s)")


if __name__ == "__main__":
    main()

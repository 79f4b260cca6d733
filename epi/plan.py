"""`python -m epi.plan [the overrides of train.py]`: a run's pre-flight plan, printed without training anything.

    python -m epi.plan experiment=table_multitask model=hf model.name_or_path=/models/llama-2-7b \\
        parallel=fsdp plan.world_size=8 plan.device_memory_gb=80

What a job will need is known before it is queued: the parameters' shapes, the optimizer's state, what the
isolation engine and the strategy keep, the micro-batch's activations, the stages and the compute a strategy charges
besides them. This prints it per rank and says whether it fits one device, so a 7B run that cannot fit 80 GB is
refused at the desk, not after an hour in the queue.

Nothing is allocated: the model is built inside a FakeTensorMode (shapes and dtypes, no memory) from its config
alone (`epi.models.build_architecture`: config.json, a GGUF header, or `plan.model_config` with no file at all).
Each number's source:
- parameters, gradients: the shapes, as this rank holds them (FSDP2: dim-0 shards, rank 0's being the largest);
- optimizer state: one step of the configured optimizer on two small parameters (`epi.memory.optimizer_layout`);
- isolation state: what epi/optim.py and the strategy allocate, read off their code (`epi.isolation_memory`);
- activations: one micro-batch's forward and backward run on fake tensors (`epi.activations`);
- FSDP's gathered layers and DDP's gradient buckets: the unit sizes (an estimate; not measured on a GPU here);
- stages, tokens, the compute strategies charge, and the wall time: `epi.compute_plan`.
tests/test_plan.py holds the state to the byte, and the activations within 25%, against real runs on CPU.

The same overrides as train.py compose the same config (Hydra's compose of conf/); the `plan` keys
(conf/plan/default.yaml) say how many ranks, how much device memory, and how fast the run goes.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf

from epi.activations import activation_bytes
from epi.cli import exit_on_user_error
from epi.compute_plan import Charge, StagePlan, TaskLengths, default_stages, measure, stage_plan, token_lengths, world_size
from epi.config import CONF, RunConfig, validate
from epi.data.load import known_tasks
from epi.data.local import expand_root
from epi.errors import UserError
from epi.isolation_memory import Held, RunShape, isolation_held
from epi.masks import participating
from epi.memory import Shapes, StateBytes, optimizer_layout
from epi.models import DTYPES, build_architecture
from epi.sharding import decoder_layers
from epi.strategies import Strategy, build_strategy
from epi.strategies.epi import EvolvingIsolation
from epi.strategies.none import NoIsolation

GIB = 2**30
PLACEHOLDER = "(plan.model_config)"  # model.name_or_path when plan.model_config gives the architecture


# ---------------------------------------------------------------- the config
def compose_run(overrides: list[str]) -> RunConfig:
    """The run train.py would get from `overrides`, checked as train.py checks it, except for this machine's devices
    (the plan is usually made on another machine than the job's). Hydra's own keys (hydra.run.dir, hydra/launcher)
    are left out: they place the run, they do not change it."""
    if "-m" in overrides or "--multirun" in overrides:
        raise UserError("python -m epi.plan plans one run: drop -m and give one value per key (a sweep's jobs differ only in those)")
    kept = [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
    try:
        with initialize_config_dir(str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=kept)
    except HydraException as e:  # a misspelt key or group, a bad override: Hydra's message, on one line
        lines = [line.strip() for line in str(e).split("Config search path:")[0].splitlines()]
        raise UserError("; ".join(line for line in lines if line)) from None
    cfg.data = expand_root(cfg.data)
    model_config = cfg.plan.get("model_config") if "plan" in cfg else None
    if model_config is not None:
        if cfg.model.kind != "hf":
            raise UserError(f"plan.model_config gives a Hugging Face architecture: use model=hf with it (now model.kind={cfg.model.kind})")
        if OmegaConf.is_missing(cfg.model, "name_or_path"):
            cfg.model.name_or_path = PLACEHOLDER  # nothing is read from it
    return validate(cfg, known_tasks(cfg.data), here=False)


# ---------------------------------------------------------------- the plan
@dataclass
class Plan:
    """Everything `render` prints, as numbers: per rank (this `rank`'s shards under FSDP), in bytes."""

    run: RunConfig
    world: int
    rank: int
    sharded: bool
    architecture: str
    total_params: int
    trainable_params: int
    isolable: str  # what the strategy may isolate, in words and numbers
    optimizer: str  # the optimizer's state, in words
    state: StateBytes  # between steps (isolation: its `run` entries)
    held: list[Held]
    activations: int
    rows: int  # the micro-batch's rows on this rank
    length: int  # the tokens of its rows the activations were traced at
    trained: int | None  # the trained positions they were traced with (None: every position)
    fsdp_gathered: int
    ddp_buckets: int
    stages: list[StagePlan]
    stage_note: str
    charges: list[Charge]
    lengths: str  # how the tokens are counted
    tokens_per_s: float | None
    speed_source: str
    phases: dict[str, int] = field(default_factory=dict)  # device bytes at the peak of each phase
    host: int = 0  # host memory the isolation keeps, at its peak

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.stages) + sum(c.tokens for c in self.charges)

    @property
    def optimizer_steps(self) -> int:
        return sum(s.steps for s in self.stages) + sum(c.optimizer_steps for c in self.charges)


def architecture_config(run: RunConfig):
    """plan.model_config as a transformers config (None when the model's own config is read)."""
    values = run.plan.model_config
    if values is None:
        return None
    from transformers import AutoConfig

    values = dict(values)
    model_type = values.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **values)
    except (ValueError, TypeError) as e:
        raise UserError(f"plan.model_config: transformers cannot build a {model_type!r} config from it ({e})") from e


def fake_model(run: RunConfig, dtype: str | None = None) -> torch.nn.Module:
    """The run's model on fake tensors (no memory), in `dtype` if given (FSDP's bf16 compute copy)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg = run.composed.model
    if dtype is not None:
        cfg = copy.deepcopy(cfg)
        cfg.dtype = dtype
    with FakeTensorMode(allow_non_fake_inputs=True):
        return build_architecture(cfg, architecture_config(run))


def make_plan(run: RunConfig, rank: int = 0, measured: tuple[float, dict[str, TaskLengths]] | None = None) -> Plan:
    """The plan of `run` for `rank` (rank 0 holds the largest shards). `measured`: the tokens/s and the data's
    lengths of a short real run (`measure`), when plan.measure_steps asked for one."""
    world = world_size(run)
    s = run.schedule
    if s.batch_size % world:
        raise UserError(f"schedule.batch_size={s.batch_size} must be divisible by the number of processes (plan.world_size={world})")
    sharded = run.parallel.name == "fsdp" and world > 1
    strategy = build_strategy(run.composed.strategy, quiet=True)
    stages = default_stages(run)
    strategy.check_plan(stages)
    model = fake_model(run)
    shapes = Shapes.of(model, world if sharded else 1, rank)
    trainable = shapes.trainable
    layout = optimizer_layout(run.composed.optimizer, DTYPES[run.model.dtype], run.optimizer.weight_decay)
    params = shapes.bytes(shapes.params)
    grads = shapes.bytes(trainable)
    optimizer = layout.bytes(shapes)
    grad_size = next(iter(trainable.values())).element_size()
    run_shape = RunShape(tuple(run.data.tasks), stages, run.seed, run.isolation.moments, grad_size, sharded)
    held = isolation_held(strategy, shapes, run_shape, 0 if sharded else params + grads + optimizer)
    state = StateBytes(params, grads, optimizer,
                       sum(h.bytes for h in held if h.phase == "run" and h.device),
                       sum(h.bytes for h in held if h.phase == "run" and not h.device))

    lengths, per_task = token_lengths(run, measured)
    rows = s.batch_size // world
    length, trained = run.data.max_len, None  # the shape's bound: rows of max_len tokens, every position trained
    if per_task:  # the data's own worst case: its longest example, its most trained tokens in every row
        length = max(t.longest for t in per_task.values())
        trained = min(rows * (length - 1), rows * max(t.most_trained for t in per_task.values()))
    mixed = sharded and run.parallel.mixed_precision == "bf16"
    traced = fake_model(run, "bfloat16") if mixed else model
    activations = activation_bytes(traced, rows, length, s.lm_head, s.precision == "bf16", run.data.packing, trained)
    fsdp_gathered = gathered_bytes(model, run, shapes) if sharded else 0
    ddp_buckets = grads if world > 1 and not sharded else 0

    plan_stages, stage_note, charges = stage_plan(run, strategy, stages, per_task, shapes)
    speed, source = (run.plan.tokens_per_s, "plan.tokens_per_s") if run.plan.tokens_per_s else (None, "")
    if measured is not None:
        speed, source = measured[0], f"measured: {run.plan.measure_steps} step(s) of this config on this machine, one process"

    between = params + grads + optimizer + ddp_buckets + state.isolation_device
    extra = {phase: sum(h.bytes for h in held if h.phase == phase and h.device) for phase in ("step", "refresh", "prepare")}
    backward_in_refresh = isinstance(strategy, EvolvingIsolation) and strategy.cfg.mode == "exclusive"  # task_gradient
    phases = {
        "forward/backward": between + activations + fsdp_gathered,
        "optimizer step": between + extra["step"],
    }
    if extra["refresh"]:
        phases["mask refresh"] = between + extra["refresh"] + (activations + fsdp_gathered if backward_in_refresh else 0)
    if extra["prepare"]:
        phases["probes/calibration"] = between + extra["prepare"] + activations + fsdp_gathered
    host = state.isolation_host + max([0] + [sum(h.bytes for h in held if h.phase == p and not h.device) for p in ("refresh", "prepare")])

    return Plan(
        run=run, world=world, rank=rank, sharded=sharded,
        architecture=f"{type(model).__name__} ({describe_source(run)})",
        total_params=sum(p.numel() for p in shapes.params.values()),
        trainable_params=sum(p.numel() for p in trainable.values()),
        isolable=isolable(strategy, trainable),
        optimizer=layout.describe(),
        state=state, held=held, activations=activations, rows=rows, length=length, trained=trained,
        fsdp_gathered=fsdp_gathered, ddp_buckets=ddp_buckets,
        stages=plan_stages, stage_note=stage_note, charges=charges, lengths=lengths,
        tokens_per_s=speed, speed_source=source, phases=phases, host=host,
    )


def describe_source(run: RunConfig) -> str:
    m = run.model
    if m.kind == "tiny":
        return f"model=tiny: {m.num_layers} layers of {m.hidden_size}"
    if run.plan.model_config is not None:
        return "plan.model_config, no file read"
    return f"{m.name_or_path}{' ' + m.gguf_file if m.gguf_file else ''}, config only"


def isolable(strategy: Strategy, trainable: dict[str, torch.Tensor]) -> str:
    """What the strategy may isolate: its `include` pool of coordinates, whole tensors, or nothing."""
    if isinstance(strategy, NoIsolation):
        return "none (strategy=none isolates nothing)"
    include = getattr(strategy.cfg, "include", None)
    if include is None:
        return f"whole tensors ({len(trainable)} trainable tensors)"
    pool = participating(trainable, include)
    kinds = ["linear weights", *(k for k, on in include.items() if on)]
    return f"{sum(p.numel() for p in pool.values()):,} coordinates ({', '.join(kinds)}: strategy.include)"


def gathered_bytes(model: torch.nn.Module, run: RunConfig, shapes: Shapes) -> int:
    """FSDP2's transient unsharded copies on a rank (an estimate): the root's parameters (embeddings, final norm, LM
    head) gathered for the whole step, the decoder layer computing and the next one prefetched (every layer after
    the forward with reshard_after_forward=false), and one unit's unsharded gradients before their reduce-scatter.
    Parameters are gathered in the compute dtype (bf16 under parallel.mixed_precision=bf16), gradients reduced in
    fp32 under it."""
    mixed = run.parallel.mixed_precision == "bf16"
    layers = [sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(model)]
    total = sum(p.numel() for p in shapes.params.values())
    root = total - sum(layers)
    size = 2 if mixed else next(iter(shapes.params.values())).element_size()
    grad_size = 4 if mixed else size
    gathered = root + (sum(layers) if not run.parallel.reshard_after_forward else 2 * max(layers))
    return gathered * size + max(root, max(layers)) * grad_size


# ---------------------------------------------------------------- printing
def size(n: int) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def render(plan: Plan) -> str:
    run, s = plan.run, plan.run.schedule
    out: list[str] = []
    where = f"{plan.world} rank(s), " + ("FSDP2 shards (rank 0: the largest, ceil(rows/world) rows of each parameter)"
                                        if plan.sharded else "DDP: every rank holds everything" if plan.world > 1 else "one process")
    precision = {"fp32": "fp32", "bf16": "bf16 autocast"}[s.precision]
    if plan.sharded and run.parallel.mixed_precision == "bf16":
        precision += ", FSDP bf16 parameters in forward/backward"
    checkpointing = "on" if run.model.gradient_checkpointing else "off"
    out.append(f"plan: {plan.architecture}")
    out.append(f"  strategy={run.composed.strategy.name}, parallel={run.parallel.name}, {where}")
    shape = (f"{plan.length} tokens (data.max_len)" if plan.trained is None else
             f"{plan.length} tokens (the longest example; data.max_len={run.data.max_len}), {plan.trained} trained positions")
    out.append(f"  micro-batch {plan.rows} row(s) x {shape} per rank ({s.batch_size} per micro-batch over the ranks, "
               f"x grad_accum {s.grad_accum} = {s.batch_size * s.grad_accum} examples a step), {precision}, gradient checkpointing {checkpointing}, lm_head={s.lm_head}")
    out.append("")
    out.append(f"parameters: {plan.total_params:,} total, {plan.trainable_params:,} trainable ({run.model.dtype}); "
               f"isolable: {plan.isolable}")
    out.append("")
    st = plan.state
    rows = [
        ("parameters", st.params, f"{run.model.dtype}" + (f", 1/{plan.world} each" if plan.sharded else "")),
        ("gradients", st.grads, "one per trainable parameter"),
        ("optimizer state", st.optimizer, plan.optimizer),
    ]
    if plan.ddp_buckets:
        rows.append(("DDP gradient buckets", plan.ddp_buckets, "the reducer's copy of the gradients (gradient_as_bucket_view=false)"))
    rows.append(("isolation state", st.isolation_device, "between steps, on the device (entries below)"))
    bound = "rows of max_len, every position trained" if plan.trained is None else "the data's longest rows and most trained tokens"
    rows.append(("activations", plan.activations, f"peak of one micro-batch's forward+backward on fake tensors ({bound})"))
    if plan.fsdp_gathered:
        rows.append(("FSDP gathered units", plan.fsdp_gathered, "root + the layer computing and the one prefetched, one unit's "
                     "unsharded gradients (estimate)"))
    out.append(f"per rank (device memory, rank {plan.rank}):")
    for label, n, note in rows:
        out.append(f"  {label:<24}{size(n):>11} {n:>17,} B  {note}")
    for phase, n in plan.phases.items():
        out.append(f"  {'peak, ' + phase:<24}{size(n):>11} {n:>17,} B")
    if plan.held:
        out.append("isolation entries (exact | at most | about; run: between steps, step/refresh/prepare: transient):")
        for h in plan.held:
            where = "" if h.device else ", host"
            why = f"  [{h.why}]" if h.why else ""
            out.append(f"  {size(h.bytes):>12}  {h.bound:<8} {h.phase}{where}: {h.what}{why}")
    if plan.host:
        out.append(f"  host memory for the isolation, at its peak: {size(plan.host)}")
    out.append("")
    gb = run.plan.device_memory_gb
    if gb is None:
        out.append(f"fit: not checked (plan.device_memory_gb=null); peak {size(plan.peak)} per rank")
    else:
        usable = gb * GIB * (1 - run.plan.headroom)
        margin = usable - plan.peak
        head = f"{gb:g} GiB less {run.plan.headroom:.0%} headroom = {usable / GIB:.1f} GiB usable"
        if margin >= 0:
            out.append(f"fit: yes: peak {size(plan.peak)} per rank of {head}; {size(int(margin))} to spare")
        else:
            out.append(f"fit: NO: peak {size(plan.peak)} per rank exceeds {head} by {size(int(-margin))}{advice(plan)}")
    out.append("")
    out.append(f"stages (global batch {s.batch_size} x grad_accum {s.grad_accum} examples; tokens: {plan.lengths}):")
    for stage in plan.stages:
        out.append(f"  {stage.name:<12}{stage.steps:>9,} steps  {stage.tokens:>16,} tokens  tasks: {', '.join(stage.tasks)}")
    if plan.stage_note:
        out.append(f"  {plan.stage_note}")
    for charge in plan.charges:
        note = f" ({charge.note})" if charge.note else ""
        out.append(f"  + {charge.what}: {charge.optimizer_steps:,} optimizer steps, {charge.tokens:,} tokens{note}")
    out.append(f"compute: {plan.optimizer_steps:,} optimizer steps (as the run's compute event counts them), {plan.tokens:,} tokens")
    if plan.tokens_per_s:
        out.append(f"wall time: {duration(plan.tokens / plan.tokens_per_s)} at {plan.tokens_per_s:,.0f} tokens/s ({plan.speed_source}), "
                   "training only (evaluation and checkpoints besides)")
    else:
        out.append("wall time: give plan.tokens_per_s (the run's train/tokens_per_s) or plan.measure_steps=N to time N steps here")
    return "\n".join(out)


def advice(plan: Plan) -> str:
    """What would shrink the peak, in the order a researcher tries it."""
    run = plan.run
    ideas = []
    if plan.activations > plan.state.params and not run.model.gradient_checkpointing:
        ideas.append("model.gradient_checkpointing=true")
    if plan.sharded and run.parallel.mixed_precision == "none":
        ideas.append("parallel.mixed_precision=bf16 (under FSDP rather than schedule.precision=bf16, whose autocast keeps "
                     "a bf16 copy of every weight it casts until the forward ends)")
    elif run.schedule.precision == "fp32" and plan.activations > plan.state.params:
        ideas.append("schedule.precision=bf16")
    if plan.rows > 1:
        ideas.append("a smaller schedule.batch_size with a larger schedule.grad_accum")
    if not plan.sharded:
        ideas.append("parallel=fsdp over more ranks")
    elif plan.state.params + plan.state.grads + plan.state.optimizer > plan.activations:
        ideas.append("more ranks (plan.world_size)")
    return f"; try {', or '.join(ideas)}" if ideas else ""


@exit_on_user_error
def main(argv: list[str]) -> None:
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return
    run = compose_run(argv)
    measured = measure(run) if run.plan.measure_steps else None
    print(render(make_plan(run, measured=measured)))


if __name__ == "__main__":
    main(sys.argv[1:])

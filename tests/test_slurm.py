"""Issue 17: SLURM sweeps through submitit, and preemption-safe resume.

A sweep runs through hydra-submitit-launcher (its local executor here, the same code path as SLURM's
up to `sbatch`); the SLURM launcher configs become the sbatch flags they promise; a task that SLURM or
submitit starts joins the process group from its own environment; and a run started again by the same
command (resume=auto), or requeued by SLURM (SLURM_RESTART_COUNT > 0) without any resume key, continues
its own checkpoint to bit-identical weights and the same W&B run.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from hydra.types import RunMode
from omegaconf import OmegaConf
from safetensors.torch import load_file

from epi import run as train_script
from epi import checkpoint
from epi.distributed import export_launcher_env, first_host, master_port
from epi.errors import UserError
from epi.logging import WANDB_ID, carry_wandb_id, read_metrics, wandb_id
from epi.strategies.none import NoIsolation
from tests.helpers import ROOT, TINY, make_cfg, run_main, run_script
from tests.test_resume_cli import killed_at_save

pytestmark = pytest.mark.slurm

RUN_FILES = ("config.yaml", "metrics.jsonl", "eval_test.json")


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def train_events(run: Path) -> list[tuple]:
    """Every logged training step, wall-clock speed left out (it differs between attempts)."""
    return [(e["step"], e["metric"], e["value"]) for e in read_metrics(run) if e["split"] == "train" and e["metric"] != "tokens_per_s"]


# --- the launcher configs ------------------------------------------------------------------------


def sbatch_text(launcher: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, object]:
    """The sbatch file and executor that hydra-submitit-launcher builds from `hydra/launcher=<launcher>`: its own
    `launch`, run up to the point where it would call sbatch (no SLURM here, so nothing is submitted)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}", f"hydra.sweep.dir={tmp_path}", "hydra.job.name=train"],
                      return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params.pop("_target_") == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    captured = {}

    def map_array(executor, fn, *args):
        captured["executor"] = executor._executor
        return [SimpleNamespace(results=lambda: [None]) for _ in args[0]]

    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # "srun is installed"
    monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)
    launcher = SlurmLauncher(**params)
    launcher.config = cfg
    launcher.launch([["strategy=none"]], initial_job_idx=0)
    executor = captured["executor"]
    return executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid"), executor


def test_the_8gpu_launcher_asks_slurm_for_one_process_per_gpu_and_requeues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text, executor = sbatch_text("slurm_8gpu_fsdp", tmp_path, monkeypatch)
    for flag in ("--nodes=1", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=8", "--mem=480GB",
                 "--time=720", "--signal=USR2@120"):
        assert f"#SBATCH {flag}\n" in text, flag
    assert "--partition" not in text and "--gpus-per-task" not in text  # the cluster's default partition; all 8 GPUs per task
    assert executor.max_num_timeout == 3 and "srun --unbuffered" in text


def test_the_1gpu_launcher_asks_for_one_process_on_one_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text, executor = sbatch_text("slurm_1gpu", tmp_path, monkeypatch)
    for flag in ("--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=8", "--mem=32GB", "--time=240", "--signal=USR2@120"):
        assert f"#SBATCH {flag}\n" in text, flag
    assert executor.max_num_timeout == 3


EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_goes_to_slurm_and_still_runs_two_joblib_jobs_at_home(experiment: str) -> None:
    """An experiment's own launcher (joblib2) is one choice that the command line replaces whole: an n_jobs value
    inside the experiment would not compose with submitit's launchers, which have no such key."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        home = compose("config", overrides=[f"experiment={experiment}"], return_hydra_config=True).hydra.launcher
        for launcher, tasks in (("slurm_1gpu", 1), ("slurm_8gpu_fsdp", 8)):
            cfg = compose("config", overrides=[f"hydra/launcher={launcher}", "parallel=fsdp", f"experiment={experiment}"],
                          return_hydra_config=True)
            assert cfg.hydra.launcher.tasks_per_node == tasks and cfg.parallel.name == "fsdp"
    defaults = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "experiment" / f"{experiment}.yaml").defaults)
    if {"override /hydra/launcher": "joblib2"} in defaults:  # as before: two joblib jobs at once on this machine
        assert home._target_.endswith("JoblibLauncher") and home.n_jobs == 2
    else:
        assert home._target_.endswith("BasicLauncher")  # drift: one job at a time


# --- tasks that SLURM or submitit starts ---------------------------------------------------------


def srun_task(rank: int, **extra: str) -> dict[str, str]:
    """The environment srun gives task `rank` of a 2-node, 16-task step."""
    return {"SLURM_JOB_ID": "4242", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % 8), "SLURM_STEP_NUM_TASKS": "16",
            "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_JOB_NODELIST": "gpu[007-008]", **extra}


def test_srun_tasks_get_torchrun_variables_from_their_slurm_environment() -> None:
    env = srun_task(11)
    assert export_launcher_env(env)["RANK"] == "11"
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "gpu007"}
    assert env["MASTER_PORT"] == str(master_port("4242"))  # every task of the job computes the same port
    assert export_launcher_env(env) == {}  # set once: a second call changes nothing

    under_torchrun = srun_task(0, WORLD_SIZE="2", RANK="1")
    assert export_launcher_env(under_torchrun) == {} and under_torchrun["RANK"] == "1"  # torchrun's own variables win
    one_task = srun_task(0, SLURM_STEP_NUM_TASKS="1")
    assert export_launcher_env(one_task) == {} and "WORLD_SIZE" not in one_task  # a single task stays a plain run
    batch_script = {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "8", "SLURM_PROCID": "0"}  # python train.py in sbatch: no step
    assert export_launcher_env(batch_script) == {}


def test_submitit_tasks_use_submitit_s_job_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    job = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "77", "SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "5",
           "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "node12"}
    monkeypatch.setattr(os, "environ", dict(job))  # submitit reads os.environ itself; the real one stays untouched
    export_launcher_env(os.environ)
    assert [os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")] == ["5", "8", "5", "8", "127.0.0.1"]


def test_first_host_of_a_slurm_node_list() -> None:
    assert first_host("gpu[07-09,12],cpu3") == "gpu07"
    assert first_host("a1,b2") == "a1"
    assert first_host("rack[2-3]-n[010,012]") == "rack2-n010"
    assert first_host("solo") == "solo"


@pytest.mark.parametrize(("env", "expected"), [
    ({"SLURM_CPUS_PER_TASK": "2", "LOCAL_WORLD_SIZE": "2"}, 2),  # each SLURM task owns its 2 CPUs: not halved again
    ({"SLURM_CPUS_PER_TASK": "1"}, 1),  # SLURM gave this task 1 CPU, even if its affinity shows the node's 2
    ({"SLURM_CPUS_PER_TASK": "2", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"}, 1),  # torchrun's ranks share one task
    ({"LOCAL_WORLD_SIZE": "2"}, 1),
])
def test_threads_follow_slurm_s_cpus_per_task(env: dict[str, str], expected: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    for name in ("SLURM_CPUS_PER_TASK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert train_script.auto_threads(SimpleNamespace(mode=RunMode.RUN, launcher={})) == expected


# --- sweeps through submitit ---------------------------------------------------------------------


@pytest.mark.slow
def test_a_sweep_through_the_submitit_launcher_completes_every_job(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_script("train.py", "-m", "hydra/launcher=submitit_local", *TINY, "schedule.steps=4", "strategy=none,epi",
                      "++strategy.warmup=2", "threads=1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        assert all((sweep / job / name).is_file() for name in RUN_FILES), sorted(p.name for p in (sweep / job).iterdir())
        hydra = OmegaConf.load(sweep / job / ".hydra" / "hydra.yaml").hydra
        assert hydra.launcher._target_.endswith("submitit_launcher.LocalLauncher")
    assert OmegaConf.load(sweep / "1" / "config.yaml").strategy.name == "epi"
    assert any((sweep / ".submitit").iterdir())  # submitit's pickles and logs, beside the runs


class WorldLogged(NoIsolation):
    """strategy=none that logs how many processes train the run: proof that a launcher's tasks joined one group."""

    def after_step(self, step: int) -> None:
        if step == 1:
            self.ctx.log(step, "world", {"size": dist.get_world_size() if dist.is_initialized() else 1})


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("parallel", ["fsdp"])  # ddp's two ranks = one process: tests/test_loss_accounting.py (torchrun); the env is the same
def test_a_two_task_submitit_job_trains_data_parallel_like_one_process(parallel: str, tmp_path: Path) -> None:
    """The 8-GPU config's mechanism on CPU: submitit starts 2 tasks (no torchrun), each joins the gloo group from
    its submitit environment, and together they train what one process trains, sharded."""
    common = [*TINY, "strategy=none", "strategy._target_=tests.test_slurm.WorldLogged", f"parallel={parallel}", "threads=1"]
    on_path = {"PYTHONPATH": str(ROOT)}  # submitit's task processes import the test strategy from tests/
    sweep = tmp_path / "sweep"
    proc = run_script("train.py", "-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", *common,
                      f"hydra.sweep.dir={sweep}", cwd=tmp_path, env=on_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train_script.train(make_cfg(*common), tmp_path / "one")  # one process, in this one

    def world(run: Path) -> list[float]:
        return [e["value"] for e in read_metrics(run) if e["split"] == "world"]

    assert world(sweep / "0") == [2] and world(tmp_path / "one") == [1]
    losses = {run: [v for _, m, v in train_events(run) if m == "loss"] for run in (sweep / "0", tmp_path / "one")}
    assert len(losses[sweep / "0"]) == 6 and losses[sweep / "0"] == pytest.approx(losses[tmp_path / "one"], rel=1e-5)
    a, b = weights(sweep / "0"), weights(tmp_path / "one")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


# --- preemption: the same command again, or a requeue ----------------------------------------------


EPI = ["strategy=epi", "strategy.warmup=2", "strategy.refresh_every=3", "schedule.steps=10", "schedule.checkpoint_every=2"]
NO_WANDB = [o for o in TINY if not o.startswith("logger.mode=")]


def wandb_runs(run: Path) -> list[str]:
    """The ids of the offline W&B runs under run/wandb, one per attempt (directories offline-run-<time>-<id>)."""
    return sorted(p.name.rsplit("-", 1)[1] for p in (run / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_a_killed_run_resumes_by_the_same_command_or_a_requeue_into_one_wandb_run(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    # The attempts that are killed or requeued cross the process boundary (each with its own hash seed); the run never
    # stopped and the final no-op run in this process (run_main: the same main, exit code and output).
    straight = run_main("train.py", *TINY, *EPI, f"hydra.run.dir={tmp_path / 'straight'}", cwd=tmp_path, capfd=capfd)
    assert straight.returncode == 0, straight.stderr[-3000:]

    run = tmp_path / "run"
    plain = [*NO_WANDB, *EPI, "logger.mode=offline", f"hydra.run.dir={run}"]
    command = [*plain, "resume=auto"]
    first = run_script("train.py", *command, cwd=tmp_path, env=killed_at_save(2, hash_seed=2))  # SIGKILL saving step 4
    assert first.returncode == -signal.SIGKILL
    assert checkpoint.load(str(run))["step"] == 2
    run_id = (run / WANDB_ID).read_text().strip()

    again = run_script("train.py", *command, cwd=tmp_path, env=killed_at_save(2, hash_seed=3))  # the same command
    assert again.returncode == -signal.SIGKILL, again.stderr[-3000:]
    assert f"resuming {run / checkpoint.FILENAME} at step 2" in again.stdout
    assert checkpoint.load(str(run))["step"] == 4

    # SLURM requeues the job: its command is the first one (no resume key at all), SLURM_RESTART_COUNT says it restarted
    requeue = run_script("train.py", *plain, cwd=tmp_path, env={"SLURM_RESTART_COUNT": "1", "PYTHONHASHSEED": "4"})
    assert requeue.returncode == 0, requeue.stderr[-3000:]
    assert f"resuming {run / checkpoint.FILENAME} at step 4" in requeue.stdout

    a, b = weights(tmp_path / "straight"), weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train_events(run) == train_events(tmp_path / "straight")  # every step once: metrics continue, not restart
    assert (run / WANDB_ID).read_text().strip() == run_id
    assert wandb_runs(run) == [run_id] * 3  # three attempts, one W&B run

    model = {p.name: p.stat().st_mtime_ns for p in (run / "model").iterdir()}
    done = run_main("train.py", *command, cwd=tmp_path, capfd=capfd)  # once more: the run is finished, nothing is redone
    assert done.returncode == 0 and "nothing to do (resume=auto)" in done.stdout, done.stderr[-3000:]
    assert wandb_runs(run) == [run_id] * 3 and {p.name: p.stat().st_mtime_ns for p in (run / "model").iterdir()} == model


def test_without_auto_or_a_requeue_a_directory_holding_a_run_is_still_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_script.train(make_cfg("strategy=none", "keep_checkpoint=true"), run)
    with pytest.raises(UserError, match=r"already holds a run .* \(or resume=auto\)"):
        train_script.train(make_cfg("strategy=none"), run)


def test_auto_refuses_a_checkpoint_trained_with_other_settings(tmp_path: Path) -> None:
    """The checkpoint's settings differ: refused (train.py prints a UserError as one line, exit 2: tests/test_errors.py),
    and the run's files are left as they were."""
    run = tmp_path / "run"
    train_script.train(make_cfg("strategy=none", "keep_checkpoint=true"), run)
    metrics = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(UserError) as refused:
        train_script.train(make_cfg("strategy=none", "schedule.steps=8", "resume=auto"), run)
    assert str(refused.value).startswith(f"resume='auto': the checkpoint {run / checkpoint.FILENAME} was trained with different ['schedule']")
    assert (run / "metrics.jsonl").read_bytes() == metrics


def test_auto_leaves_a_finished_run_as_it_is_and_refuses_one_with_other_settings(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = train_script.train(make_cfg("strategy=none"), run)
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    assert train_script.train(make_cfg("strategy=none", "resume=auto"), run) == first
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
    with pytest.raises(UserError, match=r"resume=auto: .* holds a finished run trained with different \['seed'\]"):
        train_script.train(make_cfg("strategy=none", "seed=1", "resume=auto"), run)
    with pytest.raises(UserError, match=r"finished and evaluated on another split than eval.split=val"):
        train_script.train(make_cfg("strategy=none", "eval.split=val", "resume=auto"), run)


def log_then_die(trainer) -> None:
    """Trainer.fit of an attempt killed at step 1, before its first checkpoint, with that step logged."""
    trainer.logger.log(1, "train", {"loss": 9.0})
    raise KeyboardInterrupt


def test_auto_starts_afresh_after_an_attempt_that_died_before_its_first_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from epi.trainer import Trainer

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "fit", log_then_die)
        with pytest.raises(KeyboardInterrupt):
            train_script.train(make_cfg("strategy=none"), run)
    assert (run / "config.yaml").is_file() and not (run / checkpoint.FILENAME).exists()
    (run / "error.txt").write_text("error: an earlier attempt\n")
    with pytest.raises(UserError, match=r"holds a run with no checkpoint trained with different \['strategy'\]"):
        train_script.train(make_cfg("strategy=epi", "resume=auto"), run)
    train_script.train(make_cfg("strategy=none", "resume=auto"), run)
    losses = [(step, value) for step, metric, value in train_events(run) if metric == "loss"]
    assert [step for step, _ in losses] == list(range(1, 7)) and 9.0 not in [value for _, value in losses]
    assert not (run / "error.txt").exists()  # the earlier attempt's failure went with its events


def test_a_resume_value_that_is_not_a_path_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^resume=5: must be a run directory \(or its checkpoint.pt\), or auto$"):
        train_script.train(make_cfg("resume=5"), tmp_path / "run")


def test_the_wandb_id_is_kept_in_the_run_directory_and_follows_a_resume_elsewhere(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    first = wandb_id(old)
    assert wandb_id(old) == first and len(first) == 8 and first.isalnum()
    assert wandb_id(new) != first  # another directory, another run
    (new / WANDB_ID).unlink()
    carry_wandb_id(old, new)
    assert wandb_id(new) == first

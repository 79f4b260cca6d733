"""Nothing a run reads can run code: a crafted sharded checkpoint (DCP's `.metadata` and `.distcp` files) is refused
without importing or running anything in it, and a model directory that ships Python code (`auto_map`) is refused
unless model.trust_remote_code=true, whatever is typed at transformers' prompt."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from epi import checkpoint
from epi.errors import UserError
from epi.trainer import Trainer
from tests.helpers import ROOT, TINY, TINY_MODEL, make_cfg, run_script

REFUSED = "asks to construct or run Python objects (posix.system), not only tensors and plain values; it was refused and nothing in it was run."


class RunsCode:
    """Pickles as a call of `os.system("touch <marker>")`: what a crafted checkpoint file holds."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def craft_metadata(directory: Path, marker: Path) -> Path:
    """Replaces a DCP checkpoint's `.metadata` with a pickle that runs code when loaded."""
    path = directory / ".metadata"
    path.write_bytes(pickle.dumps(RunsCode(marker)))
    return path


def craft_item(directory: Path, fqn: str, marker: Path) -> Path:
    """Points the stored item `fqn` of a DCP checkpoint at a `torch.save`d pickle that runs code, appended to the
    item's own .distcp file (the `.metadata` stays a genuine one: an attacker controls the whole directory).
    Returns that .distcp file."""
    meta = directory / ".metadata"
    metadata = pickle.loads(meta.read_bytes())  # the checkpoint this test just wrote
    index, stored = next((i, s) for i, s in metadata.storage_data.items() if i.fqn == fqn)
    payload = io.BytesIO()
    torch.save(RunsCode(marker), payload)
    data = directory / stored.relative_path
    offset = data.stat().st_size
    with data.open("ab") as f:
        f.write(payload.getvalue())
    metadata.storage_data[index] = dataclasses.replace(stored, offset=offset, length=len(payload.getvalue()))
    meta.write_bytes(pickle.dumps(metadata))
    return data


def _saved(tmp_path: Path) -> tuple[Path, dict]:
    """A one-process DCP checkpoint with tensor and non-tensor ("bytes") items, as an optimizer state has."""
    import torch.distributed.checkpoint as dcp

    state = {"w": torch.arange(6.0).reshape(2, 3), "opt": {"step": torch.tensor(3.0), "lr": 0.1, "betas": (0.9, 0.99),
                                                          "params": ["a", "b"], "foreach": None}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is ... uninitialized, assuming ... a single process"
        dcp.save(state, checkpoint_id=str(tmp_path / "dcp"))
    return tmp_path / "dcp", state


def _blank() -> dict:
    return {"w": torch.zeros(2, 3), "opt": {"step": torch.tensor(0.0), "lr": 0.0, "betas": (0.0, 0.0), "params": [], "foreach": False}}


def _load(directory: Path) -> dict:
    from epi import safe_pickle

    tensors = _blank()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        safe_pickle.load(tensors, directory, "shard file")
    return tensors


def test_a_genuine_dcp_checkpoint_loads_through_the_restricted_reader(tmp_path: Path) -> None:
    """Every record DCP writes into .metadata is allowed: it reads back equal to `pickle.load`'s, and every item
    (tensors, and the floats, tuples, lists and None an optimizer stores as bytes) round-trips."""
    from epi import safe_pickle

    directory, state = _saved(tmp_path)
    with (directory / ".metadata").open("rb") as f:
        assert safe_pickle.read_metadata(f, directory / ".metadata", "shard file") == pickle.loads((directory / ".metadata").read_bytes())
    loaded = _load(directory)
    assert torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["opt"]["step"], state["opt"]["step"])
    assert {k: v for k, v in loaded["opt"].items() if k != "step"} == {k: v for k, v in state["opt"].items() if k != "step"}


def test_crafted_dcp_metadata_is_refused_and_never_runs(tmp_path: Path) -> None:
    directory, _ = _saved(tmp_path)
    marker = tmp_path / "ran"
    path = craft_metadata(directory, marker)
    with pytest.raises(UserError) as err:
        _load(directory)
    assert str(err.value) == f"shard file {path} {REFUSED} Use files written by this tool."
    assert not marker.exists()


def test_dcp_metadata_naming_any_other_module_is_refused_before_importing_it(tmp_path: Path, monkeypatch) -> None:
    """Importing a module runs its top level: the allow-list is checked on the name, before any import."""
    directory, _ = _saved(tmp_path)
    marker = tmp_path / "imported"
    (tmp_path / "plants_code.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Record:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (directory / ".metadata").write_bytes(b"cplants_code\nRecord\n)\x81.")  # protocol 0 GLOBAL, then NEWOBJ
    with pytest.raises(UserError, match=r"asks to construct or run Python objects \(plants_code.Record\)"):
        _load(directory)
    assert not marker.exists() and "plants_code" not in sys.modules


def test_crafted_non_tensor_item_in_a_distcp_file_is_refused_and_never_runs(tmp_path: Path) -> None:
    """DCP's DefaultLoadPlanner reads the non-tensor items with torch.load(weights_only=False): one of them could run
    anything. Here it is read as tensors and plain values only, and the refusal names the .distcp file."""
    directory, _ = _saved(tmp_path)
    marker = tmp_path / "ran"
    data = craft_item(directory, "opt.lr", marker)
    with pytest.raises(UserError) as err:
        _load(directory)
    assert str(err.value) == f"shard file {data} {REFUSED} Use files written by this tool."
    assert not marker.exists()


def test_crafted_tensor_item_in_a_distcp_file_is_one_line(tmp_path: Path) -> None:
    """Tensor items DCP reads with weights_only=True itself; a refusal there is the same one line, naming the directory."""
    directory, _ = _saved(tmp_path)
    marker = tmp_path / "ran"
    craft_item(directory, "w", marker)
    with pytest.raises(UserError) as err:
        _load(directory)
    assert str(err.value) == f"shard file in {directory} {REFUSED} Use files written by this tool."
    assert not marker.exists()


# --- model directories with their own code (auto_map) ----------------------------------------------------------

def code_model_dir(tmp_path: Path, marker: Path) -> Path:
    """A model directory whose config.json names its own classes (`auto_map`, a model_type transformers does not
    know), and whose configuration_evil.py creates `marker` when imported."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "evil",
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"},
    }))
    code = (f"open({str(marker)!r}, 'w').close()\n"
            "from transformers import PretrainedConfig\n\n\nclass EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    (model / "configuration_evil.py").write_text(code)
    (model / "modeling_evil.py").write_text(code)
    return model


def train(tmp_path: Path, *overrides: str, stdin: str) -> subprocess.CompletedProcess:
    """train.py as a user runs it, answering `stdin` to any prompt; transformers' copies of a model's code go to tmp_path."""
    args = [*(o for o in TINY if o not in TINY_MODEL), "strategy=none"]
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args, "model=hf", *overrides, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, input=stdin, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")},
    )


@pytest.mark.slow
def test_model_dir_with_its_own_code_is_refused_even_when_the_prompt_is_answered_yes(tmp_path: Path) -> None:
    """Without model.trust_remote_code, transformers asked `Do you wish to run the custom code? [y/N]` and `y` ran
    configuration_evil.py; now the directory is refused in one line before transformers reads it."""
    marker = tmp_path / "ran"
    model = code_model_dir(tmp_path, marker)
    proc = train(tmp_path, f"model.name_or_path={model}", stdin="y\n")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert not marker.exists()
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [proc.stderr.strip().splitlines()[-1]] == [
        f"error: model.name_or_path='{model}': {model} ships its own Python code (configuration_evil.py, modeling_evil.py, "
        f"named by auto_map in {model / 'config.json'}); it was not run. model.trust_remote_code=true would run those "
        "files with your permissions when the model loads: set it only for a model you trust."
    ]


def test_tokenizer_code_is_refused_too(tmp_path: Path) -> None:
    """tokenizer_config.json's auto_map (a [slow, fast] pair) names code as config.json's does."""
    from epi.models import build_model

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (model / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    with pytest.raises(UserError, match=r"ships its own Python code \(tokenization_evil.py, named by auto_map in .*tokenizer_config.json\)"):
        build_model(make_cfg("model=hf", f"model.name_or_path={model}").model)


@pytest.mark.slow
def test_trust_remote_code_true_is_the_users_choice_and_needs_no_prompt(tmp_path: Path) -> None:
    """model.trust_remote_code=true reaches transformers: the directory's code runs with nothing typed at a prompt
    (before, transformers asked, and an empty answer refused it)."""
    marker = tmp_path / "ran"
    model = code_model_dir(tmp_path, marker)
    proc = train(tmp_path, f"model.name_or_path={model}", "model.trust_remote_code=true", stdin="")
    assert marker.exists(), proc.stderr[-3000:]
    assert "ships its own Python code" not in proc.stderr and "Do you wish to run the custom code" not in proc.stdout


@pytest.mark.slow
def test_a_checkpoint_whose_pickle_would_run_code_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    shared = tmp_path / "shared"
    shared.mkdir()
    torch.save({key: RunsCode(marker) if key == "config" else {} for key in checkpoint.REQUIRED}, shared / checkpoint.FILENAME)
    proc = run_script("train.py", *TINY, f"resume={shared}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "posix.system" in line and "refused and nothing in it was run" in line
    assert not marker.exists()


def test_a_real_checkpoint_loads_with_the_safe_loader(tmp_path: Path) -> None:
    Trainer(make_cfg("strategy=epi", "strategy.warmup=2", "strategy.refresh_every=2"), tmp_path).fit()
    state = torch.load(tmp_path / checkpoint.FILENAME, weights_only=True)
    assert state["step"] == 6 and state["strategy"]["refreshes"] == 3


def test_a_crafted_probe_cache_file_is_refused(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cpi = ["strategy=cpi", "strategy.probe_steps=1", f"strategy.cache_dir={cache}"]
    (tmp_path / "a").mkdir()
    Trainer(make_cfg(*cpi), tmp_path / "a")
    marker = tmp_path / "code_ran"
    probe = sorted(cache.glob("*.pt"))[0]
    torch.save(RunsCode(marker), probe)
    (tmp_path / "b").mkdir()
    with pytest.raises(UserError, match=r"cached probe .* refused and nothing in it was run"):
        Trainer(make_cfg(*cpi), tmp_path / "b")
    assert not marker.exists()


def test_config_saved_in_a_checkpoint_is_plain_data(tmp_path: Path) -> None:
    Trainer(make_cfg("strategy=none"), tmp_path).fit()
    saved = checkpoint.load(str(tmp_path))["config"]
    assert json.loads(json.dumps(saved)) == saved and OmegaConf.create(saved).schedule.steps == 6

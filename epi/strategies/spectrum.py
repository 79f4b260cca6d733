"""`strategy=spectrum`: Spectrum, train the layers with the highest signal-to-noise ratio (Hartford et al. 2024, arXiv 2406.06623).

Before training, every weight matrix gets a signal-to-noise ratio from its singular values; within each module
type (self_attn.q_proj, mlp.down_proj, input_layernorm, ...) the layers are ranked by it and the top
`top_fraction` of them train, with the modules in `always_train`; everything else is frozen for the whole run.
A static, module-granular isolation chosen from the pretrained weights alone, without any data.

The rule is read from the upstream scanner, cognitivecomputations/spectrum `spectrum.py` (`ModelModifier`, commit
0ed1756, its SNR code as of e064db4, 2025-04-07), and axolotl's plugin (axolotl-ai-cloud/axolotl
`src/axolotl/integrations/spectrum/__init__.py::_generate_unfrozen_params_yaml`, `args.py`):

- SNR of a weight W (n x m; a 1-D weight is read as a 1 x d matrix): S = svdvals(W), descending;
  sigma = IQR(S) / 1.349 (torch.quantile, linear interpolation; the IQR of a normal is 1.349 sigma);
  the Marchenko–Pastur edge tau = sigma * (1 + sqrt(beta)), beta = min(n, m) / max(n, m) (written upstream as
  sigma * sqrt((1 + sqrt(beta))^2)); signal = sum of S > tau, noise = sum of S <= tau (1.0 when no singular
  value is at or below tau); SNR = (signal / noise) / S[0]. The last division by the largest singular value is
  upstream's normalisation: it makes the score depend on the matrix's scale (snr(c W) = snr(W) / c).
  Before e064db4 an empty noise set gave an infinite SNR instead of signal / 1.0; the pre-scanned JSONs
  upstream and axolotl ship were made by either version (SmolLM-135M's norms are `inf` there). It only
  matters when every singular value is above tau: 1-D weights (all ranked equal either way) or matrices with a
  flat spectrum.
- Module type: the module's name after its first all-digit component (model.layers.3.mlp.up_proj ->
  mlp.up_proj), or the whole name when it has none (model.embed_tokens, model.norm, lm_head): such a type has
  one member, and floor(1 * top_fraction) = 0 of it is chosen by rank.
- Per type: sorted by SNR, highest first, stably (ties keep model order); the first floor(count * top_fraction)
  train. A chosen module trains all its parameters (weight and bias).
- axolotl (and the scanner's YAML) always unfreeze `lm_head.weight` and `model.embed_tokens.weight` besides
  the ranked modules: `always_train` (a name absent from the model, e.g. lm_head when tied to the embeddings, is
  skipped with a note).
- Which types are scanned is a checklist upstream (all ticked by default; its README: "we typically only select
  the MLP/attn layers"): `module_types`, null for every type with a weight.

Compute: the scan is one SVD per weight, no forward or backward pass and no training tokens, so nothing is
charged to the run's equal-compute budget (`Context.charge` counts optimizer steps and trained tokens); its wall
time is logged as `mask/scan_seconds` and the SNRs are kept in the artifact `spectrum/snr.json`.

Deviations: SVDs run in float32 on the parameter's own device (upstream loads the model in float32 with
`device_map="auto"`), so near-ties may rank differently on another device; types are matched exactly
(upstream: a substring of the module name, the same for Llama-style names); a weight of more than two
dimensions is read as (shape[0], rest) (upstream would fail and record NaN); a NaN SNR ranks last
(upstream's sort leaves it undefined).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from torch import Tensor

from epi.errors import UserError
from epi.masks import under
from epi.schema import Schema, within
from epi.strategies.base import Context, Stage, Strategy, freeze_whole

IQR_PER_SIGMA = 1.349  # the interquartile range of a standard normal distribution


@dataclass
class SpectrumConfig(Schema):
    """Spectrum's keys; defaults: conf/strategy/spectrum.yaml (axolotl's and the scanner's)."""

    top_fraction: Annotated[float, within(0, 1, open_low=True, why="the fraction of each module type's layers that train")]
    module_types: list[str] | None
    always_train: list[str]


@torch.no_grad()
def snr(weight: Tensor) -> float:
    """The upstream scanner's signal-to-noise ratio of one weight: (sum of the singular values above the
    Marchenko–Pastur edge / sum of those at or below it) / the largest singular value (module docstring)."""
    w = weight.detach().float()
    if w.ndim < 2:
        w = w.unsqueeze(0)
    elif w.ndim > 2:
        w = w.reshape(w.shape[0], -1)
    s = torch.linalg.svdvals(w)
    sigma = (torch.quantile(s, 0.75) - torch.quantile(s, 0.25)) / IQR_PER_SIGMA
    n, m = w.shape
    beta = min(n, m) / max(n, m)
    threshold = sigma * (1 + math.sqrt(beta))
    signal_mask = s > threshold
    signal = s[signal_mask].sum() if signal_mask.any() else s.new_tensor(0.0)
    noise = s[~signal_mask].sum() if (~signal_mask).any() else s.new_tensor(1.0)
    ratio = signal / noise if noise != 0 else s.new_tensor(math.inf)
    return float(ratio / s[0])


_INDEX = re.compile(r"^\d+$")


def module_type(module: str) -> str:
    """The scanner's type of a module: its name after the first all-digit component, or the whole name."""
    parts = module.split(".")
    index = next((i for i, part in enumerate(parts) if _INDEX.match(part)), None)
    return ".".join(parts[index + 1:]) if index is not None else module


def top_by_type(scores: dict[str, float], types: dict[str, str], fraction: float) -> dict[str, list[str]]:
    """Per type, the first floor(count * fraction) modules by SNR, highest first; ties keep the given (model) order,
    NaN ranks last."""
    by_type: dict[str, list[str]] = {}
    for module in scores:
        by_type.setdefault(types[module], []).append(module)

    def rank(module: str) -> float:
        return -math.inf if math.isnan(scores[module]) else scores[module]

    return {t: sorted(members, key=rank, reverse=True)[: int(len(members) * fraction)] for t, members in by_type.items()}


class Spectrum(Strategy):
    """Spectrum: per module type, the top fraction of layers by weight SNR train, all else frozen (Hartford et al. 2024, arXiv 2406.06623)."""

    name = "spectrum"  # the registry name: conf/strategy/spectrum.yaml
    Config = SpectrumConfig

    def __init__(self, cfg: SpectrumConfig):
        super().__init__(cfg)
        self.scores: dict[str, float] = {}  # module -> SNR, of the weights at prepare (the pretrained model)
        self.trainable: list[str] = []  # the parameters that train, in model order

    def prepare(self, ctx: Context, stages: list[Stage]) -> list[Stage]:
        super().prepare(ctx, stages)
        tic = time.perf_counter()
        types = self.scan(ctx)
        seconds = time.perf_counter() - tic
        chosen = top_by_type(self.scores, types, self.cfg.top_fraction)
        names = list(ctx.named_params)
        modules = [m for members in chosen.values() for m in members] + self.present(self.cfg.always_train, names)
        train = {n for n in names if any(under(n, m) for m in modules)}
        self.trainable = [n for n in names if n in train]
        frozen = freeze_whole(ctx, [n for n in names if n not in train])["isolated_fraction"]
        ctx.log(0, "mask", {"isolated_fraction": frozen, "trainable_tensors": len(self.trainable),
                            "scanned_matrices": len(self.scores), "scan_seconds": seconds})
        ctx.artifact("spectrum/snr", {m: {"snr": s, "type": types[m], "trainable": m in modules} for m, s in self.scores.items()})
        ctx.info(f"spectrum: {len(self.scores)} weights scanned in {seconds:.1f}s; top {self.cfg.top_fraction:g} per type "
                 f"and {', '.join(self.cfg.always_train) or 'nothing'} train: {len(self.trainable)} tensors, "
                 f"{frozen:.2%} of the parameters frozen")
        return stages

    def scan(self, ctx: Context) -> dict[str, str]:
        """The SNR of every module with a weight whose type is scanned (into `self.scores`); returns module -> type."""
        weights = {n.removesuffix(".weight"): p for n, p in ctx.named_params.items() if n.endswith(".weight")}
        types = {module: module_type(module) for module in weights}
        wanted = self.cfg.module_types
        if wanted is not None:
            unknown = sorted(set(wanted) - set(types.values()))
            if unknown:
                raise UserError(f"strategy.module_types: {unknown} are not module types of this model; its types: "
                                f"{sorted(set(types.values()))}")
            types = {m: t for m, t in types.items() if t in wanted}
        self.scores = {module: snr(weights[module]) for module in types}
        return types

    def present(self, modules: list[str], names: list[str]) -> list[str]:
        """The modules of `always_train` that hold parameters here; the others are named in a note (a head tied to
        the embeddings has no parameter of its own)."""
        missing = [m for m in modules if not any(under(n, m) for n in names)]
        if missing:
            self.ctx.info(f"spectrum: always_train {missing}: no such parameter in this model, skipped")
        return [m for m in modules if m not in missing]

    def state_dict(self) -> dict[str, Any]:
        """The scan's result: the engine restores the masks, this keeps what they came from."""
        return {"scores": self.scores, "trainable": self.trainable}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scores = state["scores"]
        self.trainable = state["trainable"]

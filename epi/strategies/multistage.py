"""`strategy=multistage`: the papers' multi-stage SFT baseline.

CPI-FT's stages (same probes, groups, order and per-stage data) without its two interventions:
no fusion (training starts from theta0) and no freezing (every parameter moves in every stage).
"""

from epi.strategies.cpi import CPI


class MultiStage(CPI):
    fuse_models = False
    freeze_cores = False

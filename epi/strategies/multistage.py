"""`strategy=multistage`: the papers' multi-stage SFT baseline.

CPI-FT's stages (same probes, groups and order) without its interventions: no fusion (training
starts from theta0), no freezing (every parameter moves in every stage), and each stage trains on
its group's tasks alone (`stage_data: group` in conf/strategy/multistage.yaml).
"""

from epi.strategies.cpi import CPI


class MultiStage(CPI):
    """CPI-FT's probes, groups and order as stages, with no fusion and no freezing: the multi-stage SFT baseline."""

    name = "multistage"  # the registry name: conf/strategy/multistage.yaml
    fuse_models = False
    freeze_cores = False

"""The simulated JUMP-shaped world: known causal structure (C->T, C->O, C->P, C x T, T->P) and Cell-Painting-like
rendering. Pure compute; the Ray stage that writes it to a lake is :mod:`pipelines.simulate`.

- :mod:`.config`: :class:`SimulationConfig`, presets ``tiny``/``demo``/``benchmark``, scenarios.
- :mod:`.library`: the packaged JUMP compound subset, MoA by chemical structure, multi-label targets.
- :mod:`.world`: :func:`build_world` -> :class:`World` (truth, confounders, plate maps).
- :mod:`.render`: :func:`render_site` (pixels from a phenotype and optics), false-colour previews.
- :mod:`.oracle`: :func:`render_condition` (any compound under any confounders: the simulator as a perfect
  generator), :func:`render_world_site` (a site of the lake, through render_condition).
- :mod:`.layout`: cpg0016 file and plate naming.
"""
from cpldm_core.simulate.config import PRESETS, SCENARIOS, SimulationConfig, simulation_config
from cpldm_core.simulate.oracle import render_condition, render_world_site
from cpldm_core.simulate.render import false_colour, render_site
from cpldm_core.simulate.world import PHENOTYPES, TRUTH_COLUMNS, World, build_world, world_from_config_dict

__all__ = [
    "PRESETS", "SCENARIOS", "SimulationConfig", "simulation_config", "build_world", "World", "PHENOTYPES",
    "TRUTH_COLUMNS", "render_site", "render_world_site", "render_condition", "world_from_config_dict",
    "false_colour",
]

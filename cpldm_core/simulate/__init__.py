"""The simulated JUMP-shaped world: known causal structure (C->T, C->O, C->P, T->P) and Cell-Painting-like
rendering. Pure compute; the Ray stage that writes it to a lake is :mod:`pipelines.simulate`.

- :mod:`.config`: :class:`SimulationConfig`, presets ``tiny``/``demo``/``benchmark``, scenarios.
- :mod:`.library`: the packaged JUMP compound subset, MoA by chemical structure, multi-label targets.
- :mod:`.world`: :func:`build_world` -> :class:`World` (truth, confounders, plate maps).
- :mod:`.render`: :func:`render_site`, :func:`render_world_site`, false-colour previews.
- :mod:`.layout`: cpg0016 file and plate naming.
"""
from cpldm_core.simulate.config import PRESETS, SCENARIOS, SimulationConfig, simulation_config
from cpldm_core.simulate.render import false_colour, render_site, render_world_site
from cpldm_core.simulate.world import PHENOTYPES, TRUTH_COLUMNS, World, build_world

__all__ = [
    "PRESETS", "SCENARIOS", "SimulationConfig", "simulation_config", "build_world", "World", "PHENOTYPES",
    "TRUTH_COLUMNS", "render_site", "render_world_site", "false_colour",
]

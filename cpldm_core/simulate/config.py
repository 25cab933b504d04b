"""Configuration of the simulated JUMP-shaped world: sizes, causal edge strengths, rendering.

One frozen dataclass, :class:`SimulationConfig`, with presets (``tiny``, ``demo``, ``benchmark``) and scenarios
(``jump``: the default, cpg0016-like plates and confounding that per-plate DMSO normalisation and Harmony cannot
remove; ``unconfounded``: every confounding edge off; ``no-effect``: no T->P). Build one with
:func:`simulation_config` (preset + scenario + YAML file + ``key=value`` overrides).

Causal edges (each a strength >= 0; 0 means the edge is absent, 1 is the JUMP-like default):

- ``c_to_t``: confounders -> treatment, MoA skew. Which source screens a compound, and the compound order of
  a plate map, follow its MoA. 0 in ``jump`` (cpg0016 assigns compounds to sources independently of MoA);
  ``moa-skewed`` sets 1.
- ``c_to_o``: confounders -> observation. Per-source channel gain, blur, background and read noise; per-batch
  illumination field and intensity drift; plate-edge dimming.
- ``c_to_p``: confounders -> phenotype. Cell density and cell size differ by source (and a little by batch);
  outer-ring wells hold fewer cells.
- ``c_x_t``: effect modification C x T. Each source has its own response matrix that maps a compound's
  phenotype shift to the shift its cells show (which dimensions move and how much), so a compound's response
  *pattern* depends on where it was screened.
- ``plate_gradient``: smooth within-plate gradients over rows and columns per (source, batch): per-channel
  intensity (C->O) and cell density (C->P). A plate's DMSO wells sit at fixed positions and give one median,
  so per-plate normalisation leaves each well its own offset.
- ``c_to_p_x_t``: C->P interacting with T. The treatment effect scales with local cell density
  (``density ** -c_to_p_x_t``: sparse cells respond more), density being set by source, batch, plate edge
  and gradient.
- ``t_to_p``: treatment -> phenotype. MoA effect + target effects + compound-specific deviation.

Allocation (cpg0016 compound plates): most compounds are screened in one source only; a shared set
(``shared_fraction``, like JUMP-Target) in every source. Each source runs ``layouts_per_source`` plate maps,
each on ``replicates`` (or more) plates spread over its batches, so a compound keeps its well on every replicate
plate and each (batch, well) pair holds a compound from every plate map the batch runs.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cpldm_core.configuration import load_config
from cpldm_core.errors import UserError

#: JUMP plate formats: wells -> (rows, columns). cpg0016 compound plates are 384-well (16 x 24).
PLATE_FORMATS = {96: (8, 12), 384: (16, 24), 1536: (32, 48)}


@dataclass(frozen=True)
class SimulationConfig:
    """Everything that determines the simulated lake; same config + seed -> byte-identical files.

    Attributes:
        preset, scenario: names recorded in ``raw/simulation.json`` (informative only).
        seed: master seed; every plate/well/site draws from a stream derived from it and its own ids.
        n_sources, batches_per_source, plates_per_batch: plate hierarchy (sources ``source_1``...).
        n_moa, compounds_per_moa: treatment compounds (single-label MoA); MoA follows chemical structure.
        targets_per_moa: core targets per MoA; neighbouring MoAs share one of them (multi-label targets).
        replicates: plates per plate map (so wells per compound per source screening it); a source runs
            ``plates_per_source // replicates`` plate maps, spare plates repeat the first maps.
        shared_fraction: fraction of treatment compounds screened in every source (JUMP-Target-like), at
            the same wells in every source; the others are screened in one source only.
        plate_format: 96, 384 or 1536 wells (names A01...).
        wells_per_plate: wells used per plate (DMSO + treatments), spread over rows and columns.
        dmso_wells_per_plate: DMSO negative-control wells, at the same fixed positions on every plate.
        sites_per_well: fields imaged per well (``f01``...; ``Metadata_Site`` is 1-based as in source_4).
        image_size: square field size in pixels (real JUMP fields: 1080).
        cell_diameter_px: typical cell diameter in pixels at density 1 (sets the magnification).
        cells_per_site: expected cells in a field at density 1 (DMSO, no confounding).
        photons_per_unit: photon count of intensity 1.0 (sets the Poisson shot-noise level).
        c_to_t, c_to_o, c_to_p, c_x_t, plate_gradient, c_to_p_x_t, t_to_p: causal edge strengths
            (0 = edge absent; see the module docstring).
        compound_deviation: SD of the compound-specific phenotype deviation from its MoA effect, relative
            to the MoA effect scale (1.0).
        cell_variability: SD of per-cell phenotype noise (standard units).
        num_cpus_per_task: Ray CPUs per plate task.
        max_concurrency: at most this many plate tasks in flight (0 = no limit).
        tiff_compression: ``zlib`` (deflate; lossless, deterministic) or ``none``.
    """

    preset: str = "demo"
    scenario: str = "jump"
    seed: int = 0
    n_sources: int = 3
    batches_per_source: int = 2
    plates_per_batch: int = 8
    n_moa: int = 8
    compounds_per_moa: int = 11
    targets_per_moa: int = 2
    replicates: int = 2
    shared_fraction: float = 0.18
    plate_format: int = 384
    wells_per_plate: int = 9
    dmso_wells_per_plate: int = 4
    sites_per_well: int = 2
    image_size: int = 160
    cell_diameter_px: float = 30.0
    cells_per_site: float = 22.0
    photons_per_unit: float = 400.0
    c_to_t: float = 0.0
    c_to_o: float = 1.0
    c_to_p: float = 1.0
    c_x_t: float = 1.0
    plate_gradient: float = 1.0
    c_to_p_x_t: float = 1.0
    t_to_p: float = 1.0
    compound_deviation: float = 0.35
    cell_variability: float = 0.15
    num_cpus_per_task: float = 1.0
    max_concurrency: int = 0
    tiff_compression: Literal["zlib", "none"] = "zlib"

    def __post_init__(self):
        checks = {
            "n_sources": self.n_sources >= 1, "batches_per_source": self.batches_per_source >= 1,
            "plates_per_batch": self.plates_per_batch >= 1, "n_moa": self.n_moa >= 1,
            "compounds_per_moa": self.compounds_per_moa >= 1, "replicates": self.replicates >= 1,
            "targets_per_moa": self.targets_per_moa >= 1, "sites_per_well": 1 <= self.sites_per_well <= 99,
            "image_size": self.image_size >= 32, "cell_diameter_px": self.cell_diameter_px > 4,
            "cells_per_site": self.cells_per_site > 0, "photons_per_unit": self.photons_per_unit > 0,
            "num_cpus_per_task": self.num_cpus_per_task > 0, "max_concurrency": self.max_concurrency >= 0,
            "shared_fraction": 0.0 <= self.shared_fraction <= 1.0,
        }
        for edge in (*EDGE_KEYS, "compound_deviation", "cell_variability"):
            checks[edge] = getattr(self, edge) >= 0
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid value for {', '.join(bad)}")
        if self.plate_format not in PLATE_FORMATS:
            raise ValueError(f"plate_format must be one of {sorted(PLATE_FORMATS)}, got {self.plate_format}")
        if not 0 < self.dmso_wells_per_plate < self.wells_per_plate <= self.plate_format:
            raise ValueError("need 0 < dmso_wells_per_plate < wells_per_plate <= plate_format")
        slots = self.slots_per_source
        demand = self.n_compounds + (self.n_sources - 1) * self.n_shared
        if self.n_shared > slots or demand > self.n_sources * slots:
            raise ValueError(
                f"{self.n_sources} sources x {self.layouts_per_source} plate maps x "
                f"{self.wells_per_plate - self.dmso_wells_per_plate} treatment wells = {self.n_sources * slots} "
                f"slots < {self.n_compounds} compounds + {self.n_sources - 1} x {self.n_shared} shared repeats; "
                "raise wells_per_plate or plates_per_batch, or lower replicates or shared_fraction")

    # ------------------------------------------------------------------ derived sizes
    @property
    def n_compounds(self) -> int:
        return self.n_moa * self.compounds_per_moa

    @property
    def n_shared(self) -> int:
        """Treatment compounds screened in every source: ``shared_fraction`` of them, rounded half up."""
        return int(math.floor(self.shared_fraction * self.n_compounds + 0.5))

    @property
    def n_plates(self) -> int:
        return self.n_sources * self.batches_per_source * self.plates_per_batch

    @property
    def layouts_per_source(self) -> int:
        """Plate maps per source: each runs on ``replicates`` or more of the source's plates."""
        return max(1, self.batches_per_source * self.plates_per_batch // self.replicates)

    @property
    def slots_per_source(self) -> int:
        """Treatment (compound, well) slots of one source's plate maps."""
        return self.layouts_per_source * (self.wells_per_plate - self.dmso_wells_per_plate)

    @property
    def n_sites(self) -> int:
        return self.n_plates * self.wells_per_plate * self.sites_per_well


#: Causal edge strength keys (0 = edge absent).
EDGE_KEYS = ("c_to_t", "c_to_o", "c_to_p", "c_x_t", "plate_gradient", "c_to_p_x_t", "t_to_p")

#: Presets. ``tiny``: CI (seconds). ``demo``: the embedded default (about 15 s of CPU on 2 cores).
#: ``benchmark``: >= 100,000 five-channel sites (5 x 3 x 2 plates x 384 wells x 9 sites = 103,680), only
#: ever generated partially by the benchmarks. Sizes fill every treatment slot (no spare DMSO wells):
#: demo 3 sources x 8 plate maps x 5 wells = 120 = 88 compounds + 2 x 16 shared.
PRESETS: dict[str, SimulationConfig] = {
    "tiny": SimulationConfig(
        preset="tiny", n_sources=2, batches_per_source=2, plates_per_batch=4, n_moa=4, compounds_per_moa=7,
        targets_per_moa=2, replicates=2, shared_fraction=0.15, wells_per_plate=6, dmso_wells_per_plate=2,
        sites_per_well=1, image_size=64, cell_diameter_px=18.0, cells_per_site=12.0),
    "demo": SimulationConfig(preset="demo"),
    "benchmark": SimulationConfig(
        preset="benchmark", n_sources=5, batches_per_source=3, plates_per_batch=2, n_moa=30,
        compounds_per_moa=66, targets_per_moa=3, replicates=3, shared_fraction=0.2, wells_per_plate=384,
        dmso_wells_per_plate=24, sites_per_well=9, image_size=540, cell_diameter_px=40.0, cells_per_site=120.0),
}

_CONFOUNDING = ("c_to_o", "c_to_p", "c_x_t", "plate_gradient", "c_to_p_x_t")
#: Scenarios: overrides of the causal edge strengths applied on top of a preset (whose own values are the
#: ``jump`` world). ``default`` is the old name of ``jump`` (kept so scripts keep working; recorded as
#: ``jump``).
SCENARIOS: dict[str, dict[str, float]] = {
    "jump": {},
    "default": {},
    "unconfounded": {"c_to_t": 0.0, **{k: 0.0 for k in _CONFOUNDING}},
    "no-effect": {"t_to_p": 0.0},
    "strong": {k: 2.0 for k in _CONFOUNDING},
    "moa-skewed": {"c_to_t": 1.0},
}
SCENARIO_ALIASES = {"default": "jump"}


def simulation_config(preset: str = "demo", scenario: str = "jump", seed: int | None = None,
                      path: str | Path | None = None, overrides: list[str] | dict | None = None
                      ) -> SimulationConfig:
    """Preset, then scenario, then ``seed``, then YAML ``path``, then ``key=value`` overrides.

    Raises:
        UserError: unknown preset/scenario, unknown key, wrong type or inconsistent sizes.
    """
    if preset not in PRESETS:
        raise UserError(f"unknown simulation preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if scenario not in SCENARIOS:
        raise UserError(f"unknown simulation scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
    try:
        base = dataclasses.replace(PRESETS[preset], scenario=SCENARIO_ALIASES.get(scenario, scenario),
                                   **SCENARIOS[scenario])
        if seed is not None:
            base = dataclasses.replace(base, seed=int(seed))
    except ValueError as exc:
        raise UserError(f"simulation config: {exc}") from None
    return load_config(SimulationConfig, path, overrides, base=base)

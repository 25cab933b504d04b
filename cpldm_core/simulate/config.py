"""Configuration of the simulated JUMP-shaped world: sizes, causal edge strengths, rendering.

One frozen dataclass, :class:`SimulationConfig`, with presets (``tiny``, ``demo``, ``benchmark``) and scenarios
(``default``: JUMP-like confounding; ``unconfounded``: every confounding edge off). Build one with
:func:`simulation_config` (preset + scenario + YAML file + ``key=value`` overrides).

Causal edges (each a strength >= 0; 0 means the edge is absent, 1 is the JUMP-like default):

- ``c_to_t``: confounders -> treatment. Sources screen different, MoA-skewed compound subsets and plate maps
  order compounds by MoA (not random).
- ``c_to_o``: confounders -> observation. Per-source channel gain, blur, background and read noise; per-batch
  illumination field and intensity drift; plate-edge effects by well row/column.
- ``c_to_p``: confounders -> phenotype. Cell density and cell size differ by source (and a little by batch).
- ``t_to_p``: treatment -> phenotype. MoA effect + target effects + compound-specific deviation.
"""
from __future__ import annotations

import dataclasses
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
        replicates: wells per compound (at least; spare slots give some compounds one more).
        plate_format: 96, 384 or 1536 wells (names A01...).
        wells_per_plate: wells used per plate (DMSO + treatments), spread evenly over the plate.
        dmso_wells_per_plate: DMSO negative-control wells, at the same fixed positions on every plate.
        sites_per_well: fields imaged per well (``f01``...; ``Metadata_Site`` is 1-based as in source_4).
        image_size: square field size in pixels (real JUMP fields: 1080).
        cell_diameter_px: typical cell diameter in pixels at density 1 (sets the magnification).
        cells_per_site: expected cells in a field at density 1 (DMSO, no confounding).
        photons_per_unit: photon count of intensity 1.0 (sets the Poisson shot-noise level).
        c_to_t, c_to_o, c_to_p, t_to_p: causal edge strengths (0 = edge absent).
        compound_deviation: SD of the compound-specific phenotype deviation from its MoA effect, relative
            to the MoA effect scale (1.0).
        cell_variability: SD of per-cell phenotype noise (standard units).
        num_cpus_per_task: Ray CPUs per plate task.
        max_concurrency: at most this many plate tasks in flight (0 = no limit).
        tiff_compression: ``zlib`` (deflate; lossless, deterministic) or ``none``.
    """

    preset: str = "demo"
    scenario: str = "default"
    seed: int = 0
    n_sources: int = 3
    batches_per_source: int = 2
    plates_per_batch: int = 2
    n_moa: int = 8
    compounds_per_moa: int = 10
    targets_per_moa: int = 2
    replicates: int = 3
    plate_format: int = 384
    wells_per_plate: int = 28
    dmso_wells_per_plate: int = 4
    sites_per_well: int = 2
    image_size: int = 160
    cell_diameter_px: float = 30.0
    cells_per_site: float = 22.0
    photons_per_unit: float = 400.0
    c_to_t: float = 1.0
    c_to_o: float = 1.0
    c_to_p: float = 1.0
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
        }
        for edge in ("c_to_t", "c_to_o", "c_to_p", "t_to_p", "compound_deviation", "cell_variability"):
            checks[edge] = getattr(self, edge) >= 0
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid value for {', '.join(bad)}")
        if self.plate_format not in PLATE_FORMATS:
            raise ValueError(f"plate_format must be one of {sorted(PLATE_FORMATS)}, got {self.plate_format}")
        if not 0 < self.dmso_wells_per_plate < self.wells_per_plate <= self.plate_format:
            raise ValueError("need 0 < dmso_wells_per_plate < wells_per_plate <= plate_format")
        if self.trt_slots < self.n_compounds * self.replicates:
            raise ValueError(
                f"{self.n_plates} plates x {self.wells_per_plate - self.dmso_wells_per_plate} treatment wells = "
                f"{self.trt_slots} slots < {self.n_compounds} compounds x {self.replicates} replicates; "
                "raise wells_per_plate or the number of plates")

    # ------------------------------------------------------------------ derived sizes
    @property
    def n_compounds(self) -> int:
        return self.n_moa * self.compounds_per_moa

    @property
    def n_plates(self) -> int:
        return self.n_sources * self.batches_per_source * self.plates_per_batch

    @property
    def trt_slots(self) -> int:
        return self.n_plates * (self.wells_per_plate - self.dmso_wells_per_plate)

    @property
    def n_sites(self) -> int:
        return self.n_plates * self.wells_per_plate * self.sites_per_well


#: Presets. ``tiny``: CI (seconds). ``demo``: the embedded default (about a minute on 2 cores).
#: ``benchmark``: >= 100,000 five-channel sites (5 x 3 x 2 plates x 384 wells x 9 sites = 103,680), only
#: ever generated partially by the benchmarks.
PRESETS: dict[str, SimulationConfig] = {
    "tiny": SimulationConfig(
        preset="tiny", n_sources=2, batches_per_source=2, plates_per_batch=2, n_moa=4, compounds_per_moa=6,
        targets_per_moa=2, replicates=2, wells_per_plate=8, dmso_wells_per_plate=2, sites_per_well=1,
        image_size=64, cell_diameter_px=18.0, cells_per_site=12.0),
    "demo": SimulationConfig(preset="demo"),
    "benchmark": SimulationConfig(
        preset="benchmark", n_sources=5, batches_per_source=3, plates_per_batch=2, n_moa=30,
        compounds_per_moa=60, targets_per_moa=3, replicates=5, wells_per_plate=384, dmso_wells_per_plate=24,
        sites_per_well=9, image_size=540, cell_diameter_px=40.0, cells_per_site=120.0),
}

#: Scenarios: overrides of the causal edge strengths applied on top of a preset.
SCENARIOS: dict[str, dict[str, float]] = {
    "default": {},
    "unconfounded": {"c_to_t": 0.0, "c_to_o": 0.0, "c_to_p": 0.0},
    "no-effect": {"t_to_p": 0.0},
    "strong": {"c_to_t": 2.0, "c_to_o": 2.0, "c_to_p": 2.0},
}


def simulation_config(preset: str = "demo", scenario: str = "default", seed: int | None = None,
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
        base = dataclasses.replace(PRESETS[preset], scenario=scenario, **SCENARIOS[scenario])
        if seed is not None:
            base = dataclasses.replace(base, seed=int(seed))
    except ValueError as exc:
        raise UserError(f"simulation config: {exc}") from None
    return load_config(SimulationConfig, path, overrides, base=base)

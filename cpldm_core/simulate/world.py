"""The simulated world's causal parameters and its plate maps (pure; no rendering, no I/O).

:func:`build_world` turns a :class:`SimulationConfig` into a :class:`World`: the compounds with their MoA and
targets, each compound's true phenotype shift (T->P), each source's and batch's confounder effects (C->O,
C->P), and the allocation of compounds to sources, plates and wells (C->T). Rendering
(:mod:`cpldm_core.simulate.render`) only reads a World, so the ground truth written to the lake is exactly what
made the images.

Phenotype dimensions (:data:`PHENOTYPES`) are in standard units: 1.0 is a typical MoA effect. How one unit
changes a cell is set by :data:`PHENOTYPE_GAIN` (log-scale multipliers of the rendering parameters).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cpldm_core.simulate import layout
from cpldm_core.simulate.config import PLATE_FORMATS, SimulationConfig
from cpldm_core.simulate.library import (assign_moas, assign_targets, dmso_row, library_candidates,
                                         load_library, moa_names, target_pool)
from storage_schemas.columns import CHANNELS, DMSO_JCP2022

#: Named phenotype dimensions; ground truth columns are ``Truth_<name>``.
PHENOTYPES = (
    "NucleusArea", "NucleusIntensity", "NucleusTexture", "CellArea", "CellElongation",
    "ERIntensity", "ERTexture", "MitoIntensity", "MitoGranularity", "AGPIntensity", "AGPMembrane",
    "RNAIntensity", "Nucleoli", "CellCount",
)
TRUTH_COLUMNS = tuple(f"Truth_{p}" for p in PHENOTYPES)

#: Log-multiplier per standard unit: ``param = base * exp(gain * z)``. E.g. +1 unit of NucleusArea makes
#: nuclei exp(0.25) = 1.28x larger in area; +1 CellCount gives exp(0.3) = 1.35x more cells.
PHENOTYPE_GAIN = {
    "NucleusArea": 0.25, "NucleusIntensity": 0.2, "NucleusTexture": 0.4, "CellArea": 0.25,
    "CellElongation": 0.35, "ERIntensity": 0.25, "ERTexture": 0.4, "MitoIntensity": 0.25,
    "MitoGranularity": 0.4, "AGPIntensity": 0.25, "AGPMembrane": 0.4, "RNAIntensity": 0.25,
    "Nucleoli": 0.4, "CellCount": 0.3,
}

#: Dimensions each MoA shifts strongly, and the range of those shifts (standard units).
MOA_ACTIVE_DIMS = 3
MOA_EFFECT_RANGE = (1.0, 2.0)
#: Dense background of every MoA effect (SD, standard units).
MOA_EFFECT_DENSE_SD = 0.2
#: Weight of a compound's targets' effects relative to its MoA effect.
TARGET_EFFECT_WEIGHT = 0.5

#: Confounder effect sizes at strength 1 (SDs of log-multipliers unless stated): JUMP sources differ
#: visibly in brightness per channel, focus, background and cell density (cpg0016 cell-count estimates per
#: source differ by ~2x).
SOURCE_GAIN_SD = 0.3
SOURCE_BLUR_RANGE = (0.0, 1.2)            # extra Gaussian blur SD, in units of cell_diameter_px / 30
SOURCE_BACKGROUND_RANGE = (0.0, 0.08)     # additive background, intensity units
SOURCE_READ_NOISE_RANGE = (0.0, 0.015)    # Gaussian read noise SD, intensity units
SOURCE_DENSITY_SD = 0.3
SOURCE_CELL_SIZE_SD = 0.12
BATCH_DRIFT_SD = 0.12
BATCH_DENSITY_SD = 0.1
BATCH_ILLUM_RANGE = (0.1, 0.35)           # vignetting depth at the field corner
BATCH_ILLUM_CENTRE = 0.25                 # max offset of the illumination centre, fraction of field
EDGE_INTENSITY = -0.10                    # log-multiplier of intensity in outer-ring wells
EDGE_DENSITY = -0.20                      # log-multiplier of cell count in outer-ring wells (evaporation)
#: Baseline optics present even with every confounding edge off.
BASE_BLUR = 0.6
BASE_BACKGROUND = 0.02
BASE_READ_NOISE = 0.005
#: C->T: SD of the per-source MoA preference logits at strength 1.
SOURCE_MOA_PREFERENCE_SD = 2.0


def stream(seed: int, *keys: str | int) -> np.random.Generator:
    """Independent, reproducible random stream for (seed, keys...): stable across processes (crc32, not hash)."""
    words = [int(seed) & 0xFFFFFFFF] + [zlib.crc32(str(k).encode()) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(words))


@dataclass
class World:
    """Everything the renderer needs, and the ground truth.

    Attributes:
        config: the simulation config.
        compounds: one row per compound incl. DMSO: Metadata_JCP2022, Metadata_InChIKey, Metadata_InChI,
            Metadata_SMILES, Metadata_moa (None for DMSO), Metadata_pert_type (trt|negcon), moa_index
            (-1 for DMSO).
        targets: one row per (compound, target): Metadata_JCP2022, Metadata_target.
        phenotype: (n_compounds, len(PHENOTYPES)) float64 true phenotype shift, rows aligned with
            ``compounds`` (DMSO row = 0), already scaled by ``t_to_p``.
        plates: all plates.
        confounders: one row per (source, batch): Metadata_Source, Metadata_Batch and Truth_* effects.
        wells: one row per used well: Metadata_Source, Metadata_Batch, Metadata_Plate, Metadata_Well,
            Metadata_JCP2022, row, col (0-based), compound (row index into ``compounds``), edge (bool).
    """

    config: SimulationConfig
    compounds: pd.DataFrame
    targets: pd.DataFrame
    phenotype: np.ndarray
    plates: list[layout.PlateId]
    confounders: pd.DataFrame
    wells: pd.DataFrame
    _conf_index: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._conf_index = {(r.Metadata_Source, r.Metadata_Batch): i
                            for i, r in enumerate(self.confounders.itertuples(index=False))}

    def truth_compounds(self) -> pd.DataFrame:
        """Metadata_JCP2022, Metadata_moa and one ``Truth_<phenotype>`` column per dimension."""
        out = self.compounds[["Metadata_JCP2022", "Metadata_moa"]].copy()
        for j, col in enumerate(TRUTH_COLUMNS):
            out[col] = self.phenotype[:, j]
        return out

    def confounder_row(self, source: str, batch: str) -> pd.Series:
        return self.confounders.iloc[self._conf_index[(source, batch)]]

    def plate(self, name: str) -> layout.PlateId:
        for p in self.plates:
            if p.plate == name:
                return p
        raise KeyError(f"no plate {name!r} in this world")


# ---------------------------------------------------------------------------------------------- compounds
def _compounds(cfg: SimulationConfig) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    library = load_library()
    candidates, bits = library_candidates()
    groups = assign_moas(bits, cfg.n_moa, cfg.compounds_per_moa, stream(cfg.seed, "moa"))
    names = moa_names(cfg.n_moa)
    rows = candidates.iloc[groups.ravel()].copy()
    moa_of = np.repeat(np.arange(cfg.n_moa), cfg.compounds_per_moa)
    rows["Metadata_moa"] = [names[m] for m in moa_of]
    rows["Metadata_pert_type"] = "trt"
    rows["moa_index"] = moa_of
    dmso = dmso_row(library).to_dict()
    dmso.update(Metadata_moa=None, Metadata_pert_type="negcon", moa_index=-1)
    compounds = pd.concat([pd.DataFrame([dmso]), rows], ignore_index=True)
    compounds = compounds.sort_values("Metadata_JCP2022", kind="stable").reset_index(drop=True)

    target_names, core = target_pool(cfg.n_moa, cfg.targets_per_moa)
    trt = compounds[compounds["moa_index"] >= 0]
    per_compound = assign_targets(trt["moa_index"].to_numpy(), core, len(target_names),
                                  stream(cfg.seed, "targets"))
    targets = pd.DataFrame([(jcp, target_names[t]) for jcp, ts in zip(trt["Metadata_JCP2022"], per_compound)
                            for t in ts], columns=["Metadata_JCP2022", "Metadata_target"])

    # T->P: sparse MoA effects + target effects + compound-specific deviation
    rng = stream(cfg.seed, "phenotype")
    k = len(PHENOTYPES)
    moa_eff = rng.normal(0.0, MOA_EFFECT_DENSE_SD, size=(cfg.n_moa, k))
    for m in range(cfg.n_moa):
        dims = rng.choice(k, size=min(MOA_ACTIVE_DIMS, k), replace=False)
        moa_eff[m, dims] += rng.uniform(*MOA_EFFECT_RANGE, size=len(dims)) * rng.choice([-1.0, 1.0], len(dims))
    target_eff = rng.normal(0.0, 1.0, size=(len(target_names), k))
    phenotype = np.zeros((len(compounds), k))
    tgt_index = {name: i for i, name in enumerate(target_names)}
    by_compound = targets.groupby("Metadata_JCP2022")["Metadata_target"].apply(list).to_dict()
    for i, row in enumerate(compounds.itertuples(index=False)):
        if row.moa_index < 0:
            continue
        tgts = [tgt_index[t] for t in by_compound[row.Metadata_JCP2022]]
        effect = (moa_eff[row.moa_index] + TARGET_EFFECT_WEIGHT * target_eff[tgts].mean(0)
                  + cfg.compound_deviation * rng.normal(0.0, 1.0, size=k))
        phenotype[i] = cfg.t_to_p * effect
    return compounds, targets, phenotype


# ---------------------------------------------------------------------------------------------- confounders
def _confounders(cfg: SimulationConfig, plates: list[layout.PlateId]) -> pd.DataFrame:
    so, sp = cfg.c_to_o, cfg.c_to_p
    blur_unit = cfg.cell_diameter_px / 30.0
    rows = []
    sources = sorted({p.source_index for p in plates})
    for s in sources:
        rs = stream(cfg.seed, "source", s)
        gain = np.exp(so * rs.normal(0, SOURCE_GAIN_SD, size=len(CHANNELS)))
        blur = blur_unit * (BASE_BLUR + so * rs.uniform(*SOURCE_BLUR_RANGE))
        background = BASE_BACKGROUND + so * rs.uniform(*SOURCE_BACKGROUND_RANGE)
        read_noise = BASE_READ_NOISE + so * rs.uniform(*SOURCE_READ_NOISE_RANGE)
        density = np.exp(sp * rs.normal(0, SOURCE_DENSITY_SD))
        cell_size = np.exp(sp * rs.normal(0, SOURCE_CELL_SIZE_SD))
        batches = sorted({(p.batch_index, p.batch) for p in plates if p.source_index == s})
        for b, batch in batches:
            rb = stream(cfg.seed, "batch", s, b)
            drift = np.exp(so * rb.normal(0, BATCH_DRIFT_SD, size=len(CHANNELS)))
            row = {"Metadata_Source": layout.source_name(s), "Metadata_Batch": batch}
            for c, ch in enumerate(CHANNELS):
                row[f"Truth_Gain_{ch}"] = float(gain[c] * drift[c])
            row.update({
                "Truth_SourceBlur": float(blur), "Truth_Background": float(background),
                "Truth_ReadNoise": float(read_noise),
                "Truth_IllumAmplitude": float(so * rb.uniform(*BATCH_ILLUM_RANGE)),
                "Truth_IllumCentreX": float(so * rb.uniform(-BATCH_ILLUM_CENTRE, BATCH_ILLUM_CENTRE)),
                "Truth_IllumCentreY": float(so * rb.uniform(-BATCH_ILLUM_CENTRE, BATCH_ILLUM_CENTRE)),
                "Truth_CellDensity": float(density * np.exp(sp * rb.normal(0, BATCH_DENSITY_SD))),
                "Truth_CellSize": float(cell_size),
                "Truth_EdgeIntensity": float(np.exp(so * EDGE_INTENSITY)),
                "Truth_EdgeDensity": float(np.exp(sp * EDGE_DENSITY)),
            })
            rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- plate maps
def plate_positions(cfg: SimulationConfig) -> tuple[np.ndarray, np.ndarray]:
    """Fixed well positions used on every plate: (used, dmso), each (n, 2) int (row, col), 0-based.

    Used wells are spread evenly over the plate (row-major); DMSO sits at evenly spaced used positions,
    identical on every plate as in JUMP plate maps.
    """
    rows, cols = PLATE_FORMATS[cfg.plate_format]
    flat = np.unique(np.linspace(0, rows * cols - 1, cfg.wells_per_plate).round().astype(int))
    used = np.stack([flat // cols, flat % cols], axis=1)
    dmso_idx = np.unique(np.linspace(0, len(used) - 1, cfg.dmso_wells_per_plate).round().astype(int))
    return used, used[dmso_idx]


def _fit_margins(weights: np.ndarray, rows: np.ndarray, cols: np.ndarray, iters: int = 500) -> np.ndarray:
    """Iterative proportional fitting: scale (R, C) ``weights`` to row sums ``rows`` and column sums ``cols``.

    Keeps every odds ratio of ``weights`` (the MoA-by-source preference), so sources with equal capacity
    still screen different MoAs; sampling from the result fills capacities without forcing late units.
    """
    m = weights.astype(np.float64).copy()
    for _ in range(iters):
        m *= (rows / np.maximum(m.sum(1), 1e-12))[:, None]
        m *= (cols / np.maximum(m.sum(0), 1e-12))[None, :]
    return m


def _allocate(cfg: SimulationConfig, compounds: pd.DataFrame, plates: list[layout.PlateId]) -> pd.DataFrame:
    """C->T: compounds -> sources (MoA-skewed), -> plates (replicates on different plates/batches),
    -> wells (ordered by MoA, not random, with strength ``c_to_t``)."""
    rng = stream(cfg.seed, "allocation")
    used, dmso = plate_positions(cfg)
    dmso_set = {tuple(x) for x in dmso}
    trt_pos = np.array([p for p in used if tuple(p) not in dmso_set])
    n_trt = len(trt_pos)
    trt = compounds.index[compounds["moa_index"] >= 0].to_numpy()
    moa_of = compounds["moa_index"].to_numpy()
    units = np.repeat(trt, cfg.replicates)
    spare = n_trt * len(plates) - len(units)
    if spare > 0:  # spare slots: some compounds get one more replicate
        units = np.concatenate([units, rng.choice(trt, size=spare, replace=spare > len(trt))])
    units = units[rng.permutation(len(units))]

    n_sources = cfg.n_sources
    preference = np.exp(cfg.c_to_t * rng.normal(0, SOURCE_MOA_PREFERENCE_SD, size=(n_sources, cfg.n_moa)))
    plates_of = {s: [i for i, p in enumerate(plates) if p.source_index == s] for s in range(n_sources)}
    capacity = np.array([len(plates_of[s]) * n_trt for s in range(n_sources)], dtype=float)
    per_moa = np.bincount(moa_of[units], minlength=cfg.n_moa).astype(float)
    expected = _fit_margins(preference.T, per_moa, capacity)     # (n_moa, n_sources)
    source_of = np.empty(len(units), dtype=int)
    for u, c in enumerate(units):
        w = expected[moa_of[c]] * (capacity > 0)
        s = int(rng.choice(n_sources, p=w / w.sum()))
        source_of[u] = s
        capacity[s] -= 1

    plate_units: dict[int, list[int]] = {i: [] for i in range(len(plates))}
    for s in range(n_sources):
        mine = np.sort(units[source_of == s], kind="stable")
        left = {i: n_trt for i in plates_of[s]}
        for c in mine:
            open_ = [i for i in plates_of[s] if left[i] > 0]
            held = {plates[i].batch_index for i in plates_of[s] if c in plate_units[i]}
            # prefer a plate without this compound, then a batch without it, then the emptiest plate
            best = min(open_, key=lambda i: (c in plate_units[i], plates[i].batch_index in held, -left[i], i))
            plate_units[best].append(int(c))
            left[best] -= 1

    order_strength = min(cfg.c_to_t, 1.0)
    rows = []
    dmso_c = int(compounds.index[compounds["Metadata_JCP2022"] == DMSO_JCP2022][0])
    for i, p in enumerate(plates):
        cs = np.array(plate_units[i], dtype=int)
        # plate map: MoA order (JUMP plate maps group compounds) mixed with random order by c_to_t
        key = order_strength * moa_of[cs] + (1 - order_strength) * rng.uniform(0, cfg.n_moa, size=len(cs))
        cs = cs[np.lexsort((cs, key))]
        placed = [(r, c, int(k)) for (r, c), k in zip(trt_pos, cs)] + [(r, c, dmso_c) for r, c in dmso]
        for r, c, k in sorted(placed):
            rows.append((p.source, p.batch, p.plate, layout.well_name(r, c), r, c, k))
    wells = pd.DataFrame(rows, columns=["Metadata_Source", "Metadata_Batch", "Metadata_Plate", "Metadata_Well",
                                        "row", "col", "compound"])
    wells["Metadata_JCP2022"] = compounds["Metadata_JCP2022"].to_numpy()[wells["compound"]]
    n_rows, n_cols = PLATE_FORMATS[cfg.plate_format]
    wells["edge"] = (wells["row"].isin([0, n_rows - 1]) | wells["col"].isin([0, n_cols - 1]))
    return wells


def build_world(cfg: SimulationConfig) -> World:
    """Deterministic in ``cfg`` (incl. its seed): the same config gives the same world in any process."""
    plates = layout.plate_ids(cfg.n_sources, cfg.batches_per_source, cfg.plates_per_batch)
    compounds, targets, phenotype = _compounds(cfg)
    confounders = _confounders(cfg, plates)
    wells = _allocate(cfg, compounds, plates)
    return World(config=cfg, compounds=compounds, targets=targets, phenotype=phenotype, plates=plates, confounders=confounders, wells=wells)

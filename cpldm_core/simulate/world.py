"""The simulated world's causal parameters and its plate maps (pure; no rendering, no I/O).

:func:`build_world` turns a :class:`SimulationConfig` into a :class:`World`: the compounds with their MoA and
targets, each compound's true phenotype shift (T->P), each source's and batch's confounder effects (C->O,
C->P, within-plate gradients), each source's response matrix (C x T), and the allocation of compounds to
sources, plate maps and wells (C->T). The World evaluates the mechanisms for any condition
(:meth:`World.treatment_effect`, :meth:`World.channel_gain`, :meth:`World.cell_density`); the oracle
(:mod:`cpldm_core.simulate.oracle`) renders from them, so the ground truth written to the lake is exactly what
made the images. :func:`positivity_statistics` summarises the plate maps.

Phenotype dimensions (:data:`PHENOTYPES`) are in standard units: 1.0 is a typical MoA effect. How one unit
changes a cell is set by :data:`PHENOTYPE_GAIN` (log-scale multipliers of the rendering parameters).
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cpldm_core.errors import UserError
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
#: plate_gradient at strength 1: per-(source, batch) log-multipliers from the plate centre to its last row
#: (column), as smooth linear trends plus one bowl term (incubator and dispenser gradients; evaporation). The
#: source part is shared by its batches (same instruments), the batch part is smaller.
GRADIENT_INTENSITY_SD = 0.12             # per channel, per direction, source part
GRADIENT_INTENSITY_BATCH_SD = 0.05       # per channel, per direction, batch part
GRADIENT_CURVATURE_SD = 0.06             # bowl: log-intensity at a plate corner vs its centre, all channels
GRADIENT_DENSITY_SD = 0.15               # cell density, per direction, source part
GRADIENT_DENSITY_BATCH_SD = 0.05
#: c_x_t at strength 1: a source's response matrix is diag(exp(g)) @ (I + A / sqrt(k)) with g ~ N(0,
#: SOURCE_SENSITIVITY_SD) per phenotype dimension and A ~ N(0, SOURCE_MIXING_SD) (k x k): each output dimension
#: gets mixing noise of SD 0.6 x the RMS of the compound's shift, so two sources' responses to one compound
#: correlate ~0.6-0.8 (JUMP's cross-source replicate correlations are low).
SOURCE_SENSITIVITY_SD = 0.3
SOURCE_MIXING_SD = 0.6
#: c_to_p_x_t at strength 1: elasticity of the treatment effect with respect to local cell density.
DENSITY_EFFECT_ELASTICITY = 1.0
#: Baseline optics present even with every confounding edge off.
BASE_BLUR = 0.6
BASE_BACKGROUND = 0.02
BASE_READ_NOISE = 0.005
#: C->T (MoA skew): SD of the per-source MoA preference logits at strength 1.
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
            (-1 for DMSO), shared (bool: screened in every source).
        targets: one row per (compound, target): Metadata_JCP2022, Metadata_target.
        phenotype: (n_compounds, len(PHENOTYPES)) float64 true phenotype shift, rows aligned with
            ``compounds`` (DMSO row = 0), already scaled by ``t_to_p``: the effect in a reference source
            before effect modification (see :meth:`treatment_effect`).
        plates: all plates.
        confounders: one row per (source, batch): Metadata_Source, Metadata_Batch and Truth_* effects.
        response: (n_sources, k, k) float64 per-source response matrices (C x T; identity when ``c_x_t`` = 0),
            row order ``source_1``, ``source_2``...
        wells: one row per used well: Metadata_Source, Metadata_Batch, Metadata_Plate, Metadata_Well,
            Metadata_JCP2022, row, col (0-based), compound (row index into ``compounds``), edge (bool),
            layout (plate map index within the source).
    """

    config: SimulationConfig
    compounds: pd.DataFrame
    targets: pd.DataFrame
    phenotype: np.ndarray
    plates: list[layout.PlateId]
    confounders: pd.DataFrame
    response: np.ndarray
    wells: pd.DataFrame
    _conf: dict = field(default_factory=dict, repr=False)
    _compound_index: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        # plain floats per (source, batch): the oracle calls these per image, pandas lookups would dominate
        self._conf = {(r["Metadata_Source"], r["Metadata_Batch"]): r
                      for r in self.confounders.to_dict(orient="records")}
        self._compound_index = {j: i for i, j in enumerate(self.compounds["Metadata_JCP2022"])}

    def truth_compounds(self) -> pd.DataFrame:
        """Metadata_JCP2022, Metadata_moa and one ``Truth_<phenotype>`` column per dimension."""
        out = self.compounds[["Metadata_JCP2022", "Metadata_moa"]].copy()
        for j, col in enumerate(TRUTH_COLUMNS):
            out[col] = self.phenotype[:, j]
        return out

    def confounder_row(self, source: str, batch: str) -> dict:
        """Truth_* effects of (source, batch) as a dict. Raises UserError when the world lacks the pair."""
        try:
            return self._conf[(source, batch)]
        except KeyError:
            raise UserError(f"no (source, batch) = ({source!r}, {batch!r}) in this simulated world; it has "
                            f"{', '.join(f'{s}/{b}' for s, b in self._conf)}") from None

    def compound_index(self, compound: str) -> int:
        """Row of ``compounds`` for a JCP2022 id (DMSO included). Raises UserError for unknown ids."""
        try:
            return self._compound_index[compound]
        except KeyError:
            raise UserError(f"compound {compound!r} is not in this simulated world "
                            f"({len(self._compound_index)} compounds incl. DMSO {DMSO_JCP2022})") from None

    def well_position(self, well: str) -> tuple[int, int]:
        """Well name (``B07``) -> 0-based (row, col) on the world's plate format. Raises UserError otherwise."""
        from cpldm_core.load_data import split_well, well_row_index

        row_name, col = split_well(str(well))
        row, n_rows, n_cols = well_row_index(row_name), *PLATE_FORMATS[self.config.plate_format]
        if not (0 <= row < n_rows and 1 <= col <= n_cols):
            raise UserError(f"well {well!r} is not on a {self.config.plate_format}-well plate "
                            f"(A01..{layout.well_name(n_rows - 1, n_cols - 1)})")
        return row, col - 1

    def plate(self, name: str) -> layout.PlateId:
        for p in self.plates:
            if p.plate == name:
                return p
        raise KeyError(f"no plate {name!r} in this world")

    # ------------------------------------------------------------------ the causal mechanisms per condition
    def _plate_coordinates(self, row: int, col: int) -> tuple[float, float, bool]:
        """(r, q) in [-1, 1] from the plate centre to the last row/column, and whether the well is outer-ring."""
        n_rows, n_cols = PLATE_FORMATS[self.config.plate_format]
        r = 2.0 * row / (n_rows - 1) - 1.0
        q = 2.0 * col / (n_cols - 1) - 1.0
        return r, q, bool(row in (0, n_rows - 1) or col in (0, n_cols - 1))

    def cell_density(self, source: str, batch: str, row: int, col: int) -> float:
        """C->P: cell-count multiplier at a well: source x batch density, plate edge, density gradient."""
        conf = self.confounder_row(source, batch)
        r, q, edge = self._plate_coordinates(row, col)
        gradient = np.exp(conf["Truth_DensityGradRow"] * r + conf["Truth_DensityGradCol"] * q)
        return float(conf["Truth_CellDensity"] * gradient * (conf["Truth_EdgeDensity"] if edge else 1.0))

    def channel_gain(self, source: str, batch: str, row: int, col: int) -> np.ndarray:
        """C->O: (5,) intensity multiplier per channel (DNA..Mito) at a well: source gain x batch drift,
        plate-edge dimming, per-channel row/column gradient and the bowl term."""
        conf = self.confounder_row(source, batch)
        r, q, edge = self._plate_coordinates(row, col)
        log_gain = np.array([np.log(conf[f"Truth_Gain_{ch}"]) + conf[f"Truth_GradRow_{ch}"] * r
                             + conf[f"Truth_GradCol_{ch}"] * q for ch in CHANNELS])
        log_gain += conf["Truth_GradCurve"] * 0.5 * (r * r + q * q)
        return np.exp(log_gain) * (conf["Truth_EdgeIntensity"] if edge else 1.0)

    def treatment_effect(self, compound: int, source: str, batch: str, row: int, col: int) -> np.ndarray:
        """(k,) phenotype shift that compound row ``compound`` causes under (source, batch, well), standard units.

        ``density ** (-c_to_p_x_t * DENSITY_EFFECT_ELASTICITY) * response[source] @ phenotype[compound]``:
        effect modification C x T (the source's response matrix changes which dimensions move) and C->P x T
        (local cell density scales the effect). Equals ``phenotype[compound]`` when both edges are off.
        """
        cfg = self.config
        s = self.source_index(source)
        density = self.cell_density(source, batch, row, col)
        scale = density ** (-cfg.c_to_p_x_t * DENSITY_EFFECT_ELASTICITY)
        return scale * (self.response[s] @ self.phenotype[compound])

    def source_index(self, source: str) -> int:
        names = [layout.source_name(i) for i in range(len(self.response))]
        if source not in names:
            raise UserError(f"no source {source!r} in this simulated world; it has {', '.join(names)}")
        return names.index(source)

    def render_params(self, source: str, batch: str, row: int, col: int) -> dict:
        """Keyword arguments of :func:`cpldm_core.simulate.render.render_site` for the confounders of a well
        (optics C->O incl. gradients and edge effects, cell density and size C->P)."""
        conf = self.confounder_row(source, batch)
        return dict(
            gain=self.channel_gain(source, batch, row, col), blur=float(conf["Truth_SourceBlur"]),
            background=float(conf["Truth_Background"]), read_noise=float(conf["Truth_ReadNoise"]),
            illum_amplitude=float(conf["Truth_IllumAmplitude"]),
            illum_centre=(float(conf["Truth_IllumCentreX"]), float(conf["Truth_IllumCentreY"])),
            cell_density=self.cell_density(source, batch, row, col), cell_size=float(conf["Truth_CellSize"]))


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
        # plate_gradient: own streams, so the knob leaves every other draw unchanged
        pg = cfg.plate_gradient
        rg = stream(cfg.seed, "gradient", s)
        grad_source = pg * rg.normal(0, GRADIENT_INTENSITY_SD, size=(2, len(CHANNELS)))
        density_grad_source = pg * rg.normal(0, GRADIENT_DENSITY_SD, size=2)
        batches = sorted({(p.batch_index, p.batch) for p in plates if p.source_index == s})
        for b, batch in batches:
            rb = stream(cfg.seed, "batch", s, b)
            drift = np.exp(so * rb.normal(0, BATCH_DRIFT_SD, size=len(CHANNELS)))
            row = {"Metadata_Source": layout.source_name(s), "Metadata_Batch": batch}
            for c, ch in enumerate(CHANNELS):
                row[f"Truth_Gain_{ch}"] = float(gain[c] * drift[c])
            rgb = stream(cfg.seed, "gradient", s, b)
            grad = grad_source + pg * rgb.normal(0, GRADIENT_INTENSITY_BATCH_SD, size=(2, len(CHANNELS)))
            density_grad = density_grad_source + pg * rgb.normal(0, GRADIENT_DENSITY_BATCH_SD, size=2)
            for c, ch in enumerate(CHANNELS):
                row[f"Truth_GradRow_{ch}"] = float(grad[0, c])
                row[f"Truth_GradCol_{ch}"] = float(grad[1, c])
            row["Truth_GradCurve"] = float(pg * rgb.normal(0, GRADIENT_CURVATURE_SD))
            row["Truth_DensityGradRow"] = float(density_grad[0])
            row["Truth_DensityGradCol"] = float(density_grad[1])
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


def _responses(cfg: SimulationConfig) -> np.ndarray:
    """C x T: (n_sources, k, k) response matrices diag(exp(g_s)) @ (I + A_s / sqrt(k)), scaled by ``c_x_t``.

    A source's cells (genetic drift, passage, serum, assay timing) respond to a compound along their own
    axes: the per-dimension sensitivity g_s rescales each phenotype dimension, the mixing A_s moves part of
    the shift into other dimensions. Identity when ``c_x_t`` = 0.
    """
    k = len(PHENOTYPES)
    out = np.empty((cfg.n_sources, k, k))
    for s in range(cfg.n_sources):
        rs = stream(cfg.seed, "response", s)
        g = cfg.c_x_t * rs.normal(0, SOURCE_SENSITIVITY_SD, size=k)
        mixing = cfg.c_x_t * rs.normal(0, SOURCE_MIXING_SD, size=(k, k)) / np.sqrt(k)
        out[s] = np.exp(g)[:, None] * (np.eye(k) + mixing)
    return out


# ---------------------------------------------------------------------------------------------- plate maps
def plate_positions(cfg: SimulationConfig) -> tuple[np.ndarray, np.ndarray]:
    """Fixed well positions used on every plate: (used, dmso), each (n, 2) int (row, col), 0-based, row-major.

    Few wells (``wells_per_plate`` <= rows) form a Latin-hypercube-like spread: evenly spaced rows, each with
    its own evenly spaced column (a golden-ratio permutation), so every row and column region of the plate is
    used and within-plate gradients show. More wells are spread evenly over the row-major well order. DMSO sits
    at evenly spaced used positions, identical on every plate as in JUMP plate maps.
    """
    rows, cols = PLATE_FORMATS[cfg.plate_format]
    n = cfg.wells_per_plate
    if n <= rows:
        r = np.linspace(0, rows - 1, n).round().astype(int)
        c = np.linspace(0, cols - 1, n).round().astype(int)
        step = next(g for g in sorted(range(1, n + 1), key=lambda g: abs(g - 0.618 * n)) if math.gcd(g, n) == 1)
        used = np.stack([r, c[(np.arange(n) * step) % n]], axis=1)
    else:
        flat = np.unique(np.linspace(0, rows * cols - 1, n).round().astype(int))
        used = np.stack([flat // cols, flat % cols], axis=1)
    used = used[np.lexsort((used[:, 1], used[:, 0]))]
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


def _sources_of_exclusives(cfg: SimulationConfig, exclusive: np.ndarray, moa_of: np.ndarray,
                           rng: np.random.Generator) -> np.ndarray:
    """Source index per exclusive compound: even counts per source; MoA-skewed with strength ``c_to_t``."""
    n_sources = cfg.n_sources
    capacity = np.full(n_sources, len(exclusive) // n_sources, dtype=float)
    capacity[: len(exclusive) % n_sources] += 1
    preference = np.exp(cfg.c_to_t * rng.normal(0, SOURCE_MOA_PREFERENCE_SD, size=(n_sources, cfg.n_moa)))
    per_moa = np.bincount(moa_of[exclusive], minlength=cfg.n_moa).astype(float)
    expected = _fit_margins(preference.T, per_moa, capacity.copy())     # (n_moa, n_sources)
    source_of = np.empty(len(exclusive), dtype=int)
    for u, c in enumerate(exclusive):
        w = expected[moa_of[c]] * (capacity > 0)
        if w.sum() <= 0:        # this MoA's preferred sources are full: any source with room
            w = (capacity > 0).astype(float)
        s = int(rng.choice(n_sources, p=w / w.sum()))
        source_of[u] = s
        capacity[s] -= 1
    return source_of


def _allocate(cfg: SimulationConfig, compounds: pd.DataFrame, plates: list[layout.PlateId]
              ) -> tuple[pd.DataFrame, np.ndarray]:
    """C->T as in cpg0016 compound plates. Returns (wells, shared compound rows).

    A shared set (``shared_fraction`` of the treatments) is screened in every source at the same wells (the
    first slots of the first plate maps, like JUMP-Target plates); every other compound goes to one source,
    independently of its MoA unless ``c_to_t`` > 0. Each source fills ``layouts_per_source`` plate maps
    (slots = plate map x treatment position) and runs plate map ``j % layouts_per_source`` on its j-th plate
    (batch-major), so a compound keeps its well on all its replicate plates and a batch running several maps
    puts different compounds at the same well. Within a map compounds are in random order, or MoA order with
    strength ``c_to_t``. Slots left over hold extra DMSO.
    """
    rng = stream(cfg.seed, "allocation")
    used, dmso = plate_positions(cfg)
    dmso_set = {tuple(x) for x in dmso}
    trt_pos = np.array([p for p in used if tuple(p) not in dmso_set])
    n_trt, n_layouts = len(trt_pos), cfg.layouts_per_source
    moa_of = compounds["moa_index"].to_numpy()
    trt = compounds.index[moa_of >= 0].to_numpy()
    dmso_c = int(compounds.index[compounds["Metadata_JCP2022"] == DMSO_JCP2022][0])

    shuffled = trt[rng.permutation(len(trt))]
    shared, exclusive = shuffled[: cfg.n_shared], shuffled[cfg.n_shared:]
    source_of = _sources_of_exclusives(cfg, exclusive, moa_of, rng)

    order_strength = min(cfg.c_to_t, 1.0)

    def map_order(cs: np.ndarray) -> np.ndarray:
        # plate map: MoA order (plate maps that group compounds) mixed with random order by c_to_t
        key = order_strength * moa_of[cs] + (1 - order_strength) * rng.uniform(0, cfg.n_moa, size=len(cs))
        return cs[np.lexsort((cs, key))]

    shared_order = map_order(np.sort(shared))
    rows = []
    n_rows, n_cols = PLATE_FORMATS[cfg.plate_format]
    for s in range(cfg.n_sources):
        slots = np.full(n_layouts * n_trt, dmso_c, dtype=int)     # slot = layout * n_trt + position
        mine = np.concatenate([shared_order, map_order(np.sort(exclusive[source_of == s]))])
        slots[: len(mine)] = mine
        source_plates = [p for p in plates if p.source_index == s]   # batch-major (layout.plate_ids)
        for j, p in enumerate(source_plates):
            lay = j % n_layouts
            placed = [(int(r), int(c), int(k)) for (r, c), k in zip(trt_pos, slots[lay * n_trt:(lay + 1) * n_trt])]
            placed += [(int(r), int(c), dmso_c) for r, c in dmso]
            for r, c, k in sorted(placed):
                rows.append((p.source, p.batch, p.plate, layout.well_name(r, c), r, c, k, lay))
    wells = pd.DataFrame(rows, columns=["Metadata_Source", "Metadata_Batch", "Metadata_Plate", "Metadata_Well",
                                        "row", "col", "compound", "layout"])
    wells["Metadata_JCP2022"] = compounds["Metadata_JCP2022"].to_numpy()[wells["compound"]]
    wells["edge"] = (wells["row"].isin([0, n_rows - 1]) | wells["col"].isin([0, n_cols - 1]))
    return wells, np.sort(shared)


def build_world(cfg: SimulationConfig) -> World:
    """Deterministic in ``cfg`` (incl. its seed): the same config gives the same world in any process.

    Compounds, confounder effects and response matrices draw from their own streams, so the allocation
    knobs (``shared_fraction``, ``c_to_t``, sizes of the plate maps) never change a compound's truth or a
    condition's mechanisms.
    """
    plates = layout.plate_ids(cfg.n_sources, cfg.batches_per_source, cfg.plates_per_batch)
    compounds, targets, phenotype = _compounds(cfg)
    confounders = _confounders(cfg, plates)
    wells, shared = _allocate(cfg, compounds, plates)
    compounds["shared"] = False
    compounds.loc[shared, "shared"] = True
    return World(config=cfg, compounds=compounds, targets=targets, phenotype=phenotype, plates=plates,
                 confounders=confounders, response=_responses(cfg), wells=wells)


def world_from_config_dict(d: dict) -> World:
    """Rebuild the world from the ``config`` dict of ``raw/simulation.json``.

    Raises:
        UserError: a science key is missing (a lake simulated by an older cpldm: rebuilding it from today's
            defaults would silently give another world) or a value is invalid.
    """
    from cpldm_core.configuration import from_dict

    if not isinstance(d, dict):
        raise UserError(f"simulation config must be a mapping, got {type(d).__name__}")
    resources = {"num_cpus_per_task", "max_concurrency", "tiff_compression"}
    missing = [f.name for f in dataclasses.fields(SimulationConfig) if f.name not in d and f.name not in resources]
    if missing:
        raise UserError(f"simulation config lacks {', '.join(missing)}: the lake was simulated by an older "
                        "cpldm; simulate it again into a fresh lake")
    return build_world(from_dict(SimulationConfig, d))


def positivity_statistics(wells: pd.DataFrame) -> dict[str, float]:
    """Positivity of the plate maps, from a wells table (Metadata_Source, Metadata_Batch, Metadata_Well,
    Metadata_JCP2022; DMSO included).

    Returns:
        {"compounds_per_batch_well_{median,mean,max}": distinct compounds per (source, batch, well) over the
         used positions, "compounds_per_source_well_{median,mean,max}": the same per (source, well),
         "compounds_multi_source_share": share of treatments (not DMSO) screened in more than one source,
         "n_treatments": their number}
    """
    per_batch_well: dict[tuple, set] = {}
    per_source_well: dict[tuple, set] = {}
    sources_of: dict[str, set] = {}
    for source, batch, well, jcp in zip(wells["Metadata_Source"], wells["Metadata_Batch"], wells["Metadata_Well"],
                                        wells["Metadata_JCP2022"]):
        per_batch_well.setdefault((source, batch, well), set()).add(jcp)
        per_source_well.setdefault((source, well), set()).add(jcp)
        if jcp != DMSO_JCP2022:
            sources_of.setdefault(jcp, set()).add(source)
    out: dict[str, float] = {}
    for name, groups in (("batch_well", per_batch_well), ("source_well", per_source_well)):
        counts = np.array([len(v) for v in groups.values()], dtype=float)
        out[f"compounds_per_{name}_median"] = float(np.median(counts))
        out[f"compounds_per_{name}_mean"] = float(counts.mean())
        out[f"compounds_per_{name}_max"] = float(counts.max())
    multi = [len(v) > 1 for v in sources_of.values()]
    out["compounds_multi_source_share"] = float(np.mean(multi)) if multi else 0.0
    out["n_treatments"] = float(len(multi))
    return out

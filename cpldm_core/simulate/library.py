"""The simulator's compound library: real JUMP compounds, MoAs assigned by chemical structure, targets.

The packaged library (``cpldm_core/data/jump_compounds_subset.csv.gz``, see its PROVENANCE.md) holds ~2,500
JUMP compounds made of chemical series. A world draws ``n_moa`` well-separated seed compounds and gives each
MoA the compounds most similar to its seed (Morgan fingerprints, Tanimoto), so that MoA follows structure and
compounds unseen in training are predictable from their neighbours.
"""
from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources

import numpy as np
import pandas as pd

from storage_schemas.columns import DMSO_JCP2022

LIBRARY_FILE = "jump_compounds_subset.csv.gz"
#: Morgan fingerprint settings (ECFP4-like; the project's default compound encoder is the same family).
MORGAN_RADIUS = 2
MORGAN_BITS = 2048
#: Seeds of different MoAs must be less similar than this (Tanimoto), so MoAs are distinct series.
MAX_SEED_SIMILARITY = 0.3
#: Probability that a compound hits each of its MoA's core targets (at least one is always kept), and that
#: it has one extra off-target drawn from the whole target pool.
CORE_TARGET_PROB = 0.7
OFF_TARGET_PROB = 0.15


@lru_cache(maxsize=1)
def load_library() -> pd.DataFrame:
    """The packaged compounds: Metadata_JCP2022, Metadata_InChIKey, Metadata_InChI, Metadata_SMILES (sorted).

    Includes DMSO (``JCP2022_033924``, ``CS(C)=O``).
    """
    with resources.files("cpldm_core").joinpath("data", LIBRARY_FILE).open("rb") as fh:
        table = pd.read_csv(gzip.open(fh), dtype=str, keep_default_na=False)
    return table.sort_values("Metadata_JCP2022").reset_index(drop=True)


@lru_cache(maxsize=1)
def library_candidates() -> tuple[pd.DataFrame, np.ndarray]:
    """Packaged compounds except DMSO and their (N, MORGAN_BITS) bool fingerprints (computed once)."""
    library = load_library()
    candidates = library[library["Metadata_JCP2022"] != DMSO_JCP2022].reset_index(drop=True)
    bits = morgan_bits(candidates["Metadata_SMILES"].tolist())
    bits.setflags(write=False)
    return candidates, bits


def morgan_bits(smiles: list[str]) -> np.ndarray:
    """(N, MORGAN_BITS) bool fingerprints. Raises ValueError naming the first unparsable SMILES."""
    from rdkit import Chem, RDLogger
    from rdkit.Chem import rdFingerprintGenerator

    RDLogger.DisableLog("rdApp.*")
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=MORGAN_RADIUS, fpSize=MORGAN_BITS)
    out = np.zeros((len(smiles), MORGAN_BITS), dtype=bool)
    for i, s in enumerate(smiles):
        mol = Chem.MolFromSmiles(s)
        if mol is None:
            raise ValueError(f"library row {i}: RDKit cannot parse SMILES {s!r}")
        out[i] = gen.GetFingerprintAsNumPy(mol).astype(bool)
    return out


def tanimoto(query: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Tanimoto similarity of one (D,) bool fingerprint to each row of (N, D) bool -> (N,) float64."""
    inter = bits @ query.astype(np.float64)
    union = bits.sum(1) + query.sum() - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def assign_moas(bits: np.ndarray, n_moa: int, per_moa: int, rng: np.random.Generator) -> np.ndarray:
    """Pick ``n_moa`` x ``per_moa`` compounds grouped by structure.

    Args:
        bits: (N, D) bool fingerprints of the candidate compounds.
    Returns:
        (n_moa, per_moa) int indices into ``bits``; row m = compounds of MoA m, first = the seed.
    """
    n = len(bits)
    if n < n_moa * per_moa:
        raise ValueError(f"library has {n} compounds, fewer than {n_moa} MoAs x {per_moa} compounds")
    seeds: list[int] = []
    seed_sims: list[np.ndarray] = []
    for cand in rng.permutation(n):
        sims = tanimoto(bits[cand], bits)
        if any(s[cand] >= MAX_SEED_SIMILARITY for s in seed_sims):
            continue
        seeds.append(int(cand))
        seed_sims.append(sims)
        if len(seeds) == n_moa:
            break
    for cand in rng.permutation(n):  # fewer distinct series than MoAs: accept any remaining seed
        if len(seeds) == n_moa:
            break
        if int(cand) not in seeds:
            seeds.append(int(cand))
            seed_sims.append(tanimoto(bits[cand], bits))
    sims = np.stack(seed_sims)                                  # (n_moa, N)
    free = np.ones(n, dtype=bool)
    groups = np.zeros((n_moa, per_moa), dtype=np.int64)
    free[seeds] = False
    groups[:, 0] = seeds
    # round-robin greedy: each MoA in turn takes its most similar free compound (keeps groups balanced)
    for k in range(1, per_moa):
        for m in range(n_moa):
            j = int(np.argmax(np.where(free, sims[m], -1.0)))
            groups[m, k] = j
            free[j] = False
    return groups


def moa_names(n_moa: int) -> list[str]:
    return [f"moa_{m + 1:02d}" for m in range(n_moa)]


def target_pool(n_moa: int, targets_per_moa: int) -> tuple[list[str], list[list[int]]]:
    """Target names and each MoA's core targets; consecutive MoAs share one target (a chain).

    Returns:
        (names, core) with core[m] = indices of MoA m's ``targets_per_moa`` core targets.
    """
    step = max(targets_per_moa - 1, 1)
    core = [[m * step + j for j in range(targets_per_moa)] for m in range(n_moa)]
    n_targets = max(max(c) for c in core) + 1
    return [f"target_{t + 1:03d}" for t in range(n_targets)], core


def assign_targets(moa_of: np.ndarray, core: list[list[int]], n_targets: int,
                   rng: np.random.Generator) -> list[list[int]]:
    """Multi-label targets per compound: a random non-empty subset of its MoA's core targets, sometimes
    plus one off-target. ``moa_of``: (N,) MoA index per compound. Returns sorted target indices per compound."""
    out = []
    for m in moa_of:
        keep = [t for t in core[m] if rng.random() < CORE_TARGET_PROB]
        if not keep:
            keep = [core[m][int(rng.integers(len(core[m])))]]
        if rng.random() < OFF_TARGET_PROB:
            keep.append(int(rng.integers(n_targets)))
        out.append(sorted(set(keep)))
    return out


def dmso_row(library: pd.DataFrame) -> pd.Series:
    rows = library[library["Metadata_JCP2022"] == DMSO_JCP2022]
    if rows.empty:
        raise ValueError(f"compound library lacks DMSO {DMSO_JCP2022}")
    return rows.iloc[0]

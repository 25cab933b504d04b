"""A profile-level simulated world with known structure, for tests and benchmarks of the evaluation.

Causal structure (a small, feature-space version of the project's image simulator):
  T -> P: each compound's true phenotype P (``n_truth`` dims) = its MoA's centre + a compound deviation.
  P -> O: features = P @ W (a fixed random loading matrix) + per-well noise.
  C -> O: each batch adds an offset vector (``batch_strength``) to every well of the batch, DMSO included.
  C -> T (``confounded=True``): a compound's replicate wells all sit in one batch (sources screen different
  compounds); unconfounded: replicate wells are spread over batches at random, so averaging cancels batches.
Targets: each MoA owns two targets and a compound also gets one random extra target (multi-label).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from storage_schemas.columns import DMSO_JCP2022


def simulate_profiles(n_compounds: int = 120, n_moas: int = 8, n_features: int = 60, wells_per_compound: int = 3,
                      n_batches: int = 4, dmso_per_batch: int = 16, moa_strength: float = 1.0,
                      compound_noise: float = 0.5, well_noise: float = 0.7, batch_strength: float = 0.0,
                      confounded: bool = False, n_truth: int = 8, unseen_fraction: float = 0.3, seed: int = 0
                      ) -> dict:
    """Simulate well-level profiles.

    Returns:
        dict with ``meta`` (DataFrame: Metadata_Source, Metadata_Batch, Metadata_Plate, Metadata_Well,
        Metadata_JCP2022, Metadata_pert_type; one plate per batch), ``values`` ((n_wells, n_features)
        float32), ``features`` (names), ``annotations`` (Metadata_JCP2022, Metadata_moa, Metadata_target
        ``|``-joined), ``split`` (Series compound -> seen/unseen), ``truth`` (DataFrame indexed by compound,
        Truth_0..), ``moa_of`` (Series compound -> MoA).
    """
    rng = np.random.default_rng(seed)
    compounds = np.array([f"JCP2022_{i:06d}" for i in range(1, n_compounds + 1)], dtype=object)
    moa_index = np.arange(n_compounds) % n_moas
    rng.shuffle(moa_index)
    centres = rng.normal(size=(n_moas, n_truth)) * moa_strength
    truth = centres[moa_index] + compound_noise * rng.normal(size=(n_compounds, n_truth))
    loadings = rng.normal(size=(n_truth, n_features)) / np.sqrt(n_truth)
    batch_offsets = rng.normal(size=(n_batches, n_features)) * batch_strength

    rows, values = [], []
    compound_batch = rng.integers(0, n_batches, n_compounds)
    for i, cmp in enumerate(compounds):
        for w in range(wells_per_compound):
            b = compound_batch[i] if confounded else rng.integers(0, n_batches)
            rows.append((b, cmp, "trt"))
            values.append(truth[i] @ loadings + batch_offsets[b] + well_noise * rng.normal(size=n_features))
    for b in range(n_batches):
        for _ in range(dmso_per_batch):
            rows.append((b, DMSO_JCP2022, "negcon"))
            values.append(batch_offsets[b] + well_noise * rng.normal(size=n_features))
    meta = pd.DataFrame(rows, columns=["b", "Metadata_JCP2022", "Metadata_pert_type"])
    meta.insert(0, "Metadata_Source", [f"source_{1 + b % 2}" for b in meta["b"]])
    meta.insert(1, "Metadata_Batch", [f"batch_{b}" for b in meta["b"]])
    meta.insert(2, "Metadata_Plate", [f"plate_{b}" for b in meta["b"]])
    well_no = meta.groupby("b").cumcount().to_numpy()
    meta.insert(3, "Metadata_Well", [f"{chr(65 + n // 24 % 16)}{n % 24 + 1:02d}" for n in well_no])
    meta = meta.drop(columns="b")

    moa_names = np.array([f"moa_{k}" for k in range(n_moas)], dtype=object)
    targets = []
    for i in range(n_compounds):
        k = moa_index[i]
        own = [f"T{2 * k}", f"T{2 * k + 1}"]
        extra = f"T{rng.integers(0, 2 * n_moas)}"
        targets.append("|".join(sorted(set(own + [extra]))))
    annotations = pd.DataFrame({"Metadata_JCP2022": compounds, "Metadata_moa": moa_names[moa_index],
                                "Metadata_target": targets})
    split = pd.Series(np.where(rng.random(n_compounds) < unseen_fraction, "unseen", "seen"), index=compounds)
    truth_frame = pd.DataFrame(truth, index=pd.Index(compounds, name="Metadata_JCP2022"),
                               columns=[f"Truth_{k}" for k in range(n_truth)])
    return {"meta": meta, "values": np.asarray(values, dtype=np.float32),
            "features": [f"Cells_Sim_Feature{j}" for j in range(n_features)], "annotations": annotations,
            "split": split, "truth": truth_frame,
            "moa_of": pd.Series(moa_names[moa_index], index=compounds)}


def treatment_means(meta: pd.DataFrame, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plain pandas mean per compound over non-DMSO rows (the reference the DuckDB aggregation is checked
    against). Returns (sorted compound ids, (n, f) float32)."""
    keep = (meta["Metadata_JCP2022"] != DMSO_JCP2022).to_numpy()
    frame = pd.DataFrame(values[keep]).groupby(meta["Metadata_JCP2022"].to_numpy()[keep]).mean().sort_index()
    return frame.index.to_numpy(dtype=object), frame.to_numpy(dtype=np.float32)

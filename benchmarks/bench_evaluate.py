"""Evaluation cost on large simulated treatment-profile sets (10,000 and 100,000 compounds).

Per size: build single-label MoA and multi-label target label sets (labels with >= 10 compounds), then one
cross-validation fold per task (draw references, subprofiles, score every compound against every label,
mAP and ROC-AUC on seen/unseen queries) and, separately, the DuckDB mean of 3 replicate wells per compound
into treatment profiles. Reported: wall time, throughput (profiles/s) and the peak memory *allocated by the
step* (tracemalloc: numpy buffers included), which shows that memory grows with queries x labels and
queries x features, never with queries x queries. ``--quick``: 10,000 only. Then the whole ``cpldm evaluate``
stage on a lake of four data types (:func:`write_evaluation_lake`) with 1 and 2 data types at once as Ray tasks.

``python -m benchmarks.bench_evaluate [--quick]`` prints the table; the harness runs ``run(quick)``.
"""
from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pandas as pd

from benchmarks import harness
from cpldm_core.evaluation.crossval import cross_validate
from cpldm_core.evaluation.labels import moa_labels, target_labels
from tests._fixtures import write_evaluation_lake

N_FEATURES = 300      # order of a feature-selected CellProfiler profile (JUMP-MOA plate here: 357)
N_TRUTH = 16
COMPOUNDS_PER_MOA = 200
WELLS_PER_COMPOUND = 3
FULL_SIZES = (10_000, 100_000)
QUICK_SIZES = (10_000,)


def _world(n: int, seed: int = 0):
    """Vectorised simulated treatment profiles: MoA centre + compound deviation, loaded into features."""
    rng = np.random.default_rng(seed)
    n_moas = max(2, n // COMPOUNDS_PER_MOA)
    moa = rng.integers(0, n_moas, n)
    latent = rng.normal(size=(n_moas, N_TRUTH))[moa] + 0.7 * rng.normal(size=(n, N_TRUTH))
    loadings = rng.normal(size=(N_TRUTH, N_FEATURES)).astype(np.float32) / np.sqrt(N_TRUTH)
    profiles = (latent.astype(np.float32) @ loadings + 0.5 * rng.normal(size=(n, N_FEATURES)).astype(np.float32))
    ids = np.array([f"JCP2022_{i:07d}" for i in range(n)], dtype=object)
    targets = [f"T{2 * m}|T{2 * m + 1}|T{t}" for m, t in zip(moa, rng.integers(0, 2 * n_moas, n))]
    ann = pd.DataFrame({"Metadata_JCP2022": ids, "Metadata_moa": [f"moa_{m}" for m in moa],
                        "Metadata_target": targets})
    split = np.where(rng.random(n) < 0.3, "unseen", "seen")
    return ids, profiles, ann, split


# ---------------------------------------------------------------------------------------------- a lake
def bench_ray_scaling(quick: bool) -> list[dict]:
    """``cpldm evaluate`` on a local lake of four data types, with 1 and then 2 data types evaluated at once as Ray
    tasks (``concurrency``), in one run on a private 2-CPU Ray."""
    import tempfile
    from dataclasses import replace

    from cpldm_core.evaluation.config import preset
    from pipelines import evaluate
    from pipelines.ray_runtime import ensure_ray
    from pipelines.storage import Lake

    n_compounds, n_features = (96, 48) if quick else (1200, 200)
    ensure_ray(num_cpus=2)
    walls = {}
    with tempfile.TemporaryDirectory(dir=harness.work_dir("evaluate")) as tmp:
        lake = Lake(f"{tmp}/lake")
        lake.init()
        write_evaluation_lake(lake, n_compounds=n_compounds, n_features=n_features)
        # a first, unmeasured run warms both Ray workers (imports): the measured runs then compare like with like
        for label, concurrency in (("warm-up", 2), ("1", 1), ("2", 2)):
            cfg = replace(preset("demo"), run=f"scaling-{label}", concurrency=concurrency, num_cpus=1.0,
                          embedding="pca")
            start = time.perf_counter()
            out = evaluate.run(lake, cfg)
            if label != "warm-up":
                walls[concurrency] = time.perf_counter() - start
    note = (f"{len(out['data_types'])} data types ({n_compounds} compounds x {n_features} features, well level), "
            "demo preset (10 folds), PCA maps, 1 CPU per Ray task, incl. the report")
    rows = [{"benchmark": "evaluate stage", "metric": f"data types/s ({c} at once)",
             "value": len(out["data_types"]) / w, "unit": "data types/s", "peak_mem_mb": None,
             "notes": f"{note}; wall {w:.1f} s"} for c, w in walls.items()]
    rows.append({"benchmark": "evaluate stage", "metric": "speed-up 2 vs 1 at once", "value": walls[1] / walls[2],
                 "unit": "x", "peak_mem_mb": None, "notes": "same run, same lake"})
    return rows


def _measure(fn):
    tracemalloc.start()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, seconds, peak / 2 ** 20


def run(quick: bool = False, sizes: list[int] | None = None, folds: int = 1,
        wells_per_compound: int = WELLS_PER_COMPOUND, stage: bool = True,
        tasks: tuple[str, ...] = ("moa", "target")) -> list[dict]:
    """Options (``--set evaluate.KEY=VALUE``): ``sizes`` (compounds), ``folds`` (cross-validation folds per task),
    ``wells_per_compound`` (replicate wells aggregated by DuckDB; 10 x 100,000 compounds = 10^6 well rows),
    ``stage`` (also the whole-stage Ray run), ``tasks`` (moa, target). The peak of a step is its tracemalloc peak; the process's
    high-water RSS is the harness's ``process_peak_rss_mb``."""
    rows = []
    for n in (sizes or (QUICK_SIZES if quick else FULL_SIZES)):
        ids, profiles, ann, split = _world(n)
        for task, fn, col in (("moa", moa_labels, "Metadata_moa"), ("target", target_labels, "Metadata_target")):
            if task not in tasks:
                continue
            labels, _ = fn(ann[["Metadata_JCP2022", col]], list(ids), 10)
            pos = np.searchsorted(ids, labels.compounds)
            res, seconds, peak = _measure(lambda: cross_validate(
                profiles[pos], labels, split[pos], n_folds=folds, k=5, threshold=0.85, seed=0))
            m = res[(res["metric"] == "mAP") & (res["query_split"] == "seen")]["value"].mean()
            note = (f"{n} compounds x {N_FEATURES} features, {len(labels.labels)} {task} labels, {folds} fold(s), "
                    f"K=5; mAP(seen) {m:.3f}")
            note += f"; {seconds:.1f} s in all"
            rows.append({"benchmark": f"crossval-{task}-{n}", "metric": "fold time", "value": seconds / folds,
                         "unit": "s", "peak_mem_mb": peak, "notes": note})
            rows.append({"benchmark": f"crossval-{task}-{n}", "metric": "throughput", "value": n * folds / seconds,
                         "unit": "profiles/s", "peak_mem_mb": peak, "notes": note})
        rows.append(_duckdb_row(ids, profiles, wells_per_compound))
    return rows + (bench_ray_scaling(quick) if stage else [])


def _duckdb_row(ids, profiles, wells_per_compound: int = WELLS_PER_COMPOUND) -> dict:
    """DuckDB mean over replicate wells (the pipeline's treatment aggregation), from in-memory wells."""
    import duckdb

    from pipelines.evaluate import treatment_profiles

    n = len(ids)
    rng = np.random.default_rng(1)
    wells = np.repeat(profiles, wells_per_compound, axis=0)
    wells += 0.3 * rng.standard_normal(size=wells.shape, dtype=np.float32)   # no float64 temporary at 10^6 rows
    meta = pd.DataFrame({"Metadata_JCP2022": np.repeat(ids, wells_per_compound)})
    names = [f"Cells_F{j}" for j in range(profiles.shape[1])]
    con = duckdb.connect()
    _, seconds, peak = _measure(lambda: treatment_profiles(con, meta, wells, names, np.ones(len(meta), bool)))
    con.close()
    return {"benchmark": f"duckdb-treatment-mean-{n}", "metric": "throughput", "value": len(meta) / seconds,
            "unit": "wells/s", "peak_mem_mb": peak,
            "notes": f"{len(meta)} wells x {profiles.shape[1]} features -> {n} treatment profiles in {seconds:.2f} s"}


if __name__ == "__main__":
    harness.module_main(run)

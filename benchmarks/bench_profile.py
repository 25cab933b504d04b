"""Profile stage benchmarks: seconds per real 1080x1080 five-channel site per core, cp_measure's cost per feature
group next to the vectorised default set, small-image cost, and sites/s through Ray with 1 and 2 workers.

    python -m benchmarks.bench_profile [--quick] [--only cellprofiler_set ...]

The real site is /work/shared/data/images/pediatric_cancer_atlas_BR00143976_C03_site3 (Opera Phenix, 1080x1080,
channels ch5 DNA, ch2 ER, ch6 RNA, ch3 AGP, ch4 Mito); benchmarks needing it are skipped when it is absent.
CellProfiler's reference cost for a JUMP site is ~8 CPU-s.
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks.harness import result_row
from cpldm_core.features import measure
from cpldm_core.features.config import DEMO, JUMP
from cpldm_core.features.segmentation import segment, to_float
from cpldm_core.features.site import profile_site
from storage_schemas.columns import CHANNELS

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "images"
REAL_SITE = SHARED / "pediatric_cancer_atlas_BR00143976_C03_site3"
#: Opera Phenix channel numbers of that plate (its CellProfiler Image_FileName_Orig* columns).
REAL_CHANNEL_NUMBERS = {"DNA": 5, "ER": 2, "RNA": 6, "AGP": 3, "Mito": 4}
CELLPROFILER_CPU_S_PER_SITE = 8.0


def _cpu_time(fn, repeats: int = 1, warmup: bool = True) -> float:
    """Process CPU seconds per call (robust on a shared machine, unlike wall time)."""
    if warmup:
        fn()  # imports, numba/mahotas first calls
    start = time.process_time()
    for _ in range(repeats):
        fn()
    return (time.process_time() - start) / repeats


def load_real_site() -> np.ndarray:
    import tifffile
    planes = [tifffile.imread(REAL_SITE / f"r03c03f03p01-ch{REAL_CHANNEL_NUMBERS[ch]}sk1fk1fl1.tiff")
              for ch in CHANNELS]
    return np.stack(planes).astype(np.uint16)


def bench_real_site(quick: bool) -> list[dict]:
    if not REAL_SITE.exists():
        return [result_row("real_site", "skipped", float("nan"), "", f"{REAL_SITE} absent")]
    raw = load_real_site()
    image = to_float(raw)
    seg = segment(image, JUMP.segmentation)
    ids = np.unique(seg.nuclei)[1:]
    rows = [result_row("real_site_1080", "cells", len(ids), "cells", "JUMP preset segmentation")]
    t_seg = _cpu_time(lambda: segment(image, JUMP.segmentation))
    t_feat = _cpu_time(lambda: measure.default_features(image, seg.compartments(), CHANNELS, ids))
    t_all = _cpu_time(lambda: profile_site(raw, JUMP))
    rows += [
        result_row("real_site_1080", "segmentation_cpu_s", t_seg, "CPU-s/site"),
        result_row("real_site_1080", "default_features_cpu_s", t_feat, "CPU-s/site", "354 features x cells"),
        result_row("real_site_1080", "profile_site_cpu_s", t_all, "CPU-s/site",
                   f"segment + default features + QC; CellProfiler ~{CELLPROFILER_CPU_S_PER_SITE} CPU-s"),
        result_row("real_site_1080", "speedup_vs_cellprofiler", CELLPROFILER_CPU_S_PER_SITE / t_all, "x"),
        # what `cpldm cost` prices: JUMP-size sites, one core each (the Ray stage runs one site per core)
        {**result_row("real_site_1080", "throughput per core", 1.0 / t_all, "sites/s",
                      "1 / profile_site_cpu_s: 1080x1080 five-channel JUMP-size site, one core"),
         "cost_stage": "profile", "cost_per": "vcpu"},
    ]
    return rows


def bench_cp_measure_groups(quick: bool) -> list[dict]:
    """cp_measure per group on a crop of the real site (Cells compartment), and the vectorised equivalents."""
    if not REAL_SITE.exists():
        return []
    from cp_measure.bulk import get_core_measurements, get_correlation_measurements

    crop = 256 if quick else 512
    image = to_float(load_real_site()[:, :crop, :crop])
    seg = segment(image, JUMP.segmentation)
    cells = seg.cells
    n = int(len(np.unique(cells)) - 1)
    ids = np.unique(cells)[1:]
    note = f"{crop}x{crop} crop, {n} cells, Cells compartment"
    rows = []
    core, corr = get_core_measurements(), get_correlation_measurements()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, fn in core.items():
            if quick and name in ("texture",):
                channels = 1
            else:
                channels = 1 if name in ("sizeshape", "zernike", "feret") else len(CHANNELS)
            t = _cpu_time(lambda: [fn(cells, image[c]) for c in range(channels)])
            rows.append(result_row("cp_measure_group", f"{name}_cpu_s_per_channel", t / channels, "CPU-s", note))
        pairs = [(0, 1)]
        for name, fn in corr.items():
            kw = {"scale_max": 65535} if name == "costes" else {}
            t = _cpu_time(lambda: [fn(pixels_1=image[a], pixels_2=image[b], masks=cells, **kw) for a, b in pairs])
            rows.append(result_row("cp_measure_group", f"{name}_cpu_s_per_pair", t / len(pairs), "CPU-s", note))
    lp = measure.LabelledPixels(cells, ids)
    levels = measure.quantise_for_texture(image[0])
    vector = {
        "areashape": lambda: measure.areashape(cells, ids),
        "intensity": lambda: measure.intensity(lp, image[0], ids),
        "texture_1dir": lambda: measure.haralick(cells, levels, ids, 3, 0),
        "pearson": lambda: measure.pearson(lp, image[0], image[1], ids),
    }
    for name, fn in vector.items():
        rows.append(result_row("vectorised_group", f"{name}_cpu_s_per_channel", _cpu_time(fn, 3), "CPU-s", note))
    return rows


#: The JUMP pilot site (U2OS, 1080x1080) of the shared images: ~180 cells with the JUMP preset, as a typical JUMP
#: compound site; only ch2 AGP, ch3 RNA and ch5 DNA are in the shared copy.
PILOT_SITE = SHARED / "cpg0000_jump_pilot_BR00117006_A01_site1"
PILOT_CHANNEL_NUMBERS = {"AGP": 2, "RNA": 3, "DNA": 5}
#: Planes standing in for the pilot site's absent channels (same cost per pixel; values are not meaningful).
PILOT_STAND_INS = {"ER": "RNA", "Mito": "AGP"}


def load_pilot_site() -> np.ndarray:
    """(5, 1080, 1080) uint16 in CHANNELS order; ER and Mito repeat the RNA and AGP planes (absent here)."""
    import tifffile
    planes = {ch: tifffile.imread(PILOT_SITE / f"r01c01f01p01-ch{n}sk1fk1fl1.tiff")
              for ch, n in PILOT_CHANNEL_NUMBERS.items()}
    return np.stack([planes[PILOT_STAND_INS.get(ch, ch)] for ch in CHANNELS]).astype(np.uint16)


def _cp_measure_site_cost(image, compartments) -> dict[str, float]:
    """cp_measure CPU-s per site and group: each per-channel group timed on one channel in every compartment
    (x number of channels), each correlation on one pair (x the pairs featurize measures: 20 ordered pairs for
    Pearson, 10 for the symmetric ones). Costes (not in the full set by default) is left out."""
    from cp_measure.bulk import get_core_measurements, get_correlation_measurements

    n_ch = len(CHANNELS)
    pairs = {"pearson": n_ch * (n_ch - 1), "manders_fold": n_ch * (n_ch - 1) // 2, "rwc": n_ch * (n_ch - 1) // 2}
    cost = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, fn in get_core_measurements().items():
            per = 1 if name in ("sizeshape", "zernike", "feret") else n_ch
            cost[name] = per * sum(_cpu_time(lambda: fn(labels, image[0]), warmup=False)
                                   for labels in compartments.values())
        for name, fn in get_correlation_measurements().items():
            if name in pairs:
                cost[name] = pairs[name] * sum(
                    _cpu_time(lambda: fn(pixels_1=image[0], pixels_2=image[2], masks=labels), warmup=False)
                    for labels in compartments.values())
    return cost


def bench_cellprofiler_set(quick: bool) -> list[dict]:
    """The `cellprofiler` feature set per group on real 1080 px sites (38 and ~180 cells), CPU-s per site with one
    thread, next to cp_measure's per-group cost and CellProfiler's ~8 CPU-s."""
    from cpldm_core.features.config import CELLPROFILER

    sites = [("real_site_1080", REAL_SITE, load_real_site), ("pilot_site_1080", PILOT_SITE, load_pilot_site)]
    rows = []
    # warm-up on a crop: imports (centrosome) and first calls, so the per-group figures are steady-state
    crop = to_float(load_real_site()[:, :160, :160]) if REAL_SITE.exists() else None
    if crop is not None:
        seg = segment(crop, JUMP.segmentation)
        measure.cellprofiler_features(crop, seg.compartments(), CHANNELS, np.unique(seg.nuclei)[1:])
    for bench, path, load in sites:
        if not path.exists():
            rows.append(result_row(bench, "skipped", float("nan"), "", f"{path} absent"))
            continue
        raw = load()
        image = to_float(raw)
        seg = segment(image, CELLPROFILER.segmentation)
        ids = np.unique(seg.nuclei)[1:]
        comps = seg.compartments()
        note = f"{len(ids)} cells, 5 channels x 3 compartments, 1 thread"
        rows.append(result_row(bench, "cells", len(ids), "cells", "JUMP preset segmentation"
                               + ("; ER/Mito = RNA/AGP planes" if path == PILOT_SITE else "")))
        total = n_total = 0
        for group in measure.CELLPROFILER_GROUPS:
            start = time.process_time()
            got = measure.cellprofiler_features(image, comps, CHANNELS, ids, groups=(group,))
            t = time.process_time() - start
            total, n_total = total + t, n_total + len(got)
            rows.append(result_row(bench, f"cellprofiler_{group}_cpu_s", t, "CPU-s/site",
                                   f"{len(got)} features; {note}"))
        rows.append(result_row(bench, "cellprofiler_features", n_total, "features", "per cell"))
        rows.append(result_row(bench, "cellprofiler_measure_cpu_s", total, "CPU-s/site", f"sum of the groups; {note}"))
        t_site = _cpu_time(lambda: profile_site(raw, CELLPROFILER), warmup=False)
        rows.append(result_row(bench, "cellprofiler_profile_site_cpu_s", t_site, "CPU-s/site",
                               f"segment + cellprofiler set + QC; CellProfiler ~{CELLPROFILER_CPU_S_PER_SITE} CPU-s"))
        rows.append(result_row(bench, "cellprofiler_vs_cellprofiler_cost", t_site / CELLPROFILER_CPU_S_PER_SITE, "x",
                               "> 1: slower than CellProfiler"))
        if quick or path != PILOT_SITE:
            continue
        cost = _cp_measure_site_cost(image, comps)
        for name, t in cost.items():
            rows.append(result_row(bench, f"cp_measure_{name}_cpu_s", t, "CPU-s/site",
                                   f"one channel/pair x count; {note}"))
        rows.append(result_row(bench, "cp_measure_full_cpu_s", sum(cost.values()), "CPU-s/site",
                               f"full set without Costes (~2,955 features); {note}"))
    return rows


def bench_small_images(quick: bool) -> list[dict]:
    """Default set on demo-size (160 px) simulated-like sites: the demo's per-image cost."""
    from cpldm_core.features.toy_sites import toy_site as simulated_site

    raws = [simulated_site(20, 6.0, size=160, seed=s) for s in range(4 if quick else 16)]
    t = _cpu_time(lambda: [profile_site(r, DEMO) for r in raws]) / len(raws)
    cells = np.mean([profile_site(r, DEMO).count for r in raws[:2]])
    return [result_row("demo_site_160", "profile_site_cpu_ms", 1000 * t, "CPU-ms/site",
                       f"~{cells:.0f} cells, 354 features")]


def bench_ray(quick: bool) -> list[dict]:
    """End-to-end `profile.run` on a local lake of 160 px TIFF sites, 1 vs 2 workers (includes Ray start-up of
    the actors and Parquet writes)."""
    import pandas as pd
    import pyarrow as pa
    import tifffile

    from pipelines import profile
    from pipelines.ray_runtime import ensure_ray
    from pipelines.storage import Lake
    from storage_schemas import table_spec
    from cpldm_core.features.toy_sites import toy_site as simulated_site

    n_sites = 16 if quick else 64
    ensure_ray(num_cpus=2)
    rows = []
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            lake = Lake(tmp)
            lake.init()
            records = []
            for s in range(n_sites):
                raw = simulated_site(20, 6.0, size=160, seed=s)
                rec = {"Metadata_SiteKey": f"source_1/B1/P{s // 8}/A01/{s}", "Metadata_Source": "source_1",
                       "Metadata_Batch": "B1", "Metadata_Plate": f"P{s // 8}", "Metadata_Well": f"A{s % 4 + 1:02d}",
                       "Metadata_Site": s, "Metadata_PlateType": "COMPOUND", "Metadata_JCP2022": "JCP2022_033924",
                       "Metadata_InChIKey": None, "Metadata_SMILES": None, "Metadata_pert_type": "negcon"}
                for c, ch in enumerate(CHANNELS):
                    path = Path(tmp) / "img" / f"{s}_{ch}.tiff"
                    path.parent.mkdir(exist_ok=True)
                    tifffile.imwrite(path, raw[c], compression="lzw")
                    rec[f"URL_Orig{ch}"] = str(path)
                    rec[f"URL_Illum{ch}"] = None
                records.append(rec)
            lake.write_named("sites", pa.Table.from_pandas(pd.DataFrame(records), schema=table_spec("sites").schema,
                                                           preserve_index=False))
            cfg = replace(DEMO, workers=workers, batch_size=4, units_per_wave=64)
            start = time.perf_counter()
            summary = profile.run(lake, cfg, dataset="real")
            wall = time.perf_counter() - start
            rows.append(result_row("ray_profile_run", f"sites_per_s_{workers}_workers", summary["images"] / wall,
                                   "sites/s", f"{n_sites} sites of 160 px, 2-core VM, incl. actor start-up"))
    rows.append(result_row("ray_profile_run", "speedup_2_vs_1_workers", rows[1]["value"] / rows[0]["value"], "x"))
    return rows


BENCHES = {"small_images": bench_small_images, "real_site": bench_real_site,
           "cp_measure_groups": bench_cp_measure_groups, "cellprofiler_set": bench_cellprofiler_set,
           "ray": bench_ray}


def run(quick: bool, only: list[str] | None = None) -> list[dict]:
    """Every benchmark group, or those named in ``only`` (keys of :data:`BENCHES`; harness option)."""
    rows = []
    for bench in (BENCHES[name] for name in (only or BENCHES)):
        try:
            got = bench(quick)
        except Exception as exc:  # e.g. Ray failing to start on an overloaded machine: keep the other figures
            got = [result_row(bench.__name__, "failed", float("nan"), "", f"{type(exc).__name__}: {exc}"[:200])]
        rows += got
        print(_markdown(got), flush=True)
    return rows


def _markdown(rows: list[dict]) -> str:
    lines = ["| benchmark | metric | value | unit | peak MB | notes |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['benchmark']} | {r['metric']} | {r['value']:.4g} | {r['unit']} | {r['peak_mem_mb']} | "
                     f"{r['notes']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=tuple(BENCHES), action="append",
                        help="run only this benchmark group (repeatable); cellprofiler_set: ~3 min of one core")
    args = parser.parse_args()
    run(args.quick, args.only)  # prints one markdown table per benchmark group as it finishes

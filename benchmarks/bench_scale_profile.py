"""Profiles at scale (issue 20, item 3): ``cpldm profile`` on 20,000 sites, as its users run it (the command line
in a subprocess with its own local Ray, polled by :func:`benchmarks.bench_scale.run_cli` for committed plates,
the driver's peak RSS and the summed RSS of its Ray processes).

The input is a raw JUMP-layout lake of ``sites`` simulated demo-world sites (5 x 160 px, ~20 cells each;
``distinct`` rendered with the simulator, the rest hard-linked: the readers still open and decode every file),
384-well plates, one profile unit per plate; ``cpldm profile --preset demo --dataset real`` with ``workers``
Ray Data actors. Figures: sites/s end to end, the machine's CPU per site (every process, Ray's included), the
driver's peak RSS and the peak summed RSS of the driver and its Ray processes.

``python -m benchmarks --only scale_profile`` (opt-in, like ``scale``: ~30-40 min on 2 cores); ``--quick``:
400 sites. Options: ``--set scale_profile.sites=20000 --set scale_profile.distinct=256 --set
scale_profile.workers=2``.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np


def simulated_sites(n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` sites of the demo world (each (5, 160, 160) uint16 with ~20 simulated cells): its wells in order,
    then their next fields (``site_stream`` keys), so every site is distinct."""
    from cpldm_core.simulate.config import simulation_config
    from cpldm_core.simulate.oracle import render_world_site
    from cpldm_core.simulate.world import build_world

    world = build_world(simulation_config("demo", seed=seed))
    wells = list(world.wells.itertuples(index=False))
    return [render_world_site(world, wells[i % len(wells)], 1 + i // len(wells)) for i in range(n)]


def scale_profile(work: Path, n_sites: int, distinct: int, workers: int = 2) -> list[dict]:
    """Profiles at scale (issue 20, item 3): ``cpldm profile --preset demo --dataset real`` on a raw JUMP-layout
    lake of ``n_sites`` simulated demo sites (``distinct`` rendered, the rest hard-linked; 384-well plates, one
    profile unit per plate), ``workers`` Ray Data actors: sites/s end to end, CPU per site, the driver's peak RSS
    and the peak summed RSS of the driver and its Ray processes."""
    from benchmarks.bench_ingest import write_raw_lake
    from benchmarks.bench_scale import cpu_note, run_cli
    from cpldm_core.load_data import CatalogConfig
    from pipelines import catalog
    from pipelines.profile import marker_stage
    from pipelines.storage import Lake

    lake_dir = work / f"profile-{n_sites}"
    lake = Lake(str(lake_dir))
    lake.init()
    images = simulated_sites(distinct)
    px = images[0].shape[-1]
    write_raw_lake(lake, n_sites, px, plates=None, distinct=distinct, images=images)
    catalog.run(lake, CatalogConfig(unseen_compound_fraction=0.0, heldout_batch_fraction=0.0))
    plates = -(-n_sites // 384)
    r = run_cli(lake_dir, ["profile", "--preset", "demo", "--dataset", "real", "--set", f"workers={workers}"],
                marker_stage("real"), plates)
    profiled = lake.read_named("features_image").num_rows
    shutil.rmtree(lake_dir, ignore_errors=True)
    base = (f"{n_sites:,} simulated demo sites of 5x{px}x{px} (~20 cells; {distinct} distinct, hard-linked), "
            f"{plates} plates, local, demo feature set, {workers} workers")
    bench = f"profile {n_sites:,} sites"
    # the stage commits each plate once its last site is measured: the first commit says what a kill can lose
    # at most, the commits after it give a steady rate without Ray's start-up (from 4 plates on)
    # (a quick run's 2 plates have no steady part: the row is left out, not written as NaN)
    steady_rows = []
    if plates >= 4 and r["last_unit_s"] and r["last_unit_s"] > r["first_unit_s"]:
        steady_rows = [{
            "benchmark": bench, "metric": "sites/s between the first and last commit",
            "value": (n_sites - 384) / (r["last_unit_s"] - r["first_unit_s"]), "unit": "sites/s",
            "peak_mem_mb": r["driver_peak_mb"],
            "notes": f"the {n_sites - 384:,} sites of the {plates - 1} plates committed after the first (taken as "
                     f"384), over {r['last_unit_s'] - r['first_unit_s']:.0f} s"}]
    return [
        {"benchmark": bench, "metric": "first plate committed after", "value": r["first_unit_s"], "unit": "s",
         "peak_mem_mb": r["driver_peak_mb"],
         "notes": "seconds from the command's start to the first committed plate (Ray start included)"},
        *steady_rows,
        {"benchmark": bench, "metric": "sites/s end to end", "value": profiled / r["wall_s"], "unit": "sites/s",
         "peak_mem_mb": r["driver_peak_mb"],
         "notes": f"{base}; {profiled:,} image rows; wall {r['wall_s']:.0f} s incl. Ray start, well and treatment "
                  f"tables; {cpu_note(r)}"},
        {"benchmark": bench, "metric": "machine CPU per site", "value": 1000 * r["machine_busy_s"] / profiled,
         "unit": "CPU-ms/site", "peak_mem_mb": r["driver_peak_mb"],
         "notes": "every process of the machine (Ray's included) over the run, divided by the sites"},
        {"benchmark": bench, "metric": "driver peak RSS", "value": r["driver_peak_mb"], "unit": "MiB",
         "peak_mem_mb": r["driver_peak_mb"], "notes": "VmHWM of the cpldm process (Ray workers excluded)"},
        {"benchmark": bench, "metric": "peak RSS, driver + its Ray processes", "value": r["tree_peak_mb"],
         "unit": "MiB", "peak_mem_mb": r["driver_peak_mb"],
         "notes": "peak over the run of the summed VmRSS of every process started with the run's RAY_TMPDIR "
                  "(shared object-store pages count once per process: an upper bound); goal: within 8 GiB"},
    ]


def run(quick: bool, sites: int | None = None, distinct: int = 256, workers: int = 2, **_) -> list[dict]:
    from benchmarks import harness

    work = Path(tempfile.mkdtemp(dir=harness.work_dir("scale_profile")))
    try:
        return scale_profile(work, sites or (400 if quick else 20_000), min(distinct, 16) if quick else distinct,
                             workers)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    from benchmarks import harness
    harness.module_main(run, argv)


if __name__ == "__main__":
    main()

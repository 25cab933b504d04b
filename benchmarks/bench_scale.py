"""Scale (issue 20, items 1-3): ``cpldm ingest`` at 10^3-10^4 sites and ``cpldm generate`` at 10^4-10^5 images
(``cpldm profile`` at 2 x 10^4 sites: ``bench_scale_profile``, with this module's :func:`run_cli`), as their users
run them: every figure comes from the real command line (``cpldm --lake L <stage> ...`` in a subprocess that
starts its own local Ray cluster), polled for committed units and for the driver's peak memory (``VmHWM`` of the
``cpldm`` process itself, from /proc: Ray workers are other processes).

Ingest (``parts=("ingest",)``): a JUMP-layout raw lake of ``ingest_sizes`` five-channel ``px`` sites (``distinct``
rendered, the rest hard-linked: the readers still open and decode every file, from the page cache), random-weight
small VAE, ``crop`` px centre crops. At the largest size: a plain single-process loop (read, decode, normalise,
crop, encode; 1 thread; no Zarr) vs ``cpldm ingest`` with 1 and 2 readers + encoders (0.5 CPU each), and with 1
and 2 fused read+encode actors (1 CPU each), end to end, with the driver's CPU seconds and the machine's busy
share. At every size: the driver's peak RSS (2 workers, fused).

Generate (``parts=("generate",)``): a toy lake of random-weight networks of the real classes (tiny U-Net, 32 px
images, DPM-Solver++-20; :func:`tests._fixtures.build_toy_lake`; throughput depends on shapes and the sampler,
not on the weights), ``images`` rows:

1. images/s with 1 and 2 actors (1 CPU each): end to end (incl. Ray and actor start) and steady state (first to
   last committed block), and their ratios;
2. a SIGKILL of the driver once ``kill_fraction`` of the blocks are committed, then the same command again: its
   manifest and per-image SHA-256 must equal those of the uninterrupted 2-actor run (same seed namespace);
3. ``large_images`` rows with 2 actors: images/s and the driver's peak RSS vs at ``images`` (flat when the
   design is streamed).

Evaluate (``parts=("evaluate",)``): ``eval_compounds x eval_wells`` well rows (default 100,000 x 10 = 10^6)
through the DuckDB treatment aggregation, and an ``eval_folds``-fold (10) MoA evaluation of those compounds.

``python -m benchmarks --only scale`` (defaults: ingest 1,000 / 5,000 sites; generate 20,000 / 100,000 images);
``--quick``: CI-sized. Options, e.g. ``--set 'scale.parts=["generate"]' --set scale.images=10000
--set scale.large_images=50000 --set 'scale.ingest_sizes=[1000,5000]'``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tests._fixtures import build_toy_lake   # shared with tests/test_generate.py

REPO = Path(__file__).resolve().parent.parent


def run_cli(lake_dir: Path, args: list[str], stage: str, n_units: int | None = None,
            kill_fraction: float | None = None, timeout_s: float = 4 * 3600) -> dict:
    """Run ``cpldm --lake <lake_dir> --verbose <args>`` in a subprocess; poll its committed units of ``stage``
    and the driver's peak RSS every 0.25 s. Its output goes to ``<lake_dir>/../<stage>.log`` (a pipe nobody
    reads would fill and block the child).

    ``kill_fraction``: SIGKILL the driver once that share of ``n_units`` is committed (the run is then
    incomplete; its Ray processes are stopped by the driver's watchdog). Returns wall seconds, the driver's
    peak RSS (MiB), the peak of the summed RSS of the driver and every process of its Ray cluster (MiB,
    :func:`harness.rss_of_env_mb` on the run's own ``RAY_TMPDIR``), the times (s after start) at which the first and the
    last unit were seen committed, whether it was killed, whether the driver's watchdog had exited within 30 s
    after the run (it is waited for before the run's Ray temp dir is removed), its pid and its output."""
    from benchmarks import harness
    from pipelines.storage import Lake

    cmd = [sys.executable, "-m", "pipelines.cli", "--lake", str(lake_dir), "--verbose", *args]
    # a Ray temp dir of its own: short (socket paths < 108 bytes), and it marks every process of this run
    ray_tmp = tempfile.mkdtemp(prefix="bs-", dir="/tmp")
    env = dict(os.environ, RAY_DATA_DISABLE_PROGRESS_BARS="1", RAY_TMPDIR=ray_tmp)
    lake = Lake(str(lake_dir))
    log_path = lake_dir.parent / f"{stage}.log"
    t0 = time.perf_counter()
    busy0 = harness.machine_busy_cpu_s()
    hwm, cpu, first, last, done, killed, tree = 0.0, 0.0, None, None, 0, False, 0.0
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                hwm = max(hwm, harness.vm_hwm_mb(proc.pid) or 0.0)
                cpu = max(cpu, harness.process_cpu_s(proc.pid) or 0.0)
                tree = max(tree, harness.rss_of_env_mb("RAY_TMPDIR", ray_tmp))
                count = len(lake.committed_units(stage))
                now = time.perf_counter() - t0
                if count > done:
                    first = now if first is None else first
                    last, done = now, count
                if kill_fraction is not None and n_units and count >= kill_fraction * n_units:
                    os.kill(proc.pid, signal.SIGKILL)
                    killed = True
                    proc.wait()
                    break
                if now > timeout_s:
                    raise RuntimeError(f"cpldm {args[0]} still running after {timeout_s:.0f} s (log {log_path})")
                time.sleep(0.25)
        finally:
            if proc.poll() is None:   # an error in this loop must not leave the stage and its Ray running
                proc.kill()
                proc.wait()
    wall = time.perf_counter() - t0
    busy = harness.machine_busy_cpu_s()
    # Ray's session files (the run's output is in its log file), once the driver's watchdog, which logs there, is gone
    watchdog_gone = _wait_watchdog_gone(proc.pid)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    output = log_path.read_text(errors="replace")
    if not killed and proc.returncode != 0:
        raise RuntimeError(f"cpldm {args[0]} failed (exit {proc.returncode}):\n{output[-3000:]}")
    return {"wall_s": wall, "driver_peak_mb": hwm, "driver_cpu_s": cpu, "first_unit_s": first,
            "tree_peak_mb": tree, "watchdog_gone": watchdog_gone,
            "machine_busy_s": (busy - busy0) if busy is not None and busy0 is not None else float("nan"),
            "last_unit_s": last, "units_seen": done, "killed": killed, "pid": proc.pid, "output": output}


def generate_cli(lake_dir: Path, run: str, draws: int, actors: int, block_size: int,
                 kill_fraction: float | None = None, n_blocks: int | None = None) -> dict:
    """``cpldm generate`` of the toy ``scm`` model (DPM-Solver++-20, seed namespace ``scale``): see
    :func:`run_cli`."""
    from pipelines import generate

    args = ["generate", "--preset", "tiny", "--model-run", "scm", "--compounds", "all", "--draws", str(draws),
            "--sampler", "dpm++", "--steps", "20", "--actors", str(actors), "--cpus-per-actor", "1", "--run", run,
            "--seed-namespace", "scale", "--set", f"block_size={block_size}",
            "--set", f"batch_size={min(block_size, 64)}", "--set", "design_part_rows=65536"]
    return run_cli(lake_dir, args, generate.block_stage(run), n_blocks, kill_fraction)


def cpu_note(r: dict) -> str:
    """Where the CPUs went during one :func:`run_cli` run: the driver's own CPU seconds and the machine's busy
    share (every process, Ray's included) of cores x wall."""
    cores = os.cpu_count() or 1
    return (f"driver {r['driver_cpu_s']:.0f} CPU-s; machine busy {r['machine_busy_s']:.0f} of "
            f"{cores * r['wall_s']:.0f} CPU-s ({100 * r['machine_busy_s'] / (cores * r['wall_s']):.0f}%)")


def image_digests(lake, run: str, chunk: int = 4096) -> np.ndarray:
    """SHA-256 (hex) of each image row of a run, read ``chunk`` rows at a time (memory O(chunk))."""
    from pipelines import generate

    images = generate.open_images(lake, run)
    out = []
    for start in range(0, images.shape[0], chunk):
        block = np.asarray(images[start:start + chunk])
        out.extend(hashlib.sha256(np.ascontiguousarray(img).tobytes()).hexdigest() for img in block)
    return np.asarray(out)


def _wait_watchdog_gone(driver_pid: int, timeout: float = 30.0) -> bool:
    """The killed driver's watchdog (``pipelines.ray_runtime --watch <pid>``) stops that driver's Ray processes
    and exits: start the rerun only then (on 2 cores a leftover raylet would steal CPU from it). False when it
    is still there after ``timeout`` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = subprocess.run(["pgrep", "-f", f"pipelines.ray_runtime --watch {driver_pid} "],
                               capture_output=True, text=True).stdout.split()
        if not found:
            return True
        time.sleep(0.5)
    return False


def ingest_lake(work: Path, n_sites: int, px: int, distinct: int) -> Path:
    """A raw JUMP-layout lake of ``n_sites`` ``px`` px five-channel sites (``distinct`` rendered, the rest
    hard-linked), catalogued, with a random-weight small VAE ``bench-small``."""
    from benchmarks.bench_ingest import save_vae, write_raw_lake
    from cpldm_core.load_data import CatalogConfig
    from pipelines import catalog
    from pipelines.storage import Lake

    lake_dir = work / f"ingest-{n_sites}"
    lake = Lake(str(lake_dir))
    lake.init()
    write_raw_lake(lake, n_sites, px, plates=None, distinct=distinct)
    catalog.run(lake, CatalogConfig(unseen_compound_fraction=0.0, heldout_batch_fraction=0.0))
    save_vae(lake, "small", "bench-small")
    return lake_dir


def plain_ingest_loop(lake_dir: Path, crop: int) -> tuple[int, float]:
    """The single-process baseline on the same input (``bench_ingest.plain_ingest_seconds``, 16 sites per encode
    call). Returns (sites, seconds)."""
    from benchmarks.bench_ingest import NORM, plain_ingest_seconds
    from pipelines import ingest
    from pipelines.storage import Lake

    lake = Lake(str(lake_dir))
    recs = ingest.site_records(lake.read_named("sites").to_pandas())
    reader = ingest.SiteReader(endpoint_url=None, normalisation=NORM, crop_size=crop)
    return len(recs), plain_ingest_seconds(lake, reader, recs, crop, batch=16)


def ingest_cli(lake_dir: Path, vae_id: str, workers: int, crop: int, rows_per_shard: int = 64,
               fused: bool = False) -> dict:
    """``cpldm ingest`` with ``workers`` readers and ``workers`` encoders (0.5 CPU each), or with ``fused``
    ``workers`` read+encode actors (1 CPU each): see :func:`run_cli`."""
    from pipelines import ingest

    args = ["ingest", "--preset", "demo", "--vae", "bench-small", "--vae-id", vae_id, "--set", "subset=all",
            "--set", f"crop_size={crop}", "--set", f"read_concurrency={workers}",
            "--set", f"encode_concurrency={workers}", "--set", "num_cpus_read=0.5",
            "--set", "num_cpus_encode=0.5", "--set", f"rows_per_shard={rows_per_shard}",
            "--set", f"fuse_read_encode={'true' if fused else 'false'}"]
    return run_cli(lake_dir, args, ingest.stage_name(vae_id))


def scale_ingest(work: Path, sizes: tuple[int, ...], px: int, crop: int, distinct: int,
                 workers_arms: tuple[int, ...] = (1, 2)) -> list[dict]:
    """Ingest at scale: plain loop vs ``cpldm ingest`` with ``workers_arms`` workers at the largest size, each
    as a reader pool feeding an encoder pool and (``fuse_read_encode``) as read+encode actors; the driver's peak
    RSS at every size (2 workers, fused). The Ray Data stats of the largest 2-worker runs are written to
    ``benchmarks/results/scale_ingest_stats_<pools|fused>.txt`` (where the time goes, per operator)."""
    from benchmarks import harness

    rows: list[dict] = []
    peaks = {}
    for n in sorted(sizes):
        lake_dir = ingest_lake(work, n, px, distinct)
        base = f"{n:,} sites of 5x{px}x{px} LZW TIFFs ({distinct} distinct, hard-linked), local, small VAE, {crop}px"
        if n == max(sizes):
            sites, secs = plain_ingest_loop(lake_dir, crop)
            plain = sites / secs
            rows.append({"benchmark": f"ingest {n:,} sites", "metric": "plain loop", "value": plain,
                         "unit": "sites/s", "peak_mem_mb": float("nan"),
                         "notes": f"{base}; read+decode+normalise+crop+encode, 1 process, 1 thread, no Zarr"})
            for workers in workers_arms:
                for fused in (False, True):
                    mode = "fused" if fused else "pools"
                    r = ingest_cli(lake_dir, f"scale-{workers}w-{mode}", workers, crop, fused=fused)
                    if workers == 2 and "Ray Data stats" in r["output"]:
                        stats = r["output"][r["output"].find("Ray Data stats"):]
                        (harness.RESULTS_DIR / f"scale_ingest_stats_{mode}.txt").write_text(f"{base}\n{stats}")
                    what = (f"{workers} read+encode actor(s) x 1 CPU (fuse_read_encode)" if fused else
                            f"{workers} reader + {workers} encoder actor(s) x 0.5 CPU")
                    rate = sites / r["wall_s"]
                    rows.append({"benchmark": f"ingest {n:,} sites", "value": rate, "unit": "sites/s",
                                 "metric": f"cpldm ingest, {workers} worker(s), {mode}",
                                 "peak_mem_mb": r["driver_peak_mb"],
                                 "notes": f"{base}; {what}; wall {r['wall_s']:.0f} s incl. Ray start, stats, Zarr, "
                                          f"index; {cpu_note(r)}"})
                    rows.append({"benchmark": f"ingest {n:,} sites", "value": rate / plain, "unit": "x",
                                 "metric": f"ray / plain, {workers} worker(s), {mode}",
                                 "peak_mem_mb": r["driver_peak_mb"], "notes": "same run, ratio of the rows above"})
                    if workers == 2 and fused:
                        peaks[n] = r["driver_peak_mb"]
        else:
            peaks[n] = ingest_cli(lake_dir, "scale-2w", 2, crop, fused=True)["driver_peak_mb"]
        shutil.rmtree(lake_dir, ignore_errors=True)
    for n, peak in peaks.items():
        rows.append({"benchmark": f"ingest {n:,} sites", "metric": "driver peak RSS (2 workers, fused)",
                     "value": peak, "unit": "MiB", "peak_mem_mb": peak,
                     "notes": f"VmHWM of the cpldm process; vs the smallest size: {peak / peaks[min(peaks)]:.2f}x"})
    return rows


def scale_generate(work: Path, images: int, large_images: int, draws: int, block_size: int,
                   kill_fraction: float) -> list[dict]:
    """Generation at scale (see the module docstring)."""
    from pipelines import generate
    from pipelines.storage import Lake

    rows: list[dict] = []

    def lake_for(n_images: int) -> Path:
        """A toy lake with n_images / draws compounds (DMSO included)."""
        n_compounds = max(2, n_images // draws)
        lake_dir = work / f"lake-{n_images}"
        if not lake_dir.exists():
            lake = Lake(str(lake_dir))
            lake.init()
            build_toy_lake(lake, kinds=("scm",), n_compounds=n_compounds, unet="tiny", latent_side=4,
                           vae_arch="tiny")
        return lake_dir

    base = f"tiny U-Net 32px dpm++-20, block {block_size}, N={draws}"
    lake_dir = lake_for(images)
    lake = Lake(str(lake_dir))
    results = {}
    for actors in (1, 2):
        r = generate_cli(lake_dir, f"scale-{actors}a", draws, actors, block_size)
        n_rows = len(generate.read_manifest(lake, f"scale-{actors}a"))
        n_blocks = len(lake.committed_units(generate.block_stage(f"scale-{actors}a")))
        steady = (n_rows * (1 - 1 / n_blocks)) / max(1e-9, r["last_unit_s"] - r["first_unit_s"])
        results[actors] = r | {"steady": steady, "e2e": n_rows / r["wall_s"]}
        for metric, value, note in (
                ("images/s end to end", n_rows / r["wall_s"], f"wall {r['wall_s']:.0f} s incl. Ray + actor start"),
                ("images/s steady state", steady, "first to last committed block"),
                ("driver peak RSS", r["driver_peak_mb"], "VmHWM of the cpldm process (Ray workers excluded)")):
            rows.append({"benchmark": f"generate {n_rows:,} images", "value": value,
                         "metric": f"{metric} ({actors} actor{'s' if actors > 1 else ''})",
                         "unit": "MiB" if "RSS" in metric else "images/s", "peak_mem_mb": r["driver_peak_mb"],
                         "notes": f"{base}; {note}; cpldm generate CLI, 1 CPU per actor"})
    for kind, key in (("end to end", "e2e"), ("steady", "steady")):
        rows.append({"benchmark": f"generate {n_rows:,} images", "metric": f"2 / 1 actors ({kind})",
                     "value": results[2][key] / results[1][key], "unit": "x", "peak_mem_mb": float("nan"),
                     "notes": f"{base}; same run, ratio of the rows above"})

    # kill at ~50 % and resume: the same command, same seed namespace as the uninterrupted 2-actor run
    killed = generate_cli(lake_dir, "scale-resumed", draws, 2, block_size, kill_fraction=kill_fraction,
                          n_blocks=n_blocks)
    at_kill = len(lake.committed_units(generate.block_stage("scale-resumed")))
    if not (killed["killed"] and 0 < at_kill < n_blocks):
        raise RuntimeError(f"the kill/resume check did not kill midway (killed={killed['killed']}, "
                           f"{at_kill}/{n_blocks} blocks committed)")
    watchdog_done = killed["watchdog_gone"]   # run_cli waited for it (up to 30 s) before returning
    resumed = generate_cli(lake_dir, "scale-resumed", draws, 2, block_size)
    ref_manifest = generate.read_manifest(lake, "scale-2a")
    new_manifest = generate.read_manifest(lake, "scale-resumed")
    same_manifest = ref_manifest.equals(new_manifest)
    same_images = int((image_digests(lake, "scale-2a") == image_digests(lake, "scale-resumed")).sum())
    if not same_manifest or same_images != n_rows:
        raise RuntimeError(f"killed + rerun differs from the uninterrupted run: manifest "
                           f"{'equal' if same_manifest else 'DIFFERENT'}, {same_images}/{n_rows} images equal")
    rows.append({"benchmark": f"generate {n_rows:,} images, SIGKILL + rerun", "metric": "images identical",
                 "value": same_images / n_rows, "unit": "fraction", "peak_mem_mb": resumed["driver_peak_mb"],
                 "notes": f"driver SIGKILLed with {at_kill}/{n_blocks} blocks committed "
                          f"({killed['wall_s']:.0f} s in; its watchdog {'had' if watchdog_done else 'had NOT'} "
                          f"stopped its Ray before the rerun); rerun {resumed['wall_s']:.0f} s; manifest identical "
                          f"to the uninterrupted run ({len(new_manifest):,} rows); per-image SHA-256 compared"})
    shutil.rmtree(lake_dir, ignore_errors=True)

    if large_images:
        lake_dir = lake_for(large_images)
        r = generate_cli(lake_dir, "scale-large", draws, 2, block_size)
        n_large = len(generate.read_manifest(Lake(str(lake_dir)), "scale-large"))
        rows.append({"benchmark": f"generate {n_large:,} images", "metric": "images/s end to end (2 actors)",
                     "value": n_large / r["wall_s"], "unit": "images/s", "peak_mem_mb": r["driver_peak_mb"],
                     "notes": f"{base}; wall {r['wall_s']:.0f} s; cpldm generate CLI"})
        rows.append({"benchmark": f"generate {n_large:,} images", "metric": "driver peak RSS (2 actors)",
                     "value": r["driver_peak_mb"], "unit": "MiB", "peak_mem_mb": r["driver_peak_mb"],
                     "notes": f"vs {results[2]['driver_peak_mb']:.0f} MiB at {n_rows:,} images: ratio "
                              f"{r['driver_peak_mb'] / results[2]['driver_peak_mb']:.2f}"})
        shutil.rmtree(lake_dir, ignore_errors=True)
    return rows


def scale_evaluate(compounds: int, wells_per_compound: int, folds: int) -> list[dict]:
    """Evaluate at scale: ``compounds x wells_per_compound`` well rows through the pipeline's DuckDB treatment
    aggregation, and a ``folds``-fold MoA evaluation of ``compounds`` profiles (benchmarks/bench_evaluate.py's
    simulated profiles and measurements; peak = the step's tracemalloc peak)."""
    from benchmarks import bench_evaluate

    rows = bench_evaluate.run(False, sizes=[compounds], folds=folds, wells_per_compound=wells_per_compound,
                              stage=False, tasks=("moa",))
    return [{**r, "benchmark": f"evaluate at scale: {r['benchmark']}"} for r in rows]


def run(quick: bool, parts: tuple[str, ...] = ("ingest", "generate", "evaluate"), images: int | None = None,
        large_images: int | None = None, draws: int = 20, block_size: int = 256, kill_fraction: float = 0.5,
        ingest_sizes: tuple[int, ...] | None = None, px: int = 540, crop: int = 64, distinct: int = 48,
        ingest_workers: tuple[int, ...] = (1, 2), eval_compounds: int | None = None, eval_wells: int = 10,
        eval_folds: int | None = None, **_) -> list[dict]:
    from benchmarks import harness

    images = images or (800 if quick else 20_000)
    large_images = (2_400 if quick else 100_000) if large_images is None else large_images
    ingest_sizes = tuple(ingest_sizes or ((96, 192) if quick else (1_000, 5_000)))
    if quick:
        block_size, px, distinct = min(block_size, 64), min(px, 256), min(distinct, 16)
    rows: list[dict] = []
    work = Path(tempfile.mkdtemp(dir=harness.work_dir("scale")))
    try:
        if "ingest" in parts:
            rows += scale_ingest(work, ingest_sizes, px, crop, distinct, tuple(ingest_workers))
        if "generate" in parts:
            rows += scale_generate(work, images, large_images, draws, block_size, kill_fraction)
        if "evaluate" in parts:
            rows += scale_evaluate(eval_compounds or (2_000 if quick else 100_000), eval_wells,
                                   eval_folds or (2 if quick else 10))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    from benchmarks import harness
    harness.module_main(run, argv)


if __name__ == "__main__":
    main()

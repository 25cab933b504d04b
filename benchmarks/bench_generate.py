"""Generation throughput: images/s per actor for DDIM-50 and DPM-Solver++-20, 1 vs 2 actors, and the memory of
streaming a >= 20,000-image design.

The lake is a *toy* one built here (random-weight tiny/small U-Net and VAE of the real classes, random
compound vectors, 3 sources x 2 batches, a 4 x 6 well grid): throughput depends on the network shapes and the
sampler, not on the weights. ``python -m benchmarks.bench_generate [--quick]`` prints a markdown table.

:func:`tests._fixtures.build_toy_lake` (what ``tests/test_generate.py`` generates from) builds it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

from tests._fixtures import build_toy_lake   # shared with tests/test_generate.py


# ---------------------------------------------------------------------------------------------- measurements
def _throughput(lake, model_run: str, sampler: str, steps: int, actors: int, n_compounds: int, draws: int,
                run: str, use_ray: bool) -> dict:
    from cpldm_core.design import GenerateConfig
    from pipelines import generate

    cfg = GenerateConfig(model_run=model_run, run=run, draws=draws, compounds="all", sampler=sampler, steps=steps,
                         block_size=8, batch_size=8, actors=actors, cpus_per_actor=1.0, design_part_rows=4096)
    summary = generate.run(lake, cfg, use_ray=use_ray)
    # exclude actor start-up (model load, diffusers import): time from the block markers
    infos = [lake.unit_info(generate.block_stage(run), generate.block_unit(b)) for b in range(summary["blocks"])]
    busy = sum(i["seconds"] for i in infos)
    return {"images": summary["images"], "wall_s": summary["seconds"], "busy_s": busy,
            "per_actor": summary["images"] / busy * 1.0, "aggregate": summary["images"] / summary["seconds"]}


def _design_memory(n_images: int) -> dict:
    """Stream a design of ``n_images`` rows block by block (as ``cpldm generate`` does): peak Python heap."""
    from cpldm_core.design import ConfounderSpace, DesignSpec

    draws = 100
    compounds = tuple(f"JCP2022_{k:06d}" for k in range(max(1, n_images // draws)))
    space = ConfounderSpace(tuple((s, b, w) for s, b in BATCHES for w in WELLS))
    spec = DesignSpec("bench", compounds, draws, space, block_size=256)
    tracemalloc.start()
    t0 = time.perf_counter()
    rows = 0
    for frame in spec.iter_blocks():
        rows += len(frame)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"rows": rows, "seconds": seconds, "peak_mb": peak / 2 ** 20}


def _start_own_ray(num_cpus: int) -> None:
    """A private local Ray (``address="local"``): never joins a cluster another process started with
    ``ray start`` on this machine (plain ``ray.init()`` would, and then refuses ``num_cpus``)."""
    import ray

    from pipelines.ray_runtime import FORWARDED_ENV, LOCAL_DEFAULTS

    if ray.is_initialized():
        return
    for key, value in LOCAL_DEFAULTS.items():
        os.environ.setdefault(key, value)
    for attempt in range(3):   # a raylet gets 30 s to register: not always enough on a loaded 2-core machine
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                     object_store_memory=int(1e9), configure_logging=True, log_to_driver=False,
                     runtime_env={"env_vars": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}})
            return
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise


def run(quick: bool, **options) -> list[dict]:
    """Benchmark rows (see module docstring). quick: tiny U-Net, fewer images; full: small U-Net too."""
    from benchmarks import harness
    from pipelines.storage import Lake

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    rows: list[dict] = []
    # small at 8x8 = the demo (64 px crops); small at 16x16 (128 px) shows what the decode costs at 4x the pixels
    nets = [("tiny", 4)] if quick else [("tiny", 4), ("small", 8), ("small", 16)]
    n_compounds, draws = (4, 4) if quick else (8, 4)
    samplers = [("ddim", 50), ("dpm++", 20)]
    _start_own_ray(num_cpus=2)
    for unet, side in nets:
        # `cpldm cost` prices the largest network measured (the last), not the fastest toy one
        priced = {"cost_stage": "generate", "cost_per": "vcpu"} if (unet, side) == nets[-1] else {}
        work = Path(tempfile.mkdtemp(dir=harness.work_dir("generate")))
        try:
            lake = Lake(str(work / "lake"))
            lake.init()
            build_toy_lake(lake, kinds=("scm",), n_compounds=n_compounds, unet=unet, latent_side=side,
                           vae_arch="tiny" if unet == "tiny" else "small")
            px = 8 * side
            for sampler, steps in samplers:
                for actors in (1, 2):
                    name = f"{unet}-{sampler}-{actors}"
                    r = _throughput(lake, "scm", sampler, steps, actors, n_compounds, draws, name, use_ray=True)
                    rows.append({
                        "benchmark": f"generate {unet} U-Net {px}px {sampler}-{steps}",
                        "metric": f"images/s per actor ({actors} actor{'s' if actors > 1 else ''})",
                        "value": r["per_actor"], "unit": "images/s", "peak_mem_mb": harness.peak_rss_mb(),
                        **priced,
                        "notes": f"{r['images']} images, 1 CPU/actor, block 8; sampling+decode+write time summed "
                                 f"over blocks ({r['busy_s']:.1f} s); random weights"})
                    rows.append({
                        "benchmark": f"generate {unet} U-Net {px}px {sampler}-{steps}",
                        "metric": f"images/s end to end ({actors} actor{'s' if actors > 1 else ''})",
                        "value": r["aggregate"], "unit": "images/s", "peak_mem_mb": harness.peak_rss_mb(),
                        "notes": f"wall {r['wall_s']:.1f} s incl. actor start (model load, diffusers import) "
                                 "and design writing"})
        finally:
            shutil.rmtree(work, ignore_errors=True)
    n = 20_000 if quick else 1_000_000
    m = _design_memory(n)
    rows.append({"benchmark": f"design streaming {n:,} images", "metric": "design rows/s", "value": m["rows"] / m["seconds"],
                 "unit": "rows/s", "peak_mem_mb": harness.peak_rss_mb(),
                 "notes": f"peak Python heap while streaming: {m['peak_mb']:.2f} MiB (block 256); the design is "
                          "never held whole, so memory does not grow with N x compounds"})
    rows.append({"benchmark": f"design streaming {n:,} images", "metric": "peak heap while streaming",
                 "value": m["peak_mb"], "unit": "MiB", "peak_mem_mb": harness.peak_rss_mb(),
                 "notes": "tracemalloc peak over the whole stream"})
    return rows


def main(argv: list[str] | None = None) -> None:
    from benchmarks import harness
    harness.module_main(run, argv)


if __name__ == "__main__":
    main()

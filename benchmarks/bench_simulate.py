"""Simulator throughput: five-channel sites rendered and written per second.

Rows: rendering alone (one process, no I/O), then ``pipelines.simulate.run`` writing to a local lake and to
S3 (a moto server on 127.0.0.1), each with 1 and 2 concurrent plate tasks. Sites use the ``benchmark``
preset's optics and magnification (540 px fields, 40 px cells; 256 px with ``--quick``) on a cut-down plate
count, since the full preset (103,680 sites) is hours of work on a laptop.

    python -m benchmarks.bench_simulate [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
import uuid

from benchmarks.harness import result_row


def _config(quick: bool):
    from cpldm_core.simulate.config import PRESETS

    return dataclasses.replace(
        PRESETS["benchmark"], preset="benchmark-cut", n_sources=2, batches_per_source=1, plates_per_batch=2,
        n_moa=4, compounds_per_moa=6, replicates=1, shared_fraction=0.0, wells_per_plate=8 if quick else 16,
        dmso_wells_per_plate=2,
        sites_per_well=1, image_size=256 if quick else 540, cells_per_site=27.0 if quick else 120.0)


def _render_only(cfg, n_sites: int) -> list[dict]:
    from cpldm_core.simulate.oracle import render_world_site
    from cpldm_core.simulate.world import build_world
    from pipelines.simulate import tiff_bytes

    world = build_world(cfg)
    wells = list(world.wells.itertuples(index=False))[:n_sites]
    render_world_site(world, wells[0], 1)  # warm caches
    t0, c0 = time.perf_counter(), time.process_time()
    images = [render_world_site(world, w, 1) for w in wells]
    t1, c1 = time.perf_counter(), time.process_time()
    for img in images:
        for c in range(img.shape[0]):
            tiff_bytes(img[c], cfg.tiff_compression)
    t2 = time.perf_counter()
    size = f"{cfg.image_size}x{cfg.image_size}px"
    return [result_row("simulate/render", "sites_per_s", len(images) / (t1 - t0), "sites/s",
                       f"render only, 1 process, {size}, {len(images)} sites"),
            result_row("simulate/render", "cpu_ms_per_site", 1000 * (c1 - c0) / len(images), "ms",
                       f"CPU time (independent of machine load), {size}"),
            result_row("simulate/encode", "sites_per_s", len(images) / (t2 - t1), "sites/s",
                       f"5 zlib TIFFs per site, 1 process, {size}")]


def _pipeline(cfg, lake_factory, where: str) -> list[dict]:
    from pipelines import simulate

    rows, rates = [], {}
    for workers in (1, 2):
        lake = lake_factory()
        c = dataclasses.replace(cfg, max_concurrency=workers)
        t0 = time.perf_counter()
        summary = simulate.run(lake, c)
        elapsed = time.perf_counter() - t0
        rates[workers] = summary["sites_written"] / elapsed
        cpu_ms = 1000 * summary["plate_cpu_seconds"] / max(summary["sites_written"], 1)
        rows.append(result_row(f"simulate/{where}", f"sites_per_s_{workers}w", rates[workers], "sites/s",
                               f"{summary['sites_written']} sites, {summary['plates_written']} plates, "
                               f"{summary['bytes_written'] / 1e6:.1f} MB, {workers} plate task(s) at a time, "
                               f"end to end incl. world build and metadata; plate tasks {cpu_ms:.0f} CPU ms/site; "
                               f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"))
    rows.append(result_row(f"simulate/{where}", "speedup_2w_vs_1w", rates[2] / rates[1], "x",
                           "same run, ratio of the two rows above"))
    return rows


def run(quick: bool) -> list[dict]:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    from cpldm_core.simulate.world import build_world
    from pipelines.ray_runtime import ensure_ray
    from pipelines.storage import Lake

    cfg = _config(quick)
    build_world(cfg)  # fingerprints of the compound library are computed once per process
    rows = _render_only(cfg, 4 if quick else 8)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import logging
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ["AWS_ENDPOINT_URL"] = endpoint  # before Ray starts, so workers inherit it
    for attempt in range(3):  # a busy shared machine can time out Ray's node start-up
        try:
            ray = ensure_ray(num_cpus=2)
            break
        except Exception:
            if attempt == 2:
                raise
            time.sleep(10)
    tmp = tempfile.TemporaryDirectory()
    try:
        rows += _pipeline(cfg, lambda: Lake(f"{tmp.name}/{uuid.uuid4().hex}"), "local")

        def s3_lake():
            bucket = f"bench-{uuid.uuid4().hex[:10]}"
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
            return Lake(f"s3://{bucket}/lake", endpoint_url=endpoint)

        rows += _pipeline(cfg, s3_lake, "s3-moto")
    finally:
        tmp.cleanup()
        ray.shutdown()
        server.stop()
    return rows


def _markdown(rows: list[dict]) -> str:
    head = "| benchmark | metric | value | unit | peak_mem_mb | notes |\n|---|---|---|---|---|---|\n"
    return head + "\n".join(f"| {r['benchmark']} | {r['metric']} | {r['value']} | {r['unit']} | "
                            f"{r['peak_mem_mb']} | {r['notes']} |" for r in rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    print(_markdown(run(parser.parse_args().quick)))

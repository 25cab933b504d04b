"""Ingest throughput: sites/s for read+decode+normalise and for the full ingest (read -> encode -> Zarr),
on a local lake and on S3 (moto server on 127.0.0.1), Ray Data versus a plain single-process loop over the
same inputs (ratios from one run), and 1 versus 2 workers. With a GPU, also crops/s for the SDXL-sized VAE.

``python -m benchmarks.bench_ingest [--quick]`` prints a markdown table.
"""
from __future__ import annotations

import argparse
import gzip
import io
import os
import socket
import tempfile
import time

import numpy as np
import pandas as pd

from benchmarks.harness import result_row

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")


def write_raw_lake(lake, n_sites: int, px: int, plates: int | None = 2, distinct: int | None = None,
                   images: list[np.ndarray] | None = None) -> None:
    """JUMP raw layout: ``plates`` plates (None: 384-well plates, as many as needed), 1 site per well, LZW
    uint16 TIFFs, metadata for the catalog. ``distinct``: only that many distinct sites are rendered; site i
    reuses site ``i % distinct``'s bytes (hard-linked on a local lake: 5,000 sites cost no disk), so a scale
    run's input is written in seconds; the readers still open and decode every file. ``images``: the distinct
    sites, each (5, px, px) uint16 (e.g. simulated cells, for profiling); default Poisson noise."""
    import tifffile

    rng = np.random.default_rng(0)
    plates = plates or -(-n_sites // 384)
    per = -(-n_sites // plates)
    if per > 384:
        raise ValueError(f"{per} sites per plate: a 384-well plate holds 384 (pass more plates)")
    distinct = distinct or n_sites
    if images is not None and len(images) < distinct:
        raise ValueError(f"{len(images)} images for {distinct} distinct sites")
    first_of: dict[int, list[str]] = {}   # distinct site -> its 5 lake paths
    wells, rows, k = [], [], 0
    for p in range(plates):
        plate, batch = f"BENCH{p:02d}", f"batch_{p}"
        rows = []
        for i in range(min(per, n_sites - k)):
            well = f"{chr(65 + i // 24)}{i % 24 + 1:02d}"
            urls = {}
            for j, ch in enumerate(CHANNELS):
                rel = (f"raw/source_1/images/{batch}/images/{plate}/Images/"
                       f"r{i // 24 + 1:02d}c{i % 24 + 1:02d}f01p01-ch{j + 1}sk1fk1fl1.tiff")
                if k < distinct:
                    buf = io.BytesIO()
                    plane = (images[k][j] if images is not None else
                             rng.poisson(500 * (j + 1), (px, px)).astype(np.uint16))
                    tifffile.imwrite(buf, plane, compression="lzw")
                    lake.write_bytes(rel, buf.getvalue())
                    first_of.setdefault(k, []).append(rel)
                elif not lake.is_s3:
                    target = lake.fs_path(rel)
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    os.link(lake.fs_path(first_of[k % distinct][j]), target)
                else:
                    lake.write_bytes(rel, lake.read_bytes(first_of[k % distinct][j]))
                urls[f"URL_Orig{ch}"] = lake.uri_of(rel)
            rows.append({**urls, "Metadata_Source": "source_1", "Metadata_Batch": batch, "Metadata_Plate": plate,
                         "Metadata_Well": well, "Metadata_Site": "1"})
            wells.append(("source_1", plate, well, "JCP2022_033924" if i % 4 == 0 else f"JCP2022_{i % 7 + 1:06d}"))
            k += 1
        lake.write_bytes(f"raw/source_1/workspace/load_data_csv/{batch}/{plate}/load_data.csv",
                         pd.DataFrame(rows).to_csv(index=False).encode())

    def gz(df):
        return gzip.compress(df.to_csv(index=False).encode())
    lake.write_bytes("raw/metadata/plate.csv.gz", gz(pd.DataFrame(
        [("source_1", f"batch_{p}", f"BENCH{p:02d}", "COMPOUND") for p in range(plates)],
        columns=["Metadata_Source", "Metadata_Batch", "Metadata_Plate", "Metadata_PlateType"])))
    lake.write_bytes("raw/metadata/well.csv.gz", gz(pd.DataFrame(
        wells, columns=["Metadata_Source", "Metadata_Plate", "Metadata_Well", "Metadata_JCP2022"])))
    ids = ["JCP2022_033924"] + [f"JCP2022_{k:06d}" for k in range(1, 8)]
    lake.write_bytes("raw/metadata/compound.csv.gz", gz(pd.DataFrame(
        {"Metadata_JCP2022": ids, "Metadata_InChIKey": ids, "Metadata_InChI": ids, "Metadata_SMILES": ["C"] * 8})))
    lake.write_bytes("raw/metadata/perturbation_control.csv", pd.DataFrame(
        {"Metadata_JCP2022": ["JCP2022_033924"], "Metadata_pert_type": ["negcon"]}).to_csv(index=False).encode())


def save_vae(lake, arch: str, name: str) -> None:
    from cpldm_core.autoencoder import build_vae
    with tempfile.TemporaryDirectory() as tmp:
        build_vae(arch).save_pretrained(tmp)
        from pipelines.fit_vae import register_vae
        register_vae(lake, name, tmp, note=f"bench_ingest: random {arch} AutoencoderKL")


#: Fixed normalisation of the benchmarks' readers (the ingest stage computes its own from a sample: same cost).
NORM = {"low": [100.0] * 5, "high": [3000.0] * 5}


def plain_ingest_seconds(lake, reader, recs: list[dict], crop: int, batch: int) -> float:
    """The single-process baseline of a full ingest: read -> decode -> normalise (:data:`NORM`) -> centre crop ->
    encode ``batch`` sites at a time with the lake's ``bench-small`` VAE (1 torch thread), no Zarr. Seconds
    for all of ``recs`` (model loading excluded). Local lakes only (the model is loaded from the lake's path)."""
    import torch

    from cpldm_core import images as im
    from cpldm_core.autoencoder import ChannelGroupAutoencoder

    model = ChannelGroupAutoencoder.from_pretrained(lake.fs_path("vae/bench-small"))
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    for start in range(0, len(recs), batch):
        crops = [im.centre_crop(im.normalise(img, NORM["low"], NORM["high"]), crop)
                 for img in reader.read_sites(recs[start:start + batch])]
        model.encode(torch.from_numpy(np.ascontiguousarray(np.stack(crops))))
    return time.perf_counter() - t0


def bench_lake(lake, label: str, n_sites: int, px: int, crop: int, quick: bool) -> list[dict]:
    import ray
    from cpldm_core.images import IngestConfig
    from cpldm_core.load_data import CatalogConfig
    from pipelines import catalog, ingest

    out = []
    write_raw_lake(lake, n_sites, px)
    catalog.run(lake, CatalogConfig(unseen_compound_fraction=0.0, heldout_batch_fraction=0.0))
    sites = lake.read_named("sites").to_pandas()
    recs = ingest.site_records(sites)
    common = dict(endpoint_url=lake.endpoint_url, normalisation=NORM, crop_size=crop)
    note = f"{len(recs)} sites of 5x{px}x{px} LZW TIFFs, {label}"

    # plain single-process loop: read + decode + normalise + crop
    reader = ingest.SiteReader(**common)
    t = time.perf_counter()
    for i in range(0, len(recs), 8):
        batch = {k: np.array([r[k] for r in recs[i:i + 8]], dtype=object) for k in recs[0]}
        batch["order"] = np.arange(len(recs[i:i + 8]))
        batch["unit"] = np.array(["u"] * len(recs[i:i + 8]), dtype=object)
        reader(batch)
    plain = len(recs) / (time.perf_counter() - t)
    out.append(result_row(f"read+decode+normalise {label}", "plain loop", plain, "sites/s", note))
    for workers in (1, 2):
        items = [{"order": i, "unit": "u", **r} for i, r in enumerate(recs)]
        t = time.perf_counter()
        ds = ray.data.from_items(items, override_num_blocks=8).map_batches(
            ingest.SiteReader, fn_constructor_kwargs=common, compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=0.5, batch_size=8, batch_format="numpy")
        n = sum(len(b["ok"]) for b in ds.iter_batches(batch_format="numpy", batch_size=None))
        rate = n / (time.perf_counter() - t)
        out.append(result_row(f"read+decode+normalise {label}", f"ray data, {workers} reader(s)", rate, "sites/s",
                              note))
        out.append(result_row(f"read+decode+normalise {label}", f"ray/plain ratio, {workers} reader(s)", rate / plain,
                              "x", note))

    # full ingest vs a plain loop (read -> normalise -> crop -> encode, no Zarr)
    save_vae(lake, "small", "bench-small")
    if not lake.is_s3:
        plain_full = len(recs) / plain_ingest_seconds(lake, reader, recs, crop, batch=1)
        out.append(result_row(f"full ingest {label}", "plain loop (1 thread)", plain_full, "sites/s",
                              note + f", small VAE, {crop}px crops"))
    for workers in ((1,) if quick else (1, 2)):
        cfg = IngestConfig(vae="bench-small", vae_id=f"bench-{workers}", subset="all", crop_size=crop, stats_sites=8,
                           rows_per_shard=32, batch_size=8, read_concurrency=1, num_cpus_read=0.5,
                           encode_concurrency=workers, num_cpus_encode=0.5 if workers > 1 else 1.0)
        t = time.perf_counter()
        s = ingest.run(lake, cfg, force=True)
        rate = s["encoded_sites"] / (time.perf_counter() - t)
        out.append({**result_row(f"full ingest {label}", f"ray data, {workers} encoder(s)", rate, "sites/s",
                                 note + f", small VAE, {crop}px crops, incl. stats + Zarr + index"),
                    "cost_stage": "ingest", "cost_per": "instance"})
        if not lake.is_s3:   # the plain loop ran (local lakes only)
            out.append(result_row(f"full ingest {label}", f"ray/plain ratio, {workers} encoder(s)",
                                  rate / plain_full, "x", note))
    return out


def bench_gpu_sdxl(quick: bool) -> list[dict]:
    import torch
    if not torch.cuda.is_available():
        return []
    from cpldm_core.autoencoder import ChannelGroupAutoencoder, build_vae
    model = ChannelGroupAutoencoder(build_vae("sdxl", sample_size=384).half().cuda().eval())
    x = torch.rand(16, 5, 384, 384, device="cuda").half() * 2 - 1
    model.encode(x)
    torch.cuda.synchronize()
    n = 5 if quick else 20
    t = time.perf_counter()
    for _ in range(n):
        model.encode(x)
    torch.cuda.synchronize()
    rate = n * len(x) / (time.perf_counter() - t)
    return [{**result_row("SDXL-sized VAE encode (random weights)",
                          f"crops/s per GPU ({torch.cuda.get_device_name()})", rate,
                          "crops/s", "5-channel 384 px crops, 2 groups, fp16, batch 16"),
             "device": "cuda", "cost_stage": "ingest", "cost_per": "gpu"}]


def run(quick: bool = False, **options) -> list[dict]:
    """Options: ``sites`` (int), ``px`` (site image side), ``crop`` (crop side)."""
    from moto.server import ThreadedMotoServer

    from pipelines.ray_runtime import ensure_ray
    from pipelines.storage import Lake

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    ensure_ray(address="local")   # always a fresh local cluster, never one another process started
    n_sites, px, crop = (24, 256, 128) if quick else (96, 512, 256)
    n_sites, px, crop = (int(options.get("sites", n_sites)), int(options.get("px", px)), int(options.get("crop", crop)))
    out = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out += bench_lake(Lake(os.path.join(tmp, "lake")), "local", n_sites, px, crop, quick)
        import boto3
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench-lake")
        out += bench_lake(Lake("s3://bench-lake/lake", endpoint_url=endpoint), "S3 (moto)", n_sites, px, crop, quick)
        out += bench_gpu_sdxl(quick)
    finally:
        server.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rows = run(quick=args.quick)
    print("| benchmark | metric | value | unit | peak MB | notes |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['benchmark']} | {r['metric']} | {r['value']:.3g} | {r['unit']} | {r['peak_mem_mb']} | {r['notes']} |")


if __name__ == "__main__":
    main()

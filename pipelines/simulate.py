"""``cpldm simulate``: write a simulated JUMP-shaped lake (cpg0016 layout) with a known causal structure.

Recipe: build the world in the driver (pure, deterministic) -> write metadata, annotations, ground truth and
the positivity statistics of the plate maps -> one Ray task per plate renders its sites and writes TIFFs +
load_data.csv straight to the lake, then commits the plate (``lake.commit_unit("simulate", plate)``). A rerun
skips committed plates; a plate without a marker is redone from scratch and overwrites its partial files, so a
killed run resumed gives exactly the files of an uninterrupted one. :func:`load_world` rebuilds the world of a
simulated lake (for the oracle renderer, :func:`cpldm_core.simulate.oracle.render_condition`).
"""
from __future__ import annotations

import gzip
import io
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pyarrow as pa

from cpldm_core.configuration import config_to_dict
from cpldm_core.errors import UserError
from cpldm_core.simulate import layout
from cpldm_core.simulate.config import PRESETS, SCENARIOS, SimulationConfig, simulation_config
from cpldm_core.simulate.oracle import render_world_site
from cpldm_core.simulate.render import false_colour, montage
from cpldm_core.simulate.world import (PHENOTYPE_GAIN, PHENOTYPES, World, build_world, positivity_statistics,
                                       world_from_config_dict)
from storage_schemas.columns import CHANNELS, DMSO_JCP2022

log = logging.getLogger(__name__)

STAGE = "simulate"
#: Parallel uploads per plate task: hides S3 round trips and local fsyncs behind rendering.
WRITE_THREADS = 4
#: Preview tiles are enlarged to at least this many pixels.
PREVIEW_MIN_TILE = 128


# ---------------------------------------------------------------------------------------------- encoding
def tiff_bytes(image: np.ndarray, compression: str = "zlib") -> bytes:
    """(H, W) uint16 -> TIFF bytes. No timestamp or varying tags, so the bytes depend on the pixels only."""
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, image, photometric="minisblack", metadata=None, maxworkers=1,
                     compression=None if compression == "none" else compression)
    return buf.getvalue()


def csv_bytes(frame: pd.DataFrame, gzipped: bool = False) -> bytes:
    data = frame.to_csv(index=False).encode()
    if not gzipped:
        return data
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as fh:  # mtime=0: reproducible bytes
        fh.write(data)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- one plate
def simulate_plate(lake, world: World, plate: str) -> dict:
    """Render and write every site of ``plate`` and its load_data.csv, then commit the plate.

    Returns:
        {"plate": str, "sites": int, "images": int, "bytes": int, "cpu_seconds": float (this task's CPU)}
    """
    cpu0 = time.process_time()
    pid = world.plate(plate)
    cfg = world.config
    channel_numbers = layout.channel_numbers(pid.source_index)
    image_dir = layout.image_dir(pid)
    wells = world.wells[world.wells["Metadata_Plate"] == plate]
    rows, written = [], 0
    with ThreadPoolExecutor(WRITE_THREADS) as pool:
        pending = []
        for well in wells.itertuples(index=False):
            for site in range(1, cfg.sites_per_well + 1):
                image = render_world_site(world, well, site)
                urls = {}
                for c, channel in enumerate(CHANNELS):
                    rel = f"{image_dir}/{layout.image_name(well.row, well.col, site, channel_numbers[c])}"
                    data = tiff_bytes(image[c], cfg.tiff_compression)
                    written += len(data)
                    pending.append(pool.submit(lake.write_bytes, rel, data))
                    urls[f"URL_Orig{channel}"] = lake.uri_of(rel)
                rows.append({**urls, "Metadata_Source": pid.source, "Metadata_Batch": pid.batch,
                             "Metadata_Plate": plate, "Metadata_Well": well.Metadata_Well,
                             "Metadata_Site": site})
            # bound the queue so a big plate never holds all its encoded TIFFs in memory
            if len(pending) > 256:
                for f in pending:
                    f.result()
                pending = []
        for f in pending:
            f.result()
    load_data = pd.DataFrame(rows, columns=list(layout.LOAD_DATA_COLUMNS))
    lake.write_bytes(layout.load_data_path(pid), csv_bytes(load_data))
    lake.commit_unit(STAGE, plate, {"sites": len(rows)})
    return {"plate": plate, "sites": len(rows), "images": len(rows) * len(CHANNELS), "bytes": written,
            "cpu_seconds": time.process_time() - cpu0}


# ---------------------------------------------------------------------------------------------- metadata
def metadata_tables(world: World) -> dict[str, pd.DataFrame]:
    """JUMP metadata CSVs of the world, keyed by lake-relative path."""
    plates = pd.DataFrame([{"Metadata_Source": p.source, "Metadata_Batch": p.batch, "Metadata_Plate": p.plate,
                            "Metadata_PlateType": "COMPOUND"} for p in world.plates])
    wells = world.wells[["Metadata_Source", "Metadata_Plate", "Metadata_Well", "Metadata_JCP2022"]]
    compounds = world.compounds[["Metadata_JCP2022", "Metadata_InChIKey", "Metadata_InChI", "Metadata_SMILES"]]
    mapping = []
    for s in range(world.config.n_sources):
        nums = layout.channel_numbers(s)
        row = {"Metadata_Source": layout.source_name(s)}
        row.update({f"Metadata_Channel_Num_{ch}": n for ch, n in zip(CHANNELS, nums)})
        row.update({col: None for col in layout.BRIGHTFIELD_COLUMNS})
        mapping.append(row)
    controls = pd.DataFrame([{"Metadata_JCP2022": DMSO_JCP2022, "Metadata_pert_type": "negcon",
                              "Metadata_Name": "DMSO"}])
    return {layout.PLATE_CSV: plates, layout.WELL_CSV: wells, layout.COMPOUND_CSV: compounds,
            layout.CHANNEL_MAPPING_CSV: pd.DataFrame(mapping, columns=list(layout.CHANNEL_MAPPING_COLUMNS)),
            layout.PERTURBATION_CONTROL_CSV: controls}


def simulation_record(world: World) -> dict:
    """Content of ``raw/simulation.json``: the config (from which :func:`load_world` rebuilds the world) plus
    what a reader needs to interpret the truth, and the positivity statistics."""
    cfg = world.config
    return {"config": config_to_dict(cfg), "preset": cfg.preset, "seed": cfg.seed, "scenario": cfg.scenario,
            "image_size": cfg.image_size, "channels": list(CHANNELS), "phenotypes": list(PHENOTYPES),
            "phenotype_gain": PHENOTYPE_GAIN, "n_plates": len(world.plates), "n_wells": len(world.wells),
            "n_sites": len(world.wells) * cfg.sites_per_well, "n_compounds": int(len(world.compounds)),
            "n_shared_compounds": int(world.compounds["shared"].sum()),
            "positivity": positivity_statistics(world.wells), "site_numbering": "1-based", "dmso": DMSO_JCP2022}


def positivity_table(world: World) -> pa.Table:
    """``simulation_positivity``: one row per statistic (see :func:`positivity_statistics`)."""
    stats = positivity_statistics(world.wells)
    return pa.table({"statistic": pa.array(list(stats), pa.string()),
                     "value": pa.array(list(stats.values()), pa.float64())})


def load_world(lake) -> World:
    """The world a lake was simulated from, rebuilt from ``raw/simulation.json`` (deterministic, ~1 s).

    Raises:
        UserError: the lake holds no simulation (or one recorded by an older cpldm).
    """
    if not lake.exists(layout.SIMULATION_JSON):
        raise UserError(f"{lake.uri_of(layout.SIMULATION_JSON)} does not exist: this lake was not simulated; "
                        "run `cpldm simulate` first")
    record = lake.read_json(layout.SIMULATION_JSON)
    if not isinstance(record, dict) or "config" not in record:
        raise UserError(f"{lake.uri_of(layout.SIMULATION_JSON)} has no 'config'; simulate the lake again")
    return world_from_config_dict(record["config"])


def write_metadata(lake, world: World) -> None:
    """Metadata CSVs, annotations, truth and simulation.json (deterministic; rewritten on every run)."""
    cfg = world.config
    for rel, frame in metadata_tables(world).items():
        lake.write_bytes(rel, csv_bytes(frame, gzipped=rel.endswith(".gz")))
    trt = world.compounds[world.compounds["Metadata_pert_type"] == "trt"]
    moa = trt[["Metadata_JCP2022", "Metadata_InChIKey", "Metadata_moa"]]
    lake.write_named("annotations_moa", pa.Table.from_pandas(moa, preserve_index=False), config=cfg)
    targets = world.targets.merge(world.compounds[["Metadata_JCP2022", "Metadata_InChIKey"]], how="left")
    targets = targets[["Metadata_JCP2022", "Metadata_InChIKey", "Metadata_target"]]
    lake.write_named("annotations_target", pa.Table.from_pandas(targets, preserve_index=False), config=cfg)
    truth = world.truth_compounds()
    lake.write_named("truth_compounds", pa.Table.from_pandas(truth, preserve_index=False), config=cfg)
    lake.write_named("truth_confounders", pa.Table.from_pandas(world.confounders, preserve_index=False),
                     config=cfg)
    lake.write_named("simulation_positivity", positivity_table(world), config=cfg)
    lake.write_bytes(layout.SIMULATION_JSON, json.dumps(simulation_record(world), indent=2, sort_keys=True,
                                                        default=str).encode())


def check_same_world(lake, cfg: SimulationConfig) -> None:
    """Refuse to mix two different simulations in one lake (the resume logic trusts committed plates)."""
    if not lake.exists(layout.SIMULATION_JSON):
        return
    previous = lake.read_json(layout.SIMULATION_JSON).get("config")
    current = config_to_dict(cfg)
    if previous is not None and previous != current and lake.committed_units(STAGE):
        diff = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
        raise UserError(f"{lake.uri_of(layout.SIMULATION_JSON)} holds a different simulation (differs in "
                        f"{', '.join(diff)}); use a fresh lake or `cpldm lake` to remove raw/ and "
                        f"_markers/{STAGE} first")


# ---------------------------------------------------------------------------------------------- preview
def preview_png(world: World, max_columns: int = 12) -> bytes:
    """PNG montage: one row per (source, batch), columns DMSO then one compound per MoA (false colour)."""
    from PIL import Image, ImageDraw

    tiles, labels = [], []
    moa_of = dict(zip(world.compounds["Metadata_JCP2022"], world.compounds["Metadata_moa"]))
    for (source, batch), group in world.wells.groupby(["Metadata_Source", "Metadata_Batch"], sort=True):
        picked, seen = [], set()
        for well in group.itertuples(index=False):
            key = moa_of[well.Metadata_JCP2022] or "DMSO"
            if key not in seen:
                seen.add(key)
                picked.append((key, well))
        picked.sort(key=lambda kw: (kw[0] != "DMSO", kw[0]))
        # small fields are enlarged (nearest neighbour) so labels and cells stay legible
        zoom = max(1, -(-PREVIEW_MIN_TILE // world.config.image_size))
        tiles.append([np.kron(false_colour(render_world_site(world, w, 1)), np.ones((zoom, zoom, 1), np.uint8))
                      for _, w in picked[:max_columns]])
        labels.append((f"{source} {batch.rsplit('_', 1)[-1]}", [k for k, _ in picked[:max_columns]]))
    width = max(len(r) for r in tiles)
    tiles = [r + [None] * (width - len(r)) for r in tiles]
    grid = montage(tiles)
    size, gap = tiles[0][0].shape[0], 4
    image = Image.fromarray(grid)
    draw = ImageDraw.Draw(image)
    for i, (row_label, col_labels) in enumerate(labels):
        y = gap + i * (size + gap)
        for j, text in enumerate(col_labels):
            x = gap + j * (size + gap)
            draw.text((x + 2, y + 2), f"{row_label}\n{text}" if j == 0 else text, fill=(255, 255, 255))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- run
def run(lake, config: SimulationConfig, plates: list[str] | None = None, preview: bool = False) -> dict:
    """Simulate the lake; skip plates already committed.

    Args:
        lake: :class:`pipelines.storage.Lake`.
        config: :class:`SimulationConfig` (see :func:`cpldm_core.simulate.config.simulation_config`).
        plates: only these plate names (default: all); used to resume or to split work.
        preview: also write ``raw/preview.png``.
    Returns:
        {"plates": total, "plates_written", "plates_skipped", "sites_written", "images_written",
         "bytes_written", "sites_total", "compounds", "seconds", "plate_cpu_seconds" (CPU time of the plate
         tasks, summed: the cost independent of how busy the machine is), "positivity" (see
         :func:`cpldm_core.simulate.world.positivity_statistics`)}
    """
    from pipelines.ray_runtime import ensure_ray

    start = time.perf_counter()
    ray = ensure_ray()
    lake.init()
    check_same_world(lake, config)
    world = build_world(config)
    write_metadata(lake, world)
    names = [p.plate for p in world.plates]
    if plates is not None:
        unknown = sorted(set(plates) - set(names))
        if unknown:
            raise UserError(f"unknown plate(s) {', '.join(unknown)}; this simulation has {', '.join(names)}")
        names = [n for n in names if n in set(plates)]
    done = lake.committed_units(STAGE)
    todo = [n for n in names if n not in done]
    log.info("simulate: %d plates (%d already committed), %d sites each x 5 channels, %dx%d px",
             len(names), len(names) - len(todo), config.wells_per_plate * config.sites_per_well,
             config.image_size, config.image_size)
    task = ray.remote(simulate_plate).options(num_cpus=config.num_cpus_per_task, max_retries=2)
    positivity = positivity_statistics(world.wells)
    log.info("simulate: positivity: compounds per (batch, well) median %.1f, mean %.2f, max %d; per (source, "
             "well) median %.1f; %.0f%% of %d treatments in more than one source",
             positivity["compounds_per_batch_well_median"], positivity["compounds_per_batch_well_mean"],
             positivity["compounds_per_batch_well_max"], positivity["compounds_per_source_well_median"],
             100 * positivity["compounds_multi_source_share"], positivity["n_treatments"])
    world_ref = ray.put(world)
    limit = config.max_concurrency or len(todo) or 1
    in_flight, results = [], []
    queue = list(todo)
    while queue or in_flight:
        while queue and len(in_flight) < limit:
            in_flight.append(task.remote(lake, world_ref, queue.pop(0)))
        ready, in_flight = ray.wait(in_flight, num_returns=1)
        out = ray.get(ready[0])
        results.append(out)
        log.info("simulate: plate %s done (%d sites) [%d/%d]", out["plate"], out["sites"], len(results),
                 len(todo))
    if preview:
        lake.write_bytes(layout.PREVIEW_PNG, preview_png(world))
    return {
        "plates": len(names), "plates_written": len(results), "plates_skipped": len(names) - len(todo),
        "sites_written": sum(r["sites"] for r in results), "images_written": sum(r["images"] for r in results),
        "bytes_written": sum(r["bytes"] for r in results), "sites_total": len(world.wells) * config.sites_per_well,
        "compounds": int(len(world.compounds)), "seconds": round(time.perf_counter() - start, 2),
        "plate_cpu_seconds": round(sum(r["cpu_seconds"] for r in results), 2),
        "positivity": {k: round(v, 3) for k, v in positivity.items()},
    }


# ---------------------------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> None:
    from pipelines.cli import add_config_arguments

    p = subparsers.add_parser("simulate", help="write a simulated JUMP-shaped lake with known causal truth",
                              description=__doc__.split("\n")[0])
    add_config_arguments(p, PRESETS, SimulationConfig, preset_help="size preset (default: demo)")
    p.add_argument("--scenario", default="jump", choices=sorted(SCENARIOS),
                   help="causal scenario (default: jump, cpg0016-like plates and confounding; `default` is "
                        "its old name)")
    p.add_argument("--seed", type=int, default=None, help="master seed (default: the preset's, 0)")
    p.add_argument("--plates", default=None, help="comma-separated plate names to simulate (default: all)")
    p.add_argument("--preview", action="store_true", help="also write raw/preview.png (false-colour montage)")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from pipelines.cli import lake_from_args

    cfg = simulation_config(args.preset, args.scenario, args.seed, args.config, args.set)
    lake = lake_from_args(args)
    plates = [x for x in args.plates.split(",") if x] if args.plates else None
    summary = run(lake, cfg, plates=plates, preview=args.preview)
    print(json.dumps(summary, indent=2))
    if args.preview:
        print(f"preview: {lake.uri_of(layout.PREVIEW_PNG)}")
    return 0

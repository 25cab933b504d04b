"""``cpldm catalog``: JUMP load_data + plate/well/compound metadata -> catalog tables and the split.

Reads every ``raw/<source>/workspace/load_data_csv/**/load_data*.{csv,csv.gz,parquet}`` of the lake (or the
load_data files/URIs given), parses them in Ray tasks (one per file), joins ``raw/metadata/`` and writes:

- ``catalog/sites.parquet``: one row per usable 5-channel site, channel URIs and all ``Metadata_*``;
- ``catalog/compounds.parquet``: compounds of those sites;
- ``catalog/split_compounds.parquet`` (seen|unseen) and ``catalog/split_batches.parquet`` (train|heldout);
- ``rejects/stage=catalog/``: every load_data row that did not become a site, with the reason.

Counts reconcile: rows read = sites + rejects. The catalog is one unit (``catalog``): rerunning rewrites it
identically (all outputs are a deterministic function of the inputs and the config).
"""
from __future__ import annotations

import argparse
import json
import logging
import posixpath
import re
import time

import pandas as pd
import pyarrow as pa

from cpldm_core import load_data as ld
from cpldm_core.errors import UserError

log = logging.getLogger(__name__)

STAGE = "catalog"
LOAD_DATA_NAME = re.compile(r"load_data[^/]*\.(csv|csv\.gz|parquet)$")
METADATA_FILES = {"plate": "plate.csv.gz", "well": "well.csv.gz", "compound": "compound.csv.gz",
                  "controls": "perturbation_control.csv", "channel_mapping": "channel_mapping.csv"}


def discover_load_data(lake) -> list[str]:
    """Lake-relative load_data files, one per plate directory (``load_data_with_illum`` preferred), sorted."""
    found = [p for p in lake.ls("raw", recursive=True)
             if "/workspace/load_data_csv/" in p and LOAD_DATA_NAME.search(p)]
    by_dir: dict[str, list[str]] = {}
    for p in found:
        by_dir.setdefault(posixpath.dirname(p), []).append(p)
    chosen = []
    for d, files in sorted(by_dir.items()):
        # a plate directory may hold load_data.csv and load_data_with_illum.csv for the same sites
        files.sort(key=lambda f: (0 if "with_illum" in f else 1, f))
        chosen.append(files[0])
    return chosen


def _read_bytes(lake, path: str) -> bytes:
    from pipelines.storage import open_uri
    if path.startswith("s3://") or path.startswith("/") or path.startswith("file://"):
        with open_uri(path, lake.endpoint_url) as fh:
            return fh.read()
    return lake.read_bytes(path)


def parse_file(lake, path: str) -> tuple[pd.DataFrame, list[tuple[str, str]], int]:
    """Ray task body: one load_data file -> (sites, rejects, rows read).

    A file that cannot be parsed (random bytes, a row with extra fields, no ``URL_Orig*`` column) is one
    reject whose item is the file itself, with 0 rows read: the other files are still catalogued. Storage
    failures (endpoint unreachable, access denied) are not the file's fault and stop the stage.
    """
    data = _read_bytes(lake, path)
    try:
        df = ld.read_table_bytes(data, path)
        sites, rejects = ld.parse_load_data(df, path, ld.defaults_from_path(path))
    except UserError as exc:
        return pd.DataFrame(), [(path, f"load_data file rejected: {str(exc).splitlines()[0]}")], 0
    return sites, rejects, len(df)


def read_metadata(lake, metadata: str) -> dict[str, pd.DataFrame | None]:
    """The metadata tables of ``metadata`` (lake-relative dir or URI); channel mapping is optional."""
    out = {}
    for key, name in METADATA_FILES.items():
        path = f"{metadata.rstrip('/')}/{name}"
        try:
            data = _read_bytes(lake, path)
        except (FileNotFoundError, UserError):
            if key == "channel_mapping":
                out[key] = None
                continue
            raise UserError(f"metadata file {path} not found (lake {lake.uri}); run `cpldm simulate` or copy "
                            f"JUMP's metadata/{name} there") from None
        out[key] = ld.read_table_bytes(data, path)
    return out


def to_arrow(df: pd.DataFrame, table_name: str) -> pa.Table:
    """DataFrame -> Arrow with the table's exact schema (all-None columns become typed nulls)."""
    import storage_schemas
    schema = storage_schemas.table_spec(table_name).schema
    return pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)


def run(lake, config: ld.CatalogConfig, load_data: list[str] | None = None) -> dict:
    """Build the catalog. ``load_data`` overrides ``config.load_data`` (files/URIs).

    Returns:
        {"load_data_files", "rows", "sites", "rejected", "compounds", "unseen_compounds", "batches",
         "heldout_batches", "plates", "seconds"}
    """
    from pipelines.ray_runtime import ensure_ray

    start = time.perf_counter()
    ray = ensure_ray()
    files = list(load_data or config.load_data) or discover_load_data(lake)
    if not files:
        raise UserError(f"no load_data files under {lake.uri_of('raw')}/<source>/workspace/load_data_csv/; "
                        "run `cpldm simulate` first or pass --load-data")
    meta = read_metadata(lake, config.metadata)
    log.info("catalog: parsing %d load_data file(s)", len(files))
    task = ray.remote(parse_file).options(num_cpus=0.5)
    results = ray.get([task.remote(lake, f) for f in files])
    parts, rejects, n_rows, bad_files = [], [], 0, 0
    for path, (sites, rej, n) in zip(files, results):
        if len(sites):
            parts.append(sites)
        bad_files += int(n == 0 and len(rej) == 1 and rej[0][0] == path)
        rejects += [(path, item, reason) for item, reason in rej]
        n_rows += n
    if bad_files:
        log.warning("catalog: %d load_data file(s) rejected as a whole (see rejects, stage=catalog)", bad_files)
    if not parts:
        raise UserError(f"catalog: none of the {len(files)} load_data file(s) has a usable row; first rejects: "
                        + "; ".join(f"{i}: {r}" for _, i, r in rejects[:3]))
    sites = pd.concat(parts, ignore_index=True)
    if config.sources and len(sites):
        keep = sites["Metadata_Source"].isin(config.sources)
        rejects += [(STAGE, k, "source not selected (config.sources)") for k in sites.loc[~keep, "Metadata_SiteKey"]]
        sites = sites[keep].reset_index(drop=True)
    # the same site listed in two load_data files is one site: keep the first (files are sorted)
    dup = sites.duplicated("Metadata_SiteKey", keep="first") if len(sites) else pd.Series([], dtype=bool)
    rejects += [(STAGE, k, "site listed in more than one load_data file") for k in sites.loc[dup, "Metadata_SiteKey"]]
    sites = sites[~dup].reset_index(drop=True)
    if meta["channel_mapping"] is not None:
        sites, rej = ld.check_channel_numbers(sites, ld.parse_channel_mapping(meta["channel_mapping"]))
        rejects += [(STAGE, item, reason) for item, reason in rej]
    sites, rej = ld.join_metadata(sites, meta["plate"], meta["well"], meta["compound"], meta["controls"])
    rejects += [(STAGE, item, reason) for item, reason in rej]
    sites = ld.sort_sites(sites)
    if sites.empty:
        raise UserError(f"catalog: none of the {n_rows} load_data rows is usable; first rejects: "
                        + "; ".join(f"{i}: {r}" for _, i, r in rejects[:5]))

    compounds = (sites[["Metadata_JCP2022", "Metadata_InChIKey", "Metadata_SMILES", "Metadata_pert_type"]]
                 .drop_duplicates("Metadata_JCP2022").sort_values("Metadata_JCP2022").reset_index(drop=True))
    split_c = ld.split_compounds(compounds, config.unseen_compound_fraction, config.seed)
    split_b = ld.split_batches(sites, config.heldout_batch_fraction, config.seed)

    lake.write_named("sites", to_arrow(sites, "sites"), config=config)
    lake.write_named("compounds", to_arrow(compounds, "compounds"), config=config)
    lake.write_named("split_compounds", to_arrow(split_c, "split_compounds"), config=config)
    lake.write_named("split_batches", to_arrow(split_b, "split_batches"), config=config)
    rej_tbl = pa.table({"unit": [r[0] for r in rejects], "item": [r[1] for r in rejects],
                        "reason": [r[2] for r in rejects]},
                       schema=pa.schema([("unit", pa.string()), ("item", pa.string()), ("reason", pa.string())]))
    lake.write_named("rejects", rej_tbl, config=config, part=STAGE, partition={"stage": STAGE})
    summary = {
        "load_data_files": len(files), "load_data_files_rejected": bad_files, "rows": n_rows, "sites": len(sites),
        "rejected": len(rejects),
        "compounds": len(compounds), "unseen_compounds": int((split_c["Metadata_CompoundSplit"] == "unseen").sum()),
        "batches": len(split_b), "heldout_batches": int((split_b["Metadata_BatchSplit"] == "heldout").sum()),
        "plates": int(sites[["Metadata_Source", "Metadata_Batch", "Metadata_Plate"]].drop_duplicates().shape[0]),
    }
    lake.commit_unit(STAGE, STAGE, summary)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    log.info("catalog: %s", summary)
    return summary


# ---------------------------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> None:
    from pipelines.cli import add_config_arguments

    p = subparsers.add_parser("catalog", help="JUMP load_data + metadata -> catalog tables and the split",
                              description=__doc__.split("\n")[0])
    add_config_arguments(p, ld.CATALOG_PRESETS, ld.CatalogConfig)
    p.add_argument("--load-data", action="append", default=None, metavar="URI",
                   help="a load_data file (CSV/Parquet, local or s3://); repeatable (default: discover in the lake)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from pipelines.cli import config_from_args, lake_from_args

    cfg = config_from_args(ld.CatalogConfig, ld.CATALOG_PRESETS, args)
    summary = run(lake_from_args(args), cfg, load_data=args.load_data)
    print(json.dumps(summary, indent=2))
    return 0

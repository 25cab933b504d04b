"""``cpldm embed``: embed every catalog compound (plus optional novel SMILES) once per encoder, cached in the lake.

Recipe: read ``compounds`` (+ ``--smiles FILE``) -> drop compounds already cached for this encoder ->
split the rest into units of ``block_size`` compounds (sorted by JCP2022 id) -> Ray Data
``map_batches(EmbedUnits)`` (one model per actor; per unit: parse + canonicalise with RDKit, encode, write
the Zarr token rows, then the Parquet part, then the unit marker) -> summary.

Outputs (``storage_schemas/embeddings.py``): table ``embeddings`` under ``embeddings/encoder=<id>/``,
``embeddings/<id>/config.json``, and for MolT5 ``embeddings/<id>/tokens.zarr``. Invalid SMILES go to
``rejects`` (stage ``embed``) with RDKit's message and are retried on every run (they are never cached).

Exactly-once: a unit's part counts as cached only once its marker exists; parts without a marker (a run
killed midway) are deleted at the start of the next run and their compounds redone. Token rows are allocated
from the committed rows only, so a redone unit overwrites whatever the killed one left. One run at a time extends
an encoder's cache (a claim on it, :meth:`Lake.wait_and_claim`): a second run started meanwhile waits, then
embeds only what the first did not.

Reading for training: :func:`load_embeddings` -> ``(ids, pooled, tokens, mask)`` sorted by JCP2022 id.
"""
from __future__ import annotations

import hashlib
import logging
import math
import posixpath
import time
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa

from cpldm_core import compounds as cc
from cpldm_core.configuration import config_to_dict, load_config
from cpldm_core.errors import UserError
from storage_schemas import columns as col
from storage_schemas import embeddings as schema

log = logging.getLogger(__name__)

STAGE = "embed"
#: Claim held by the one run that extends an encoder's cache (no unit is named so: units are ``part-<hash>``).
CACHE_UNIT = "_cache"
ID_COLUMNS = ("Metadata_JCP2022", "ID", "id")                 # accepted id column names of --smiles files
SMILES_COLUMNS = ("Metadata_SMILES", "SMILES", "smiles")      # accepted SMILES column names


# ---------------------------------------------------------------------------------------------- paths
def table_dir(encoder_id: str) -> str:
    """Lake-relative directory of one encoder's ``embeddings`` partition."""
    return f"{schema.EMBEDDINGS.path}/encoder={encoder_id}"


def artifact_dir(encoder_id: str) -> str:
    """Lake-relative directory of ``config.json`` and ``tokens.zarr``."""
    return f"{schema.EMBEDDINGS.path}/{encoder_id}"


def tokens_path(encoder_id: str) -> str:
    return f"{artifact_dir(encoder_id)}/tokens.zarr"


def unit_stage(encoder_id: str) -> str:
    """Marker namespace: units of different encoders never collide."""
    return f"{STAGE}-{encoder_id}"


# ---------------------------------------------------------------------------------------------- inputs
def read_smiles_file(path: str, endpoint_url: str | None = None) -> pd.DataFrame:
    """Novel compounds from a CSV (local or s3://) with an id column (``Metadata_JCP2022`` or ``ID``) and a
    SMILES column (``Metadata_SMILES`` or ``SMILES``). Returns columns Metadata_JCP2022, Metadata_SMILES, item.
    """
    from pipelines.storage import open_uri

    try:
        with open_uri(path, endpoint_url) as fh:
            df = pd.read_csv(fh, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise UserError(f"--smiles file {path} does not exist") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise UserError(f"--smiles file {path} is not a readable CSV: {exc}") from None
    id_col = next((c for c in ID_COLUMNS if c in df.columns), None)
    smiles_col = next((c for c in SMILES_COLUMNS if c in df.columns), None)
    if id_col is None or smiles_col is None:
        raise UserError(f"--smiles file {path} needs an id column ({' or '.join(ID_COLUMNS)}) and a SMILES "
                        f"column ({' or '.join(SMILES_COLUMNS)}); it has {', '.join(df.columns)}")
    empty_ids = df.index[df[id_col].str.strip() == ""].tolist()
    if empty_ids:
        raise UserError(f"--smiles file {path}: row(s) {', '.join(str(i + 2) for i in empty_ids[:5])} "
                        "have an empty id")
    return pd.DataFrame({"Metadata_JCP2022": df[id_col].str.strip(), "Metadata_SMILES": df[smiles_col],
                         "item": [f"{path}:{i + 2}" for i in range(len(df))]})  # +2: header, 1-based lines


def gather_inputs(lake, smiles_file: str | None, include_catalog: bool) -> tuple[pd.DataFrame, list[dict]]:
    """Catalog compounds then file compounds, one row per id. Returns (inputs, rejects).

    A DMSO row without SMILES gets :data:`cpldm_core.compounds.DMSO_SMILES` (the control is a molecule);
    an id given twice with different SMILES keeps its first occurrence (catalog first) and rejects the other.
    """
    frames = []
    if include_catalog:
        if lake.exists(lake.table_path("compounds")):
            cat = lake.read_named("compounds", columns=["Metadata_JCP2022", "Metadata_SMILES"]).to_pandas()
            cat["item"] = cat["Metadata_JCP2022"]
            frames.append(cat)
        elif smiles_file is None:
            raise UserError(f"{lake.uri_of(lake.table_path('compounds'))} does not exist: run `cpldm catalog` "
                            "first or pass --smiles FILE")
    if smiles_file is not None:
        frames.append(read_smiles_file(smiles_file, lake.endpoint_url))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["Metadata_JCP2022", "Metadata_SMILES", "item"])
    df["Metadata_SMILES"] = df["Metadata_SMILES"].fillna("").astype(str).str.strip()
    dmso = (df["Metadata_JCP2022"] == col.DMSO_JCP2022) & (df["Metadata_SMILES"] == "")
    df.loc[dmso, "Metadata_SMILES"] = cc.DMSO_SMILES
    rejects = []
    first = df.drop_duplicates("Metadata_JCP2022", keep="first")
    dup = df.loc[~df.index.isin(first.index)]
    kept = first.set_index("Metadata_JCP2022")["Metadata_SMILES"]
    for row in dup.itertuples():
        if row.Metadata_SMILES != kept[row.Metadata_JCP2022]:
            rejects.append({"unit": "inputs", "item": row.item,
                            "reason": f"{row.Metadata_JCP2022} given twice with different SMILES "
                                      f"({kept[row.Metadata_JCP2022]!r} kept, {row.Metadata_SMILES!r} rejected)"})
    return first.sort_values("Metadata_JCP2022").reset_index(drop=True), rejects


# ---------------------------------------------------------------------------------------------- cache state
def committed_parts(lake, encoder_id: str) -> tuple[list[str], list[str]]:
    """(parts of committed units, stale parts without a marker) of one encoder's partition."""
    lake.fs.invalidate_cache()  # s3fs caches listings; Ray workers wrote parts and markers since
    done = lake.committed_units(unit_stage(encoder_id))
    parts = [p for p in lake.ls(table_dir(encoder_id)) if p.endswith(".parquet")]
    good = [p for p in parts if posixpath.basename(p)[: -len(".parquet")] in done]
    return good, [p for p in parts if p not in good]


def read_embeddings_table(lake, encoder_id: str, columns: list[str] | None = None) -> pa.Table:
    """The committed rows of one encoder (empty table with the schema when nothing is cached)."""
    import pyarrow.parquet as pq

    good, _ = committed_parts(lake, encoder_id)
    names = [f.name for f in schema.EMBEDDINGS.schema if f.name != "encoder"]
    empty = pa.schema([schema.EMBEDDINGS.schema.field(n) for n in names])
    tables = []
    for rel in good:
        with lake.fs.open(lake.fs_path(rel), "rb") as fh:
            tables.append(pq.read_table(fh, columns=columns))
    if not tables:
        return empty.empty_table() if columns is None else pa.schema([empty.field(c) for c in columns]).empty_table()
    return pa.concat_tables(tables, promote_options="permissive")


def check_or_write_config(lake, encoder_id: str, cfg: cc.EmbedConfig) -> None:
    """Refuse to extend a cache made with other encoder settings (its vectors would not be comparable)."""
    rel = f"{artifact_dir(encoder_id)}/config.json"
    settings = cc.encoder_settings(cfg)
    if lake.exists(rel):
        stored = lake.read_json(rel).get("settings")
        if stored != settings:
            raise UserError(f"encoder id {encoder_id!r} is cached at {lake.uri_of(artifact_dir(encoder_id))} with "
                            f"settings {stored}, not {settings}; set encoder_id to a new name")
        return
    lake.write_config(artifact_dir(encoder_id), cfg, extra={"settings": settings, "encoder_id": encoder_id})


# ---------------------------------------------------------------------------------------------- units
def plan_units(todo: pd.DataFrame, cfg: cc.EmbedConfig, encoder_id: str, first_row: int) -> list[dict]:
    """Split ``todo`` (sorted by id) into units of ``block_size``; each unit owns rows
    ``row_start .. row_start + block_size`` of tokens.zarr (chunk-aligned, so units never share a chunk).
    Unit names hash their ids, so the same work always gets the same name."""
    units = []
    for i, start in enumerate(range(0, len(todo), cfg.block_size)):
        block = todo.iloc[start:start + cfg.block_size]
        ids = block["Metadata_JCP2022"].tolist()
        digest = hashlib.sha1("\n".join(ids).encode()).hexdigest()[:16]
        units.append({"unit": f"part-{digest}", "ids": ids, "smiles": block["Metadata_SMILES"].tolist(),
                      "items": block["item"].tolist(), "row_start": first_row + i * cfg.block_size})
    return units


def next_free_row(table: pa.Table, chunk_rows: int) -> int:
    """First chunk-aligned tokens.zarr row after every committed row."""
    if table.num_rows == 0 or table.column("Metadata_TokenRow").null_count == table.num_rows:
        return 0
    import pyarrow.compute as pc

    last = int(pc.max(table.column("Metadata_TokenRow")).as_py())
    return int(math.ceil((last + 1) / chunk_rows) * chunk_rows)


def prepare_tokens_array(lake, encoder_id: str, cfg: cc.EmbedConfig, rows: int, dim: int) -> None:
    """Create or grow ``tokens.zarr`` (tokens (rows, T, D) float16, mask (rows, T) bool) before workers write."""
    import zarr

    store = lake.zarr_store(tokens_path(encoder_id))
    group = zarr.open_group(store=store, mode="a")
    t, c = cfg.molt5_max_tokens, cfg.token_chunk_rows
    if schema.TOKENS_ARRAY not in group:
        group.create_array(schema.TOKENS_ARRAY, shape=(rows, t, dim), chunks=(c, t, dim), dtype="float16",
                           fill_value=0)
        group.create_array(schema.MASK_ARRAY, shape=(rows, t), chunks=(c, t), dtype="bool", fill_value=False)
        group.attrs.update({"encoder_id": encoder_id, "max_tokens": t, "config": config_to_dict(cfg)})
        return
    tokens, mask = group[schema.TOKENS_ARRAY], group[schema.MASK_ARRAY]
    if tokens.shape[1:] != (t, dim):
        raise UserError(f"{lake.uri_of(tokens_path(encoder_id))} holds tokens of shape (T, D)={tokens.shape[1:]}, "
                        f"this encoder gives {(t, dim)}")
    if tokens.shape[0] < rows:
        tokens.resize((rows, t, dim))
        mask.resize((rows, t))


class EmbedUnits:
    """Ray Data callable: holds one encoder (loaded once) and embeds whole units.

    ``__call__(batch)`` takes columns ``unit, ids, smiles, items, row_start`` (one row per unit) and for each
    unit writes the Zarr token rows, the Parquet part, the rejects part and finally the unit marker.
    Returns per-unit counts and the Ray node that did the work. Usable without Ray (tests call it directly).
    """

    def __init__(self, lake, cfg: cc.EmbedConfig, encoder_id: str):
        self.lake, self.cfg, self.encoder_id = lake, cfg, encoder_id
        self.encoder = cc.make_encoder(cfg)

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {"unit": [], "embedded": [], "rejected": [], "node": [], "seconds": []}
        for i in range(len(batch["unit"])):
            t0 = time.perf_counter()
            unit = str(batch["unit"][i])
            n_ok, n_bad = self.embed_unit(unit, list(batch["ids"][i]), list(batch["smiles"][i]),
                                          list(batch["items"][i]), int(batch["row_start"][i]))
            node = _node_id()
            self.lake.commit_unit(unit_stage(self.encoder_id), unit, {"embedded": n_ok, "rejected": n_bad,
                                                                      "node": node})
            out["unit"].append(unit)
            out["embedded"].append(n_ok)
            out["rejected"].append(n_bad)
            out["node"].append(node)
            out["seconds"].append(time.perf_counter() - t0)
            log.info("embed %s: unit %s: %d embedded, %d rejected", self.encoder_id, unit, n_ok, n_bad)
            if self.cfg.unit_pause_s:
                time.sleep(self.cfg.unit_pause_s)
        return {k: np.asarray(v) for k, v in out.items()}

    def embed_unit(self, unit: str, ids: list[str], smiles: list[str], items: list[str],
                   row_start: int) -> tuple[int, int]:
        ok_ids, ok_keys, ok_smiles, rejects = [], [], [], []
        for cid, s, item in zip(ids, smiles, items):
            try:
                m = cc.molecule(s)
            except UserError as exc:
                rejects.append({"unit": unit, "item": item, "reason": f"{cid}: {exc}"})
                continue
            ok_ids.append(cid)
            ok_keys.append(m.inchikey)
            ok_smiles.append(m.smiles)
        rows = None
        enc = self.encoder.encode(ok_smiles) if ok_smiles else None
        if enc is not None and enc["tokens"] is not None:
            import zarr

            group = zarr.open_group(store=self.lake.zarr_store(tokens_path(self.encoder_id)), mode="r+")
            stop = row_start + len(ok_smiles)
            group[schema.TOKENS_ARRAY][row_start:stop] = enc["tokens"].astype(np.float16)
            group[schema.MASK_ARRAY][row_start:stop] = enc["mask"]
            rows = np.arange(row_start, stop, dtype=np.int64)
        if enc is not None:
            pooled = enc["pooled"].astype(np.float32)
            flat = pa.array(pooled.reshape(-1), type=pa.float32())
            table = pa.table({
                "Metadata_JCP2022": pa.array(ok_ids, pa.string()),
                "Metadata_InChIKey": pa.array(ok_keys, pa.string()),
                "Metadata_CanonicalSMILES": pa.array(ok_smiles, pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(flat, pooled.shape[1]).cast(pa.list_(pa.float32())),
                "Metadata_TokenRow": pa.array(rows, pa.int64()) if rows is not None
                else pa.nulls(len(ok_ids), pa.int64()),
            })
            self.lake.write_named("embeddings", table, config=self.cfg, part=unit,
                                  partition={"encoder": self.encoder_id})
        write_rejects(self.lake, self.encoder_id, unit, rejects)
        return len(ok_ids), len(rejects)


def write_rejects(lake, encoder_id: str, unit: str, rejects: list[dict]) -> None:
    """Rejects of one unit at ``rejects/stage=embed/<encoder_id>--<unit>.parquet`` (overwritten on rerun)."""
    rel = f"rejects/stage={STAGE}/{encoder_id}--{unit}.parquet"
    if not rejects:
        lake.delete(rel)
        return
    lake.write_named("rejects", pa.Table.from_pylist(rejects), part=f"{encoder_id}--{unit}",
                     partition={"stage": STAGE})


def _node_id() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # not inside Ray: unit tests call EmbedUnits directly
        pass
    return "local"


# ---------------------------------------------------------------------------------------------- stage
def run(lake, config: cc.EmbedConfig | None = None, smiles_file: str | None = None,
        include_catalog: bool = True) -> dict:
    """Embed the catalog's compounds (and ``smiles_file``'s) not yet cached for ``config``'s encoder.

    Returns counts: ``inputs`` (distinct ids), ``cached`` (embedded before this run), ``embedded`` (this run),
    ``rejected`` (invalid SMILES, RDKit's reason in ``rejects``), with inputs == cached + embedded + rejected;
    ``duplicates_rejected`` (an id given again with other SMILES), ``units``, ``encoder_id`` and ``nodes``
    (Ray node ids that ran units).
    """
    cfg = config or cc.EmbedConfig()
    enc_id = cc.encoder_id(cfg)
    inputs, input_rejects = gather_inputs(lake, smiles_file, include_catalog)
    dim = molt5_dim(cfg.molt5_model) if cfg.encoder == "molt5" else cfg.morgan_bits  # fails early on a bad model
    check_or_write_config(lake, enc_id, cfg)
    # one run at a time per encoder: units are planned from what is cached, so two runs would split the same
    # compounds differently and both place them at the same token rows; a second run waits for the first,
    # then finds its compounds cached
    lake.wait_and_claim(unit_stage(enc_id), CACHE_UNIT)
    try:
        return embed_missing(lake, cfg, enc_id, inputs, input_rejects, dim)
    finally:
        lake.release_unit(unit_stage(enc_id), CACHE_UNIT)


def embed_missing(lake, cfg: cc.EmbedConfig, enc_id: str, inputs: pd.DataFrame, input_rejects: list[dict],
                  dim: int) -> dict:
    """Embed the ``inputs`` not yet cached for ``enc_id`` (under the caller's claim on the cache); see :func:`run`."""
    _, stale = committed_parts(lake, enc_id)
    for rel in stale:  # outputs of units a killed run never committed: redo them
        lake.delete(rel)
    for rel in lake.ls(f"rejects/stage={STAGE}"):  # invalid SMILES are re-examined every run
        if posixpath.basename(rel).startswith(f"{enc_id}--"):
            lake.delete(rel)
    write_rejects(lake, enc_id, "inputs", input_rejects)
    cached = read_embeddings_table(lake, enc_id, columns=["Metadata_JCP2022", "Metadata_TokenRow"])
    cached_ids = set(cached.column("Metadata_JCP2022").to_pylist())
    todo = inputs.loc[~inputs["Metadata_JCP2022"].isin(cached_ids)].reset_index(drop=True)
    units = plan_units(todo, cfg, enc_id, next_free_row(cached, cfg.token_chunk_rows))
    summary = {"encoder_id": enc_id, "inputs": len(inputs), "cached": len(inputs) - len(todo), "embedded": 0,
               "rejected": 0, "duplicates_rejected": len(input_rejects), "units": len(units),
               "nodes": []}
    log.info("embed %s: %d compounds, %d cached, %d to embed in %d unit(s)", enc_id, len(inputs),
             summary["cached"], len(todo), len(units))
    if not units:
        return summary
    if cfg.encoder == "molt5":
        rows = units[-1]["row_start"] + cfg.block_size
        prepare_tokens_array(lake, enc_id, cfg, rows, dim)
    results = _run_units(lake, cfg, enc_id, units)
    summary["embedded"] = int(sum(results["embedded"]))
    summary["rejected"] += int(sum(results["rejected"]))
    summary["nodes"] = sorted(set(map(str, results["node"])))
    log.info("embed %s: %d embedded, %d rejected", enc_id, summary["embedded"], summary["rejected"])
    return summary


def molt5_dim(path_or_id: str) -> int:
    """Hidden size D of a T5 checkpoint, read from its config only (no weights)."""
    from transformers import AutoConfig

    try:
        return int(AutoConfig.from_pretrained(path_or_id).d_model)
    except OSError as exc:
        raise UserError(f"cannot load MolT5 encoder config from {path_or_id!r}: {exc}") from None


def _run_units(lake, cfg: cc.EmbedConfig, enc_id: str, units: list[dict]) -> dict[str, list]:
    """Units through Ray Data: an actor pool of ``concurrency`` encoders, one unit per call."""
    from pipelines.ray_runtime import ensure_ray

    ray = ensure_ray()
    num_gpus = cfg.num_gpus
    if num_gpus is None:
        num_gpus = 1.0 if cfg.encoder == "molt5" and ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    ds = ds.map_batches(EmbedUnits, fn_constructor_kwargs={"lake": lake, "cfg": cfg, "encoder_id": enc_id},
                        batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(cfg.concurrency, len(units))),
                        num_cpus=cfg.num_cpus, num_gpus=num_gpus)
    rows = ds.take_all()
    return {k: [r[k] for r in rows] for k in ("unit", "embedded", "rejected", "node")}


# ---------------------------------------------------------------------------------------------- reading
class CompoundEmbeddings(NamedTuple):
    """Embeddings of one encoder, rows sorted by JCP2022 id.

    ids: (N,) str. pooled: (N, D) float32. tokens: (N, T, D) float16 or None (Morgan). mask: (N, T) bool or None.
    """

    ids: np.ndarray
    pooled: np.ndarray
    tokens: np.ndarray | None
    mask: np.ndarray | None


def load_embeddings(lake, encoder_id: str = "morgan-r2-2048", ids: list[str] | None = None) -> CompoundEmbeddings:
    """Read one encoder's cache for training/generation (optionally only ``ids``, in sorted order).

    Raises :class:`UserError` when nothing is cached or a requested id is missing.
    """
    table = read_embeddings_table(lake, encoder_id)
    if table.num_rows == 0:
        raise UserError(f"no embeddings for encoder {encoder_id!r} in {lake.uri}; run `cpldm embed` first")
    df = table.to_pandas().sort_values("Metadata_JCP2022").reset_index(drop=True)
    if ids is not None:
        missing = sorted(set(ids) - set(df["Metadata_JCP2022"]))
        if missing:
            raise UserError(f"encoder {encoder_id!r} has no embedding for {len(missing)} compound(s), e.g. "
                            f"{', '.join(missing[:5])}; rerun `cpldm embed` (or see the rejects table)")
        df = df.loc[df["Metadata_JCP2022"].isin(set(ids))].reset_index(drop=True)
    pooled = np.stack(df["embedding"].to_numpy()).astype(np.float32) if len(df) else np.zeros((0, 0), np.float32)
    tokens = mask = None
    if df["Metadata_TokenRow"].notna().any():
        import zarr

        group = zarr.open_group(store=lake.zarr_store(tokens_path(encoder_id), read_only=True), mode="r")
        rows = df["Metadata_TokenRow"].astype(np.int64).to_numpy()
        tokens = group[schema.TOKENS_ARRAY].get_orthogonal_selection((rows, slice(None), slice(None)))
        mask = group[schema.MASK_ARRAY].get_orthogonal_selection((rows, slice(None)))
    return CompoundEmbeddings(df["Metadata_JCP2022"].to_numpy(dtype=object), pooled, tokens, mask)


# ---------------------------------------------------------------------------------------------- CLI
def load_embed_config(config_file: str | None = None, overrides: list[str] | dict | None = None,
                      preset: str = "demo") -> cc.EmbedConfig:
    return load_config(cc.EmbedConfig, config_file, overrides, base=cc.embed_preset(preset))


def add_parser(subparsers) -> None:
    from pipelines.cli import add_config_arguments

    p = subparsers.add_parser("embed", help="embed catalog compounds (+ novel SMILES) with Morgan or MolT5, cached",
                              description=__doc__.split("\n")[0])
    p.add_argument("--encoder", choices=cc.ENCODERS, default=None, help="encoder (default: morgan)")
    p.add_argument("--model", default=None, help="MolT5 checkpoint: local directory or model id")
    p.add_argument("--smiles", default=None, metavar="FILE",
                   help="CSV of extra compounds: Metadata_JCP2022 (or ID) and SMILES (or Metadata_SMILES)")
    p.add_argument("--no-catalog", action="store_true", help="embed only --smiles, not the catalog's compounds")
    add_config_arguments(p, cc.EMBED_PRESETS, cc.EmbedConfig)
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    import json

    from pipelines.cli import lake_from_args

    overrides = list(args.set)
    if args.encoder:
        overrides.append(f"encoder={args.encoder}")
    if args.model:
        overrides.append(f"molt5_model={args.model}")
    cfg = load_embed_config(args.config, overrides, preset=args.preset)
    lake = lake_from_args(args)
    lake.check_reachable()
    summary = run(lake, cfg, smiles_file=args.smiles, include_catalog=not args.no_catalog)
    print(json.dumps(summary, indent=2))
    return 0

"""JUMP ``load_data`` parsing, metadata joins and the train/held-out split (pure pandas).

JUMP (cpg0016) describes every site (5-channel image set) in per-plate ``load_data`` tables, in two formats:

- current: CSV with ``URL_Orig<Channel>`` full URIs (``s3://cellpainting-gallery/cpg0016-jump/...``), optional
  ``URL_Illum<Channel>`` illumination functions;
- legacy: ``FileName_Orig<Channel>`` + ``PathName_Orig<Channel>`` (and ``*_Illum*``), as CSV or Parquet,
  sometimes without ``Metadata_Source``/``Metadata_Batch`` (taken from the file's location then).

Plate ids are strings even when all digits (``110000295571``); wells are ``A01`` (384-well) or up to
``AF48`` (1536-well); sites are numbered from 0 or 1 depending on the source and kept as the source numbers
them. Rows that cannot be used are returned as rejects ``(item, reason)``, never silently dropped.
"""
from __future__ import annotations

import hashlib
import io
import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cpldm_core.errors import UserError

CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")  # same order as storage_schemas.columns.CHANNELS
DMSO_JCP2022 = "JCP2022_033924"                 # JUMP metadata/README.md

#: 1536-well plates have 32 rows (A..AF) and 48 columns; 384-well plates 16 rows (A..P) and 24 columns.
MAX_WELL_ROWS = 32
MAX_WELL_COLUMNS = 48

#: Phenix (Opera) file names carry the channel number: r01c01f01p01-ch3sk1fk1fl1.tiff.
PHENIX_CHANNEL = re.compile(r"-ch(\d+)sk", re.IGNORECASE)
WELL_PATTERN = re.compile(r"^([A-Za-z]{1,2})0*(\d{1,2})$")

SITE_COLUMNS = ("Metadata_Source", "Metadata_Batch", "Metadata_Plate", "Metadata_Well", "Metadata_Site")


@dataclass(frozen=True)
class CatalogConfig:
    """``cpldm catalog``: JUMP load_data + metadata -> ``sites``, ``compounds`` and split tables.

    Attributes:
        load_data: load_data files/URIs (CSV, CSV.gz or Parquet); empty -> every
            ``raw/<source>/workspace/load_data_csv/**/load_data*.{csv,csv.gz,parquet}`` in the lake.
        metadata: directory (lake-relative or URI) with plate.csv.gz, well.csv.gz, compound.csv.gz,
            perturbation_control.csv and optionally channel_mapping.csv.
        sources: keep only these sources (empty = all).
        unseen_compound_fraction: fraction of treatment compounds held out of training entirely.
        heldout_batch_fraction: fraction of batches whose images training never sees (>= 1 when > 0,
            never a source's last training batch).
        seed: split seed (the split is a hash ranking of ids: independent of row order).
    """

    load_data: tuple[str, ...] = ()
    metadata: str = "raw/metadata"
    sources: tuple[str, ...] = ()
    unseen_compound_fraction: float = 0.2
    heldout_batch_fraction: float = 0.25
    seed: int = 0

    def __post_init__(self):
        for name in ("unseen_compound_fraction", "heldout_batch_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v}")


CATALOG_PRESETS: dict[str, CatalogConfig] = {"tiny": CatalogConfig(), "demo": CatalogConfig(),
                                             "paper": CatalogConfig(unseen_compound_fraction=0.1,
                                                                    heldout_batch_fraction=0.1)}


# ---------------------------------------------------------------------------------------------- reading
def read_table_bytes(data: bytes, name: str) -> pd.DataFrame:
    """CSV (optionally gzip) or Parquet bytes -> DataFrame with every column as string (plate ids stay strings)."""
    lower = name.lower()
    try:
        if lower.endswith(".parquet"):
            import pyarrow.parquet as pq
            df = pq.read_table(io.BytesIO(data)).to_pandas()
            return df.astype({c: "string" for c in df.columns}).astype(object).where(df.notna(), None)
        compression = "gzip" if lower.endswith(".gz") else None
        return pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, na_values=[""],
                           compression=compression).astype(object).pipe(lambda d: d.where(d.notna(), None))
    except Exception as exc:
        raise UserError(f"{name}: cannot read as {'Parquet' if lower.endswith('.parquet') else 'CSV'}: "
                        f"{type(exc).__name__}: {exc}") from None


def require_columns(df: pd.DataFrame, columns, name: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise UserError(f"{name}: missing column(s) {', '.join(missing)}; has {', '.join(map(str, df.columns))}")


def defaults_from_path(path: str) -> dict[str, str]:
    """Source/batch/plate from a JUMP location ``.../<source>/workspace/load_data_csv/<batch>/<plate>/...``."""
    parts = path.replace("\\", "/").split("/")
    out: dict[str, str] = {}
    if "load_data_csv" in parts:
        i = parts.index("load_data_csv")
        if i >= 2 and parts[i - 1] == "workspace":
            out["Metadata_Source"] = parts[i - 2]
        if len(parts) > i + 2:
            out["Metadata_Batch"] = parts[i + 1]
            if len(parts) > i + 3:
                out["Metadata_Plate"] = parts[i + 2]
    return out


def _join_path(path: str | None, file: str | None) -> str | None:
    if not path or not file:
        return None
    return f"{path.rstrip('/')}/{file.lstrip('/')}"


def channel_urls(df: pd.DataFrame, kind: str, name: str, required: bool) -> dict[str, pd.Series] | None:
    """Per-channel URIs of ``kind`` (``Orig`` or ``Illum``) from either load_data format; None if absent."""
    url_cols = [f"URL_{kind}{ch}" for ch in CHANNELS]
    if all(c in df.columns for c in url_cols):
        return {ch: df[f"URL_{kind}{ch}"] for ch in CHANNELS}
    legacy = [f"{p}_{kind}{ch}" for ch in CHANNELS for p in ("FileName", "PathName")]
    if all(c in df.columns for c in legacy):
        return {ch: pd.Series([_join_path(p, f) for p, f in zip(df[f"PathName_{kind}{ch}"],
                                                                df[f"FileName_{kind}{ch}"])], index=df.index)
                for ch in CHANNELS}
    if required:
        raise UserError(f"{name}: no image columns: expected URL_Orig<Channel> (current load_data) or "
                        f"FileName_Orig<Channel> + PathName_Orig<Channel> (legacy) for channels "
                        f"{', '.join(CHANNELS)}; has {', '.join(map(str, df.columns))}")
    return None


def normalise_well(well: str) -> str | None:
    """``A1``/``a01``/``AF48`` -> ``A01``/``A01``/``AF48``; None when not a 384/1536-well position."""
    m = WELL_PATTERN.match(str(well).strip())
    if not m:
        return None
    row, col = m.group(1).upper(), int(m.group(2))
    if well_row_index(row) >= MAX_WELL_ROWS or not 1 <= col <= MAX_WELL_COLUMNS:
        return None
    return f"{row}{col:02d}"


def well_row_index(row: str) -> int:
    """``A`` -> 0 ... ``Z`` -> 25, ``AA`` -> 26 ... ``AF`` -> 31 (1536-well rows)."""
    row = row.upper()
    return ord(row) - 65 if len(row) == 1 else 26 * (ord(row[0]) - 64) + ord(row[1]) - 65


def split_well(well: str) -> tuple[str, int]:
    """``"B07"`` -> ``("B", 7)``; 1536-well names (``"AF48"``) too. Raises :class:`UserError` otherwise."""
    m = WELL_PATTERN.match(str(well).strip())
    if not m:
        raise UserError(f"{well!r} is not a well position like A01")
    return m.group(1).upper(), int(m.group(2))


def _parse_site(value) -> int | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return int(f) if f.is_integer() and f >= 0 else None


def site_key(source: str, batch: str, plate: str, well: str, site: int) -> str:
    return f"{source}/{batch}/{plate}/{well}/{site}"


def parse_load_data(df: pd.DataFrame, name: str, defaults: dict[str, str] | None = None
                    ) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """One load_data table -> ``(sites, rejects)``.

    Args:
        df: the table as read by :func:`read_table_bytes` (all strings).
        name: file name/URI for messages.
        defaults: Metadata_Source/Batch/Plate used where the table lacks the column (legacy files).
    Returns:
        sites: one row per usable site: ``Metadata_SiteKey``, ``SITE_COLUMNS``, ``URL_Orig<ch>`` and
        ``URL_Illum<ch>`` (None when absent), in file order. rejects: ``(item, reason)`` per unusable row.
    """
    defaults = defaults or {}
    orig = channel_urls(df, "Orig", name, required=True)
    illum = channel_urls(df, "Illum", name, required=False)
    cols: dict[str, pd.Series] = {}
    for col in SITE_COLUMNS:
        if col in df.columns:
            cols[col] = df[col]
        elif col in defaults and col != "Metadata_Site":
            cols[col] = pd.Series([defaults[col]] * len(df), index=df.index, dtype=object)
        else:
            raise UserError(f"{name}: missing column {col} and it cannot be inferred from the file's location")
    rows, rejects, seen = [], [], set()
    for i in range(len(df)):
        item = f"{name}#row{i + 1}"
        meta = {c: cols[c].iloc[i] for c in SITE_COLUMNS}
        empty = [c for c in SITE_COLUMNS if meta[c] in (None, "")]
        if empty:
            rejects.append((item, f"empty {', '.join(empty)}"))
            continue
        well = normalise_well(meta["Metadata_Well"])
        if well is None:
            rejects.append((item, f"Metadata_Well {meta['Metadata_Well']!r} is not a 384/1536-well position"))
            continue
        site = _parse_site(meta["Metadata_Site"])
        if site is None:
            rejects.append((item, f"Metadata_Site {meta['Metadata_Site']!r} is not a non-negative integer"))
            continue
        urls = {f"URL_Orig{ch}": orig[ch].iloc[i] for ch in CHANNELS}
        missing = [k for k, v in urls.items() if not v]
        if missing:
            rejects.append((item, f"no image for {', '.join(missing)}"))
            continue
        key = site_key(str(meta["Metadata_Source"]), str(meta["Metadata_Batch"]), str(meta["Metadata_Plate"]),
                       well, site)
        if key in seen:
            rejects.append((key, f"duplicate site in {name}"))
            continue
        seen.add(key)
        row = {"Metadata_SiteKey": key, **{c: str(meta[c]) for c in SITE_COLUMNS[:3]},
               "Metadata_Well": well, "Metadata_Site": site, **urls}
        for ch in CHANNELS:
            row[f"URL_Illum{ch}"] = illum[ch].iloc[i] if illum is not None else None
        rows.append(row)
    columns = ["Metadata_SiteKey", *SITE_COLUMNS, *[f"URL_Orig{c}" for c in CHANNELS],
               *[f"URL_Illum{c}" for c in CHANNELS]]
    return pd.DataFrame(rows, columns=columns), rejects


# ---------------------------------------------------------------------------------------------- channel mapping
def parse_channel_mapping(df: pd.DataFrame) -> dict[str, dict[str, int]]:
    """JUMP ``channel_mapping.csv`` -> ``{"source_4": {"DNA": 5, "ER": 4, ...}}`` (the ``chN`` of each stain).

    ``Metadata_Source`` is a bare number in JUMP's file (``4``) and is mapped to ``source_4``.
    """
    require_columns(df, ["Metadata_Source", *[f"Metadata_Channel_Num_{c}" for c in CHANNELS]], "channel_mapping.csv")
    out = {}
    for _, r in df.iterrows():
        src = str(r["Metadata_Source"])
        src = src if src.startswith("source_") else f"source_{src}"
        nums = {}
        for ch in CHANNELS:
            v = r[f"Metadata_Channel_Num_{ch}"]
            if v not in (None, ""):
                nums[ch] = int(float(v))
        out[src] = nums
    return out


def check_channel_numbers(sites: pd.DataFrame, mapping: dict[str, dict[str, int]]
                          ) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Reject sites whose Phenix file names (``-chN``) contradict the source's channel mapping.

    Sites of sources absent from the mapping, or with file names without a channel number, pass unchecked.
    """
    if sites.empty or not mapping:
        return sites, []
    keep, rejects = [], []
    for i, r in enumerate(sites.itertuples(index=False)):
        nums = mapping.get(r.Metadata_Source)
        bad = []
        if nums:
            for ch in CHANNELS:
                m = PHENIX_CHANNEL.search(str(getattr(r, f"URL_Orig{ch}")).rsplit("/", 1)[-1])
                if m and ch in nums and int(m.group(1)) != nums[ch]:
                    bad.append(f"{ch} is ch{m.group(1)}, channel mapping says ch{nums[ch]}")
        if bad:
            rejects.append((r.Metadata_SiteKey, "; ".join(bad)))
        keep.append(not bad)
    return sites[np.array(keep, dtype=bool)].reset_index(drop=True), rejects


# ---------------------------------------------------------------------------------------------- metadata join
def join_metadata(sites: pd.DataFrame, plate: pd.DataFrame, well: pd.DataFrame, compound: pd.DataFrame,
                  controls: pd.DataFrame | None) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Attach plate type, compound id, InChIKey, SMILES and pert_type to sites; unusable sites -> rejects.

    A site is rejected when its plate is not in plate.csv.gz, its well not in well.csv.gz, or its compound
    has no structure in compound.csv.gz (empty wells, ``pert_type == "empty"``, have none by design).
    """
    require_columns(plate, ["Metadata_Source", "Metadata_Plate", "Metadata_PlateType"], "plate.csv.gz")
    require_columns(well, ["Metadata_Source", "Metadata_Plate", "Metadata_Well", "Metadata_JCP2022"], "well.csv.gz")
    require_columns(compound, ["Metadata_JCP2022", "Metadata_InChIKey", "Metadata_SMILES"], "compound.csv.gz")
    plate_type = {(r.Metadata_Source, r.Metadata_Plate): r.Metadata_PlateType for r in plate.itertuples()}
    well_map = {(r.Metadata_Source, r.Metadata_Plate, normalise_well(r.Metadata_Well) or r.Metadata_Well):
                r.Metadata_JCP2022 for r in well.itertuples()}
    comp = {r.Metadata_JCP2022: (r.Metadata_InChIKey, r.Metadata_SMILES) for r in compound.itertuples()}
    pert = {}
    if controls is not None and len(controls):
        require_columns(controls, ["Metadata_JCP2022", "Metadata_pert_type"], "perturbation_control.csv")
        pert = dict(zip(controls["Metadata_JCP2022"], controls["Metadata_pert_type"]))
    out, rejects = [], []
    for r in sites.to_dict("records"):
        key = r["Metadata_SiteKey"]
        pk = (r["Metadata_Source"], r["Metadata_Plate"])
        if pk not in plate_type:
            rejects.append((key, f"plate {r['Metadata_Plate']} of {r['Metadata_Source']} is not in plate.csv.gz"))
            continue
        jcp = well_map.get((*pk, r["Metadata_Well"]))
        if jcp is None:
            rejects.append((key, f"well {r['Metadata_Well']} of plate {r['Metadata_Plate']} is not in well.csv.gz"))
            continue
        ptype = pert.get(jcp, "trt")
        if ptype == "empty":
            rejects.append((key, f"empty well ({jcp}, pert_type empty)"))
            continue
        inchikey, smiles = comp.get(jcp, (None, None))
        if not smiles:
            rejects.append((key, f"compound {jcp} has no SMILES in compound.csv.gz"))
            continue
        out.append({**r, "Metadata_PlateType": plate_type[pk], "Metadata_JCP2022": jcp,
                    "Metadata_InChIKey": inchikey, "Metadata_SMILES": smiles, "Metadata_pert_type": ptype})
    cols = list(sites.columns) + ["Metadata_PlateType", "Metadata_JCP2022", "Metadata_InChIKey",
                                  "Metadata_SMILES", "Metadata_pert_type"]
    return pd.DataFrame(out, columns=cols), rejects


def sort_sites(sites: pd.DataFrame) -> pd.DataFrame:
    """Catalog order: source, batch, plate, well (row, column), site. Ingest assigns latent rows in this order."""
    if sites.empty:
        return sites.reset_index(drop=True)
    rc = sites["Metadata_Well"].map(split_well)
    order = sites.assign(_r=rc.map(lambda t: well_row_index(t[0])), _c=rc.map(lambda t: t[1]))
    order = order.sort_values(["Metadata_Source", "Metadata_Batch", "Metadata_Plate", "_r", "_c", "Metadata_Site"],
                              kind="stable")
    return order.drop(columns=["_r", "_c"]).reset_index(drop=True)


# ---------------------------------------------------------------------------------------------- split
def hash_rank(seed: int, key: str) -> int:
    """Deterministic pseudo-random rank of ``key`` (sha256; independent of input order and platform)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")


def split_compounds(compounds: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """``Metadata_JCP2022``, ``Metadata_CompoundSplit`` (``seen``/``unseen``) per compound, sorted by id.

    Only treatments (``pert_type == "trt"``) can be unseen: DMSO and the other controls are on every plate
    and are always ``seen``. ``round(fraction * n_treatments)`` compounds with the lowest hash rank are unseen.
    """
    ids = sorted(set(compounds["Metadata_JCP2022"]))
    ptype = dict(zip(compounds["Metadata_JCP2022"], compounds["Metadata_pert_type"]))
    candidates = [j for j in ids if ptype.get(j, "trt") == "trt" and j != DMSO_JCP2022]
    n_unseen = int(math.floor(fraction * len(candidates) + 0.5))
    unseen = set(sorted(candidates, key=lambda j: hash_rank(seed, j))[:n_unseen])
    return pd.DataFrame({"Metadata_JCP2022": ids,
                         "Metadata_CompoundSplit": ["unseen" if j in unseen else "seen" for j in ids]})


def split_batches(batches: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """``Metadata_Source``, ``Metadata_Batch``, ``Metadata_BatchSplit`` (``train``/``heldout``), sorted.

    ``max(1, round(fraction * n_batches))`` batches (0 when ``fraction == 0``) are held out, taken in hash
    order but never a source's last training batch (every source must stay in the training distribution
    that the g-estimation samples batches from).
    """
    pairs = sorted(set(zip(batches["Metadata_Source"], batches["Metadata_Batch"])))
    target = 0 if fraction <= 0 else max(1, int(math.floor(fraction * len(pairs) + 0.5)))
    left = {}
    for s, _ in pairs:
        left[s] = left.get(s, 0) + 1
    held = set()
    for s, b in sorted(pairs, key=lambda p: hash_rank(seed, f"{p[0]}/{p[1]}")):
        if len(held) >= target:
            break
        if left[s] > 1:
            held.add((s, b))
            left[s] -= 1
    return pd.DataFrame({"Metadata_Source": [p[0] for p in pairs], "Metadata_Batch": [p[1] for p in pairs],
                         "Metadata_BatchSplit": ["heldout" if p in held else "train" for p in pairs]})


def training_sites(sites: pd.DataFrame, split_c: pd.DataFrame, split_b: pd.DataFrame) -> pd.DataFrame:
    """Sites training may see: seen compounds in train batches (catalog order kept)."""
    seen = set(split_c.loc[split_c["Metadata_CompoundSplit"] == "seen", "Metadata_JCP2022"])
    train_b = set(zip(*split_b.loc[split_b["Metadata_BatchSplit"] == "train",
                                   ["Metadata_Source", "Metadata_Batch"]].T.values)) if len(split_b) else set()
    mask = sites["Metadata_JCP2022"].isin(seen) & pd.Series(
        [(s, b) in train_b for s, b in zip(sites["Metadata_Source"], sites["Metadata_Batch"])], index=sites.index,
        dtype=bool)
    return sites[mask].reset_index(drop=True)

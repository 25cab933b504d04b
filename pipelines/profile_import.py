"""``cpldm profile import FILE --dataset NAME``: bring your own CellProfiler / pycytominer / JUMP profiles.

Recipe (one command, no glue; every output is a versioned lake table, so ``cpldm lake validate`` stays clean):

    FILE (CSV, CSV.gz, TSV, Parquet; local path or s3://), well- or treatment-level
      -> column mapping: ``--map LAKE=FILE`` first, then ``Image_Metadata_X`` -> ``Metadata_X`` (CellProfiler
         exports) and the usual plate/well spellings (``Metadata_well_position``, ``Metadata_Barcode`` ...)
      -> [--platemap FILE] joined on plate and well (on well alone when it has no plate column), its columns
         prefixed ``Metadata_`` as pycytominer's ``annotate`` does; the profile table's own values win
      -> metadata the file lacks: the lake's ``sites``, a JUMP metadata folder, ``--meta`` constants, then
         defaults (batch = plate, source = dataset name)
      -> per row: compound (``--compound-col``, else the first of COMPOUND_COLUMNS present), dose (``--dose-col``
         -> ``Metadata_dose``), negative control (``--negcon`` pandas query, else pert/control type ``negcon`` or
         a compound called DMSO), batch (``--batch-col``)
      -> features_well (part ``import-<file stem>``), features_treatment (recomputed), compounds (InChIKey and
         SMILES kept when present; the id is the compound column's value), annotations_moa / annotations_target
         (``--moa-col`` / ``--target-col``), and ``features/_import/<dataset>/config.json`` recording the import
         (``normalized``: the table is already normalised, so the evaluation skips its DMSO steps).
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

import storage_schemas
from cpldm_core.errors import UserError
from cpldm_core.evaluation.labels import HUB_SEPARATOR
from cpldm_core.features import aggregate
from pipelines.storage import Lake, open_uri
from storage_schemas.columns import DMSO_JCP2022

log = logging.getLogger(__name__)

IMPORT_STAGE = "profile-import"
#: JUMP well-level metadata columns renamed to the lake's spelling.
IMPORT_RENAMES = {"Metadata_Site_Count": "Metadata_SiteCount"}
#: CellProfiler writes per-image metadata as ``Image_Metadata_<X>``: it becomes ``Metadata_<X>`` (and is then not
#: mistaken for an ``Image_`` feature).
IMPORT_PREFIXES = {"Image_Metadata_": "Metadata_"}
#: Other spellings of the lake's key columns (pycytominer platemaps, Cell Painting gallery, in-house exports);
#: a column is renamed only when the lake's name is absent.
IMPORT_ALIASES = {
    "Metadata_Plate": ("Metadata_plate", "Metadata_Barcode", "Metadata_Assay_Plate_Barcode", "Metadata_PlateID",
                       "Metadata_plate_id", "Metadata_Plate_Barcode"),
    "Metadata_Well": ("Metadata_well", "Metadata_well_position", "Metadata_WellPosition", "Metadata_Well_Position",
                      "Metadata_pert_well"),
    "Metadata_Batch": ("Metadata_batch",),
    "Metadata_Source": ("Metadata_source",),
}
#: Compound identifier columns tried in order when ``--compound-col`` is not given.
COMPOUND_COLUMNS = ("Metadata_JCP2022", "Metadata_broad_sample", "Metadata_pert_id", "Metadata_compound",
                    "Metadata_Compound", "Metadata_pert_iname", "Metadata_InChIKey", "Metadata_treatment",
                    "Metadata_Treatment")
#: Dose / concentration columns tried in order when ``--dose-col`` is not given.
DOSE_COLUMNS = ("Metadata_dose", "Metadata_Dose", "Metadata_mmoles_per_liter", "Metadata_concentration",
                "Metadata_Concentration")
INCHIKEY_COLUMNS = ("Metadata_InChIKey", "Metadata_inchikey", "Metadata_INCHIKEY", "Metadata_InChIKey_standard")
SMILES_COLUMNS = ("Metadata_SMILES", "Metadata_smiles", "Metadata_canonical_smiles", "Metadata_Smiles")
MOA_COLUMNS = ("Metadata_moa", "Metadata_MoA", "Metadata_MOA")
TARGET_COLUMNS = ("Metadata_target", "Metadata_targets", "Metadata_Target")
#: Columns that mark a negative control with the value ``negcon`` (JUMP, pycytominer).
CONTROL_TYPE_COLUMNS = ("Metadata_pert_type", "Metadata_control_type")
#: Compound names that are the vehicle control when no ``--negcon`` is given.
VEHICLE_NAMES = ("dmso",)
#: Dose column of features_well (float32, in the unit of the source file; absent when the file has none).
DOSE = "Metadata_dose"
REQUIRED_WELL_META = ("Metadata_Source", "Metadata_Batch", "Metadata_Plate", "Metadata_Well", "Metadata_JCP2022")
PLATE, WELL, COMPOUND = "Metadata_Plate", "Metadata_Well", "Metadata_JCP2022"
#: Plate and well of a treatment-level table (no plate/well columns): one pseudo-plate, one row per "well".
TREATMENT_PLATE = "treatment-level"


@dataclass(frozen=True)
class ImportOptions:
    """How to read one profile table (every field maps to a ``cpldm profile import`` flag).

    Attributes:
        mapping: lake column -> column of the file (``--map Metadata_Plate=Image_Metadata_Plate``), applied to the
            profile table and the platemap before the automatic renames.
        compound_col / dose_col / batch_col / moa_col / target_col: per-row columns (names as in the file or after
            mapping); None = detect (compound, dose, MoA, target) or use Metadata_Batch / the plate (batch).
        negcon: pandas query selecting the negative-control rows (``"Metadata_compound == 'DMSO'"``).
        platemap: platemap / image-metadata file joined on plate and well.
        normalized: the table is already normalised (recorded for the evaluation).
        metadata: constants for missing metadata columns (``--meta``). metadata_dir: a JUMP metadata folder.
    """

    mapping: dict[str, str] = field(default_factory=dict)
    compound_col: str | None = None
    dose_col: str | None = None
    negcon: str | None = None
    batch_col: str | None = None
    platemap: str | None = None
    moa_col: str | None = None
    target_col: str | None = None
    normalized: bool = False
    metadata: dict[str, str] = field(default_factory=dict)
    metadata_dir: str | None = None


# ------------------------------------------------------------------------------------------------- reading
def read_frame(path: str, endpoint_url: str | None = None) -> pd.DataFrame:
    """A CSV / CSV.gz / TSV / Parquet file (local or ``s3://``) as a DataFrame; errors are one line naming it."""
    lower = path.lower()
    kind = "Parquet" if lower.endswith((".parquet", ".pq")) else "CSV"
    local = not path.startswith("s3://")
    if local and not Path(path.removeprefix("file://")).exists():
        raise UserError(f"{path}: file not found")
    try:
        with open_uri(path, endpoint_url) as fh:
            if kind == "Parquet":
                return pd.read_parquet(fh)
            sep = "\t" if any(s in lower for s in (".tsv", ".txt")) else ","
            return pd.read_csv(fh, sep=sep, compression="gzip" if lower.endswith(".gz") else None,
                               low_memory=False)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(f"{path}: cannot read as {kind}: {type(exc).__name__}: {first}") from None


def map_columns(frame: pd.DataFrame, mapping: dict[str, str], prefix_plain: bool = False) -> tuple[
        pd.DataFrame, dict[str, str]]:
    """Rename ``frame``'s columns to the lake's spelling.

    Order: ``mapping`` (lake name -> file name, only where the file has that column), ``prefix_plain`` (platemaps:
    a column without a ``Metadata_`` or feature prefix gets ``Metadata_``), IMPORT_PREFIXES, IMPORT_RENAMES, then
    IMPORT_ALIASES where the lake's name is still absent.

    Returns:
        (renamed frame, {original name: new name} for every renamed column).
    """
    renamed: dict[str, str] = {}

    def rename(old: str, new: str) -> None:
        nonlocal frame
        if old == new or old not in frame.columns:
            return
        if new in frame.columns:
            frame = frame.drop(columns=new)  # an explicit/automatic rename replaces a same-named column
        frame = frame.rename(columns={old: new})
        original = next((k for k, v in renamed.items() if v == old), old)
        renamed[original] = new

    for lake_name, file_name in mapping.items():
        rename(file_name, lake_name)
    feature = aggregate.FEATURE_PATTERN
    for col in list(frame.columns):
        col_s = str(col)
        if prefix_plain and not col_s.startswith("Metadata_") and not feature.fullmatch(col_s):
            rename(col, f"Metadata_{col_s}")
    for col in list(frame.columns):
        for old, new in IMPORT_PREFIXES.items():
            if str(col).startswith(old) and f"{new}{col[len(old):]}" not in frame.columns:
                rename(col, f"{new}{col[len(old):]}")
    for old, new in IMPORT_RENAMES.items():
        if new not in frame.columns:
            rename(old, new)
    for new, olds in IMPORT_ALIASES.items():
        if new not in frame.columns:
            old = next((o for o in olds if o in frame.columns), None)
            if old is not None:
                rename(old, new)
    return frame, renamed


def _resolve(frame: pd.DataFrame, name: str | None, renamed: dict[str, str], flag: str, path: str) -> str | None:
    """The frame column a user named (as in the file, after mapping, or without its ``Metadata_`` prefix)."""
    if name is None:
        return None
    for candidate in (name, renamed.get(name), f"Metadata_{name}"):
        if candidate is not None and candidate in frame.columns:
            return candidate
    meta = [c for c in frame.columns if str(c).startswith("Metadata_")]
    raise UserError(f"{path}: {flag} {name}: no such column; metadata columns are {meta[:15]}")


def _first(frame: pd.DataFrame, names: tuple[str, ...]) -> str | None:
    return next((c for c in names if c in frame.columns and frame[c].notna().any()), None)


# ------------------------------------------------------------------------------------------------- entry point
def import_profiles(lake: Lake, path: str, dataset: str, metadata: dict[str, str] | None = None,
                    metadata_dir: str | None = None, options: ImportOptions | None = None) -> dict:
    """Bring well- or treatment-level profiles (CellProfiler, pycytominer, JUMP) into the lake as ``dataset``.

    Writes ``features_well`` (part ``import-<file stem>``; feature columns float32, plus ``Metadata_dose`` when
    the file has a dose), recomputes ``features_treatment`` of ``dataset``, merges the file's compounds into
    ``compounds`` and its labels into ``annotations_moa`` / ``annotations_target`` (rows of other compounds are
    kept), and records the import in ``features/_import/<dataset>/config.json``.

    Args:
        lake: the lake. path: the profile table (local or s3://). dataset: name the profiles are filed under.
        metadata / metadata_dir: shorthands for ``options.metadata`` / ``options.metadata_dir``.
        options: everything else (:class:`ImportOptions`).

    Returns:
        summary dict: dataset, wells, features, compounds, controls, labels (moa, target), treatments, ...
    """
    from pipelines.profile import _safe

    opts = options or ImportOptions()
    if metadata:
        opts = replace(opts, metadata={**opts.metadata, **metadata})
    if metadata_dir:
        opts = replace(opts, metadata_dir=metadata_dir)
    if dataset != _safe(dataset):
        raise UserError(f"dataset name {dataset!r} may hold only letters, digits, '_', '.', '-'")
    frame = read_frame(path, lake.endpoint_url)
    with warnings.catch_warnings():
        # metadata is added column by column to a ~6,000-column frame: pandas' fragmentation warning is noise
        warnings.simplefilter("ignore", pd.errors.PerformanceWarning)
        return _import_frame(lake, frame, path, dataset, opts)


def _import_frame(lake: Lake, frame: pd.DataFrame, path: str, dataset: str, opts: ImportOptions) -> dict:
    from pipelines.profile import NO_DRAW, _safe, _to_arrow, record_imported, write_treatments

    frame, renamed = map_columns(frame, opts.mapping)
    if opts.platemap:
        frame, platemap_renamed = _join_platemap(frame, opts, path, lake.endpoint_url)
        renamed = {**platemap_renamed, **renamed}
    level = "well"
    if PLATE not in frame and WELL not in frame:
        # treatment-level (consensus) table: every row is its own "well" of one pseudo-plate
        level = "treatment"
        frame[PLATE] = TREATMENT_PLATE
        frame[WELL] = [f"row{i:06d}" for i in range(len(frame))]
    for key in (PLATE, WELL):
        if key not in frame:
            meta = [c for c in frame.columns if str(c).startswith("Metadata_")]
            raise UserError(f"{path}: column {key} is missing; map it with --map {key}=COLUMN "
                            f"(metadata columns: {meta[:15]})")
        frame[key] = frame[key].astype(str)
    names = [c for c in aggregate.feature_columns(frame) if pd.api.types.is_numeric_dtype(frame[c])]
    if not names:
        raise UserError(f"{path}: no numeric CellProfiler feature columns (Cells_*, Nuclei_*, Cytoplasm_*, Image_*)")
    frame = _fill_known_metadata(lake, frame, opts)

    # --- per-row columns: negative controls, compound, dose, batch
    control = _negcon_mask(frame, opts.negcon, path)
    compound_col = _resolve(frame, opts.compound_col, renamed, "--compound-col", path) or _first(
        frame, COMPOUND_COLUMNS)
    if compound_col is None:
        raise UserError(f"{path}: no compound column (tried {', '.join(COMPOUND_COLUMNS)}); "
                        "name it with --compound-col COLUMN")
    ids = frame[compound_col].astype("string").str.strip()
    ids = ids.where(ids.notna() & (ids != ""), other=pd.NA)
    missing = ids.isna() & ~control
    if missing.any():
        row = int(np.flatnonzero(missing.to_numpy())[0])
        raise UserError(f"{path}: row {row} (plate {frame[PLATE].iloc[row]}, well {frame[WELL].iloc[row]}) has no "
                        f"compound in {compound_col} and is not a negative control (--negcon)")
    frame[COMPOUND] = ids.fillna(DMSO_JCP2022).astype(str).to_numpy()  # unnamed controls: JUMP's DMSO id
    dose_col = _resolve(frame, opts.dose_col, renamed, "--dose-col", path) or _first(frame, DOSE_COLUMNS)
    if dose_col is not None:
        dose = pd.to_numeric(frame[dose_col], errors="coerce")
        bad = dose.isna() & frame[dose_col].notna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise UserError(f"{path}: row {row}: dose {frame[dose_col].iloc[row]!r} in {dose_col} is not a number")
        frame[DOSE] = dose.astype(np.float32).to_numpy()
    batch_col = _resolve(frame, opts.batch_col, renamed, "--batch-col", path)
    if batch_col is not None:
        frame["Metadata_Batch"] = frame[batch_col].astype(str)
    defaults = {"Metadata_Batch": frame[PLATE], "Metadata_Source": pd.Series(dataset, index=frame.index)}
    for key, value in defaults.items():
        frame[key] = frame[key].fillna(value) if key in frame else value
    missing_meta = [k for k in REQUIRED_WELL_META if k not in frame or frame[k].isna().any()]
    if missing_meta:
        raise UserError(f"{path}: cannot determine {', '.join(missing_meta)} for every well; give them with "
                        f"--meta KEY=VALUE or a JUMP metadata folder with --metadata-dir")
    for key in ("Metadata_Source", "Metadata_Batch"):
        frame[key] = frame[key].astype(str)
    given = frame["Metadata_pert_type"].astype("string") if "Metadata_pert_type" in frame else pd.Series(
        pd.NA, index=frame.index, dtype="string")
    # a row is a negative control exactly when the --negcon rule says so; poscon labels of the file are kept
    poscon = given.eq("poscon").fillna(False).to_numpy(bool)
    frame["Metadata_pert_type"] = np.where(control, "negcon", np.where(poscon, "poscon", "trt"))
    if "Metadata_SiteCount" not in frame or not pd.api.types.is_numeric_dtype(frame["Metadata_SiteCount"]):
        frame["Metadata_SiteCount"] = 1
    frame["Metadata_SiteCount"] = frame["Metadata_SiteCount"].fillna(1).astype(np.int64)
    frame["Metadata_Draw"] = NO_DRAW
    duplicated = frame.duplicated([PLATE, WELL])
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise UserError(f"{path}: row {row}: plate {frame[PLATE].iloc[row]} well {frame[WELL].iloc[row]} appears "
                        "twice; import one row per well (aggregate sites or cells first)")

    # --- write: wells, treatments, compounds, labels, the import record; commit last
    config = _record(lake, dataset, path, opts, compound_col, dose_col, level)
    stem = Path(path.rstrip("/").rsplit("/", 1)[-1]).name.split(".")[0]
    part = _safe(f"import-{stem}")
    table = _to_arrow(frame, "features_well", names)
    if DOSE in frame:
        table = table.append_column(pa.field(DOSE, pa.float32()), pa.array(frame[DOSE].to_numpy(np.float32)))
    lake.write_named("features_well", table, part=part, partition={"dataset": dataset}, config=config)
    treatments = write_treatments(lake, dataset, config=config)
    n_compounds = _write_compounds(lake, frame, control)
    labels = _write_labels(lake, frame, control, opts, renamed, path)
    lake.write_config(record_dir(dataset), config)
    record_imported(lake, dataset, config, path, len(names))   # the ProfileSet evaluate names
    lake.commit_unit(f"{IMPORT_STAGE}-{dataset}", part, {"wells": len(frame), "file": path})
    kept = set(names) | set(storage_schemas.table_spec("features_well").schema.names) | {DOSE}
    summary = {"dataset": dataset, "level": level, "wells": int(len(frame)), "features": len(names),
               "compounds": n_compounds, "controls": int(control.sum()), "compound_col": compound_col,
               "dose_col": dose_col or "", "batches": int(frame["Metadata_Batch"].nunique()),
               "moa_labels": labels["moa"], "target_labels": labels["target"], "treatments": treatments,
               "normalized": opts.normalized,
               "dropped_columns": [c for c in frame.columns if c not in kept]}
    log.info("profile import %s: %s", dataset, {k: v for k, v in summary.items() if k != "dropped_columns"})
    return summary


# ------------------------------------------------------------------------------------------------- steps
def _join_platemap(frame: pd.DataFrame, opts: ImportOptions, path: str, endpoint_url: str | None
                   ) -> tuple[pd.DataFrame, dict[str, str]]:
    """Fill ``frame``'s metadata from a platemap / image-metadata file joined on plate and well (pycytominer's
    ``annotate``; on well alone when the platemap has no plate column). Per-image files (several rows per well)
    are reduced to the columns constant within every well. Returns (frame, the platemap's renames)."""
    plate_map, renamed = map_columns(read_frame(opts.platemap, endpoint_url), opts.mapping, prefix_plain=True)
    if WELL not in plate_map:
        raise UserError(f"{opts.platemap}: no well column (Metadata_Well, well_position ...); "
                        f"map it with --map {WELL}=COLUMN")
    on = [PLATE, WELL] if PLATE in plate_map and PLATE in frame else [WELL]
    if WELL not in frame:
        raise UserError(f"{path}: column {WELL} is missing; map it with --map {WELL}=COLUMN")
    meta = [c for c in plate_map.columns if str(c).startswith("Metadata_")]
    plate_map = plate_map[meta].copy()
    for key in on:
        plate_map[key] = plate_map[key].astype(str)
        frame[key] = frame[key].astype(str)
    per_well = plate_map.drop_duplicates()
    clash = per_well.duplicated(on)
    if clash.any():
        # per-image tables carry per-image columns (file names, site): keep only the columns constant per well
        constant = per_well.groupby(on).nunique(dropna=False).max() <= 1
        keep = [*on, *[c for c in constant.index if constant[c]]]
        per_well = per_well[keep].drop_duplicates()
    return _fill(frame, per_well, on), renamed


def _fill_known_metadata(lake: Lake, frame: pd.DataFrame, opts: ImportOptions) -> pd.DataFrame:
    """Metadata the file lacks from the lake's ``sites``, a JUMP metadata folder and ``--meta`` constants."""
    if lake.exists(storage_schemas.table_spec("sites").path):
        sites = lake.read_named("sites").to_pandas()
        known = sites.drop_duplicates([PLATE, WELL])[
            [PLATE, WELL, "Metadata_Source", "Metadata_Batch", COMPOUND, "Metadata_pert_type"]]
        frame = _fill(frame, known, [PLATE, WELL])
    if opts.metadata_dir:
        d = Path(opts.metadata_dir)
        if (d / "plate.csv.gz").exists():
            frame = _fill(frame, pd.read_csv(d / "plate.csv.gz", dtype=str)[
                [PLATE, "Metadata_Source", "Metadata_Batch"]], [PLATE])
        wells = sorted(d.glob("well*.csv.gz"))
        if wells:
            frame = _fill(frame, pd.read_csv(wells[0], dtype=str)[[PLATE, WELL, COMPOUND]], [PLATE, WELL])
        if (d / "perturbation_control.csv").exists():
            frame = _fill(frame, pd.read_csv(d / "perturbation_control.csv", dtype=str)[
                [COMPOUND, "Metadata_pert_type"]], [COMPOUND])
    allowed = (*REQUIRED_WELL_META, "Metadata_pert_type")
    for key, value in opts.metadata.items():
        if key not in allowed:
            raise UserError(f"--meta {key}=...: only {', '.join(allowed)}")
        frame[key] = frame[key].fillna(value) if key in frame else value
    return frame


def _fill(frame: pd.DataFrame, lookup: pd.DataFrame, on: list[str]) -> pd.DataFrame:
    """Fill missing/NaN metadata columns of ``frame`` from ``lookup`` joined on ``on`` (never overwrite)."""
    lookup = lookup.drop_duplicates(on)
    merged = frame[on].merge(lookup, on=on, how="left")
    for col in lookup.columns:
        if col in on:
            continue
        if col in frame:
            frame[col] = frame[col].where(frame[col].notna(), merged[col].to_numpy())
        else:
            frame[col] = merged[col].to_numpy()
    return frame


def _negcon_mask(frame: pd.DataFrame, expression: str | None, path: str) -> pd.Series:
    """(n,) bool: the negative-control rows (``--negcon`` pandas query, else the automatic rule)."""
    if expression:
        try:
            mask = frame.eval(expression, engine="python")
        except Exception as exc:  # SyntaxError, UndefinedVariableError, TypeError ...: all one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise UserError(f"--negcon {expression!r}: not a valid pandas query on {path}: "
                            f"{type(exc).__name__}: {first}") from None
        if not isinstance(mask, pd.Series) or not pd.api.types.is_bool_dtype(mask.dtype):
            raise UserError(f"--negcon {expression!r}: must select rows (a comparison such as "
                            "\"Metadata_compound == 'DMSO'\"), not compute a value")
        if not mask.any():
            log.warning("--negcon %r selects no row of %s: there are no negative controls", expression, path)
        return mask.fillna(False).astype(bool)
    mask = pd.Series(False, index=frame.index)
    for col in CONTROL_TYPE_COLUMNS:
        if col in frame:
            mask |= frame[col].astype("string").str.lower().eq("negcon").fillna(False)
    if COMPOUND in frame:
        mask |= frame[COMPOUND].astype("string").eq(DMSO_JCP2022).fillna(False)
    for col in COMPOUND_COLUMNS[1:]:
        if col in frame:
            mask |= frame[col].astype("string").str.strip().str.lower().isin(VEHICLE_NAMES).fillna(False)
    return mask


def _per_compound(frame: pd.DataFrame, rows: pd.Series, column: str | None) -> pd.Series:
    """First non-null value of ``column`` per compound id among ``rows`` (None when the column is absent)."""
    if column is None:
        return pd.Series(dtype=object)
    sub = frame.loc[rows, [COMPOUND, column]].dropna()
    return sub.groupby(COMPOUND)[column].first().astype(str)


def _write_compounds(lake: Lake, frame: pd.DataFrame, control: pd.Series) -> int:
    """Merge this file's compounds into the lake's ``compounds`` table (its rows replace same-id rows)."""
    everything = pd.Series(True, index=frame.index)
    inchikey = _per_compound(frame, everything, _first(frame, INCHIKEY_COLUMNS))
    smiles = _per_compound(frame, everything, _first(frame, SMILES_COLUMNS))
    ids = sorted(frame[COMPOUND].unique())
    negcon = set(frame.loc[control, COMPOUND])
    new = pd.DataFrame({COMPOUND: ids, "Metadata_InChIKey": [inchikey.get(i) for i in ids],
                        "Metadata_SMILES": [smiles.get(i) for i in ids],
                        "Metadata_pert_type": ["negcon" if i in negcon else "trt" for i in ids]})
    _merge_table(lake, "compounds", new)
    return int(len(new) - len(negcon))


def _write_labels(lake: Lake, frame: pd.DataFrame, control: pd.Series, opts: ImportOptions,
                  renamed: dict[str, str], path: str) -> dict[str, int]:
    """MoA and target columns -> ``annotations_moa`` (one row per compound, ``|``-joined when several) and
    ``annotations_target`` (one row per compound and target). Returns the number of distinct labels."""
    treated = ~control
    inchikey = _per_compound(frame, treated, _first(frame, INCHIKEY_COLUMNS))
    counts = {}
    for task, flag, option, candidates, table in (
            ("moa", "--moa-col", opts.moa_col, MOA_COLUMNS, "annotations_moa"),
            ("target", "--target-col", opts.target_col, TARGET_COLUMNS, "annotations_target")):
        column = _resolve(frame, option, renamed, flag, path) or _first(frame, candidates)
        counts[task] = 0
        if column is None:
            continue
        pairs = frame.loc[treated, [COMPOUND, column]].dropna()
        values = pairs[column].astype(str).str.split(HUB_SEPARATOR)
        pairs = pairs.assign(label=values).explode("label")
        pairs["label"] = pairs["label"].str.strip()
        pairs = pairs[pairs["label"] != ""].drop_duplicates([COMPOUND, "label"]).sort_values([COMPOUND, "label"])
        if task == "moa":
            pairs = pairs.groupby(COMPOUND)["label"].agg(HUB_SEPARATOR.join).reset_index()
        out = pd.DataFrame({COMPOUND: pairs[COMPOUND].to_numpy(),
                            "Metadata_InChIKey": [inchikey.get(c) for c in pairs[COMPOUND]],
                            f"Metadata_{task}": pairs["label"].to_numpy()})
        counts[task] = int(pairs["label"].str.split(HUB_SEPARATOR).explode().nunique()) if len(pairs) else 0
        _merge_table(lake, table, out)
    return counts


def _merge_table(lake: Lake, name: str, new: pd.DataFrame) -> None:
    """Write lake-wide table ``name`` = its existing rows of other compounds + ``new`` (sorted by compound)."""
    spec = storage_schemas.table_spec(name)
    if lake.exists(spec.path):
        old = lake.read_named(name).to_pandas()
        new = pd.concat([old[~old[COMPOUND].isin(set(new[COMPOUND]))], new], ignore_index=True)
    new = new.sort_values(COMPOUND, kind="stable").reset_index(drop=True)
    table = pa.table([pa.array(new[f.name].astype(object).where(new[f.name].notna(), None), type=f.type)
                      for f in spec.schema], schema=spec.schema)
    lake.write_named(name, table, config={"written_by": IMPORT_STAGE})


def _record(lake: Lake, dataset: str, path: str, opts: ImportOptions, compound_col: str, dose_col: str | None,
            level: str) -> dict:
    """The dataset's import record (``features/_import/<dataset>/config.json``), with this file added."""
    rel = f"{record_dir(dataset)}/config.json"
    files: dict = {}
    if lake.exists(rel):
        previous = lake.read_json(rel).get("config", {})
        if previous.get("imported"):
            if bool(previous.get("normalized")) != opts.normalized:
                raise UserError(f"dataset {dataset!r} holds files imported with normalized="
                                f"{bool(previous.get('normalized'))}; import {path} into another dataset or "
                                "match --normalized")
            files = dict(previous.get("files", {}))
    files[path] = {"compound_col": compound_col, "dose_col": dose_col, "level": level, "negcon": opts.negcon,
                   "platemap": opts.platemap, "mapping": opts.mapping}
    return {"imported": True, "normalized": opts.normalized, "files": files}


# ------------------------------------------------------------------------------------------------- queries
def record_dir(dataset: str) -> str:
    """Lake folder of a dataset's import record (beside, not in, ``features/_config``: ``cpldm profile`` owns that)."""
    return f"features/_import/{dataset}"


def _import_record(lake: Lake, dataset: str) -> dict | None:
    rel = f"{record_dir(dataset)}/config.json"
    if not lake.exists(rel):
        return None
    config = lake.read_json(rel).get("config", {})
    return config if isinstance(config, dict) and config.get("imported") else None


def dataset_is_imported(lake: Lake, dataset: str) -> bool:
    """True when ``dataset``'s profiles came from ``cpldm profile import`` (not from images)."""
    return _import_record(lake, dataset) is not None


def dataset_is_normalized(lake: Lake, dataset: str) -> bool:
    """True when ``dataset`` was imported with ``--normalized`` (the evaluation then skips its DMSO steps)."""
    record = _import_record(lake, dataset)
    return bool(record and record.get("normalized"))


# ------------------------------------------------------------------------------------------------- CLI
def _key_value(text: str, flag: str) -> tuple[str, str]:
    if "=" not in text:
        raise UserError(f"{flag} {text!r} must look like KEY=VALUE")
    key, value = text.split("=", 1)
    return key.strip(), value.strip() if flag == "--map" else value


def cmd_import(args) -> int:
    from pipelines.cli import lake_from_args

    lake = lake_from_args(args)
    options = ImportOptions(
        mapping=dict(_key_value(kv, "--map") for kv in args.map or []),
        metadata=dict(_key_value(kv, "--meta") for kv in args.meta or []), metadata_dir=args.metadata_dir,
        compound_col=args.compound_col, dose_col=args.dose_col, negcon=args.negcon, batch_col=args.batch_col,
        platemap=args.platemap, moa_col=args.moa_col, target_col=args.target_col, normalized=args.normalized)
    summary = import_profiles(lake, args.file, args.dataset, options=options)
    dropped = summary.pop("dropped_columns")
    print(" ".join(f"{k}={v}" for k, v in summary.items()) + f" dropped_columns={len(dropped)}")
    return 0


def add_import_parser(inner) -> None:
    """``profile import`` under ``cpldm profile``'s subcommands."""
    imp = inner.add_parser("import", help="import CellProfiler / pycytominer / JUMP profiles (CSV, CSV.gz, Parquet)",
                           description=__doc__.split("\n")[0])
    imp.add_argument("file", help="well- or treatment-level profiles: CSV, CSV.gz, TSV or Parquet, local or s3://")
    imp.add_argument("--dataset", required=True, help="dataset name the profiles are filed under")
    imp.add_argument("--map", action="append", metavar="LAKE=FILE",
                     help="rename a column, e.g. Metadata_Plate=Image_Metadata_Plate (repeatable; Image_Metadata_* "
                          "and common plate/well spellings are mapped automatically)")
    imp.add_argument("--platemap", metavar="FILE",
                     help="platemap or image-metadata file joined on plate and well (on well when it has no plate)")
    imp.add_argument("--compound-col", metavar="COL", help=f"compound id column (default: first of "
                                                            f"{', '.join(COMPOUND_COLUMNS[:4])} ...)")
    imp.add_argument("--dose-col", metavar="COL", help="dose / concentration column (kept as Metadata_dose)")
    imp.add_argument("--negcon", metavar="QUERY", help="pandas query selecting negative controls, e.g. "
                                                       "\"Metadata_compound == 'DMSO'\" (default: pert/control "
                                                       "type 'negcon' or compound DMSO)")
    imp.add_argument("--batch-col", metavar="COL", help="batch column (default: Metadata_Batch, else the plate)")
    imp.add_argument("--moa-col", metavar="COL", help="MoA column -> annotations_moa (default: Metadata_moa)")
    imp.add_argument("--target-col", metavar="COL",
                     help="target column ('|'-separated) -> annotations_target (default: Metadata_target)")
    imp.add_argument("--normalized", action="store_true",
                     help="the profiles are already normalised: the evaluation skips its DMSO steps")
    imp.add_argument("--meta", action="append", metavar="KEY=VALUE",
                     help="constant metadata for columns the file lacks (e.g. Metadata_Source=source_4)")
    imp.add_argument("--metadata-dir", default=None,
                     help="JUMP metadata folder (plate.csv.gz, well*.csv.gz, perturbation_control.csv)")
    imp.set_defaults(func=cmd_import, profile_command="import")

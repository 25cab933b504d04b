"""``cpldm lake compact TABLE``: merge a directory table's small Parquet parts, one partition at a time.

Stages write one part per unit of work (a generation block, a profiled plate...), so a 100,000-image run with
blocks of 8 leaves 12,500 manifest parts: every ``lake ls``, ``sql`` or ``validate`` then opens 12,500 footers.
Compaction rewrites the parts of each partition as a few large files:

- parts are grouped by their cpldm metadata (schema version, table, config, code version) and Arrow schema;
  only parts of one group are merged, so every output file still says what made it (the merged file carries
  the group's metadata unchanged) and parts written by different configs are never mixed;
- the merge streams row group by row group (``ParquetWriter``): memory is one row group, not the partition;
- atomic on a local lake: the new partition is built in ``_compaction/<id>/`` (outside every table; untouched
  parts are hard-linked), its row count checked against the inputs' footers, then exchanged with the live
  partition directory in one ``renameat2(RENAME_EXCHANGE)`` (Linux): a reader lists either all the old parts
  or the new files, never both or neither;
- idempotent: a partition with fewer than ``min_parts`` parts per group is left alone, so a second run is a
  no-op; output names derive from the input names (``compacted-<digest>.parquet``).

Run it on a finished table (no stage writing to it): a stage resuming later rewrites its uncommitted parts by
name, and a part merged before that would then be counted twice. S3 has no atomic multi-object swap, so
compaction of an S3 lake is refused (compact a local copy and sync it, or leave the parts).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import posixpath
import shutil
import uuid
from collections import defaultdict

import pyarrow.parquet as pq

import storage_schemas
from cpldm_core.errors import UserError
from pipelines.lake_commands import table_files
from pipelines.storage import Lake
from storage_schemas import spec as schema_spec

#: Lake-root folder for partitions being built (not under any table path, so never read as table data).
STAGING_DIR = "_compaction"
#: Metadata keys that say what made a part; parts that differ in any of them are never merged.
PROVENANCE_KEYS = (schema_spec.META_SCHEMA_VERSION, schema_spec.META_TABLE, schema_spec.META_CONFIG,
                   schema_spec.META_CODE_VERSION)
DEFAULT_MAX_ROWS_PER_FILE = 2_000_000
DEFAULT_ROW_GROUP_ROWS = 128 * 1024

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange_dirs(a: str, b: str) -> None:
    """Atomically swap two directories of one filesystem (Linux ``renameat2(RENAME_EXCHANGE)``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        raise UserError("lake compact needs renameat2 (Linux, glibc >= 2.28) for an atomic swap")
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise UserError(f"lake compact: cannot swap {a} and {b} atomically: {os.strerror(err)}")


def _provenance(schema) -> tuple:
    meta = schema.metadata or {}
    return tuple(meta.get(k, b"") for k in PROVENANCE_KEYS)


def plan_compaction(lake: Lake, name: str, min_parts: int = 2) -> dict[str, list[list[str]]]:
    """``{partition dir: [[parts to merge into one group], ...]}`` for partitions worth compacting.

    Reads footers only. A part without cpldm's schema version is an error naming it (it was not written by
    cpldm; ``cpldm lake validate`` says more).
    """
    spec = storage_schemas.table_spec(name)
    if not spec.is_directory:
        raise UserError(f"table '{name}' is a single file ({spec.path}): nothing to compact")
    by_dir: dict[str, list[str]] = defaultdict(list)
    for rel in table_files(lake, name):
        by_dir[posixpath.dirname(rel)].append(rel)
    plan = {}
    for part_dir, files in sorted(by_dir.items()):
        if len(files) < min_parts:
            continue
        groups: dict[tuple, list[str]] = defaultdict(list)
        for rel in files:
            schema = pq.read_schema(lake.fs_path(rel))
            if schema_spec.META_SCHEMA_VERSION not in (schema.metadata or {}):
                raise UserError(f"{lake.uri_of(rel)}: no cpldm schema version in its metadata; "
                                "run `cpldm lake validate` and remove or rewrite it before compacting")
            groups[(_provenance(schema), schema.remove_metadata().to_string())].append(rel)
        merge = [sorted(g) for g in groups.values() if len(g) >= min_parts]
        if merge:
            plan[part_dir] = merge
    return plan


def _merge(lake: Lake, parts: list[str], out_dir: str, max_rows: int, row_group_rows: int) -> tuple[list[str], int]:
    """Stream ``parts`` into ``compacted-<digest>[-k].parquet`` files under local ``out_dir``; (names, rows)."""
    digest = hashlib.sha1("\n".join(posixpath.basename(p) for p in parts).encode()).hexdigest()[:16]
    schema = pq.read_schema(lake.fs_path(parts[0]))
    meta = {k: v for k, v in (schema.metadata or {}).items() if k != b"pandas"}  # pandas' index info is per part
    schema = schema.with_metadata(meta)
    names, rows, writer, in_file = [], 0, None, 0
    try:
        for rel in parts:
            pf = pq.ParquetFile(lake.fs_path(rel))
            for batch in pf.iter_batches(batch_size=row_group_rows):
                if writer is None or in_file + batch.num_rows > max_rows:
                    if writer is not None:
                        writer.close()
                    names.append(f"compacted-{digest}" + (f"-{len(names)}" if names else "") + ".parquet")
                    writer = pq.ParquetWriter(os.path.join(out_dir, names[-1]), schema, compression="zstd")
                    in_file = 0
                writer.write_batch(batch.replace_schema_metadata(meta), row_group_size=row_group_rows)
                in_file += batch.num_rows
                rows += batch.num_rows
    finally:
        if writer is not None:
            writer.close()
    return names, rows


def compact_table(lake: Lake, name: str, *, min_parts: int = 2, max_rows_per_file: int = DEFAULT_MAX_ROWS_PER_FILE,
                  row_group_rows: int = DEFAULT_ROW_GROUP_ROWS) -> dict:
    """Compact every partition of table ``name`` (see module docstring). Returns counts of what was done:
    ``{"partitions", "parts_before", "files_after", "rows"}`` (zeros when nothing needed compacting)."""
    if lake.is_s3:
        raise UserError("lake compact works on local lakes only: S3 has no atomic swap of many objects")
    if min_parts < 2:
        raise UserError(f"--min-parts {min_parts}: must be >= 2")
    done = {"partitions": 0, "parts_before": 0, "files_after": 0, "rows": 0}
    for part_dir, groups in plan_compaction(lake, name, min_parts).items():
        live = lake.fs_path(part_dir)
        stage_root = lake.fs_path(f"{STAGING_DIR}/{uuid.uuid4().hex}")
        staged = os.path.join(stage_root, "partition")
        os.makedirs(staged)
        try:
            merged = {p for g in groups for p in g}
            for entry in os.listdir(live):   # everything not merged stays, as a hard link (no copy)
                if posixpath.join(part_dir, entry) not in merged and os.path.isfile(os.path.join(live, entry)):
                    os.link(os.path.join(live, entry), os.path.join(staged, entry))
            expected = sum(pq.ParquetFile(lake.fs_path(p)).metadata.num_rows for p in merged)
            rows, outputs = 0, []
            for parts in groups:
                names, n = _merge(lake, parts, staged, max_rows_per_file, row_group_rows)
                rows, outputs = rows + n, outputs + names
            files = len(outputs)
            written = sum(pq.ParquetFile(os.path.join(staged, f)).metadata.num_rows for f in outputs)
            if rows != expected or written != rows:
                raise UserError(f"lake compact {name}: {part_dir}: wrote {rows} rows, the parts hold {expected}; "
                                "left unchanged")
            exchange_dirs(staged, live)   # the one step readers can observe
        finally:
            shutil.rmtree(stage_root, ignore_errors=True)   # after the swap: the old parts
        done["partitions"] += 1
        done["parts_before"] += len(merged)
        done["files_after"] += files
        done["rows"] += rows
    return done


def _cmd_compact(args) -> int:
    from pipelines.cli import lake_from_args
    lake = lake_from_args(args)
    lake.check_reachable()
    if args.table not in storage_schemas.TABLES:
        raise UserError(f"unknown table {args.table!r}; `cpldm lake ls --all` lists them")
    done = compact_table(lake, args.table, min_parts=args.min_parts, max_rows_per_file=args.max_rows_per_file)
    if not done["partitions"]:
        print(f"{args.table}: nothing to compact (no partition has {args.min_parts}+ parts of one kind)")
    else:
        print(f"{args.table}: {done['parts_before']} parts -> {done['files_after']} file(s) in "
              f"{done['partitions']} partition(s), {done['rows']} rows")
    return 0


def add_parser(lake_sub) -> None:
    """Register ``cpldm lake compact`` under the ``lake`` command's subparsers."""
    p = lake_sub.add_parser("compact", help="merge a directory table's small Parquet parts (atomic, local lakes)")
    p.add_argument("table", help="table name, e.g. synthetic_manifest")
    p.add_argument("--min-parts", type=int, default=2, help="compact a partition holding at least this many parts")
    p.add_argument("--max-rows-per-file", type=int, default=DEFAULT_MAX_ROWS_PER_FILE)
    p.set_defaults(func=_cmd_compact)

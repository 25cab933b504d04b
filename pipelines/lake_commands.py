"""``cpldm lake init|ls|validate|lineage``: create a lake, list its tables, check every table against its schema,
walk an artifact's records back to its sources."""
from __future__ import annotations

import posixpath

import pyarrow.parquet as pq

from cpldm_core.errors import UserError

import storage_schemas
from storage_schemas import artifacts
from storage_schemas import spec as schema_spec
from pipelines.storage import Lake


def table_files(lake: Lake, name: str) -> list[str]:
    """Lake-relative Parquet files of table ``name`` (one for file tables, the parts for directory tables).

    Unfinished writes and files reached through symbolic links are not part of a table (:meth:`Lake.data_files`).
    """
    spec = storage_schemas.table_spec(name)
    if not spec.is_directory:
        return [spec.path] if lake.exists(spec.path) and not lake.is_linked(spec.path) else []
    depth = len(spec.partitioning)
    files = []
    for rel in lake.data_files(spec.path):
        inner = posixpath.relpath(rel, spec.path).split("/")
        if len(inner) == depth + 1 and all("=" in d for d in inner[:-1]):
            files.append(rel)
    return files


def validate_lake(lake: Lake) -> dict[str, list[str]]:
    """Every problem of every table in the lake, per table (``{}`` when the lake is valid).

    Streams: one file at a time, and of each file its footer (schema, schema version in the metadata, and the
    per-row-group null counts of the non-nullable columns); only a column whose footer has no null count is
    read, batch by batch. Memory is one footer (or one batch of one column), whatever the table's size.
    """
    found: dict[str, list[str]] = {}
    for name in sorted(storage_schemas.TABLES):
        for rel in table_files(lake, name):
            issues = validate_file(lake, rel, name)
            if issues:
                found.setdefault(name, []).extend(f"{rel}: {p}" for p in issues)
    return found


def validate_file(lake: Lake, rel: str, name: str) -> list[str]:
    """Problems of one Parquet file of table ``name`` (see :func:`validate_lake`)."""
    try:
        with lake.fs.open(lake.fs_path(rel), "rb") as fh:
            pf = pq.ParquetFile(fh)
            schema = pf.schema_arrow
            issues = []
            version = (schema.metadata or {}).get(schema_spec.META_SCHEMA_VERSION)
            if version is None:
                issues.append("no cpldm schema version in its metadata (not written by cpldm?)")
            elif version.decode() != storage_schemas.SCHEMA_VERSION:
                issues.append(f"schema version {version.decode()}, this cpldm reads {storage_schemas.SCHEMA_VERSION}")
            issues += storage_schemas.problems(schema, name)
            for field in storage_schemas.table_spec(name).schema:
                if field.nullable or field.name not in schema.names or any(field.name in i for i in issues):
                    continue
                nulls = _null_count(pf, field.name)
                if nulls:
                    issues.append(f"column '{field.name}' has {nulls} null value(s) but may not be null")
            return issues
    except Exception as exc:  # unreadable file is itself a finding
        return [f"not a readable Parquet file ({exc})"]


def _null_count(pf: "pq.ParquetFile", column: str) -> int:
    """Nulls in a top-level column: from the row groups' statistics, else by reading that column in batches."""
    meta = pf.metadata
    leaf = [j for j in range(meta.num_columns) if meta.schema.column(j).path == column]
    total = 0
    for r in range(meta.num_row_groups):
        stats = meta.row_group(r).column(leaf[0]).statistics if leaf else None
        if stats is None or not stats.has_null_count:   # nested column or no statistics: read it
            return sum(b.column(0).null_count for b in pf.iter_batches(batch_size=65536, columns=[column]))
        total += stats.null_count
    return total


def _cmd_init(args) -> int:
    from pipelines.cli import lake_from_args
    lake = lake_from_args(args)
    info = lake.init(create_bucket=args.create_bucket)
    print(f"lake ready at {lake.uri} (schema version {info['schema_version']})")
    return 0


def _cmd_ls(args) -> int:
    from pipelines.cli import lake_from_args
    lake = lake_from_args(args)
    lake.check_reachable()
    print(f"{'table':24s} {'files':>6s} {'rows':>10s}  path")
    for name in sorted(storage_schemas.TABLES):
        files = table_files(lake, name)
        if not files and not args.all:
            continue
        rows = 0
        for rel in files:
            with lake.fs.open(lake.fs_path(rel), "rb") as fh:
                rows += pq.ParquetFile(fh).metadata.num_rows
        print(f"{name:24s} {len(files):6d} {rows:10d}  {storage_schemas.TABLES[name].path}")
    return 0


def _cmd_validate(args) -> int:
    from pipelines.cli import lake_from_args
    lake = lake_from_args(args)
    lake.check_reachable()
    found = validate_lake(lake)
    if not found:
        n = sum(len(table_files(lake, t)) for t in storage_schemas.TABLES)
        print(f"lake {lake.uri}: {n} table file(s), all valid")
        return 0
    total = sum(len(v) for v in found.values())
    print(f"lake {lake.uri}: {total} problem(s)")
    for name, items in found.items():
        for item in items:
            print(f"  [{name}] {item}")
    return 1


def parse_artifact(text: str) -> tuple[str, str]:
    """``Kind:id`` (``EvalRun:default``) or an artifact directory (``eval/default``, ``models/scm``) -> (kind, id)."""
    kind, sep, ident = text.partition(":")
    if sep and kind in artifacts.RECORDS and ident:
        return kind, ident
    path = text.strip("/")
    for kind, template in artifacts.ARTIFACT_DIRS.items():
        prefix = template.split("{id}")[0]
        ident = path[len(prefix):] if path.startswith(prefix) else ""
        if ident and "/" not in ident:
            return kind, ident
    raise UserError(f"lake lineage: {text!r} is neither Kind:id (kinds: {', '.join(artifacts.RECORDS)}) nor an "
                    f"artifact directory ({', '.join(t.format(id='<id>') for t in artifacts.ARTIFACT_DIRS.values())})")


def lineage_lines(nodes: list) -> list[str]:
    """One line per :class:`storage_schemas.artifacts.LineageNode`, indented by depth: role, kind, id, fingerprint."""
    lines = []
    for node in nodes:
        what = f"{node.kind} '{node.id}' {node.fingerprint[:12]}"
        note = " (listed above)" if node.repeated else ("" if node.record is not None else " (source)")
        lines.append(f"{'  ' * node.depth}{node.role + ': ' if node.role else ''}{what}{note}")
    return lines


def _cmd_lineage(args) -> int:
    from pipelines.cli import lake_from_args
    lake = lake_from_args(args)
    lake.check_reachable()
    kind, ident = parse_artifact(args.artifact)
    print("\n".join(lineage_lines(artifacts.lineage(lake, kind, ident))))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("lake", help="create, list and validate a lake")
    lake_sub = p.add_subparsers(dest="lake_command", metavar="<init|ls|validate|lineage|compact>", required=True)
    init = lake_sub.add_parser("init", help="create the lake root (and its S3 bucket with --create-bucket)")
    init.add_argument("--create-bucket", action="store_true", help="create the S3 bucket if it does not exist")
    init.set_defaults(func=_cmd_init)
    ls = lake_sub.add_parser("ls", help="list the lake's tables with file and row counts")
    ls.add_argument("--all", action="store_true", help="also list tables not yet written")
    ls.set_defaults(func=_cmd_ls)
    val = lake_sub.add_parser("validate", help="check every table against its schema; report all problems")
    val.set_defaults(func=_cmd_validate)
    lin = lake_sub.add_parser("lineage", help="the records an artifact was made from, back to its sources")
    lin.add_argument("artifact", help="Kind:id (EvalRun:default) or an artifact directory (eval/default, models/scm)")
    lin.set_defaults(func=_cmd_lineage)
    from pipelines.compaction import add_parser as add_compact  # noqa: PLC0415  (compaction imports this module)
    add_compact(lake_sub)

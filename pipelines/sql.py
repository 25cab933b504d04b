"""``cpldm sql``: ad hoc DuckDB SQL over the lake, one view per lake table, read-only.

Views are created for every registered table present in the lake (names as in ``storage_schemas.TABLES``:
``sites``, ``features_well``, ``annotations_moa``, ...). Directory tables are read hive-partitioned, so
partition columns (``dataset``, ``run``, ``vae``...) are ordinary columns.

Read-only by construction: only SELECT/EXPLAIN statements are accepted (no COPY, CREATE, INSERT, ATTACH,
SET...), and after the views exist DuckDB's file access is limited to the lake root and locked
(``allowed_directories`` + ``enable_external_access=false`` + ``lock_configuration``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import storage_schemas
from cpldm_core.errors import UserError
from pipelines.storage import Lake

#: Statement types a read-only query may contain (DESCRIBE/SHOW/SUMMARIZE parse as SELECT).
READ_ONLY_STATEMENTS = ("SELECT", "EXPLAIN")


def _httpfs_extension_dir() -> str | None:
    """Folder of the offline httpfs extension shipped by the ``duckdb-ext-httpfs`` wheel, if installed."""
    import importlib.util
    spec = importlib.util.find_spec("duckdb_ext")
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(list(spec.submodule_search_locations)[0]) / "extensions")


def _table_glob(lake: Lake, spec) -> str:
    if not spec.is_directory:
        return lake.uri_of(spec.path)
    parts = [spec.path] + ["*=*"] * len(spec.partitioning) + ["*.parquet"]
    return lake.uri_of("/".join(parts))


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def connect(lake: Lake, read_only: bool = True):
    """A DuckDB connection with a view per lake table present. Returns ``(connection, [view names])``."""
    import duckdb

    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    if lake.is_s3:
        ext_dir = _httpfs_extension_dir()
        if ext_dir is None:
            raise UserError("cpldm sql on s3:// lakes needs the duckdb-ext-httpfs package (offline httpfs)")
        con.execute(f"SET extension_directory={_sql_literal(ext_dir)}")
        con.execute("LOAD httpfs")
        endpoint = lake.endpoint_url or ""
        scheme, _, host = endpoint.partition("://") if endpoint else ("https", "", "")
        secret = [
            "TYPE s3",
            f"KEY_ID {_sql_literal(os.environ.get('AWS_ACCESS_KEY_ID', ''))}",
            f"SECRET {_sql_literal(os.environ.get('AWS_SECRET_ACCESS_KEY', ''))}",
            f"REGION {_sql_literal(os.environ.get('AWS_DEFAULT_REGION', 'us-east-1'))}",
        ]
        if host:
            secret += [f"ENDPOINT {_sql_literal(host)}", "URL_STYLE 'path'", f"USE_SSL {str(scheme == 'https').lower()}"]
        con.execute(f"CREATE SECRET lake_s3 ({', '.join(secret)})")
    views = []
    for name, spec in sorted(storage_schemas.TABLES.items()):
        if not lake.exists(spec.path):
            continue
        if spec.is_directory and not any(p.endswith(".parquet") for p in lake.ls(spec.path, recursive=True)):
            continue
        source = _table_glob(lake, spec)
        hive = "true" if spec.partitioning else "false"
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet({_sql_literal(source)}, "
                    f"hive_partitioning={hive}, union_by_name=true)")
        views.append(name)
    if read_only:
        root = lake.uri.rstrip("/") + "/"
        con.execute(f"SET allowed_directories=[{_sql_literal(root)}]")
        con.execute("SET enable_external_access=false")
        con.execute("SET lock_configuration=true")
    return con, views


def check_read_only(con, query: str) -> None:
    """Raise :class:`UserError` unless every statement in ``query`` is a SELECT/EXPLAIN."""
    import duckdb
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as exc:
        raise UserError(f"SQL does not parse: {exc}") from None
    if not statements:
        raise UserError("empty SQL query")
    for st in statements:
        kind = st.type.name
        if kind not in READ_ONLY_STATEMENTS:
            raise UserError(f"cpldm sql is read-only: {kind} statements are refused "
                            f"({st.query.strip()[:60]!r}); use --format/--output to save results")


def query(lake: Lake, sql: str, read_only: bool = True):
    """Run ``sql`` against the lake and return a pandas DataFrame."""
    import duckdb
    con, _ = connect(lake, read_only=read_only)
    if read_only:
        check_read_only(con, sql)
    try:
        return con.sql(sql).df()
    except duckdb.Error as exc:
        raise UserError(f"query failed: {str(exc).splitlines()[0]}") from None
    finally:
        con.close()


def _cmd_sql(args) -> int:
    from pipelines.cli import lake_from_args
    lake = lake_from_args(args)
    lake.check_reachable()
    if args.list:
        _, views = connect(lake)
        for v in views:
            print(f"{v:24s} {storage_schemas.TABLES[v].description}")
        return 0
    if not args.query:
        raise UserError("give a query, e.g. cpldm sql \"SELECT count(*) FROM sites\" (or --list for the views)")
    frame = query(lake, args.query)
    if args.output:
        fmt = args.format or Path(args.output).suffix.lstrip(".") or "csv"
        if fmt == "csv":
            frame.to_csv(args.output, index=False)
        elif fmt == "parquet":
            frame.to_parquet(args.output, index=False)
        elif fmt == "json":
            frame.to_json(args.output, orient="records", lines=True)
        else:
            raise UserError(f"--format {fmt}: choose csv, parquet or json")
        print(f"{len(frame)} rows -> {args.output}", file=sys.stderr)
    elif args.format in ("csv", "json"):
        out = frame.to_csv(index=False) if args.format == "csv" else frame.to_json(orient="records", lines=True)
        sys.stdout.write(out)
    else:
        import pandas as pd
        with pd.option_context("display.max_rows", args.max_rows, "display.max_columns", 50, "display.width", 200):
            print(frame.to_string(index=False, max_rows=args.max_rows))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("sql", help="read-only DuckDB SQL over the lake's tables (one view per table)")
    p.add_argument("query", nargs="?", help="SQL text (SELECT / EXPLAIN / DESCRIBE / SUMMARIZE)")
    p.add_argument("--list", action="store_true", help="list the views available in this lake")
    p.add_argument("--format", choices=["table", "csv", "parquet", "json"], default=None,
                   help="output format (default: a table on stdout; parquet needs --output)")
    p.add_argument("--output", "-o", help="write the result to this file instead of stdout")
    p.add_argument("--max-rows", type=int, default=50, help="rows shown in table output")
    p.set_defaults(func=_cmd_sql)

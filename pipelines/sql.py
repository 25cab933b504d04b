"""``cpldm sql``: ad hoc DuckDB SQL over the lake, one view per lake table, read-only.

Views are created for every registered table present in the lake (names as in ``storage_schemas.TABLES``:
``sites``, ``features_well``, ``annotations_moa``, ...). Directory tables are read hive-partitioned, so
partition columns (``dataset``, ``run``, ``vae``...) are ordinary columns.

Read-only by three independent locks (any one of them stops a write):

1. every statement is parsed by DuckDB itself and its whole tree walked (:func:`check_read_only`): only
   SELECT (and EXPLAIN of a SELECT) is accepted, with table functions from :data:`READ_TABLE_FUNCTIONS` only
   (no ``query()``, ``json_execute_serialized_sql()``, ``checkpoint()``...), so a COPY hidden inside
   ``EXPLAIN ANALYZE``, a CTE or a string is refused before anything runs;
2. the views list the lake's Parquet files one by one, and DuckDB may open exactly those files
   (``allowed_paths``; no directory at all, ``enable_external_access=false``, ``lock_configuration``), after
   dropping any file reached through a symbolic link and any unfinished ``*.tmp-*`` write;
3. S3 credentials live only in DuckDB's secret manager (redacted); the ``s3_*`` settings that httpfs fills
   from the environment are blanked before the configuration is locked.

DuckDB runs with a bounded memory (``--memory-limit``, default :data:`DEFAULT_MEMORY_LIMIT`) and thread count
(``--threads``), and spills to a private temporary folder (removed by DuckDB at the end), never to ``./.tmp``.
"""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import uuid
from pathlib import Path

import storage_schemas
from cpldm_core.errors import UserError
from pipelines.storage import Lake

#: Table functions a query may call: readers (restricted to the lake's files by ``allowed_paths``), generators
#: and catalogue introspection. Anything else (``query``, ``query_table``, ``json_execute_serialized_sql``,
#: ``checkpoint``, ``enable_logging``...) can execute SQL or change state, and is refused.
READ_TABLE_FUNCTIONS = frozenset({
    "read_parquet", "parquet_scan", "parquet_metadata", "parquet_schema", "parquet_file_metadata",
    "parquet_kv_metadata", "read_csv", "read_csv_auto", "read_json", "read_json_auto", "read_ndjson",
    "read_ndjson_auto", "read_text", "read_blob", "glob", "range", "generate_series", "unnest", "repeat",
    "json_each", "json_tree", "summary", "duckdb_columns", "duckdb_tables", "duckdb_views", "duckdb_functions",
    "duckdb_types", "duckdb_keywords", "pragma_table_info", "pragma_show", "pragma_version",
})
#: Scalar functions refused anywhere in a query (they run SQL text).
REFUSED_FUNCTIONS = frozenset({"query", "query_table", "json_execute_serialized_sql"})
#: DuckDB settings httpfs fills from ``AWS_*`` variables at load time; blanked so ``current_setting`` shows nothing.
S3_SETTINGS = ("s3_access_key_id", "s3_secret_access_key", "s3_session_token")
#: DuckDB's own default is ~80% of the machine's RAM: a laptop user's ad hoc query must not take that.
DEFAULT_MEMORY_LIMIT = "2GB"
DEFAULT_THREADS = 2
_EXPLAIN = re.compile(r"^\s*EXPLAIN\s+(?:\([^)]*\)\s*|ANALY[SZ]E\s+)*", re.IGNORECASE)


def _httpfs_extension_dir() -> str | None:
    """Folder of the offline httpfs extension shipped by the ``duckdb-ext-httpfs`` wheel, if installed."""
    import importlib.util
    spec = importlib.util.find_spec("duckdb_ext")
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(list(spec.submodule_search_locations)[0]) / "extensions")


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _table_files(lake: Lake, spec) -> list[str]:
    """Full URIs of a table's Parquet files (symlinks and unfinished writes already dropped by the lake)."""
    from pipelines.lake_commands import table_files
    return [lake.uri_of(rel) for rel in table_files(lake, spec.name)]


def connect(lake: Lake, read_only: bool = True, memory_limit: str = DEFAULT_MEMORY_LIMIT,
            threads: int = DEFAULT_THREADS):
    """A DuckDB connection with a view per lake table present. Returns ``(connection, [view names])``.

    ``read_only`` locks file access to the listed Parquet files and the configuration (see module doc);
    ``evaluate`` passes ``False`` and keeps its own connection unlocked.
    """
    import duckdb

    # DuckDB creates this folder only when it spills and removes it when the connection closes
    temp_dir = os.path.join(tempfile.gettempdir(), f"cpldm-duckdb-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False,
                                     "memory_limit": memory_limit, "threads": int(threads),
                                     "temp_directory": temp_dir})
    except duckdb.Error as exc:
        raise UserError(f"DuckDB refused the limits memory_limit={memory_limit!r}, threads={threads}: "
                        f"{str(exc).splitlines()[0]}") from None
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
        if os.environ.get("AWS_SESSION_TOKEN"):
            secret.append(f"SESSION_TOKEN {_sql_literal(os.environ['AWS_SESSION_TOKEN'])}")
        if host:
            secret += [f"ENDPOINT {_sql_literal(host)}", "URL_STYLE 'path'",
                       f"USE_SSL {str(scheme == 'https').lower()}"]
        con.execute(f"CREATE TEMPORARY SECRET lake_s3 ({', '.join(secret)})")
        for name in S3_SETTINGS:
            con.execute(f"SET {name}=''")
    views, files = [], []
    for name, spec in sorted(storage_schemas.TABLES.items()):
        found = _table_files(lake, spec)
        if not found:
            continue
        hive = "true" if spec.partitioning else "false"
        listed = ", ".join(_sql_literal(f) for f in found)
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet([{listed}], "
                    f"hive_partitioning={hive}, union_by_name=true)")
        views.append(name)
        files += found
    if read_only:
        con.execute(f"SET allowed_paths=[{', '.join(_sql_literal(f) for f in files)}]")
        con.execute("SET allowed_directories=[]")
        con.execute("SET enable_external_access=false")
        con.execute("SET lock_configuration=true")
    return con, views


def _walk(node, refused: list[str]) -> None:
    """Collect in ``refused`` every forbidden function call of a serialized statement tree."""
    if isinstance(node, dict):
        if node.get("type") == "TABLE_FUNCTION":
            name = str((node.get("function") or {}).get("function_name", "")).lower()
            if name not in READ_TABLE_FUNCTIONS:
                refused.append(f"table function {name}()")
        name = str(node.get("function_name", "")).lower()
        if name in REFUSED_FUNCTIONS:
            refused.append(f"function {name}()")
        for value in node.values():
            _walk(value, refused)
    elif isinstance(node, list):
        for value in node:
            _walk(value, refused)


def _check_select(con, text: str) -> None:
    """``text`` is one SELECT-like statement: walk DuckDB's own parse tree of it for forbidden calls."""
    raw = con.execute("SELECT json_serialize_sql(?)", [text]).fetchone()[0]
    tree = json.loads(raw)
    if tree.get("error"):
        raise UserError(f"cpldm sql cannot check this statement for writes, so refuses it "
                        f"({tree.get('error_message', 'unsupported syntax')}): {text.strip()[:60]!r}")
    refused: list[str] = []
    _walk(tree.get("statements", []), refused)
    if refused:
        raise UserError(f"cpldm sql is read-only: {', '.join(sorted(set(refused)))} refused in "
                        f"{text.strip()[:60]!r}")


def check_read_only(con, query: str) -> None:
    """Raise :class:`UserError` unless every statement of ``query`` only reads.

    Accepted: SELECT (DESCRIBE, SHOW, SUMMARIZE and FROM-first queries parse as SELECT) and EXPLAIN [ANALYZE]
    of a SELECT; every table function must be a reader (:data:`READ_TABLE_FUNCTIONS`). ``EXPLAIN ANALYZE``
    executes what it wraps, so the wrapped statement is checked like a top-level one.
    """
    import duckdb
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as exc:
        raise UserError(f"SQL does not parse: {str(exc).splitlines()[0]}") from None
    if not statements:
        raise UserError("empty SQL query")
    for st in statements:
        text, kind = st.query, st.type.name
        if kind == "EXPLAIN":
            text = _EXPLAIN.sub("", text, count=1)
            inner = con.extract_statements(text)
            kind = inner[0].type.name if len(inner) == 1 else "EXPLAIN"
        if kind != "SELECT":
            raise UserError(f"cpldm sql is read-only: {kind} statements are refused "
                            f"({st.query.strip()[:60]!r}); use --format/--output to save results")
        _check_select(con, text)


def query(lake: Lake, sql: str, read_only: bool = True, memory_limit: str = DEFAULT_MEMORY_LIMIT,
          threads: int = DEFAULT_THREADS):
    """Run ``sql`` against the lake and return a pandas DataFrame."""
    import duckdb
    con, _ = connect(lake, read_only=read_only, memory_limit=memory_limit, threads=threads)
    try:
        if read_only:
            check_read_only(con, sql)
        return con.sql(sql).df()
    except duckdb.Error as exc:
        raise UserError(f"query failed: {str(exc).splitlines()[0]}") from None
    finally:
        con.close()


def check_lake_exists(lake: Lake) -> None:
    """One line instead of empty output when ``--lake`` points nowhere."""
    lake.check_reachable()
    if not lake.exists(""):
        raise UserError(f"lake {lake.uri} does not exist; check --lake (or create it with `cpldm lake init`)")
    if not lake.is_s3 and not os.path.isdir(lake.uri):
        raise UserError(f"lake {lake.uri} is not a directory; check --lake")


def output_path(lake: Lake, output: str, force: bool) -> Path:
    """Where ``--output`` may write: a new file outside the lake (``force`` allows replacing a file)."""
    path = Path(output).expanduser()
    parent = path.parent.resolve()
    if not parent.is_dir():
        raise UserError(f"--output {output}: folder {path.parent} does not exist")
    target = parent / path.name
    if target.is_symlink() or target.is_dir():
        raise UserError(f"--output {output}: is a directory or a symbolic link; give a new file name")
    if not lake.is_s3:
        root = Path(lake.uri)
        if target == root or root in target.parents:
            raise UserError(f"--output {output}: is inside the lake {lake.uri}; cpldm sql never writes to the lake")
    if target.exists() and not force:
        raise UserError(f"--output {output}: file exists; pass --force to replace it")
    return target


def _cmd_sql(args) -> int:
    from pipelines.cli import lake_from_args
    lake = lake_from_args(args)
    check_lake_exists(lake)
    limits = {"memory_limit": args.memory_limit, "threads": args.threads}
    if args.threads < 1:
        raise UserError(f"--threads {args.threads}: must be >= 1")
    if args.list:
        con, views = connect(lake, **limits)
        con.close()
        for v in views:
            print(f"{v:24s} {storage_schemas.TABLES[v].description}")
        return 0
    if not args.query:
        raise UserError("give a query, e.g. cpldm sql \"SELECT count(*) FROM sites\" (or --list for the views)")
    target = output_path(lake, args.output, args.force) if args.output else None
    fmt = args.format or (target.suffix.lstrip(".") if target else "") or ("csv" if target else None)
    if target and fmt not in ("csv", "parquet", "json"):
        raise UserError(f"--format {fmt}: choose csv, parquet or json")
    frame = query(lake, args.query, **limits)
    if target:
        # write beside the target then rename: an interrupted write never leaves half a file under its name
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        if fmt == "csv":
            frame.to_csv(tmp, index=False)
        elif fmt == "parquet":
            frame.to_parquet(tmp, index=False)
        else:
            frame.to_json(tmp, orient="records", lines=True)
        os.replace(tmp, target)
        print(f"{len(frame)} rows -> {target}", file=sys.stderr)
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
    p.add_argument("--output", "-o", help="write the result to this NEW file outside the lake")
    p.add_argument("--force", action="store_true", help="let --output replace an existing file (never in the lake)")
    p.add_argument("--max-rows", type=int, default=50, help="rows shown in table output")
    p.add_argument("--memory-limit", default=DEFAULT_MEMORY_LIMIT,
                   help=f"DuckDB memory limit, spilling beyond it (default {DEFAULT_MEMORY_LIMIT})")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help=f"DuckDB threads (default {DEFAULT_THREADS})")
    p.set_defaults(func=_cmd_sql)

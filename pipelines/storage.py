"""The lake: one URI (``/local/dir`` or ``s3://bucket/prefix``) behind fsspec and pyarrow filesystems.

Every stage reads and writes through :class:`Lake`, so the embedded default and S3 share one code path.
Writes are atomic (temp file + rename locally; a single PUT on S3, which is atomic per object) and units of
work are committed with marker objects written *after* their outputs, which is what makes reruns
exactly-once: a unit without a marker is redone from scratch and overwrites whatever partial output it left.
A local write goes through a hidden ``.<name>.tmp-<uuid>``, and readers list data files themselves
(:meth:`Lake.data_files`: no temporary, hidden or symlinked file is ever data). :meth:`Lake.claim_unit` is an
atomic create-if-absent claim, so concurrent runs of a stage split its units (see docs/lake.md).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import posixpath
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

import cpldm_core
import storage_schemas
from cpldm_core.configuration import config_to_dict
from cpldm_core.errors import UserError
from storage_schemas import spec as schema_spec

MARKER_DIR = "_markers"
CLAIM_DIR = "_claims"
#: Infix of the temporary name a local write goes through before its atomic rename.
TMP_INFIX = ".tmp-"
#: A claim older than this (seconds) is abandoned: its owner died without releasing it (killed, machine lost).
CLAIM_STALE_SECONDS = 6 * 3600
LAKE_FILE = "_lake.json"


def code_version() -> str:
    """Package version plus the git commit of the checkout when there is one."""
    version = cpldm_core.__version__
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version}+{commit}" if commit else version


@dataclass(frozen=True)
class Lake:
    """A lake root. Picklable (holds only strings), so Ray tasks receive it and reopen filesystems lazily.

    Args:
        uri: ``/abs/or/relative/dir``, ``file:///dir`` or ``s3://bucket[/prefix]``.
        endpoint_url: S3 endpoint (``http://127.0.0.1:5000``); defaults to ``$AWS_ENDPOINT_URL``.
    """

    uri: str
    endpoint_url: str | None = field(default=None)

    def __post_init__(self):
        uri = self.uri.rstrip("/") or "/"
        if uri.startswith("file://"):
            uri = uri[len("file://"):]
        if not uri.startswith("s3://"):
            if "://" in uri:
                raise UserError(f"lake URI {self.uri!r}: only local paths and s3:// URIs are supported")
            uri = str(Path(uri).expanduser().resolve())
        object.__setattr__(self, "uri", uri)
        if self.is_s3 and self.endpoint_url is None:
            object.__setattr__(self, "endpoint_url", os.environ.get("AWS_ENDPOINT_URL") or None)

    # ------------------------------------------------------------------ filesystems
    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    @property
    def bucket(self) -> str:
        return self.uri[len("s3://"):].split("/", 1)[0]

    @cached_property
    def fs(self):
        """fsspec filesystem (``s3fs`` for S3; synchronous, no instance cache)."""
        if self.is_s3:
            return s3_filesystem(self.endpoint_url)
        import fsspec
        return fsspec.filesystem("file", auto_mkdir=True)

    @cached_property
    def arrow_fs(self):
        """pyarrow filesystem for Parquet datasets and Ray Data."""
        import pyarrow.fs as pafs
        if not self.is_s3:
            return pafs.LocalFileSystem()
        return arrow_s3_filesystem(self.endpoint_url)

    def __getstate__(self):
        # cached filesystems hold sockets/event loops: never ship them to Ray workers
        return {"uri": self.uri, "endpoint_url": self.endpoint_url}

    def __setstate__(self, state):
        object.__setattr__(self, "uri", state["uri"])
        object.__setattr__(self, "endpoint_url", state["endpoint_url"])

    # ------------------------------------------------------------------ paths
    def uri_of(self, rel: str) -> str:
        """Full URI of a lake-relative path."""
        return self.uri if not rel else f"{self.uri}/{rel.lstrip('/')}"

    def fs_path(self, rel: str) -> str:
        """Path as the filesystems want it (no ``s3://`` scheme)."""
        full = self.uri_of(rel)
        return full[len("s3://"):] if full.startswith("s3://") else full

    @contextlib.contextmanager
    def local_dir(self, rel: str) -> Iterator[str]:
        """A local directory holding lake directory ``rel`` while the block runs, for loaders that need a path
        (``from_pretrained``): the directory itself on a local lake; on S3 a temporary copy, removed afterwards
        (load what you need inside the block)."""
        if not self.is_s3:
            yield self.fs_path(rel)
            return
        with tempfile.TemporaryDirectory(prefix="cpldm-lake-") as tmp:
            for path in self.ls(rel, recursive=True):
                dest = Path(tmp) / posixpath.relpath(path, rel)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(self.read_bytes(path))
            yield tmp

    def exists(self, rel: str) -> bool:
        if self.is_s3:
            self.fs.invalidate_cache(self.fs_path(rel))
        return self.fs.exists(self.fs_path(rel))

    def ls(self, rel: str = "", recursive: bool = False) -> list[str]:
        """Lake-relative paths below ``rel`` (files only when ``recursive``), sorted."""
        base = self.fs_path("")
        target = self.fs_path(rel)
        if self.is_s3:
            # s3fs caches listings; other processes (Ray workers) may have written since
            self.fs.invalidate_cache(target)
        if not self.fs.exists(target):
            return []
        if recursive:
            found = self.fs.find(target)
        else:
            found = self.fs.ls(target, detail=False)
        out = []
        for p in found:
            p = p[len("s3://"):] if p.startswith("s3://") else p
            out.append(posixpath.relpath(p, base) if not self.is_s3 else p[len(base):].lstrip("/"))
        return sorted(out)

    def data_files(self, rel: str, suffix: str = ".parquet") -> list[str]:
        """Lake-relative data files below ``rel`` ending in ``suffix``, sorted, that are safe to read as data.

        Drops unfinished writes (``*.tmp-<uuid>`` of :meth:`write_bytes`, and anything hidden: ``.`` or ``_``
        names, as pyarrow and Spark do) and, on a local lake, any file reached through a symbolic link (a link
        inside the lake to ``/etc`` must not make outside files part of a table).
        """
        files = []
        for path in self.ls(rel, recursive=True):
            name = posixpath.basename(path)
            inner = posixpath.relpath(path, rel) if rel else path
            if not name.endswith(suffix) or TMP_INFIX in name or any(
                    part.startswith((".", "_")) for part in inner.split("/")):
                continue
            if not self.is_linked(path):
                files.append(path)
        return files

    def is_linked(self, rel: str) -> bool:
        """Whether a local lake path goes through a symbolic link (always False on S3, which has none)."""
        if self.is_s3:
            return False
        full = self.fs_path(rel)
        return os.path.realpath(full) != os.path.normpath(full)

    # ------------------------------------------------------------------ bytes and JSON
    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open(self.fs_path(rel), "rb") as fh:
            return fh.read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomic write: readers see the old object or the new one, never a partial file."""
        target = self.fs_path(rel)
        if self.is_s3:
            self.fs.pipe_file(target, data)
            return
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        # hidden and marked: a file left by a writer killed before the rename is never listed as data
        tmp = posixpath.join(posixpath.dirname(target), f".{posixpath.basename(target)}{TMP_INFIX}{uuid.uuid4().hex}")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def delete(self, rel: str) -> None:
        """Remove a file or a directory tree if it exists."""
        target = self.fs_path(rel)
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)

    # ------------------------------------------------------------------ tables
    def write_table(self, rel: str, table: pa.Table, table_name: str, config: Any = None) -> None:
        """Validate ``table`` against ``table_name``'s schema and write it as one Parquet file.

        The schema version, table name, config (a dataclass or dict) and code version go into the
        Parquet key-value metadata, so every file says what made it.
        """
        table = schema_spec.conform(table, table_name)
        meta = dict(table.schema.metadata or {})
        meta[schema_spec.META_SCHEMA_VERSION] = storage_schemas.SCHEMA_VERSION.encode()
        meta[schema_spec.META_TABLE] = table_name.encode()
        meta[schema_spec.META_CODE_VERSION] = code_version().encode()
        if config is not None:
            cfg = config if isinstance(config, dict) else config_to_dict(config)
            meta[schema_spec.META_CONFIG] = json.dumps(cfg, sort_keys=True, default=str).encode()
        table = table.replace_schema_metadata(meta)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.write_bytes(rel, buf.getvalue())

    def read_table(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        """Read one Parquet file or a (hive-partitioned) directory of them."""
        target = self.fs_path(rel)
        if not self.fs.exists(target):
            raise UserError(f"{self.uri_of(rel)} does not exist; run the stage that writes it first")
        if rel.endswith(".parquet"):
            with self.fs.open(target, "rb") as fh:
                return pq.read_table(fh, columns=columns)
        import pyarrow.dataset as ds
        # an explicit file list: pyarrow's own discovery would read a leftover ``x.parquet.tmp-<uuid>`` as data
        files = [self.fs_path(f) for f in self.data_files(rel)]
        dataset = ds.dataset(files, filesystem=self.arrow_fs, format="parquet",
                             partitioning=ds.partitioning(flavor="hive"), partition_base_dir=target)
        return dataset.to_table(columns=columns)

    def table_path(self, table_name: str) -> str:
        return storage_schemas.table_spec(table_name).path

    def read_named(self, table_name: str, columns: list[str] | None = None) -> pa.Table:
        return self.read_table(self.table_path(table_name), columns=columns)

    def write_named(self, table_name: str, table: pa.Table, config: Any = None, part: str | None = None,
                    partition: dict[str, str] | None = None) -> str:
        """Write a registered table at its lake location; directory tables need ``part`` (file stem).

        Returns the lake-relative path written.
        """
        spec = storage_schemas.table_spec(table_name)
        if not spec.is_directory:
            rel = spec.path
        else:
            if part is None:
                raise ValueError(f"table {table_name} is a directory table: give part=")
            partition = partition or {}
            missing = [p for p in spec.partitioning if p not in partition]
            if missing:
                raise ValueError(f"table {table_name}: partition value(s) {missing} required")
            dirs = "/".join(f"{k}={partition[k]}" for k in spec.partitioning)
            rel = "/".join(x for x in (spec.path, dirs, f"{part}.parquet") if x)
            # partition values live in the path, not in the file (hive convention)
            table = table.drop_columns([c for c in spec.partitioning if c in table.column_names])
        self.write_table(rel, table, table_name, config=config)
        return rel

    # ------------------------------------------------------------------ unit markers
    def _marker(self, stage: str, unit: str) -> str:
        return f"{MARKER_DIR}/{stage}/{unit}.json"

    def commit_unit(self, stage: str, unit: str, info: dict | None = None) -> None:
        """Mark ``unit`` of ``stage`` done. Call only after all of the unit's outputs are written."""
        self.write_json(self._marker(stage, unit), {"unit": unit, "stage": stage, "time": time.time(),
                                                    **(info or {})})

    def is_committed(self, stage: str, unit: str) -> bool:
        return self.exists(self._marker(stage, unit))

    def committed_units(self, stage: str) -> set[str]:
        names = self.ls(f"{MARKER_DIR}/{stage}")
        return {posixpath.basename(n)[: -len(".json")] for n in names if n.endswith(".json")}

    def unit_info(self, stage: str, unit: str) -> dict:
        return self.read_json(self._marker(stage, unit))

    # ------------------------------------------------------------------ unit claims
    def _claim(self, stage: str, unit: str) -> str:
        return f"{CLAIM_DIR}/{stage}/{unit}.json"

    def claim_unit(self, stage: str, unit: str, stale_seconds: float = CLAIM_STALE_SECONDS) -> bool:
        """Atomically claim ``unit`` of ``stage`` for this process; ``False`` when another live run holds it.

        Two runs started on the same dataset then split the units instead of both redoing all of them. The
        claim is an object created only if absent (``O_CREAT|O_EXCL`` locally, an S3 conditional PUT with
        ``If-None-Match: *`` on S3) holding the owner's host, pid and time. A claim is taken over when it is
        older than ``stale_seconds``, or, on the same host, when its owner process no longer exists (a
        killed run). Release it with :meth:`release_unit` after :meth:`commit_unit`.
        """
        rel = self._claim(stage, unit)
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        body = json.dumps(owner).encode()
        for _ in range(2):
            if self._create_if_absent(rel, body):
                return True
            try:
                held = self.read_json(rel)
            except (FileNotFoundError, ValueError):
                continue  # released (or half-written by a killed owner) just now: try again
            if (held.get("host"), held.get("pid")) == (owner["host"], owner["pid"]):
                return True
            dead = held.get("host") == owner["host"] and not pid_alive(int(held.get("pid", 0)))
            if not dead and time.time() - float(held.get("time", 0)) < stale_seconds:
                return False
            self.delete(rel)  # abandoned: remove it and race the other takers for a fresh create
        return False

    def release_unit(self, stage: str, unit: str) -> None:
        self.delete(self._claim(stage, unit))

    def wait_and_claim(self, stage: str, unit: str, poll_s: float = 1.0) -> None:
        """Claim ``unit`` of ``stage``, waiting while another live run holds it (a dead run's claim is taken over)."""
        if self.claim_unit(stage, unit):
            return
        logging.getLogger(__name__).info("%s is held by another run: waiting for it to finish",
                                         self.uri_of(self._claim(stage, unit)))
        while not self.claim_unit(stage, unit):
            time.sleep(poll_s)

    def claim_units(self, stage: str, units, busy: list | None = None):
        """Yield the ``units`` this process claims, each only when the caller asks for the next one (so
        ``itertools.islice(..., n)`` claims at most ``n``). A unit another live run holds goes to ``busy``; one
        that run committed since the caller listed the committed units (its claim released) is skipped."""
        for unit in units:
            if not self.claim_unit(stage, unit):
                if busy is not None:
                    busy.append(unit)
            elif self.is_committed(stage, unit):
                self.release_unit(stage, unit)
            else:
                yield unit

    def _create_if_absent(self, rel: str, data: bytes) -> bool:
        target = self.fs_path(rel)
        if self.is_s3:
            bucket, _, key = target.partition("/")
            try:
                self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            except FileExistsError:  # s3fs maps 412 Precondition Failed to FileExistsError
                return False
            return True
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return True

    def reset_stage(self, stage: str) -> None:
        """Forget every committed unit of ``stage`` (its outputs are overwritten by the next run)."""
        self.delete(f"{MARKER_DIR}/{stage}")

    # ------------------------------------------------------------------ artifacts
    def write_config(self, rel_dir: str, config: Any, extra: dict | None = None) -> None:
        """Save the config (and code version) that made the artifact in ``rel_dir``."""
        cfg = config if isinstance(config, dict) else config_to_dict(config)
        self.write_json(f"{rel_dir.rstrip('/')}/config.json",
                        {"config": cfg, "code_version": code_version(), **(extra or {})})

    def zarr_store(self, rel: str, read_only: bool = False):
        """A Zarr v3 store at ``rel`` (LocalStore, or FsspecStore over an asynchronous s3fs)."""
        import zarr.storage
        if not self.is_s3:
            Path(self.fs_path(rel)).mkdir(parents=True, exist_ok=True) if not read_only else None
            return zarr.storage.LocalStore(self.fs_path(rel), read_only=read_only)
        fs = s3_filesystem(self.endpoint_url, asynchronous=True)
        return zarr.storage.FsspecStore(fs, path=self.fs_path(rel), read_only=read_only)

    # ------------------------------------------------------------------ lifecycle
    def check_reachable(self) -> None:
        """Fail with one clear line when the endpoint cannot be reached or the bucket is missing."""
        if not self.is_s3:
            return
        try:
            self.fs.ls(self.bucket, detail=False)
        except FileNotFoundError:
            raise UserError(f"S3 bucket '{self.bucket}' does not exist at {self.endpoint_url or 'AWS'}; "
                            "create it or run `cpldm lake init --create-bucket`") from None
        except PermissionError as exc:
            raise UserError(f"S3 access to bucket '{self.bucket}' denied: {exc}") from None
        except Exception as exc:  # botocore wraps connection errors in many types
            raise UserError(f"cannot reach S3 endpoint {self.endpoint_url or 'AWS'} for {self.uri}: "
                            f"{type(exc).__name__}: {exc}; check --endpoint-url / AWS_ENDPOINT_URL") from None

    def init(self, create_bucket: bool = False) -> dict:
        """Create the lake root and its ``_lake.json`` (schema version, creation time)."""
        if self.is_s3 and create_bucket:
            try:
                self.fs.mkdir(self.bucket)
            except FileExistsError:
                pass
            except Exception as exc:
                if "BucketAlready" not in str(exc):
                    raise UserError(f"cannot create bucket '{self.bucket}': {exc}") from None
        self.check_reachable()
        if self.exists(LAKE_FILE):
            return self.read_json(LAKE_FILE)
        info = {"schema_version": storage_schemas.SCHEMA_VERSION, "created": time.time(),
                "code_version": code_version()}
        self.write_json(LAKE_FILE, info)
        return info


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (another user's counts; a zombie does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    # a zombie still answers kill(0): it is gone for every purpose here (its claims, its cluster)
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:   # no /proc (macOS) or gone meanwhile
        return True


def s3_filesystem(endpoint_url: str | None, asynchronous: bool = False):
    """s3fs filesystem with credentials from the standard AWS variables; never cached across loops."""
    import s3fs
    kwargs: dict[str, Any] = {"skip_instance_cache": True, "asynchronous": asynchronous}
    if endpoint_url:
        kwargs["endpoint_url"] = endpoint_url
    kwargs["config_kwargs"] = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3}}
    return s3fs.S3FileSystem(**kwargs)


def arrow_s3_filesystem(endpoint_url: str | None):
    import pyarrow.fs as pafs
    kwargs: dict[str, Any] = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                              "connect_timeout": 5, "request_timeout": 60}
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    if endpoint_url:
        scheme, _, host = endpoint_url.partition("://")
        kwargs["endpoint_override"] = host
        kwargs["scheme"] = scheme
    return pafs.S3FileSystem(**kwargs)


def open_uri(uri: str, endpoint_url: str | None = None, mode: str = "rb"):
    """Open any URI (local path or s3://) for reading; used for inputs outside the lake (TIFF URLs)."""
    if uri.startswith("s3://"):
        return s3_filesystem(endpoint_url or os.environ.get("AWS_ENDPOINT_URL")).open(uri[5:], mode)
    if uri.startswith("file://"):
        uri = uri[7:]
    return open(uri, mode)

"""Table specification, registry and validation.

A :class:`TableSpec` names a lake table, its Arrow schema, where it lives in the lake (a path relative to the
lake root, a single Parquet file or a hive-partitioned directory) and, for wide feature tables, a pattern that
extra (feature) columns must match together with their required type.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import pyarrow as pa

#: Version of the lake's table layout; stored in every Parquet file's key-value metadata.
SCHEMA_VERSION = "1"

#: Parquet key-value metadata keys written by the storage layer.
META_SCHEMA_VERSION = b"cpldm.schema_version"
META_TABLE = b"cpldm.table"
META_CONFIG = b"cpldm.config"
META_CODE_VERSION = b"cpldm.code_version"

TABLES: dict[str, "TableSpec"] = {}


class SchemaError(ValueError):
    """A table does not match its schema. ``problems`` lists every mismatch, each naming the column."""

    def __init__(self, table: str, problems: list[str]):
        self.table = table
        self.problems = problems
        super().__init__(f"table '{table}' does not match its schema: " + "; ".join(problems))


@dataclass(frozen=True)
class TableSpec:
    """One lake table.

    Attributes:
        name: table name, also the DuckDB view name (``features_well``).
        schema: required columns, in order. Nullability is enforced: a non-nullable column may hold no nulls.
        path: location relative to the lake root. Ends in ``.parquet`` for a single file, otherwise a
            directory of Parquet files (hive-partitioned when ``partitioning`` is set).
        description: one line for ``cpldm lake ls``.
        extra_columns: regex that additional columns must match (feature tables); ``None`` means no extra
            columns are allowed.
        extra_type: Arrow type every extra column must have (cast-compatible floats are accepted).
        partitioning: hive partition columns, in order, for directory tables.
    """

    name: str
    schema: pa.Schema
    path: str
    description: str
    extra_columns: str | None = None
    extra_type: pa.DataType = field(default_factory=pa.float32)
    partitioning: tuple[str, ...] = ()

    @property
    def is_directory(self) -> bool:
        return not self.path.endswith(".parquet")


def register(spec: TableSpec) -> TableSpec:
    if spec.name in TABLES:
        raise ValueError(f"table '{spec.name}' registered twice")
    TABLES[spec.name] = spec
    return spec


def table_spec(name: str) -> TableSpec:
    try:
        return TABLES[name]
    except KeyError:
        raise SchemaError(name, [f"unknown table '{name}'; known tables: {', '.join(sorted(TABLES))}"]) from None


def _types_compatible(actual: pa.DataType, expected: pa.DataType) -> bool:
    if actual == expected:
        return True
    # Strings: accept large_string/string_view for string (polars and DuckDB write these).
    strings = {pa.string(), pa.large_string(), pa.string_view()}
    if expected in strings and actual in strings:
        return True
    if pa.types.is_dictionary(actual) and expected in strings and actual.value_type in strings:
        return True
    if pa.types.is_floating(expected) and pa.types.is_floating(actual):
        return True
    if pa.types.is_integer(expected) and pa.types.is_integer(actual):
        return True
    if pa.types.is_list(expected) or pa.types.is_large_list(expected) or pa.types.is_fixed_size_list(expected):
        if pa.types.is_list(actual) or pa.types.is_large_list(actual) or pa.types.is_fixed_size_list(actual):
            return _types_compatible(actual.value_type, expected.value_type)
    if pa.types.is_timestamp(expected) and pa.types.is_timestamp(actual):
        return True
    return False


def problems(table: pa.Table | pa.Schema, name: str) -> list[str]:
    """Every way ``table`` differs from the schema of table ``name`` (empty list when it conforms)."""
    spec = table_spec(name)
    schema = table if isinstance(table, pa.Schema) else table.schema
    found: list[str] = []
    present = {f.name: f for f in schema}
    for expected in spec.schema:
        actual = present.get(expected.name)
        if actual is None:
            if expected.name in spec.partitioning:
                continue  # partition columns live in the directory names
            found.append(f"column '{expected.name}' is missing (expected {expected.type})")
            continue
        if not _types_compatible(actual.type, expected.type):
            found.append(f"column '{expected.name}' has type {actual.type}, expected {expected.type}")
        elif not expected.nullable and isinstance(table, pa.Table) and table.column(expected.name).null_count:
            n = table.column(expected.name).null_count
            found.append(f"column '{expected.name}' has {n} null value(s) but may not be null")
    known = set(spec.schema.names)
    pattern = re.compile(spec.extra_columns) if spec.extra_columns else None
    for f in schema:
        if f.name in known:
            continue
        if pattern is None or not pattern.fullmatch(f.name):
            found.append(f"column '{f.name}' is not part of table '{name}'")
        elif not _types_compatible(f.type, spec.extra_type) and not pa.types.is_null(f.type):
            found.append(f"column '{f.name}' has type {f.type}, expected {spec.extra_type}")
    return found


def validate(table: pa.Table | pa.Schema, name: str) -> None:
    """Raise :class:`SchemaError` listing every problem when ``table`` does not match table ``name``."""
    found = problems(table, name)
    if found:
        raise SchemaError(name, found)


def conform(table: pa.Table, name: str) -> pa.Table:
    """Validate, then cast the required columns to their exact schema types and order them first.

    Extra (feature) columns keep their order after the required ones and are cast to ``extra_type``.
    Casting is lossless for the accepted variants (string views, integer widths that fit, float widths
    for features are chosen by the schema).
    """
    validate(table, name)
    spec = table_spec(name)
    columns, fields = [], []
    for expected in spec.schema:
        if expected.name not in table.column_names:
            continue
        columns.append(table.column(expected.name).cast(expected.type, safe=True))
        fields.append(expected)
    for f in table.schema:
        if f.name in spec.schema.names:
            continue
        columns.append(table.column(f.name).cast(spec.extra_type))
        fields.append(pa.field(f.name, spec.extra_type))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))

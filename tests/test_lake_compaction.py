"""`cpldm lake compact` and the streaming `cpldm lake validate`, against a naive pandas read of the parts."""
from __future__ import annotations

import json
import os

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests._fixtures import manifest_rows, write_manifest_parts
from cpldm_core.errors import UserError
from pipelines import compaction
from pipelines.lake_commands import table_files, validate_lake
from storage_schemas import spec as schema_spec


def _naive(lake) -> pd.DataFrame:
    """Every part read by pandas, the partition value taken from its directory name: the reference."""
    frames = []
    for rel in table_files(lake, "synthetic_manifest"):
        frame = pd.read_parquet(lake.fs_path(rel))
        frame["run"] = rel.split("/")[1].split("=", 1)[1]
        frames.append(frame)
    cols = ["run", "Metadata_DesignRow"]
    return pd.concat(frames).sort_values(cols).reset_index(drop=True)[sorted(frames[0].columns)]


def test_compact_keeps_rows_metadata_and_is_idempotent(local_lake):
    write_manifest_parts(local_lake, 500, 25, run="a")
    write_manifest_parts(local_lake, 40, 1, run="b")                       # one part: left alone
    write_manifest_parts(local_lake, 60, 3, run="c", config={"run": "c", "sampler": "ddim"})
    local_lake.write_named("synthetic_manifest", manifest_rows(60, 30, "c"), config={"run": "c", "other": 1},
                           part="block-late", partition={"run": "c"})     # a 2nd config in run c: never merged
    before = _naive(local_lake)
    done = compaction.compact_table(local_lake, "synthetic_manifest")
    assert done == {"partitions": 2, "parts_before": 28, "files_after": 2, "rows": 560}
    files = table_files(local_lake, "synthetic_manifest")
    by_run = {r: [f for f in files if f"/run={r}/" in f] for r in "abc"}
    assert [len(by_run[r]) for r in "abc"] == [1, 1, 2]
    assert any(f.endswith("block-late.parquet") for f in by_run["c"])      # the odd part is kept as it was
    pd.testing.assert_frame_equal(_naive(local_lake), before)
    merged = pq.read_schema(local_lake.fs_path(by_run["a"][0])).metadata
    assert merged[schema_spec.META_SCHEMA_VERSION] and json.loads(merged[schema_spec.META_CONFIG]) == {
        "run": "a", "sampler": "dpm++"}
    assert validate_lake(local_lake) == {}
    assert not os.listdir(local_lake.fs_path(compaction.STAGING_DIR))       # nothing left half-built
    again = compaction.compact_table(local_lake, "synthetic_manifest")
    assert again["partitions"] == 0 and table_files(local_lake, "synthetic_manifest") == files


def test_compact_splits_large_output_and_refuses_foreign_parts(local_lake):
    write_manifest_parts(local_lake, 300, 6, run="a")
    before = _naive(local_lake)
    done = compaction.compact_table(local_lake, "synthetic_manifest", max_rows_per_file=120, row_group_rows=50)
    assert done["files_after"] == 3    # 300 rows, at most 120 per file, written 50 at a time
    pd.testing.assert_frame_equal(_naive(local_lake), before)
    foreign = local_lake.fs_path("synthetic_manifest/run=a/foreign.parquet")
    pq.write_table(manifest_rows(0, 5, "a").drop_columns(["run"]), foreign)   # no cpldm metadata
    pq.write_table(manifest_rows(5, 5, "a").drop_columns(["run"]), foreign.replace("foreign", "foreign2"))
    with pytest.raises(UserError, match="foreign.parquet: no cpldm schema version"):
        compaction.compact_table(local_lake, "synthetic_manifest")
    with pytest.raises(UserError, match="single file"):
        compaction.compact_table(local_lake, "sites")


def test_streaming_validate_finds_nulls_from_footers(local_lake):
    write_manifest_parts(local_lake, 20, 2, run="a")
    good = local_lake.fs_path(table_files(local_lake, "synthetic_manifest")[0])
    table = pq.read_table(good)
    seeds = pa.array([None] + table.column("Metadata_Seed").to_pylist()[1:], pa.int64())
    bad = table.set_column(table.schema.get_field_index("Metadata_Seed"),
                           pa.field("Metadata_Seed", pa.int64()), seeds)
    path = local_lake.fs_path("synthetic_manifest/run=a/bad.parquet")
    pq.write_table(bad, path, row_group_size=4)          # the null sits in the first of 3 row groups
    pq.write_table(bad, path.replace("bad", "nostats"), write_statistics=False)   # read column by column
    found = validate_lake(local_lake)["synthetic_manifest"]
    assert found == ["synthetic_manifest/run=a/bad.parquet: column 'Metadata_Seed' has 1 null value(s) but may "
                     "not be null",
                     "synthetic_manifest/run=a/nostats.parquet: column 'Metadata_Seed' has 1 null value(s) but "
                     "may not be null"]

"""The lake on a local directory and on a real moto S3 server: tables, markers, Zarr, errors."""
import json

import numpy as np
import pyarrow as pa
import pytest

from cpldm_core.errors import UserError
from pipelines.storage import Lake
from storage_schemas import SchemaError
from storage_schemas.spec import META_CONFIG, META_SCHEMA_VERSION


def _rejects(n):
    return pa.table({"unit": ["p1"] * n, "item": [f"f{i}.tiff" for i in range(n)], "reason": ["truncated"] * n})


def test_tables_round_trip_with_version_and_config(lake):
    rel = lake.write_named("rejects", _rejects(3), config={"stage": "x", "seed": 1}, part="p1",
                           partition={"stage": "ingest"})
    assert rel == "rejects/stage=ingest/p1.parquet"
    back = lake.read_named("rejects")
    assert back.num_rows == 3 and set(back.column("stage").to_pylist()) == {"ingest"}
    single = lake.read_table(rel)
    meta = single.schema.metadata
    assert meta[META_SCHEMA_VERSION] == b"1"
    assert json.loads(meta[META_CONFIG]) == {"stage": "x", "seed": 1}


def test_invalid_table_is_refused_and_nothing_written(lake):
    with pytest.raises(SchemaError, match="'reason' is missing"):
        lake.write_named("rejects", _rejects(1).drop_columns(["reason"]), part="p", partition={"stage": "s"})
    assert not lake.exists("rejects/stage=s/p.parquet")


def test_markers_make_units_exactly_once(lake):
    assert lake.committed_units("simulate") == set()
    lake.commit_unit("simulate", "plateA", {"sites": 4})
    lake.commit_unit("simulate", "plateB")
    assert lake.committed_units("simulate") == {"plateA", "plateB"}
    assert lake.is_committed("simulate", "plateA") and not lake.is_committed("simulate", "plateC")
    assert lake.unit_info("simulate", "plateA")["sites"] == 4
    lake.reset_stage("simulate")
    assert lake.committed_units("simulate") == set()


def test_write_bytes_overwrites_atomically_and_lists(lake):
    lake.write_bytes("a/b/c.bin", b"one")
    lake.write_bytes("a/b/c.bin", b"two")
    assert lake.read_bytes("a/b/c.bin") == b"two"
    assert "a/b/c.bin" in lake.ls("a", recursive=True)
    if not lake.is_s3:  # no temp files left behind
        assert [p for p in lake.ls("a/b") if ".tmp-" in p] == []
    lake.write_config("models/r1", {"lr": 0.1})
    assert lake.read_json("models/r1/config.json")["config"] == {"lr": 0.1}


def test_zarr_v3_store_round_trip(lake):
    import zarr
    data = np.arange(2 * 8 * 4 * 4, dtype=np.float16).reshape(2, 8, 4, 4)
    root = zarr.open_group(lake.zarr_store("latents/test/latents.zarr"), mode="w", zarr_format=3)
    arr = root.create_array("latents", shape=data.shape, chunks=(1, 8, 4, 4), shards=(2, 8, 4, 4), dtype="float16")
    arr[:] = data
    root.attrs["vae_id"] = "test"
    again = zarr.open_group(lake.zarr_store("latents/test/latents.zarr", read_only=True), mode="r")
    np.testing.assert_array_equal(again["latents"][:], data)
    assert again.attrs["vae_id"] == "test"


def test_lake_is_picklable_without_filesystems(s3_lake):
    import pickle
    s3_lake.fs  # populate the cached filesystem
    copy = pickle.loads(pickle.dumps(s3_lake))
    assert copy == s3_lake and copy.endpoint_url == s3_lake.endpoint_url
    copy.write_bytes("x.txt", b"hi")
    assert s3_lake.read_bytes("x.txt") == b"hi"


def test_missing_bucket_and_unreachable_endpoint_are_clear(s3_endpoint):
    with pytest.raises(UserError, match="bucket 'no-such-bucket' does not exist"):
        Lake("s3://no-such-bucket/lake", endpoint_url=s3_endpoint).check_reachable()
    with pytest.raises(UserError, match="cannot reach S3 endpoint http://127.0.0.1:9"):
        Lake("s3://bucket/lake", endpoint_url="http://127.0.0.1:9").check_reachable()


def test_init_creates_bucket_when_asked(s3_endpoint):
    lake = Lake("s3://fresh-bucket-x/lake", endpoint_url=s3_endpoint)
    info = lake.init(create_bucket=True)
    assert info["schema_version"] == "1" and lake.exists("_lake.json")


def test_local_dir_gives_the_files_and_leaves_no_copy_behind(lake):
    """Loaders that need a path (from_pretrained) read a lake directory through ``local_dir``: the same bytes,
    nested paths kept; on S3 the temporary copy is gone after the block (generate used to leak one per actor)."""
    import os

    files = {"config.json": b'{"a": 1}', "sub/weights.bin": bytes(range(256)) * 4}
    for name, data in files.items():
        lake.write_bytes(f"models/m/{name}", data)
    with lake.local_dir("models/m") as path:
        seen = {os.path.relpath(os.path.join(d, f), path).replace(os.sep, "/"): open(os.path.join(d, f), "rb").read()
                for d, _, names in os.walk(path) for f in names}
    assert seen == files
    assert os.path.isdir(path) != lake.is_s3        # local: the lake's own directory; S3: removed

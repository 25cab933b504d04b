"""`cpldm lake` and `cpldm sql` through the real CLI on local and S3 lakes."""
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipelines.cli import main


def _cli(lake, *argv):
    base = ["--lake", lake.uri] + (["--endpoint-url", lake.endpoint_url] if lake.is_s3 else [])
    return main(base + list(argv))


def _write_features(lake, rows=40, seed=0):
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "Metadata_Source": rng.choice(["source_1", "source_2"], rows),
        "Metadata_Batch": "b1", "Metadata_Plate": rng.choice(["P1", "P2", "P3"], rows),
        "Metadata_Well": [f"A{i:02d}" for i in range(rows)], "Metadata_JCP2022": "JCP2022_000001",
        "Metadata_pert_type": "trt", "Metadata_Draw": pd.array([None] * rows, dtype="Int32"),
        "Metadata_SiteCount": 1,
        "Cells_AreaShape_Area": rng.normal(100, 10, rows).astype("float32"),
    })
    lake.write_named("features_well", pa.Table.from_pandas(frame, preserve_index=False),
                     part="part-0", partition={"dataset": "real"})
    return frame


def test_lake_init_validate_and_ls(lake, capsys):
    assert _cli(lake, "lake", "init") == 0
    _write_features(lake)
    assert _cli(lake, "lake", "validate") == 0
    assert "all valid" in capsys.readouterr().out
    assert _cli(lake, "lake", "ls") == 0
    assert "features_well" in capsys.readouterr().out


def test_validate_reports_every_bad_file(local_lake, capsys):
    import pyarrow.parquet as pq
    _write_features(local_lake)
    bad = pa.table({"unit": ["u"], "item": ["i"]})  # no reason column, no version metadata
    path = local_lake.fs_path("rejects/stage=x/bad.parquet")
    local_lake.fs.makedirs(local_lake.fs_path("rejects/stage=x"), exist_ok=True)
    pq.write_table(bad, path)
    assert _cli(local_lake, "lake", "validate") == 1
    out = capsys.readouterr().out
    assert "[rejects] rejects/stage=x/bad.parquet: no cpldm schema version" in out
    assert "column 'reason' is missing" in out


def test_sql_aggregate_equals_pandas(lake, tmp_path):
    frame = _write_features(lake)
    out = tmp_path / "agg.csv"
    sql = ("SELECT Metadata_Plate, count(*) AS n, avg(Cells_AreaShape_Area) AS mean_area FROM features_well "
           "WHERE dataset = 'real' GROUP BY 1 ORDER BY 1")
    assert _cli(lake, "sql", sql, "--output", str(out)) == 0
    got = pd.read_csv(out)
    want = frame.groupby("Metadata_Plate").agg(n=("Cells_AreaShape_Area", "size"),
                                               mean_area=("Cells_AreaShape_Area", "mean")).reset_index()
    np.testing.assert_array_equal(got["Metadata_Plate"], want["Metadata_Plate"])
    np.testing.assert_array_equal(got["n"], want["n"])
    np.testing.assert_allclose(got["mean_area"], want["mean_area"], rtol=1e-5)


@pytest.mark.parametrize("statement", [
    "COPY (SELECT 1) TO 'out.csv'",
    "CREATE TABLE t AS SELECT 1",
    "SELECT 1; COPY features_well TO 'x.parquet'",
    "ATTACH 'other.db'",
])
def test_sql_refuses_writes(lake, capsys, statement):
    _write_features(lake)
    assert _cli(lake, "sql", statement) == 2
    err = capsys.readouterr().err
    assert "read-only" in err and "Traceback" not in err


def test_sql_cannot_read_outside_the_lake(local_lake, tmp_path, capsys):
    outside = tmp_path / "secret.csv"
    outside.write_text("a\n1\n")
    assert _cli(local_lake, "sql", f"SELECT * FROM read_csv('{outside}')") == 2
    assert "query failed" in capsys.readouterr().err


def test_user_errors_are_one_line_and_debug_shows_traceback(capsys, tmp_path):
    assert main(["--lake", "s3://no-bucket-here/x", "--endpoint-url", "http://127.0.0.1:9", "lake", "ls"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("cpldm lake: error: cannot reach S3 endpoint")
    from cpldm_core.errors import UserError
    with pytest.raises(UserError):
        main(["--debug", "--lake", str(tmp_path / "l"), "sql"])


def test_sql_json_output(local_lake, capsys):
    _write_features(local_lake, rows=5)
    assert _cli(local_lake, "sql", "SELECT count(*) AS n FROM features_well", "--format", "json") == 0
    assert json.loads(capsys.readouterr().out.strip()) == {"n": 5}

"""Issue 22: hostile but fair input. `cpldm sql` only reads, secrets stay out of settings and Ray logs, names
cannot leave the lake, and unfinished writes are never data. Each test reproduces a finding of the issue."""
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main
from pipelines.ray_runtime import WATCH_LOG, WATCH_SWEEP_S


def _cli(lake, *argv):
    base = ["--lake", lake.uri] + (["--endpoint-url", lake.endpoint_url] if lake.is_s3 else [])
    return main(base + list(argv))


def _write_sites_like(lake, rows=8):
    frame = pd.DataFrame({"Metadata_Source": "source_1", "Metadata_Batch": "b1", "Metadata_Plate": "P1",
                          "Metadata_Well": [f"A{i:02d}" for i in range(rows)], "Metadata_JCP2022": "JCP2022_000001",
                          "Metadata_pert_type": "trt", "Metadata_Draw": pd.array([None] * rows, dtype="Int32"),
                          "Metadata_SiteCount": 1, "Cells_AreaShape_Area": np.arange(rows, dtype="float32")})
    lake.write_named("features_well", pa.Table.from_pandas(frame, preserve_index=False), part="part-0",
                     partition={"dataset": "real"})
    return frame


def _rows(lake, rel):
    return lake.read_table(rel).num_rows


# ---------------------------------------------------------------------------------------------- 1. sql writes
@pytest.mark.parametrize("statement", [
    "EXPLAIN ANALYZE COPY (SELECT * FROM features_well LIMIT 1) TO '{target}' (FORMAT parquet)",
    "EXPLAIN COPY (SELECT 1) TO '{target}'",
    "COPY (SELECT * FROM features_well LIMIT 1) TO '{dir}' (FORMAT parquet, PARTITION_BY (dataset), OVERWRITE)",
    "SELECT * FROM query('COPY (SELECT 1) TO ''{target}''')",
    "WITH a AS (SELECT * FROM query_table('features_well')) SELECT * FROM a",
    "SELECT * FROM json_execute_serialized_sql(json_serialize_sql('SELECT 1'))",
    "SELECT * FROM checkpoint()",
    "SELECT 1; EXPLAIN ANALYZE COPY features_well TO '{target}'",
    "SET memory_limit='100GB'",
    "INSTALL httpfs",
])
def test_sql_refuses_every_write_anywhere(local_lake, capsys, statement):
    _assert_refused(local_lake, capsys, statement)


def test_sql_refuses_writes_on_s3(s3_lake, capsys):
    """On an S3 lake the EXPLAIN ANALYZE COPY of the issue created objects."""
    _assert_refused(s3_lake, capsys,
                    "EXPLAIN ANALYZE COPY (SELECT * FROM features_well LIMIT 1) TO '{dir}/dataset=real/new.parquet'")
    assert s3_lake.data_files("features/well") == ["features/well/dataset=real/part-0.parquet"]


def _assert_refused(lake, capsys, statement):
    _write_sites_like(lake)
    part = "features/well/dataset=real/part-0.parquet"
    sql = statement.format(target=lake.uri_of(part), dir=lake.uri_of("features/well"))
    assert _cli(lake, "sql", sql) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("read-only" in err or "refuses" in err), err
    assert _rows(lake, "features/well") == 8  # the table is untouched


@pytest.mark.parametrize("statement", [
    "EXPLAIN ANALYZE SELECT count(*) FROM features_well",
    "WITH w AS (SELECT * FROM features_well) SELECT count(*) AS n FROM w",
    "DESCRIBE features_well",
    "SUMMARIZE features_well",
    "FROM features_well SELECT count(*)",
])
def test_sql_still_reads(local_lake, statement):
    _write_sites_like(local_lake)
    assert _cli(local_lake, "sql", statement, "--format", "csv") == 0


# ---------------------------------------------------------------------------------------------- 2. symlinks
def test_symlinks_inside_the_lake_are_not_read(local_lake, capsys, tmp_path):
    _write_sites_like(local_lake)
    outside = tmp_path / "outside"
    outside.mkdir()
    pq.write_table(pa.table({"secret": ["s3cr3t"]}), outside / "x.parquet")
    # a partition that is a link to a folder outside, and a file that is a link to /etc/passwd
    os.symlink(outside, local_lake.fs_path("features/well/dataset=evil"))
    os.symlink("/etc/passwd", local_lake.fs_path("features/well/dataset=real/passwd.parquet"))
    os.symlink("/etc", local_lake.fs_path("etc"))
    assert _cli(local_lake, "sql", "SELECT DISTINCT dataset FROM features_well", "--format", "csv") == 0
    assert capsys.readouterr().out.split() == ["dataset", "real"]
    for probe in (f"SELECT * FROM read_csv('{local_lake.uri}/etc/passwd')",
                  f"SELECT * FROM glob('{local_lake.uri}/etc/*')",
                  f"SELECT * FROM read_parquet('{local_lake.uri}/features/well/dataset=evil/x.parquet')"):
        assert _cli(local_lake, "sql", probe) == 2
        err = capsys.readouterr().err
        assert "root:" not in err and "s3cr3t" not in err
    assert local_lake.read_table("features/well").num_rows == 8  # the stages' reader ignores links too


# ---------------------------------------------------------------------------------------------- 3. S3 secret
def test_s3_secret_is_not_readable(s3_lake, capsys):
    _write_sites_like(s3_lake)
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    for sql in ("SELECT current_setting('s3_secret_access_key') AS v",
                "SELECT current_setting('s3_access_key_id') AS v",
                "SELECT count(*) AS v FROM features_well"):
        assert _cli(s3_lake, "sql", sql, "--format", "csv") == 0
        out = capsys.readouterr().out
        assert secret not in out.split("\n", 1)[1].split(), (sql, out)
    for sql in ("SELECT * FROM duckdb_secrets()", "SELECT * FROM duckdb_settings()"):
        assert _cli(s3_lake, "sql", sql) == 2  # not readers of the lake: refused


# ---------------------------------------------------------------------------------------------- 5. --output
def test_sql_output_never_into_the_lake_nor_over_a_file(local_lake, tmp_path, capsys):
    _write_sites_like(local_lake)
    part = local_lake.fs_path("features/well/dataset=real/part-0.parquet")
    q = "SELECT 1 AS x"
    assert _cli(local_lake, "sql", q, "--output", part, "--force") == 2
    assert _cli(local_lake, "sql", q, "--output", f"{local_lake.uri}/features/../catalog/new.csv") == 2
    assert "inside the lake" in capsys.readouterr().err
    assert _rows(local_lake, "features/well") == 8
    out = tmp_path / "r.csv"
    out.write_text("keep\n")
    assert _cli(local_lake, "sql", q, "--output", str(out)) == 2
    assert "--force" in capsys.readouterr().err and out.read_text() == "keep\n"
    assert _cli(local_lake, "sql", q, "--output", str(out), "--force") == 0
    assert pd.read_csv(out)["x"].tolist() == [1]
    capsys.readouterr()
    assert _cli(local_lake, "sql", q, "--output", str(tmp_path / "missing" / "r.csv")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


# ---------------------------------------------------------------------------------------------- 13. limits
def test_sql_limits_and_missing_lake(local_lake, tmp_path, capsys, monkeypatch):
    _write_sites_like(local_lake)
    monkeypatch.chdir(tmp_path)
    sql = ("SELECT current_setting('memory_limit') AS m, current_setting('threads') AS t, "
           "current_setting('temp_directory') AS d")
    assert _cli(local_lake, "sql", sql, "--memory-limit", "1GB", "--threads", "1", "--format", "json") == 0
    got = json.loads(capsys.readouterr().out)
    assert got["t"] == 1 and got["m"].replace(" ", "") in ("953.6MiB", "1.0GiB", "1GB")
    assert got["d"] != ".tmp" and "cpldm-duckdb-" in got["d"]
    assert not (tmp_path / ".tmp").exists()
    assert main(["--lake", str(tmp_path / "nowhere"), "sql", "SELECT 1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


# ---------------------------------------------------------------------------------------------- 11. temp files
def test_unfinished_writes_are_not_data(lake):
    _write_sites_like(lake)
    part = "features/well/dataset=real/part-0.parquet"
    # the state a writer killed between fsync and rename leaves behind (old and new temp names)
    lake.write_bytes(f"{part}.tmp-0123456789abcdef", lake.read_bytes(part))
    lake.write_bytes("features/well/dataset=real/.part-1.parquet.tmp-0123", lake.read_bytes(part))
    assert lake.read_table("features/well").num_rows == 8
    from pipelines import sql
    assert int(sql.query(lake, "SELECT count(*) AS n FROM features_well")["n"][0]) == 8


def test_local_write_leaves_no_visible_temp_name(local_lake, monkeypatch):
    seen = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (seen.append(os.path.basename(a)), real_replace(a, b)))
    local_lake.write_bytes("x/y.parquet", b"1")
    assert seen and seen[0].startswith(".y.parquet.tmp-")


# ---------------------------------------------------------------------------------------------- 12. claims
def test_unit_claims_are_exclusive_and_stale_ones_are_taken_over(lake):
    assert lake.claim_unit("profile-real", "P1")
    assert lake.claim_unit("profile-real", "P1")  # the owner may claim again
    held = lake.read_json("_claims/profile-real/P1.json")
    lake.write_json("_claims/profile-real/P1.json", {**held, "pid": held["pid"] + 10**6 + 1, "host": "other"})
    assert not lake.claim_unit("profile-real", "P1")  # another live owner
    assert lake.claim_unit("profile-real", "P1", stale_seconds=-1)  # ... unless stale
    lake.release_unit("profile-real", "P1")
    assert not lake.exists("_claims/profile-real/P1.json")
    # a dead owner on this host (killed run) loses its claim at once
    import socket
    lake.write_json("_claims/profile-real/P2.json", {"host": socket.gethostname(), "pid": 2**22 + 12345,
                                                      "time": 1e12})
    assert lake.claim_unit("profile-real", "P2")


# ---------------------------------------------------------------------------------------------- 4. Ray logs
RAY_STAGE_SCRIPT = r"""
import json, os, sys
sys.path.insert(0, "tests")
saved = dict(os.environ)
from conftest import make_bucket  # sets the test suite's fake credentials: put this test's own back
from test_catalog import build_raw_lake
os.environ.clear()
os.environ.update(saved)
from cpldm_core.load_data import CatalogConfig
from pipelines import catalog
from pipelines.ray_runtime import ensure_ray
from pipelines.storage import Lake

endpoint = os.environ["AWS_ENDPOINT_URL"]
lake = Lake(f"s3://{make_bucket(endpoint)}/lake", endpoint_url=endpoint)
lake.init()
build_raw_lake(lake)
ray = ensure_ray(num_cpus=1)
summary = catalog.run(lake, CatalogConfig())  # Ray tasks read the load_data files from S3
node = ray._private.worker.global_worker.node
print(json.dumps({"sites": summary["sites"], "session": node.get_session_dir_path(),
                  "runtime_env": ray.get_runtime_context().runtime_env}))
ray.shutdown()
"""


def test_credentials_reach_ray_workers_but_no_log(s3_endpoint):
    """A stage run on an S3 lake: its Ray workers read S3 (so they have the credentials), and no file of the
    Ray session (logs, GCS/job records) nor the job's runtime_env holds the secret."""
    import shutil
    import subprocess
    import sys
    import tempfile
    import uuid

    ray_tmp = tempfile.mkdtemp(prefix="cr-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes

    secret = f"canary-{uuid.uuid4().hex}"
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": secret, "AWS_ACCESS_KEY_ID": f"id-{uuid.uuid4().hex[:12]}",
           "AWS_ENDPOINT_URL": s3_endpoint, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", RAY_STAGE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["sites"] > 0
    assert secret not in json.dumps(result["runtime_env"])
    leaks, scanned = [], 0
    for root, _, files in os.walk(result["session"]):
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            with open(path, "rb") as fh:
                scanned += 1
                if secret.encode() in fh.read():
                    leaks.append(path)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert scanned > 5 and not leaks, leaks


# ---------------------------------------------------------------------------------------------- 7, 8. one line
@pytest.mark.parametrize("argv", [["profile"], ["fit-vae"]])
def test_refused_endpoint_is_one_line(ray_cluster, capsys, argv):
    rc = main(["--lake", "s3://bucket-x/lake", "--endpoint-url", "http://127.0.0.1:9", *argv])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0]
    assert "cannot reach the S3 endpoint" in err[0] and "127.0.0.1:9" in err[0]


def test_missing_bucket_and_file_lake_are_one_line(s3_endpoint, tmp_path, capsys):
    assert main(["--lake", "s3://no-such-bucket-22/lake", "--endpoint-url", s3_endpoint, "sql", "SELECT 1"]) == 2
    assert "no-such-bucket-22" in capsys.readouterr().err
    lake_file = tmp_path / "lake"
    lake_file.write_text("not a folder")
    for argv in (["lake", "init"], ["sql", "SELECT 1"], ["catalog"]):
        assert main(["--lake", str(lake_file), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(lake_file) in err, err


def test_error_inside_a_ray_task_is_one_line(local_lake, ray_cluster, capsys):
    from test_catalog import build_raw_lake
    build_raw_lake(local_lake)
    missing = str(local_lake.fs_path("raw/elsewhere/load_data.csv"))
    assert main(["--lake", local_lake.uri, "catalog", "--load-data", missing]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and missing in err and "Traceback" not in err
    with pytest.raises(Exception):
        main(["--debug", "--lake", local_lake.uri, "catalog", "--load-data", missing])


def test_a_command_module_that_fails_to_import_is_an_error(monkeypatch, capsys):
    from pipelines import cli
    monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "pipelines.no_such_stage"))
    assert cli.main(["lake", "ls"]) == 1
    assert "pipelines.no_such_stage fails to import" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- 10. one reader
def _tiff(plane, **kw):
    import io as _io
    import tifffile
    buf = _io.BytesIO()
    tifffile.imwrite(buf, plane, **kw)
    return buf.getvalue()


def _illum_sites(lake, factor=2.0):
    """test_profile's real sites (2 plates x 2 wells x 2 sites, 64 px) with constant illumination functions."""
    from test_profile import write_real_sites
    sites = write_real_sites(lake, corrupt=False)
    for ch in ("DNA", "ER", "RNA", "AGP", "Mito"):
        buf = __import__("io").BytesIO()
        np.save(buf, np.full((64, 64), factor, np.float32))
        lake.write_bytes(f"raw/illum/{ch}.npy", buf.getvalue())
        sites[f"URL_Illum{ch}"] = lake.uri_of(f"raw/illum/{ch}.npy")
    from storage_schemas import table_spec
    lake.write_named("sites", pa.Table.from_pandas(sites, schema=table_spec("sites").schema, preserve_index=False))
    return sites


def test_profile_reads_sites_like_ingest(local_lake):
    """Issue 22 #10 / issue 19 #3: one reader. Profile rejects what ingest rejects (uint8, float32, too large
    from the header), and by default both correct illumination with the site's URL_Illum* functions."""
    from dataclasses import replace

    from cpldm_core.features.site import profile_site
    from pipelines import profile
    from pipelines.ingest import SiteReader as IngestReader
    from test_profile import CFG

    sites = _illum_sites(local_lake)
    rng = np.random.default_rng(0)
    bad = {1: ("RNA", _tiff(rng.integers(0, 255, (64, 64), dtype=np.uint8)), "got uint8"),
           2: ("AGP", _tiff(rng.random((64, 64), dtype=np.float32)), "got float32"),
           3: ("DNA", _tiff(np.zeros((128, 128), np.uint16), compression="zlib"), "-byte limit (max_plane_bytes)")}
    for i, (ch, data, _) in bad.items():
        local_lake.write_bytes(sites[f"URL_Orig{ch}"][i][len(local_lake.uri) + 1:], data)
    cfg = replace(CFG, max_plane_bytes=64 * 64 * 2)
    items = profile.real_items(local_lake)
    out = profile.SiteProfiler(local_lake, cfg, "real")(items.iloc[:5].reset_index(drop=True))
    rejects = out[out["Metadata_Level"] == "reject"].set_index("Metadata_SiteKey")["Metadata_Reason"]
    assert len(rejects) == 3
    for i, (_, _, fragment) in bad.items():
        assert fragment in rejects[sites["Metadata_SiteKey"][i]]
    ingest_out = IngestReader(max_plane_bytes=64 * 64 * 2).read_sites(site_records_of(sites.iloc[:5]))
    assert [isinstance(x, Exception) for x in ingest_out] == [False, True, True, True, False]

    # the default corrects with the functions: the same as profiling the divided image (and ingest divides too)
    assert CFG.segmentation.illumination == "auto"
    row = items.iloc[[0]].reset_index(drop=True)
    got = profile.SiteProfiler(local_lake, CFG, "real")(row)
    import tifffile
    raw = np.stack([tifffile.imread(sites[f"URL_Orig{ch}"][0]) for ch in ("DNA", "ER", "RNA", "AGP", "Mito")])
    none = replace(CFG, segmentation=replace(CFG.segmentation, illumination="none"))
    want = profile_site((raw.astype(np.float32) / 65535 / 2.0).astype(np.float32), none)
    names = profile.feature_names(CFG.features)
    np.testing.assert_allclose(got[list(names)].to_numpy()[0], want.image, rtol=1e-5, equal_nan=True)
    np.testing.assert_allclose(ingest_out[0], raw.astype(np.float32) / 2.0)


def site_records_of(frame):
    from pipelines.ingest import site_records
    return site_records(frame)


def test_decoded_size_is_checked_before_decoding(monkeypatch):
    import tifffile

    from cpldm_core import images as im
    data = _tiff(np.zeros((512, 512), np.uint16), compression="zlib")   # ~1 kB on disk, 512 kB decoded
    assert len(data) < 4096
    monkeypatch.setattr(tifffile.TiffFile, "asarray", lambda *a, **k: pytest.fail("decoded before the check"))
    with pytest.raises(im.ImageError, match="524,288 bytes .* over the 100,000-byte limit"):
        im.decode_tiff(data, "big.tiff", max_bytes=100_000)


# ---------------------------------------------------------------------------------------------- 11, 12. profile
def test_profile_resume_refuses_changed_config_and_skips_claimed_units(local_lake, ray_cluster):
    from dataclasses import replace

    from pipelines import profile
    from test_profile import CFG, write_real_sites

    write_real_sites(local_lake, corrupt=False)
    # another live run (another host) holds plate P2: this run profiles P1 only and leaves P2 to it
    local_lake.write_json("_claims/profile-real/source_1__B1__P2.json", {"host": "elsewhere", "pid": 1,
                                                                         "time": 4e12})
    first = profile.run(local_lake, CFG, dataset="real")
    assert (first["units_done_now"], first["units_busy"]) == (1, 1)
    assert local_lake.committed_units("profile-real") == {"source_1__B1__P1"}
    assert not local_lake.exists("_claims/profile-real/source_1__B1__P1.json")  # released after its commit
    local_lake.release_unit("profile-real", "source_1__B1__P2")
    changed = replace(CFG, segmentation=replace(CFG.segmentation, nucleus_diameter_px=11.0))
    with pytest.raises(Exception, match="another config.* \\(changed: (config\\.)?segmentation\\)"):
        profile.run(local_lake, changed, dataset="real")
    # resources may change on resume
    profile.check_resume(local_lake, replace(CFG, batch_size=3, workers=2, units_per_wave=1), "real", {"P1"})
    # a writer killed before its rename leaves a temp file: treatments still count P1's wells once (1 per
    # compound; reading the temp file as data made it 2)
    well = "features/well/dataset=real/source_1__B1__P1.parquet"
    local_lake.write_bytes(f"{well}.tmp-0123456789", local_lake.read_bytes(well))
    profile.write_treatments(local_lake, "real")
    treat = local_lake.read_table("features/treatment/dataset=real").to_pandas()
    assert treat["Metadata_WellCount"].tolist() == [1, 1]


# ---------------------------------------------------------------------------------------------- 12. killed driver
def _processes_of(ray_tmp: str) -> dict[int, str]:
    """pid -> command line of every process started with ``RAY_TMPDIR=ray_tmp`` (Ray's orphaned agents name
    nothing on their command line, but keep the environment they were started with) or naming that dir."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = fh.read()
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                args = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"\0RAY_TMPDIR={ray_tmp}\0".encode() in b"\0" + env + b"\0" or ray_tmp in args:
            found[int(entry)] = args
    return found


def _process_status(pid: int) -> str:
    """State and parent of a process, from /proc/<pid>/status ('gone' once it is)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return " ".join(line.strip() for line in fh if line.startswith(("State:", "PPid:")))
    except OSError:
        return "gone"


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc to find the processes")
def test_a_killed_driver_leaves_no_ray_process(ray_cluster, tmp_path):
    """`cpldm simulate` is SIGKILLed while its local Ray runs tasks: within the watchdog's sweep no process of its
    cluster is left (before, DashboardAgent and RuntimeEnvAgent lived on, and workers finished their plates), and the
    test session's own cluster, started the same way, is untouched."""
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    ray_tmp = tempfile.mkdtemp(prefix="rk-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    cpldm = os.path.join(os.path.dirname(sys.executable), "cpldm")
    driver = subprocess.Popen([cpldm, "--lake", str(tmp_path / "lake"), "simulate", "--preset", "tiny"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        # kill only once a task runs AND the raylet's agents exist: the agents are what outlived the driver before
        # (killed earlier, under load, the test would not cover them)
        while not (any(a.startswith("ray::simulate_plate") for a in _processes_of(ray_tmp).values())
                   and any("agent" in a.lower() for a in _processes_of(ray_tmp).values())):
            assert driver.poll() is None, f"driver ended before it was killed: {driver.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no Ray task (with the raylet's agents) within 180 s"
            time.sleep(0.2)
        seen = _processes_of(ray_tmp)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        killed_at = time.monotonic()
        deadline = killed_at + WATCH_SWEEP_S + 20   # the watchdog sweeps for up to WATCH_SWEEP_S
        while _processes_of(ray_tmp) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _processes_of(ray_tmp)
        # what a failure needs to be understood: each survivor's state and parent, and the watchdog's own log
        left_details = {pid: _process_status(pid) for pid in left}
        watchdog_log = "".join(p.read_text() for p in Path(ray_tmp).rglob(WATCH_LOG))
    finally:
        driver.kill()
        driver.wait()
        for pid in _processes_of(ray_tmp):  # never leave them to the next test, whatever failed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not left, (f"{time.monotonic() - killed_at:.0f} s after the kill: {left}; {left_details}; "
                      f"watchdog log:\n{watchdog_log}")
    # the finder saw the cluster while it ran: its raylet and the raylet's agents (the ones that outlived it)
    assert any("raylet" in a for a in seen.values()) and any("agent" in a.lower() for a in seen.values()), seen

    @ray_cluster.remote
    def answer():
        return 42

    assert ray_cluster.get(answer.remote()) == 42


JOIN_SCRIPT = r"""
import json, os, sys
from pipelines import ray_runtime
ray = ray_runtime.ensure_ray()
print(json.dumps({"watchdog": ray_runtime._WATCHDOG is not None, "token": ray_runtime.OWNER_ENV in os.environ,
                  "nodes": len(ray.nodes())}))
"""


@pytest.mark.slow
def test_a_driver_joining_a_cluster_starts_no_watchdog(ray_cluster):
    """With RAY_ADDRESS the driver only joins: no watchdog, and its exit leaves the cluster running."""
    import subprocess
    import sys

    address = ray_cluster.get_runtime_context().gcs_address
    proc = subprocess.run([sys.executable, "-c", JOIN_SCRIPT], env={**os.environ, "RAY_ADDRESS": address},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"watchdog": False, "token": False, "nodes": 1}

    @ray_cluster.remote
    def answer():
        return 42

    assert ray_cluster.get(answer.remote()) == 42


HIDDEN_CHILD_DRIVER = r"""
import os, subprocess, sys, time
from pipelines import ray_runtime
ray_runtime.start_watchdog()   # puts the token in this environment, as before ray.init
sleeper = [sys.executable, "-c", "import time; time.sleep(300)"]
# a 'raylet' that carries the token and starts an 'agent' whose environment no longer shows it (as setproctitle
# leaves a Ray agent's /proc/<pid>/environ)
hidden_env = {k: v for k, v in os.environ.items() if k != ray_runtime.OWNER_ENV}
quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)   # the test reads this driver's stdout to EOF
raylet = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                           "subprocess.Popen(sys.argv[1:], env=eval(sys.stdin.readline())); time.sleep(300)",
                           *sleeper], stdin=subprocess.PIPE, text=True, **quiet)
raylet.stdin.write(repr(hidden_env) + "\n"); raylet.stdin.flush()
os.environ.pop(ray_runtime.OWNER_ENV)   # as after ray.init: later children of the driver are not the cluster's
other = subprocess.Popen(sleeper, **quiet)
agent = []
while not agent:
    time.sleep(0.2)
    agent = [int(p) for p in os.listdir("/proc") if p.isdigit()
             and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1] == str(raylet.pid)]
print(raylet.pid, agent[0], other.pid, flush=True)
time.sleep(300)
"""


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc to find the processes")
def test_the_watchdog_stops_a_cluster_process_whose_environment_hides_the_token():
    """A killed driver's watchdog stops a child of the cluster whose /proc environ no longer holds the token (Ray's
    agents after setproctitle: the DashboardAgent that outlived a killed driver), because it recorded the cluster's
    process tree while the driver lived; a child the driver started after ray.init is not the cluster's and lives."""
    import signal
    import subprocess
    import sys
    import time

    from pipelines.storage import pid_alive

    driver = subprocess.Popen([sys.executable, "-c", HIDDEN_CHILD_DRIVER], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    pids = []
    try:
        import select
        assert select.select([driver.stdout], [], [], 120)[0], "the driver printed nothing within 120 s"
        line = driver.stdout.readline()
        assert len(line.split()) == 3, f"driver: {line!r} (exit {driver.poll()})"
        raylet, agent, other = map(int, line.split())
        pids = [raylet, agent, other]
        with open(f"/proc/{agent}/environ", "rb") as fh:
            assert b"CPLDM_RAY_OWNER=" not in fh.read()   # hidden, as the DashboardAgent's was
        time.sleep(3.0)   # the watchdog records the tree every second (margin for a loaded machine)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 20
        while (pid_alive(raylet) or pid_alive(agent)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not pid_alive(raylet) and not pid_alive(agent)
        assert pid_alive(other)
    finally:
        driver.kill()
        driver.wait()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

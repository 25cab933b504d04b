"""`cpldm profile` end to end: TIFF sites (local and S3 lakes) and synthetic Zarr images through Ray Data into
hive-partitioned feature tables; resumption, rejects, aggregation against pandas and DuckDB
(import: tests/test_profile_import.py)."""
from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import tifffile

from cpldm_core.features.aggregate import feature_columns
from cpldm_core.features.config import TINY
from pipelines import profile
from storage_schemas import table_spec
from storage_schemas.columns import CHANNELS, DMSO_JCP2022
from cpldm_core.features.toy_sites import toy_site as simulated_site

CFG = replace(TINY, workers=1, batch_size=2)
COMPOUND = "JCP2022_000001"
SIZE = 64


def _tiff_bytes(plane: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, plane, compression="lzw")  # real JUMP TIFFs are LZW
    return buf.getvalue()


def write_real_sites(lake, corrupt: bool = True) -> pd.DataFrame:
    """2 plates x 2 wells (DMSO sparse, compound dense) x 2 sites of 64 px TIFFs + the catalog ``sites`` table.
    With ``corrupt`` the last site's DNA file is not a TIFF (it must end in rejects)."""
    rows = []
    for p, plate in enumerate(("P1", "P2")):
        for w, (well, jcp, n_cells) in enumerate((("A01", DMSO_JCP2022, 4), ("A02", COMPOUND, 10))):
            for site in (1, 2):
                raw = simulated_site(n_cells, 3.5, size=SIZE, seed=100 * p + 10 * w + site)
                row = {"Metadata_SiteKey": f"source_1/B1/{plate}/{well}/{site}", "Metadata_Source": "source_1",
                       "Metadata_Batch": "B1", "Metadata_Plate": plate, "Metadata_Well": well, "Metadata_Site": site,
                       "Metadata_PlateType": "COMPOUND", "Metadata_JCP2022": jcp, "Metadata_InChIKey": None,
                       "Metadata_SMILES": None, "Metadata_pert_type": "negcon" if jcp == DMSO_JCP2022 else "trt"}
                for c, ch in enumerate(CHANNELS):
                    rel = f"raw/source_1/images/B1/images/{plate}/Images/r01c0{w + 1}f0{site}p01-ch{c + 1}sk1fk1fl1.tiff"
                    data = _tiff_bytes(raw[c])
                    if corrupt and plate == "P2" and well == "A02" and site == 2 and ch == "DNA":
                        data = b"not a tiff"
                    lake.write_bytes(rel, data)
                    row[f"URL_Orig{ch}"] = lake.uri_of(rel)
                    row[f"URL_Illum{ch}"] = None
                rows.append(row)
    frame = pd.DataFrame(rows)
    lake.write_named("sites", pa.Table.from_pandas(frame, schema=table_spec("sites").schema, preserve_index=False))
    return frame


def _read(lake, table: str, dataset: str) -> pd.DataFrame:
    frame = lake.read_table(f"{table_spec(table).path}/dataset={dataset}").to_pandas()
    keys = [k for k in ("Metadata_SiteKey", "Metadata_Plate", "Metadata_Well", "Metadata_JCP2022", "Metadata_Draw")
            if k in frame]
    return frame.sort_values(keys).reset_index(drop=True)


def test_real_sites_on_s3(s3_lake, ray_cluster):
    """TIFFs read from s3:// URIs, tables written to an S3 lake; the bad site is a reject, the rest profiled."""
    sites = write_real_sites(s3_lake)
    summary = profile.run(s3_lake, CFG, dataset="real")
    assert (summary["images"], summary["rejected"], summary["units"]) == (len(sites) - 1, 1, 2)
    images = _read(s3_lake, "features_image", "real")
    assert images["Metadata_SiteKey"].tolist() == sorted(sites["Metadata_SiteKey"])[:-1] or len(images) == 7
    assert images["Metadata_CellCount"].gt(0).all()
    assert len(_read(s3_lake, "features_treatment", "real")) == 2
    assert s3_lake.read_named("rejects").to_pandas()["item"][0].startswith("s3://")


def test_real_sites_resumable_with_rejects(local_lake, ray_cluster):
    lake = local_lake
    sites = write_real_sites(lake)
    first = profile.run(lake, CFG, dataset="real", max_units=1)       # "killed" after one plate
    assert first["units_done_now"] == 1 and lake.committed_units("profile-real") == {"source_1__B1__P1"}
    second = profile.run(lake, CFG, dataset="real")
    assert second["units_done_now"] == 1 and second["units_skipped"] == 1
    resumed = {t: _read(lake, t, "real") for t in ("features_image", "features_well", "features_treatment")}

    # counts reconcile: every site is an image row or a reject naming the bad file
    rejects = lake.read_named("rejects").to_pandas()
    assert len(rejects) == 1 and rejects["item"][0].endswith("r01c02f02p01-ch1sk1fk1fl1.tiff")
    assert "TIFF" in rejects["reason"][0]
    assert len(resumed["features_image"]) + len(rejects) == len(sites)

    # wells are the mean of their images, treatments the mean of their wells (pandas reference)
    images, wells, treatments = resumed["features_image"], resumed["features_well"], resumed["features_treatment"]
    feats = feature_columns(images)
    assert len(feats) == len(profile.feature_names(CFG.features)) > 300
    ref_wells = images.groupby(["Metadata_Plate", "Metadata_Well"])[feats].mean().reset_index()
    np.testing.assert_allclose(wells[feats].to_numpy(), ref_wells[feats].to_numpy(), rtol=1e-5, equal_nan=True)
    assert wells["Metadata_SiteCount"].tolist() == [2, 2, 2, 1] and wells["Metadata_Draw"].isna().all()
    ref_treat = wells.groupby("Metadata_JCP2022")[feats].mean().reset_index()
    np.testing.assert_allclose(treatments[feats].to_numpy(), ref_treat[feats].to_numpy(), rtol=1e-5,
                               equal_nan=True)
    assert set(treatments["Metadata_pert_type"]) == {"negcon", "trt"}
    # biology is recovered through the whole stage: the dense compound wells have more cells than DMSO
    counts = images.groupby("Metadata_JCP2022")["Metadata_CellCount"].mean()
    assert counts[COMPOUND] > 1.8 * counts[DMSO_JCP2022]

    # an uninterrupted run from scratch gives exactly the same tables
    lake.reset_stage("profile-real")
    profile.run(lake, CFG, dataset="real")
    for table, frame in resumed.items():
        pd.testing.assert_frame_equal(_read(lake, table, "real"), frame)


def test_duckdb_aggregate_equals_pandas(local_lake, ray_cluster):
    import duckdb

    write_real_sites(local_lake, corrupt=False)
    profile.run(local_lake, CFG, dataset="real")
    feature = "Nuclei_AreaShape_Area"
    glob = local_lake.uri_of("features/image/*=*/*.parquet")
    got = duckdb.sql(f"""SELECT Metadata_Plate, dataset, COUNT(*) AS n, AVG("{feature}") AS mean_area,
                                MEDIAN(Metadata_CellCount) AS median_cells
                         FROM read_parquet('{glob}', hive_partitioning=true)
                         GROUP BY ALL ORDER BY Metadata_Plate""").df()
    images = _read(local_lake, "features_image", "real")
    ref = images.groupby("Metadata_Plate").agg(n=(feature, "size"), mean_area=(feature, "mean"),
                                               median_cells=("Metadata_CellCount", "median")).reset_index()
    assert got["dataset"].eq("real").all()
    np.testing.assert_array_equal(got["n"], ref["n"])
    np.testing.assert_allclose(got["mean_area"], ref["mean_area"], rtol=1e-6)
    np.testing.assert_allclose(got["median_cells"], ref["median_cells"])


def write_synthetic_run(lake, run: str, n_draws: int = 3) -> pd.DataFrame:
    """images.zarr (2 compounds x ``n_draws``, 2 blocks) and its synthetic_manifest, as `cpldm generate` writes."""
    import zarr

    jcps, rows, images = (DMSO_JCP2022, COMPOUND), [], []
    for c, jcp in enumerate(jcps):
        for d in range(n_draws):
            images.append(simulated_site(4 + 6 * c, 3.5, size=SIZE, seed=1000 + 10 * c + d))
            rows.append({"run": run, "Metadata_JCP2022": jcp, "Metadata_Draw": d, "Metadata_Replicate": 0,
                         "Metadata_Source": f"source_{d % 2 + 1}",
                         "Metadata_Batch": f"B{d}", "Metadata_Well": "B02", "Metadata_Seed": 7 * d + c,
                         "Metadata_Block": c, "Metadata_ImageRow": len(images) - 1,
                         "Metadata_DesignRow": len(images) - 1, "Metadata_Model": "scm", "Metadata_ModelKind": "scm",
                         "Metadata_Sampler": "ddim", "Metadata_SamplerSteps": 10, "Metadata_GuidanceScale": 1.0})
    group = zarr.open_group(lake.zarr_store(f"synthetic/{run}/images.zarr"), mode="w")
    arr = group.create_array("images", shape=(len(images), 5, SIZE, SIZE), chunks=(1, 5, SIZE, SIZE), dtype="uint16")
    arr[:] = np.stack(images)
    manifest = pd.DataFrame(rows)
    for block, part in manifest.groupby("Metadata_Block"):
        table = pa.Table.from_pandas(part, schema=table_spec("synthetic_manifest").schema, preserve_index=False)
        lake.write_named("synthetic_manifest", table,
                         part=f"block-{block:06d}", partition={"run": run})
    from storage_schemas.artifacts import GenerationRun, InputRef, write_record   # the record profile names
    write_record(lake, f"synthetic/{run}", GenerationRun(id=run, model_run="scm", draws=n_draws, rows=len(images),
                                                         inputs={"model": InputRef("ModelCard", "scm", "0" * 64)}))
    return manifest


def test_synthetic_draws_and_single_cells(local_lake, ray_cluster):
    run = "scm-N3"
    write_synthetic_run(local_lake, run)
    summary = profile.run(local_lake, replace(CFG, single_cell=True), dataset=run)
    assert summary["units"] == 2 and summary["rejected"] == 0 and summary["images"] == 6
    cells = _read(local_lake, "features_single_cell", run)
    images = _read(local_lake, "features_image", run)
    wells = _read(local_lake, "features_well", run)
    treatments = _read(local_lake, "features_treatment", run)
    feats = feature_columns(images)
    # image = median over its single cells
    ref = cells.groupby("Metadata_SiteKey")[feats].median().reindex(images["Metadata_SiteKey"])
    np.testing.assert_allclose(images[feats].to_numpy(), ref.to_numpy(), rtol=1e-6, equal_nan=True)
    assert (cells.groupby("Metadata_SiteKey").size().reindex(images["Metadata_SiteKey"]).to_numpy()
            == images["Metadata_CellCount"].to_numpy()).all()
    # a "well" is one draw, with the drawn confounders; the treatment is the mean over draws (g-estimate)
    assert len(wells) == 6 and wells["Metadata_Draw"].notna().all()
    # each draw is a synthetic plate (normalised against its own DMSO downstream)
    assert (wells["Metadata_Plate"] == [f"draw-{d:04d}" for d in wells["Metadata_Draw"]]).all()
    assert (wells["Metadata_SiteCount"] == 1).all()
    ref_t = wells.groupby("Metadata_JCP2022")[feats].mean()
    np.testing.assert_allclose(treatments.set_index("Metadata_JCP2022")[feats].to_numpy(), ref_t.to_numpy(),
                               rtol=1e-5, equal_nan=True)
    assert treatments["Metadata_WellCount"].tolist() == [3, 3]
    assert treatments.set_index("Metadata_JCP2022")["Metadata_pert_type"][DMSO_JCP2022] == "negcon"


def test_unknown_synthetic_run_is_a_user_error(local_lake):
    from cpldm_core.errors import UserError
    with pytest.raises(UserError, match="no synthetic_manifest"):
        profile.run(local_lake, CFG, dataset="nope")


def _site_rows(unit: str, site: int, cells: int, level: str = profile.LEVEL_IMAGE) -> pd.DataFrame:
    """SiteProfiler-shaped rows of one site: ``cells`` cell rows, then its image (or reject) row."""
    key = f"{unit}/{site}"
    rows = [{"unit": unit, "Metadata_SiteKey": key, "Metadata_Level": profile.LEVEL_CELL, "f": float(c)}
            for c in range(cells)]
    return pd.DataFrame([*rows, {"unit": unit, "Metadata_SiteKey": key, "Metadata_Level": level, "f": -1.0}])


def test_completed_units_yields_each_unit_once_its_last_site_arrived():
    """A unit is handed over right after the batch holding its last site (not at the end of the stream), with
    exactly its rows (pandas groupby reference); lost or doubled sites are errors naming the unit."""
    batches = [pd.concat([_site_rows("A", 1, 3), _site_rows("B", 1, 2)]), _site_rows("A", 2, 0),
               _site_rows("B", 2, 4), _site_rows("B", 3, 0, profile.LEVEL_REJECT)]
    events = []

    def stream(frames):
        for i, frame in enumerate(frames):
            events.append(f"batch{i}")
            yield frame

    got = {}
    for unit, rows in profile.completed_units(stream(batches), {"A": 2, "B": 3}):
        events.append(f"unit {unit}")
        got[unit] = rows
    assert events == ["batch0", "batch1", "unit A", "batch2", "batch3", "unit B"]
    reference = dict(tuple(pd.concat(batches).groupby("unit")))
    for unit, rows in got.items():
        pd.testing.assert_frame_equal(rows.reset_index(drop=True), reference[unit].reset_index(drop=True))

    with pytest.raises(RuntimeError, match=r"missing.*'B': '2/3'"):
        list(profile.completed_units(stream(batches[:3]), {"A": 2, "B": 3}))
    with pytest.raises(RuntimeError, match="'A' after all its sites"):
        list(profile.completed_units(stream([*batches, _site_rows("A", 2, 0)]), {"A": 2, "B": 3}))
    with pytest.raises(RuntimeError, match="'B' got 4 site rows for 3"):
        list(profile.completed_units(stream([*batches[:3], pd.concat([_site_rows("B", 3, 0), _site_rows("B", 4, 0)])]),
                                     {"A": 2, "B": 3}))
    with pytest.raises(RuntimeError, match="'C', which is not in this wave"):
        list(profile.completed_units(stream([_site_rows("C", 1, 0)]), {"A": 2}))


def test_a_unit_is_committed_while_the_wave_is_still_streaming(local_lake, ray_cluster, monkeypatch):
    """The driver writes a plate as soon as it is complete: with both plates in one wave, the first plate is
    written before the wave's last batch has been read (a stage that collected the wave first would not)."""
    write_real_sites(local_lake, corrupt=False)
    consumed, written_at = [0], []
    real_completed = profile.completed_units

    def counting(batches, expected):
        def counted():
            for batch in batches:
                consumed[0] += 1
                yield batch
        return real_completed(counted(), expected)

    real_write = profile.write_unit

    def recording(lake, cfg, dataset, unit, rows, names):
        written_at.append((unit, consumed[0]))
        return real_write(lake, cfg, dataset, unit, rows, names)

    monkeypatch.setattr(profile, "completed_units", counting)
    monkeypatch.setattr(profile, "write_unit", recording)
    summary = profile.run(local_lake, replace(CFG, units_per_wave=8), dataset="real")
    assert summary["images"] == 8 and [u for u, _ in written_at] == ["source_1__B1__P1", "source_1__B1__P2"]
    # 2 sites per batch: plate P1 (4 sites) is complete after 2 of the 4 batches
    assert written_at[0][1] < consumed[0] == 4

"""`cpldm catalog` on a tiny hand-built JUMP-layout lake (local and S3) and on the real example load_data.

``build_raw_lake`` writes the raw layout of CONTRACTS.md directly (uint16 TIFFs, current and legacy
load_data, metadata CSVs), including rows that must be rejected, and returns what the catalog must find.
The ingest tests reuse it.
"""
from __future__ import annotations

import gzip
import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tifffile

from conftest import shared_path

CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")
DMSO, EMPTY = "JCP2022_033924", "JCP2022_999999"
#: chN per stain per source, in the spelling of JUMP's channel_mapping.csv (source as a bare number)
CHANNEL_NUMBERS = {"source_1": (1, 2, 3, 4, 5), "source_2": (5, 4, 3, 2, 1)}
IMAGE_PX = 32

#: source, batch, plate, wells, sites, load_data format
PLATES = [
    ("source_1", "B1", "P1a", ["A01", "A02", "B01", "P24"], (1, 2), "current"),
    ("source_1", "B2", "110000295571", ["A01", "A02"], (1, 2), "legacy"),
    ("source_2", "B3", "P3", ["A01", "AF48"], (0, 1), "current"),   # 1536-well plate, sites from 0
    ("source_2", "B4", "P4", ["A01", "A02"], (0, 1), "current"),
]
#: well -> compound (absent: not in well.csv.gz -> rejected)
WELL_COMPOUND = {
    ("P1a", "A01"): DMSO, ("P1a", "A02"): "JCP2022_000001", ("P1a", "B01"): "JCP2022_000002",
    ("110000295571", "A01"): DMSO, ("110000295571", "A02"): "JCP2022_000003",
    ("P3", "A01"): DMSO, ("P3", "AF48"): "JCP2022_000004",
    ("P4", "A01"): "JCP2022_000001", ("P4", "A02"): EMPTY,
}
COMPOUNDS = {DMSO: "CS(C)=O", "JCP2022_000001": "CCO", "JCP2022_000002": "c1ccccc1",
             "JCP2022_000003": "CC(=O)O", "JCP2022_000004": "CCN"}


def site_image(seed: int) -> np.ndarray:
    """(5, 32, 32) uint16 with channel-dependent brightness (deterministic)."""
    rng = np.random.default_rng(seed)
    base = np.array([800, 1500, 2500, 3500, 5000], dtype=float)[:, None, None]
    return rng.poisson(base * rng.uniform(0.5, 1.5, (5, IMAGE_PX, IMAGE_PX))).astype(np.uint16)


def well_rc(well: str) -> tuple[int, int]:
    """Phenix row/column numbers (1-based): A01 -> (1, 1), AF48 -> (32, 48)."""
    from cpldm_core.load_data import split_well, well_row_index
    row, col = split_well(well)
    return well_row_index(row) + 1, col


def tiff_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, compression="lzw")
    return buf.getvalue()


def _csv(df: pd.DataFrame, gz: bool = False) -> bytes:
    data = df.to_csv(index=False).encode()
    return gzip.compress(data, mtime=0) if gz else data


def build_raw_lake(lake, corrupt: bool = False, illum: bool = False) -> dict:
    """Write the tiny raw lake. Returns expected {"sites": [keys], "rejects": {key: reason fragment},
    "images": {key: (5,H,W) uint16}, "rows": n load_data rows, "illum": {plate: (5,H,W)}, "broken": {key: frag}}."""
    images, expected_sites, rejects, broken, illums, n_rows = {}, [], {}, {}, {}, 0
    for k, (source, batch, plate, wells, sites, fmt) in enumerate(PLATES):
        img_dir = f"raw/{source}/images/{batch}/images/{plate}/Images"
        rows = []
        if illum and plate == "P1a":
            illums[plate] = np.random.default_rng(7).uniform(0.5, 2.0, (5, IMAGE_PX, IMAGE_PX)).astype(np.float32)
            for j, ch in enumerate(CHANNELS):
                buf = io.BytesIO()
                np.save(buf, illums[plate][j])
                lake.write_bytes(f"raw/{source}/images/{batch}/illum/{plate}/{plate}_Illum{ch}.npy", buf.getvalue())
        for well in wells:
            r, col = well_rc(well)
            for site in sites:
                key = f"{source}/{batch}/{plate}/{well}/{site}"
                img = site_image(k * 1000 + r * 50 + col * 3 + site)
                images[key] = img
                names = {ch: f"r{r:02d}c{col:02d}f{site + 1:02d}p01-ch{CHANNEL_NUMBERS[source][j]}sk1fk1fl1.tiff"
                         for j, ch in enumerate(CHANNELS)}
                for j, ch in enumerate(CHANNELS):
                    lake.write_bytes(f"{img_dir}/{names[ch]}", tiff_bytes(img[j]))
                row = {"Metadata_Source": source, "Metadata_Batch": batch, "Metadata_Plate": plate,
                       "Metadata_Well": well, "Metadata_Site": str(site)}
                if fmt == "current":
                    row.update({f"URL_Orig{ch}": lake.uri_of(f"{img_dir}/{names[ch]}") for ch in CHANNELS})
                    if plate in illums:
                        row.update({f"URL_Illum{ch}": lake.uri_of(
                            f"raw/{source}/images/{batch}/illum/{plate}/{plate}_Illum{ch}.npy") for ch in CHANNELS})
                else:
                    del row["Metadata_Source"], row["Metadata_Batch"]   # legacy files often lack them
                    row.update({f"FileName_Orig{ch}": names[ch] for ch in CHANNELS})
                    row.update({f"PathName_Orig{ch}": lake.uri_of(img_dir) + "/" for ch in CHANNELS})
                rows.append(row)
                n_rows += 1
                jcp = WELL_COMPOUND.get((plate, well))
                if jcp is None:
                    rejects[key] = "not in well.csv.gz"
                elif jcp == EMPTY:
                    rejects[key] = "empty well"
                else:
                    expected_sites.append(key)
        df = pd.DataFrame(rows)
        base = f"raw/{source}/workspace/load_data_csv/{batch}/{plate}"
        if fmt == "current":
            lake.write_bytes(f"{base}/load_data.csv", _csv(df))
        else:
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf)
            lake.write_bytes(f"{base}/load_data.parquet", buf.getvalue())
    if corrupt:
        def path_of(key, ch):
            source, batch, plate, well, site = key.split("/")
            r, col = well_rc(well)
            n = CHANNEL_NUMBERS[source][CHANNELS.index(ch)]
            return f"raw/{source}/images/{batch}/images/{plate}/Images/r{r:02d}c{col:02d}f{int(site) + 1:02d}p01-ch{n}sk1fk1fl1.tiff"
        k1, k2, k3, k4 = ("source_1/B1/P1a/A02/2", "source_1/B1/P1a/B01/1", "source_2/B4/P4/A01/1",
                          "source_1/B2/110000295571/A02/1")
        lake.write_bytes(path_of(k1, "DNA"), lake.read_bytes(path_of(k1, "DNA"))[:300])   # truncated
        lake.delete(path_of(k2, "ER"))                                                   # missing
        lake.write_bytes(path_of(k3, "RNA"), tiff_bytes(images[k3][2].astype(np.uint8)))  # wrong dtype
        lake.write_bytes(path_of(k4, "Mito"), tiff_bytes(images[k4][4][:16]))             # wrong shape
        broken = {k1: "not a readable TIFF", k2: "cannot read", k3: "uint16", k4: "different shapes"}
    meta = "raw/metadata"
    plate_df = pd.DataFrame([(s, b, p, "COMPOUND") for s, b, p, *_ in PLATES],
                            columns=["Metadata_Source", "Metadata_Batch", "Metadata_Plate", "Metadata_PlateType"])
    well_df = pd.DataFrame([(next(s for s, _, p2, *_ in PLATES if p2 == p), p, w, j)
                            for (p, w), j in WELL_COMPOUND.items()],
                           columns=["Metadata_Source", "Metadata_Plate", "Metadata_Well", "Metadata_JCP2022"])
    comp_df = pd.DataFrame([(j, f"KEY{j[-6:]}-UHFFFAOYSA-N", f"InChI=1S/{j}", s) for j, s in COMPOUNDS.items()],
                           columns=["Metadata_JCP2022", "Metadata_InChIKey", "Metadata_InChI", "Metadata_SMILES"])
    ctrl = pd.DataFrame([(EMPTY, "empty", "Empty"), (DMSO, "negcon", "DMSO")],
                        columns=["Metadata_JCP2022", "Metadata_pert_type", "Metadata_Name"])
    cmap = pd.DataFrame([(s.split("_")[1], *n) for s, n in CHANNEL_NUMBERS.items()],
                        columns=["Metadata_Source", *[f"Metadata_Channel_Num_{c}" for c in CHANNELS]])
    lake.write_bytes(f"{meta}/plate.csv.gz", _csv(plate_df, gz=True))
    lake.write_bytes(f"{meta}/well.csv.gz", _csv(well_df, gz=True))
    lake.write_bytes(f"{meta}/compound.csv.gz", _csv(comp_df, gz=True))
    lake.write_bytes(f"{meta}/perturbation_control.csv", _csv(ctrl))
    lake.write_bytes(f"{meta}/channel_mapping.csv", _csv(cmap))
    return {"sites": expected_sites, "rejects": rejects, "images": images, "rows": n_rows, "illum": illums,
            "broken": broken}


def test_catalog_tiny_lake(lake, ray_cluster):
    from cpldm_core.load_data import CatalogConfig
    from pipelines import catalog

    truth = build_raw_lake(lake, illum=True)
    summary = catalog.run(lake, CatalogConfig(unseen_compound_fraction=0.5, heldout_batch_fraction=0.25))
    sites = lake.read_named("sites").to_pandas()
    rejects = lake.read_named("rejects").to_pandas()
    assert sorted(sites["Metadata_SiteKey"]) == sorted(truth["sites"])
    assert summary["rows"] == truth["rows"] == summary["sites"] + summary["rejected"]
    got = dict(zip(rejects["item"], rejects["reason"]))
    assert set(got) == set(truth["rejects"])
    for key, fragment in truth["rejects"].items():
        assert fragment in got[key]
    # plate ids stay strings; sites keep the source's numbering; 1536-well positions survive
    assert sites["Metadata_Plate"].map(type).eq(str).all()
    assert "110000295571" in set(sites["Metadata_Plate"])
    assert set(sites.loc[sites["Metadata_Source"] == "source_2", "Metadata_Site"]) == {0, 1}
    assert "AF48" in set(sites["Metadata_Well"])
    # legacy rows: URL = PathName + FileName, source/batch from the location
    legacy = sites[sites["Metadata_Plate"] == "110000295571"]
    assert (legacy["Metadata_Source"] == "source_1").all() and (legacy["Metadata_Batch"] == "B2").all()
    for url in legacy["URL_OrigDNA"]:
        assert url.startswith(lake.uri_of("raw/source_1/images/B2/images/110000295571/Images/r"))
        assert "//r" not in url
    # illumination URLs only where load_data has them
    p1 = sites["Metadata_Plate"] == "P1a"
    assert sites.loc[p1, "URL_IllumDNA"].notna().all() and sites.loc[~p1, "URL_IllumDNA"].isna().all()
    # metadata joined as a naive merge would
    naive = sites[["Metadata_Plate", "Metadata_Well"]].apply(tuple, axis=1).map(WELL_COMPOUND)
    assert (naive == sites["Metadata_JCP2022"]).all()
    assert (sites["Metadata_SMILES"] == sites["Metadata_JCP2022"].map(COMPOUNDS)).all()
    assert set(sites.loc[sites["Metadata_JCP2022"] == DMSO, "Metadata_pert_type"]) == {"negcon"}
    # split tables
    split_c = lake.read_named("split_compounds").to_pandas()
    split_b = lake.read_named("split_batches").to_pandas()
    assert dict(zip(split_c["Metadata_JCP2022"], split_c["Metadata_CompoundSplit"]))[DMSO] == "seen"
    assert (split_c["Metadata_CompoundSplit"] == "unseen").sum() == 2   # round(0.5 * 4 treatments)
    assert (split_b["Metadata_BatchSplit"] == "heldout").sum() == 1
    assert len(split_b) == 4
    assert lake.is_committed("catalog", "catalog")
    # rerun: identical tables
    catalog.run(lake, CatalogConfig(unseen_compound_fraction=0.5, heldout_batch_fraction=0.25))
    assert lake.read_named("sites").to_pandas().equals(sites)
    assert lake.read_named("split_compounds").to_pandas().equals(split_c)


def test_catalog_channel_mapping_mismatch_is_rejected(local_lake, ray_cluster):
    from cpldm_core.load_data import CatalogConfig
    from pipelines import catalog

    build_raw_lake(local_lake)
    cmap = pd.DataFrame([("1", 2, 1, 3, 4, 5), ("2", 5, 4, 3, 2, 1)],
                        columns=["Metadata_Source", *[f"Metadata_Channel_Num_{c}" for c in CHANNELS]])
    local_lake.write_bytes("raw/metadata/channel_mapping.csv", _csv(cmap))
    summary = catalog.run(local_lake, CatalogConfig())
    sites = local_lake.read_named("sites").to_pandas()
    rejects = local_lake.read_named("rejects").to_pandas()
    assert set(sites["Metadata_Source"]) == {"source_2"}
    mapping_rejects = rejects[rejects["reason"].str.contains("channel mapping")]
    assert set(k.split("/")[0] for k in mapping_rejects["item"]) == {"source_1"}
    assert summary["rows"] == summary["sites"] + summary["rejected"]


def test_catalog_missing_metadata_is_a_user_error(local_lake, ray_cluster):
    from cpldm_core.errors import UserError
    from cpldm_core.load_data import CatalogConfig
    from pipelines import catalog

    build_raw_lake(local_lake)
    local_lake.delete("raw/metadata/well.csv.gz")
    with pytest.raises(UserError, match="well.csv.gz"):
        catalog.run(local_lake, CatalogConfig())


def real_example_metadata(lake, plate: str = "BR00117035", well: str = "A01") -> None:
    """Real JUMP metadata rows for one well of a real plate, written to the lake's raw/metadata."""
    root = "data/jump-metadata"
    plates = pd.read_csv(shared_path(root, "plate.csv.gz"), dtype=str)
    wells = pd.read_csv(shared_path(root, "well_2022-12-22_partial_8sources.csv.gz"), dtype=str)
    wells = wells[(wells["Metadata_Plate"] == plate) & (wells["Metadata_Well"] == well)]
    jcp = set(wells["Metadata_JCP2022"])
    smiles = pd.read_csv(shared_path(root, "compound_jcp2022_smiles_jump_smiles_testdata.csv.gz"), dtype=str)
    keys = pd.read_csv(shared_path(root, "compound_jcp2022_inchikey_babel_2023-09.csv.gz"), dtype=str)
    keys = keys.rename(columns={"jump_key": "Metadata_JCP2022", "standard_key": "Metadata_InChIKey"})
    comp = pd.DataFrame({"Metadata_JCP2022": sorted(jcp)}).merge(smiles, how="left").merge(keys, how="left")
    # the SMILES test file lacks some JUMP ids; a stand-in structure keeps the site (what is tested is the URLs)
    comp = comp.fillna({"Metadata_SMILES": "C"}).assign(Metadata_InChI="")
    lake.write_bytes("raw/metadata/plate.csv.gz", _csv(plates[plates["Metadata_Plate"] == plate], gz=True))
    lake.write_bytes("raw/metadata/well.csv.gz", _csv(wells, gz=True))
    lake.write_bytes("raw/metadata/compound.csv.gz", _csv(comp, gz=True))
    lake.write_bytes("raw/metadata/perturbation_control.csv",
                     shared_path(root, "perturbation_control.csv").read_bytes())
    lake.write_bytes("raw/metadata/channel_mapping.csv", shared_path(root, "channel_mapping_2023-01-23.csv").read_bytes())


def test_catalog_real_example_load_data(local_lake, ray_cluster):
    """The real cpg0016 load_data (current CSV with illum) catalogues with its s3://cellpainting-gallery URLs."""
    from cpldm_core.load_data import CatalogConfig
    from pipelines import catalog

    example = shared_path("data/jump-metadata/example_load_data/"
                          "current_csv__source_4__2021_04_26_Batch1__BR00117035__load_data_with_illum_A01_site1.csv")
    real_example_metadata(local_lake)
    summary = catalog.run(local_lake, CatalogConfig(), load_data=[str(example)])
    sites = local_lake.read_named("sites").to_pandas()
    raw = pd.read_csv(example, dtype=str)
    assert summary["sites"] == len(raw) == 1
    for ch in CHANNELS:
        assert sites[f"URL_Orig{ch}"].iloc[0] == raw[f"URL_Orig{ch}"].iloc[0]
        assert sites[f"URL_Illum{ch}"].iloc[0] == raw[f"URL_Illum{ch}"].iloc[0]
    assert sites["URL_OrigDNA"].iloc[0].startswith("s3://cellpainting-gallery/cpg0016-jump/source_4/")
    assert sites["Metadata_SiteKey"].iloc[0] == "source_4/2021_04_26_Batch1/BR00117035/A01/1"


def test_malformed_load_data_files_become_rejects(local_lake, ray_cluster):
    """Issue 22 #6: a load_data file without URL_Orig* columns, one with a row of extra fields, and random
    bytes are each one reject (item = the file); every other file is catalogued as without them."""
    from cpldm_core.load_data import CatalogConfig
    from pipelines import catalog

    truth = build_raw_lake(local_lake)
    base = "raw/source_1/workspace/load_data_csv/B9"
    good = pd.DataFrame({"Metadata_Plate": ["PX"], "Metadata_Well": ["A01"], "Metadata_Site": ["1"]})
    bad = {f"{base}/PX1/load_data.csv": _csv(good),                                    # no URL_Orig*
           f"{base}/PX2/load_data.csv": _csv(good) + b"PX,A01,1,extra,fields\n",       # a row too long
           f"{base}/PX3/load_data.csv.gz": np.random.default_rng(0).bytes(300)}        # random bytes
    for rel, data in bad.items():
        local_lake.write_bytes(rel, data)
    summary = catalog.run(local_lake, CatalogConfig(unseen_compound_fraction=0.5, heldout_batch_fraction=0.25))
    sites = local_lake.read_named("sites").to_pandas()
    assert sorted(sites["Metadata_SiteKey"]) == sorted(truth["sites"])
    assert summary["load_data_files_rejected"] == 3 and summary["rows"] == truth["rows"]
    rejects = local_lake.read_named("rejects").to_pandas()
    whole = rejects[rejects["item"].isin(bad)]
    assert sorted(whole["item"]) == sorted(bad) and (whole["unit"] == whole["item"]).all()
    reasons = dict(zip(whole["item"], whole["reason"]))
    assert "URL_Orig" in reasons[f"{base}/PX1/load_data.csv"]
    assert "cannot read as CSV" in reasons[f"{base}/PX3/load_data.csv.gz"]

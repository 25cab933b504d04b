"""Pure load_data parsing, channel mapping, metadata join and split logic (no Ray, no lake)."""
from __future__ import annotations

import io

import pandas as pd
import pytest

from conftest import shared_path
from cpldm_core import load_data as ld
from cpldm_core.errors import UserError

EXAMPLES = "data/jump-metadata/example_load_data"


def _csv_bytes(df: pd.DataFrame) -> bytes:
    return df.to_csv(index=False).encode()


def test_current_csv_real_example():
    path = shared_path(EXAMPLES, "current_csv__source_4__2021_04_26_Batch1__BR00117035__load_data_A01_site1.csv")
    df = ld.read_table_bytes(path.read_bytes(), path.name)
    sites, rejects = ld.parse_load_data(df, path.name)
    assert rejects == [] and len(sites) == 1
    raw = pd.read_csv(path, dtype=str)
    for ch in ld.CHANNELS:
        assert sites[f"URL_Orig{ch}"][0] == raw[f"URL_Orig{ch}"][0]
        assert sites[f"URL_Illum{ch}"][0] is None
    assert sites["Metadata_Plate"][0] == "BR00117035" and sites["Metadata_Site"][0] == 1
    # the real channel mapping agrees with the real file names (source_4: DNA is ch5, Mito ch1)
    mapping = ld.parse_channel_mapping(pd.read_csv(shared_path("data/jump-metadata/channel_mapping_2023-01-23.csv"),
                                                   dtype=str, keep_default_na=False))
    assert mapping["source_4"]["DNA"] == 5
    kept, bad = ld.check_channel_numbers(sites, mapping)
    assert len(kept) == 1 and bad == []
    swapped = sites.assign(URL_OrigDNA=sites["URL_OrigER"], URL_OrigER=sites["URL_OrigDNA"])
    kept, bad = ld.check_channel_numbers(swapped, mapping)
    assert kept.empty and "DNA is ch4" in bad[0][1]


def test_legacy_parquet_real_example():
    path = shared_path(EXAMPLES, "legacy_parquet__source_4__2021_08_23_Batch12__BR00126114__load_data_with_illum_2rows.parquet")
    df = ld.read_table_bytes(path.read_bytes(), path.name)
    sites, rejects = ld.parse_load_data(df, path.name)
    raw = pd.read_parquet(path)
    assert rejects == [] and len(sites) == 2
    for ch in ld.CHANNELS:
        naive = [p.rstrip("/") + "/" + f for p, f in zip(raw[f"PathName_Orig{ch}"], raw[f"FileName_Orig{ch}"])]
        assert sites[f"URL_Orig{ch}"].tolist() == naive
        naive = [p.rstrip("/") + "/" + f for p, f in zip(raw[f"PathName_Illum{ch}"], raw[f"FileName_Illum{ch}"])]
        assert sites[f"URL_Illum{ch}"].tolist() == naive
    assert sites["Metadata_Site"].tolist() == [1, 2]
    assert sites["Metadata_SiteKey"][0] == "source_4/2021_08_23_Batch12/BR00126114/A01/1"


def test_legacy_csv_without_source_uses_location_and_keeps_digit_plates():
    df = pd.DataFrame({"Metadata_Plate": ["0110000295"] * 3, "Metadata_Well": ["A1", "af48", "Q01"],
                       "Metadata_Site": ["0", "1.0", "x"],
                       **{f"FileName_Orig{c}": [f"f{c}.tif"] * 3 for c in ld.CHANNELS},
                       **{f"PathName_Orig{c}": ["/data/img"] * 3 for c in ld.CHANNELS}})
    name = "/lake/raw/source_9/workspace/load_data_csv/Batch_7/0110000295/load_data.csv"
    parsed = ld.read_table_bytes(_csv_bytes(df), name)
    sites, rejects = ld.parse_load_data(parsed, name, ld.defaults_from_path(name))
    assert sites["Metadata_Plate"].tolist() == ["0110000295", "0110000295"]   # leading zero kept: a string
    assert sites["Metadata_Source"].tolist() == ["source_9"] * 2
    assert sites["Metadata_Batch"].tolist() == ["Batch_7"] * 2
    assert sites["Metadata_Well"].tolist() == ["A01", "AF48"]                # 1536-well row AF
    assert sites["Metadata_Site"].tolist() == [0, 1]                          # numbered from 0 is kept
    assert len(rejects) == 1 and "Metadata_Site" in rejects[0][1]
    assert sites["URL_OrigDNA"][0] == "/data/img/fDNA.tif"


def test_bad_rows_and_files():
    base = {"Metadata_Source": "source_1", "Metadata_Batch": "b", "Metadata_Plate": "p", "Metadata_Site": "1",
            **{f"URL_Orig{c}": f"s3://bucket/{c}.tiff" for c in ld.CHANNELS}}
    rows = [{**base, "Metadata_Well": "A01"}, {**base, "Metadata_Well": "A01"},      # duplicate
            {**base, "Metadata_Well": "AG01"}, {**base, "Metadata_Well": "A49"},     # beyond 1536 layout
            {**base, "Metadata_Well": "B02", "URL_OrigMito": ""}]
    df = ld.read_table_bytes(_csv_bytes(pd.DataFrame(rows)), "x.csv")
    sites, rejects = ld.parse_load_data(df, "x.csv")
    assert len(sites) == 1
    reasons = [r for _, r in rejects]
    assert "duplicate" in reasons[0] and "384/1536" in reasons[1] and "384/1536" in reasons[2]
    assert "URL_OrigMito" in reasons[3]
    with pytest.raises(UserError, match="x.csv: no image columns"):
        ld.parse_load_data(pd.DataFrame({"Metadata_Plate": ["p"]}), "x.csv")
    with pytest.raises(UserError, match="bad.parquet"):
        ld.read_table_bytes(b"not parquet", "bad.parquet")


def test_join_metadata_reasons():
    sites = pd.DataFrame([{"Metadata_SiteKey": f"s/b/{p}/{w}/1", "Metadata_Source": "s", "Metadata_Batch": "b",
                           "Metadata_Plate": p, "Metadata_Well": w, "Metadata_Site": 1}
                          for p, w in [("p1", "A01"), ("p1", "A02"), ("p1", "A03"), ("p1", "A04"), ("p2", "A01")]])
    plate = pd.DataFrame({"Metadata_Source": ["s"], "Metadata_Plate": ["p1"], "Metadata_PlateType": ["COMPOUND"]})
    well = pd.DataFrame({"Metadata_Source": ["s"] * 3, "Metadata_Plate": ["p1"] * 3, "Metadata_Well": ["A01", "A02", "A03"],
                         "Metadata_JCP2022": [ld.DMSO_JCP2022, "JCP2022_999999", "JCP2022_000009"]})
    comp = pd.DataFrame({"Metadata_JCP2022": [ld.DMSO_JCP2022], "Metadata_InChIKey": ["K"], "Metadata_SMILES": ["CS(C)=O"]})
    ctrl = pd.DataFrame({"Metadata_JCP2022": [ld.DMSO_JCP2022, "JCP2022_999999"], "Metadata_pert_type": ["negcon", "empty"]})
    out, rejects = ld.join_metadata(sites, plate, well, comp, ctrl)
    assert out["Metadata_Well"].tolist() == ["A01"] and out["Metadata_pert_type"].tolist() == ["negcon"]
    reasons = dict(rejects)
    assert "empty well" in reasons["s/b/p1/A02/1"]
    assert "JCP2022_000009 has no SMILES" in reasons["s/b/p1/A03/1"]
    assert "not in well.csv.gz" in reasons["s/b/p1/A04/1"]
    assert "not in plate.csv.gz" in reasons["s/b/p2/A01/1"]


def test_split_compounds_deterministic_and_controls_seen():
    ids = [f"JCP2022_{i:06d}" for i in range(1, 41)] + [ld.DMSO_JCP2022, "JCP2022_037716"]
    comp = pd.DataFrame({"Metadata_JCP2022": ids,
                         "Metadata_pert_type": ["trt"] * 40 + ["negcon", "poscon"]})
    split = ld.split_compounds(comp, 0.25, seed=3)
    again = ld.split_compounds(comp.sample(frac=1.0, random_state=1), 0.25, seed=3)
    pd.testing.assert_frame_equal(split, again)                     # independent of row order
    s = dict(zip(split["Metadata_JCP2022"], split["Metadata_CompoundSplit"]))
    assert s[ld.DMSO_JCP2022] == "seen" and s["JCP2022_037716"] == "seen"
    assert sum(v == "unseen" for v in s.values()) == 10             # round(0.25 * 40)
    other = ld.split_compounds(comp, 0.25, seed=4)
    assert set(other.loc[other["Metadata_CompoundSplit"] == "unseen", "Metadata_JCP2022"]) != \
        {k for k, v in s.items() if v == "unseen"}
    # naive reference: the 10 lowest sha256 ranks among treatments
    naive = sorted(ids[:40], key=lambda j: ld.hash_rank(3, j))[:10]
    assert {k for k, v in s.items() if v == "unseen"} == set(naive)


def test_split_batches_keeps_a_training_batch_per_source():
    b = pd.DataFrame({"Metadata_Source": ["s1"] * 4 + ["s2"] * 2 + ["s3"],
                      "Metadata_Batch": ["a", "b", "c", "d", "e", "f", "g"]})
    for frac in (0.1, 0.3, 0.6, 0.9):
        split = ld.split_batches(b, frac, seed=0)
        held = split[split["Metadata_BatchSplit"] == "heldout"]
        train = split[split["Metadata_BatchSplit"] == "train"]
        assert set(train["Metadata_Source"]) == {"s1", "s2", "s3"}
        assert len(held) == min(max(1, int(frac * 7 + 0.5)), 4)   # at most 3 (s1) + 1 (s2) can be held out
    assert (ld.split_batches(b, 0.0, 0)["Metadata_BatchSplit"] == "train").all()


def test_training_sites_excludes_unseen_and_heldout():
    sites = pd.DataFrame({"Metadata_Source": ["s"] * 4, "Metadata_Batch": ["a", "a", "b", "b"],
                          "Metadata_JCP2022": ["c1", "c2", "c1", "c2"]})
    split_c = pd.DataFrame({"Metadata_JCP2022": ["c1", "c2"], "Metadata_CompoundSplit": ["seen", "unseen"]})
    split_b = pd.DataFrame({"Metadata_Source": ["s", "s"], "Metadata_Batch": ["a", "b"],
                            "Metadata_BatchSplit": ["train", "heldout"]})
    out = ld.training_sites(sites, split_c, split_b)
    assert out[["Metadata_Batch", "Metadata_JCP2022"]].values.tolist() == [["a", "c1"]]


def test_sort_sites_orders_wells_by_row_then_column():
    sites = pd.DataFrame({"Metadata_Source": ["s"] * 4, "Metadata_Batch": ["b"] * 4, "Metadata_Plate": ["p"] * 4,
                          "Metadata_Well": ["AA01", "B01", "A02", "A01"], "Metadata_Site": [1, 1, 1, 0]})
    assert ld.sort_sites(sites)["Metadata_Well"].tolist() == ["A01", "A02", "B01", "AA01"]


def test_read_table_gzip_csv_keeps_strings():
    import gzip
    data = gzip.compress(b"Metadata_Plate,Metadata_Site\n000123,1\n")
    df = ld.read_table_bytes(data, "plate.csv.gz")
    assert df["Metadata_Plate"][0] == "000123"
    df2 = ld.read_table_bytes(io.BytesIO(b"a\n1\n").getvalue(), "a.csv")
    assert df2["a"][0] == "1"

"""``cpldm embed`` on real Ray, real Parquet/Zarr, local and moto-S3 lakes."""
from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pyarrow as pa

from conftest import shared_path
from cpldm_core import compounds as cc
from pipelines import embed
from storage_schemas import columns as col

BAD_ID, BAD_SMILES = "JCP2022_999999", "C1CC("    # unclosed ring and branch


def catalog_frame(n: int = 13) -> pd.DataFrame:
    """``n`` real JUMP compounds, DMSO without SMILES (as some catalogs give it) and one invalid SMILES."""
    path = shared_path("data", "jump-metadata", "compound_jcp2022_smiles_jump_smiles_testdata.csv.gz")
    with gzip.open(path, "rt") as fh:
        df = pd.read_csv(fh, nrows=n)
    df = pd.concat([df, pd.DataFrame({"Metadata_JCP2022": [col.DMSO_JCP2022, BAD_ID],
                                      "Metadata_SMILES": [None, BAD_SMILES]})], ignore_index=True)
    df["Metadata_InChIKey"] = pd.Series([None] * len(df), dtype=object)
    df["Metadata_pert_type"] = np.where(df["Metadata_JCP2022"] == col.DMSO_JCP2022, "negcon", "trt")
    return df


def write_catalog(lake, df: pd.DataFrame) -> None:
    schema = pa.schema([(c, pa.string()) for c in df.columns])
    lake.write_named("compounds", pa.Table.from_pandas(df, schema=schema, preserve_index=False))


def reference_morgan(smiles: list[str], cfg: cc.EmbedConfig) -> np.ndarray:
    from rdkit import Chem, DataStructs
    from rdkit.Chem import rdFingerprintGenerator

    gen = rdFingerprintGenerator.GetMorganGenerator(radius=cfg.morgan_radius, fpSize=cfg.morgan_bits)
    out = np.zeros((len(smiles), cfg.morgan_bits))
    for i, s in enumerate(smiles):
        DataStructs.ConvertToNumpyArray(gen.GetFingerprint(Chem.MolFromSmiles(s)), out[i])
    return out


def test_morgan_embed_incremental_with_rejects(lake, ray_cluster, tmp_path):
    cfg = cc.embed_preset("tiny")                         # 256 bits, units of 8 compounds
    df = catalog_frame()
    write_catalog(lake, df)
    first = embed.run(lake, cfg)
    valid = len(df) - 1
    assert first["encoder_id"] == "morgan-r2-256"
    assert (first["inputs"], first["cached"], first["embedded"], first["rejected"]) == (len(df), 0, valid, 1)
    assert first["units"] == 2

    got = embed.load_embeddings(lake, "morgan-r2-256")
    expect = df.loc[df["Metadata_JCP2022"] != BAD_ID].sort_values("Metadata_JCP2022")
    assert got.ids.tolist() == expect["Metadata_JCP2022"].tolist()
    smiles = expect["Metadata_SMILES"].fillna(cc.DMSO_SMILES).tolist()
    np.testing.assert_array_equal(got.pooled, reference_morgan(smiles, cfg))
    assert got.tokens is None and got.mask is None

    rejects = lake.read_table("rejects/stage=embed").to_pandas()
    assert rejects["item"].tolist() == [BAD_ID]
    assert "syntax error while parsing" in rejects["reason"].iloc[0]

    table = embed.read_embeddings_table(lake, "morgan-r2-256").to_pandas()
    dmso = table.loc[table["Metadata_JCP2022"] == col.DMSO_JCP2022].iloc[0]
    assert dmso["Metadata_CanonicalSMILES"] == "CS(C)=O"
    assert dmso["Metadata_InChIKey"] == "IAZDPXIOMUYVGZ-UHFFFAOYSA-N"

    # second run adds novel compounds from a SMILES file (one repeating a catalog id with the same SMILES)
    parts_before = set(embed.committed_parts(lake, "morgan-r2-256")[0])
    novel = pd.DataFrame({"ID": ["NOVEL_1", "NOVEL_2", df["Metadata_JCP2022"][0]],
                          "SMILES": ["OCC", "c1ccncc1", df["Metadata_SMILES"][0]]})
    novel.to_csv(tmp_path / "novel.csv", index=False)
    second = embed.run(lake, cfg, smiles_file=str(tmp_path / "novel.csv"))
    assert (second["inputs"], second["cached"], second["embedded"], second["rejected"]) == \
        (len(df) + 2, valid, 2, 1)                         # the bad SMILES is examined again, still bad
    parts_after = set(embed.committed_parts(lake, "morgan-r2-256")[0])
    assert parts_before < parts_after and len(parts_after - parts_before) == 1   # appended, not rewritten
    got2 = embed.load_embeddings(lake, "morgan-r2-256")
    assert len(got2.ids) == len(set(got2.ids)) == valid + 2
    i = got2.ids.tolist().index("NOVEL_1")
    np.testing.assert_array_equal(got2.pooled[i], reference_morgan(["CCO"], cfg)[0])
    assert len(lake.read_table("rejects/stage=embed")) == 1   # not duplicated by the rerun


def test_rerun_after_crash_is_exactly_once(local_lake, ray_cluster):
    """A unit whose part was written but whose marker was not (killed midway) is redone, once; a run started
    while another live run extends the cache waits for it instead of replanning its units."""
    import subprocess
    import time
    from concurrent.futures import ThreadPoolExecutor

    from tests._fixtures import hold_claim

    cfg = cc.embed_preset("tiny")
    write_catalog(local_lake, catalog_frame(20))
    embed.run(local_lake, cfg)
    clean = embed.read_embeddings_table(local_lake, "morgan-r2-256").to_pandas()
    stage = embed.unit_stage("morgan-r2-256")
    lost = sorted(local_lake.committed_units(stage))[0]
    local_lake.delete(f"_markers/{stage}/{lost}.json")
    part = f"{embed.table_dir('morgan-r2-256')}/{lost}.parquet"
    n_lost = local_lake.read_table(part).num_rows
    other = subprocess.Popen(["sleep", "300"])  # another run, alive on this host, is extending the cache
    try:
        hold_claim(local_lake, stage, embed.CACHE_UNIT, other.pid)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(embed.run, local_lake, cfg)
            time.sleep(2.0)
            # it waits: the other run's unwritten-marker part is neither deleted nor redone under it
            assert not waiting.done() and local_lake.exists(part) and lost not in local_lake.committed_units(stage)
            local_lake.release_unit(stage, embed.CACHE_UNIT)   # the other run is done
            again = waiting.result(timeout=300)
    finally:
        other.kill()
        other.wait()
    assert again["embedded"] == n_lost
    assert not local_lake.exists(f"_claims/{stage}/{embed.CACHE_UNIT}.json")   # released
    redone = embed.read_embeddings_table(local_lake, "morgan-r2-256").to_pandas()
    key = "Metadata_JCP2022"
    pd.testing.assert_frame_equal(redone.sort_values(key).reset_index(drop=True)[[key, "Metadata_InChIKey"]],
                                  clean.sort_values(key).reset_index(drop=True)[[key, "Metadata_InChIKey"]])
    assert embed.run(local_lake, cfg)["embedded"] == 0   # nothing left to do


def test_molt5_embed_tokens_and_cache(local_lake, ray_cluster, tmp_path):
    df = catalog_frame(9)
    model_dir = cc.save_random_molt5(tmp_path / "tiny-molt5", df["Metadata_SMILES"].dropna().tolist())
    cfg = embed.load_embed_config(overrides={"encoder": "molt5", "molt5_model": str(model_dir),
                                             "molt5_max_tokens": 24, "device": "cpu"}, preset="tiny")
    enc_id = cc.encoder_id(cfg)
    assert enc_id == "molt5-tiny-molt5-t24"
    write_catalog(local_lake, df.iloc[:6])
    first = embed.run(local_lake, cfg)
    write_catalog(local_lake, df)                        # the catalog grows: only the new ones are embedded
    second = embed.run(local_lake, cfg)
    assert first["embedded"] == 6 and second["cached"] == 6
    assert second["embedded"] == len(df) - 6 - 1 and second["rejected"] == 1

    got = embed.load_embeddings(local_lake, enc_id)
    ref_encoder = cc.MolT5Encoder.from_pretrained(str(model_dir), max_tokens=24, device="cpu")
    table = embed.read_embeddings_table(local_lake, enc_id).to_pandas().set_index("Metadata_JCP2022")
    ref = ref_encoder.encode(table.loc[got.ids, "Metadata_CanonicalSMILES"].tolist())
    assert got.tokens.dtype == np.float16 and got.tokens.shape == (len(got.ids), 24, ref_encoder.dim)
    np.testing.assert_array_equal(got.mask, ref["mask"])
    np.testing.assert_allclose(got.tokens, ref["tokens"].astype(np.float16), rtol=0, atol=0)
    np.testing.assert_allclose(got.pooled, ref["pooled"], rtol=1e-5, atol=1e-6)
    # a subset, in sorted order, for training on seen compounds only
    some = sorted(got.ids[[0, 3, 5]])
    sub = embed.load_embeddings(local_lake, enc_id, ids=some)
    assert sub.ids.tolist() == some
    np.testing.assert_array_equal(sub.tokens, got.tokens[[0, 3, 5]])


def test_cli_and_bad_inputs(local_lake, ray_cluster, tmp_path, capsys):
    from pipelines.cli import main

    (tmp_path / "bad.csv").write_text("name,structure\nx,CCO\n")
    assert main(["--lake", local_lake.uri, "embed", "--smiles", str(tmp_path / "bad.csv")]) == 2
    assert "needs an id column" in capsys.readouterr().err
    assert main(["--lake", local_lake.uri, "embed"]) == 2          # no catalog, no --smiles
    assert "cpldm catalog" in capsys.readouterr().err

    (tmp_path / "ok.csv").write_text("Metadata_JCP2022,SMILES\nA,CCO\nB,CCN\nB,CCCl\n")
    args = ["--lake", local_lake.uri, "embed", "--smiles", str(tmp_path / "ok.csv"), "--preset", "tiny",
            "--set", "morgan_bits=128"]
    assert main(args) == 0
    assert '"duplicates_rejected": 1' in capsys.readouterr().out
    ids = embed.load_embeddings(local_lake, "morgan-r2-128").ids.tolist()
    assert ids == ["A", "B"]
    assert "given twice" in local_lake.read_table("rejects/stage=embed").to_pandas()["reason"].iloc[0]
    # same id, other settings: refused instead of mixing incomparable vectors
    assert main(args[:-1] + ["morgan_bits=64", "--set", "encoder_id=morgan-r2-128"]) == 2
    assert "cached" in capsys.readouterr().err

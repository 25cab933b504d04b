"""Rebuild ``jump_compounds_subset.csv.gz`` (the simulator's compound library) from the JUMP metadata.

Run once by a maintainer; the output is committed as package data (see PROVENANCE.md)::

    python -m cpldm_core.data.build_compound_subset /path/to/shared/data/jump-metadata

Selection, deterministic (``SEED``): parse every JUMP SMILES with RDKit, draw ``N_SEEDS`` random seed
compounds and take each one's ``NEIGHBOURS`` nearest neighbours by Tanimoto similarity of Morgan
fingerprints (radius 2, 2048 bits), then add ``N_RANDOM`` random compounds. The neighbourhoods give the
library real chemical series, so that a mechanism of action assigned by structure can be predicted for
compounds never seen in training.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

SEED = 20240501
N_SEEDS = 64
NEIGHBOURS = 32
N_RANDOM = 448
DMSO = ("JCP2022_033924", "CS(C)=O")
OUT = Path(__file__).resolve().parent / "jump_compounds_subset.csv.gz"


def main(jump_metadata: str) -> None:
    from rdkit import Chem, DataStructs, RDLogger
    from rdkit.Chem import rdFingerprintGenerator

    RDLogger.DisableLog("rdApp.*")
    root = Path(jump_metadata)
    smiles = pd.read_csv(root / "compound_jcp2022_smiles_jump_smiles_testdata.csv.gz")
    keys = pd.read_csv(root / "compound_jcp2022_inchikey_babel_2023-09.csv.gz").rename(
        columns={"jump_key": "Metadata_JCP2022", "standard_key": "Metadata_InChIKey"})
    controls = set(pd.read_csv(root / "perturbation_control.csv")["Metadata_JCP2022"])
    table = smiles.merge(keys, on="Metadata_JCP2022", how="inner").dropna()
    table = table[~table["Metadata_JCP2022"].isin(controls)].sort_values("Metadata_JCP2022")
    # small drug-like molecules only: very long SMILES are peptides/macrocycles, not a chemical series
    table = table[table["Metadata_SMILES"].str.len().between(15, 90)].reset_index(drop=True)
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    mols = [Chem.MolFromSmiles(s) for s in table["Metadata_SMILES"]]
    ok = np.array([m is not None for m in mols])
    table = table[ok].reset_index(drop=True)
    mols = [m for m in mols if m is not None]
    fps = [gen.GetFingerprint(m) for m in mols]
    rng = np.random.default_rng(SEED)
    taken: set[int] = set()
    for seed in rng.choice(len(fps), size=N_SEEDS, replace=False):
        sims = np.asarray(DataStructs.BulkTanimotoSimilarity(fps[seed], fps))
        order = [int(i) for i in np.argsort(-sims, kind="stable") if int(i) not in taken]
        taken.update(order[:NEIGHBOURS])
    rest = np.setdiff1d(np.arange(len(fps)), sorted(taken))
    taken.update(int(i) for i in rng.choice(rest, size=N_RANDOM, replace=False))
    rows = sorted(taken)
    out = table.iloc[rows].copy()
    out["Metadata_InChI"] = [Chem.MolToInchi(mols[i]) for i in rows]
    dmso = Chem.MolFromSmiles(DMSO[1])
    dmso_key = keys.loc[keys["Metadata_JCP2022"] == DMSO[0], "Metadata_InChIKey"].iloc[0]
    out = pd.concat([pd.DataFrame([{"Metadata_JCP2022": DMSO[0], "Metadata_SMILES": DMSO[1],
                                    "Metadata_InChIKey": dmso_key, "Metadata_InChI": Chem.MolToInchi(dmso)}]),
                     out], ignore_index=True)
    out = out[["Metadata_JCP2022", "Metadata_InChIKey", "Metadata_InChI", "Metadata_SMILES"]]
    out = out.sort_values("Metadata_JCP2022").reset_index(drop=True)
    # mtime=0 keeps the gzip bytes reproducible
    import gzip
    with gzip.GzipFile(OUT, "wb", mtime=0) as fh:
        fh.write(out.to_csv(index=False).encode())
    print(f"wrote {len(out)} compounds to {OUT}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/jump-metadata")

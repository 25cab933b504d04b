"""Compound embedding throughput (molecules/s): Morgan (RDKit) and MolT5 (T5 encoder) on CPU.

``python -m benchmarks.bench_embed [--quick]`` prints a markdown table. Figures:

- ``morgan``: canonicalise + InChIKey + fingerprint per molecule (what one unit does), plain loop.
- ``morgan_stage``: the whole ``cpldm embed`` stage on a local lake through Ray Data, 1 vs 2 actors.
- ``molt5_tiny``: a tiny random T5 (d_model 32, 2 layers) - measures the pipeline's overhead, not a model.
- ``molt5_small_shape``: a random T5 with MolT5-small's shape (t5-small: d_model 512, 6 layers, 8 heads,
  d_ff 2048; ~35M encoder parameters) on CPU - what a CPU node would do with the real checkpoint.
Molecules are real JUMP SMILES from ../shared when present, else a literal list repeated.
"""
from __future__ import annotations

import argparse
import gzip
import tempfile
import time
from pathlib import Path

from benchmarks.harness import result_row

FALLBACK_SMILES = ["CS(C)=O", "c1ccccc1Br", "CC[C@H](N)C(=O)O", "OC(=O)c1ccccc1OC(C)=O",
                   "CN1C=NC2=C1C(=O)N(C)C(=O)N2C", "Clc1ccc(cc1)C(c1ccccc1)N1CCN(CC1)CCOCC(=O)O"]
SHARED_SMILES = (Path(__file__).resolve().parents[2] / "shared" / "data" / "jump-metadata"
                 / "compound_jcp2022_smiles_jump_smiles_testdata.csv.gz")

#: t5-small's encoder shape, which MolT5-small (laituan245/molt5-small) shares.
T5_SMALL_SHAPE = {"d_model": 512, "num_layers": 6, "num_heads": 8, "d_ff": 2048}


def load_smiles(n: int) -> tuple[list[str], str]:
    if SHARED_SMILES.exists():
        import pandas as pd

        from cpldm_core.compounds import parse_smiles
        from cpldm_core.errors import UserError

        with gzip.open(SHARED_SMILES, "rt") as fh:
            smiles = pd.read_csv(fh, nrows=int(n * 1.05) + 10)["Metadata_SMILES"].tolist()
        valid = []
        for s in smiles:  # a few JUMP SMILES fail RDKit's valence checks; the stage would reject them
            try:
                parse_smiles(s)
                valid.append(s)
            except UserError:
                pass
        return valid[:n], "JUMP SMILES (RDKit-valid)"
    reps = n // len(FALLBACK_SMILES) + 1
    return (FALLBACK_SMILES * reps)[:n], "literal SMILES repeated"


def row(name: str, n: int, seconds: float, notes: str) -> dict:
    return result_row(name, "throughput", n / seconds, "molecules/s", f"{n} molecules in {seconds:.2f} s; {notes}")


def bench_morgan(smiles: list[str], source: str) -> dict:
    from cpldm_core import compounds as cc

    enc = cc.MorganEncoder(cc.EmbedConfig())
    t0 = time.perf_counter()
    canon = [cc.molecule(s).smiles for s in smiles]
    enc.encode(canon)
    return row("morgan", len(smiles), time.perf_counter() - t0,
               f"r2 2048 bits incl. canonicalise+InChIKey, 1 core, {source}")


def bench_morgan_stage(smiles: list[str], source: str, concurrency: int) -> dict:
    import os

    import pandas as pd

    from cpldm_core import compounds as cc
    from pipelines import embed
    from pipelines.ray_runtime import ensure_ray
    from pipelines.storage import Lake

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ensure_ray(num_cpus=2)
    with tempfile.TemporaryDirectory() as tmp:
        pd.DataFrame({"ID": [f"B_{i:06d}" for i in range(len(smiles))], "SMILES": smiles}).to_csv(
            f"{tmp}/s.csv", index=False)
        lake = Lake(f"{tmp}/lake")
        lake.init()
        cfg = cc.EmbedConfig(block_size=256, concurrency=concurrency)
        t0 = time.perf_counter()
        summary = embed.run(lake, cfg, smiles_file=f"{tmp}/s.csv", include_catalog=False)
        seconds = time.perf_counter() - t0
    return row(f"morgan_stage_x{concurrency}", summary["embedded"], seconds,
               f"cpldm embed via Ray Data, {concurrency} actor(s), units of 256, local lake, incl. actor start; "
               f"{source}")


def bench_molt5(smiles: list[str], source: str, name: str, shape: dict, batch_size: int = 64) -> dict:
    import torch

    from cpldm_core import compounds as cc

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        cc.save_random_molt5(tmp, smiles, **shape)
        enc = cc.MolT5Encoder.from_pretrained(tmp, max_tokens=128, batch_size=batch_size, device="cpu")
        enc.encode(smiles[:batch_size])  # warm-up
        t0 = time.perf_counter()
        enc.encode(smiles)
        seconds = time.perf_counter() - t0
    return row(name, len(smiles), seconds, f"random T5 {shape}, T=128, batch {batch_size}, CPU 2 threads; {source}")


def run(quick: bool) -> list[dict]:
    n_morgan = 1000 if quick else 10000
    n_t5 = 256 if quick else 1024
    smiles, source = load_smiles(n_morgan)
    results = [bench_morgan(smiles, source)]
    for concurrency in (1, 2):
        results.append(bench_morgan_stage(smiles, source, concurrency))
    results.append(bench_molt5(smiles[:n_t5], source, "molt5_tiny",
                               {"d_model": 32, "num_layers": 2, "num_heads": 2, "d_ff": 64}))
    results.append(bench_molt5(smiles[:n_t5 // 4], source, "molt5_small_shape", T5_SMALL_SHAPE, batch_size=32))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    results = run(args.quick)
    print("| benchmark | value | unit | peak MB | notes |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['benchmark']} | {r['value']:.1f} | {r['unit']} | {r['peak_mem_mb']:.0f} | {r['notes']} |")


if __name__ == "__main__":
    main()

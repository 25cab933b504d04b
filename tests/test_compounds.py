"""Compound encoders (cpldm_core.compounds) against RDKit and transformers references; no Ray, no lake."""
from __future__ import annotations

import gzip
import re

import numpy as np
import pandas as pd
import pytest

from conftest import shared_path
from cpldm_core import compounds as cc
from cpldm_core.errors import UserError

LITERAL_SMILES = ["CS(C)=O", "c1ccccc1Br", "CC[C@H](N)C(=O)O", "OC(=O)c1ccccc1OC(C)=O",
                  "CN1C=NC2=C1C(=O)N(C)C(=O)N2C", "Clc1ccc(cc1)C(c1ccccc1)N1CCN(CC1)CCOCC(=O)O"]


def jump_smiles(n: int = 40) -> list[str]:
    """Real JUMP compound SMILES (first ``n`` of the shared test extract)."""
    path = shared_path("data", "jump-metadata", "compound_jcp2022_smiles_jump_smiles_testdata.csv.gz")
    with gzip.open(path, "rt") as fh:
        return pd.read_csv(fh, nrows=n)["Metadata_SMILES"].tolist()


@pytest.mark.parametrize("radius,bits,counts", [(2, 2048, False), (3, 1024, True), (1, 256, False)])
def test_morgan_equals_rdkit_reference(radius, bits, counts):
    from rdkit import Chem, DataStructs
    from rdkit.Chem import rdFingerprintGenerator

    smiles = jump_smiles() + LITERAL_SMILES
    got = cc.MorganEncoder(cc.EmbedConfig(morgan_radius=radius, morgan_bits=bits, morgan_counts=counts))
    out = got.encode(smiles)
    assert out["tokens"] is None and out["mask"] is None
    assert out["pooled"].shape == (len(smiles), bits) and out["pooled"].dtype == np.float32
    # reference: RDKit's generator through its bit-vector/sparse-count objects (not the NumPy shortcut)
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=bits)
    for i, s in enumerate(smiles):
        mol = Chem.MolFromSmiles(s)
        ref = np.zeros(bits)
        if counts:
            for idx, value in gen.GetCountFingerprint(mol).GetNonzeroElements().items():
                ref[idx] = value
        else:
            DataStructs.ConvertToNumpyArray(gen.GetFingerprint(mol), ref)
        np.testing.assert_array_equal(out["pooled"][i], ref, err_msg=s)


def test_canonicalise_and_inchikey():
    from rdkit import Chem

    # two spellings of ethanol / aspirin canonicalise to one string
    assert cc.canonicalise("OCC") == cc.canonicalise("CCO") == "CCO"
    assert cc.canonicalise("CC(=O)Oc1ccccc1C(O)=O") == cc.canonicalise("OC(=O)c1ccccc1OC(C)=O")
    for s in jump_smiles(20):
        m = cc.molecule(s)
        assert m.smiles == Chem.MolToSmiles(Chem.MolFromSmiles(s))
        assert m.inchikey == Chem.MolToInchiKey(Chem.MolFromSmiles(s))
        assert re.fullmatch(r"[A-Z]{14}-[A-Z]{10}-[A-Z]", m.inchikey)
    # DMSO, the JUMP negative control, is a molecule with PubChem's InChIKey for dimethyl sulfoxide
    assert cc.molecule(cc.DMSO_SMILES).inchikey == "IAZDPXIOMUYVGZ-UHFFFAOYSA-N"


@pytest.mark.parametrize("bad,message", [("C1CC(", "syntax error"), ("N(C)(C)(C)(C)C", "Explicit valence"),
                                         ("c1cccc1", "kekulize"), ("", "empty SMILES")])
def test_invalid_smiles_carry_rdkit_message(bad, message):
    with pytest.raises(UserError, match=message):
        cc.canonicalise(bad)
    with pytest.raises(UserError, match=message):
        cc.MorganEncoder().encode(["CCO", bad])


def test_encoder_ids_name_their_settings():
    assert cc.encoder_id(cc.EmbedConfig()) == "morgan-r2-2048"
    assert cc.encoder_id(cc.EmbedConfig(morgan_radius=3, morgan_bits=1024, morgan_counts=True)) == \
        "morgan-r3-1024-counts"
    assert cc.encoder_id(cc.EmbedConfig(encoder="molt5", molt5_model="laituan245/molt5-small")) == \
        "molt5-small-t128"
    assert cc.encoder_id(cc.EmbedConfig(encoder="molt5", molt5_model="/tmp/x/my-t5/", molt5_max_tokens=64)) == \
        "molt5-my-t5-t64"
    with pytest.raises(ValueError, match="multiple of token_chunk_rows"):
        cc.EmbedConfig(block_size=10, token_chunk_rows=4)


@pytest.fixture(scope="module")
def tiny_molt5(tmp_path_factory):
    path = tmp_path_factory.mktemp("molt5")
    return cc.save_random_molt5(path, jump_smiles() + LITERAL_SMILES)


def test_smiles_tokenizer_round_trip(tiny_molt5):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_molt5)  # the path users take
    for s in LITERAL_SMILES:
        pieces = tok.tokenize(s)
        assert pieces == re.findall(cc.SMILES_REGEX, s)
        ids = tok(s)["input_ids"]
        assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
    assert tok.pad_token_id == 0
    assert tok.convert_tokens_to_ids(["[Xe]"]) == [tok.unk_token_id]  # unseen bracket atom


def test_molt5_matches_unpadded_t5_forward(tiny_molt5):
    import torch
    from transformers import AutoTokenizer, T5EncoderModel

    smiles = LITERAL_SMILES
    enc = cc.MolT5Encoder.from_pretrained(str(tiny_molt5), max_tokens=48, batch_size=4, device="cpu")
    out = enc.encode(smiles)
    n, t, d = len(smiles), 48, enc.dim
    assert out["pooled"].shape == (n, d) and out["tokens"].shape == (n, t, d) and out["mask"].shape == (n, t)
    # reference: each molecule alone, without padding, through the plain transformers API
    tok = AutoTokenizer.from_pretrained(tiny_molt5)
    model = T5EncoderModel.from_pretrained(tiny_molt5).eval()
    for i, s in enumerate(smiles):
        ids = torch.tensor([tok(s)["input_ids"]])
        with torch.no_grad():
            ref = model(input_ids=ids).last_hidden_state[0].numpy()
        length = ids.shape[1]
        assert out["mask"][i].sum() == length and out["mask"][i, :length].all()
        np.testing.assert_allclose(out["tokens"][i, :length], ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(out["tokens"][i, length:], 0)
        np.testing.assert_allclose(out["pooled"][i], ref.mean(0), rtol=1e-4, atol=1e-5)


def test_molt5_truncates_to_max_tokens(tiny_molt5):
    enc = cc.MolT5Encoder.from_pretrained(str(tiny_molt5), max_tokens=8, device="cpu")
    out = enc.encode(["CCCCCCCCCCCCCCCCCCCC", "CO"])
    assert out["mask"].sum(1).tolist() == [8, 3]  # 20 atoms cut to 7 + </s>; "C","O","</s>"


def test_missing_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot load MolT5"):
        cc.MolT5Encoder.from_pretrained(str(tmp_path / "nope"))

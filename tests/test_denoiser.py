"""The confounder-aware denoiser: vocabularies, SCM tokens, null tokens, persistence (pure torch, no Ray)."""
from __future__ import annotations

import pytest
import torch

from cpldm_core.denoiser import (CONFOUNDERS, UNET_PRESETS, ConfounderAwareDenoiser, ConfounderVocab,
                                 count_parameters, split_well)
from cpldm_core.errors import UserError

D = 12


@pytest.fixture(scope="module")
def vocab():
    return ConfounderVocab.fit(["source_2", "source_1", "source_1"], ["b2", "b1", "b3"], ["B02", "A01", "AA12"])


def _inputs(vocab, b=3, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 8, size, size, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    c = torch.randn(b, D, generator=g)
    conf = vocab.encode(["source_1", "source_2", "source_1"][:b], ["b1", "b2", "b3"][:b], ["A01", "B02", "AA12"][:b])
    return x, t, c, conf


def test_split_well_and_vocab_codes(vocab):
    assert split_well("A01") == ("A", 1) and split_well("af48") == ("AF", 48)
    with pytest.raises(UserError, match="well"):
        split_well("01A")
    # sorted values; rows sorted as on a plate (A..Z before AA)
    assert vocab.sources == ("source_1", "source_2") and vocab.well_rows == ("A", "B", "AA")
    codes = vocab.encode(["source_2"], ["b3"], ["AA01"])
    assert codes.dtype == torch.long and codes.tolist() == [[1, 2, 2, 0]]
    assert vocab.decode(codes) == [("source_2", "b3", "AA01")]


def test_unknown_confounder_is_a_clear_error(vocab):
    with pytest.raises(UserError, match=r"unknown batch 'b9'"):
        vocab.encode(["source_1"], ["b9"], ["A01"])
    with pytest.raises(UserError, match=r"unknown source 'source_7'"):
        vocab.encode(["source_7"], ["b1"], ["A01"])
    # validation on held-out batches maps unknown values to the null index instead
    codes = vocab.encode(["source_1"], ["b9"], ["Z99"], allow_unknown=True)
    assert codes.tolist() == [[0, vocab.null_index(1), vocab.null_index(2), vocab.null_index(3)]]
    assert ConfounderVocab.from_dict(vocab.to_dict()) == vocab


def test_paper_preset_matches_method():
    p = UNET_PRESETS["paper"]
    assert p["block_out_channels"] == (256, 512, 768) and p["layers_per_block"] == 2
    assert p["in_channels"] == p["out_channels"] == 8 and p["sample_size"] == 48
    # attention in the two deepest levels only (METHOD.md: attention_levels [False, True, True])
    assert [("CrossAttn" in b) for b in p["down_block_types"]] == [False, True, True]
    assert [("CrossAttn" in b) for b in p["up_block_types"]] == [True, True, False]


def test_scm_and_scm_free_differ_exactly_in_confounder_tokens(vocab):
    torch.manual_seed(0)
    scm = ConfounderAwareDenoiser("tiny", "scm", vocab, compound_dim=D, compound_tokens=2).eval()
    free = ConfounderAwareDenoiser("tiny", "scm-free", vocab, compound_dim=D, compound_tokens=2).eval()
    extra = set(scm.state_dict()) - set(free.state_dict())
    assert set(free.state_dict()) <= set(scm.state_dict())
    assert extra == {f"confounder_embed.{k}.weight" for k in range(4)}
    free.load_state_dict({k: v for k, v in scm.state_dict().items() if k not in extra})
    x, t, c, conf = _inputs(vocab)
    tok_scm, mask_scm = scm.condition(c, confounders=conf)
    tok_free, mask_free = free.condition(c)
    assert tok_scm.shape[1] == tok_free.shape[1] + 4 == 2 + 4
    torch.testing.assert_close(tok_scm[:, :2], tok_free)
    for k, name in enumerate(CONFOUNDERS):   # token k+2 is exactly the embedding of confounder k
        torch.testing.assert_close(tok_scm[:, 2 + k], scm.confounder_embed[k].weight[conf[:, k]])
    assert mask_scm.all() and mask_free.all()
    # scm output depends on the batch token, scm-free ignores confounders
    conf2 = conf.clone()
    conf2[:, 1] = (conf2[:, 1] + 1) % len(vocab.batches)
    with torch.no_grad():
        assert not torch.allclose(scm(x, t, c, confounders=conf), scm(x, t, c, confounders=conf2))
        torch.testing.assert_close(free(x, t, c, confounders=conf), free(x, t, c, confounders=conf2))
    with pytest.raises(UserError, match="confounders"):
        scm(x, t, c)


def test_drop_mask_replaces_only_the_compound(vocab):
    torch.manual_seed(1)
    m = ConfounderAwareDenoiser("tiny", "scm", vocab, compound_dim=D, compound_tokens=2).eval()
    x, t, c, conf = _inputs(vocab)
    drop = torch.tensor([True, False, True])
    tokens, mask = m.condition(c, confounders=conf, drop_mask=drop)
    torch.testing.assert_close(tokens[0, 0], m.null_compound[0, 0])
    assert mask[0].tolist() == [True, False, True, True, True, True]      # one null token + 4 confounders
    with torch.no_grad():
        # a dropped sample's output no longer depends on its compound; a kept one does
        out_a = m(x, t, c, confounders=conf, drop_mask=drop)
        out_b = m(x, t, torch.randn_like(c), confounders=conf, drop_mask=drop)
    torch.testing.assert_close(out_a[0], out_b[0])
    assert not torch.allclose(out_a[1], out_b[1])


def test_token_input_respects_mask(vocab):
    torch.manual_seed(2)
    m = ConfounderAwareDenoiser("tiny", "scm", vocab, compound_dim=D, compound_input="tokens").eval()
    x, t, _, conf = _inputs(vocab)
    tokens = torch.randn(3, 5, D)
    mask = torch.tensor([[1, 1, 1, 0, 0]] * 3, dtype=torch.bool)
    changed = tokens.clone()
    changed[:, 3:] = 100.0          # padding positions: masked out, must not matter
    with torch.no_grad():
        a = m(x, t, tokens, compound_mask=mask, confounders=conf)
        b = m(x, t, changed, compound_mask=mask, confounders=conf)
        c = m(x, t, changed, compound_mask=None, confounders=conf)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_save_and_load_give_identical_predictions(vocab, tmp_path):
    torch.manual_seed(3)
    m = ConfounderAwareDenoiser("tiny", "scm", vocab, compound_dim=D, metadata={"schedule": {"beta_end": 0.02}})
    with torch.no_grad():
        for p in m.parameters():          # move away from the initialisation so a fresh model would differ
            p.add_(torch.randn_like(p) * 0.01)
    m.eval()
    m.save_pretrained(tmp_path / "final")
    assert {p.name for p in (tmp_path / "final").iterdir()} == {"config.json", "vocab.json", "weights.pt"}
    loaded = ConfounderAwareDenoiser.from_pretrained(tmp_path / "final")
    assert loaded.vocab == vocab and loaded.kind == "scm" and loaded.metadata["schedule"]["beta_end"] == 0.02
    x, t, c, conf = _inputs(vocab)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, c, confounders=conf), m(x, t, c, confounders=conf), rtol=0, atol=0)
    assert count_parameters(loaded) == count_parameters(m)
    with pytest.raises(UserError, match="not a saved denoiser"):
        ConfounderAwareDenoiser.from_pretrained(tmp_path)


def test_bad_inputs_are_user_errors(vocab):
    with pytest.raises(UserError, match="kind"):
        ConfounderAwareDenoiser("tiny", "other", vocab, compound_dim=D)
    with pytest.raises(UserError, match="preset"):
        ConfounderAwareDenoiser("huge", "scm", vocab, compound_dim=D)
    with pytest.raises(UserError, match="vocabulary"):
        ConfounderAwareDenoiser("tiny", "scm", None, compound_dim=D)
    m = ConfounderAwareDenoiser("tiny", "scm", vocab, compound_dim=D)
    x, t, c, conf = _inputs(vocab)
    with pytest.raises(UserError, match=r"\(B, 12\)"):
        m(x, t, torch.randn(3, D + 1), confounders=conf)
    bad = conf.clone()
    bad[0, 0] = 99
    with pytest.raises(UserError, match="out of range for source"):
        m(x, t, c, confounders=bad)


def _first_level_output(model, x, t, c, conf, drop=None):
    """Output of the U-Net's first (attention-free) down level, captured by a forward hook."""
    seen = {}
    handle = model.unet.down_blocks[0].register_forward_hook(lambda mod, args, out: seen.update(out=out[0]))
    with torch.no_grad():
        model(x, t, c, confounders=conf, drop_mask=drop)
    handle.remove()
    return seen["out"]


@pytest.mark.parametrize("kind", ["scm", "scm-free"])
def test_global_condition_reaches_the_attention_free_level(vocab, kind, tmp_path):
    torch.manual_seed(4)
    x, t, c, conf = _inputs(vocab)
    other = torch.randn_like(c)
    plain = ConfounderAwareDenoiser("tiny", kind, vocab, compound_dim=D, compound_tokens=2).eval()
    # cross-attention only: the first level cannot see the compound
    torch.testing.assert_close(_first_level_output(plain, x, t, c, conf), _first_level_output(plain, x, t, other, conf))
    model = ConfounderAwareDenoiser("tiny", kind, vocab, compound_dim=D, compound_tokens=2, global_condition=True).eval()
    assert not torch.allclose(_first_level_output(model, x, t, c, conf), _first_level_output(model, x, t, other, conf))
    # the projection's input is the mean of the compound tokens, then the four confounder tokens (scm)
    captured = {}
    handle = model.unet.class_embedding.register_forward_hook(lambda mod, args, out: captured.update(arg=args[0]))
    with torch.no_grad():
        model(x, t, c, confounders=conf)
        tokens, _ = model.condition(c, confounders=conf)
    handle.remove()
    expected = tokens[:, :2].mean(1)
    if kind == "scm":
        expected = torch.cat([expected] + [model.confounder_embed[k].weight[conf[:, k]] for k in range(4)], dim=1)
    torch.testing.assert_close(captured["arg"], expected)
    # a dropped compound is the null token on both paths: the output no longer depends on the compound
    drop = torch.tensor([True, False, True])
    with torch.no_grad():
        a, b = model(x, t, c, confounders=conf, drop_mask=drop), model(x, t, other, confounders=conf, drop_mask=drop)
    torch.testing.assert_close(a[[0, 2]], b[[0, 2]])
    # the flag travels in the saved U-Net config
    model.save_pretrained(tmp_path / kind)
    loaded = ConfounderAwareDenoiser.from_pretrained(tmp_path / kind)
    assert loaded.global_condition and not plain.global_condition
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, c, confounders=conf), model(x, t, c, confounders=conf), rtol=0, atol=0)

"""ChannelGroupAutoencoder against a manual per-group reference, from_pretrained round trip, the small-VAE
training loop, and `cpldm fit-vae` on a tiny lake."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cpldm_core.autoencoder import (ChannelGroupAutoencoder, build_vae, check_groups, fit_small_vae,
                                    group_samples)
from cpldm_core.errors import UserError
from test_ingest import no_network  # noqa: F401  (fixture: networking blocked, HF_HUB_OFFLINE unset)


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(0)
    vae = build_vae("tiny", sample_size=16)
    vae.register_to_config(scaling_factor=0.5)
    return vae.eval()


def test_encode_decode_match_manual_groups(tiny_vae):
    model = ChannelGroupAutoencoder(tiny_vae, groups=((0, 1, 2), (2, 3, 4)))
    x = torch.rand(2, 5, 16, 16) * 2 - 1
    z = model.encode(x)
    assert z.shape == (2, 8, 2, 2)
    with torch.no_grad():
        z0 = tiny_vae.encode(x[:, [0, 1, 2]]).latent_dist.mode() * 0.5
        z1 = tiny_vae.encode(x[:, [2, 3, 4]]).latent_dist.mode() * 0.5
        torch.testing.assert_close(z, torch.cat([z0, z1], 1))
        d0 = tiny_vae.decode(z0 / 0.5).sample
        d1 = tiny_vae.decode(z1 / 0.5).sample
    rec = model.decode(z)
    assert rec.shape == (2, 5, 16, 16)
    torch.testing.assert_close(rec[:, 0], d0[:, 0].clamp(-1, 1))
    torch.testing.assert_close(rec[:, 2], ((d0[:, 2] + d1[:, 0]) / 2).clamp(-1, 1))   # shared channel: mean
    torch.testing.assert_close(rec[:, 4], d1[:, 2].clamp(-1, 1))
    first = ChannelGroupAutoencoder(tiny_vae, merge="first").decode(z)
    torch.testing.assert_close(first[:, 2], d0[:, 2].clamp(-1, 1))
    # another grouping reorders the latent channels accordingly
    other = ChannelGroupAutoencoder(tiny_vae, groups=((2, 3, 4), (0, 1, 2))).encode(x)
    torch.testing.assert_close(other, torch.cat([z1, z0], 1))


def test_from_pretrained_subfolder_round_trip(tiny_vae, tmp_path):
    tiny_vae.save_pretrained(tmp_path / "repo" / "vae")
    loaded = ChannelGroupAutoencoder.from_pretrained(str(tmp_path / "repo"), subfolder="vae")
    x = torch.rand(1, 5, 16, 16) * 2 - 1
    torch.testing.assert_close(loaded.encode(x), ChannelGroupAutoencoder(tiny_vae).encode(x))
    assert loaded.scaling_factor == 0.5
    with pytest.raises(UserError, match="cannot load an AutoencoderKL"):
        ChannelGroupAutoencoder.from_pretrained(str(tmp_path / "nothing"))


def test_group_validation_and_samples():
    with pytest.raises(UserError):
        check_groups(((0, 1, 2), (2, 3, 3)))
    with pytest.raises(UserError):
        check_groups(((0, 1, 2), (1, 2, 3)))   # channel 4 never encoded
    x = np.arange(2 * 5 * 2 * 2, dtype=np.float32).reshape(2, 5, 2, 2)
    s = group_samples(x)
    assert s.shape == (4, 3, 2, 2)
    np.testing.assert_array_equal(s[2], x[0, [2, 3, 4]])


def test_fit_small_vae_learns_and_sets_scaling():
    torch.set_num_threads(1)   # several torch threads on a busy 2-core machine spin instead of computing
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:16, 0:16] / 16.0
    # smooth structured samples: random plane waves
    samples = np.stack([np.stack([np.sin(2 * np.pi * (a * xx + b * yy) + p) for a, b, p in rng.uniform(0, 2, (3, 3))])
                        for _ in range(32)]).astype(np.float32) * 0.8
    torch.manual_seed(0)
    vae = build_vae("tiny", sample_size=16)
    x = torch.from_numpy(samples)

    def recon_mse():
        with torch.no_grad():
            return float(((vae.decode(vae.encode(x).latent_dist.mode()).sample - x) ** 2).mean())

    vae.eval()
    before = recon_mse()
    history = fit_small_vae(vae, samples, steps=40, batch_size=8, lr=3e-3, kl_weight=1e-6, seed=0)
    after = recon_mse()
    assert len(history) == 40 and after < 0.7 * before
    with torch.no_grad():
        std = float(vae.encode(x).latent_dist.mode().std())
    assert vae.config.scaling_factor == pytest.approx(1.0 / std, rel=1e-4)


def test_fit_vae_stage_writes_diffusers_model(local_lake, ray_cluster, request, capsys):
    from cpldm_core.autoencoder import FIT_VAE_PRESETS
    from cpldm_core.load_data import CatalogConfig
    from pipelines import catalog, fit_vae
    from test_catalog import build_raw_lake

    build_raw_lake(local_lake)
    catalog.run(local_lake, CatalogConfig(unseen_compound_fraction=0.0, heldout_batch_fraction=0.0))
    cfg = FIT_VAE_PRESETS["tiny"]
    summary = fit_vae.run(local_lake, cfg)
    base = f"vae/{cfg.vae_id}"
    config = local_lake.read_json(f"{base}/config.json")
    assert config["_class_name"] == "AutoencoderKL" and config["latent_channels"] == 4
    assert config["scaling_factor"] == pytest.approx(summary["scaling_factor"])
    assert len(config["block_out_channels"]) == 4                      # 8x downsampling
    model = ChannelGroupAutoencoder.from_pretrained(local_lake.fs_path(base))
    assert model.encode(torch.zeros(1, 5, 32, 32)).shape == (1, 8, 4, 4)
    for png in ("reconstruction.png", "reconstruction_error.png"):
        assert local_lake.read_bytes(f"{base}/{png}")[:8] == b"\x89PNG\r\n\x1a\n"
    history = local_lake.read_json(f"{base}/history.json")
    assert len(history) == cfg.steps
    norm = local_lake.read_json(f"{base}/normalisation.json")
    assert len(norm["low"]) == 5 and all(h > lo for h, lo in zip(norm["high"], norm["low"]))
    assert json.loads(json.dumps(local_lake.read_json(f"{base}/fit/config.json")))["config"]["vae_id"] == cfg.vae_id
    again = fit_vae.run(local_lake, cfg)
    assert again["skipped"] and again["vae_id"] == cfg.vae_id
    # a forced refit (in a Ray worker whose global torch RNG has moved on) gives the same weights, byte for byte
    weights = local_lake.read_bytes(f"{base}/diffusion_pytorch_model.safetensors")
    refit = fit_vae.run(local_lake, cfg, force=True)
    assert not refit.get("skipped") and refit["final_mse"] == summary["final_mse"]
    assert local_lake.read_bytes(f"{base}/diffusion_pytorch_model.safetensors") == weights

    # its VaeModel record: the science config without resources; a rerun with other resources is the same VAE,
    # with another science field it is refused, naming the field
    from dataclasses import replace
    from storage_schemas.artifacts import VaeModel, read_record
    record = read_record(local_lake, base, VaeModel)
    assert record.id == cfg.vae_id and record.origin == "fit-vae" and record.fingerprint == summary["fingerprint"]
    assert record.config["steps"] == cfg.steps and "num_cpus" not in record.config
    assert record.resources == {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus}
    assert record.scaling_factor == pytest.approx(summary["scaling_factor"])
    assert fit_vae.run(local_lake, replace(cfg, num_cpus=2.0))["skipped"]
    with pytest.raises(UserError, match=r"other science settings \(config.steps differ\).*--force"):
        fit_vae.run(local_lake, replace(cfg, steps=cfg.steps + 1))

    # `cpldm ingest` with no preset and no --vae after `fit-vae --preset tiny` uses the lake's only VAE; a VAE name
    # the lake lacks fails in one line listing the lake's VAEs. Networking is blocked and HF_HUB_OFFLINE unset.
    from pipelines import cli
    attempts = request.getfixturevalue("no_network")
    capsys.readouterr()
    small = ["--set", "crop_size=16", "--set", "stats_sites=4", "--set", "rows_per_shard=4", "--set", "subset=all"]
    assert cli.main(["--lake", local_lake.uri, "ingest", *small, "--max-plates", "1"]) == 0
    out = capsys.readouterr().out
    done = json.loads(out[out.index("{"):])
    assert done["vae_id"] == cfg.vae_id and done["units_written"] == 1
    assert cli.main(["--lake", local_lake.uri, "ingest", "--vae", "fitted-small", *small]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "no VAE 'fitted-small'" in err[0] and f"(it holds {cfg.vae_id})" in err[0]
    assert attempts == []

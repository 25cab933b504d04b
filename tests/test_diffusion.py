"""Noise schedule, v-prediction loss and seeded samplers, against diffusers as the reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cpldm_core.configuration import load_config
from cpldm_core.denoiser import ConfounderAwareDenoiser, ConfounderVocab
from cpldm_core.diffusion import (TRAIN_PRESETS, ScheduleConfig, TrainConfig, add_noise, ema_decay_at, lr_at,
                                  make_scheduler, min_snr_weights, sample, v_prediction_loss, v_target)
from cpldm_core.errors import UserError

D = 8


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    vocab = ConfounderVocab.fit(["source_1", "source_2"], ["b1", "b2"], ["A01", "B02"])
    return ConfounderAwareDenoiser("tiny", "scm", vocab, compound_dim=D).eval()


def test_schedule_is_the_papers():
    s = make_scheduler("ddpm")
    assert s.config.beta_schedule == "scaled_linear" and s.config.prediction_type == "v_prediction"
    assert s.config.num_train_timesteps == 1000 and s.config.clip_sample is False
    # scaled-linear: betas = linspace(sqrt(0.0015), sqrt(0.0205), 1000) ** 2 (diffusers, LDM convention)
    ref = np.linspace(0.0015 ** 0.5, 0.0205 ** 0.5, 1000) ** 2
    np.testing.assert_allclose(s.betas.numpy(), ref, rtol=1e-5)
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), np.cumprod(1 - ref), rtol=1e-4)
    for kind, cls in (("ddim", "DDIMScheduler"), ("dpm++", "DPMSolverMultistepScheduler")):
        other = make_scheduler(kind, ScheduleConfig(beta_end=0.02).to_dict())
        assert type(other).__name__ == cls and other.config.prediction_type == "v_prediction"
        assert other.config.beta_end == 0.02
    assert make_scheduler("dpm++").config.algorithm_type == "dpmsolver++"
    with pytest.raises(UserError, match="sampler"):
        make_scheduler("euler")


def test_noise_and_velocity_match_diffusers():
    s = make_scheduler("ddpm")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 8, 4, 4, generator=g), torch.randn(4, 8, 4, 4, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(add_noise(s.alphas_cumprod, x0, eps, t), s.add_noise(x0, eps, t))
    torch.testing.assert_close(v_target(s.alphas_cumprod, x0, eps, t), s.get_velocity(x0, eps, t))


def test_loss_is_mse_to_the_true_velocity(model):
    s = make_scheduler("ddpm")
    x0 = torch.randn(3, 8, 8, 8)
    c = torch.randn(3, D)
    conf = model.vocab.encode(["source_1"] * 3, ["b1", "b2", "b1"], ["A01"] * 3)
    loss = v_prediction_loss(model, x0, c, confounders=conf, scheduler=s, generator=torch.Generator().manual_seed(5))
    # the same draws by hand: timesteps first, then noise
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, 1000, (3,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        pred = model(s.add_noise(x0, eps, t), t, c, confounders=conf)
    ref = ((pred - s.get_velocity(x0, eps, t)) ** 2).mean()
    torch.testing.assert_close(loss.detach(), ref)



def test_compound_feature_dropout_is_inverted_dropout_on_the_input(model):
    s = make_scheduler("ddpm")
    x0, c = torch.randn(3, 8, 8, 8), torch.rand(3, D).round()     # 0/1, like fingerprint bits
    conf = model.vocab.encode(["source_1"] * 3, ["b1", "b2", "b1"], ["A01"] * 3)
    loss = v_prediction_loss(model, x0, c, confounders=conf, scheduler=s, compound_feature_dropout=0.5,
                             generator=torch.Generator().manual_seed(7))
    # by hand: timesteps, noise, then one keep/zero draw per input feature from the same generator
    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, 1000, (3,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    keep = torch.rand(c.shape, generator=g) >= 0.5
    assert 0 < int(keep.sum()) < keep.numel()
    with torch.no_grad():
        pred = model(s.add_noise(x0, eps, t), t, c * keep / 0.5, confounders=conf)
        unmasked = model(s.add_noise(x0, eps, t), t, c, confounders=conf)
    target = s.get_velocity(x0, eps, t)
    torch.testing.assert_close(loss.detach(), ((pred - target) ** 2).mean())
    # the zeroed features reach the prediction (small at initialisation, but not nothing)
    assert not torch.allclose(pred, unmasked, rtol=0, atol=1e-7)

@pytest.mark.parametrize("kind", ["ddpm", "ddim", "dpm++"])
def test_sample_depends_on_each_images_own_seed_only(model, kind):
    s = make_scheduler(kind)
    c = torch.randn(4, D, generator=torch.Generator().manual_seed(1))
    conf = model.vocab.encode(["source_1", "source_2", "source_1", "source_2"], ["b1", "b2", "b1", "b2"],
                              ["A01", "B02", "B02", "A01"])
    full = sample(model, s, 4, 2.0, c, confounders=conf, seeds=[11, 12, 13, 14])
    assert full.shape == (4, 8, 8, 8) and full.dtype == torch.float32 and torch.isfinite(full).all()
    part = sample(model, s, 4, 2.0, c[[2, 0]], confounders=conf[[2, 0]], seeds=[13, 11])
    torch.testing.assert_close(part, full[[2, 0]], rtol=1e-5, atol=1e-5)
    again = sample(model, s, 4, 2.0, c[:1], confounders=conf[:1], seeds=[11])
    torch.testing.assert_close(again, full[:1], rtol=1e-5, atol=1e-5)
    other_seed = sample(model, s, 4, 2.0, c[:1], confounders=conf[:1], seeds=[99])
    assert not torch.allclose(other_seed, full[:1])


def test_guidance_is_the_cfg_combination(model):
    """One DDIM step with guidance s equals uncond + s * (cond - uncond) of the model's two predictions."""
    s = make_scheduler("ddim")
    c = torch.randn(2, D)
    conf = model.vocab.encode(["source_1"] * 2, ["b1"] * 2, ["A01"] * 2)
    out = sample(model, s, 1, 3.0, c, confounders=conf, seeds=[1, 2])
    sched = make_scheduler("ddim")
    sched.set_timesteps(1)
    t = sched.timesteps[0]
    x = torch.stack([torch.randn(8, 8, 8, generator=torch.Generator().manual_seed(k)) for k in (1, 2)])
    tt = torch.full((2,), int(t))
    with torch.no_grad():
        v_c = model(x, tt, c, confounders=conf)
        v_u = model(x, tt, c, confounders=conf, drop_mask=torch.ones(2, dtype=torch.bool))
    ref = sched.step(v_u + 3.0 * (v_c - v_u), t, x).prev_sample
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_tiny_model_learns_structured_latents():
    """Plain-torch training (no Ray): the v-loss on latents = compound pattern + noise goes down."""
    torch.manual_seed(0)
    vocab = ConfounderVocab.fit(["s"], ["b"], ["A01"])
    m = ConfounderAwareDenoiser("tiny", "scm-free", vocab, compound_dim=4)
    g = torch.Generator().manual_seed(0)
    patterns = torch.tanh(torch.randn(4, 8, 8, 8, generator=g) * 2)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    s = make_scheduler("ddpm")
    eval_g = 123
    x_eval = patterns.repeat(4, 1, 1, 1)
    c_eval = torch.eye(4).repeat(4, 1)

    def eval_loss():
        with torch.no_grad():
            return float(v_prediction_loss(m, x_eval, c_eval, scheduler=s,
                                           generator=torch.Generator().manual_seed(eval_g)))

    before = eval_loss()
    for _ in range(60):
        idx = torch.randint(0, 4, (16,), generator=g)
        loss = v_prediction_loss(m, patterns[idx] + 0.05 * torch.randn(16, 8, 8, 8, generator=g), torch.eye(4)[idx],
                                 scheduler=s, cond_dropout=0.1, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.7 * before


def test_train_config_presets_and_overrides():
    paper = TRAIN_PRESETS["paper"]
    assert paper.lr == 2.5e-5 and paper.batch_size * paper.workers * paper.grad_accum == 192
    assert paper.unet_preset == "paper" and paper.epochs == 30
    cfg = load_config(TrainConfig, None, ["schedule.beta_end=0.02", "model=scm-free"], base=TRAIN_PRESETS["tiny"])
    assert cfg.schedule.beta_end == 0.02 and cfg.model == "scm-free" and cfg.unet_preset == "tiny"
    with pytest.raises(UserError, match="model"):
        load_config(TrainConfig, None, ["model=other"])
    assert lr_at(0, cfg) == pytest.approx(cfg.lr / cfg.warmup_steps) and lr_at(10_000, cfg) == cfg.lr


def test_min_snr_weights_match_the_naive_formula():
    s = make_scheduler("ddpm")
    t = torch.tensor([0, 1, 50, 200, 500, 800, 999])
    acp = s.alphas_cumprod.double().numpy()
    naive = [min(acp[k] / (1 - acp[k]), 5.0) / (acp[k] / (1 - acp[k]) + 1) for k in t.tolist()]
    np.testing.assert_allclose(min_snr_weights(s.alphas_cumprod, t, 5.0).numpy(), naive, rtol=1e-6)
    # low noise: capped at gamma / (SNR + 1) << 1; pure noise: ~SNR (the v-MSE's x0 weight is SNR + 1)
    w = min_snr_weights(s.alphas_cumprod, t, 5.0)
    assert w[0] < 0.05 and w[-1] < 0.01 and w[3] > w[0]


def test_min_snr_loss_is_the_weighted_per_sample_mse(model):
    s = make_scheduler("ddpm")
    x0, c = torch.randn(4, 8, 8, 8), torch.randn(4, D)
    conf = model.vocab.encode(["source_1"] * 4, ["b1", "b2", "b1", "b2"], ["A01"] * 4)
    loss = v_prediction_loss(model, x0, c, confounders=conf, scheduler=s, snr_gamma=5.0,
                             generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (4,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        pred = model(s.add_noise(x0, eps, t), t, c, confounders=conf)
    per = ((pred - s.get_velocity(x0, eps, t)) ** 2).mean(dim=(1, 2, 3)).double().numpy()
    snr = (s.alphas_cumprod[t] / (1 - s.alphas_cumprod[t])).double().numpy()
    ref = float(np.mean(per * np.minimum(snr, 5.0) / (snr + 1)))
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    plain = v_prediction_loss(model, x0, c, confounders=conf, scheduler=s, generator=torch.Generator().manual_seed(3))
    assert float(plain) == pytest.approx(float(per.mean()), rel=1e-5) and abs(float(plain) - ref) > 1e-3


def test_cosine_lr_schedule_against_the_formula():
    import math
    from dataclasses import replace

    cfg = replace(TRAIN_PRESETS["demo"], lr_schedule="cosine", max_steps=120, warmup_steps=20, lr=1e-3)
    for step in (0, 10, 19):
        assert lr_at(step, cfg) == pytest.approx(1e-3 * (step + 1) / 20)
    for step in (20, 45, 70, 119, 500):
        p = min(1.0, (step - 20) / 100)
        assert lr_at(step, cfg) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * p)), abs=1e-12)
    assert lr_at(70, cfg) == pytest.approx(5e-4) and lr_at(119, cfg) < 1e-5
    assert lr_at(119, TRAIN_PRESETS["demo"]) == TRAIN_PRESETS["demo"].lr   # default stays constant
    with pytest.raises(UserError, match="cosine"):
        TrainConfig(max_steps=0, epochs=2.0, lr_schedule="cosine")
    with pytest.raises(UserError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear")


def test_ema_warm_up_forgets_the_initial_weights_of_a_short_run():
    """Share of the random initial weights left in the EMA after 960 steps (exp_model's 4x arm): a naive loop
    over the lerp the training loop applies. Fixed 0.999 keeps 0.999^960 = 38%; the warm-up keeps ~0."""
    def initial_share(decays):
        share = 1.0
        for d in decays:
            share *= d             # ema <- d * ema + (1 - d) * weights
        return share

    fixed = initial_share([0.999] * 960)
    warmed = initial_share([ema_decay_at(step, 0.999) for step in range(960)])
    assert fixed == pytest.approx(0.999 ** 960) and fixed > 0.3
    assert warmed < 1e-3
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1) and ema_decay_at(10**6, 0.999) == 0.999


def test_sample_stream_positions_against_a_naive_enumeration():
    """global_positions/stream_rows against an explicit loop over steps, micro-batches and ranks: the ranks'
    samples tile the stream exactly once, every epoch visits every row once, and a rank resumed at a later step
    continues the sequence an uninterrupted rank follows."""
    from cpldm_core.diffusion import global_positions, stream_rows

    n_rows, batch, world, accum, steps, seed = 23, 4, 3, 2, 9, 7
    naive = {r: [] for r in range(world)}   # rank -> global positions in the order the rank consumes them
    p = 0
    for _step in range(steps):
        for _m in range(accum):
            for r in range(world):
                naive[r] += list(range(p, p + batch))
                p += batch
    for r in range(world):
        local = np.arange(steps * accum * batch)
        got = global_positions(local, rank=r, world=world, batch_size=batch, grad_accum=accum, start_step=0)
        assert got.tolist() == naive[r]
        resumed = global_positions(np.arange((steps - 5) * accum * batch), rank=r, world=world, batch_size=batch,
                                   grad_accum=accum, start_step=5)
        assert resumed.tolist() == naive[r][5 * accum * batch:]
    every = np.sort(np.concatenate([np.asarray(v) for v in naive.values()]))
    assert every.tolist() == list(range(steps * accum * batch * world))
    rows, epochs = stream_rows(every, n_rows, seed)
    assert epochs.tolist() == [q // n_rows for q in every]
    for e in range(int(epochs.max())):             # complete epochs: a permutation of the rows each
        assert sorted(rows[epochs == e].tolist()) == list(range(n_rows))
    assert not np.array_equal(rows[epochs == 0], rows[epochs == 1])   # and a fresh one each time
    again, _ = stream_rows(every[::-1].copy(), n_rows, seed)           # position -> row does not depend on
    assert again[::-1].tolist() == rows.tolist()                       # which batch asks for it
    assert stream_rows(every, n_rows, seed + 1)[0].tolist() != rows.tolist()

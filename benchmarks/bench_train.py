"""Training throughput: samples/s per worker for the tiny and small U-Nets on CPU (and the paper preset on GPU).

Two measurements:
- ``step``: the bare training step (v-loss forward + backward + AdamW) in this process, no Ray, one thread per
  worker as a Ray Train worker gets; the ceiling for a worker;
- ``ray``: ``cpldm train`` end to end (Ray Data streaming from Zarr, DDP over gloo, checkpoints) on a
  synthetic lake, median of the per-step samples/s each rank logs; 1 vs 2 workers in the same run.

With a CUDA device the paper preset's step is also measured in bf16, with the fraction of the GPU's peak bf16
FLOP/s it reaches (FLOPs counted by ``torch.utils.flop_counter``).

``python -m benchmarks.bench_train [--quick]`` prints a markdown table.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import result_row

#: Dense bf16 peak of an H100 SXM (NVIDIA H100 datasheet, without sparsity), FLOP/s.
H100_BF16_PEAK = 989e12


def make_train_step(preset: str, size: int, batch: int, device: str = "cpu", bf16: bool = False, wrap=None):
    """``(step, model)``: ``step()`` is one training step (v-loss forward + backward + AdamW) on a fixed random
    batch of ``(batch, 8, size, size)`` latents; ``wrap`` (e.g. DDP) wraps the model the loss is computed on.
    ``model`` is the unwrapped denoiser (for counting parameters)."""
    import torch

    from cpldm_core.denoiser import ConfounderAwareDenoiser, ConfounderVocab
    from cpldm_core.diffusion import make_scheduler, v_prediction_loss

    torch.manual_seed(0)
    vocab = ConfounderVocab.fit(["source_1", "source_2"], ["b1", "b2"], ["A01", "B02"])
    model = ConfounderAwareDenoiser(preset, "scm", vocab, compound_dim=2048, compound_tokens=4).to(device)
    net = wrap(model) if wrap is not None else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = make_scheduler("ddpm")
    x = torch.randn(batch, 8, size, size, device=device)
    c = (torch.rand(batch, 2048, device=device) < 0.05).float()
    conf = vocab.encode(["source_1"] * batch, ["b1"] * batch, ["A01"] * batch).to(device)

    def step():
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            loss = v_prediction_loss(net, x, c, confounders=conf, scheduler=sched, cond_dropout=0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model


def bench_step(preset: str, size: int, batch: int, steps: int, device: str = "cpu", bf16: bool = False) -> dict:
    import torch

    from cpldm_core.denoiser import count_parameters

    step, model = make_train_step(preset, size, batch, device, bf16)
    for _ in range(2):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    out = {"samples_per_s": batch * steps / dt, "params_m": count_parameters(model) / 1e6}
    if device.startswith("cuda"):
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            step()
        out["flops_per_step"] = fc.get_total_flops()
        out["flop_fraction"] = fc.get_total_flops() * steps / dt / H100_BF16_PEAK
    return out


def _load_lake_helper():
    path = Path(__file__).resolve().parents[1] / "tests" / "test_train.py"
    spec = importlib.util.spec_from_file_location("_train_lake", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # dataclasses look their module up while the class is created
    spec.loader.exec_module(mod)
    return mod.write_training_lake


def bench_ray(workers: int, steps: int) -> dict:
    from pipelines import train
    from pipelines.ray_runtime import ensure_ray
    from pipelines.storage import Lake

    ensure_ray()
    write = _load_lake_helper()
    with tempfile.TemporaryDirectory() as tmp:
        lake = Lake(f"{tmp}/lake")
        lake.init()
        write(lake, sites_per_combo=12)
        cfg = train.load_train_config("tiny", overrides={"workers": workers, "cpus_per_worker": 0.5,
                                                         "data_cpus": 0.25, "max_steps": steps,
                                                         "checkpoint_every": steps, "val_every": 0})
        t0 = time.perf_counter()
        summary = train.run(lake, cfg, run=f"bench-{workers}")
        wall = time.perf_counter() - t0
        hist = train.read_history(lake, f"bench-{workers}").query("split == 'train'")
        # skip the first steps (warm-up, first epoch's pipeline start)
        sps = float(hist["samples_per_s"].iloc[min(5, len(hist) - 1):].median())
    return {"samples_per_s": sps, "wall_s": wall, "steps": summary["steps"]}


def run(quick: bool = False) -> list[dict]:
    import torch

    torch.set_num_threads(1)   # one Ray Train CPU worker = one core
    rows = []
    for preset, size, batch, steps in (("tiny", 8, 16, 10 if quick else 40), ("small", 16, 16, 3 if quick else 15)):
        r = bench_step(preset, size, batch, steps)
        rows.append(result_row(f"train_step_{preset}_cpu", "samples/s per worker", r["samples_per_s"], "samples/s",
                               f"{preset} U-Net ({r['params_m']:.2f} M params), {size}x{size} latents, batch {batch}, "
                               "1 thread, no Ray"))
        if preset == "small":   # the largest U-Net measured on CPUs is the one `cpldm cost` prices
            rows[-1].update(cost_stage="train", cost_per="vcpu")
            # issue 18's lever "bf16 autocast on CPU where it is faster": the same step under CPU autocast
            # (training ignores TrainConfig.bf16 on CPU; this says whether it should not)
            b = bench_step(preset, size, batch, steps, bf16=True)
            rows.append(result_row(f"train_step_{preset}_cpu_bf16", "samples/s per worker", b["samples_per_s"],
                                   "samples/s", f"{preset} U-Net, {size}x{size} latents, batch {batch}, 1 thread, "
                                   "torch.autocast(cpu, bfloat16), no Ray"))
            rows.append(result_row(f"train_step_{preset}_cpu_bf16_speedup", "bf16 / fp32 samples/s",
                                   b["samples_per_s"] / r["samples_per_s"], "ratio", "same run"))
    if torch.cuda.is_available():
        r = bench_step("paper", 48, 48, 10, device="cuda", bf16=True)
        rows.append(result_row("train_step_paper_gpu_bf16", "samples/s per GPU", r["samples_per_s"], "samples/s",
                               f"paper U-Net ({r['params_m']:.0f} M params), 48x48, batch 48, bf16; "
                               f"{r['flop_fraction']:.1%} of H100 dense bf16 peak"))
        rows[-1].update(cost_stage="train", cost_per="gpu")
    ray_steps = 20 if quick else 60
    results = {w: bench_ray(w, ray_steps) for w in ((2,) if quick else (1, 2))}
    for w, r in results.items():
        rows.append(result_row(f"train_ray_tiny_{w}w", "samples/s per worker", r["samples_per_s"], "samples/s",
                               f"cpldm train tiny, {w} worker(s) x 0.5 CPU, {r['steps']} steps, "
                               f"wall {r['wall_s']:.0f} s incl. Ray Train start"))
    if 1 in results and 2 in results:
        rows.append(result_row("train_ray_tiny_scaling", "2-worker / 1-worker total throughput",
                               2 * results[2]["samples_per_s"] / results[1]["samples_per_s"], "ratio", "same run"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    rows = run(quick=args.quick)
    print("| benchmark | metric | value | unit | peak MB | notes |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['benchmark']} | {r['metric']} | {r['value']:.3g} | {r['unit']} | {r['peak_mem_mb']:.0f} | "
              f"{r['notes']} |")


if __name__ == "__main__":
    main()

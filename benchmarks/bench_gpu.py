"""GPU figures in one run (``benchmarks/gpu_check.sh``): VAE encode, U-Net train step, compiled sampling + decode,
2-process DDP.

On a CUDA machine (the paper's shapes, bf16):

- **encode**: SDXL-VAE-shaped ``AutoencoderKL`` (``VAE_ARCHITECTURES["sdxl"]``, random weights: no hub
  download) through :class:`~cpldm_core.autoencoder.ChannelGroupAutoencoder`, 5-channel 384 px crops (2 groups
  per crop), bf16 weights -> crops/s per GPU (what ``cpldm ingest --preset paper`` asks of each GPU);
- **train**: the ``paper`` U-Net preset (48x48x8 latents, batch 48 per GPU as in METHOD.md), one v-loss step
  with bf16 autocast + AdamW (``bench_train.make_train_step``, the same step bench_train times) -> samples/s
  per GPU, model FLOP/s (FLOPs of one step from ``torch.utils.flop_counter.FlopCounterMode``), and, through the
  harness, the fraction of the GPU's dense bf16 peak (``harness.PEAK_BF16_DENSE_TFLOPS``: 989.4 TFLOP/s for
  H100 SXM and H200, NVIDIA datasheets, dense = without 2:4 sparsity);
- **sample**: :func:`cpldm_core.diffusion.sample` with DPM-Solver++ (20 steps, guidance 1 as in
  ``GenerateConfig``), the U-Net under bf16 autocast and ``torch.compile`` (inductor), then the bf16 VAE
  decode -> images/s per GPU including decode (and each part alone, and the one-off compile time);
- **ddp**: with >= 2 GPUs, the train step in 2 processes over NCCL (``DistributedDataParallel``) -> total
  samples/s and its ratio to one process; with 1 GPU it is skipped (the report says so).

Without CUDA (or ``device="cpu"``) the SAME functions run at tiny shapes on the CPU (tiny VAE at 64 px, tiny
U-Net at 8x8, DDP over gloo, no ``torch.compile``: inductor's C++ build of even the tiny U-Net takes ~2 min and
dynamo's tracing alone 15-50 s on the 2-core VM) so the script is tested in CI; such rows carry no ``cost_stage``: a toy CPU shape must never
price a stage in ``cpldm cost``.

``python -m benchmarks.bench_gpu --report results/gpu.parquet`` renders the RESULTS-ready text of a run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from pipelines.cluster_local import free_port


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What one check runs: network presets, tensor shapes, batch sizes, timed repetitions, compile backend."""

    vae: str                # key of cpldm_core.autoencoder.VAE_ARCHITECTURES
    crop: int               # crop side, px (latent side = crop / 8)
    encode_batch: int
    unet: str               # key of cpldm_core.denoiser.UNET_PRESETS
    latent: int             # latent side of the U-Net (image side = 8 x latent)
    train_batch: int        # per process
    sample_batch: int
    compile_backend: str | None   # torch.compile backend of the sampling denoiser; None = eager
    encode_reps: int
    train_steps: int
    sample_reps: int


#: "cuda": the paper's shapes (METHOD.md: 384 px crops, 48x48 latents, batch 48 per GPU); "cpu": CI-sized.
SHAPES = {
    "cuda": Shapes(vae="sdxl", crop=384, encode_batch=32, unet="paper", latent=48, train_batch=48,
                   sample_batch=32, compile_backend="inductor", encode_reps=10, train_steps=20, sample_reps=3),
    "cpu": Shapes(vae="tiny", crop=64, encode_batch=4, unet="tiny", latent=8, train_batch=4,
                  sample_batch=4, compile_backend=None, encode_reps=2, train_steps=2, sample_reps=1),
}

SAMPLER, SAMPLER_STEPS = "dpm++", 20


def _sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, reps: int, device: str) -> float:
    """Seconds for ``reps`` calls of ``fn`` (device synchronised before and after)."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return time.perf_counter() - t0


def _peak_gpu_mb(device: str) -> float | None:
    import torch
    return torch.cuda.max_memory_allocated() / 2 ** 20 if device.startswith("cuda") else None


def _autoencoder(shapes: Shapes, device: str):
    """The channel-group autoencoder of ``shapes.vae`` (random weights), bf16 on ``device``, eval mode."""
    import torch

    from cpldm_core.autoencoder import ChannelGroupAutoencoder, build_vae

    torch.manual_seed(0)
    vae = build_vae(shapes.vae, sample_size=shapes.crop).to(device=device, dtype=torch.bfloat16).eval()
    return ChannelGroupAutoencoder(vae)


def measure_encode(shapes: Shapes, device: str) -> dict:
    """Crops/s of ``ChannelGroupAutoencoder.encode`` on ``(encode_batch, 5, crop, crop)`` crops in [-1, 1]."""
    import torch

    ae = _autoencoder(shapes, device)
    x = torch.rand(shapes.encode_batch, 5, shapes.crop, shapes.crop, device=device) * 2 - 1
    ae.encode(x)   # warm-up: cuDNN algorithm choice
    seconds = _timed(lambda: ae.encode(x), shapes.encode_reps, device)
    return {"crops_per_s": shapes.encode_batch * shapes.encode_reps / seconds, "peak_gpu_mb": _peak_gpu_mb(device)}


def measure_train(shapes: Shapes, device: str) -> dict:
    """Samples/s and FLOPs of one bf16 train step of ``shapes.unet`` (the step bench_train times)."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.bench_train import make_train_step
    from cpldm_core.denoiser import count_parameters

    step, model = make_train_step(shapes.unet, shapes.latent, shapes.train_batch, device, bf16=True)
    for _ in range(2):
        step()
    seconds = _timed(step, shapes.train_steps, device)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    return {"samples_per_s": shapes.train_batch * shapes.train_steps / seconds, "flops_per_step": flops,
            "flop_per_s": flops * shapes.train_steps / seconds, "params_m": count_parameters(model) / 1e6,
            "peak_gpu_mb": _peak_gpu_mb(device)}


def measure_sampling(shapes: Shapes, device: str) -> dict:
    """Images/s of DPM-Solver++-20 sampling (compiled U-Net, bf16 autocast) followed by the bf16 VAE decode."""
    import torch

    from cpldm_core.denoiser import ConfounderAwareDenoiser, ConfounderVocab
    from cpldm_core.diffusion import make_scheduler, sample

    torch.manual_seed(0)
    vocab = ConfounderVocab.fit(["source_1", "source_2"], ["b1", "b2"], ["A01", "B02"])
    model = ConfounderAwareDenoiser(shapes.unet, "scm", vocab, compound_dim=2048, compound_tokens=4,
                                    sample_size=shapes.latent).to(device).eval()
    net = {"model": torch.compile(model, backend=shapes.compile_backend) if shapes.compile_backend else model}
    ae = _autoencoder(shapes, device)
    scheduler = make_scheduler(SAMPLER)
    b = shapes.sample_batch
    compound = (torch.rand(b, 2048) < 0.05).float()
    confounders = vocab.encode(["source_1"] * b, ["b1"] * b, ["A01"] * b)
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    latents = {}

    def draw():
        with autocast:
            latents["z"] = sample(net["model"], scheduler, SAMPLER_STEPS, 1.0, compound, None, confounders,
                                  seeds=list(range(b)), latent_shape=(8, shapes.latent, shapes.latent))

    def decode():
        ae.decode(latents["z"])

    compile_error = ""
    try:
        compile_s = _timed(draw, 1, device)   # the first call compiles
    except Exception as exc:  # noqa: BLE001  (the one prepared GPU run must still give eager figures)
        compile_error = f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); eager"
        net["model"] = model
        compile_s = _timed(draw, 1, device)
    decode()
    sample_s = _timed(draw, shapes.sample_reps, device)
    decode_s = _timed(decode, shapes.sample_reps, device)
    n = b * shapes.sample_reps
    return {"images_per_s": n / (sample_s + decode_s), "sampling_images_per_s": n / sample_s,
            "decode_images_per_s": n / decode_s, "compile_s": compile_s, "peak_gpu_mb": _peak_gpu_mb(device),
            "compile_error": compile_error}


# ---------------------------------------------------------------------------------------------- 2-process DDP
def _ddp_worker(rank: int, world: int, port: int, shapes: Shapes, use_cuda: bool, out_dir: str) -> None:
    """One DDP rank: the same train step wrapped in ``DistributedDataParallel``; writes ``rank<k>.json``."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from benchmarks.bench_train import make_train_step

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if use_cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
    device = f"cuda:{rank}" if use_cuda else "cpu"
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    try:
        wrap = lambda m: DistributedDataParallel(m, device_ids=[rank] if use_cuda else None)  # noqa: E731
        step, _ = make_train_step(shapes.unet, shapes.latent, shapes.train_batch, device, bf16=True, wrap=wrap)
        for _ in range(2):
            step()
        _sync(device)
        dist.barrier()
        seconds = _timed(step, shapes.train_steps, device)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"seconds": seconds}))
    finally:
        dist.destroy_process_group()


def measure_ddp(shapes: Shapes, use_cuda: bool, world: int = 2) -> dict:
    """Total samples/s of ``world`` DDP processes (NCCL on GPUs, gloo on CPU), each with its own batch."""
    import torch.multiprocessing as mp

    if not use_cuda:   # gloo picks an interface from the host name: keep it on loopback
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_ddp_worker, args=(world, free_port(), shapes, use_cuda, out_dir), nprocs=world, join=True)
        slowest = max(json.loads(Path(out_dir, f"rank{r}.json").read_text())["seconds"] for r in range(world))
    return {"samples_per_s": world * shapes.train_batch * shapes.train_steps / slowest, "world": world}


# ---------------------------------------------------------------------------------------------- harness entry
def run(quick: bool, device: str = "auto", **overrides) -> list[dict]:
    """Figures of one check; ``device`` "auto" (CUDA when present), "cuda" or "cpu"; ``overrides`` replace
    fields of the :data:`SHAPES` entry (e.g. ``train_steps=5``). ``quick`` halves the timed repetitions."""
    import torch

    from benchmarks import harness

    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but torch sees no CUDA device")
    device = "cuda:0" if use_cuda else "cpu"
    if not use_cuda:   # figures per process of one core, as the DDP ranks run (and no oversubscription)
        torch.set_num_threads(1)
    shapes = SHAPES["cuda" if use_cuda else "cpu"]
    if quick:
        shapes = dataclasses.replace(shapes, encode_reps=max(1, shapes.encode_reps // 2),
                                     train_steps=max(1, shapes.train_steps // 2),
                                     sample_reps=max(1, shapes.sample_reps // 2))
    shapes = dataclasses.replace(shapes, **overrides)
    label = harness.device_label(device)
    per = "GPU" if use_cuda else "process"
    # only CUDA figures at the paper's shapes may price a stage in `cpldm cost`
    priced = (lambda stage: {"cost_stage": stage, "cost_per": "gpu"}) if use_cuda else (lambda stage: {})
    check = "" if use_cuda else " [CPU check at tiny shapes: not a cost figure]"

    def row(benchmark, metric, value, unit, notes, peak_gpu_mb=None, **extra):
        gpu_mem = f"; peak GPU memory {peak_gpu_mb:,.0f} MiB" if peak_gpu_mb else ""
        return {"benchmark": benchmark, "metric": metric, "value": float(value), "unit": unit,
                "peak_mem_mb": harness.peak_rss_mb(), "notes": notes + gpu_mem + check, "device": label, **extra}

    rows = []
    enc = measure_encode(shapes, device)
    rows.append(row(f"encode {shapes.vae} VAE {shapes.crop}px bf16", f"crops/s per {per}", enc["crops_per_s"],
                    "crops/s", f"5-channel crops, 2 channel groups, batch {shapes.encode_batch}, random weights",
                    enc["peak_gpu_mb"], **priced("ingest")))
    tr = measure_train(shapes, device)
    bench = f"train step {shapes.unet} U-Net {shapes.latent}x{shapes.latent} bf16"
    rows.append(row(bench, f"samples/s per {per}", tr["samples_per_s"], "samples/s",
                    f"{tr['params_m']:.1f} M params, batch {shapes.train_batch}, v-loss + AdamW, bf16 autocast",
                    tr["peak_gpu_mb"], **priced("train")))
    rows.append(row(bench, "model FLOP/s", tr["flop_per_s"] / 1e12, "TFLOP/s",
                    f"{tr['flops_per_step'] / 1e12:.3f} TFLOP per step (FlopCounterMode) x steps/s"))
    sm = measure_sampling(shapes, device)
    bench = f"sample {shapes.unet} U-Net {SAMPLER}-{SAMPLER_STEPS} + {shapes.vae} decode, {8 * shapes.latent}px"
    how = (f"batch {shapes.sample_batch}, bf16 autocast, "
           + (sm["compile_error"] or (f"torch.compile({shapes.compile_backend})" if shapes.compile_backend
                                      else "not compiled")))
    rows.append(row(bench, f"images/s per {per} incl. decode", sm["images_per_s"], "images/s", how,
                    sm["peak_gpu_mb"], **priced("generate")))
    rows.append(row(bench, "sampling only", sm["sampling_images_per_s"], "images/s", how))
    rows.append(row(bench, "decode only", sm["decode_images_per_s"], "images/s", f"batch {shapes.sample_batch}, bf16"))
    rows.append(row(bench, "first call (compile + 1 batch)" if shapes.compile_backend else "first call (1 batch)",
                    sm["compile_s"], "s", "one-off per process"))
    n_gpus = torch.cuda.device_count() if use_cuda else 0
    if not use_cuda or n_gpus >= 2:
        ddp = measure_ddp(shapes, use_cuda)
        backend = "nccl" if use_cuda else "gloo"
        bench = f"DDP train step {shapes.unet} U-Net, 2 processes ({backend})"
        rows.append(row(bench, "samples/s total", ddp["samples_per_s"], "samples/s",
                        f"batch {shapes.train_batch} per process" + ("" if use_cuda else ", 1 thread each")))
        rows.append(row(bench, "2-process / 1-process throughput", ddp["samples_per_s"] / tr["samples_per_s"], "x",
                        "same step, same run"))
    return rows


# ---------------------------------------------------------------------------------------------- report
def report(parquet: Path) -> str:
    """RESULTS-ready markdown of a gpu_check run (machine, date, table, what was skipped and why)."""
    import pyarrow.parquet as pq

    from benchmarks import harness

    rows = pq.read_table(parquet).to_pylist()
    first = rows[0]
    lines = [f"### GPU check ({'quick' if first['quick'] else 'full'}), {first['run_date']}", "",
             f"Machine: {first['machine']}; load average {first.get('load_avg') or '?'}; module wall "
             f"{first['wall_s']:.0f} s.", ""]
    if first["status"] != "ok":
        return "\n".join(lines + [f"**{first['status'].upper()}**:", "", "```", first["notes"].strip(), "```", ""])
    lines.append(harness.markdown_table(rows))
    lines.append("")
    on_cuda = str(first["device"]).startswith("cuda")
    if not on_cuda:
        lines.append("No CUDA device: every figure above is the CPU check at tiny shapes (the same code paths), "
                     "not a GPU figure; `cpldm cost` does not use them.")
    elif not any(r["benchmark"].startswith("DDP") for r in rows):
        lines.append(f"2-process NCCL run: skipped, the machine has one GPU ({first['gpu']}).")
    fractions = [r for r in rows if r["unit"] == "fraction"]
    if fractions:
        lines.append(f"Share of peak: {fractions[0]['value']:.1%} of the dense bf16 peak "
                     "(NVIDIA datasheet figure, harness.PEAK_BF16_DENSE_TFLOPS).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--report", type=Path, metavar="PARQUET", help="print the RESULTS-ready text of a run")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.report:
        if not args.report.is_file():
            sys.exit(f"{args.report}: no such results file (run benchmarks/gpu_check.sh first)")
        print(report(args.report), end="")
        return
    from benchmarks import harness
    harness.module_main(run, ["--quick"] if args.quick else [])


if __name__ == "__main__":
    main()

"""``cpldm cost``: dollars for N images per stage from measured (or supplied) throughput and a price table.

    cpldm cost --images 1e6 --instance p5.48xlarge [--spot] [--throughput FILE|stage=value[/per] ...]
               [--prices FILE] [--stage-instance profile=c7i.48xlarge ...]

Throughput, per stage, first match wins:

1. ``--throughput stage=value[/per]`` (items/s; ``per`` = instance (default), gpu or vcpu), or
   ``--throughput FILE`` (a CSV with columns stage, items_per_s[, per] or a benchmark Parquet file);
2. measured rows in ``benchmarks/results/*.parquet`` (``--results-dir``): rows a benchmark marked with
   ``cost_stage``, else rows of ``bench_<stage>`` in items/s units (images/s, sites/s, samples/s);
   measured figures are converted to per GPU (CUDA rows) or per vCPU (CPU rows) so they can be scaled to the
   priced instance; the table says where each figure came from and on which machine it was measured;
3. the documented defaults of :data:`cpldm_core.cost.DEFAULT_THROUGHPUT` (estimates, flagged as such).

The arithmetic lives in :mod:`cpldm_core.cost`; this module only gathers inputs and prints.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import re
from pathlib import Path

from cpldm_core import cost as cm
from cpldm_core.errors import UserError

#: Where ``python -m benchmarks`` writes its Parquet results in a source checkout.
DEFAULT_RESULTS_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "results"

#: Units accepted as a stage's images throughput when a benchmark row carries no explicit ``cost_stage``.
STAGE_UNITS = {
    "ingest": ("images/s", "sites/s"),
    "train": ("samples/s", "images/s"),
    "generate": ("images/s",),
    "profile": ("images/s", "sites/s"),
}


# ---------------------------------------------------------------- throughput sources
def parse_throughput_item(item: str) -> cm.Throughput:
    """``"ingest=200"``, ``"generate=12.5/gpu"``, ``"profile=0.06/vcpu"`` -> :class:`Throughput`."""
    stage, _, raw = item.partition("=")
    stage = stage.strip()
    if stage not in cm.STAGES:
        raise UserError(f"--throughput {item!r}: stage must be one of {', '.join(cm.STAGES)}")
    value, _, per = raw.partition("/")
    per = per.strip() or "instance"
    if per not in ("instance", "gpu", "vcpu"):
        raise UserError(f"--throughput {item!r}: unit after '/' must be instance, gpu or vcpu")
    try:
        items_per_s = float(value)
    except ValueError:
        raise UserError(f"--throughput {item!r}: {value!r} is not a number (items/s)") from None
    if not (items_per_s > 0 and math.isfinite(items_per_s)):
        raise UserError(f"--throughput {item!r}: throughput must be > 0")
    return cm.Throughput(stage, items_per_s, per, f"--throughput {item}")


def read_throughput_csv(path: Path) -> dict[str, cm.Throughput]:
    """CSV with columns stage, items_per_s[, per]; errors name the line."""
    out = {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(line for line in fh if not line.startswith("#"))
        if not {"stage", "items_per_s"} <= set(reader.fieldnames or ()):
            raise UserError(f"{path}: needs columns stage, items_per_s[, per]")
        for n, row in enumerate(reader, start=1):
            per = (row.get("per") or "instance").strip()
            try:
                tp = parse_throughput_item(f"{row['stage']}={row['items_per_s']}/{per}")
            except UserError as exc:
                raise UserError(f"{path}: data row {n}: {exc}") from None
            out[tp.stage] = cm.Throughput(tp.stage, tp.items_per_s, tp.per, f"{path} row {n}")
    return out


def _gpu_count(machine_gpu: str) -> int:
    match = re.search(r" x(\d+)$", machine_gpu or "")
    return int(match.group(1)) if match else 1


def throughputs_from_rows(rows: list[dict], source: str, want_gpu: bool | dict[str, bool]
                          ) -> dict[str, cm.Throughput]:
    """Pick one throughput per cost stage from benchmark result rows (see module docstring).

    Only rows measured on the kind of device the stage will use are taken (``want_gpu``, per stage or for
    all): a CPU figure scaled to a GPU instance's vCPUs, or the reverse, would be meaningless. Rows with an
    explicit ``cost_stage`` win over unit-matched rows of ``bench_<stage>``, then the highest figure.
    """
    candidates: dict[str, list[tuple[tuple, cm.Throughput]]] = {}
    for r in rows:
        if r.get("status", "ok") != "ok" or not (r.get("value") or 0) > 0:
            continue
        stage = r.get("cost_stage") or ""
        explicit = bool(stage)
        if not explicit:
            if r.get("stage") not in STAGE_UNITS or r.get("unit") not in STAGE_UNITS[r["stage"]]:
                continue
            stage = r["stage"]
        on_gpu = str(r.get("device", "cpu")).startswith("cuda")
        if on_gpu != (want_gpu.get(stage, False) if isinstance(want_gpu, dict) else want_gpu):
            continue
        per = r.get("cost_per") or ""
        value = float(r["value"])
        if per in ("", "instance"):  # the measuring machine as a whole -> per GPU / per vCPU
            per = "gpu" if on_gpu else "vcpu"
            value /= _gpu_count(r.get("gpu", "")) if on_gpu else max(int(r.get("cpu_count") or 1), 1)
        tp = cm.Throughput(stage, value, per, f"measured: {_where(r, source)}")
        rank = (explicit, value)
        candidates.setdefault(stage, []).append((rank, tp))
    return {stage: max(cands, key=lambda c: c[0])[1] for stage, cands in candidates.items()}


def _where(r: dict, source: str = "") -> str:
    """Where a figure comes from: file and row, benchmark / metric, device, machine and date."""
    at = f"{r['_file']} row {r['_row']}" if "_file" in r else source
    return (f"{at} '{r.get('benchmark')} / {r.get('metric')}' = {float(r['value']):,.4g} {r.get('unit', '')} on "
            f"{r.get('device', 'cpu')} [{r.get('machine', '?')}, {r.get('run_date', '?')}]")


def _display(path: Path) -> str:
    """``benchmarks/results/gpu.parquet`` for a file in this checkout, else the path as given."""
    try:
        return str(Path(path).resolve().relative_to(DEFAULT_RESULTS_DIR.parents[1]))
    except ValueError:
        return str(path)


def read_result_rows(paths: list[Path]) -> list[dict]:
    """Rows of benchmark Parquet files, each tagged with its file (``_file``) and 0-based row (``_row``)."""
    import pyarrow.parquet as pq

    rows = []
    for path in paths:
        for i, r in enumerate(pq.read_table(path).to_pylist()):
            r.setdefault("stage", path.stem)
            rows.append({**r, "_file": _display(path), "_row": i})
    return rows


def read_results_parquet(paths: list[Path], want_gpu: bool | dict[str, bool]) -> dict[str, cm.Throughput]:
    """Throughputs from benchmark Parquet files (``benchmarks/results/<stage>.parquet``)."""
    rows = read_result_rows(paths)
    return throughputs_from_rows(rows, "benchmarks/results", want_gpu) if rows else {}


def gather_throughputs(items: list[str], results_dir: Path | None, want_gpu: bool | dict[str, bool]
                       ) -> dict[str, cm.Throughput]:
    """Throughput per stage from --throughput items/files over measured results over defaults.
    ``want_gpu``: whether each stage runs on GPUs on the priced instance (see :func:`throughputs_from_rows`)."""
    chosen = dict(cm.DEFAULT_THROUGHPUT)
    if results_dir is not None and results_dir.is_dir():
        chosen.update(read_results_parquet(sorted(results_dir.glob("*.parquet")), want_gpu))
    for item in items:
        path = Path(item)
        if "=" in item and item.split("=", 1)[0].strip() in cm.STAGES:
            tp = parse_throughput_item(item)
            chosen[tp.stage] = tp
        elif path.suffix == ".parquet" and path.is_file():
            chosen.update(read_results_parquet([path], want_gpu))
        elif path.is_file():
            chosen.update(read_throughput_csv(path))
        else:
            raise UserError(f"--throughput {item!r} is neither stage=value nor an existing CSV/Parquet file")
    return chosen


# ---------------------------------------------------------------- headline estimates
#: bench_ingest's single-process read + decode + normalise of sites (5 LZW TIFFs each): the CPU side of ingest.
READ_BENCHMARK, READ_METRIC = "read+decode+normalise local", "plain loop"
_SITE_PX = re.compile(r"5x(\d+)x(\d+)")

MEASURED_GPU = "measured on GPU"
MEASURED_CPU = "measured on CPU"
FALLBACK_CPU = "FALLBACK: CPU-measured, small networks (no GPU figure)"
FALLBACK_DEFAULT = "FALLBACK: documented default, NOT measured (run benchmarks/gpu_check.sh on a GPU)"


def read_throughput(rows: list[dict]) -> cm.Throughput | None:
    """CPU read+decode+normalise sites/s per vCPU at JUMP's 1,080 px sites, or None when not measured.

    From bench_ingest's plain loop (one process, i.e. one vCPU), scaled by pixel count to 1,080 px sites
    (LZW decode and normalisation are linear in pixels), so the same figure bounds ingest on any instance.
    """
    for r in rows:
        if (r.get("status", "ok") == "ok" and r.get("stage") == "ingest" and r.get("benchmark") == READ_BENCHMARK
                and r.get("metric") == READ_METRIC and (r.get("value") or 0) > 0):
            m = _SITE_PX.search(r.get("notes") or "")
            if m:
                scale = int(m.group(1)) * int(m.group(2)) / cm.JUMP_SITE_PX ** 2
                return cm.Throughput("ingest", float(r["value"]) * scale, "vcpu",
                                     f"measured: {_where(r)}, x {scale:.3g} for {cm.JUMP_SITE_PX} px sites "
                                     "(pixel count; one process = one vCPU)")
    return None


@dataclasses.dataclass(frozen=True)
class Headline:
    """One headline estimate: what, its cost, and how solid the figure under it is (``basis``)."""

    estimate: str
    cost: cm.StageCost
    basis: str


def headline(results_dir: Path | None = DEFAULT_RESULTS_DIR, *, gpu_instance: str = "p5.48xlarge",
             cpu_instance: str = "c7i.48xlarge", prices: str | Path | None = None, spot: bool = False,
             spot_discount: float | None = None, storage_months: float = 1.0) -> list[Headline]:
    """The cost of 1,000,000 generated images and of ingesting cpg0016's compound images (2.67 M sites), each
    on ``gpu_instance`` (GPU figures from gpu_check, else the documented defaults, flagged) and on
    ``cpu_instance`` (CPU-measured figures, flagged as a fallback for the paper's GPU setting).

    Ingest on the GPU instance is the slower of the GPU encode and the CPU read+decode+normalise of the same
    instance's vCPUs (:func:`cpldm_core.cost.bottleneck`), so a fast GPU figure cannot hide a CPU-bound read.
    """
    table = cm.load_prices(prices)
    gpu, cpu = table.get(gpu_instance), table.get(cpu_instance)
    if gpu.gpus <= 0:
        raise UserError(f"--instance {gpu_instance} has no GPU; the headline prices a GPU instance and "
                        f"--cpu-instance {cpu_instance}")
    paths = sorted(results_dir.glob("*.parquet")) if results_dir is not None and results_dir.is_dir() else []
    rows = read_result_rows(paths)
    on_gpu = throughputs_from_rows(rows, "benchmarks/results", want_gpu=True)
    on_cpu = throughputs_from_rows(rows, "benchmarks/results", want_gpu=False)
    read = read_throughput(rows)
    kw = dict(spot=spot, spot_discount=spot_discount, storage_months=storage_months)
    out = []
    scenarios = (("generate", cm.HEADLINE_GENERATED_IMAGES, f"{cm.HEADLINE_GENERATED_IMAGES:,} generated images"),
                 ("ingest", cm.CPG0016_COMPOUND_SITES,
                  f"ingest of cpg0016 compound images ({cm.CPG0016_COMPOUND_TIFFS / 1e6:.1f} M TIFFs = "
                  f"{cm.CPG0016_COMPOUND_SITES / 1e6:.2f} M sites)"))
    for stage, items, what in scenarios:
        measured = stage in on_gpu
        tp = on_gpu.get(stage, cm.DEFAULT_THROUGHPUT[stage])
        if stage == "ingest" and read is not None:
            tp = cm.bottleneck([tp, read], gpu)
        out.append(Headline(what, cm.stage_cost(stage, items, tp, gpu, **kw),
                            MEASURED_GPU if measured else FALLBACK_DEFAULT))
        if stage in on_cpu:
            out.append(Headline(what, cm.stage_cost(stage, items, on_cpu[stage], cpu, **kw),
                                MEASURED_CPU if measured else FALLBACK_CPU))
    return out


def format_headline(items: list[Headline], spot: bool, storage_months: float) -> str:
    """Markdown table of the headline estimates, then the figure each rests on."""
    lines = [f"Headline estimates ({'spot' if spot else 'on-demand'}; compute + S3 requests + "
             f"{storage_months:g} month(s) of storage)", "",
             "| estimate | instance | items | items/s per instance | instance-hours | compute $ | total $ | basis |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for h in items:
        c = h.cost
        lines.append(f"| {h.estimate} | {c.instance} | {c.items:,.0f} | {_num(c.items_per_s_per_instance)} | "
                     f"{c.instance_hours:,.1f} | {c.compute_usd:,.0f} | {c.total_usd:,.0f} | {h.basis} |")
    lines += ["", "Figures they rest on (file, row, machine, date):"]
    lines += [f"- {h.estimate} on {h.cost.instance}: {h.cost.throughput_source}" for h in items]
    return "\n".join(lines)


# ---------------------------------------------------------------- entry points
def estimate(images: float, instance: str, *, spot: bool = False, spot_discount: float | None = None,
             throughput: list[str] | None = None, prices: str | Path | None = None,
             stage_instance: dict[str, str] | None = None, stages: tuple[str, ...] = cm.STAGES,
             train_epochs: float = 1.0, storage_months: float = 1.0,
             results_dir: Path | None = DEFAULT_RESULTS_DIR) -> tuple[list[cm.StageCost], cm.PriceTable]:
    """Python entry of ``cpldm cost``: per-stage costs for ``images`` images (``instance`` for every stage
    unless ``stage_instance`` names another one for a stage)."""
    table = cm.load_prices(prices)
    stage_instance = stage_instance or {}
    unknown = set(stage_instance) - set(cm.STAGES)
    if unknown:
        raise UserError(f"--stage-instance: unknown stage(s) {', '.join(sorted(unknown))}")
    instances = {s: table.get(stage_instance.get(s, instance)) for s in stages}
    # a stage whose default figure is per GPU runs on the GPUs when the instance has some
    want_gpu = {s: instances[s].gpus > 0 and cm.DEFAULT_THROUGHPUT[s].per == "gpu" for s in stages}
    tps = gather_throughputs(list(throughput or []), results_dir, want_gpu)
    costs = cm.estimate_costs(images, instances, tps, stages=stages, spot=spot, spot_discount=spot_discount,
                              train_epochs=train_epochs, storage_months=storage_months)
    return costs, table


def format_costs(costs: list[cm.StageCost], images: float, spot: bool, storage_months: float) -> str:
    """Markdown tables: costs per stage and total, then where each throughput came from."""
    def money(x: float) -> str:
        return f"{x:,.2f}" if x >= 0.01 or x == 0 else f"{x:.2g}"

    head = ("| stage | instance | items | items/s per instance | instance-hours | $/h | compute $ | "
            f"S3 requests $ | stored GiB | storage $ ({storage_months:g} mo) | total $ | $ per 1M images |")
    lines = [head, "|" + "---|" * 12]
    for c in costs:
        lines.append(f"| {c.stage} | {c.instance}{' (spot)' if spot else ''} | {c.items:,.0f} | "
                     f"{_num(c.items_per_s_per_instance)} | {c.instance_hours:,.2f} | {c.hourly_usd:,.4g} | "
                     f"{money(c.compute_usd)} | {money(c.requests_usd)} | {c.stored_gb:,.1f} | "
                     f"{money(c.storage_usd)} | {money(c.total_usd)} | {money(cm.usd_per_million(c, images))} |")
    total = sum(c.total_usd for c in costs)
    lines.append(f"| **total** | | | | {sum(c.instance_hours for c in costs):,.2f} | | "
                 f"{money(sum(c.compute_usd for c in costs))} | {money(sum(c.requests_usd for c in costs))} | "
                 f"{sum(c.stored_gb for c in costs):,.1f} | {money(sum(c.storage_usd for c in costs))} | "
                 f"**{money(total)}** | **{money(cm.usd_per_million(costs, images))}** |")
    lines += ["", "Throughput sources:"]
    lines += [f"- {c.stage}: {c.throughput_source}" for c in costs]
    return "\n".join(lines)


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 1000 else f"{x:.3g}"


def _cmd_cost(args: argparse.Namespace) -> int:
    stage_instance = {}
    for item in args.stage_instance:
        stage, sep, inst = item.partition("=")
        if not sep:
            raise UserError(f"--stage-instance expects stage=instance, got {item!r}")
        stage_instance[stage.strip()] = inst.strip()
    results_dir = None if args.no_measured else args.results_dir
    if args.headline:
        items = headline(results_dir, gpu_instance=args.instance, cpu_instance=args.cpu_instance,
                         prices=args.prices, spot=args.spot, spot_discount=args.spot_discount,
                         storage_months=args.storage_months)
        if args.format == "json":
            print(json.dumps([{"estimate": h.estimate, "basis": h.basis, **h.cost.__dict__,
                               "total_usd": h.cost.total_usd} for h in items], indent=2))
        else:
            print(format_headline(items, args.spot, args.storage_months))
        return 0
    costs, table = estimate(args.images, args.instance, spot=args.spot, spot_discount=args.spot_discount,
                            throughput=args.throughput, prices=args.prices, stage_instance=stage_instance,
                            stages=tuple(args.stages), train_epochs=args.train_epochs,
                            storage_months=args.storage_months, results_dir=results_dir)
    if args.format == "json":
        print(json.dumps([{**c.__dict__, "total_usd": c.total_usd,
                           "usd_per_million_images": cm.usd_per_million(c, args.images)} for c in costs],
                         indent=2))
        return 0
    print(f"Cost of {args.images:,.0f} images ({'spot' if args.spot else 'on-demand'}; training "
          f"{args.train_epochs:g} epoch(s); storage {args.storage_months:g} month(s))\n")
    print(format_costs(costs, args.images, args.spot, args.storage_months))
    print(f"\nPrice table: {args.prices or cm.DEFAULT_PRICES_CSV}"
          + (f" ({table.provenance.splitlines()[0]} Date and source: see its header.)" if table.provenance else ""))
    print("S3: Standard us-east-1 list prices (PUT $0.005 / 1,000, GET $0.0004 / 1,000, $0.023 per GB-month); "
          "in-region transfer free. See docs/benchmarks.md for the model and its limits.")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("cost", help="dollars per stage for N images (measured throughput x price table)",
                              description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=float, default=1e6, help="number of images (default 1e6)")
    p.add_argument("--instance", default="p5.48xlarge", help="instance type for every stage (default p5.48xlarge)")
    p.add_argument("--stage-instance", action="append", default=[], metavar="STAGE=INSTANCE",
                   help="a different instance for one stage, e.g. profile=c7i.48xlarge (repeatable)")
    p.add_argument("--spot", action="store_true", help="price at the table's typical spot price")
    p.add_argument("--spot-discount", type=float, default=None, metavar="F",
                   help="with --spot: use on-demand x (1 - F) instead of the table's spot column")
    p.add_argument("--throughput", action="append", default=[], metavar="FILE|STAGE=VALUE[/per]",
                   help="items/s for a stage (per instance, gpu or vcpu) or a CSV/Parquet file (repeatable)")
    p.add_argument("--prices", default=None, metavar="FILE", help="price CSV (default: the shipped table)")
    p.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR,
                   help="benchmark results to read measured throughput from")
    p.add_argument("--no-measured", action="store_true", help="ignore benchmark results (defaults + supplied)")
    p.add_argument("--stages", nargs="+", default=list(cm.STAGES), choices=cm.STAGES)
    p.add_argument("--train-epochs", type=float, default=1.0, help="training samples = images x epochs")
    p.add_argument("--storage-months", type=float, default=1.0, help="months of S3 storage to price")
    p.add_argument("--headline", action="store_true",
                   help="only the headline estimates: 1,000,000 generated images and the ingest of cpg0016's "
                        "compound images (2.67 M sites), on --instance (GPU) and --cpu-instance")
    p.add_argument("--cpu-instance", default="c7i.48xlarge",
                   help="CPU instance of the --headline estimates (default c7i.48xlarge)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=_cmd_cost)

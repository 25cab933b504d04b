"""Cost model: per-stage throughput and an instance price table -> dollars per million images.

Pure arithmetic (no I/O beyond reading a price CSV), so it is unit-tested on hand-computed cases and used by
``cpldm cost`` (``pipelines/cost.py``), which supplies measured throughput from ``benchmarks/results``.

Units used throughout:

* an *image* is one 5-channel field of view (a JUMP site at ingest, one generated image at generation, one
  image to featurise at profiling); a training *item* is one sample seen by the optimiser, so training
  processes ``images * train_epochs`` items;
* throughput is items/s, stated per instance, per GPU or per vCPU (:class:`Throughput.per`); per-GPU and
  per-vCPU figures assume linear data-parallel scaling inside one instance (one worker per GPU / per core);
* compute cost = instance-hours x hourly price; S3 cost = requests (per 1,000) + storage (GB-month, where
  AWS bills 1 GB = 2**30 bytes). Data transfer inside one region (EC2 <-> S3) is free and not modelled.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
from pathlib import Path
from typing import Literal, Mapping

from cpldm_core.errors import UserError

#: Stages priced by the model, in pipeline order.
STAGES = ("ingest", "train", "generate", "profile")

#: The price table shipped with cpldm (see its header for date and source).
DEFAULT_PRICES_CSV = Path(__file__).parent / "data" / "prices_aws_2026.csv"

#: AWS bills S3 storage per "GB-month" with 1 GB = 2**30 bytes (AWS S3 pricing FAQ).
BYTES_PER_BILLED_GB = 2 ** 30
SECONDS_PER_HOUR = 3600.0

PerUnit = Literal["instance", "gpu", "vcpu"]


@dataclasses.dataclass(frozen=True)
class InstancePrice:
    """One row of the price table. Prices in US dollars per instance-hour (Linux, on-demand / spot)."""

    instance: str
    vcpus: int
    gpus: int
    gpu_model: str
    on_demand_usd_per_h: float
    spot_usd_per_h: float | None = None

    def hourly_usd(self, spot: bool = False, spot_discount: float | None = None) -> float:
        """Price per instance-hour. ``spot_discount`` (0-1, fraction off on-demand) overrides the table's
        typical spot price; spot without either is an error rather than a silent on-demand figure."""
        if not spot:
            return self.on_demand_usd_per_h
        if spot_discount is not None:
            if not 0.0 <= spot_discount < 1.0:
                raise UserError(f"spot discount must be in [0, 1), got {spot_discount}")
            return self.on_demand_usd_per_h * (1.0 - spot_discount)
        if self.spot_usd_per_h is None:
            raise UserError(f"no typical spot price for {self.instance} in the price table: "
                            "pass --spot-discount FRACTION or add a spot_usd_per_h value")
        return self.spot_usd_per_h


@dataclasses.dataclass(frozen=True)
class PriceTable:
    """Instance prices keyed by instance name, plus the table's provenance (date, source) text."""

    instances: Mapping[str, InstancePrice]
    provenance: str = ""

    def get(self, name: str) -> InstancePrice:
        try:
            return self.instances[name]
        except KeyError:
            known = ", ".join(sorted(self.instances))
            raise UserError(f"instance {name!r} is not in the price table (known: {known}); "
                            "add it to a CSV and pass --prices FILE") from None


@dataclasses.dataclass(frozen=True)
class Throughput:
    """Measured or supplied throughput of one stage: ``items_per_s`` per ``per`` unit."""

    stage: str
    items_per_s: float
    per: PerUnit = "instance"
    source: str = "supplied"

    def per_instance(self, instance: InstancePrice) -> float:
        """Items/s of one whole instance (linear scaling over its GPUs or vCPUs)."""
        if not (self.items_per_s > 0 and math.isfinite(self.items_per_s)):
            raise UserError(f"throughput of stage {self.stage!r} must be a positive number, got "
                            f"{self.items_per_s}")
        if self.per == "instance":
            return self.items_per_s
        if self.per == "gpu":
            if instance.gpus <= 0:
                raise UserError(f"stage {self.stage!r} throughput is per GPU but {instance.instance} has no "
                                f"GPU: price it on a GPU instance or supply --throughput "
                                f"{self.stage}=<items/s per instance>")
            return self.items_per_s * instance.gpus
        if self.per == "vcpu":
            return self.items_per_s * instance.vcpus
        raise UserError(f"throughput 'per' must be instance, gpu or vcpu, got {self.per!r}")


@dataclasses.dataclass(frozen=True)
class S3Prices:
    """S3 Standard, us-east-1 list prices (aws.amazon.com/s3/pricing, unchanged since 2018 through 2025)."""

    put_usd_per_1000: float = 0.005      # PUT, COPY, POST, LIST requests
    get_usd_per_1000: float = 0.0004     # GET, SELECT and all other requests
    storage_usd_per_gb_month: float = 0.023  # first 50 TB / month


@dataclasses.dataclass(frozen=True)
class StageIO:
    """S3 traffic and bytes kept per item of one stage (averaged: 1/256 = one chunk holds 256 items)."""

    gets_per_item: float
    puts_per_item: float
    stored_bytes_per_item: float


#: Default per-item S3 footprint, from the lake layouts in docs/CONTRACTS:
#: ingest reads 5 TIFFs (one per channel) per site and writes float16 latents (8, 32, 32) of a 256x256 crop,
#: 256 latents per Zarr chunk; training reads latent chunks (256 samples per GET) and stores nothing per item;
#: generation writes one Zarr chunk per image, (5, 256, 256) uint16 = 655,360 bytes uncompressed;
#: profiling reads one chunk per image and writes ~1,500 float32 features per image into Parquet parts of
#: ~1,000 rows.
DEFAULT_STAGE_IO: Mapping[str, StageIO] = {
    "ingest": StageIO(gets_per_item=5.0, puts_per_item=1 / 256, stored_bytes_per_item=8 * 32 * 32 * 2),
    "train": StageIO(gets_per_item=1 / 256, puts_per_item=0.0, stored_bytes_per_item=0.0),
    "generate": StageIO(gets_per_item=0.0, puts_per_item=1.0, stored_bytes_per_item=5 * 256 * 256 * 2),
    "profile": StageIO(gets_per_item=1.0, puts_per_item=1 / 1000, stored_bytes_per_item=1500 * 4),
}

#: Documented default throughputs, used only when nothing was measured or supplied. They are order-of-magnitude
#: planning figures, NOT measurements: profile comes from the cp_measure timing in ENVIRONMENT.md (~16 s per
#: 256x256 5-channel image with ~20 cells on one core); the GPU figures are estimates for small-VAE encode,
#: a small U-Net train step on (8, 32, 32) latents, and 20-step DPM-Solver++ sampling plus decode.
DEFAULT_THROUGHPUT: Mapping[str, Throughput] = {
    "ingest": Throughput("ingest", 200.0, "gpu", "default estimate (not measured)"),
    "train": Throughput("train", 400.0, "gpu", "default estimate (not measured)"),
    "generate": Throughput("generate", 20.0, "gpu", "default estimate (not measured)"),
    "profile": Throughput("profile", 1 / 16, "vcpu", "default: cp_measure ~16 s/image/core (ENVIRONMENT.md)"),
}


#: JUMP cpg0016 compound images (issue 20's figures: 13.4 M TIFFs, one per channel of a five-channel site,
#: i.e. 2.67 M sites of 1,080 x 1,080 px); what ``cpldm cost --headline`` prices the ingest of.
CPG0016_COMPOUND_TIFFS = 13_400_000
CPG0016_COMPOUND_SITES = 2_670_000
JUMP_SITE_PX = 1080
#: The generation headline: one million generated images.
HEADLINE_GENERATED_IMAGES = 1_000_000


def bottleneck(parts: list[Throughput], instance: InstancePrice) -> Throughput:
    """Throughput of a pipeline whose ``parts`` run concurrently on one instance (e.g. CPU read+decode feeding
    GPU encode): the slowest part's per-instance rate, with that part named as the source.

    Example: read 10 sites/s per vCPU x 192 vCPUs = 1,920/s, encode 400/s per GPU x 8 = 3,200/s -> 1,920/s,
    limited by the read.
    """
    if not parts:
        raise UserError("a pipeline needs at least one throughput")
    rates = [(p.per_instance(instance), p) for p in parts]
    rate, slowest = min(rates, key=lambda r: r[0])
    others = "; ".join(f"{p.stage} {r:,.4g}/s per instance ({p.source})" for r, p in rates if p is not slowest)
    source = slowest.source + (f" -- the bottleneck; also: {others}" if others else "")
    return Throughput(slowest.stage, rate, "instance", source)


@dataclasses.dataclass(frozen=True)
class StageCost:
    """Cost of one stage for ``items`` items. Money in US dollars; storage is for ``storage_months``."""

    stage: str
    instance: str
    items: float
    items_per_s_per_instance: float
    instance_hours: float
    hourly_usd: float
    compute_usd: float
    gets: float
    puts: float
    requests_usd: float
    stored_gb: float
    storage_usd: float
    throughput_source: str

    @property
    def total_usd(self) -> float:
        return self.compute_usd + self.requests_usd + self.storage_usd


def stage_cost(stage: str, items: float, throughput: Throughput, instance: InstancePrice, *,
               spot: bool = False, spot_discount: float | None = None, s3: S3Prices = S3Prices(),
               io_: StageIO | None = None, storage_months: float = 1.0) -> StageCost:
    """Dollars to push ``items`` items through ``stage`` on ``instance`` (fractional hours billed: AWS bills
    Linux instances per second)."""
    if items < 0:
        raise UserError(f"number of items must be >= 0, got {items}")
    io_ = io_ if io_ is not None else DEFAULT_STAGE_IO[stage]
    rate = throughput.per_instance(instance)
    hours = items / rate / SECONDS_PER_HOUR
    hourly = instance.hourly_usd(spot, spot_discount)
    gets = items * io_.gets_per_item
    puts = items * io_.puts_per_item
    requests_usd = gets / 1000 * s3.get_usd_per_1000 + puts / 1000 * s3.put_usd_per_1000
    stored_gb = items * io_.stored_bytes_per_item / BYTES_PER_BILLED_GB
    return StageCost(stage=stage, instance=instance.instance, items=items, items_per_s_per_instance=rate,
                     instance_hours=hours, hourly_usd=hourly, compute_usd=hours * hourly, gets=gets, puts=puts,
                     requests_usd=requests_usd, stored_gb=stored_gb,
                     storage_usd=stored_gb * s3.storage_usd_per_gb_month * storage_months,
                     throughput_source=throughput.source)


def estimate_costs(images: float, instances: Mapping[str, InstancePrice],
                   throughputs: Mapping[str, Throughput], *, stages: tuple[str, ...] = STAGES,
                   spot: bool = False, spot_discount: float | None = None, s3: S3Prices = S3Prices(),
                   stage_io: Mapping[str, StageIO] = DEFAULT_STAGE_IO, train_epochs: float = 1.0,
                   storage_months: float = 1.0) -> list[StageCost]:
    """Cost of every stage for ``images`` images: ``instances[stage]`` runs ``stage`` at
    ``throughputs[stage]`` (missing stages fall back to :data:`DEFAULT_THROUGHPUT`). Training processes
    ``images * train_epochs`` samples."""
    if images <= 0:
        raise UserError(f"--images must be > 0, got {images}")
    out = []
    for stage in stages:
        if stage not in STAGES:
            raise UserError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
        items = images * train_epochs if stage == "train" else images
        tp = throughputs.get(stage, DEFAULT_THROUGHPUT[stage])
        out.append(stage_cost(stage, items, tp, instances[stage], spot=spot, spot_discount=spot_discount,
                              s3=s3, io_=stage_io[stage], storage_months=storage_months))
    return out


def usd_per_million(cost: StageCost | list[StageCost], images: float) -> float:
    """Total dollars scaled to one million images (costs are linear in the number of images)."""
    costs = cost if isinstance(cost, list) else [cost]
    return sum(c.total_usd for c in costs) / images * 1e6


def parse_price_csv(text: str, where: str = "<prices>") -> PriceTable:
    """Parse a price CSV: ``#`` lines are provenance (kept), then a header with columns instance, vcpus, gpus,
    gpu_model, on_demand_usd_per_h, spot_usd_per_h (spot may be empty). Errors name the line."""
    provenance = "\n".join(line[1:].strip() for line in text.splitlines() if line.startswith("#"))
    body = "\n".join(line for line in text.splitlines() if line.strip() and not line.startswith("#"))
    reader = csv.DictReader(io.StringIO(body))
    required = {"instance", "vcpus", "gpus", "gpu_model", "on_demand_usd_per_h", "spot_usd_per_h"}
    missing = required - set(reader.fieldnames or ())
    if missing:
        raise UserError(f"{where}: price table lacks column(s) {', '.join(sorted(missing))}")
    rows: dict[str, InstancePrice] = {}
    for n, row in enumerate(reader, start=2):
        try:
            spot = row["spot_usd_per_h"].strip()
            price = InstancePrice(instance=row["instance"].strip(), vcpus=int(row["vcpus"]),
                                  gpus=int(row["gpus"]), gpu_model=row["gpu_model"].strip(),
                                  on_demand_usd_per_h=float(row["on_demand_usd_per_h"]),
                                  spot_usd_per_h=float(spot) if spot else None)
        except (TypeError, ValueError) as exc:
            raise UserError(f"{where}: data row {n - 1} ({row.get('instance')!r}): {exc}") from None
        if price.on_demand_usd_per_h <= 0 or (price.spot_usd_per_h is not None and price.spot_usd_per_h <= 0):
            raise UserError(f"{where}: data row {n - 1} ({price.instance!r}): prices must be > 0")
        rows[price.instance] = price
    if not rows:
        raise UserError(f"{where}: price table has no rows")
    return PriceTable(instances=rows, provenance=provenance)


def load_prices(path: str | Path | None = None) -> PriceTable:
    """Read a price CSV (default: the shipped :data:`DEFAULT_PRICES_CSV`)."""
    path = Path(path) if path is not None else DEFAULT_PRICES_CSV
    if not path.is_file():
        raise UserError(f"price table {path} does not exist")
    return parse_price_csv(path.read_text(), where=str(path))

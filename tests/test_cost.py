"""Cost model (cpldm_core.cost) and `cpldm cost` on hand-computed cases."""
from __future__ import annotations

import json
import math

import pytest

from cpldm_core import cost as cm
from cpldm_core.errors import UserError
from pipelines import cost as pc

# One GPU instance and one CPU instance with round prices so every expected figure is easy to check by hand.
GPU = cm.InstancePrice("test.gpu", vcpus=16, gpus=4, gpu_model="X", on_demand_usd_per_h=10.0, spot_usd_per_h=4.0)
CPU = cm.InstancePrice("test.cpu", vcpus=8, gpus=0, gpu_model="", on_demand_usd_per_h=2.0, spot_usd_per_h=None)
PRICE_CSV = """# test prices, 2026-01-01, invented
instance,vcpus,gpus,gpu_model,on_demand_usd_per_h,spot_usd_per_h
test.gpu,16,4,X,10.0,4.0
test.cpu,8,0,,2.0,
"""
NO_IO = cm.StageIO(0.0, 0.0, 0.0)


def test_hourly_price_on_demand_spot_and_discount():
    assert GPU.hourly_usd() == 10.0
    assert GPU.hourly_usd(spot=True) == 4.0
    assert GPU.hourly_usd(spot=True, spot_discount=0.7) == pytest.approx(3.0)  # 10 x (1 - 0.7)
    assert CPU.hourly_usd(spot=True, spot_discount=0.5) == pytest.approx(1.0)
    with pytest.raises(UserError, match="no typical spot price for test.cpu"):
        CPU.hourly_usd(spot=True)
    with pytest.raises(UserError, match="spot discount"):
        GPU.hourly_usd(spot=True, spot_discount=1.5)


def test_throughput_scales_with_gpus_and_vcpus():
    assert cm.Throughput("ingest", 50.0, "gpu").per_instance(GPU) == 200.0     # 50 x 4 GPUs
    assert cm.Throughput("profile", 0.5, "vcpu").per_instance(GPU) == 8.0      # 0.5 x 16 vCPUs
    assert cm.Throughput("train", 7.0, "instance").per_instance(CPU) == 7.0
    with pytest.raises(UserError, match="per GPU but test.cpu has no GPU"):
        cm.Throughput("generate", 1.0, "gpu").per_instance(CPU)
    with pytest.raises(UserError, match="positive"):
        cm.Throughput("generate", 0.0, "instance").per_instance(GPU)


def test_stage_cost_compute_requests_and_storage_by_hand():
    # 1e6 items at 100 items/s = 10,000 s = 2.777... h at $10/h = $27.777...
    # 5 GETs/item = 5e6 GETs x $0.0004/1000 = $2.00; 1/256 PUT/item = 3,906.25 PUTs x $0.005/1000 = $0.01953125
    # 16,384 B/item = 1.6384e10 B = 15.2587890625 GiB x $0.023 x 2 months = $0.70190429...
    io_ = cm.StageIO(gets_per_item=5.0, puts_per_item=1 / 256, stored_bytes_per_item=16_384)
    c = cm.stage_cost("ingest", 1e6, cm.Throughput("ingest", 25.0, "gpu"), GPU, io_=io_, storage_months=2.0)
    assert c.items_per_s_per_instance == 100.0
    assert c.instance_hours == pytest.approx(10_000 / 3600)
    assert c.compute_usd == pytest.approx(27.7777777778)
    assert c.gets == 5e6 and c.puts == pytest.approx(3906.25)
    assert c.requests_usd == pytest.approx(2.0 + 0.01953125)
    assert c.stored_gb == pytest.approx(15.2587890625)
    assert c.storage_usd == pytest.approx(15.2587890625 * 0.023 * 2)
    assert c.total_usd == pytest.approx(27.7777777778 + 2.01953125 + 0.701904296875)


def test_spot_changes_only_compute():
    on = cm.stage_cost("generate", 3.6e5, cm.Throughput("generate", 100.0), GPU)
    spot = cm.stage_cost("generate", 3.6e5, cm.Throughput("generate", 100.0), GPU, spot=True)
    assert on.instance_hours == spot.instance_hours == pytest.approx(1.0)  # 360,000 / 100 / 3600
    assert (on.compute_usd, spot.compute_usd) == (pytest.approx(10.0), pytest.approx(4.0))
    assert on.requests_usd == spot.requests_usd and on.storage_usd == spot.storage_usd


def test_estimate_costs_training_epochs_defaults_and_linearity():
    instances = {s: GPU for s in cm.STAGES}
    tps = {"train": cm.Throughput("train", 1000.0, "instance")}
    io = {s: NO_IO for s in cm.STAGES}
    costs = {c.stage: c for c in cm.estimate_costs(7.2e5, instances, tps, stage_io=io, train_epochs=5)}
    # training sees 7.2e5 x 5 = 3.6e6 samples at 1,000/s = 1 h = $10
    assert costs["train"].items == 3.6e6 and costs["train"].compute_usd == pytest.approx(10.0)
    # a stage without a supplied throughput uses the documented default
    assert costs["profile"].throughput_source == cm.DEFAULT_THROUGHPUT["profile"].source
    expected_profile_h = 7.2e5 / (cm.DEFAULT_THROUGHPUT["profile"].items_per_s * GPU.vcpus) / 3600
    assert costs["profile"].instance_hours == pytest.approx(expected_profile_h)
    one = cm.estimate_costs(1e6, instances, tps)
    two = cm.estimate_costs(2e6, instances, tps)
    assert sum(c.total_usd for c in two) == pytest.approx(2 * sum(c.total_usd for c in one))
    assert cm.usd_per_million(two, 2e6) == pytest.approx(cm.usd_per_million(one, 1e6))
    with pytest.raises(UserError, match="--images"):
        cm.estimate_costs(0, instances, tps)


def test_parse_price_csv_and_errors():
    table = cm.parse_price_csv(PRICE_CSV)
    assert table.get("test.gpu") == GPU and table.get("test.cpu") == CPU
    assert "2026-01-01" in table.provenance
    with pytest.raises(UserError, match="not in the price table"):
        table.get("p9.huge")
    with pytest.raises(UserError, match="lacks column"):
        cm.parse_price_csv("instance,vcpus\nx,1\n")
    bad = PRICE_CSV.replace("test.cpu,8,0,,2.0,", "test.cpu,eight,0,,2.0,")
    with pytest.raises(UserError, match=r"data row 2 \('test.cpu'\)"):
        cm.parse_price_csv(bad, where="bad.csv")


def test_shipped_price_table_has_date_source_and_sane_rows():
    table = cm.load_prices()
    assert "2026" in table.provenance and "aws.amazon.com" in table.provenance
    p5 = table.get("p5.48xlarge")
    assert (p5.gpus, p5.vcpus) == (8, 192) and "H100" in p5.gpu_model
    for inst in table.instances.values():
        assert inst.on_demand_usd_per_h > 0
        assert inst.spot_usd_per_h is None or inst.spot_usd_per_h < inst.on_demand_usd_per_h
        assert (inst.gpus > 0) == bool(inst.gpu_model)


def test_parse_throughput_items_and_csv(tmp_path):
    assert pc.parse_throughput_item("generate=12.5/gpu") == cm.Throughput(
        "generate", 12.5, "gpu", "--throughput generate=12.5/gpu")
    assert pc.parse_throughput_item("ingest=3").per == "instance"
    for bad, msg in [("gen=1", "stage must be"), ("ingest=fast", "not a number"), ("ingest=1/tpu", "unit"),
                     ("ingest=-2", "> 0")]:
        with pytest.raises(UserError, match=msg):
            pc.parse_throughput_item(bad)
    path = tmp_path / "tp.csv"
    path.write_text("stage,items_per_s,per\ntrain,400,gpu\nprofile,0.1,vcpu\n")
    tps = pc.read_throughput_csv(path)
    assert tps["train"].items_per_s == 400 and tps["profile"].per == "vcpu"
    path.write_text("stage,items_per_s\ntrain,zero\n")
    with pytest.raises(UserError, match="data row 1"):
        pc.read_throughput_csv(path)


def test_throughputs_from_benchmark_rows():
    base = {"status": "ok", "cost_per": "", "machine": "m", "run_date": "d", "benchmark": "b"}
    rows = [
        # unit-matched row of bench_ingest on a 2-core CPU machine: 10 images/s -> 5 per vCPU
        {**base, "stage": "ingest", "metric": "cpu", "value": 10.0, "unit": "images/s", "device": "cpu",
         "cost_stage": "", "cpu_count": 2, "gpu": "none"},
        # explicitly marked GPU row on a 1-GPU machine wins for a GPU instance
        {**base, "stage": "ingest", "metric": "gpu", "value": 300.0, "unit": "crops/s",
         "device": "cuda:0 (NVIDIA H100 80GB HBM3)", "cost_stage": "ingest", "cpu_count": 16,
         "gpu": "NVIDIA H100 80GB HBM3 x1"},
        # a failed run and a ratio are never throughputs
        {**base, "stage": "generate", "metric": "x", "value": 99.0, "unit": "images/s", "device": "cpu",
         "cost_stage": "", "cpu_count": 2, "gpu": "none", "status": "failed"},
        {**base, "stage": "generate", "metric": "speed-up", "value": 3.0, "unit": "x", "device": "cpu",
         "cost_stage": "", "cpu_count": 2, "gpu": "none"},
        # cost_per given explicitly is taken as is
        {**base, "stage": "profile", "metric": "p", "value": 0.2, "unit": "images/s", "device": "cpu",
         "cost_stage": "profile", "cost_per": "vcpu", "cpu_count": 2, "gpu": "none"},
    ]
    gpu_pick = pc.throughputs_from_rows(rows, "t", want_gpu={"ingest": True, "profile": False})
    assert gpu_pick["ingest"].items_per_s == 300.0 and gpu_pick["ingest"].per == "gpu"
    assert "generate" not in gpu_pick
    assert gpu_pick["profile"] == cm.Throughput("profile", 0.2, "vcpu", gpu_pick["profile"].source)
    cpu_pick = pc.throughputs_from_rows(rows, "t", want_gpu=False)
    assert cpu_pick["ingest"].items_per_s == 5.0 and cpu_pick["ingest"].per == "vcpu"
    assert "measured" in cpu_pick["ingest"].source
    # a stage that runs on GPUs never takes a CPU measurement (it keeps the default instead)
    cpu_rows = [r for r in rows if r["metric"] != "gpu"]
    assert "ingest" not in pc.throughputs_from_rows(cpu_rows, "t", want_gpu=True)


def _cost_cli(argv: list[str]) -> int:
    """`cpldm cost ...` through the module's own parser (pipelines.cli.main would import every stage)."""
    import argparse

    parser = argparse.ArgumentParser(prog="cpldm")
    pc.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_cost_table_and_errors(tmp_path, capsys):
    prices = tmp_path / "prices.csv"
    prices.write_text(PRICE_CSV)
    args = ["cost", "--images", "3.6e5", "--instance", "test.gpu", "--prices", str(prices), "--no-measured",
            "--throughput", "ingest=100", "--throughput", "train=25/gpu", "--throughput", "generate=100",
            "--throughput", "profile=6.25/vcpu", "--stages", "ingest", "train", "generate", "profile"]
    assert _cost_cli(args + ["--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # every stage runs at 100 items/s per instance -> 1 instance-hour each = $10 compute
    assert [round(c["instance_hours"], 9) for c in out] == [1.0, 1.0, 1.0, 1.0]
    assert all(math.isclose(c["compute_usd"], 10.0) for c in out)
    assert _cost_cli(args + ["--spot", "--stage-instance", "profile=test.cpu", "--spot-discount", "0.5"]) == 0
    text = capsys.readouterr().out
    # profile on test.cpu: 6.25 x 8 vCPU = 50/s -> 2 h at $1/h (50% off $2)
    assert "| profile | test.cpu (spot) | 360,000 | 50 | 2.00 | 1 | 2.00 |" in text
    assert "Throughput sources:" in text and "--throughput train=25/gpu" in text
    with pytest.raises(UserError, match="nope.large.*not in the price table"):
        _cost_cli(["cost", "--instance", "nope.large", "--prices", str(prices)])


def test_cli_reads_measured_results(tmp_path, capsys):
    """A benchmark Parquet with a cost_stage row is picked up from --results-dir and named as the source."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    prices = tmp_path / "prices.csv"
    prices.write_text(PRICE_CSV)
    results = tmp_path / "results"
    results.mkdir()
    pq.write_table(pa.Table.from_pylist([{
        "stage": "generate", "benchmark": "sample", "metric": "dpm20", "value": 2.0, "unit": "images/s",
        "device": "cuda:0 (NVIDIA L40S)", "cost_stage": "generate", "cost_per": "", "status": "ok",
        "cpu_count": 8, "gpu": "NVIDIA L40S x1", "machine": "box", "run_date": "2026-11-25"}]),
        results / "generate.parquet")
    assert _cost_cli(["cost", "--images", "28800", "--instance", "test.gpu", "--prices", str(prices),
                      "--results-dir", str(results), "--stages", "generate", "--format", "json"]) == 0
    (gen,) = json.loads(capsys.readouterr().out)
    # 2 images/s per GPU x 4 GPUs = 8/s; 28,800 images = 3,600 s = 1 h = $10
    assert gen["items_per_s_per_instance"] == 8.0 and math.isclose(gen["compute_usd"], 10.0)
    assert "measured" in gen["throughput_source"] and "L40S" in gen["throughput_source"]


def test_bottleneck_names_the_slowest_part():
    read = cm.Throughput("ingest", 10.0, "vcpu", "read")      # 10 x 16 vCPUs = 160/s
    encode = cm.Throughput("ingest", 400.0, "gpu", "encode")  # 400 x 4 GPUs = 1,600/s
    tp = cm.bottleneck([encode, read], GPU)
    assert (tp.items_per_s, tp.per) == (160.0, "instance")
    assert tp.source.startswith("read -- the bottleneck") and "1,600/s per instance (encode)" in tp.source
    assert cm.bottleneck([cm.Throughput("ingest", 5.0, "gpu", "e")], GPU).items_per_s == 20.0
    with pytest.raises(UserError, match="at least one"):
        cm.bottleneck([], GPU)


def _results_dir(tmp_path, gpu: bool = True, cpu: bool = True):
    """benchmarks/results-shaped Parquet files: gpu_check rows on a 1-GPU box, bench_ingest/generate CPU rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    results = tmp_path / "results"
    results.mkdir()
    base = {"status": "ok", "peak_mem_mb": 1.0, "cost_per": ""}
    h100 = {**base, "device": "cuda:0 (NVIDIA H100 80GB HBM3)", "gpu": "NVIDIA H100 80GB HBM3 x1", "cpu_count": 16,
            "machine": "gpu-box", "run_date": "2026-12-02 00:00 UTC", "notes": ""}
    if gpu:
        pq.write_table(pa.Table.from_pylist([
            {**h100, "stage": "gpu", "benchmark": "encode sdxl VAE 384px bf16", "metric": "crops/s per GPU",
             "value": 300.0, "unit": "crops/s", "cost_stage": "ingest", "cost_per": "gpu"},
            {**h100, "stage": "gpu", "benchmark": "sample paper", "metric": "images/s per GPU incl. decode",
             "value": 2.0, "unit": "images/s", "cost_stage": "generate", "cost_per": "gpu"}]),
            results / "gpu.parquet")
    if cpu:
        vm = {**base, "device": "cpu", "gpu": "none", "cpu_count": 2, "machine": "vm", "run_date": "2026-12-01"}
        pq.write_table(pa.Table.from_pylist([
            {**vm, "stage": "ingest", "benchmark": "read+decode+normalise local", "metric": "plain loop",
             "value": 40.0, "unit": "sites/s", "cost_stage": "", "notes": "96 sites of 5x540x540 LZW TIFFs, local"},
            {**vm, "stage": "ingest", "benchmark": "full ingest local", "metric": "ray data, 2 encoder(s)",
             "value": 3.0, "unit": "sites/s", "cost_stage": "ingest", "notes": ""}]), results / "ingest.parquet")
    return results


def test_headline_from_measured_gpu_figures(tmp_path):
    prices = tmp_path / "prices.csv"
    prices.write_text(PRICE_CSV)
    results = _results_dir(tmp_path)
    rows = pc.read_result_rows(sorted(results.glob("*.parquet")))
    read = pc.read_throughput(rows)
    assert read.items_per_s == pytest.approx(10.0) and read.per == "vcpu"   # 40 x (540 / 1080)^2
    got = {(h.estimate.split()[0], h.cost.instance): h for h in
           pc.headline(results, gpu_instance="test.gpu", cpu_instance="test.cpu", prices=prices)}
    gen = got[("1,000,000", "test.gpu")]
    # 2 images/s per GPU x 4 = 8/s: 1e6 / 8 = 125,000 s = 34.72 h x $10
    assert gen.basis == pc.MEASURED_GPU and gen.cost.compute_usd == pytest.approx(125_000 / 3600 * 10)
    assert "gpu.parquet row 1" in gen.cost.throughput_source and "gpu-box" in gen.cost.throughput_source
    ing = got[("ingest", "test.gpu")]
    # encode 300 x 4 = 1,200/s, read 10 x 16 vCPUs = 160/s: the read bounds it; 2.67e6 / 160 s x $10/h
    assert ing.cost.items == cm.CPG0016_COMPOUND_SITES and ing.cost.items_per_s_per_instance == pytest.approx(160)
    assert ing.cost.compute_usd == pytest.approx(2.67e6 / 160 / 3600 * 10)
    assert ing.cost.throughput_source.index("ingest.parquet row 0") < ing.cost.throughput_source.index("bottleneck")
    # CPU instance: the CPU full-ingest figure, 3 sites/s on 2 cores -> 1.5 per vCPU x 8 = 12/s
    cpu = got[("ingest", "test.cpu")]
    assert cpu.basis == pc.MEASURED_CPU and cpu.cost.items_per_s_per_instance == pytest.approx(12.0)
    assert ("1,000,000", "test.cpu") not in got   # no CPU generation figure: no CPU line


def test_headline_falls_back_and_says_so(tmp_path, capsys):
    prices = tmp_path / "prices.csv"
    prices.write_text(PRICE_CSV)
    results = _results_dir(tmp_path, gpu=False)
    got = {(h.estimate.split()[0], h.cost.instance): h for h in
           pc.headline(results, gpu_instance="test.gpu", cpu_instance="test.cpu", prices=prices)}
    gen = got[("1,000,000", "test.gpu")]
    assert gen.basis == pc.FALLBACK_DEFAULT and gen.cost.throughput_source == cm.DEFAULT_THROUGHPUT["generate"].source
    assert got[("ingest", "test.cpu")].basis == pc.FALLBACK_CPU
    # default encode 200 x 4 = 800/s is faster than the measured read (160/s): the read still bounds ingest
    assert got[("ingest", "test.gpu")].cost.items_per_s_per_instance == pytest.approx(160)
    assert _cost_cli(["cost", "--headline", "--instance", "test.gpu", "--cpu-instance", "test.cpu",
                      "--prices", str(prices), "--results-dir", str(results)]) == 0
    text = capsys.readouterr().out
    assert "NOT measured" in text and "13.4 M TIFFs = 2.67 M sites" in text and "ingest.parquet row 0" in text
    with pytest.raises(UserError, match="has no GPU"):
        pc.headline(results, gpu_instance="test.cpu", cpu_instance="test.cpu", prices=prices)

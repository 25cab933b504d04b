"""Image preprocessing and `cpldm ingest`: latents compared with a plain reference loop, rejects,
resumption after a kill, and the real cpg0016 S3 layout served by the moto server."""
from __future__ import annotations

import io
import os

import numpy as np
import pandas as pd
import pytest

from tests._fixtures import hold_claim
from test_catalog import CHANNELS, IMAGE_PX, build_raw_lake, real_example_metadata, tiff_bytes

CROP = 16


# ---------------------------------------------------------------------------------------------- pure images
def test_normalise_matches_formula_and_denormalise_inverts():
    from cpldm_core.images import denormalise, normalise

    rng = np.random.default_rng(0)
    img = rng.integers(0, 20000, (5, 8, 8)).astype(np.uint16)
    low, high = np.array([100, 200, 300, 400, 500.0]), np.array([15000, 16000, 17000, 18000, 19000.0])
    x = normalise(img, low, high)
    ref = np.clip(2 * (img - low[:, None, None]) / (high - low)[:, None, None] - 1, -1, 1)
    np.testing.assert_allclose(x, ref, atol=1e-6)
    assert x.dtype == np.float32
    back = denormalise(x, low, high)
    inside = (img >= low[:, None, None]) & (img <= high[:, None, None])
    assert np.abs(back.astype(int) - img.astype(int))[inside].max() <= 1
    assert (back[~inside & (img < low[:, None, None])] == np.broadcast_to(low[:, None, None], img.shape)[
        ~inside & (img < low[:, None, None])]).all()


def test_robust_percentiles_pool_pixels_like_numpy():
    from cpldm_core.images import robust_percentiles

    rng = np.random.default_rng(1)
    imgs = [rng.gamma(2.0, 500.0 * (k + 1), (5, 16, 16)) for k in range(3)]
    norm = robust_percentiles(imgs, 1.0, 99.0)
    pooled = np.concatenate([i.reshape(5, -1) for i in imgs], axis=1)
    np.testing.assert_allclose(norm.low, np.percentile(pooled.astype(np.float32), 1.0, axis=1), rtol=1e-5)
    np.testing.assert_allclose(norm.high, np.percentile(pooled.astype(np.float32), 99.0, axis=1), rtol=1e-5)


def test_crops_and_tiles():
    from cpldm_core.images import ImageError, centre_crop, crops_of

    img = np.arange(5 * 10 * 12).reshape(5, 10, 12)
    np.testing.assert_array_equal(centre_crop(img, 4), img[:, 3:7, 4:8])
    tiles = crops_of(img, "tile", 4, grid=2)
    assert tiles.shape == (4, 5, 4, 4)
    np.testing.assert_array_equal(tiles[0], img[:, 1:5, 2:6])
    np.testing.assert_array_equal(tiles[3], img[:, 5:9, 6:10])
    with pytest.raises(ImageError, match="smaller"):
        centre_crop(img, 16)


def test_reader_reasons_for_bad_files(tmp_path):
    from pipelines.ingest import SiteReader

    good = np.full((8, 8), 1000, np.uint16)
    files = {}
    for name, data in {"good": tiff_bytes(good), "trunc": tiff_bytes(good)[:60], "u8": tiff_bytes(good.astype(np.uint8)),
                       "small": tiff_bytes(good[:4]), "rgb": tiff_bytes(np.zeros((8, 8, 3), np.uint16))}.items():
        files[name] = str(tmp_path / f"{name}.tiff")
        open(files[name], "wb").write(data)
    files["missing"] = str(tmp_path / "nope.tiff")

    def row(bad):
        return {"Metadata_SiteKey": bad, **{f"URL_Orig{ch}": files["good"] for ch in CHANNELS},
                "URL_OrigER": files[bad] if bad != "good" else files["good"]}

    out = SiteReader().read_sites([row(k) for k in ("good", "trunc", "u8", "small", "rgb", "missing")])
    assert out[0].shape == (5, 8, 8) and out[0].dtype == np.float32
    reasons = [str(e) for e in out[1:]]
    assert "not a readable TIFF" in reasons[0] and "trunc.tiff" in reasons[0]
    assert "uint16" in reasons[1]
    assert "different shapes" in reasons[2]
    assert "2-D" in reasons[3]
    assert "cannot read" in reasons[4] and "nope.tiff" in reasons[4]


# ---------------------------------------------------------------------------------------------- pipeline
def save_tiny_vae(lake, name: str = "tinyvae", seed: int = 0) -> str:
    """A random tiny AutoencoderKL in diffusers format at vae/<name>/ in the lake; returns its local copy dir."""
    import tempfile

    import torch
    from cpldm_core.autoencoder import build_vae

    torch.manual_seed(seed)
    vae = build_vae("tiny", sample_size=CROP)
    vae.register_to_config(scaling_factor=0.7)
    tmp = tempfile.mkdtemp(prefix="tinyvae-")
    vae.save_pretrained(os.path.join(tmp, "vae"))
    from pipelines.fit_vae import register_vae
    register_vae(lake, name, os.path.join(tmp, "vae"), note=f"test: random tiny AutoencoderKL, seed {seed}")
    return tmp


def ingest_config(**kw):
    from cpldm_core.images import IngestConfig
    base = dict(vae="tinyvae", crop_size=CROP, stats_sites=8, rows_per_shard=4, batch_size=4, subset="all",
                low_percentile=1.0, high_percentile=99.0)
    return IngestConfig(**{**base, **kw})


def reference_latents(model, images: dict, keys, norm, illum: dict) -> dict:
    """Plain loop: TIFF pixels -> illumination -> normalise -> centre crop -> encode (no Ray, no zarr)."""
    import torch
    from cpldm_core.images import centre_crop, normalise

    out = {}
    for k in keys:
        img = images[k].astype(np.float32)
        plate = k.split("/")[2]
        if plate in illum:
            img = img / illum[plate]
        x = centre_crop(normalise(img, norm["low"], norm["high"]), CROP)
        out[k] = model.encode(torch.from_numpy(np.ascontiguousarray(x[None]))).numpy()[0]
    return out


def test_ingest_matches_reference_with_rejects(lake, ray_cluster):
    from cpldm_core.autoencoder import ChannelGroupAutoencoder
    from cpldm_core.images import robust_percentiles
    from cpldm_core.load_data import CatalogConfig
    from pipelines import catalog, ingest

    truth = build_raw_lake(lake, corrupt=True, illum=True)
    catalog.run(lake, CatalogConfig())
    tmp = save_tiny_vae(lake)
    summary = ingest.run(lake, ingest_config())
    sites = lake.read_named("sites").to_pandas()
    assert summary["sites"] == len(sites) == summary["encoded_sites"] + summary["rejected"]
    rejects = lake.read_named("rejects").to_pandas()
    rejects = rejects[rejects["stage"] == "ingest-tinyvae"]
    assert dict(zip(rejects["item"], rejects["reason"])).keys() == truth["broken"].keys()
    for key, reason in zip(rejects["item"], rejects["reason"]):
        assert truth["broken"][key] in reason

    norm = ingest.read_normalisation(lake, "tinyvae").to_dict()
    # statistics: the same sample through a naive percentile computation
    sample = ingest.stats_sample(sites[sites["Metadata_SiteKey"].isin(
        ingest.select_sites(lake, "train")["Metadata_SiteKey"])], 8, 0)
    imgs = [truth["images"][k].astype(np.float32) / truth["illum"][k.split("/")[2]]
            if k.split("/")[2] in truth["illum"] else truth["images"][k]
            for k in sample["Metadata_SiteKey"] if k not in truth["broken"]]
    ref_norm = robust_percentiles(imgs, 1.0, 99.0)
    np.testing.assert_allclose(norm["low"], ref_norm.low, rtol=1e-5)
    np.testing.assert_allclose(norm["high"], ref_norm.high, rtol=1e-5)

    index = lake.read_named("latent_index").to_pandas()
    arr = ingest.open_latents(lake, "tinyvae", mode="r")
    assert arr.dtype == np.float16 and arr.shape[1:] == (8, CROP // 8, CROP // 8)
    assert arr.attrs["vae_id"] == "tinyvae" and arr.attrs["scaling_factor"] == pytest.approx(0.7)
    assert arr.attrs["channel_groups"] == [[0, 1, 2], [2, 3, 4]]
    assert arr.attrs["normalisation"]["low"] == norm["low"]
    assert set(index["Metadata_SiteKey"]) == set(sites["Metadata_SiteKey"]) - set(truth["broken"])
    # every plate starts on a shard boundary and owns whole shards
    for unit in lake.committed_units("ingest-tinyvae"):
        info = lake.unit_info("ingest-tinyvae", unit)
        assert info["offset"] % 4 == 0 and info["rows"] % 4 == 0
    model = ChannelGroupAutoencoder.from_pretrained(os.path.join(tmp, "vae"))
    ref = reference_latents(model, truth["images"], index["Metadata_SiteKey"], norm, truth["illum"])
    got = arr[:][index["Metadata_LatentRow"].to_numpy()]
    want = np.stack([ref[k] for k in index["Metadata_SiteKey"]])
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3)
    # rows not in the index are padding (NaN)
    unused = np.setdiff1d(np.arange(arr.shape[0]), index["Metadata_LatentRow"].to_numpy())
    assert np.isnan(arr[:][unused].astype(np.float32)).all()
    # index metadata agrees with the catalog
    merged = index.merge(sites, on="Metadata_SiteKey", suffixes=("", "_cat"))
    assert (merged["Metadata_JCP2022"] == merged["Metadata_JCP2022_cat"]).all()


def test_ingest_killed_and_concurrent_runs_give_identical_output(local_lake, ray_cluster):
    """Run A is uninterrupted and loads the same VAE through the from_pretrained(path, subfolder="vae") path.
    Cache B is made by runs that meet another live run: it creates the cache (they wait for it), then holds
    plate P and has half-written its rows; they add every other plate without touching P or recreating the
    cache. That run is then killed, and a rerun takes its claim over and does P alone: B equals A."""
    import subprocess
    import threading
    import time

    from pipelines import catalog, ingest
    from cpldm_core.load_data import CatalogConfig

    build_raw_lake(local_lake, corrupt=True)
    catalog.run(local_lake, CatalogConfig())
    tmp = save_tiny_vae(local_lake)
    a = ingest.run(local_lake, ingest_config(vae=tmp, vae_subfolder="vae", vae_id="a"))
    assert a["vae_id"] == "a"
    info_a = {u: local_lake.unit_info("ingest-a", u) for u in local_lake.committed_units("ingest-a")}
    other = subprocess.Popen(["sleep", "300"])  # the other run's process: alive, on this host
    try:
        hold_claim(local_lake, "ingest-b", ingest.CACHE_UNIT, other.pid)   # it is creating cache B
        created = threading.Thread(target=ingest.run, args=(local_lake, ingest_config(vae_id="b")),
                                   kwargs={"max_units": 0})
        created.start()
        time.sleep(2.0)
        assert created.is_alive() and not local_lake.exists("latents/b/normalisation.json")   # waits for it
        local_lake.release_unit("ingest-b", ingest.CACHE_UNIT)
        created.join()
        # ... which now holds plate P and has half-written it (a task writes its rows before the commit)
        held = sorted(info_a)[1]
        hold_claim(local_lake, "ingest-b", held, other.pid)
        arr_b = ingest.open_latents(local_lake, "b")
        offset = info_a[held]["offset"]
        arr_b[offset:offset + 4] = np.full((4, *arr_b.shape[1:]), 7.0, np.float16)
        first = ingest.run(local_lake, ingest_config(vae_id="b"), max_units=2)
        second = ingest.run(local_lake, ingest_config(vae_id="b", batch_size=2))   # resources may change
        assert local_lake.committed_units("ingest-b") == set(info_a) - {held}
        assert (arr_b[offset:offset + 4] == 7.0).all()   # P untouched, the cache not created again
        assert (first["units_written"], first["units_busy"]) == (2, 1)
        assert (second["units_written"], second["units_busy"]) == (a["units"] - 3, 1)
        # every claim of these runs is released: only the other run's is left
        assert [p.rsplit("/", 1)[-1] for p in local_lake.ls("_claims/ingest-b")] == [f"{held}.json"]
        stamps = {u: local_lake.unit_info("ingest-b", u)["time"] for u in local_lake.committed_units("ingest-b")}
    finally:
        other.kill()
        other.wait()
    # the other run died: its plate is taken over, this time read and encoded in fused actors (same bytes)
    resumed = ingest.run(local_lake, ingest_config(vae_id="b", fuse_read_encode=True))
    assert (resumed["units_written"], resumed["units_busy"], resumed["units_committed"]) == (1, 0, a["units"])
    assert {u: local_lake.unit_info("ingest-b", u)["time"] for u in stamps} == stamps   # no plate done twice
    za, zb = ingest.open_latents(local_lake, "a", mode="r")[:], ingest.open_latents(local_lake, "b", mode="r")[:]
    np.testing.assert_array_equal(za, zb)   # NaN == NaN here
    ia = local_lake.read_table("latents/index/vae=a").to_pandas().sort_values("Metadata_LatentRow")
    ib = local_lake.read_table("latents/index/vae=b").to_pandas().sort_values("Metadata_LatentRow")
    pd.testing.assert_frame_equal(ia.reset_index(drop=True), ib.reset_index(drop=True))
    assert a["rejected"] == resumed["rejected"] == 4
    # only resources changed: nothing is recomputed, the cache's bytes and record stay as they were
    record = local_lake.read_bytes("latents/b/_artifact.json")
    third = ingest.run(local_lake, ingest_config(vae_id="b", batch_size=3, read_concurrency=2, encode_concurrency=2,
                                                 num_cpus_read=0.25, num_cpus_encode=0.5))
    assert third["units_written"] == 0 and third["units_skipped"] == a["units"]
    np.testing.assert_array_equal(ingest.open_latents(local_lake, "b", mode="r")[:], zb)
    assert local_lake.read_bytes("latents/b/_artifact.json") == record
    cache = ingest.read_latent_cache(local_lake, "b")
    assert cache.inputs["vae"].id == "tinyvae" and cache.latent_shape == (8, CROP // 8, CROP // 8)
    assert list(cache.normalisation_low) == ingest.read_normalisation(local_lake, "b").to_dict()["low"]
    assert cache.resources["batch_size"] == 4 and "batch_size" not in cache.config
    with pytest.raises(ValueError, match="fuse_read_encode is for CPU encoding"):
        ingest_config(fuse_read_encode=True, num_gpus=1.0)
    # a changed science field is refused (naming it) instead of silently mixing caches
    from cpldm_core.errors import UserError
    with pytest.raises(UserError, match=r"another config.*\(config.high_percentile, high_percentile differ\)"):
        ingest.run(local_lake, ingest_config(vae_id="b", high_percentile=99.5))
    # so is a VAE refitted under the same name (its record's fingerprint moved)
    save_tiny_vae(local_lake, seed=1)
    with pytest.raises(UserError, match=r"another config.*\(inputs.vae differ\)"):
        ingest.run(local_lake, ingest_config(vae_id="b"))
    # a cache made before records existed names the command that rebuilds it
    from storage_schemas.artifacts import ArtifactMissing
    local_lake.delete("latents/a/_artifact.json")
    with pytest.raises(ArtifactMissing, match=r"`cpldm ingest --vae-id a --force`"):
        ingest.run(local_lake, ingest_config(vae=tmp, vae_subfolder="vae", vae_id="a"))


def test_ingest_reads_real_cpg0016_layout_from_s3(s3_endpoint, local_lake, ray_cluster):
    """Real load_data with s3://cellpainting-gallery/cpg0016-jump/... URLs and illum .npy, served by moto."""
    import boto3
    from cpldm_core.load_data import CatalogConfig
    from pipelines import catalog, ingest
    from conftest import shared_path

    example = shared_path("data/jump-metadata/example_load_data/"
                          "current_csv__source_4__2021_04_26_Batch1__BR00117035__load_data_with_illum_A01_site1.csv")
    raw = pd.read_csv(example, dtype=str)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    try:
        s3.create_bucket(Bucket="cellpainting-gallery")
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    rng = np.random.default_rng(3)
    img = rng.integers(100, 4000, (5, IMAGE_PX, IMAGE_PX)).astype(np.uint16)
    illum = rng.uniform(0.8, 1.2, (5, IMAGE_PX, IMAGE_PX)).astype(np.float32)
    for j, ch in enumerate(CHANNELS):
        s3.put_object(Bucket="cellpainting-gallery", Key=raw[f"URL_Orig{ch}"][0][len("s3://cellpainting-gallery/"):],
                      Body=tiff_bytes(img[j]))
        buf = io.BytesIO()
        np.save(buf, illum[j])
        s3.put_object(Bucket="cellpainting-gallery", Key=raw[f"URL_Illum{ch}"][0][len("s3://cellpainting-gallery/"):],
                      Body=buf.getvalue())
    real_example_metadata(local_lake)
    catalog.run(local_lake, CatalogConfig(unseen_compound_fraction=0.0, heldout_batch_fraction=0.0),
                load_data=[str(example)])
    save_tiny_vae(local_lake)
    summary = ingest.run(local_lake, ingest_config(stats_sites=1, low_percentile=0.0, high_percentile=100.0))
    assert summary["encoded_sites"] == 1 and summary["rejected"] == 0
    norm = ingest.read_normalisation(local_lake, "tinyvae")
    corrected = img.astype(np.float32) / illum
    np.testing.assert_allclose(norm.low, corrected.reshape(5, -1).min(axis=1), rtol=1e-5)
    np.testing.assert_allclose(norm.high, corrected.reshape(5, -1).max(axis=1), rtol=1e-5)


# ---------------------------------------------------------------------------------------------- VAE resolution
@pytest.fixture
def no_network(monkeypatch):
    """Any connection or DNS lookup in this process to a host other than 127.0.0.1/localhost raises at once and
    is recorded. HF_HUB_OFFLINE is switched off, so it is not what keeps the model hub away."""
    import socket

    import huggingface_hub.constants as hf_constants

    local = {"127.0.0.1", "localhost", "::1"}
    attempts: list[str] = []

    def guard(host):
        if str(host) not in local:
            attempts.append(str(host))
            raise OSError(f"network blocked in this test: {host}")

    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_create, real_gai = socket.create_connection, socket.getaddrinfo

    def connect(self, address):
        if isinstance(address, tuple):
            guard(address[0])
        return real_connect(self, address)

    def connect_ex(self, address):
        if isinstance(address, tuple):
            guard(address[0])
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: (guard(address[0]), real_create(address, *a, **k))[1])
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: (guard(host), real_gai(host, *a, **k))[1])
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    return attempts


def test_vae_resolution_never_turns_a_lake_name_into_a_hub_request(local_lake, no_network):
    from cpldm_core.autoencoder import DEFAULT_GROUPS
    from cpldm_core.errors import UserError
    from pipelines import ingest
    from storage_schemas.artifacts import ArtifactMissing

    with pytest.raises(UserError, match=r"no VAE given and .*/vae holds none.*run `cpldm fit-vae` first"):
        ingest.resolve_vae(local_lake, "", None)
    save_tiny_vae(local_lake, "fitted-tiny")
    source = ingest.resolve_vae(local_lake, "", None)           # no VAE given: the lake's only one
    assert source == {"vae_id": "fitted-tiny", "kind": "lake", "path": "vae/fitted-tiny", "subfolder": None}
    assert ingest.load_autoencoder(local_lake, source, DEFAULT_GROUPS).scaling_factor == pytest.approx(0.7)
    with pytest.raises(UserError, match=r"no VAE 'fitted-small' in .*/vae \(it holds fitted-tiny\); run "
                                        r"`cpldm fit-vae --vae-id fitted-small`") as info:
        ingest.resolve_vae(local_lake, "fitted-small", None)     # the old default preset's name
    assert "\n" not in str(info.value)
    save_tiny_vae(local_lake, "other", seed=1)
    with pytest.raises(UserError, match=r"no VAE given and .*/vae holds fitted-tiny, other: pass --vae"):
        ingest.resolve_vae(local_lake, "", None)
    assert ingest.resolve_vae(local_lake, "lake:other", None, vae_id="c")["vae_id"] == "c"
    with pytest.raises(UserError, match="not a VAE in the lake, not a directory and not a hub id"):
        ingest.resolve_vae(local_lake, "./no/such/dir", None)
    # a lake VAE without a record (made by hand or by an older cpldm) names the command that makes one
    local_lake.delete("vae/other/_artifact.json")
    with pytest.raises(ArtifactMissing, match=r"vae/other/_artifact.json: no VaeModel record.*"
                                              r"`cpldm fit-vae --vae-id other --force`"):
        ingest.vae_ref(local_lake, ingest.resolve_vae(local_lake, "other", None))
    assert no_network == []
    # an explicit hub id is recognised without a request (it is downloaded only when loaded)
    hub = ingest.resolve_vae(local_lake, "stabilityai/sdxl-vae", "vae")
    assert hub["kind"] == "hub" and hub["vae_id"] == "stabilityai--sdxl-vae--vae" and no_network == []
    # the guard is live and the hub client is not in offline mode: had anything above asked, it would show
    import huggingface_hub.constants
    import socket
    assert not huggingface_hub.constants.is_offline_mode()
    with pytest.raises(OSError, match="network blocked"):
        socket.create_connection(("huggingface.co", 443), timeout=1)
    assert no_network == ["huggingface.co"]

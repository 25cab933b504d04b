"""Cluster tooling: AWS launcher YAML vs ray's own schema, KubeRay manifests, a local head running a stage as a
``ray job submit`` job, and a two-node ``ray.cluster_utils.Cluster`` that loses a node mid-stage.

The two-node scenario cannot share the session's in-process Ray, so it runs in a subprocess: this file is
also a script (``python tests/test_cluster.py two-node <lake dir>``).
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RAY_SCHEMA = "autoscaler/ray-schema.json"
SMILES = ["CCO", "CCN", "c1ccccc1", "CS(C)=O", "CC(=O)Oc1ccccc1C(=O)O", "c1ccncc1", "CCCl", "OCC(O)CO",
          "CC(C)Cc1ccc(cc1)C(C)C(=O)O", "CN1C=NC2=C1C(=O)N(C)C(=O)N2C", "C1CCCCC1", "CC#N"]


def write_smiles(path: Path, smiles=SMILES, prefix="CMP") -> Path:
    rows = ["ID,SMILES"] + [f"{prefix}_{i:03d},{s}" for i, s in enumerate(smiles)]
    path.write_text("\n".join(rows) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- AWS YAML
def load_aws() -> dict:
    return yaml.safe_load((ROOT / "cluster" / "aws.yaml").read_text())


def test_aws_yaml_validates_against_ray_autoscaler_schema():
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.__file__).parent / RAY_SCHEMA).read_text())
    config = load_aws()
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))  # ray's own check after filling defaults
    # the schema is strict enough to catch a typo in our config
    broken = copy.deepcopy(config)
    broken["available_node_types"]["cpu_worker"]["resources"]["CPU"] = "sixteen"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_aws_yaml_shape():
    config = load_aws()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"]                      # head on demand
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    instance = {v["node_config"]["InstanceType"].split(".")[0] for v in workers.values()}
    assert {"g6e", "p4d", "p5"} <= instance and any(v["resources"].get("GPU", 0) == 0 for v in workers.values())
    for name, node in types.items():
        assert "instance-profile" in node["node_config"]["IamInstanceProfile"]["Arn"], name   # S3 via profile
    for name, node in workers.items():
        assert node["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot", name
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2 and "--dashboard-host=127.0.0.1" in start
    opened = {(p["FromPort"], p["ToPort"]) for p in config["provider"]["security_group"]["IpPermissions"]}
    assert opened == {(22, 22)}                                                    # dashboard never public
    setup = " ".join(config["setup_commands"])
    assert "-c ~/cpldm/constraints.txt" in setup and "@${CPLDM_VERSION}" in setup
    assert config["file_mounts"]["~/cpldm/constraints.txt"] == "./constraints.txt"
    assert (ROOT / "constraints.txt").exists()


# ---------------------------------------------------------------------------------------------- KubeRay
def load_manifests(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((ROOT / "cluster" / "kuberay" / name).read_text()) if d]


def check_cluster_spec(spec: dict) -> None:
    import ray

    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"]["mode"] == "token"
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and g["maxReplicas"] >= 1
        container = g["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"] == container["resources"]["requests"]
        assert g["template"]["spec"]["serviceAccountName"] == "cpldm-ray"
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu["nvidia.com/gpu"]) >= 1
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_kuberay_raycluster_manifest():
    docs = load_manifests("raycluster.yaml")
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"ServiceAccount", "RayCluster"}                # no Ingress, no LoadBalancer
    assert kinds["RayCluster"]["apiVersion"] == "ray.io/v1"
    assert any(k.endswith("role-arn") for k in kinds["ServiceAccount"]["metadata"]["annotations"])  # IRSA
    check_cluster_spec(kinds["RayCluster"]["spec"])


def test_kuberay_rayjob_manifest():
    (job,) = load_manifests("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("cpldm --lake s3://")
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1
    yaml.safe_load(spec["runtimeEnvYAML"])
    check_cluster_spec(spec["rayClusterSpec"])


def test_runtime_env_file_is_valid():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # raises on unknown fields / wrong types
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN"} & set(env["env_vars"])


# ---------------------------------------------------------------------------------------------- local head
def _short_temp() -> str:
    return tempfile.mkdtemp(prefix="cr", dir="/tmp")   # short: Ray's socket paths live below it


@pytest.mark.slow
def test_local_head_runs_a_stage_as_a_job(tmp_path):
    from pipelines import cluster_local, embed
    from pipelines.storage import Lake
    from ray.job_submission import JobStatus, JobSubmissionClient

    temp = _short_temp()
    gcs_port, dashboard_port = cluster_local.free_ports(2)
    head = cluster_local.up_local(port=gcs_port, dashboard_port=dashboard_port, temp_dir=temp,
                                  num_cpus=2, object_store_bytes=int(2e8))
    try:
        assert cluster_local.status_local(temp)["gcs_up"]
        lake_dir = tmp_path / "lake"
        smiles = write_smiles(tmp_path / "cmp.csv")
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        env.pop("RAY_ADDRESS", None)
        job_id = f"cpldm-embed-{uuid.uuid4().hex[:8]}"
        cmd = [cluster_local.ray_executable(), "job", "submit", "--address", head.dashboard_url,
               "--submission-id", job_id, "--working-dir", str(ROOT), "--",
               "cpldm", "--lake", str(lake_dir), "embed", "--no-catalog", "--smiles", str(smiles),
               "--preset", "tiny"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        client = JobSubmissionClient(head.dashboard_url)
        assert client.get_job_status(job_id) == JobStatus.SUCCEEDED
        logs = client.get_job_logs(job_id)
        assert '"embedded": 12' in logs
        got = embed.load_embeddings(Lake(str(lake_dir)), "morgan-r2-256")
        assert got.ids.tolist() == [f"CMP_{i:03d}" for i in range(len(SMILES))]
    finally:
        stopped = cluster_local.down_local(temp)
    assert stopped["processes"] > 0
    assert cluster_local.head_processes(temp) == []                # its own processes, all gone


def test_down_local_without_head_is_a_user_error():
    from cpldm_core.errors import UserError
    from pipelines import cluster_local

    with pytest.raises(UserError, match="no local head"):
        cluster_local.down_local(_short_temp())


# ---------------------------------------------------------------------------------------------- two nodes
@pytest.mark.slow
def test_two_node_cluster_survives_losing_a_node(tmp_path):
    """Units run on both nodes; the worker node is killed mid-stage (and replaced, as the autoscaler would
    replace a lost spot node); the stage completes with every compound exactly once."""
    lake_dir = tmp_path / "lake"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, __file__, "two-node", str(lake_dir)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print("two-node report:", {k: v for k, v in report.items() if k != "smiles"})
    assert report["killed"], report
    # both workers had committed units when one was killed. (Afterwards Ray may re-run units whose outputs
    # lived on the lost node - lineage reconstruction - which rewrite identical files and their markers.)
    assert len(report["nodes_at_kill"]) >= 2 and report["victim"] in report["nodes_at_kill"], report
    assert set(report["marker_nodes"]) - {report["victim"]}, report   # survivors finished the stage
    assert report["killed_after_units"] < report["units"], report   # killed while units were left

    import numpy as np

    from cpldm_core import compounds as cc
    from pipelines import embed
    from pipelines.storage import Lake

    lake = Lake(str(lake_dir))
    got = embed.load_embeddings(lake, "morgan-r2-256")
    expected_ids = sorted(f"N2_{i:03d}" for i in range(report["n"]))
    assert got.ids.tolist() == expected_ids                         # each compound once, none lost
    table = embed.read_embeddings_table(lake, "morgan-r2-256")
    assert table.num_rows == report["n"]
    smiles = dict(zip(expected_ids, report["smiles"]))
    ref = cc.MorganEncoder(cc.embed_preset("tiny")).encode([smiles[i] for i in got.ids])["pooled"]
    np.testing.assert_array_equal(got.pooled, ref)
    assert len(lake.committed_units(embed.unit_stage("morgan-r2-256"))) == report["units"]


def _two_node_scenario(lake_dir: str) -> dict:
    """Run in a fresh process: a head without CPUs (as in cluster/aws.yaml) + two 1-CPU worker nodes, embed in
    units of 4 compounds, kill worker 1 once both workers have committed units, add a replacement node."""
    import threading

    import ray
    from ray.cluster_utils import Cluster

    from cpldm_core import compounds as cc
    from pipelines import embed
    from pipelines.storage import Lake

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    smiles = SMILES * 6                                              # 72 compounds, 18 units
    n = len(smiles)
    tmp = Path(lake_dir).parent
    write_smiles(tmp / "n2.csv", smiles, prefix="N2")
    lake = Lake(lake_dir)
    lake.init()
    node_args = {"object_store_memory": int(1e8), "node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, **node_args})
    victim = cluster.add_node(num_cpus=1, **node_args)
    cluster.add_node(num_cpus=1, **node_args)
    ray.init(address=cluster.address, logging_level="WARNING")
    cluster.wait_for_nodes()
    cfg = cc.EmbedConfig(morgan_bits=256, block_size=4, token_chunk_rows=4, concurrency=2, unit_pause_s=1.0)
    stage = embed.unit_stage(cc.encoder_id(cfg))
    killed = {}

    def nodes_done() -> set:
        found = set()
        for unit in lake.committed_units(stage):
            try:
                found.add(lake.unit_info(stage, unit)["node"])
            except (OSError, ValueError):  # marker being written right now
                pass
        return found

    def killer():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            nodes = nodes_done()
            if victim.node_id in nodes and len(nodes) >= 2:   # both workers busy: kill one mid-unit
                cluster.remove_node(victim, allow_graceful=False)
                killed["after_units"] = len(lake.committed_units(stage))
                killed["nodes"] = sorted(nodes)
                cluster.add_node(num_cpus=1, **node_args)     # the autoscaler would replace a lost spot node
                return
            time.sleep(0.1)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    summary = embed.run(lake, cfg, smiles_file=str(tmp / "n2.csv"), include_catalog=False)
    thread.join(timeout=60)
    nodes = sorted(nodes_done())
    ray.shutdown()
    cluster.shutdown()
    return {"n": n, "smiles": smiles, "units": summary["units"], "embedded": summary["embedded"],
            "killed": bool(killed), "killed_after_units": killed.get("after_units"),
            "nodes_at_kill": killed.get("nodes", []), "marker_nodes": nodes,
            "victim": victim.node_id}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "two-node":
        sys.path.insert(0, str(ROOT))
        print(json.dumps(_two_node_scenario(sys.argv[2])))
    else:
        sys.exit("usage: python tests/test_cluster.py two-node LAKE_DIR")

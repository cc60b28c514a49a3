"""Deployment files: the KubeRay manifest against the operator's CRD schema, the cluster YAML parses."""

from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = REPO.parent / "shared" / "schemas" / "kuberay"


def _crd_schema(name: str, version: str) -> dict:
    crd = yaml.safe_load((SCHEMAS / name).read_text())
    [entry] = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return entry["schema"]["openAPIV3Schema"]


@pytest.mark.skipif(not SCHEMAS.is_dir(), reason="KubeRay CRD schemas are not beside the checkout")
def test_rayjob_manifest_matches_the_kuberay_crd():
    manifest = yaml.safe_load((REPO / "infra/k8s/rayjob.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    jsonschema.validate(manifest, _crd_schema("ray.io_rayjobs.yaml", "v1"))
    assert manifest["spec"]["entrypoint"].startswith("forgetless run ")


@pytest.mark.slow  # runs the CRD checker as a subprocess (~7 s)
@pytest.mark.skipif(not SCHEMAS.is_dir(), reason="KubeRay CRD schemas are not beside the checkout")
def test_crd_check_can_fail():
    manifest = yaml.safe_load((REPO / "infra/k8s/rayjob.yaml").read_text())
    manifest["spec"]["shutdownAfterJobFinishes"] = "yes"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(manifest, _crd_schema("ray.io_rayjobs.yaml", "v1"))


def test_cluster_yaml_names_the_image_and_gpu_workers():
    cluster = yaml.safe_load((REPO / "infra/ray/cluster.yaml").read_text())
    assert cluster["docker"]["image"] == "forgetless:latest"
    assert cluster["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1


def _containers(manifest: dict) -> dict[str, dict]:
    spec = manifest["spec"]
    cluster = spec["rayClusterSpec"]
    pods = [spec["submitterPodTemplate"], cluster["headGroupSpec"]["template"],
            *(group["template"] for group in cluster["workerGroupSpecs"])]
    return {c["name"]: c for pod in pods for c in pod["spec"]["containers"]}


def test_every_ray_container_of_the_rayjob_runs_with_token_auth_from_a_secret():
    manifest = yaml.safe_load((REPO / "infra/k8s/rayjob.yaml").read_text())
    containers = _containers(manifest)
    assert set(containers) == {"ray-job-submitter", "ray-head", "ray-worker"}
    for name, container in containers.items():
        env = {e["name"]: e for e in container.get("env", [])}
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", name
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"], name  # never a literal token


def test_mlflow_on_the_cluster_asks_for_credentials_that_come_from_a_secret_and_reach_every_logger():
    config_map, deployment, service = yaml.safe_load_all((REPO / "infra/k8s/mlflow.yaml").read_text())
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[command.index("--app-name") + 1] == "basic-auth" and "--allowed-hosts" in command
    env = {e["name"]: e for e in container["env"]}
    for key in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert "secretKeyRef" in env[key]["valueFrom"], key
    assert "authenticate_request_basic_auth" in config_map["data"]["basic_auth.ini"]
    assert "NO_PERMISSIONS" in config_map["data"]["basic_auth.ini"]  # a stranger with an account reads nothing
    job = yaml.safe_load((REPO / "infra/k8s/rayjob.yaml").read_text())
    for name in ("ray-head", "ray-worker"):  # the driver and the scheduler log from these
        env = {e["name"]: e for e in _containers(job)[name]["env"]}
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            assert env[key]["valueFrom"]["secretKeyRef"]["name"] == "forgetless-mlflow", (name, key)
    assert "@" not in job["spec"]["entrypoint"] and "password" not in job["spec"]["entrypoint"].lower()


def test_the_network_policy_admits_only_forgetless_pods_to_every_forgetless_pod():
    policy = yaml.safe_load((REPO / "infra/k8s/networkpolicy.yaml").read_text())
    ours = {"app.kubernetes.io/part-of": "forgetless"}
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["podSelector"]["matchLabels"] == ours
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": ours}}]}]  # any port, our pods only
    job = yaml.safe_load((REPO / "infra/k8s/rayjob.yaml").read_text())
    spec = job["spec"]
    pods = [spec["submitterPodTemplate"], spec["rayClusterSpec"]["headGroupSpec"]["template"],
            *(g["template"] for g in spec["rayClusterSpec"]["workerGroupSpecs"])]
    _, deployment, _ = yaml.safe_load_all((REPO / "infra/k8s/mlflow.yaml").read_text())
    for pod in [*pods, deployment["spec"]["template"]]:
        assert pod["metadata"]["labels"].items() >= ours.items()


def test_the_cluster_yaml_starts_every_node_with_token_auth_and_the_dashboard_on_loopback():
    cluster = yaml.safe_load((REPO / "infra/ray/cluster.yaml").read_text())
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in cluster[key]
              if "ray start" in c]
    assert len(starts) == 2 and all(c.startswith("RAY_AUTH_MODE=token ray start") for c in starts)
    assert "--dashboard-host=127.0.0.1" in starts[0] and "0.0.0.0" not in " ".join(starts)
    assert "~/.ray/auth_token" in cluster["file_mounts"]


@pytest.mark.slow  # the whole check script on the CPU (~16 s)
def test_the_gpu_check_script_runs_its_whole_path_on_a_cpu(tmp_path):
    """The GPU check cannot run here, but everything in it except CUDA can: tiny models, gloo; both
    architectures at ZeRO-3, the stage with the most of its own (partitioned weights gathered to
    save and restore; the learner's tests run every stage)."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "infra/scripts/gpu_check.py", "--out", str(tmp_path), "--smoke",
                             "--archs", "t5,bart", "--zero", "3"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failures"] == []
    assert [(r["arch"], r["zero_stage"]) for r in report["runs"]] == [("t5", 3), ("bart", 3)]
    for run in report["runs"]:
        assert run["collectives"] == "ok" and run["tokens_per_s"] > 0 and run["restore"]["matches"], run
        assert run["restore"]["loss_saved"] == run["restore"]["loss_restored"]  # fp32: exactly


def test_gpu_check_wrapper_names_its_output_dir():
    result = __import__("subprocess").run(["bash", str(REPO / "infra/scripts/gpu_check.sh")], capture_output=True,
                                          text=True)
    assert result.returncode != 0 and "usage: infra/scripts/gpu_check.sh OUT_DIR" in result.stderr


def test_serve_sh_refuses_to_listen_beyond_loopback_without_authentication(tmp_path):
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_AUTH_ADMIN_PASSWORD"}
    result = subprocess.run(["bash", str(REPO / "infra/mlflow/serve.sh"), str(tmp_path / "store"), "5999"],
                            env={**env, "MLFLOW_HOST": "0.0.0.0"}, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "without authentication: set MLFLOW_AUTH_ADMIN_PASSWORD" in result.stderr
    assert not (tmp_path / "store").exists()  # refused before anything was made

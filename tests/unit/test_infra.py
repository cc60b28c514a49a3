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

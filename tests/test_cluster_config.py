"""The other deployment files: ray_cluster.yaml against the schema inside the installed Ray, and the
Dockerfile, the Ray pins and the images agreeing with pyproject.toml and the Kubernetes manifests."""

from __future__ import annotations

import copy
import json
import re
import tomllib
from pathlib import Path

import jsonschema
import ray
import ray.autoscaler
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tests.test_manifests import REPO, ray_pod_templates, raycronjob, rayjob


def test_ray_cluster_yaml_validates():
    from ray.autoscaler._private.util import prepare_config, validate_config  # what `ray up` uses

    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))  # defaults merged, as before touching AWS

    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    crf = [t for t in types.values() if "crf_node" in t["resources"]]
    assert len(gpu) == 1 and gpu[0]["resources"]["gpu_node"] >= 1
    assert len(crf) == 1 and "GPU" not in crf[0]["resources"] and "gpu_node" not in crf[0]["resources"]


def dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def test_versions_and_images_agree():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (ray_pin,) = [d for d in project["dependencies"] if re.match(r"ray(\[.*\])?==", d)]
    ray_version = ray_pin.split("==")[1]
    assert ray.__version__ == ray_version
    base = re.search(r"RAY_IMAGE=rayproject/ray:([\d.]+)-py(\d)(\d+)\b", dockerfile())
    assert base and base.group(1) == ray_version
    assert Version(f"{base.group(2)}.{base.group(3)}.0") in SpecifierSet(project["requires-python"])

    job, cron = rayjob()["spec"], raycronjob()["spec"]["jobTemplate"]
    assert job["rayClusterSpec"]["rayVersion"] == cron["rayClusterSpec"]["rayVersion"] == ray_version
    images = {c["image"] for t in ray_pod_templates(job).values() for c in t["spec"]["containers"]}
    cluster = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    assert images == {cluster["docker"]["image"]}  # one job image everywhere


def test_dockerfile_runs_as_the_pods_user_in_their_working_dir():
    final_stage = dockerfile().rsplit("\nFROM ", 1)[1]
    user = re.findall(r"^USER (\d+):(\d+)$", final_stage, re.M)[-1]
    workdir = re.findall(r"^WORKDIR (\S+)$", final_stage, re.M)[-1]
    for name, template in ray_pod_templates(rayjob()["spec"]).items():
        pod = template["spec"]
        assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == tuple(map(int, user))
        if name != "submitter":  # Ray starts in workingDir, so the job's relative script path resolves
            assert pod["containers"][0]["workingDir"] == workdir
    assert int(user[0]) != 0
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "outputs"} <= set(ignored)

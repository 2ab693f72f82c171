"""Offline checks of the Kubernetes manifests: core kinds against the Kubernetes schemas
(kubernetes-validate), RayJob/RayCronJob against the KubeRay CRDs vendored in tests/schemas, the objects
kustomize and the CronJob really produce, no drift from the job's CLI, no inline secrets."""

from __future__ import annotations

import copy
import datetime as dt
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pipeline.cli import build_parser, config_from_args, drop_empty
from tests.conftest import DEMO_BUCKET, S3_ENV

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
# Vendored, unmodified; source and checksums in tests/schemas/kuberay-v1.7.0/README.md.
KUBERAY_CRDS = Path(__file__).resolve().parent / "schemas" / "kuberay-v1.7.0"
# The oldest Kubernetes the manifests target (CronJob timeZone, restricted pods) and the newest known.
K8S_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())
PLACEHOLDER = "__RUN_DATE__"
RUN_DATE = "2026-11-24"
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|KEY|CREDENTIAL", re.I)


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.load_all(path.read_text(), Loader=yaml.CSafeLoader) if d]


def rayjob(date: str = RUN_DATE) -> dict:
    """The RayJob exactly as the CronJob creates it for ``date``."""
    return yaml.safe_load((K8S / "rayjob.yaml").read_text().replace(PLACEHOLDER, date))


def raycronjob() -> dict:
    return load_docs(K8S / "raycronjob.yaml")[0]


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


# --- kustomize ---------------------------------------------------------------------------------

SUPPORTED_KUSTOMIZE_KEYS = {"apiVersion", "kind", "namespace", "resources", "configMapGenerator", "generatorOptions"}


def render_kustomization(root: Path = K8S) -> list[dict]:
    """kustomize build for the features kustomization.yaml uses (it fails on any other feature)."""
    k = yaml.safe_load((root / "kustomization.yaml").read_text())
    assert set(k) <= SUPPORTED_KUSTOMIZE_KEYS, f"extend render_kustomization for {set(k) - SUPPORTED_KUSTOMIZE_KEYS}"
    options = k.get("generatorOptions", {})
    assert options.get("disableNameSuffixHash") is True, "hashed generator names are not rendered here"
    objects = [doc for res in k["resources"] for doc in load_docs(root / res)]
    for gen in k.get("configMapGenerator", []):
        metadata = {"name": gen["name"], "labels": dict(options.get("labels", {}))}
        data = {Path(f).name: (root / f).read_text() for f in gen["files"]}
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    for obj in objects:
        if obj["kind"] != "Namespace":  # cluster-scoped: kustomize leaves it without one
            obj["metadata"]["namespace"] = k["namespace"]
        for subject in obj.get("subjects", []):
            if subject["kind"] == "ServiceAccount":
                subject["namespace"] = k["namespace"]
    return objects


@functools.lru_cache
def rendered() -> tuple[dict, ...]:
    return tuple(render_kustomization())


def _key(obj: dict) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


@pytest.mark.skipif(not (shutil.which("kustomize") or shutil.which("kubectl")), reason="no kustomize binary")
def test_python_rendering_matches_real_kustomize():
    cmd = ["kustomize", "build", str(K8S)] if shutil.which("kustomize") else ["kubectl", "kustomize", str(K8S)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    real = [d for d in yaml.safe_load_all(out) if d]
    assert sorted(real, key=_key) == sorted(rendered(), key=_key)


# --- schemas -----------------------------------------------------------------------------------


def _strict(schema):
    """CRD schemas let unknown fields through (the API server prunes them silently); forbid them so a
    misspelt field fails here instead of being dropped in the cluster."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.lru_cache
def crd_validator(plural: str) -> jsonschema.Draft7Validator:
    crd = yaml.load((KUBERAY_CRDS / f"ray.io_{plural}.yaml").read_text(), Loader=yaml.CSafeLoader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def validate_crd(obj: dict, plural: str) -> None:
    assert obj["apiVersion"] == "ray.io/v1"
    errors = sorted(crd_validator(plural).iter_errors(obj), key=lambda e: str(list(e.path)))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:10])


def validate_k8s(obj: dict, version: str) -> None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{obj['kind']}/{obj['metadata'].get('name')} @ {'.'.join(map(str, e.path))}: {e.message}")


def ray_pod_templates(spec: dict) -> dict[str, dict]:
    """Every pod KubeRay makes from a RayJob spec: head, each worker group, the submitter."""
    cluster = spec["rayClusterSpec"]
    pods = {"head": cluster["headGroupSpec"]["template"], "submitter": spec["submitterPodTemplate"]}
    pods.update({g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]})
    return pods


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_objects_validate(version):
    objects = [*rendered(), *load_docs(K8S / "secret.example.yaml")]
    kinds = {"ServiceAccount", "Role", "RoleBinding", "CronJob", "ConfigMap", "Secret", "Namespace", "NetworkPolicy"}
    assert {o["kind"] for o in objects} == kinds
    for obj in objects:
        validate_k8s(obj, version)
    # The pods inside the KubeRay objects are core PodTemplateSpecs: hold them to the strict schema too.
    for name, spec in (("rayjob", rayjob()["spec"]), ("raycronjob", raycronjob()["spec"]["jobTemplate"])):
        for group, template in ray_pod_templates(spec).items():
            validate_k8s(
                {
                    "apiVersion": "v1",
                    "kind": "PodTemplate",
                    "metadata": {"name": f"{name}-{group}"},
                    "template": template,
                },
                version,
            )


def test_kuberay_objects_validate_against_crds():
    validate_crd(rayjob(), "rayjobs")
    validate_crd(raycronjob(), "raycronjobs")


def test_crd_validation_catches_misspelt_fields():
    job = rayjob()
    job["spec"]["shutdownAfterJobFinish"] = job["spec"].pop("shutdownAfterJobFinishes")
    with pytest.raises(AssertionError, match="shutdownAfterJobFinish"):
        validate_crd(job, "rayjobs")


# --- what the objects must say -----------------------------------------------------------------


def test_rayjob_contract():
    job = rayjob()
    spec = job["spec"]
    assert job["metadata"]["name"] == f"deeplab-segment-{RUN_DATE}"
    assert spec["shutdownAfterJobFinishes"] is True and spec["submissionMode"] == "K8sJobMode"
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 0
    groups = {g["groupName"]: g for g in spec["rayClusterSpec"]["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["tolerations"]
    assert "nvidia.com/gpu" not in json.dumps(groups["crf"]) and "tolerations" not in groups["crf"]["template"]["spec"]
    for name, template in ray_pod_templates(spec).items():
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        mounted = {}
        for c in pod["containers"]:
            assert c["resources"]["requests"] and c["resources"]["limits"], (name, c["name"])
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            mounted.update({m["mountPath"]: m["name"] for m in c["volumeMounts"]})
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounted["/tmp"]], name  # Ray's sessions and logs live in /tmp
        if name != "submitter":  # the Ray nodes: scraped by Prometheus on Ray's metrics port
            assert {"containerPort": 8080, "name": "metrics"} in pod["containers"][0]["ports"]
            assert template["metadata"]["annotations"]["prometheus.io/port"] == "8080"
            assert "emptyDir" in volumes[mounted["/dev/shm"]]
    autoscaler = spec["rayClusterSpec"]["autoscalerOptions"]
    assert autoscaler["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "tmp", "mountPath": "/tmp"} in autoscaler["volumeMounts"]


def test_cronjob_and_rbac():
    objects = rendered()
    (cron,) = by_kind(objects, "CronJob")
    (role,) = by_kind(objects, "Role")
    (binding,) = by_kind(objects, "RoleBinding")
    (account,) = by_kind(objects, "ServiceAccount")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    minute, hour, *days = cron["spec"]["schedule"].split()
    assert minute.isdigit() and hour.isdigit() and days == ["*", "*", "*"]  # once a night
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get"]}]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": account["metadata"]["namespace"]}
    ]
    containers = {c["name"]: c for c in pod["initContainers"] + pod["containers"]}
    assert containers["create"]["args"][:3] == ["create", "-f", "/work/rayjob.yaml"]
    assert containers["show"]["args"][:3] == ["get", "-f", "/work/rayjob.yaml"]


def run_render_script(tmp_path: Path) -> tuple[Path, str]:
    """Run the CronJob's render step with a real shell on the template the ConfigMap carries."""
    objects = rendered()
    (cron,) = by_kind(objects, "CronJob")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (render,) = [c for c in pod["initContainers"] if c["name"] == "render"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "template"]
    (template_map,) = [o for o in by_kind(objects, "ConfigMap") if o["metadata"]["name"] == volume["configMap"]["name"]]
    mount = next(m["mountPath"] for m in render["volumeMounts"] if m["name"] == "template")
    env = {e["name"]: e["value"] for e in render["env"]}
    template_file = Path(env["TEMPLATE"])
    assert template_file.parent == Path(mount)
    (tmp_path / "template").mkdir()
    (tmp_path / "template" / template_file.name).write_text(template_map["data"][template_file.name])
    out = tmp_path / "rayjob.yaml"
    env = {
        "PATH": os.environ["PATH"],
        "TEMPLATE": str(tmp_path / "template" / template_file.name),
        "RENDERED": str(out),
    }
    before = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    proc = subprocess.run([*render["command"], *render["args"]], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert before == dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"), "ran across midnight UTC; rerun"
    return out, before


def test_cronjob_creates_the_validated_rayjob(tmp_path):
    out, today = run_render_script(tmp_path)
    created = yaml.safe_load(out.read_text())
    assert PLACEHOLDER not in out.read_text()
    assert created == rayjob(today)  # the object validated above, for tonight's date
    assert created["metadata"]["name"] == f"deeplab-segment-{today}"
    # A DNS label, and short enough for the RayCluster/Service names KubeRay derives from it.
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", created["metadata"]["name"])
    assert len(created["metadata"]["name"]) <= 47
    validate_crd(created, "rayjobs")


def test_raycronjob_runs_the_same_job():
    template = copy.deepcopy(raycronjob()["spec"]["jobTemplate"])
    spec = rayjob()["spec"]
    assert template.pop("entrypoint").replace('"$(date -u +%Y-%m-%d)"', RUN_DATE) == spec.pop("entrypoint")
    assert template == spec


# --- the entrypoint against the CLI --------------------------------------------------------------


def configmap_data() -> dict[str, str]:
    (cm,) = load_docs(K8S / "configmap.yaml")
    return cm["data"]


def submitter_env(spec: dict) -> dict[str, str]:
    """The submitter container's environment, resolved from configmap.yaml as the kubelet would."""
    (container,) = spec["submitterPodTemplate"]["spec"]["containers"]
    data, env = configmap_data(), {}
    for var in container["env"]:
        ref = var["valueFrom"]["configMapKeyRef"]
        assert ref["name"] == "deeplab-pipeline-config"
        env[var["name"]] = data[ref["key"]]
    return env


def expand(entrypoint: str, env: dict[str, str]) -> list[str]:
    """The argv the driver gets: KubeRay's submitter runs `bash -c "ray job submit ... -- <entrypoint>"`,
    and `ray job submit` re-quotes that argv (shlex.join) for the driver's shell, which restores it."""
    proc = subprocess.run(
        ["bash", "--noprofile", "--norc", "-c", f"printf '%s\\0' {entrypoint}"],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.split("\0")[:-1]


def worker_groups(spec: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in spec["rayClusterSpec"]["workerGroupSpecs"]}


@pytest.mark.parametrize("source", ["rayjob", "raycronjob"])
def test_entrypoint_is_accepted_by_the_cli(source):
    spec = rayjob()["spec"] if source == "rayjob" else raycronjob()["spec"]["jobTemplate"]
    env = submitter_env(spec)
    assert set(re.findall(r"\$\{(\w+)\}", spec["entrypoint"])) <= set(env), "entrypoint uses an unset variable"
    argv = expand(spec["entrypoint"], env)
    assert argv[:2] == ["python", "jobs/segment_bucket.py"] and (REPO / argv[1]).is_file()
    parser = build_parser()
    args = parser.parse_args(drop_empty(argv[2:], parser))
    config = config_from_args(args, parser)
    # Empty ConfigMap values are unset flags: the model's own weights, no Pushgateway.
    assert config.weights_uri is None and config.pushgateway is None
    # The RayCronJob's submitter takes the run id from its clock; the CronJob renders it in.
    assert config.run_id == (RUN_DATE if source == "rayjob" else dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"))
    assert (config.input_uri, config.output_uri) == (configmap_data()["INPUT_URI"], configmap_data()["OUTPUT_URI"])
    assert config.compute.use_gpu is True and config.resume is True and config.incremental is True

    # The custom resources the actors ask for exist only on the worker group meant for them.
    groups = worker_groups(spec)
    for wanted, group in ((config.compute.infer_resources, "gpu"), (config.compute.crf_resources, "crf")):
        assert wanted, f"{group} actors are not pinned to their worker group"
        for name in wanted:
            offering = {g for g, s in groups.items() if name in s.get("resources", {})}
            assert offering == {group}, (name, offering)
        assert int(groups[group]["resources"][next(iter(wanted))]) >= 1


def test_entrypoint_ranges_agree_with_the_worker_groups():
    """Each pool's range reaches what its worker group holds at maxReplicas, and no further."""
    for spec in (rayjob()["spec"], raycronjob()["spec"]["jobTemplate"]):
        parser = build_parser()
        argv = expand(spec["entrypoint"], submitter_env(spec))
        compute = config_from_args(parser.parse_args(drop_empty(argv[2:], parser)), parser).compute
        groups = worker_groups(spec)
        for wanted, pool, per_actor in (
            (compute.infer_resources, compute.infer_actors, 1),
            (compute.crf_resources, compute.crf_actors, compute.crf_cpus),
        ):
            ((name, amount),) = wanted.items()
            (group,) = [g for g in groups.values() if name in g.get("resources", {})]
            actors_per_node = int(float(group["resources"][name]) / amount)
            if pool is compute.crf_actors:  # a CRF actor takes crf_cpus of the node's CPUs as well
                cpus = float(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
                actors_per_node = min(actors_per_node, int(cpus / per_actor))
            assert pool[1] == actors_per_node * group["maxReplicas"], (name, pool, group["maxReplicas"])
            assert group["minReplicas"] == 0 and pool[0] >= 1


def test_ray_cluster_yaml_command_uses_its_worker_types():
    """The example command in ray_cluster.yaml's header: accepted by the CLI, pools as large as the
    worker types hold at max_workers, actors pinned to their worker type."""
    text = (REPO / "ray_cluster.yaml").read_text()
    lines = [line[1:].strip() for line in text.splitlines() if line.startswith("#")]
    start = next(i for i, line in enumerate(lines) if "jobs/segment_bucket.py" in line)
    command = ""
    for line in lines[start:]:
        command += " " + line.removesuffix("\\").strip()
        if not line.endswith("\\"):
            break
    argv = expand(command.split(" -- ", 1)[1], {})
    parser = build_parser()
    compute = config_from_args(parser.parse_args(drop_empty(argv[2:], parser)), parser).compute
    types = yaml.safe_load(text)["available_node_types"]
    for wanted, pool in ((compute.infer_resources, compute.infer_actors), (compute.crf_resources, compute.crf_actors)):
        ((name, amount),) = wanted.items()
        (node,) = [t for t in types.values() if name in t["resources"]]
        per_node = min(int(node["resources"][name] / amount), int(node["resources"]["CPU"]))
        assert pool == (1, per_node * node["max_workers"]), (name, pool)
    assert compute.use_gpu is True and compute.crf_backend == "pydensecrf"


def _entrypoint_bucket(fs, uri: str, images: int) -> None:
    """The ConfigMap's INPUT_URI and LABELS_URI, on the loopback S3 server, holding ``images`` demo scenes."""
    demo = sorted((DEMO_BUCKET / "images").glob("*.jpg"))[:images]
    bucket = uri.removeprefix("s3://").split("/")[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    data = configmap_data()
    for image in demo:
        fs.pipe(f"{data['INPUT_URI'].removeprefix('s3://')}/{image.name}", image.read_bytes())
        label = DEMO_BUCKET / "labels" / f"{image.stem}.png"
        fs.pipe(f"{data['LABELS_URI'].removeprefix('s3://')}/{label.name}", label.read_bytes())


@pytest.mark.slow
@pytest.mark.parametrize("source", ["rayjob", "raycronjob"])
def test_shipped_entrypoint_dry_runs(source, ray_local, s3_env, s3_server):
    """The entrypoint as the submitter's bash expands it with the shipped ConfigMap, run through
    --dry-run against a local Ray and the loopback S3 server: it checks the weights, lists the
    bucket and plans the pools, prints the plan as its last stdout line, and writes nothing."""
    spec = rayjob()["spec"] if source == "rayjob" else raycronjob()["spec"]["jobTemplate"]
    data = configmap_data()
    _entrypoint_bucket(s3_env, data["INPUT_URI"], 5)
    argv = expand(spec["entrypoint"], submitter_env(spec))
    env = {
        **os.environ,
        **S3_ENV,
        "AWS_ENDPOINT_URL": s3_server,
        "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
    }
    proc = subprocess.run(
        [sys.executable, *argv[1:], "--dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    plan = json.loads(proc.stdout.strip().splitlines()[-1])
    batch = int(argv[argv.index("--batch-size") + 1])
    assert (plan["inputs"], plan["todo"], plan["batch_size"]) == (5, 5, batch)
    assert 1 <= plan["keys_per_task_max"] <= 4 * batch
    assert plan["pools"]["infer"] == [1, 4] and plan["pools"]["crf"] == [2, 32] and plan["use_gpu"] is True
    assert plan["object_store_mib"] > 0
    assert not s3_env.exists(data["OUTPUT_URI"].removeprefix("s3://")), "a dry run wrote to OUTPUT_URI"


# --- secrets -------------------------------------------------------------------------------------


def _walk(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def test_no_secret_values_inline():
    example = load_docs(K8S / "secret.example.yaml")[0]
    placeholders = [p for v in example["stringData"].values() for p in re.findall(r"REPLACE_ME\w*", v)]
    assert placeholders and all(
        line.split("=")[-1].strip().startswith("REPLACE_ME")
        for v in example["stringData"].values()
        for line in v.splitlines()
        if "=" in line
    )
    deploy_files = [p for p in K8S.glob("*.yaml") if p.name != "secret.example.yaml"]
    others = [REPO / "ray_cluster.yaml", REPO / "Dockerfile", REPO / "docs" / "kubernetes.md"]
    texts = {p: p.read_text() for p in [*deploy_files, *others]}
    for path, text in texts.items():
        for value in placeholders:
            assert value not in text, path
        assert not re.search(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b", text), f"AWS access key id in {path}"
    secret_refs = set()
    for path in deploy_files:
        for obj in load_docs(path):
            assert obj["kind"] != "Secret", path
            for node in _walk(obj):
                # A *_FILE variable names where a mounted secret is, not a secret.
                if (
                    ("valueFrom" in node or "value" in node)
                    and SECRET_NAME.search(str(node.get("name", "")))
                    and not str(node["name"]).endswith("_FILE")
                ):
                    assert "value" not in node and "secretKeyRef" in node["valueFrom"], (path, node["name"])
                if "secretKeyRef" in node:
                    secret_refs.add((node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]))
                if isinstance(node.get("secret"), dict):  # a mounted Secret: each of its items
                    for item in node["secret"]["items"]:
                        secret_refs.add((node["secret"]["secretName"], item["key"]))
    # Every reference points at a key the example Secret documents.
    assert secret_refs == {(example["metadata"]["name"], key) for key in example["stringData"]}


# --- security objects (issue 29) ---------------------------------------------------------------

TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"


def _pod_templates() -> dict[str, dict]:
    pods = {}
    for name, spec in (("rayjob", rayjob()["spec"]), ("raycronjob", raycronjob()["spec"]["jobTemplate"])):
        pods.update({f"{name}/{group}": t for group, t in ray_pod_templates(spec).items()})
    (cron,) = by_kind(rendered(), "CronJob")
    pods["cronjob"] = cron["spec"]["jobTemplate"]["spec"]["template"]
    return pods


def test_no_ray_pod_holds_a_service_account_token_or_static_keys():
    for name, spec in (("rayjob", rayjob()["spec"]), ("raycronjob", raycronjob()["spec"]["jobTemplate"])):
        for group, template in ray_pod_templates(spec).items():
            pod = template["spec"]
            assert pod["automountServiceAccountToken"] is False, (name, group)
            for c in pod["containers"]:  # the token is the autoscaler sidecar's alone
                assert TOKEN_PATH not in json.dumps(c.get("volumeMounts", [])), (name, group, c["name"])
                names = {e["name"] for e in c.get("env", [])}
                assert not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}, (name, group)
            if group != "submitter":  # credentials: a mounted file (optional: else IRSA / workload identity)
                env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
                mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
                volume = {v["name"]: v for v in pod["volumes"]}["s3-credentials"]
                assert volume["secret"]["optional"] is True and mounts["s3-credentials"]["readOnly"] is True
                assert env["AWS_SHARED_CREDENTIALS_FILE"].startswith(mounts["s3-credentials"]["mountPath"] + "/")
        autoscaler = spec["rayClusterSpec"]["autoscalerOptions"]
        (token,) = [m for m in autoscaler["volumeMounts"] if m["mountPath"] == TOKEN_PATH]
        head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        projected = {v["name"]: v for v in head["volumes"]}[token["name"]]["projected"]
        assert any("serviceAccountToken" in source for source in projected["sources"])


def test_every_pod_meets_pod_security_restricted_in_a_labelled_namespace():
    (namespace,) = by_kind(rendered(), "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert namespace["metadata"]["name"] == yaml.safe_load((K8S / "kustomization.yaml").read_text())["namespace"]
    for name, template in _pod_templates().items():
        pod = template["spec"]
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True and security["seccompProfile"]["type"] == "RuntimeDefault", name
        assert not {"hostNetwork", "hostPID", "hostIPC"} & set(pod), name
        assert not [v for v in pod.get("volumes", []) if "hostPath" in v], name
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], (name, c["name"])
            assert not sc.get("privileged") and not sc["capabilities"].get("add"), (name, c["name"])


def test_network_policy_admits_only_rays_ports_and_egress_to_storage_and_dns():
    (policy,) = by_kind(rendered(), "NetworkPolicy")
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    admitted = {(p["port"], p.get("endPort", p["port"])) for rule in spec["ingress"] for p in rule["ports"]}
    for source in (rayjob()["spec"], raycronjob()["spec"]["jobTemplate"]):
        cluster = source["rayClusterSpec"]
        params = [
            cluster["headGroupSpec"]["rayStartParams"],
            *(g["rayStartParams"] for g in cluster["workerGroupSpecs"]),
        ]
        for p in params:  # every port a Ray node listens on is fixed, and admitted
            fixed = [int(p[k]) for k in p if k.endswith("-port")]
            assert len(fixed) >= 7 and all(any(lo <= port <= hi for lo, hi in admitted) for port in fixed), p
            assert (int(p["min-worker-port"]), int(p["max-worker-port"])) in admitted
        head_ports = {
            c["containerPort"] for c in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
        }
        assert all(any(lo <= port <= hi for lo, hi in admitted) for port in head_ports)
    text = json.dumps(spec["egress"])
    assert '"port": 53' in text and '"port": 443' in text and "169.254.169.254/32" in text
    assert all("ports" in rule for rule in spec["ingress"] + spec["egress"])  # never all ports


def test_docs_example_references_images_by_digest():
    docs = (REPO / "docs" / "kubernetes.md").read_text()
    assert re.search(r"deeplab-pipeline@sha256:[0-9a-f]{64}", docs)

"""cluster/: the Ray cluster launcher config and the KubeRay manifests, checked offline (no cloud, no
Kubernetes, no Ray cluster).

- cluster/aws.yaml goes through what `ray up` does before it reaches AWS
  (ray/autoscaler/_private/commands.py, _bootstrap_config): prepare_config (merge over
  ray/autoscaler/aws/defaults.yaml, merge_setup_commands, docker check, per-type min/max workers),
  then validate_config (ray/autoscaler/ray-schema.json and its extra checks). The step between them,
  the AWS provider's fillout_available_node_types_resources, asks AWS for instance types; it only
  fills the `resources` that a node type leaves out, every node type here sets them, so it is skipped.
- cluster/kuberay/*.yaml are validated against the openAPIV3Schema of version v1 of the KubeRay CRDs
  vendored in tests/kuberay_crds/ (see its README.md). Kubernetes prunes unknown fields silently
  instead of rejecting them, so the schema is made strict first: every object schema with
  `properties` and neither `additionalProperties` nor `x-kubernetes-preserve-unknown-fields` gets
  `additionalProperties: false`; `nullable` and `x-kubernetes-int-or-string` are translated to
  JSON Schema. CEL rules (x-kubernetes-validations) are not evaluated (they guard fields these
  manifests do not set); a few of the operator's own checks (KubeRay's
  ray-operator/controllers/ray/utils/validation.go) are repeated by hand.
"""

from __future__ import annotations

import copy
import functools
import re
import shlex
import socket
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
AWS_YAML = CLUSTER / "aws.yaml"
KUBERAY = CLUSTER / "kuberay"
CRDS = Path(__file__).resolve().parent / "kuberay_crds"
MANIFESTS = ("raycluster.yaml", "rayjob-generate.yaml", "rayservice.yaml")
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1 MB each


# ----------------------------------------------------------------------------- the launcher (ray up)


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test (the launcher checks must not reach AWS)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access during an offline test: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def launcher_config() -> dict:
    return yaml.safe_load(AWS_YAML.read_text())


def ray_up_checks(config: dict) -> dict:
    """The config `ray up` would go on with: Ray's own prepare_config + validate_config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_launcher_config_is_what_ray_up_accepts(offline):
    import ray.autoscaler.aws

    config = launcher_config()
    prepared = ray_up_checks(config)
    defaults = yaml.safe_load((Path(ray.autoscaler.aws.__file__).parent / "defaults.yaml").read_text())
    assert config["provider"]["type"] == "aws"
    # merged: what the file leaves out comes from Ray's defaults.yaml, the setup commands are merged
    assert "head_start_ray_commands" not in config
    assert prepared["head_start_ray_commands"] == defaults["head_start_ray_commands"]
    assert prepared["worker_start_ray_commands"] == defaults["worker_start_ray_commands"]
    assert prepared["head_setup_commands"] == config["setup_commands"] + config["head_setup_commands"]
    assert prepared["worker_setup_commands"] == config["setup_commands"]

    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    workers = {name: t for name, t in types.items() if name != prepared["head_node_type"]}
    assert head["max_workers"] == 0 and head["resources"] == {"CPU": 0}
    gpu = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) > 0}
    cpu = {name: t for name, t in workers.items() if name not in gpu}
    assert len(gpu) == 1 and cpu, "a CPU worker group and a GPU worker group"
    (gpu_type,) = gpu.values()
    assert gpu_type["node_config"]["InstanceType"].startswith("g5.")  # NVIDIA A10G
    assert gpu_type["docker"]["worker_image"].endswith("-gpu")
    assert "--gpus all" in gpu_type["docker"]["worker_run_options"]
    assert gpu_type["min_workers"] >= 1  # the jobs see GPUs when they start (cluster/README.md, "Scaling up")
    for t in workers.values():
        assert 0 <= t["min_workers"] <= t["max_workers"]
    assert sum(t["max_workers"] for t in workers.values()) == prepared["max_workers"]
    # one AMI for every node type (a YAML anchor), an EBS root big enough for the images
    assert len({t["node_config"]["ImageId"] for t in types.values()}) == 1
    assert all(t["node_config"]["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] >= 100 for t in types.values())


def test_launcher_installs_cuda_torch_first_then_the_project():
    config = launcher_config()
    commands = config["setup_commands"]
    makefile_torch = re.search(r"torch==([0-9.]+)", (ROOT / "Makefile").read_text()).group(1)
    (torch_at,) = [i for i, c in enumerate(commands) if f'"torch=={makefile_torch}"' in c]
    (project_at,) = [i for i, c in enumerate(commands) if "pip install" in c and "-e ~/calora_ray" in c]
    assert torch_at < project_at, "torch from the PyTorch index before the project (whose torch>=2.3 it satisfies)"
    torch_cmd = commands[torch_at]
    assert re.search(r"download\.pytorch\.org/whl/cu\d+", torch_cmd) and "download.pytorch.org/whl/cpu" in torch_cmd
    assert "--index-url" in torch_cmd and "nvidia-smi" in torch_cmd
    # the project comes from the uploaded working tree, ignored files (.venv, outputs/) left out
    assert config["file_mounts"] == {"~/calora_ray": "."}
    assert {".gitignore", ".rayignore"} <= set(config["rsync_filter"])


def _set_nested(path, value):
    def mutate(config):
        node = config
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


@pytest.mark.parametrize("mutate, validator, path", [
    pytest.param(_set_nested(["setup_command"], ["true"]), "additionalProperties", [], id="unknown-top-level-key"),
    pytest.param(_set_nested(["max_workers"], "8"), "type", ["max_workers"], id="max_workers-a-string"),
    pytest.param(_set_nested(["idle_timeout_minutes"], [10]), "type", ["idle_timeout_minutes"],
                 id="idle_timeout-a-list"),
    pytest.param(_set_nested(["docker", "imge"], "rayproject/ray"), "additionalProperties", ["docker"],
                 id="unknown-docker-key"),
    pytest.param(_set_nested(["available_node_types", "gpu_worker", "min_worker"], 1), "additionalProperties",
                 ["available_node_types", "gpu_worker"], id="unknown-node-type-key"),
    pytest.param(_set_nested(["available_node_types", "gpu_worker", "resources", "GPU"], 0.5), "type",
                 ["available_node_types", "gpu_worker", "resources", "GPU"], id="fractional-resource"),
])
def test_launcher_config_rejects(offline, mutate, validator, path):
    config = launcher_config()
    mutate(config)
    with pytest.raises(jsonschema.ValidationError) as e:
        ray_up_checks(config)
    assert e.value.validator == validator and list(e.value.absolute_path) == path, e.value.message


# ----------------------------------------------------------------------------- KubeRay manifests


def _strict(node: dict) -> None:
    """In place: the CRD schema as the API server applies it, with pruning turned into rejection."""
    if node.get("nullable") and "type" in node:
        node["type"] = [node["type"], "null"]
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node and "type" not in node:
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        node["additionalProperties"] = False
    for key in ("properties", "patternProperties"):
        for child in node.get(key, {}).values():
            _strict(child)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            _strict(node[key])
    for key in ("allOf", "anyOf", "oneOf"):
        for child in node.get(key, []):
            _strict(child)


@functools.cache
def vendored_schemas() -> dict[str, dict]:
    """kind -> the openAPIV3Schema of the CRD's version v1, as vendored."""
    schemas = {}
    for path in sorted(CRDS.glob("ray.io_*.yaml")):
        crd = yaml.load(path.read_text(), Loader=_LOADER)
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schemas[crd["spec"]["names"]["kind"]] = version["schema"]["openAPIV3Schema"]
    return schemas


@functools.cache
def crd_schemas() -> dict[str, dict]:
    """kind -> the strict schema (unknown fields are errors)."""
    schemas = copy.deepcopy(vendored_schemas())
    for schema in schemas.values():
        _strict(schema)
    return schemas


_FORMATS = jsonschema.FormatChecker(formats=())


@_FORMATS.checks("int32")
def _int32(value) -> bool:
    return not isinstance(value, int) or -2**31 <= value < 2**31


@_FORMATS.checks("int64")
def _int64(value) -> bool:
    return not isinstance(value, int) or -2**63 <= value < 2**63


def crd_errors(doc: dict, strict: bool = True) -> list[jsonschema.ValidationError]:
    schema = (crd_schemas() if strict else vendored_schemas())[doc["kind"]]
    validator = jsonschema.Draft4Validator(schema, format_checker=_FORMATS)  # OpenAPI 3.0 ~ draft 4
    return sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))


def describe(errors) -> str:
    return "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def load_manifest(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d is not None]


DOCS = [(name, i, doc) for name in MANIFESTS for i, doc in enumerate(load_manifest(name))]
DOC_IDS = [f"{name}:{doc.get('kind')}" for name, _, doc in DOCS]
CLUSTER_SPEC = {"RayCluster": ("spec",), "RayJob": ("spec", "rayClusterSpec"),
                "RayService": ("spec", "rayClusterConfig")}  # where each kind holds its Ray cluster
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayService": 47}  # ray-operator/controllers/ray/utils/constant.go


def cluster_spec(doc: dict) -> dict:
    node = doc
    for key in CLUSTER_SPEC[doc["kind"]]:
        node = node[key]
    return node


def groups(doc: dict) -> list[dict]:
    spec = cluster_spec(doc)
    return [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]


def containers(doc: dict) -> list[dict]:
    return [c for g in groups(doc) for c in g["template"]["spec"]["containers"]]


def gpus(group: dict) -> int:
    limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    return int(limits.get("nvidia.com/gpu", 0))


def test_vendored_crds_and_manifests_cover_the_three_kinds():
    assert sorted(p.name for p in KUBERAY.glob("*.y*ml")) == sorted(MANIFESTS)  # none left unchecked
    assert set(crd_schemas()) == {"RayCluster", "RayJob", "RayService"}
    assert sorted(doc["kind"] for _, _, doc in DOCS) == ["RayCluster", "RayJob", "RayService"]
    for kind, schema in crd_schemas().items():
        # the CRD itself types rayStartParams as a map of strings, for the head and every worker group
        spec = schema["properties"]["spec"]
        for key in CLUSTER_SPEC[kind][1:]:
            spec = spec["properties"][key]
        for group in (spec["properties"]["headGroupSpec"], spec["properties"]["workerGroupSpecs"]["items"]):
            assert group["properties"]["rayStartParams"]["additionalProperties"] == {"type": "string"}


@pytest.mark.parametrize("name, index, doc", DOCS, ids=DOC_IDS)
def test_manifest_is_valid_against_its_crd(name, index, doc):
    assert doc["apiVersion"] == "ray.io/v1"
    errors = crd_errors(doc)
    assert not errors, f"{name} document {index}:\n{describe(errors)}"


@pytest.mark.parametrize("name, index, doc", DOCS, ids=DOC_IDS)
def test_manifest_follows_the_operator_rules(name, index, doc):
    """A few of KubeRay's own checks (validation.go), which the API server does not make, plus ours."""
    kind = doc["kind"]
    assert set(doc["metadata"]) <= {"name", "namespace", "labels", "annotations"}
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])  # DNS-1035 label
    assert len(doc["metadata"]["name"]) <= MAX_NAME[kind]
    for group in groups(doc):
        params = group.get("rayStartParams", {})
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in params.items()), params
        assert "labels" not in params
        assert not (set(params) & {"num-cpus", "num-gpus", "memory", "resources"} and group.get("resources"))
        assert group["template"]["spec"]["containers"], "at least one container"
    workers = cluster_spec(doc).get("workerGroupSpecs", [])
    assert len({w["groupName"] for w in workers}) == len(workers)
    for w in workers:
        assert 0 <= w["minReplicas"] <= w.get("replicas", w["minReplicas"]) <= w["maxReplicas"]
    for c in containers(doc):
        requests, limits = c["resources"]["requests"], c["resources"]["limits"]
        if "nvidia.com/gpu" in requests:  # extended resources: requests, when given, equal limits
            assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
    assert any(gpus(w) for w in workers), "a GPU worker group"


def test_cluster_files_agree_on_versions_and_image():
    """One Ray version everywhere (and >= the project's floor), one image for every KubeRay pod, built by
    cluster/Dockerfile from that Ray version with the Makefile's torch pin."""
    ray_versions = {cluster_spec(doc)["rayVersion"] for _, _, doc in DOCS}
    images = {c["image"] for _, _, doc in DOCS for c in containers(doc)}
    config = launcher_config()
    launcher_images = [config["docker"]["image"]] + [
        t["docker"]["worker_image"] for t in config["available_node_types"].values() if "docker" in t]
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.MULTILINE).group(1)
    (version,) = ray_versions
    assert len(images) == 1 and f"ray{version}" in images.pop()
    assert base == f"rayproject/ray:{version}-py311-gpu"
    assert {re.fullmatch(r"rayproject/ray:([0-9.]+)-py311-(cpu|gpu)", i).group(1) for i in launcher_images} == {version}
    floor = re.search(r'"ray\[[^\]]*\]>=([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert Version(version) >= Version(floor)
    makefile_torch = re.search(r"torch==([0-9.]+)", (ROOT / "Makefile").read_text()).group(1)
    assert f'"torch=={makefile_torch}" --index-url' in dockerfile and "whl/cu" in dockerfile
    assert "pip install --no-cache-dir -e ." in dockerfile


def test_rayservice_serves_the_application_of_cluster_serve_yaml():
    from ray.serve.schema import ServeDeploySchema

    (service,) = [doc for _, _, doc in DOCS if doc["kind"] == "RayService"]
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    local = yaml.safe_load((CLUSTER / "serve.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    assert config["applications"] == local["applications"]
    assert config["proxy_location"] == local["proxy_location"]
    assert config["http_options"] == {**local["http_options"], "host": "0.0.0.0"}  # reachable on the pod IP
    head = groups(service)[0]["template"]["spec"]["containers"][0]
    head_ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert head_ports["serve"] == config["http_options"]["port"]
    # the GPU workers hold the application's replicas: min_replicas without scaling, max_replicas at most
    workers = cluster_spec(service)["workerGroupSpecs"]
    for deployment in config["applications"][0]["deployments"]:
        need = deployment["ray_actor_options"]["num_gpus"]
        scaling = deployment["autoscaling_config"]
        assert scaling["min_replicas"] * need <= sum(w["minReplicas"] * gpus(w) for w in workers)
        assert scaling["max_replicas"] * need <= sum(w["maxReplicas"] * gpus(w) for w in workers)
    assert cluster_spec(service)["enableInTreeAutoscaling"] is True


def test_rayjob_runs_jobs_generate_py_with_flags_it_accepts():
    from calora_ray.config import GenerateConfig, parse_config

    (job,) = [doc for _, _, doc in DOCS if doc["kind"] == "RayJob"]
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    workdir = re.search(r"^WORKDIR (\S+)", (CLUSTER / "Dockerfile").read_text(), re.MULTILINE).group(1)
    assert runtime_env["working_dir"] == workdir  # the image's copy of the repository
    assert all(isinstance(v, str) for v in runtime_env.get("env_vars", {}).values())
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/generate.py"] and (ROOT / argv[1]).is_file()
    cfg = parse_config(GenerateConfig, argv[2:], job="generate")  # jobs/generate.py's own parser
    workers = cluster_spec(job)["workerGroupSpecs"]
    assert all(w["minReplicas"] == w["replicas"] == w["maxReplicas"] for w in workers)  # no autoscaling to wait for
    assert cfg.use_gpu == "true" and cfg.num_actors == sum(w["replicas"] * gpus(w) for w in workers)
    assert cfg.model == "toy-sd" and (ROOT / cfg.controlnet / "config.json").is_file()  # shipped with the repo
    assert cfg.output.startswith("s3://")


# one place to break each kind: path below the kind's Ray cluster spec -> (mutation, validator, error path)
def _rename(key, new):
    def mutate(node):
        node[new] = node.pop(key)
    return mutate


def _put(key, value):
    def mutate(node):
        node[key] = value
    return mutate


NEGATIVE = {
    "misspelled-rayStartParams": (("headGroupSpec",), _rename("rayStartParams", "rayStartparams"),
                                  "additionalProperties", ("headGroupSpec",)),
    "number-in-rayStartParams": (("headGroupSpec", "rayStartParams"), _put("num-cpus", 0),
                                 "type", ("headGroupSpec", "rayStartParams", "num-cpus")),
    "unknown-worker-group-key": (("workerGroupSpecs", 0), _put("minReplica", 1),
                                 "additionalProperties", ("workerGroupSpecs", 0)),
    "replicas-a-string": (("workerGroupSpecs", 0), _put("replicas", "2"), "type", ("workerGroupSpecs", 0, "replicas")),
    "unknown-container-key": (("workerGroupSpecs", 0, "template", "spec", "containers", 0), _put("resource", {}),
                              "additionalProperties", ("workerGroupSpecs", 0, "template", "spec", "containers", 0)),
    "unknown-pod-spec-key": (("headGroupSpec", "template", "spec"), _put("toleration", []),
                             "additionalProperties", ("headGroupSpec", "template", "spec")),
}
SPEC_TYPOS = {"RayCluster": "enableInTreeAutoscalling", "RayJob": "shutdownAfterJobFinish", "RayService": "serveConfig"}


@pytest.mark.parametrize("case", sorted(NEGATIVE))
@pytest.mark.parametrize("kind", sorted(CLUSTER_SPEC))
def test_crd_validation_rejects(kind, case):
    (doc,) = [copy.deepcopy(d) for _, _, d in DOCS if d["kind"] == kind]
    where, mutate, validator, error_at = NEGATIVE[case]
    node = cluster_spec(doc)
    for key in where:
        node = node[key]
    mutate(node)
    errors = crd_errors(doc)
    assert [(e.validator, tuple(e.absolute_path)) for e in errors] == [(validator, CLUSTER_SPEC[kind] + error_at)], \
        describe(errors)


def test_unknown_fields_pass_the_vendored_schema_and_fail_the_strict_one():
    """Why the schema is made strict: as vendored, it lets a misspelled field through (the API server
    would accept the manifest and prune the field, so the setting would silently not apply)."""
    (doc,) = [copy.deepcopy(d) for _, _, d in DOCS if d["kind"] == "RayCluster"]
    doc["spec"]["headGroupSpec"]["rayStartparams"] = doc["spec"]["headGroupSpec"].pop("rayStartParams")
    assert not crd_errors(doc, strict=False)
    assert [e.validator for e in crd_errors(doc)] == ["additionalProperties"]


@pytest.mark.parametrize("kind", sorted(SPEC_TYPOS))
def test_crd_validation_rejects_a_misspelled_spec_field(kind):
    (doc,) = [copy.deepcopy(d) for _, _, d in DOCS if d["kind"] == kind]
    doc["spec"][SPEC_TYPOS[kind]] = True
    errors = crd_errors(doc)
    assert [(e.validator, tuple(e.absolute_path)) for e in errors] == [("additionalProperties", ("spec",))]
    assert SPEC_TYPOS[kind] in errors[0].message


def test_quantities_take_an_int_or_a_string():
    """x-kubernetes-int-or-string: `cpu: 4` and `cpu: "4"` are both valid; a list is not."""
    (doc,) = [copy.deepcopy(d) for _, _, d in DOCS if d["kind"] == "RayCluster"]
    limits = groups(doc)[0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    limits["cpu"] = 4
    assert not crd_errors(doc)
    limits["cpu"] = ["4"]
    assert [tuple(e.absolute_path)[-1] for e in crd_errors(doc)] == ["cpu"]

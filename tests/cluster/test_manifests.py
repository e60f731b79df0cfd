"""cluster/ checked without a Kubernetes cluster: the KubeRay manifests against the operator's
CRD schemas, the runtime_env against Ray's, and both against the recipe they launch.

The CRDs are the KubeRay operator's own (``../shared/kuberay-crds/``, beside the repo). Their
``openAPIV3Schema`` is a Kubernetes *structural* schema, which plain JSON Schema reads differently
in three ways, handled here:

- ``x-kubernetes-int-or-string: true`` means "an integer or a string" (ports, quantities);
  such nodes are rewritten to an explicit ``anyOf`` before validating.
- The API server drops fields the schema does not declare, silently (pruning), where JSON Schema
  would accept them: a typo such as ``rayStartParms`` is lost without an error. ``strict_errors``
  rejects every undeclared field instead.
- Lists marked ``x-kubernetes-list-type: map`` must have unique keys (two env vars of one name);
  ``strict_errors`` checks that too.

CEL rules (``x-kubernetes-validations``) are not evaluated; the operator's own checks that the
schema cannot express (name lengths, submission modes, TTL needing shutdown) are in
``operator_errors``.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT.parent / "shared" / "kuberay-crds"
CLUSTER = ROOT / "cluster"
MANIFESTS = ("raycluster.yaml", "rayjob.yaml")
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}  # KubeRay's Go API
DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
MAX_NAME = {"RayCluster": 53, "RayJob": 47}  # KubeRay derives service/cluster names from them


# --- the CRDs as JSON Schema ---------------------------------------------------------------------

@functools.cache
def crds() -> dict[tuple[str, str], dict]:
    """(group, kind) -> CRD, from every file in ../shared/kuberay-crds."""
    files = sorted(CRDS.glob("*.yaml"))
    assert files, f"no KubeRay CRDs at {CRDS}: the shared/ folder must sit beside the repo"
    out = {}
    for f in files:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # 40k lines: the C parser
        for doc in yaml.load_all(f.read_text(), Loader=loader):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                out[(doc["spec"]["group"], doc["spec"]["names"]["kind"])] = doc
    return out


def crd_schema(api_version: str, kind: str) -> dict:
    """The openAPIV3Schema the API server uses for this apiVersion and kind: the version must
    be served and not deprecated."""
    group, _, version = api_version.rpartition("/")
    crd = crds().get((group, kind))
    assert crd is not None, f"no CRD for {kind} in group {group!r} at {CRDS}"
    served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    assert version in served, f"{api_version} {kind}: not a served version ({sorted(served)})"
    assert not served[version].get("deprecated"), \
        f"{api_version} {kind} is deprecated: {served[version].get('deprecationWarning')}"
    return served[version]["schema"]["openAPIV3Schema"]


def to_jsonschema(node):
    """A copy of a structural schema that plain JSON Schema reads the way Kubernetes does."""
    if isinstance(node, list):
        return [to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_jsonschema(v) for k, v in node.items()}
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


@functools.cache
def validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    schema = to_jsonschema(crd_schema(api_version, kind))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _path(parts) -> str:
    return ".".join(str(p) for p in parts) or "<root>"


def strict_errors(value, schema: dict, path: tuple = ()) -> list[str]:
    """Fields the schema does not declare (which the API server would prune) and duplicate keys
    in list-map lists."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    errors = []
    if isinstance(value, dict):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, sub in value.items():
            if props is not None and key in props:
                errors += strict_errors(sub, props[key], path + (key,))
            elif isinstance(extra, dict):
                errors += strict_errors(sub, extra, path + (key,))
            elif props is not None and extra is not True:
                errors.append(f"{_path(path + (key,))}: unknown field (the API server would "
                              f"drop it); expected one of {sorted(props)}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errors += strict_errors(item, schema["items"], path + (i,))
        kind = schema.get("x-kubernetes-list-type")
        keys = schema.get("x-kubernetes-list-map-keys", [])
        if kind == "map" and keys:
            seen = [tuple(item.get(k) for k in keys) for item in value if isinstance(item, dict)]
        elif kind == "set":
            seen = [json.dumps(item, sort_keys=True) for item in value]
        else:
            seen = []
        dupes = sorted({str(s) for s in seen if seen.count(s) > 1})
        if dupes:
            errors.append(f"{_path(path)}: duplicate entries {dupes} (keys {keys or 'items'})")
    return errors


def operator_errors(doc: dict) -> list[str]:
    """Checks the KubeRay operator makes itself, which the CRD schema does not express."""
    errors = []
    kind, meta, spec = doc.get("kind"), doc.get("metadata") or {}, doc.get("spec") or {}
    unknown_meta = set(meta) - {"name", "namespace", "labels", "annotations"}
    if unknown_meta:
        errors.append(f"metadata: unexpected fields {sorted(unknown_meta)}")
    name = str(meta.get("name", ""))
    if not DNS1035.fullmatch(name) or len(name) > MAX_NAME.get(kind, 63):
        errors.append(f"metadata.name: {name!r} must be a DNS-1035 label of at most "
                      f"{MAX_NAME.get(kind, 63)} characters")
    for field in ("labels", "annotations"):
        if not all(isinstance(v, str) for v in (meta.get(field) or {}).values()):
            errors.append(f"metadata.{field}: values must be strings")
    if kind == "RayJob":
        mode = spec.get("submissionMode", "K8sJobMode")
        if mode not in SUBMISSION_MODES:
            errors.append(f"spec.submissionMode: {mode!r} is not one of {sorted(SUBMISSION_MODES)}")
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
            errors.append("spec.ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
        if mode == "InteractiveMode" and spec.get("backoffLimit", 0) > 0:
            errors.append("spec.backoffLimit is incompatible with InteractiveMode")
        try:
            yaml.safe_load(spec.get("runtimeEnvYAML", ""))
        except yaml.YAMLError as err:
            errors.append(f"spec.runtimeEnvYAML: not YAML: {err}")
    cluster = spec.get("rayClusterSpec") if kind == "RayJob" else spec
    for where, group in groups(cluster or {}):
        if not group.get("template", {}).get("spec", {}).get("containers"):
            errors.append(f"{where}: the pod template needs a container")
        lo, n, hi = (group.get(k) for k in ("minReplicas", "replicas", "maxReplicas"))
        if where != "head" and all(isinstance(x, int) for x in (lo, n, hi)) and not lo <= n <= hi:
            errors.append(f"{where}: replicas {n} outside [minReplicas, maxReplicas] = "
                          f"[{lo}, {hi}]")
    return errors


def validate(doc: dict) -> list[str]:
    """Every reason the API server or the KubeRay operator would reject or silently change `doc`."""
    schema = crd_schema(doc.get("apiVersion", ""), doc.get("kind", ""))
    errors = [f"{_path(e.absolute_path)}: {e.message}"
              for e in validator(doc["apiVersion"], doc["kind"]).iter_errors(doc)]
    return errors + strict_errors(doc, schema) + operator_errors(doc)


# --- the manifests and what they provide -------------------------------------------------------

def load_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def ray_doc(name: str) -> dict:
    (doc,) = [d for d in load_docs(name) if d["apiVersion"].startswith("ray.io/")]
    return doc


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def groups(spec: dict) -> list[tuple[str, dict]]:
    """("head", head group) and (groupName, worker group) pairs."""
    out = [("head", spec["headGroupSpec"])] if "headGroupSpec" in spec else []
    return out + [(g.get("groupName", "?"), g) for g in spec.get("workerGroupSpecs", [])]


_SUFFIX = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1.0, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
           "P": 1e15, "E": 1e18, "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40,
           "Pi": 2.0**50, "Ei": 2.0**60}


def quantity(value) -> float:
    """A Kubernetes resource quantity as a number.

    >>> quantity("500m"), quantity(2), quantity("1Gi") == 2**30, quantity("1e3")
    (0.5, 2.0, True, 1000.0)
    """
    if isinstance(value, int | float):
        return float(value)
    m = re.fullmatch(r"([+-]?(?:\d+(?:\.\d*)?|\.\d+))([eE][+-]?\d+|[KMGTPE]i|[numkMGTPE])?", value)
    assert m, f"{value!r} is not a Kubernetes quantity"
    number, suffix = m.groups()
    if suffix and suffix[0] in "eE":
        return float(number + suffix)
    return float(number) * _SUFFIX[suffix or ""]


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay runs Ray in the first container


def pod_capacity(group: dict) -> tuple[float, float]:
    """(CPUs, GPUs) Ray advertises for one pod: rayStartParams, else the container's limits."""
    params = group.get("rayStartParams") or {}
    res = ray_container(group).get("resources", {})
    limits = res.get("limits") or res.get("requests") or {}
    cpus = float(params["num-cpus"]) if "num-cpus" in params else quantity(limits.get("cpu", 0))
    gpus = (float(params["num-gpus"]) if "num-gpus" in params
            else quantity(limits.get("nvidia.com/gpu", 0)))
    return cpus, gpus


def nodes(spec: dict) -> list[list[float]]:
    """Free [CPUs, GPUs] of every Ray node the cluster starts (head included)."""
    out = []
    for where, group in groups(spec):
        pods = 1 if where == "head" else group.get("replicas", 0) * group.get("numOfHosts", 1)
        out += [list(pod_capacity(group)) for _ in range(pods)]
    return out


def braid_command(entrypoint: str) -> list[str]:
    """The `braid ...` argv inside a RayJob entrypoint (plain, or wrapped in `bash -c '...'`)."""
    argv = shlex.split(entrypoint)
    if argv[:2] == ["bash", "-c"]:
        argv = shlex.split(argv[2].split("$(")[0])
    assert "braid" in argv, f"no braid command in the entrypoint: {entrypoint!r}"
    return argv[argv.index("braid"):]


def entrypoint_recipe(doc: dict) -> tuple[str, list[str]]:
    argv = braid_command(doc["spec"]["entrypoint"])
    assert argv[1] == "run", argv
    return argv[2], [a for a in argv[3:] if "=" in a]


def header(path: Path) -> str:
    """The comment block a file opens with."""
    lines = path.read_text().splitlines()
    assert lines and lines[0].startswith("#"), f"{path.name} must open with a runbook comment"
    block = []
    for line in lines:
        if not line.startswith("#"):
            break
        block.append(line.lstrip("# "))
    return "\n".join(block)


def runtime_env_fields() -> set[str]:
    from ray.runtime_env import RuntimeEnv

    return {f for f in RuntimeEnv.known_fields if not f.startswith("_")}


# --- the manifests are what the API server and operator accept ---------------------------------

@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_matches_the_kuberay_crd(name):
    doc = ray_doc(name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert validate(doc) == []


def break_worker(doc):
    return cluster_spec(doc)["workerGroupSpecs"][0]


def rename(d: dict, old: str, new: str) -> None:
    d[new] = d.pop(old)


BROKEN = {
    "typo rayStartParms": (lambda d: rename(break_worker(d), "rayStartParams", "rayStartParms"),
                           "rayStartParms: unknown field"),
    "typo deep in the pod": (lambda d: rename(ray_container(break_worker(d)), "volumeMounts",
                                              "volumeMount"), "volumeMount: unknown field"),
    "replicas as words": (lambda d: break_worker(d).update(replicas="two"),
                          "replicas: 'two' is not of type 'integer'"),
    "ray param not a string": (lambda d: cluster_spec(d)["headGroupSpec"]["rayStartParams"]
                               .update({"num-gpus": 0}), "num-gpus: 0 is not of type 'string'"),
    "memory in GB": (lambda d: ray_container(break_worker(d))["resources"]["limits"]
                     .update(memory="64GB"), "limits.memory: '64GB' does not match"),
    "no groupName": (lambda d: break_worker(d).pop("groupName"),
                     "'groupName' is a required property"),
    "duplicate env var": (lambda d: ray_container(break_worker(d))["env"].append(
        {"name": "NCCL_DEBUG", "value": "INFO"}), "duplicate entries"),
    "uppercase name": (lambda d: d["metadata"].update(name="Braid"), "DNS-1035"),
}


@pytest.mark.parametrize("name", MANIFESTS)
@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_manifest_is_rejected(name, case):
    doc = copy.deepcopy(ray_doc(name))
    mutate, expected = BROKEN[case]
    mutate(doc)
    errors = validate(doc)
    assert any(expected in e for e in errors), errors


def test_plain_json_schema_misses_what_strict_errors_catches():
    """Why strict_errors exists: the CRD schemas declare no additionalProperties: false."""
    doc = copy.deepcopy(ray_doc("raycluster.yaml"))
    rename(break_worker(doc), "rayStartParams", "rayStartParms")
    assert list(validator(doc["apiVersion"], doc["kind"]).iter_errors(doc)) == []
    assert strict_errors(doc, crd_schema(doc["apiVersion"], doc["kind"]))


def test_int_or_string_becomes_either():
    v = jsonschema.Draft7Validator(to_jsonschema({"x-kubernetes-int-or-string": True}))
    assert v.is_valid(8) and v.is_valid("8") and not v.is_valid([8]) and not v.is_valid(None)


def test_a_bad_api_version_is_rejected():
    with pytest.raises(AssertionError, match="deprecated"):
        crd_schema("ray.io/v1alpha1", "RayCluster")
    with pytest.raises(AssertionError, match="not a served version"):
        crd_schema("ray.io/v2", "RayJob")


def test_rayjob_submission_settings():
    spec = ray_doc("rayjob.yaml")["spec"]
    assert spec["submissionMode"] in SUBMISSION_MODES
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 1, "a failed run is retried (and resumes)"


def test_both_manifests_describe_the_same_pods():
    """The RayJob embeds its own copy of the cluster: it must not drift from raycluster.yaml."""
    a, b = cluster_spec(ray_doc("raycluster.yaml")), cluster_spec(ray_doc("rayjob.yaml"))
    assert [n for n, _ in groups(a)] == [n for n, _ in groups(b)]
    for (name, ga), (_, gb) in zip(groups(a), groups(b)):
        assert ga["template"] == gb["template"], f"{name}: pod templates differ"
        assert ga.get("rayStartParams") == gb.get("rayStartParams"), name
    assert a["rayVersion"] == b["rayVersion"]


# --- the cluster fits braid ---------------------------------------------------------------------

@pytest.mark.parametrize("name", MANIFESTS)
def test_head_runs_no_gpu_work_and_serves_the_dashboard(name):
    head = cluster_spec(ray_doc(name))["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert "nvidia.com/gpu" not in str(ray_container(head).get("resources"))
    ports = {p["name"]: p["containerPort"] for p in ray_container(head)["ports"]}
    assert ports["dashboard"] == 8265


@pytest.mark.parametrize("name", MANIFESTS)
def test_versions_and_image_match_the_project(name):
    import ray

    spec = cluster_spec(ray_doc(name))
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert spec["rayVersion"] == ray.__version__
    assert f'"ray[default]=={spec["rayVersion"]}"' in pyproject
    version = re.search(r'^version = "(.+)"', pyproject, re.M).group(1)
    images = {c["image"] for _, g in groups(spec) for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1, f"one image for every pod: {images}"
    assert images.pop().endswith(f":gpu-{version}")


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_pod_mounts_the_shared_volume_and_shm(name):
    (pvc,) = [d for d in load_docs("raycluster.yaml") if d["kind"] == "PersistentVolumeClaim"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "all pods write to it at once"
    assert quantity(pvc["spec"]["resources"]["requests"]["storage"]) > 0
    for where, group in groups(cluster_spec(ray_doc(name))):
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in ray_container(group)["volumeMounts"]}
        assert mounts["/mnt/braid"].get("persistentVolumeClaim") == \
            {"claimName": pvc["metadata"]["name"]}, where
        shm = mounts["/dev/shm"]["emptyDir"]
        assert shm["medium"] == "Memory", where
        limit = ray_container(group)["resources"]["limits"]["memory"]
        assert quantity(shm["sizeLimit"]) < quantity(limit), f"{where}: shm counts as memory"
        if pod_capacity(group)[1] > 0:
            assert pod["nodeSelector"] and pod["tolerations"], f"{where}: GPU nodes are tainted"


def recipe_for(doc: dict):
    from orchestrator.config import load_recipe

    path, overrides = entrypoint_recipe(ray_doc("rayjob.yaml"))
    return load_recipe(ROOT / path, overrides if doc["kind"] == "RayJob" else [])


def bundles(recipe) -> list[tuple[str, float, float]]:
    """One (role, CPUs, GPUs) per actor, as braid's placement groups ask for them."""
    out = []
    for role in ("rollout", "learner", "reference", "reward", "teacher"):
        cfg = getattr(recipe.roles, role)
        if cfg is not None:
            out += [(role, cfg.resources.num_cpus, cfg.resources.num_gpus)] * cfg.replicas
    return out


def unplaced(want: list[tuple[str, float, float]], free: list[list[float]]) -> list[str]:
    """Roles of the actors that first-fit-decreasing cannot place on the nodes."""
    free, left = [list(n) for n in free], []
    for role, cpus, gpus in sorted(want, key=lambda b: (-b[2], -b[1])):
        node = next((n for n in free if n[0] >= cpus and n[1] >= gpus), None)
        if node is None:
            left.append(role)
        else:
            node[0] -= cpus
            node[1] -= gpus
    return left


@pytest.mark.parametrize("name", MANIFESTS)
def test_the_cluster_has_room_for_the_recipe(name):
    doc = ray_doc(name)
    free, want = nodes(cluster_spec(doc)), bundles(recipe_for(doc))
    assert sum(g for _, _, g in want) <= sum(g for _, g in free), "not enough GPUs"
    assert sum(c for _, c, _ in want) <= sum(c for c, _ in free), "not enough CPUs"
    assert unplaced(want, free) == [], f"no node fits these actors; nodes: {free}"


def test_room_check_is_not_vacuous():
    from orchestrator.config import load_recipe

    free = nodes(cluster_spec(ray_doc("rayjob.yaml")))
    path, overrides = entrypoint_recipe(ray_doc("rayjob.yaml"))
    bigger = load_recipe(ROOT / path, overrides + ["roles.rollout.replicas=3"])
    assert unplaced(bundles(bigger), free), "five 1-GPU actors cannot fit on four GPUs"
    wide = load_recipe(ROOT / path, overrides + ["roles.learner.resources.num_gpus=2"])
    assert "learner" in unplaced(bundles(wide), free), "a 2-GPU actor needs a 2-GPU pod"


@pytest.mark.parametrize("name", MANIFESTS)
def test_run_dir_and_model_are_on_the_shared_volume(name):
    recipe = recipe_for(ray_doc(name))
    assert recipe.run_dir.startswith("/mnt/braid/"), "checkpoints must outlive the pods"
    assert recipe.model.path.startswith("/mnt/braid/")


def test_rayjob_entrypoint_resumes_from_braids_own_checkpoint_pointer(tmp_path):
    """The entrypoint adds --resume when `<run_dir>/checkpoints/latest` exists: the pointer that
    `braid run --resume` follows (orchestrator/checkpoint.py)."""
    from orchestrator import checkpoint

    entrypoint = ray_doc("rayjob.yaml")["spec"]["entrypoint"]
    _, overrides = entrypoint_recipe(ray_doc("rayjob.yaml"))
    run_dir = dict(o.split("=", 1) for o in overrides)["run_dir"]
    assert f"test -f {run_dir}/checkpoints/latest && echo --resume" in entrypoint
    step = tmp_path / "checkpoints" / "step_000025"
    step.mkdir(parents=True)
    (step / "controller.json").write_text("{}")
    (tmp_path / "checkpoints" / "latest").write_text(step.name)
    assert checkpoint.find(tmp_path, None) == step


def referenced_recipes() -> list[str]:
    out = {entrypoint_recipe(ray_doc("rayjob.yaml"))[0]}
    for name in (*MANIFESTS, "runtime_env.yaml"):
        out |= set(re.findall(r"braid run (recipes/\S+\.yaml)", header(CLUSTER / name)))
    return sorted(out)


@pytest.mark.parametrize("recipe", referenced_recipes())
def test_launched_recipe_exists_and_passes_braid_validate(recipe):
    overrides = []
    if recipe == entrypoint_recipe(ray_doc("rayjob.yaml"))[0]:
        overrides = entrypoint_recipe(ray_doc("rayjob.yaml"))[1]
    assert (ROOT / recipe).is_file(), f"{recipe} does not exist"
    exe = Path(sys.executable).with_name("braid")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "orchestrator.cli"]
    # the model lives on the cluster's volume, not here
    out = subprocess.run(cmd + ["validate", "--skip-model", recipe, *overrides], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and ": ok (" in out.stdout, out.stdout + out.stderr
    assert "(--skip-model)" in out.stdout


# --- runtime_env ---------------------------------------------------------------------------------

def runtime_envs() -> dict[str, dict]:
    return {"runtime_env.yaml": yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text()),
            "rayjob.yaml": yaml.safe_load(ray_doc("rayjob.yaml")["spec"]["runtimeEnvYAML"])}


@pytest.mark.parametrize("where", ["runtime_env.yaml", "rayjob.yaml"])
def test_runtime_env_has_only_ray_fields_of_the_right_types(where):
    from ray.runtime_env import RuntimeEnv

    env = runtime_envs()[where]
    assert isinstance(env, dict)
    unknown = set(env) - runtime_env_fields()
    assert not unknown, f"{where}: not runtime_env fields: {unknown} (Ray would pass them on to " \
                        "plugins instead of failing)"
    # Ray checks that a local working_dir exists; the RayJob's is this repo, copied into the image
    RuntimeEnv(**(env | {"working_dir": str(ROOT)}))  # raises on wrong types (env_vars: str only)


def test_runtime_env_field_check_is_not_vacuous():
    from ray.runtime_env import RuntimeEnv

    assert "env_var" not in runtime_env_fields() and "working_dir" in runtime_env_fields()
    with pytest.raises(TypeError):
        RuntimeEnv(env_vars={"PYTHONUNBUFFERED": 1})


def test_rayjob_runtime_env_mirrors_the_file():
    env, job = runtime_envs()["runtime_env.yaml"], runtime_envs()["rayjob.yaml"]
    assert job["env_vars"] == env["env_vars"]
    assert job["excludes"] == env["excludes"]
    workdir = re.findall(r"^WORKDIR\s+(\S+)", (CLUSTER / "Dockerfile.gpu").read_text(), re.M)
    assert job["working_dir"] == workdir[-1], "the RayJob uploads the repo copy in the image"


def test_working_dir_upload_stays_small():
    """What `ray job submit --working-dir .` would upload (Ray's own walk, with our excludes and
    .gitignore) stays far under Ray's limit and holds none of the generated folders."""
    from ray._private.runtime_env import packaging

    excludes = runtime_envs()["runtime_env.yaml"]["excludes"]
    files: list[Path] = []
    packaging._dir_travel(ROOT, [packaging._get_excludes(ROOT, excludes)],
                          lambda p: files.append(p) if p.is_file() else None,
                          include_gitignore=True)
    rel = [p.relative_to(ROOT).as_posix() for p in files]
    assert not [r for r in rel if r.split("/")[0] in {".git", ".venv", "runs", "mlruns"}]
    size = sum(p.stat().st_size for p in files)
    assert size < packaging.PACKAGE_SIZE_WARNING, f"{size / 2**20:.0f} MiB to upload"


# --- runbooks -----------------------------------------------------------------------------------

RUNBOOK = {
    "raycluster.yaml": ["kubectl apply -f cluster/raycluster.yaml", "port-forward",
                        "ray job submit", "--runtime-env cluster/runtime_env.yaml", "--resume",
                        "kubectl delete raycluster"],
    "rayjob.yaml": ["kubectl apply -f cluster/rayjob.yaml", "kubectl delete rayjob", "--resume"],
    "runtime_env.yaml": ["ray job submit", "--runtime-env cluster/runtime_env.yaml"],
    "Dockerfile.gpu": ["docker build -f cluster/Dockerfile.gpu"],
    "Dockerfile.cpu": ["docker build -f cluster/Dockerfile.cpu"],
}


@pytest.mark.parametrize("name", sorted(RUNBOOK))
def test_every_cluster_file_opens_with_its_runbook(name):
    text = " ".join(header(CLUSTER / name).split()).replace("\\ ", "")
    missing = [s for s in RUNBOOK[name] if s not in text]
    assert not missing, f"{name}: the opening comment should show {missing}"


@pytest.mark.parametrize("name", MANIFESTS)
def test_runbook_names_match_the_manifest(name):
    doc, text = ray_doc(name), header(CLUSTER / name)
    if doc["kind"] == "RayCluster":
        assert f"raycluster {doc['metadata']['name']}" in text
        assert f"service/{doc['metadata']['name']}-head-svc" in text
    else:
        assert f"rayjob {doc['metadata']['name']}" in text
        (pvc,) = [d for d in load_docs("raycluster.yaml") if d["kind"] == "PersistentVolumeClaim"]
        label = pvc["metadata"]["labels"]["braid.io/component"]
        assert f"-l braid.io/component={label}" in text, "how to create only the volume"

"""The deployment files in cluster/ hold together: every manifest parses and has what its kind
needs, every `rbcbatch` command they run is a real command of this CLI with real options, every
job spec they name exists and validates, and the images run the project's Ray."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import ray
import typer
import yaml
from packaging.specifiers import SpecifierSet

from rbcbatch import __version__
from rbcbatch.cli import app
from rbcbatch.jobs.specs import cluster_path_problems, load_spec
from tests.conftest import REPO

try:  # typer >= 0.20 carries its own copy of click
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import UsageError

CLUSTER = REPO / "cluster"
DOCKERFILE = CLUSTER / "Dockerfile"

# Field names of KubeRay's ray.io/v1 types (ray-operator/apis/ray/v1/raycluster_types.go,
# rayjob_types.go, raycronjob_types.go): a misspelt field would be dropped by the API server.
RAYCLUSTER_SPEC_FIELDS = {
    "headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
    "autoscalerOptions", "headServiceAnnotations", "suspend",
}  # fmt: skip
HEAD_GROUP_FIELDS = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP_FIELDS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams",
    "template", "scaleStrategy",
}  # fmt: skip
AUTOSCALER_OPTION_FIELDS = {
    "resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts", "securityContext",
    "idleTimeoutSeconds", "upscalingMode",
}  # fmt: skip
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
    "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
    "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend",
}  # fmt: skip
# RayCronJob (alpha, KubeRay 1.6): schedule and jobTemplate; suspend per its quick-start guide.
RAYCRONJOB_SPEC_FIELDS = {"jobTemplate", "schedule", "suspend"}
SHELLS = {"sh", "/bin/sh", "bash", "/bin/bash"}


# -- reading the files ---------------------------------------------------------------------------
def cluster_yaml_files() -> list[Path]:
    return sorted(CLUSTER.glob("*.yaml")) + sorted(CLUSTER.glob("*.yml"))


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def is_launcher(doc: dict) -> bool:
    return "cluster_name" in doc and "provider" in doc


def kubernetes_documents() -> list[tuple[str, dict]]:
    """(where, document) for every Kubernetes object, those inside ConfigMaps included."""
    found = []
    for path in cluster_yaml_files():
        for doc in documents(path):
            if not is_launcher(doc):
                found.extend(_with_embedded(path.name, doc))
    return found


def _with_embedded(where: str, doc: dict) -> list[tuple[str, dict]]:
    out = [(where, doc)]
    if doc.get("kind") == "ConfigMap":
        for key, text in (doc.get("data") or {}).items():
            if key.endswith((".yaml", ".yml")):
                for inner in yaml.safe_load_all(text):
                    out.extend(_with_embedded(f"{where}:{key}", inner))
    return out


def of_kind(kind: str) -> list[tuple[str, dict]]:
    return [(w, d) for w, d in kubernetes_documents() if d.get("kind") == kind]


def launcher() -> dict:
    found = [d for p in cluster_yaml_files() for d in documents(p) if is_launcher(d)]
    assert len(found) == 1, "expected one Ray cluster-launcher YAML in cluster/"
    return found[0]


def dockerfile() -> list[str]:
    """Instructions of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def docker_image_ray_version(image: str) -> tuple[str, str]:
    """(Ray version, python tag) of a rayproject/ray image, e.g. ("2.60.0", "py311")."""
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-(py\d+)-(gpu|cu\d+)", image)
    assert match, f"{image!r} is not a GPU rayproject/ray:<version>-py<NN>-<gpu|cuNNN> image"
    return match.group(1), match.group(2)


def major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


# -- commands ------------------------------------------------------------------------------------
def rbcbatch_invocations(command: str) -> list[list[str]]:
    """The argv of every `rbcbatch ...` in a shell command line or script."""
    found = []
    for line in command.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        segment: list[str] = []
        for token in [*lexer, ";"]:
            if set(token) <= set("();<>|&"):  # a separator or redirection ends a command
                words = [w for w in segment if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", w)]
                if words and words[0] == "rbcbatch":
                    found.append(words)
                segment = []
                if token in (">", ">>", "<"):
                    segment = [">"]  # the redirection target is not a command
            else:
                segment.append(token)
    return found


def check_rbcbatch_argv(argv: list[str]) -> dict:
    """Parse argv with this CLI's own commands; UsageError when a command or option is unknown
    or a required one is missing. Returns the parsed parameters."""
    assert argv[0] == "rbcbatch"
    group = typer.main.get_command(app)
    ctx = group.context_class(group, info_name="rbcbatch")
    if len(argv) > 1 and argv[1].startswith("-"):
        known = {o for p in [*group.params, group.get_help_option(ctx)] if p for o in p.opts}
        unknown = [a for a in argv[1:] if a not in known]
        if unknown:
            raise UsageError(f"no such option: {unknown[0]}")
        return {}
    name = argv[1] if len(argv) > 1 else ""
    command = group.get_command(ctx, name)
    if command is None:
        raise UsageError(f"no such command: {name!r}")
    return command.make_context(name, list(argv[2:]), parent=ctx).params


def repo_path(path: str) -> Path:
    """A path as the image or the launched nodes see it, mapped back into this repository."""
    workdir = next(i.split(None, 1)[1] for i in dockerfile() if i.upper().startswith("WORKDIR"))
    if path.startswith(workdir.rstrip("/") + "/"):
        return REPO / path[len(workdir.rstrip("/")) + 1 :]
    return REPO / path


def container_commands(node) -> list[str]:
    """Command strings of a manifest: entrypoints, container command/args, launcher commands."""
    out = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "entrypoint" and isinstance(value, str):
                out.append(value)
            elif key in ("command", "args") and isinstance(value, list):
                if key == "command" and value and value[0] not in SHELLS:
                    out.append(shlex.join(value))
                else:
                    out.extend(v for v in value if isinstance(v, str) and v not in SHELLS)
            elif key.endswith("_commands") and isinstance(value, list):
                out.extend(value)
            else:
                out.extend(container_commands(value))
    elif isinstance(node, list):
        for item in node:
            out.extend(container_commands(item))
    return out


def all_invocations() -> list[tuple[str, list[str]]]:
    found = []
    for where, doc in kubernetes_documents():
        for command in container_commands(doc):
            found.extend((where, argv) for argv in rbcbatch_invocations(command))
    for command in container_commands(launcher()):
        found.extend(("launcher", argv) for argv in rbcbatch_invocations(command))
    for instruction in dockerfile():
        if instruction.upper().startswith("RUN "):
            found.extend(("Dockerfile", argv) for argv in rbcbatch_invocations(instruction[4:]))
    return found


# -- the checker can fail ------------------------------------------------------------------------
def test_the_command_checker_rejects_unknown_commands_and_options():
    assert check_rbcbatch_argv(["rbcbatch", "run-job", "jobs/nightly.yaml"]) == {
        "spec": "jobs/nightly.yaml",
        "verbose": False,
    }
    for argv in (
        ["rbcbatch", "runjob", "jobs/nightly.yaml"],
        ["rbcbatch", "run-job", "jobs/nightly.yaml", "--dry-run"],
        ["rbcbatch", "run-job"],
        ["rbcbatch", "run", "catalog.csv", "--output", "x"],
        ["rbcbatch", "--verbose"],
    ):
        with pytest.raises(UsageError):
            check_rbcbatch_argv(argv)


def test_invocations_are_found_in_shell_text():
    script = "set -eu\nFOO=1 rbcbatch run-job a.yaml && echo done; rbcbatch --help > /dev/null\n"
    assert rbcbatch_invocations(script) == [
        ["rbcbatch", "run-job", "a.yaml"],
        ["rbcbatch", "--help"],
    ]
    assert rbcbatch_invocations("pip install /home/ray/rbcbatch  # rbcbatch run") == []


# -- every file parses, every object has what its kind needs -------------------------------------
def test_every_yaml_parses_and_names_its_kind():
    files = cluster_yaml_files()
    assert {p.name for p in files} >= {
        "raycluster.yaml", "rayjob-screening.yaml", "nightly-cronjob.yaml", "aws.yaml",
    }  # fmt: skip
    for where, doc in kubernetes_documents():
        assert doc.get("apiVersion") and doc.get("kind"), where
        meta = doc.get("metadata") or {}
        assert meta.get("name") or meta.get("generateName"), f"{where}: {doc['kind']} has no name"


def _check_cluster_spec(where: str, spec: dict) -> None:
    assert set(spec) <= RAYCLUSTER_SPEC_FIELDS, f"{where}: {set(spec) - RAYCLUSTER_SPEC_FIELDS}"
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_OPTION_FIELDS, where
    assert major_minor(spec["rayVersion"]) == major_minor(ray.__version__), where
    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP_FIELDS and isinstance(head["rayStartParams"], dict), where
    assert head["template"]["spec"]["containers"], f"{where}: head has no container"
    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: no worker group"
    gpu_groups = 0
    for group in groups:
        assert set(group) <= WORKER_GROUP_FIELDS, f"{where}: {set(group) - WORKER_GROUP_FIELDS}"
        assert group["groupName"] and isinstance(group["rayStartParams"], dict), where
        low, high = group["minReplicas"], group["maxReplicas"]
        assert 0 <= low <= group.get("replicas", low) <= high and high >= 1, where
        for container in group["template"]["spec"]["containers"]:
            resources = container.get("resources", {})
            gpus = int(resources.get("limits", {}).get("nvidia.com/gpu", 0))
            if gpus:
                gpu_groups += 1
                assert int(resources.get("requests", {}).get("nvidia.com/gpu", gpus)) == gpus
    assert gpu_groups >= 1, f"{where}: no worker group has an nvidia.com/gpu limit"
    if spec.get("enableInTreeAutoscaling"):
        assert any(g["maxReplicas"] > g["minReplicas"] for g in groups), f"{where}: cannot scale"
    containers = [head["template"]["spec"]["containers"][0]] + [
        c for g in groups for c in g["template"]["spec"]["containers"]
    ]
    for container in containers:
        assert container["image"].endswith(f"/rbcbatch:{__version__}-gpu"), (
            f"{where}: {container['image']} is not this version's image (cluster/Dockerfile)"
        )


def test_raycluster_has_a_head_and_autoscaled_gpu_workers():
    (where, cluster), *others = of_kind("RayCluster")
    assert not others and cluster["apiVersion"] == "ray.io/v1"
    _check_cluster_spec(where, cluster["spec"])
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"


def _ray_job_specs() -> list[tuple[str, dict]]:
    jobs = [(w, d["spec"]) for w, d in of_kind("RayJob")]
    jobs += [(w, d["spec"]["jobTemplate"]) for w, d in of_kind("RayCronJob")]
    return jobs


def test_rayjobs_run_rbcbatch_on_the_cluster_spec():
    (_, cluster), *_ = of_kind("RayCluster")
    jobs = _ray_job_specs()
    assert len(jobs) >= 3, "the screening RayJob, the CronJob's RayJob and the RayCronJob's"
    for where, spec in jobs:
        assert set(spec) <= RAYJOB_SPEC_FIELDS, f"{where}: {set(spec) - RAYJOB_SPEC_FIELDS}"
        assert spec["entrypoint"].strip(), f"{where}: no entrypoint"
        assert rbcbatch_invocations(spec["entrypoint"]), f"{where}: entrypoint runs no rbcbatch"
        assert spec["shutdownAfterJobFinishes"] is True, f"{where}: the cluster would stay up"
        assert spec["rayClusterSpec"] == cluster["spec"], (
            f"{where}: rayClusterSpec differs from raycluster.yaml's spec; keep the copies equal"
        )
        _check_cluster_spec(where, spec["rayClusterSpec"])


def valid_cron(schedule: str) -> bool:
    """A standard 5-field cron schedule (numbers, *, ranges, steps, lists)."""
    bounds = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
    fields = schedule.split()
    if len(fields) != 5:
        return False
    for text, (low, high) in zip(fields, bounds, strict=True):
        for part in text.split(","):
            match = re.fullmatch(r"(\*|(\d+)(?:-(\d+))?)(?:/(\d+))?", part)
            if not match or (match.group(4) is not None and int(match.group(4)) == 0):
                return False
            if match.group(2) is not None:
                first = int(match.group(2))
                last = int(match.group(3)) if match.group(3) is not None else first
                if not low <= first <= last <= high:
                    return False
    return True


def test_the_cron_checker_can_fail():
    assert valid_cron("30 1 * * *") and valid_cron("*/15 0-6,22 1 1-12/2 1-5")
    for bad in ("30 1 * *", "61 * * * *", "* 24 * * *", "*/0 * * * *", "* * 0 * *", "@daily x"):
        assert not valid_cron(bad), bad


def test_nightly_schedules_are_valid_and_the_cronjob_creates_the_rayjob():
    cronjobs = of_kind("CronJob")
    raycronjobs = of_kind("RayCronJob")
    assert cronjobs, "a CronJob that creates the nightly RayJob"
    for where, doc in cronjobs + raycronjobs:
        assert valid_cron(doc["spec"]["schedule"]), f"{where}: {doc['spec']['schedule']!r}"
    for where, doc in raycronjobs:
        assert doc["apiVersion"] == "ray.io/v1"
        assert set(doc["spec"]) <= RAYCRONJOB_SPEC_FIELDS, where
    for where, cron in cronjobs:
        assert cron["apiVersion"] == "batch/v1"
        pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        script = "\n".join(container_commands(pod["containers"]))
        created = re.findall(r"kubectl create -f (\S+)", script)
        assert created, f"{where}: the CronJob creates nothing with kubectl"
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        configmaps = {d["metadata"]["name"]: d for _, d in of_kind("ConfigMap")}
        for path in created:
            folder, key = path.rsplit("/", 1)
            volume = volumes[mounts[folder]]
            manifest = configmaps[volume["configMap"]["name"]]["data"][key]
            assert [d["kind"] for d in yaml.safe_load_all(manifest)] == ["RayJob"]
        account = pod["serviceAccountName"]
        roles = {d["metadata"]["name"]: d for _, d in of_kind("Role")}
        bindings = [
            b for _, b in of_kind("RoleBinding") if any(s["name"] == account for s in b["subjects"])
        ]
        assert bindings, f"{where}: nothing grants {account} its rights"
        rules = roles[bindings[0]["roleRef"]["name"]]["rules"]
        assert any("rayjobs" in r["resources"] and "create" in r["verbs"] for r in rules)


# -- commands and job specs ----------------------------------------------------------------------
def test_every_rbcbatch_command_is_a_real_command_with_real_options():
    invocations = all_invocations()
    wheres = {w for w, _ in invocations}
    assert {"rayjob-screening.yaml", "raycronjob-nightly.yaml", "launcher", "Dockerfile"} <= wheres
    assert any(w.startswith("nightly-cronjob.yaml:") for w in wheres)
    for where, argv in invocations:
        try:
            check_rbcbatch_argv(argv)
        except UsageError as e:
            pytest.fail(f"{where}: {shlex.join(argv)}: {e.format_message()}")


def test_job_specs_named_by_the_manifests_exist_validate_and_suit_a_cluster():
    named = []
    for where, argv in all_invocations():
        params = check_rbcbatch_argv(argv)
        if argv[1] in ("run-job", "submit"):
            named.append((where, params["spec"]))
    assert len(named) >= 3
    for where, spec_path in named:
        path = repo_path(spec_path)
        assert path.is_file(), f"{where}: {spec_path} is not in the image ({path})"
        spec = load_spec(path)
        assert cluster_path_problems(spec) == [], where
        copied = " ".join(i for i in dockerfile() if i.upper().startswith("COPY"))
        top = path.relative_to(REPO).parts[0]
        assert re.search(rf"\s{top}/?\s+{top}/?(\s|$)", copied + " "), (
            f"the Dockerfile does not copy {top}/ into the image"
        )


# -- the image -----------------------------------------------------------------------------------
def test_dockerfile_builds_on_the_projects_ray_and_installs_the_package():
    instructions = dockerfile()
    froms = [i.split()[1] for i in instructions if i.upper().startswith("FROM ")]
    assert len(froms) == 1
    version, python = docker_image_ray_version(froms[0])
    assert major_minor(version) == major_minor(ray.__version__)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    image_python = f"{python[2]}.{python[3:]}"
    assert image_python in SpecifierSet(pyproject["project"]["requires-python"])
    runs = " ".join(i for i in instructions if i.upper().startswith("RUN "))
    assert re.search(r"pip install [^&;]*\s\.(\s|$)", runs + " "), "no `pip install .`"
    copies = " ".join(i for i in instructions if i.upper().startswith("COPY "))
    for needed in ("pyproject.toml", "rbcbatch/"):
        assert needed in copies, f"the image is built without {needed}"
    assert "ENV RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1" in instructions


def test_every_data_file_ships_inside_the_package():
    """Weights, grading schemes, SQL and templates: each matched by its package's package-data."""
    from fnmatch import fnmatch

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    package_data = pyproject["tool"]["setuptools"]["package-data"]
    files = [
        p
        for p in (REPO / "rbcbatch").rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    ]
    assert any(p.suffix == ".safetensors" for p in files)
    for path in files:
        package = path.parent
        while not (package / "__init__.py").exists():
            package = package.parent
        name = ".".join(package.relative_to(REPO).parts)
        relative = path.relative_to(package).as_posix()
        patterns = package_data.get(name, [])
        assert any(fnmatch(relative, pattern) for pattern in patterns), (
            f"{path.relative_to(REPO)} is not in package-data of {name}"
        )


# -- the cloud VM cluster ------------------------------------------------------------------------
def test_launcher_yaml_is_a_valid_cluster_with_gpu_workers():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    config = launcher()
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert config.get(key), f"launcher YAML lacks {key}"
    validate_config(fillout_defaults(config))  # Ray's own schema and checks
    types = config["available_node_types"]
    head = config["head_node_type"]
    assert head in types
    gpu_workers = [
        name for name, t in types.items()
        if name != head and t["resources"].get("GPU", 0) >= 1 and t["max_workers"] >= 1
    ]  # fmt: skip
    assert gpu_workers, "no GPU worker node type"
    for name in gpu_workers:
        assert types[name].get("min_workers", 0) <= types[name]["max_workers"]
    version, _ = docker_image_ray_version(config["docker"]["image"])
    assert major_minor(version) == major_minor(ray.__version__)
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--head" in head_start
    assert ("--num-cpus=0" in head_start) == (types[head]["resources"].get("CPU") == 0)


def test_launcher_installs_this_checkout_on_every_node():
    config = launcher()
    mounts = {remote: local for remote, local in config["file_mounts"].items()}
    sources = [remote for remote, local in mounts.items() if (REPO / local).resolve() == REPO]
    assert sources, "no file mount carries the repository to the nodes"
    setup = " ".join(config["setup_commands"])
    assert any(
        re.search(rf"pip install [^&;]*\s{re.escape(s)}(\s|$)", setup + " ") for s in sources
    )
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["name"] == "rbcbatch"

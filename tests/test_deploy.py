"""deploy/k8s manifests and the Dockerfile: every container's arguments parse with the parser
of its `exegpt COMMAND` (the one `exegpt COMMAND --help` prints), probes are gRPC health on
the port the process serves, StatefulSets sit behind headless Services whose names the
worker and router use, and the API key comes only from a Secret."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from exegpt.command_line import DefaultsHelpFormatter
from exegpt.commands import cli
from exegpt.security import API_KEY_ENV
from exegpt.topology import parse_stage_addresses

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
WORKLOADS = ("Deployment", "StatefulSet", "Job")
POD_IP = "10.1.2.3"  # what the kubelet substitutes for $(POD_IP)


class _Refused(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would exit the test process
        raise _Refused(f"{self.prog}: {message}")


def _parser(command: str) -> argparse.ArgumentParser:
    """What `exegpt COMMAND` builds (exegpt/commands/cli.py), raising instead of exiting."""
    parser = _Parser(
        prog=f"exegpt {command}",
        description=cli.COMMANDS[command],
        formatter_class=DefaultsHelpFormatter,
    )
    cli.load_command(command).add_arguments(parser)
    return parser


def _documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def _by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in _documents() if d["kind"] == kind}


def _env(container: dict[str, Any]) -> dict[str, str]:
    values = {}
    for item in container.get("env", []):
        source = item.get("valueFrom", {})
        if "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "status.podIP"
            values[item["name"]] = POD_IP
        elif "secretKeyRef" in source:
            values[item["name"]] = "secret-from-" + source["secretKeyRef"]["name"]
        else:
            values[item["name"]] = str(item["value"])
    return values


def _expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in args, from the container's own env."""

    def value(match: re.Match[str]) -> str:
        assert match.group(1) in env, f"{arg}: $({match.group(1)}) is not in the container env"
        return env[match.group(1)]

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value, arg)


def _exegpt_containers() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for every container that runs the exegpt entrypoint."""
    found = []
    for doc in _documents():
        if doc["kind"] in WORKLOADS:
            for container in doc["spec"]["template"]["spec"]["containers"]:
                assert "command" not in container, "containers run the image's `exegpt`"
                found.append((doc, container))
    return found


def _parsed(container: dict[str, Any]) -> tuple[str, argparse.Namespace]:
    env = _env(container)
    command, *rest = (_expand(arg, env) for arg in container["args"])
    return command, _parser(command).parse_args(rest)


def test_every_manifest_is_listed_and_every_workload_is_there() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    on_disk = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk
    kinds = {(d["kind"], d["metadata"]["name"]) for d in _documents()}
    assert {("Deployment", "exegpt-router"), ("Service", "exegpt-router")} <= kinds
    assert {("StatefulSet", "exegpt-worker"), ("StatefulSet", "exegpt-stage")} <= kinds
    assert {("Deployment", "exegpt-scheduler"), ("Job", "exegpt-profile")} <= kinds
    commands = {_parsed(c)[0] for _, c in _exegpt_containers()}
    assert commands == {"router", "worker", "stage", "scheduler", "profile"}


@pytest.mark.parametrize("index", range(len(_exegpt_containers())))
def test_container_args_parse_with_the_exegpt_command_parser(
    index: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    workload, container = _exegpt_containers()[index]
    command, args = _parsed(container)
    assert _parser(command).format_help().startswith(f"usage: exegpt {command}")
    assert getattr(args, "api_key", None) is None, "the key comes from a Secret, never a flag"
    for name, value in _env(container).items():
        monkeypatch.setenv(name, value)
    module = cli.load_command(command)
    if hasattr(module, "config_from_args"):  # the command's own checks on top of argparse
        module.config_from_args(args)
    if command != "profile":  # a long-running service: the key from the Secret
        (item,) = [e for e in container["env"] if e["name"] == API_KEY_ENV]
        assert item["valueFrom"]["secretKeyRef"] == {"name": "exegpt-api-key", "key": "api-key"}


@pytest.mark.parametrize("index", range(len(_exegpt_containers())))
def test_services_probe_grpc_health_on_the_port_they_serve(index: int) -> None:
    workload, container = _exegpt_containers()[index]
    command, args = _parsed(container)
    if workload["kind"] == "Job":
        return
    port = args.grpc_port if command == "router" else args.port
    assert port in {p["containerPort"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": port}, (command, probe)
    assert args.host in ("0.0.0.0", POD_IP)


def _pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def test_statefulsets_have_headless_services_that_the_worker_and_router_address() -> None:
    services, sets = _by_kind("Service"), _by_kind("StatefulSet")
    for workload in sets.values():
        service = services[workload["spec"]["serviceName"]]
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["selector"].items() <= _pod_labels(workload).items()
    stage_args = _parsed(sets["exegpt-stage"]["spec"]["template"]["spec"]["containers"][0])[1]
    worker = _parsed(sets["exegpt-worker"]["spec"]["template"]["spec"]["containers"][0])[1]
    stages = parse_stage_addresses(worker.stages)
    assert len(stages) == worker.pipeline_stages
    addresses = [address for ranks in stages for address in ranks]
    replicas = sets["exegpt-stage"]["spec"]["replicas"]
    assert addresses == [
        f"exegpt-stage-{i}.exegpt-stage:{stage_args.port}" for i in range(replicas)
    ]
    router = _parsed(
        _by_kind("Deployment")["exegpt-router"]["spec"]["template"]["spec"]["containers"][0]
    )[1]
    assert router.replicas == f"exegpt-worker-0.exegpt-worker:{worker.port}"
    scheduler = _by_kind("Deployment")["exegpt-scheduler"]["spec"]["template"]["spec"]
    assert worker.scheduler == f"exegpt-scheduler:{_parsed(scheduler['containers'][0])[1].port}"


def test_services_select_their_pods() -> None:
    workloads = {**_by_kind("Deployment"), **_by_kind("StatefulSet")}
    for name, service in _by_kind("Service").items():
        labels = _pod_labels(workloads[name])
        assert service["spec"]["selector"].items() <= labels.items()


def test_the_dockerfile_installs_the_cpu_torch_build_before_the_project() -> None:
    text = (ROOT / "Dockerfile").read_text()
    torch_at = text.index('--index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"')
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert torch_at < text.index("RUN pip install .")
    assert 'ENTRYPOINT ["exegpt"]' in text and "whl/cu128" in text  # the CUDA variant, documented
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    spec = re.search(r"EXEGPT_TORCH_SPEC:-([^}]+)\}", setup)
    assert spec is not None and f"ARG TORCH_SPEC={spec.group(1)}" in text

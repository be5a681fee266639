"""deploy/: the Kubernetes manifests hold together (labels, ports, probes, the real serve flags)
and the Dockerfile copies what the package is built from."""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmscore.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "deploy" / "kubernetes" / "lmscore.yaml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


@pytest.fixture(scope="module")
def docs() -> dict[str, dict[str, Any]]:
    loaded = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    by_kind = {d["kind"]: d for d in loaded}
    assert sorted(by_kind) == ["Deployment", "Service"] and len(loaded) == 2
    return by_kind


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    [only] = deployment["spec"]["template"]["spec"]["containers"]
    return only


def serve_args(deployment: dict[str, Any]) -> argparse.Namespace:
    args = container(deployment)["args"]
    assert all(isinstance(a, str) for a in args)  # YAML numbers would not reach argv as such
    parsed = build_parser().parse_args(args)  # exits (SystemExit) on an unknown flag
    assert parsed.command == "serve"
    return parsed


def test_service_is_headless_and_selects_the_pods(docs: dict[str, dict[str, Any]]) -> None:
    deployment, service = docs["Deployment"], docs["Service"]
    assert service["spec"]["clusterIP"] == "None"  # one DNS record per pod, for round_robin
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["replicas"] >= 2


def test_ports_match_the_server_flags_and_the_service(docs: dict[str, dict[str, Any]]) -> None:
    deployment, service = docs["Deployment"], docs["Service"]
    args = serve_args(deployment)
    ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    assert ports == {"grpc": args.port, "metrics": args.metrics_port}
    assert args.host == "0.0.0.0"  # reachable from other pods, probes included
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports and port["port"] == ports[port["targetPort"]]
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)


def test_probes_are_grpc_health_checks_on_the_grpc_port(docs: dict[str, dict[str, Any]]) -> None:
    spec = container(docs["Deployment"])
    grpc_port = serve_args(docs["Deployment"]).port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert spec[probe]["grpc"]["port"] == grpc_port, probe
    # The server reports health for "" and for lmscore.v1.Scorer (server/app.py).
    assert spec["readinessProbe"]["grpc"].get("service", "") in ("", "lmscore.v1.Scorer")


def test_shutdown_grace_fits_in_the_pod_grace(docs: dict[str, dict[str, Any]]) -> None:
    args = serve_args(docs["Deployment"])
    pod_grace = docs["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert args.shutdown_grace < pod_grace  # in-flight calls finish before the kubelet's SIGKILL


def test_prometheus_annotations_name_the_metrics_port(docs: dict[str, dict[str, Any]]) -> None:
    template = docs["Deployment"]["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == serve_args(docs["Deployment"]).metrics_port
    assert annotations["prometheus.io/path"] == "/metrics"


def test_resources_and_threads_agree(docs: dict[str, dict[str, Any]]) -> None:
    spec = container(docs["Deployment"])
    resources = spec["resources"]
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"]
    assert int(resources["limits"]["cpu"]) == serve_args(docs["Deployment"]).intra_op_threads


def test_dockerfile_copies_every_package_directory_and_the_model_path(
    docs: dict[str, dict[str, Any]],
) -> None:
    text = DOCKERFILE.read_text()
    copied = set(re.findall(r"^COPY (?!--)(.+) \S+$", text, re.MULTILINE))
    sources = {s for line in copied for s in line.split()}
    for source in sources:
        assert (ROOT / source).exists(), source
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dirs = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    assert {d.split("/")[0] for d in package_dirs} | {"pyproject.toml", "README.md"} <= sources
    # The manifest serves the model directory the image exports, and only it.
    [model] = serve_args(docs["Deployment"]).model
    assert f"--output {model}" in text

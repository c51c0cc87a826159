"""deploy/kubernetes as the tests read it: each kustomization rendered once (tests/kustomize.py, the
way `kubectl kustomize --load-restrictor LoadRestrictionsNone` renders it), and its parts."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import yaml

from extproc.settings import PLACEHOLDER

from .kustomize import render, split_image

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
KUSTOMIZATIONS = ("base", "overlays/dev", "overlays/production")

Object = dict[str, Any]


@functools.cache
def _rendered(kustomization: str) -> list[Object]:
    return render(KUBERNETES / kustomization, load_restrictor_none=True)


def rendered(kustomization: str) -> list[Object]:
    """The objects `kubectl kustomize` makes of ``deploy/kubernetes/KUSTOMIZATION`` (a fresh copy)."""
    return copy.deepcopy(_rendered(kustomization))


def one(objects: list[Object], kind: str, name: str | None = None) -> Object:
    [found] = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    return found


def pod(kustomization: str) -> Object:
    """The Pod spec of the Deployment `llm`: model server, extproc and Envoy."""
    spec: Object = one(rendered(kustomization), "Deployment", "llm")["spec"]["template"]["spec"]
    return spec


def containers(kustomization: str) -> dict[str, Object]:
    """The Pod's containers by name, init containers (the native sidecars) first."""
    spec = pod(kustomization)
    return {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]}


def runs_extproc(container: Object) -> bool:
    """Whether the container runs the extproc image (whatever registry an overlay moves it to)."""
    name, _tag, _digest = split_image(container["image"])
    return name.rsplit("/", 1)[-1] == "extproc"


def settings_text(kustomization: str) -> str:
    """The settings file of the kustomization, as its generated ConfigMap carries it."""
    [config_map] = [
        o
        for o in rendered(kustomization)
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("extproc-settings-")
    ]
    text: str = config_map["data"]["settings.yaml"]
    return text


def operator_settings_text(text: str) -> str:
    """Shipped settings once the operator has set every placeholder: the identity provider's values,
    the Redis and the approval page's address."""
    text = text.replace(f"https://{PLACEHOLDER}.example", "https://login.example.com")
    text = text.replace(f"[{PLACEHOLDER}]", "[llm-gateway]")
    text = text.replace(f"redis.{PLACEHOLDER}.svc", "redis.ai.svc")
    text = text.replace(f"approvals.{PLACEHOLDER}.example", "approvals.example.com")
    assert PLACEHOLDER not in json.dumps(yaml.safe_load(text))  # (comments may still name it)
    return text

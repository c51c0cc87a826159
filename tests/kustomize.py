"""Kustomize, for exactly what deploy/kubernetes uses, so that `make test` renders the overlays without
kubectl: the kubectl that Debian packages (kubernetes-client, 1.20) carries Kustomize 2.0.3, which knows
neither `patches` nor `labels` nor per-generator options, and no PyPI package ships a current one.

What is covered, with Kustomize 5's semantics (tests/test_kustomize.py holds each case against output
written out by hand, and the hash and list orders against what `kubectl kustomize` printed for them):

- ``resources``: YAML files (several documents each) and folders holding a kustomization.yaml
- ``configMapGenerator``: ``name``, ``files`` (``PATH`` or ``KEY=PATH``), ``behavior`` (create, replace,
  merge), ``options.disableNameSuffixHash``; the name's content hash, and the references to it in Pod
  templates renamed along
- ``patches``: strategic-merge patches from a file (``path``), matched by kind and name; merge keys for
  the lists deploy/kubernetes patches (``MERGE_KEYS``), ``$patch: delete`` in those lists, null to
  delete a field; other lists are replaced
- ``namespace``, ``labels`` (``pairs``; metadata only, as without includeSelectors), ``images``
  (``name``, ``newName``, ``newTag``, ``digest``), ``replicas``
- the load restrictor: files outside the kustomization's folder are refused unless the renderer is
  told what ``--load-restrictor LoadRestrictionsNone`` tells Kustomize
- the output order of ``kubectl kustomize`` (its legacy order: namespaces first, then by kind)

Anything else in a kustomization.yaml is an error here, never silently ignored: a field this renderer
does not know would otherwise be rendered as if it were not there.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

Object = dict[str, Any]

KUSTOMIZATION_FIELDS = frozenset(
    {
        "apiVersion",
        "kind",
        "resources",
        "namespace",
        "labels",
        "images",
        "replicas",
        "patches",
        "configMapGenerator",
    }
)
# Lists merged item by item in a strategic-merge patch, and the field naming an item (the
# patchMergeKey of the Kubernetes API types). `ports` is told apart by where it is: a container's are
# keyed by containerPort, a Service's by port.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
    "topologySpreadConstraints": "topologyKey",
}
CLUSTER_SCOPED = frozenset({"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"})
WORKLOADS = frozenset({"Deployment", "StatefulSet", "ReplicaSet", "DaemonSet"})
# kubectl kustomize's default (legacy) order: these kinds first, in this order, the rest after them by
# group, version and kind, then by namespace and name.
ORDER_FIRST = [
    "Namespace",
    "ResourceQuota",
    "StorageClass",
    "CustomResourceDefinition",
    "ServiceAccount",
    "PodSecurityPolicy",
    "Role",
    "ClusterRole",
    "RoleBinding",
    "ClusterRoleBinding",
    "ConfigMap",
    "Secret",
    "Endpoints",
    "Service",
    "LimitRange",
    "PriorityClass",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "Deployment",
    "StatefulSet",
    "CronJob",
    "PodDisruptionBudget",
]
ORDER_LAST = ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"]
CONFIG_MAP_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")


class KustomizeError(Exception):
    """A kustomization this renderer refuses: what and where."""


@dataclass
class _Resource:
    obj: Object
    hashed: bool = False  # a generated ConfigMap whose name gets its content's hash


def render(directory: Path, *, load_restrictor_none: bool = False) -> list[Object]:
    """What ``kubectl kustomize DIRECTORY`` prints, as objects (``load_restrictor_none``: with
    ``--load-restrictor LoadRestrictionsNone``)."""
    resources = _build(directory.resolve(), load_restrictor_none)
    renamed: dict[tuple[str | None, str], str] = {}
    for resource in resources:
        if resource.hashed:
            metadata = resource.obj["metadata"]
            name = f"{metadata['name']}-{config_map_hash(resource.obj['data'])}"
            renamed[(metadata.get("namespace"), metadata["name"])] = name
            metadata["name"] = name
    for resource in resources:
        _rename_config_map_references(resource.obj, renamed)
    return sorted((r.obj for r in resources), key=_legacy_order)


def config_map_hash(data: dict[str, str]) -> str:
    """Kustomize's name suffix for a ConfigMap with this data. Kustomize 5 hashes the JSON of kind, data
    and a name it looks up under a path that does not exist, so the name in the hash is always empty;
    Go's encoder escapes <, > and & (and U+2028, U+2029) where Python's does not."""
    encoded = json.dumps(
        {"data": data, "kind": "ConfigMap", "name": ""},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        encoded = encoded.replace(char, escape)
    encoded = encoded.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    digest = hashlib.sha256(encoded.encode("utf-8")).hexdigest()[:10]
    # Vowels and vowel-like digits become consonants, so that no word can be spelled.
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def _build(directory: Path, load_restrictor_none: bool) -> list[_Resource]:
    """One kustomization's resources, before the name hashes (which only the top one adds)."""
    file = directory / "kustomization.yaml"
    if not file.is_file():
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    kustomization = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    unknown = sorted(set(kustomization) - KUSTOMIZATION_FIELDS)
    if unknown:
        raise KustomizeError(f"{file}: fields this renderer does not implement: {', '.join(unknown)}")

    def load(relative: str) -> Path:
        path = directory / relative
        if not load_restrictor_none and not path.resolve().is_relative_to(directory):
            raise KustomizeError(
                f"{file}: security; file '{path.resolve()}' is not in or below '{directory}' "
                "(Kustomize loads it with --load-restrictor LoadRestrictionsNone)"
            )
        if not path.is_file():
            raise KustomizeError(f"{file}: no such file: {relative}")
        return path

    resources: list[_Resource] = []
    for entry in kustomization.get("resources", []):
        if (directory / entry).is_dir():
            resources.extend(_build((directory / entry).resolve(), load_restrictor_none))
        else:
            text = load(entry).read_text(encoding="utf-8")
            resources.extend(_Resource(doc) for doc in yaml.safe_load_all(text) if doc)
    _check_unique(resources, file)

    for generator in kustomization.get("configMapGenerator", []):
        _generate(generator, resources, load, file)
    for patch in kustomization.get("patches", []):
        _patch(patch, resources, load, file)
    if "namespace" in kustomization:
        for resource in resources:
            _set_namespace(resource.obj, kustomization["namespace"])
    for labels in kustomization.get("labels", []):
        _label(labels, resources, file)
    for replicas in kustomization.get("replicas", []):
        _scale(replicas, resources, file)
    for image in kustomization.get("images", []):
        _retag(image, resources, file)
    _check_unique(resources, file)
    return resources


def _identity(obj: Object) -> tuple[str, str | None, str]:
    return obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]


def _check_unique(resources: list[_Resource], file: Path) -> None:
    seen: set[tuple[str, str | None, str]] = set()
    for resource in resources:
        identity = _identity(resource.obj)
        if identity in seen:
            raise KustomizeError(f"{file}: {identity} is defined twice")
        seen.add(identity)


def _only(mapping: Object, allowed: set[str], what: str, file: Path) -> None:
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise KustomizeError(f"{file}: {what}: fields this renderer does not implement: {', '.join(unknown)}")


def _generate(generator: Object, resources: list[_Resource], load: Callable[[str], Path], file: Path) -> None:
    _only(generator, {"name", "files", "behavior", "options"}, "configMapGenerator", file)
    _only(generator.get("options", {}), {"disableNameSuffixHash"}, "configMapGenerator options", file)
    name = generator["name"]
    data: dict[str, str] = {}
    for source in generator.get("files", []):
        key, sep, relative = source.partition("=")
        if not sep:
            key, relative = Path(source).name, source
        if not CONFIG_MAP_KEY.match(key):
            raise KustomizeError(f"{file}: {name}: {key!r} is not a valid ConfigMap key")
        if key in data:
            raise KustomizeError(f"{file}: {name}: key {key!r} given twice")
        data[key] = load(relative).read_text(encoding="utf-8")
    options = generator.get("options", {})
    behavior = generator.get("behavior", "create")
    existing = [r for r in resources if r.obj["kind"] == "ConfigMap" and r.obj["metadata"]["name"] == name]
    if behavior == "create":
        if existing:
            raise KustomizeError(f"{file}: ConfigMap {name} exists already (behavior: replace or merge)")
        config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}
        resources.append(_Resource(config_map, hashed=not options.get("disableNameSuffixHash", False)))
        return
    if behavior not in ("replace", "merge"):
        raise KustomizeError(f"{file}: {name}: behavior {behavior!r} is not create, replace or merge")
    if len(existing) != 1:
        raise KustomizeError(f"{file}: {name}: behavior {behavior} needs one ConfigMap {name} to change")
    [target] = existing
    target.obj["data"] = data if behavior == "replace" else {**target.obj.get("data", {}), **data}
    if "disableNameSuffixHash" in options:
        target.hashed = not options["disableNameSuffixHash"]


def _patch(patch: Object, resources: list[_Resource], load: Callable[[str], Path], file: Path) -> None:
    _only(patch, {"path"}, "patches (a strategic-merge patch file, no target)", file)
    documents = [d for d in yaml.safe_load_all(load(patch["path"]).read_text(encoding="utf-8")) if d]
    if len(documents) != 1:
        raise KustomizeError(f"{file}: {patch['path']}: one patch per file")
    [body] = documents
    kind, name = body["kind"], body["metadata"]["name"]
    namespace = body["metadata"].get("namespace")
    targets = [
        r
        for r in resources
        if r.obj["kind"] == kind
        and r.obj["metadata"]["name"] == name
        and (namespace is None or r.obj["metadata"].get("namespace") == namespace)
    ]
    if len(targets) != 1:
        raise KustomizeError(f"{file}: {patch['path']}: no single {kind} {name} to patch")
    targets[0].obj = _merge_map(targets[0].obj, body, ())


def _merge_key(path: tuple[str, ...]) -> str | None:
    if path[-1] == "ports":
        return "containerPort" if len(path) > 1 and path[-2] in ("containers", "initContainers") else "port"
    return MERGE_KEYS.get(path[-1])


def _merge_map(base: Object, patch: Object, path: tuple[str, ...]) -> Object:
    if "$patch" in patch:
        raise KustomizeError(f"{'.'.join(path)}: $patch is implemented in merged lists only")
    merged = dict(base)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif key in merged:
            merged[key] = _merge_value(merged[key], value, (*path, key))
        else:
            merged[key] = _merge_value(None, value, (*path, key))
    return merged


def _merge_value(base: Any, patch: Any, path: tuple[str, ...]) -> Any:
    if isinstance(patch, dict):
        return _merge_map(base if isinstance(base, dict) else {}, patch, path)
    if isinstance(patch, list):
        key = _merge_key(path)
        if key is None:
            return copy.deepcopy(patch)
        return _merge_list(base if isinstance(base, list) else [], patch, key, path)
    return patch


def _merge_list(base: list[Object], patch: list[Object], key: str, path: tuple[str, ...]) -> list[Object]:
    """Kustomize's order: the patch's items in the patch's order (an existing one merged where the
    patch names it), then the items the patch does not name, in their order."""
    existing = {item[key]: item for item in base}
    named: set[Any] = set()
    merged: list[Object] = []
    for item in patch:
        if key not in item:
            raise KustomizeError(f"{'.'.join(path)}: an item without its merge key {key!r}")
        named.add(item[key])
        directive = item.get("$patch")
        if directive == "delete":
            continue
        if directive is not None:
            raise KustomizeError(f"{'.'.join(path)}: $patch: {directive} is not implemented")
        merged.append(_merge_map(existing.get(item[key], {}), item, path))
    merged.extend(item for item in base if item[key] not in named)
    return merged


def _set_namespace(obj: Object, namespace: str) -> None:
    if obj["kind"] == "Namespace":
        obj["metadata"]["name"] = namespace  # as Kustomize does: the one namespace is the one named
    elif obj["kind"] not in CLUSTER_SCOPED:
        obj["metadata"]["namespace"] = namespace


def _label(labels: Object, resources: list[_Resource], file: Path) -> None:
    _only(labels, {"pairs", "includeSelectors", "includeTemplates"}, "labels", file)
    if labels.get("includeSelectors") or labels.get("includeTemplates"):
        raise KustomizeError(f"{file}: labels: includeSelectors and includeTemplates are not implemented")
    for resource in resources:
        resource.obj["metadata"].setdefault("labels", {}).update(labels["pairs"])


def _scale(replicas: Object, resources: list[_Resource], file: Path) -> None:
    _only(replicas, {"name", "count"}, "replicas", file)
    targets = [
        r for r in resources if r.obj["kind"] in WORKLOADS and r.obj["metadata"]["name"] == replicas["name"]
    ]
    if not targets:
        raise KustomizeError(f"{file}: replicas: no workload named {replicas['name']}")
    for target in targets:
        target.obj["spec"]["replicas"] = replicas["count"]


def _pod_specs(obj: Object) -> list[Object]:
    if obj["kind"] == "Pod":
        return [obj["spec"]]
    template = obj.get("spec", {}).get("template", {})
    return [template["spec"]] if "spec" in template else []


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """An image reference as name, tag and digest (a registry's port is part of the name)."""
    rest, _, digest = image.partition("@")
    name, colon, tag = rest.rpartition(":")
    if not colon or "/" in tag:
        return rest, None, digest or None
    return name, tag, digest or None


def _retag(image: Object, resources: list[_Resource], file: Path) -> None:
    _only(image, {"name", "newName", "newTag", "digest"}, "images", file)
    for resource in resources:
        for spec in _pod_specs(resource.obj):
            for container in spec.get("initContainers", []) + spec.get("containers", []):
                name, tag, digest = split_image(container["image"])
                if name != image["name"]:
                    continue
                name = image.get("newName", name)
                if "digest" in image:
                    tag, digest = None, image["digest"]
                elif "newTag" in image:
                    tag, digest = str(image["newTag"]), None
                container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def _rename_config_map_references(obj: Object, renamed: dict[tuple[str | None, str], str]) -> None:
    namespace = obj["metadata"].get("namespace")

    def new(name: str) -> str:
        return renamed.get((namespace, name), name)

    for spec in _pod_specs(obj):
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                volume["configMap"]["name"] = new(volume["configMap"]["name"])
            for source in volume.get("projected", {}).get("sources", []):
                if "configMap" in source:
                    source["configMap"]["name"] = new(source["configMap"]["name"])
        for container in spec.get("initContainers", []) + spec.get("containers", []):
            for variable in container.get("env", []):
                reference = variable.get("valueFrom", {}).get("configMapKeyRef")
                if reference is not None:
                    reference["name"] = new(reference["name"])
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    source["configMapRef"]["name"] = new(source["configMapRef"]["name"])


def _legacy_order(obj: Object) -> tuple[int, str, str, str]:
    kind = obj["kind"]
    if kind in ORDER_FIRST:
        rank = ORDER_FIRST.index(kind) - len(ORDER_FIRST)
    elif kind in ORDER_LAST:
        rank = ORDER_LAST.index(kind) + 1
    else:
        rank = 0
    group, _, version = obj["apiVersion"].rpartition("/")
    gvk = f"{group or '~G'}_{version or '~V'}_{kind}"
    return rank, gvk, obj["metadata"].get("namespace") or "~X", obj["metadata"]["name"]


def dump(objects: list[Object]) -> str:
    """The objects as one YAML stream, keys sorted as kubectl kustomize prints them."""
    return "---\n".join(yaml.safe_dump(obj, sort_keys=True) for obj in objects)


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.kustomize DIR`` prints the rendering; with ``--compare-with-kubectl``, renders
    with a kubectl on PATH too and says whether the objects differ (exit 1 when they do)."""
    import argparse
    import difflib
    import subprocess

    parser = argparse.ArgumentParser(prog="python -m tests.kustomize", description=main.__doc__)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--compare-with-kubectl", action="store_true")
    args = parser.parse_args(argv)
    ours = render(args.directory, load_restrictor_none=True)
    if not args.compare_with_kubectl:
        print(dump(ours), end="")
        return 0
    command = ["kubectl", "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(args.directory)]
    theirs = [
        o for o in yaml.safe_load_all(subprocess.run(command, check=True, capture_output=True).stdout) if o
    ]
    if theirs == ours:
        print(
            f"{args.directory}: the same {len(ours)} objects, in the same order, as {' '.join(command[:2])}"
        )
        return 0
    diff = difflib.unified_diff(
        dump(theirs).splitlines(), dump(ours).splitlines(), "kubectl", "tests/kustomize.py"
    )
    print("\n".join(diff))
    return 1


if __name__ == "__main__":
    raise SystemExit(main())

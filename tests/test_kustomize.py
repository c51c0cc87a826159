"""tests/kustomize.py, the renderer `make test` uses instead of kubectl, on small kustomizations whose
output is written out below. The names' hashes and the orders of merged lists are the ones
`kubectl kustomize` (Kustomize 5.5) printed for the same files."""

from pathlib import Path
from textwrap import dedent

import pytest
import yaml

from .kustomize import KustomizeError, config_map_hash, render, split_image

DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, labels: {app: web}}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      initContainers:
      - {name: sidecar, image: "registry.local:5000/tools/sidecar:1.0", restartPolicy: Always}
      containers:
      - name: main
        image: app:1.0
        args: [serve, --port, "8080"]
        env:
        - {name: MODE, value: base}
        - name: LEVEL
          valueFrom: {configMapKeyRef: {name: settings, key: level}}
        ports:
        - {containerPort: 1}
        - {containerPort: 2, name: two}
        volumeMounts:
        - {name: settings, mountPath: /etc/settings}
        - {name: scratch, mountPath: /tmp}
      volumes:
      - {name: settings, configMap: {name: settings}}
      - {name: scratch, emptyDir: {}}
      - {name: fixed, configMap: {name: fixed}}
"""
SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080}
"""


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dedent(text) if name.endswith("kustomization.yaml") else text)
    return root


def _expected(text: str) -> list[dict[str, object]]:
    return [d for d in yaml.safe_load_all(dedent(text)) if d]


def test_the_hash_suffix_is_kustomizes() -> None:
    # Printed by kubectl kustomize for ConfigMaps of these contents (whatever their names).
    assert config_map_hash({"s.yaml": "a: <1> & x\n"}) == "4b58gt265m"
    assert config_map_hash({"s.yaml": "b: 2\n"}) == "2fb95t9kbd"
    assert config_map_hash({"level": "info\n"}) == "4ftkhfb492"


def test_resources_generators_namespace_labels_and_order(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "base/kustomization.yaml": """\
                resources: [deployment.yaml, service.yaml]
                configMapGenerator:
                - name: settings
                  files: [level]
                - name: fixed
                  files: [renamed=other.txt]
                  options: {disableNameSuffixHash: true}
                """,
            "base/deployment.yaml": DEPLOYMENT,
            "base/service.yaml": SERVICE,
            "base/level": "info\n",
            "base/other.txt": "text\n",
            "overlay/kustomization.yaml": """\
                namespace: shop
                resources: [../base, namespace.yaml]
                labels:
                - pairs: {part-of: shop}
                """,
            "overlay/namespace.yaml": "apiVersion: v1\nkind: Namespace\nmetadata: {name: placeholder}\n",
        },
    )
    rendered = render(root / "overlay")
    assert [(o["kind"], o["metadata"]["name"]) for o in rendered] == [
        ("Namespace", "shop"),  # renamed to the kustomization's namespace, as Kustomize does
        ("ConfigMap", "fixed"),
        ("ConfigMap", "settings-4ftkhfb492"),
        ("Service", "web"),
        ("Deployment", "web"),
    ]
    namespace, fixed, settings, service, deployment = rendered
    assert namespace == {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": "shop", "labels": {"part-of": "shop"}},
    }
    assert fixed == {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "fixed", "namespace": "shop", "labels": {"part-of": "shop"}},
        "data": {"renamed": "text\n"},
    }
    assert settings["data"] == {"level": "info\n"}
    assert service["metadata"] == {"name": "web", "namespace": "shop", "labels": {"part-of": "shop"}}
    assert service["spec"]["selector"] == {"app": "web"}  # labels leave selectors alone
    assert deployment["metadata"]["labels"] == {"app": "web", "part-of": "shop"}
    assert deployment["spec"]["selector"] == {"matchLabels": {"app": "web"}}
    assert deployment["spec"]["template"]["metadata"] == {"labels": {"app": "web"}}
    pod = deployment["spec"]["template"]["spec"]
    # The hashed name follows into every reference; the unhashed one is left as it is.
    assert [v.get("configMap", {}).get("name") for v in pod["volumes"]] == [
        "settings-4ftkhfb492",
        None,
        "fixed",
    ]
    assert pod["containers"][0]["env"][1]["valueFrom"]["configMapKeyRef"]["name"] == "settings-4ftkhfb492"


def test_strategic_merge_patches_follow_kustomizes_merge_keys_and_order(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "kustomization.yaml": """\
                resources: [deployment.yaml]
                patches:
                - path: patch.yaml
                """,
            "deployment.yaml": DEPLOYMENT,
            "patch.yaml": """\
                apiVersion: apps/v1
                kind: Deployment
                metadata: {name: web}
                spec:
                  template:
                    spec:
                      containers:
                      - name: first
                        image: first:1
                      - name: main
                        args: [serve]
                        env: null
                        ports:
                        - {containerPort: 2, name: deux}
                        - {containerPort: 3}
                        volumeMounts:
                        - {mountPath: /tmp, $patch: delete}
                      volumes:
                      - {name: added, emptyDir: {}}
                      - {name: scratch, emptyDir: {medium: Memory}}
                      - {name: fixed, $patch: delete}
                      topologySpreadConstraints:
                      - {topologyKey: zone, maxSkew: 1, whenUnsatisfiable: ScheduleAnyway}
                """,
        },
    )
    [deployment] = render(root)
    assert (
        deployment["spec"]["template"]["spec"]
        == _expected(
            """\
        initContainers:
        - {name: sidecar, image: "registry.local:5000/tools/sidecar:1.0", restartPolicy: Always}
        containers:
        - {name: first, image: "first:1"}
        - name: main
          image: app:1.0
          args: [serve]
          ports:
          - {containerPort: 2, name: deux}
          - {containerPort: 3}
          - {containerPort: 1}
          volumeMounts:
          - {name: settings, mountPath: /etc/settings}
        volumes:
        - {name: added, emptyDir: {}}
        - {name: scratch, emptyDir: {medium: Memory}}
        - {name: settings, configMap: {name: settings}}
        topologySpreadConstraints:
        - {topologyKey: zone, maxSkew: 1, whenUnsatisfiable: ScheduleAnyway}
        """
        )[0]
    )


def test_an_overlay_replaces_a_generated_config_map_and_sets_images_and_replicas(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "base/kustomization.yaml": """\
                resources: [deployment.yaml]
                configMapGenerator:
                - name: settings
                  files: [s.yaml]
                """,
            "base/deployment.yaml": DEPLOYMENT,
            "base/s.yaml": "a: <1> & x\n",
            "overlay/kustomization.yaml": """\
                resources: [../base]
                configMapGenerator:
                - name: settings
                  behavior: replace
                  files: [s.yaml]
                replicas:
                - {name: web, count: 3}
                images:
                - {name: app, newName: registry.example/app}
                - {name: "registry.local:5000/tools/sidecar", newTag: "2.0"}
                """,
            "overlay/s.yaml": "b: 2\n",
        },
    )
    assert [o["metadata"]["name"] for o in render(root / "base")] == ["settings-4b58gt265m", "web"]
    settings, deployment = render(root / "overlay")
    assert settings["metadata"]["name"] == "settings-2fb95t9kbd"
    assert settings["data"] == {"s.yaml": "b: 2\n"}
    assert deployment["spec"]["replicas"] == 3
    pod = deployment["spec"]["template"]["spec"]
    assert pod["volumes"][0]["configMap"]["name"] == "settings-2fb95t9kbd"
    assert pod["containers"][0]["image"] == "registry.example/app:1.0"
    assert pod["initContainers"][0]["image"] == "registry.local:5000/tools/sidecar:2.0"


@pytest.mark.parametrize(
    ("image", "parts"),
    [
        ("app", ("app", None, None)),
        ("app:1.0", ("app", "1.0", None)),
        ("registry.local:5000/app", ("registry.local:5000/app", None, None)),
        ("registry.local:5000/app:1.0@sha256:ab", ("registry.local:5000/app", "1.0", "sha256:ab")),
    ],
)
def test_image_references_split_at_the_tag_not_the_registry_port(
    image: str, parts: tuple[str, str | None, str | None]
) -> None:
    assert split_image(image) == parts


def test_files_outside_the_folder_need_the_load_restrictor_lifted(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "rules/a.yaml": "rules: []\n",
            "deploy/kustomization.yaml": """\
                configMapGenerator:
                - name: rules
                  files: [../rules/a.yaml]
                """,
        },
    )
    with pytest.raises(KustomizeError, match="is not in or below"):
        render(root / "deploy")
    [config_map] = render(root / "deploy", load_restrictor_none=True)
    assert config_map["data"] == {"a.yaml": "rules: []\n"}


@pytest.mark.parametrize(
    "kustomization",
    [
        "commonLabels: {a: b}\n",  # also rewrites selectors: not implemented, so refused
        "resources: [service.yaml]\npatches:\n- path: p.yaml\n  target: {kind: Service}\n",
        "resources: [service.yaml]\nlabels:\n- pairs: {a: b}\n  includeSelectors: true\n",
        "resources: [service.yaml]\nreplicas:\n- {name: nothing, count: 2}\n",
        "resources: [service.yaml, service.yaml]\n",
    ],
)
def test_what_the_renderer_does_not_implement_is_refused(tmp_path: Path, kustomization: str) -> None:
    root = _tree(tmp_path, {"kustomization.yaml": kustomization, "service.yaml": SERVICE, "p.yaml": SERVICE})
    with pytest.raises(KustomizeError):
        render(root)

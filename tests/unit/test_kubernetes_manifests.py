"""Specification of deploy/kubernetes and the Helm chart deploy/helm/pysnap.

There is no kubectl or helm here, so the manifests are checked structurally: every field name,
value type and enum value against the Kubernetes API's own Go types (k8s.io/api in the
provisioned GOPATH: core/v1, apps/v1 and apimachinery's meta/v1), plus the cross-references the
API server and kubelet enforce (selector ↔ labels, mounts ↔ volumes, Bidirectional ↔ privileged)
and pysnap's own (the ConfigMap's config.toml is valid for pysnap and its metrics port is the one
the probes use).  The chart is rendered with a small stand-in for `helm template` (helm_render.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from helm_render import RenderError, render_chart
from pysnap.config import Config
from pysnap.metrics import parse_endpoint
from support.toolchain import require

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "deploy" / "kubernetes"
CHART = REPO / "deploy" / "helm" / "pysnap"
IMAGE = {"image": {"repository": "registry.test/pysnap"}}

# -------------------------------------------------------------------------- the API's Go types

# Named string types whose constants are the complete set of accepted values.
ENUMS = {"MountPropagationMode", "HostPathType", "DNSPolicy", "PullPolicy", "TolerationOperator", "TaintEffect",
         "URIScheme", "DaemonSetUpdateStrategyType", "Protocol", "SeccompProfileType", "RestartPolicy"}
QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei|e[+-]?\d+)?$")
SOURCES = {  # package → file, and the import aliases used in that file
    "core": ("k8s.io/api/core/v1/types.go", {"metav1": "meta"}),
    "apps": ("k8s.io/api/apps/v1/types.go", {"metav1": "meta", "v1": "core"}),
    "meta": ("k8s.io/apimachinery/pkg/apis/meta/v1/types.go", {}),
}


@dataclass
class GoTypes:
    structs: dict[tuple[str, str], list[tuple[str, str, bool]]] = field(default_factory=dict)  # (json, type, inline)
    named: dict[tuple[str, str], str] = field(default_factory=dict)
    enums: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    aliases: dict[str, dict[str, str]] = field(default_factory=dict)


@cache
def go_types() -> GoTypes:
    src = Path(require("PYSNAP_GOPATH")) / "src"
    types = GoTypes()
    for package, (relative, aliases) in SOURCES.items():
        types.aliases[package] = aliases
        text = (src / relative).read_text()
        for match in re.finditer(r"^type (\w+) struct \{\n(.*?)^\}", text, re.M | re.S):
            fields = []
            for line in match.group(2).splitlines():
                m = re.match(r"^\s*(?:(\w+)\s+)?([\w.*\[\]]+)\s+`json:\"([^\"]*)\"", line)
                if m:
                    tag = m.group(3).split(",")
                    fields.append((tag[0], m.group(2), "inline" in tag[1:]))
            types.structs[(package, match.group(1))] = fields
        for match in re.finditer(r"^type (\w+) ([\w.\[\]]+)$", text, re.M):
            types.named[(package, match.group(1))] = match.group(2)
        for match in re.finditer(r"^\s+\w+\s+(\w+)\s*=\s*\"([^\"]*)\"", text, re.M):
            types.enums.setdefault((package, match.group(1)), set()).add(match.group(2))
    return types


def _resolve(package: str, name: str) -> tuple[str, str]:
    if "." in name:
        alias, name = name.split(".", 1)
        return go_types().aliases[package].get(alias, alias), name
    return package, name


def check(value: Any, go_type: str, package: str, where: str, errors: list[str]) -> None:
    """Append to ``errors`` every way ``value`` does not fit Go type ``go_type`` (as JSON/YAML)."""
    types = go_types()
    go_type = go_type.lstrip("*")
    if go_type.startswith("[]"):
        if not isinstance(value, list):
            errors.append(f"{where}: expected a list, got {value!r}")
            return
        for i, item in enumerate(value):
            check(item, go_type[2:], package, f"{where}[{i}]", errors)
        return
    if go_type.startswith("map["):
        key_type, value_type = re.match(r"map\[([\w.]+)\](.+)", go_type).groups()
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping, got {value!r}")
            return
        for key, item in value.items():
            check(key, key_type, package, f"{where} key", errors)
            check(item, value_type, package, f"{where}.{key}", errors)
        return
    if go_type == "string":
        if not isinstance(value, str):
            errors.append(f"{where}: expected a string, got {value!r}")
        return
    if go_type == "bool":
        if not isinstance(value, bool):
            errors.append(f"{where}: expected true/false, got {value!r}")
        return
    if go_type in ("int", "int32", "int64"):
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{where}: expected an integer, got {value!r}")
        return
    if go_type == "resource.Quantity":
        if not (isinstance(value, int) and not isinstance(value, bool)) and not (
                isinstance(value, str) and QUANTITY.match(value)):
            errors.append(f"{where}: not a quantity: {value!r}")
        return
    if go_type == "intstr.IntOrString":
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            errors.append(f"{where}: expected an integer or a string, got {value!r}")
        return
    if go_type == "types.UID":
        check(value, "string", package, where, errors)
        return
    key = _resolve(package, go_type)
    if key in types.named:
        check(value, types.named[key], key[0], where, errors)
        if key[1] in ENUMS and value not in types.enums.get(key, set()):
            errors.append(f"{where}: {value!r} is not a {key[1]} ({sorted(types.enums.get(key, set()))})")
        return
    if key not in types.structs:
        errors.append(f"{where}: the checker does not know Go type {go_type} ({key})")
        return
    if not isinstance(value, dict):
        errors.append(f"{where}: expected a mapping ({key[1]}), got {value!r}")
        return
    fields = _fields(key)
    for name, item in value.items():
        if name not in fields:
            errors.append(f"{where}: {key[1]} has no field {name!r}")
            continue
        check(item, fields[name][1], fields[name][0], f"{where}.{name}", errors)


def _fields(key: tuple[str, str]) -> dict[str, tuple[str, str]]:
    """json name → (package, Go type), inline structs flattened."""
    out: dict[str, tuple[str, str]] = {}
    for name, go_type, inline in go_types().structs[key]:
        if inline:
            out.update(_fields(_resolve(key[0], go_type.lstrip("*"))))
        elif name and name != "-":
            out[name] = (key[0], go_type)
    return out


KINDS = {("v1", "ConfigMap"): ("core", "ConfigMap"), ("apps/v1", "DaemonSet"): ("apps", "DaemonSet")}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def validate(doc: dict[str, Any]) -> list[str]:
    """Every structural error of one Kubernetes object (empty list: valid)."""
    kind = (doc.get("apiVersion"), doc.get("kind"))
    if kind not in KINDS:
        return [f"unexpected apiVersion/kind {kind}"]
    errors: list[str] = []
    package, name = KINDS[kind]
    check(doc, name, package, kind[1], errors)
    meta = doc.get("metadata") or {}
    if not DNS_LABEL.match(meta.get("name", "")):
        errors.append(f"metadata.name {meta.get('name')!r} is not a DNS label")
    for where, labels in (("metadata.labels", meta.get("labels") or {}),):
        errors += [f"{where}.{k}: bad label value {v!r}" for k, v in labels.items() if not LABEL_VALUE.match(str(v))]
    if kind[1] == "DaemonSet":
        errors += _daemonset_rules(doc)
    return errors


def _daemonset_rules(doc: dict[str, Any]) -> list[str]:
    errors = []
    spec = doc["spec"]
    template = spec["template"]
    labels = template["metadata"]["labels"]
    selector = spec["selector"]["matchLabels"]
    if not selector or any(labels.get(k) != v for k, v in selector.items()):
        errors.append(f"selector {selector} does not select the template's labels {labels}")
    pod = template["spec"]
    volumes = [v["name"] for v in pod.get("volumes", [])]
    if len(set(volumes)) != len(volumes):
        errors.append(f"duplicate volume names {volumes}")
    names = [c["name"] for c in pod["containers"]]
    if len(set(names)) != len(names):
        errors.append(f"duplicate container names {names}")
    for container in pod["containers"]:
        for required in ("name", "image"):
            if not container.get(required):
                errors.append(f"container without {required}")
        privileged = (container.get("securityContext") or {}).get("privileged", False)
        paths = [m["mountPath"] for m in container.get("volumeMounts", [])]
        if len(set(paths)) != len(paths):
            errors.append(f"{container['name']}: two mounts at one path {paths}")
        for mount in container.get("volumeMounts", []):
            if mount["name"] not in volumes:
                errors.append(f"{container['name']}: mount {mount['name']!r} names no volume")
            if mount.get("mountPropagation") == "Bidirectional" and not privileged:
                errors.append(f"{container['name']}: Bidirectional propagation needs privileged: true")
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            get = (container.get(probe) or {}).get("httpGet")
            if get and get.get("host") in ("127.0.0.1", "localhost", "::1") and not pod.get("hostNetwork"):
                errors.append(f"{container['name']}: {probe} on loopback needs hostNetwork (kubelet probes "
                              "from the node's network namespace)")
    return errors


# -------------------------------------------------------------------------- pysnap-specific checks

def load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def pysnap_checks(docs: list[dict[str, Any]]) -> list[str]:
    """The ConfigMap holds a valid pysnap config; each pysnap container runs `pysnap serve X` with it,
    and its probes hit that daemon's metrics endpoint."""
    errors = []
    configmaps = {c["metadata"]["name"]: c for c in objects(docs, "ConfigMap")}
    for ds in objects(docs, "DaemonSet"):
        pod = ds["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            argv = container["command"] + container.get("args", [])
            if argv[0] != "pysnap" or argv[-2] != "serve":
                errors.append(f"{container['name']}: does not run `pysnap … serve DAEMON`: {argv}")
                continue
            daemon = argv[-1]
            config_path = Path(argv[argv.index("--config") + 1])
            mount = next((m for m in container["volumeMounts"] if Path(m["mountPath"]) == config_path.parent), None)
            if mount is None or "configMap" not in volumes[mount["name"]]:
                errors.append(f"{container['name']}: {config_path} does not come from a ConfigMap")
                continue
            configmap = configmaps.get(volumes[mount["name"]]["configMap"]["name"])
            if configmap is None or config_path.name not in configmap.get("data", {}):
                errors.append(f"{container['name']}: no ConfigMap key {config_path.name}")
                continue
            config = Config.from_toml(configmap["data"][config_path.name], "ConfigMap")
            host, port = parse_endpoint(getattr(config, daemon).metrics_address or "unix:/none")
            for probe in ("livenessProbe", "startupProbe"):
                get = (container.get(probe) or {}).get("httpGet") or {}
                if (get.get("host"), get.get("port"), get.get("path")) != (host, port, "/healthz"):
                    errors.append(f"{container['name']}: {probe} {get} is not /healthz on {host}:{port}")
            errors += _host_paths(container, volumes, daemon)
    return errors


def _host_paths(container: dict[str, Any], volumes: dict[str, Any], daemon: str) -> list[str]:
    """Host paths the daemon uses must be mounted at the same path in the pod."""
    defaults = Config()
    wanted = {"nri": [defaults.nri.socket.parent, defaults.nri.containerd_address.parent,
                      defaults.snapshotter.root, defaults.nri.mount_root],
              "snapshotter": [defaults.snapshotter.root, defaults.snapshotter.address.parent]}[daemon]
    errors = []
    for path in wanted:
        covering = [m for m in container["volumeMounts"]
                    if "hostPath" in volumes[m["name"]] and path.is_relative_to(m["mountPath"])]
        if not covering or any(volumes[m["name"]]["hostPath"]["path"] != m["mountPath"] for m in covering):
            errors.append(f"{container['name']}: host path {path} is not mounted at the same place")
    return errors


# -------------------------------------------------------------------------- the tests

def test_the_checker_rejects_misspelled_fields_wrong_types_and_bad_enum_values():
    good = load(MANIFESTS / "daemonset.yaml")
    assert all(validate(d) == [] for d in good)
    bad = yaml.safe_load((MANIFESTS / "daemonset.yaml").read_text().split("---")[1])
    container = bad["spec"]["template"]["spec"]["containers"][0]
    container["volumeMounts"][0]["mountPropogation"] = "Bidirectional"
    container["securityContext"]["privileged"] = "yes"
    container["volumeMounts"][1]["mountPropagation"] = "Shared"
    bad["spec"]["template"]["spec"]["volumes"][1]["hostPath"]["type"] = "Dir"
    container["resources"]["requests"]["memory"] = "96 MB"
    errors = "\n".join(validate(bad))
    for expected in ("no field 'mountPropogation'", "privileged: expected true/false", "'Shared' is not a",
                     "'Dir' is not a HostPathType", "not a quantity"):
        assert expected in errors


@pytest.mark.parametrize("name", ["daemonset.yaml", "daemonset-snapshotter.yaml"])
def test_the_plain_manifests_pass_the_structural_validation(name):
    docs = load(MANIFESTS / name)
    assert {d["kind"] for d in docs} == {"ConfigMap", "DaemonSet"}
    for doc in docs:
        assert validate(doc) == [], (doc["kind"], validate(doc))
    assert pysnap_checks(docs) == []


def test_the_nri_daemonset_propagates_its_mounts_to_the_host_and_nothing_else():
    docs = load(MANIFESTS / "daemonset.yaml")
    pod = objects(docs, "DaemonSet")[0]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["securityContext"]["privileged"] is True
    propagation = {m["mountPath"]: m.get("mountPropagation", "None") for m in container["volumeMounts"]}
    assert [p for p, mode in propagation.items() if mode == "Bidirectional"] == ["/run/pysnap"]
    assert Config().nri.mount_root.is_relative_to("/run/pysnap")
    # sockets containerd recreates are mounted by directory, never as files
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert all(v["hostPath"].get("type") != "Socket" for v in volumes.values() if "hostPath" in v)
    assert pod["hostPID"] is False and pod["automountServiceAccountToken"] is False
    assert {"operator": "Exists"} in pod["tolerations"]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]


def test_the_helm_chart_renders_to_valid_manifests_matching_the_plain_ones():
    rendered = render_chart(CHART, IMAGE)
    docs = [d for name, text in rendered.items() if name.endswith(".yaml") for d in yaml.safe_load_all(text) if d]
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "DaemonSet"]
    for doc in docs:
        assert validate(doc) == [], validate(doc)
    assert pysnap_checks(docs) == []
    chart_pod = objects(docs, "DaemonSet")[0]["spec"]["template"]["spec"]
    plain_pod = objects(load(MANIFESTS / "daemonset.yaml"), "DaemonSet")[0]["spec"]["template"]["spec"]
    assert chart_pod["containers"][0]["image"] == "registry.test/pysnap:0.1.0"
    for key in ("hostNetwork", "hostPID", "automountServiceAccountToken", "tolerations"):
        assert chart_pod[key] == plain_pod[key], key
    for key in ("volumeMounts", "securityContext", "command", "resources"):
        assert chart_pod["containers"][0][key] == plain_pod["containers"][0][key], key
    strip = [{k: v for k, v in vol.items() if k != "configMap"} for vol in plain_pod["volumes"]]
    assert [{k: v for k, v in vol.items() if k != "configMap"} for vol in chart_pod["volumes"]] == strip


def test_the_helm_chart_with_the_snapshotter_and_settings_renders_valid_manifests():
    values = {**IMAGE, "snapshotter": {"enabled": True},
              "nri": {"settings": {"allowed_images": ["registry.test/*"], "allow_writable": True}},
              "imagePullSecrets": [{"name": "regcred"}]}
    docs = [d for name, text in render_chart(CHART, values).items() if name.endswith(".yaml")
            for d in yaml.safe_load_all(text) if d]
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "DaemonSet", "DaemonSet"]
    for doc in docs:
        assert validate(doc) == [], validate(doc)
    assert pysnap_checks(docs) == []
    config = Config.from_toml(objects(docs, "ConfigMap")[0]["data"]["config.toml"])
    assert config.nri.allowed_images == ("registry.test/*",) and config.nri.allow_writable is True


def test_the_helm_chart_refuses_to_render_without_an_image():
    with pytest.raises(RenderError, match="image.repository"):
        render_chart(CHART)


def test_every_value_the_chart_templates_use_is_declared_in_values_yaml():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    used = set()
    for path in (CHART / "templates").iterdir():
        used |= set(re.findall(r"\.Values((?:\.\w+)+)", path.read_text()))
    assert used
    for dotted in used:
        node = values
        for part in dotted.strip(".").split("."):
            assert isinstance(node, dict) and part in node, f".Values{dotted} is not in values.yaml"
            node = node[part]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "pysnap" and chart["type"] == "application"

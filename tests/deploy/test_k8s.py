"""configs/k8s and the Containerfile, checked offline: every manifest against the Kubernetes API's
model classes (unknown fields are errors, as `kubectl apply --validate=strict` makes them),
kustomization references, the config the ConfigMap carries, and basic Containerfile rules."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import config_from_dict

k8s = pytest.importorskip("kubernetes.client")
ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "configs" / "k8s"
KUSTOMIZATIONS = sorted(K8S.rglob("kustomization.yaml"))
_PRIMITIVE = {"str": str, "int": int, "float": (int, float), "bool": bool}


def _check(data: Any, type_name: str, path: str, errors: list[str]) -> None:
    """Walk data along the model's declared types: unknown keys and wrong primitive types."""
    # container types are spelt list[X] / dict(str, X) or List[X] / Dict[str, X] by client version
    if type_name.lower().startswith("list["):
        if not isinstance(data, list):
            errors.append(f"{path}: expected a list")
            return
        for i, item in enumerate(data):
            _check(item, type_name[5:-1], f"{path}[{i}]", errors)
    elif type_name.lower().startswith(("dict(", "dict[")):
        inner = type_name[type_name.index(",") + 1:-1].strip()
        if not isinstance(data, dict):
            errors.append(f"{path}: expected a mapping")
            return
        for k, v in data.items():
            _check(v, inner, f"{path}.{k}", errors)
    elif type_name in _PRIMITIVE:
        if not isinstance(data, _PRIMITIVE[type_name]) or (type_name != "bool" and isinstance(data, bool)):
            errors.append(f"{path}: expected {type_name}, got {data!r}")
    elif type_name in ("object", "datetime", "date"):
        return
    else:
        klass = getattr(k8s, type_name)
        if not isinstance(data, dict):
            errors.append(f"{path}: expected a mapping ({type_name})")
            return
        by_json = {v: k for k, v in klass.attribute_map.items()}
        for key, value in data.items():
            if key not in by_json:
                errors.append(f"{path}.{key}: unknown field of {type_name}")
            else:
                _check(value, klass.openapi_types[by_json[key]], f"{path}.{key}", errors)


def _model(doc: dict[str, Any]) -> str:
    group_version = doc["apiVersion"]
    assert group_version.rsplit("/", 1)[-1] == "v1", group_version
    return f"V1{doc['kind']}"


def _validate(doc: dict[str, Any], where: str) -> None:
    errors: list[str] = []
    _check(doc, _model(doc), where, errors)
    assert not errors, "\n".join(errors)
    # Required fields: the model classes refuse None for them.
    k8s.ApiClient()._ApiClient__deserialize(doc, _model(doc))


def _manifests() -> list[Path]:
    return [p for p in K8S.rglob("*.yaml") if p.name not in ("kustomization.yaml", "meshgate.yaml")]


@pytest.mark.parametrize("path", _manifests(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_is_valid(path):
    for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
        if "patch" in path.name:  # a strategic-merge patch: valid shape, but partial
            errors: list[str] = []
            _check(doc, _model(doc), path.name, errors)
            assert not errors, "\n".join(errors)
        else:
            _validate(doc, f"{path.name}[{i}]")


@pytest.mark.parametrize("kfile", KUSTOMIZATIONS, ids=lambda p: str(p.parent.relative_to(K8S)))
def test_kustomization_references_resolve(kfile):
    k = yaml.safe_load(kfile.read_text())
    here = kfile.parent
    for res in k.get("resources", []):
        target = here / res
        assert target.is_file() or (target / "kustomization.yaml").is_file(), res
    for patch in k.get("patches", []):
        assert (here / patch["path"]).is_file(), patch
    for gen in k.get("configMapGenerator", []):
        for f in gen.get("files", []):
            assert (here / f.split("=")[-1]).is_file(), f


def _load_meshgate_config(path: Path, tmp_path: Path) -> Any:
    data = yaml.safe_load(path.read_text())
    auth = data.get("gateway", {}).get("auth")
    if auth and auth.get("keys_file"):  # the Secret is made out of band; stand in a valid key file
        (tmp_path / "keys.yaml").write_text(yaml.safe_dump([{"id": "k", "sha256": "0" * 64}]))
        auth["keys_file"] = "keys.yaml"
    return config_from_dict(data, tmp_path)


@pytest.mark.parametrize("path", sorted(K8S.rglob("meshgate.yaml")), ids=lambda p: str(p.relative_to(K8S)))
def test_configmap_config_loads_and_names_every_worker(path, tmp_path):
    cfg = _load_meshgate_config(path, tmp_path)
    assert cfg.discovery.kind == "etcd" and cfg.gateway.host == "0.0.0.0"
    replicas = 1
    patch = path.parent / "worker-patch.yaml"
    if patch.is_file():
        replicas = yaml.safe_load(patch.read_text())["spec"]["replicas"]
    ids = {p.id for p in cfg.pools}
    assert {f"meshgate-worker-{i}" for i in range(replicas)} <= ids  # `--pool $(POD_NAME)` finds its entry


def test_probes_drain_gpu_and_selectors():
    gw = yaml.safe_load((K8S / "base" / "gateway-deployment.yaml").read_text())
    c = gw["spec"]["template"]["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready" and c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert "preStop" in c["lifecycle"]
    labels = gw["spec"]["template"]["metadata"]["labels"]
    for name in ("gateway-pdb.yaml", "gateway-service.yaml"):
        spec = yaml.safe_load((K8S / "base" / name).read_text())["spec"]
        selector = spec["selector"].get("matchLabels", spec["selector"])
        assert selector.items() <= labels.items(), name
    sts = yaml.safe_load((K8S / "base" / "worker-statefulset.yaml").read_text())
    w = sts["spec"]["template"]["spec"]["containers"][0]
    assert w["resources"]["limits"]["nvidia.com/gpu"] == "1"
    claims = {v["metadata"]["name"] for v in sts["spec"]["volumeClaimTemplates"]}
    assert {m["name"] for m in w["volumeMounts"]} - {"config"} <= claims


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_overlay_builds_with_kubectl_kustomize():
    out = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / "fra")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    docs = list(yaml.safe_load_all(out.stdout))
    assert {d["kind"] for d in docs} == {"ConfigMap", "Service", "Deployment", "StatefulSet", "PodDisruptionBudget"}
    for d in docs:
        assert d["metadata"]["namespace"] == "meshgate-fra"
        _validate(d, f"{d['kind']}/{d['metadata']['name']}")
    cm = next(d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap")
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    assert sts["spec"]["replicas"] == 2
    assert sts["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"] == cm  # the hashed name


# -- the Containerfile ---------------------------------------------------------------------------
CONTAINERFILE = ROOT / "Containerfile"


def _stages() -> list[tuple[str, list[str]]]:
    """(stage name, its instructions) in order."""
    stages: list[tuple[str, list[str]]] = []
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
            assert m is not None
            stages.append((m.group(2) or m.group(1), [line]))
        else:
            stages[-1][1].append(line)
    return stages


def test_containerfile_base_images_are_pinned():
    names = {name for name, _ in _stages()}
    for _, lines in _stages():
        image = lines[0].split()[1]
        if image in names:
            continue  # an earlier stage
        assert ":" in image and not image.endswith(":latest"), image
        assert re.search(r":\d+\.\d+\.\d+", image) or "@sha256:" in image, f"{image}: pin a full version"


@pytest.mark.parametrize("target, port", [("gateway", 8080), ("worker", 8101)])
def test_containerfile_runtime_targets(target, port):
    stages = dict(_stages())
    lines = stages[target]
    users = [ln.split()[1] for ln in lines if ln.upper().startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "runs as root"
    assert any(ln.upper().startswith("HEALTHCHECK") and str(port) in ln for ln in lines)
    assert any(ln.upper().startswith("EXPOSE") and str(port) in ln for ln in lines)
    assert any(ln.upper().startswith("ENTRYPOINT") for ln in lines)


def test_containerfile_hygiene():
    stages = dict(_stages())
    text = CONTAINERFILE.read_text()
    assert "Kubernetes ignores HEALTHCHECK" in text  # and says where the probes are instead
    for line in (ln for _, lines in _stages() for ln in lines):
        if "pip install" in line:
            assert "--no-cache-dir" in line, line
        if "apt-get install" in line:
            assert "--no-install-recommends" in line, line
        assert not line.upper().startswith("ADD "), "COPY, not ADD"
    assert not any("torch" in ln for ln in stages["gateway-build"]), "the gateway image must not carry torch"
    assert "worker" in " ".join(stages["worker-build"])


def test_the_validator_catches_typos_and_missing_fields():
    doc = yaml.safe_load((K8S / "base" / "gateway-deployment.yaml").read_text())
    doc["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = doc["spec"]["template"]["spec"][
        "containers"][0].pop("readinessProbe")
    with pytest.raises(AssertionError, match="readinesProbe: unknown field of V1Container"):
        _validate(doc, "typo")
    doc = yaml.safe_load((K8S / "base" / "gateway-deployment.yaml").read_text())
    del doc["spec"]["selector"]
    with pytest.raises(ValueError, match="selector"):
        _validate(doc, "missing")

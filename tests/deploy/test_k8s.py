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


CERT_MANAGER = "cert-manager.io/v1"  # a CRD: checked by test_cert_manager_resources, not the API's models


def _manifests() -> list[Path]:
    return [p for p in K8S.rglob("*.yaml") if p.name not in ("kustomization.yaml", "meshgate.yaml")
            and not any(d.get("apiVersion") == CERT_MANAGER for d in yaml.safe_load_all(p.read_text()))]


def _without_deletions(doc: Any) -> Any:
    """A strategic-merge patch less its `key: null` entries (directives that delete the key)."""
    if isinstance(doc, dict):
        return {k: _without_deletions(v) for k, v in doc.items() if v is not None}
    if isinstance(doc, list):
        return [_without_deletions(v) for v in doc]
    return doc


@pytest.mark.parametrize("path", _manifests(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_is_valid(path):
    for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
        if "patch" in path.name:  # a strategic-merge patch: valid shape, but partial
            errors: list[str] = []
            _check(_without_deletions(doc), _model(doc), path.name, errors)
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


def _tls_sections(data: dict[str, Any]) -> list[dict[str, Any]]:
    gw = data.get("gateway", {})
    return [t for t in [gw.get("tls"), gw.get("upstream", {}).get("tls"), *(p.get("tls") for p in data.get("pools", []))]
            if t]


def _load_meshgate_config(path: Path, tmp_path: Path) -> Any:
    data = yaml.safe_load(path.read_text())
    auth = data.get("gateway", {}).get("auth")
    if auth and auth.get("keys_file"):  # the Secret is made out of band; stand in a valid key file
        (tmp_path / "keys.yaml").write_text(yaml.safe_dump([{"id": "k", "sha256": "0" * 64}]))
        auth["keys_file"] = "keys.yaml"
    # TLS files are not read at load (each pod holds only its own Secrets): the config loads without them
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
    secrets = {v["name"] for v in sts["spec"]["template"]["spec"]["volumes"] if "secret" in v}
    assert {m["name"] for m in w["volumeMounts"]} - {"config"} - secrets <= claims


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_overlay_builds_with_kubectl_kustomize():
    out = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / "fra")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    docs = list(yaml.safe_load_all(out.stdout))
    assert {d["kind"] for d in docs} == {"ConfigMap", "Service", "Deployment", "StatefulSet", "PodDisruptionBudget",
                                         "Certificate", "Issuer"}
    for d in docs:
        assert d["metadata"]["namespace"] == "meshgate-fra"
        if d["apiVersion"] != CERT_MANAGER:
            _validate(d, f"{d['kind']}/{d['metadata']['name']}")
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert pod["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"  # TLS on in the overlay's config
    worker = next(d for d in docs if d["kind"] == "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "httpGet" not in worker[probe] and worker[probe]["exec"]["command"][0] == "python", probe
    cm = next(d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap")
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    assert sts["spec"]["replicas"] == 2
    assert sts["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"] == cm  # the hashed name


# -- TLS: cert-manager Certificates, the Secrets the base mounts, the files the config names ------
FRA = K8S / "overlays" / "fra"
# what cert-manager writes into a Certificate's Secret (a kubernetes.io/tls Secret, plus the CA)
SECRET_KEYS = {"tls.crt", "tls.key", "ca.crt"}


def _cert_manager_docs() -> list[dict[str, Any]]:
    return [d for p in K8S.rglob("*.yaml") for d in yaml.safe_load_all(p.read_text()) if d.get("apiVersion") == CERT_MANAGER]


def test_cert_manager_resources():
    docs = _cert_manager_docs()
    issuers = {d["metadata"]["name"] for d in docs if d["kind"] == "Issuer"}
    certs = [d for d in docs if d["kind"] == "Certificate"]
    assert certs
    for c in certs:
        spec = c["spec"]
        assert set(spec) <= {"secretName", "commonName", "dnsNames", "duration", "renewBefore", "privateKey", "usages",
                             "issuerRef"}, set(spec)
        assert spec["secretName"] and spec["dnsNames"] and spec["usages"]
        assert set(spec["usages"]) <= {"server auth", "client auth", "digital signature", "key encipherment"}
        ref = spec["issuerRef"]
        assert ref["kind"] in ("Issuer", "ClusterIssuer") and (ref["kind"] == "ClusterIssuer" or ref["name"] in issuers)


def _secret_mounts() -> dict[str, str]:
    """mount path -> Secret name, over the base's gateway and worker pods."""
    out = {}
    for name in ("gateway-deployment.yaml", "worker-statefulset.yaml"):
        pod = yaml.safe_load((K8S / "base" / name).read_text())["spec"]["template"]["spec"]
        secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
        for m in pod["containers"][0]["volumeMounts"]:
            if m["name"] in secrets:
                out[m["mountPath"]] = secrets[m["name"]]
    return out


def test_tls_files_come_from_secrets_that_cert_manager_makes():
    mounts = _secret_mounts()
    made = {c["spec"]["secretName"]: c["spec"] for c in _cert_manager_docs() if c["kind"] == "Certificate"}
    data = yaml.safe_load((FRA / "meshgate.yaml").read_text())
    files = [(name, t[name]) for t in _tls_sections(data) for name in ("cert_file", "key_file", "ca_file", "client_ca_file")
             if name in t]
    assert {n for n, _ in files} == {"cert_file", "key_file", "ca_file", "client_ca_file"}
    for name, f in files:
        folder, _, key = f.rpartition("/")
        assert folder in mounts, f"{name}: {f} is not in a mounted Secret"
        assert key in SECRET_KEYS, f"{name}: {key} is not a key cert-manager writes"
        assert mounts[folder] in made, f"{mounts[folder]}: no Certificate makes this Secret"
    # the workers' allowed client names are those the mesh certificates carry, with the right usages
    worker_tls = data["pools"][0]["tls"]
    by_secret = {mounts[f.rpartition("/")[0]]: made[mounts[f.rpartition("/")[0]]] for _, f in files}
    client = by_secret["meshgate-mesh-client-tls"]
    assert "client auth" in client["usages"] and set(client["dnsNames"]) & set(worker_tls["allowed_client_names"])
    worker = by_secret["meshgate-worker-tls"]
    assert {"server auth", "client auth"} <= set(worker["usages"])
    assert all(p["url"].startswith("https://") and p["url"].split("//")[1].split(":")[0].endswith(
        worker["dnsNames"][0].removeprefix("*")) for p in data["pools"])


def test_worker_exec_probe_passes_mutual_tls(tmp_path):
    """The overlay's exec probe, run against a worker front requiring client certificates, with the
    Secret's file names (tls.crt, tls.key, ca.crt) in a folder standing for the mount."""
    import asyncio
    import sys

    from gateway.cli.run import _AiohttpFront
    from gateway.config import TlsServerConfig
    from tests.servers import free_port
    from tests.stub_pool import StubPool
    from tests.tlsutil import TestPKI

    mount = tmp_path / "worker"
    pki = TestPKI(mount)
    cert, key = pki.issue("w", ("127.0.0.1", "meshgate-probe"), server=True, client=True)
    for src, dst in ((cert, "tls.crt"), (key, "tls.key"), (pki.ca_file, "ca.crt")):
        (mount / dst).write_bytes(Path(src).read_bytes())
    patch = yaml.safe_load((FRA / "worker-tls-patch.yaml").read_text())
    container = patch["spec"]["template"]["spec"]["containers"][0]
    port = free_port()

    async def run() -> list[int]:
        stub = StubPool("p")
        app = stub.app()
        app.router.add_get("/ready", stub.health)  # the stub has /health only; a worker has both
        front = _AiohttpFront(app, 1.0, TlsServerConfig(
            cert_file=cert, key_file=key, client_ca_file=pki.ca_file, require_client_cert=True,
            allowed_client_names=("meshgate-probe",)))
        await front.bind("127.0.0.1", port)
        try:
            codes = []
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                cmd = [a.replace("/etc/meshgate/tls/worker/", f"{mount}/").replace(":8101", f":{port}")
                       for a in container[probe]["exec"]["command"]]
                proc = await asyncio.create_subprocess_exec(sys.executable, *cmd[1:])
                codes.append(await asyncio.wait_for(proc.wait(), 30))
            return codes
        finally:
            await front.close()

    assert asyncio.run(run()) == [0, 0, 0]


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

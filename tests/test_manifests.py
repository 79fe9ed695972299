"""Every deployment file the project ships, checked offline by the tools that consume it: the
files under envoy/, and any Kubernetes manifest or Envoy config elsewhere in the tree (outside
tests/).

- A Kubernetes manifest (YAML whose documents all have ``apiVersion`` and ``kind``) must validate
  against Kubernetes' OpenAPI schemas, strictly (an unknown field is an error, as it is for
  ``kubectl apply``), for each Kubernetes version in ``KUBERNETES_VERSIONS``. The schemas ship
  inside the kubernetes-validate wheel: nothing is fetched.
- An Envoy config (a bootstrap: ``static_resources``) must pass the real Envoy's
  ``--mode validate`` (every field, type and extension resolved; the certificates, keys and
  JWKS it names read) without a deprecation warning, in the form the tests run it
  (``render_config``: test ports, and real files at its ``/etc/safous/...`` paths), and
  envoy/envoy.yaml also in the form the Kubernetes example ships it (listener on 0.0.0.0).
- A YAML or JSON file under envoy/ that is neither fails: whatever config is added there gets
  checked.

The Dockerfile is linted by hadolint in ``make lint``; how the manifest runs the image (entry
point, volume, probes, version) is checked here against the Dockerfile and the package.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

import sidecar
from tests.certs import make_ca, make_client_cert, make_tls_dir
from tests.envoy_harness import ENVOY_DIR, ENVOY_YAML, PROJECT_ROOT, envoy_binary, render_config

# The oldest Kubernetes the example is meant for, and the newest whose schemas the pinned
# kubernetes-validate carries.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())

KUBERNETES_EXAMPLE = ENVOY_DIR / "kubernetes-sidecar.yaml"
# The edit the Kubernetes example's comment tells the reader to make to envoy/envoy.yaml.
K8S_LISTENER_EDIT = ("address: 127.0.0.1, port_value: 8080", "address: 0.0.0.0, port_value: 8080")
ETC_PATH = re.compile(r"/etc/safous/([A-Za-z0-9_.-]+)/([A-Za-z0-9_.-]+)")
SIDECAR_CONTAINER = "safous-sidecar"


def _documents(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kind(path: Path) -> str:
    docs = _documents(path)
    if docs and all(isinstance(d, dict) and "apiVersion" in d and "kind" in d for d in docs):
        return "kubernetes"
    if len(docs) == 1 and isinstance(docs[0], dict) and "static_resources" in docs[0]:
        return "envoy"
    return "unknown"


def _yaml_files() -> list[Path]:
    """YAML files of the project, outside tests/, hidden directories, build output and run/ (local
    state, .gitignore'd)."""
    found: list[Path] = []
    for directory, subdirectories, files in os.walk(PROJECT_ROOT):
        subdirectories[:] = [d for d in subdirectories
                             if not d.startswith(".") and d not in ("tests", "build", "dist", "run", "node_modules")]
        found += [Path(directory, f) for f in files if f.endswith((".yaml", ".yml"))]
    return sorted(found)


SHIPPED = sorted(p for p in ENVOY_DIR.iterdir() if p.is_file() and p.suffix in (".yaml", ".yml", ".json"))
YAML_FILES = sorted({*_yaml_files(), *SHIPPED})
KUBERNETES = [p for p in YAML_FILES if _kind(p) == "kubernetes"]
ENVOY = [p for p in YAML_FILES if _kind(p) == "envoy"]


def _id(path: Path) -> str:
    return str(path.relative_to(PROJECT_ROOT))


def test_every_file_under_envoy_is_a_manifest_or_an_envoy_config():
    unknown = [p.name for p in SHIPPED if p not in KUBERNETES and p not in ENVOY]
    assert unknown == [], f"envoy/ holds files no test validates: {unknown}"
    assert KUBERNETES and ENVOY


# --------------------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", KUBERNETES, ids=_id)
def test_kubernetes_manifest_validates(path: Path, version: str):
    for doc in _documents(path):
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata'].get('name')} against Kubernetes "
                        f"{version}: {exc.message} at {'.'.join(str(p) for p in exc.absolute_path)}")


def test_kubernetes_validation_catches_a_bad_field():
    """Control: the strict schemas reject what the API server would."""
    (doc,) = _documents(KUBERNETES_EXAMPLE)
    doc["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinessprobe"):
        kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)


def _sidecar_container(doc: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in doc["spec"]["template"]["spec"]["containers"] if c["name"] == SIDECAR_CONTAINER]
    return container


def _dockerfile_json(instruction: str) -> Any:
    """The JSON (exec form) argument of a Dockerfile instruction, e.g. ENTRYPOINT."""
    match = re.search(rf"^{instruction}\s+(\[.*\])\s*$", (PROJECT_ROOT / "Dockerfile").read_text(), re.M)
    assert match, f"Dockerfile has no {instruction} in exec form"
    return json.loads(match[1])


def test_kubernetes_example_runs_the_image_as_the_dockerfile_builds_it():
    (doc,) = _documents(KUBERNETES_EXAMPLE)
    container = _sidecar_container(doc)
    env = {e["name"]: e.get("value") for e in container["env"]}
    # The image of this release: its tag is the package's version.
    assert container["image"].rsplit(":", 1)[1] == sidecar.__version__
    # The entry point already says `serve`; flags come from SAFOUS_* variables.
    assert _dockerfile_json("ENTRYPOINT") == ["safous-sidecar", "serve"]
    assert "command" not in container and not container.get("args")
    # rules.db on a volume, the root filesystem read-only, a non-root user that can write it.
    db_dir = str(Path(env["SAFOUS_DB"]).parent)
    assert db_dir in _dockerfile_json("VOLUME")
    assert db_dir in [m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["runAsNonRoot"] is True
    user = re.search(r"^USER\s+(\d+):(\d+)\s*$", (PROJECT_ROOT / "Dockerfile").read_text(), re.M)
    assert user, "the Dockerfile's USER must be numeric for runAsNonRoot"
    assert doc["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == int(user[2])
    # The probes ask the sidecar's --http port.
    http_port = int(env["SAFOUS_HTTP"].rsplit(":", 1)[1])
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": http_port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": http_port}


def _dockerfile_env() -> dict[str, str]:
    """The final stage's ENV, NAME=VALUE pairs (continuation lines joined)."""
    final = (PROJECT_ROOT / "Dockerfile").read_text().replace("\\\n", " ").rsplit("\nFROM ", 1)[1]
    (pairs,) = re.findall(r"^ENV\s+(.*)$", final, re.M)
    return dict(pair.split("=", 1) for pair in pairs.split())


def _kubernetes_env() -> dict[str, str]:
    (doc,) = _documents(KUBERNETES_EXAMPLE)
    return {e["name"]: e["value"] for e in _sidecar_container(doc)["env"] if "value" in e}


@pytest.mark.parametrize("shipped", [_dockerfile_env, _kubernetes_env], ids=["Dockerfile", "kubernetes"])
def test_the_shipped_settings_open_only_the_probes_to_the_network(shipped, monkeypatch: pytest.MonkeyPatch) -> None:
    """The image and the example start (no listener is refused), and only the plaintext health
    and metrics port is on the network: gRPC stays on loopback."""
    from sidecar.settings import Settings

    for name in [n for n in os.environ if n.startswith("SAFOUS_")]:
        monkeypatch.delenv(name)
    for name, value in shipped().items():
        if name.startswith("SAFOUS_") and name.removeprefix("SAFOUS_").lower() in Settings.model_fields:
            monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.exposed_listeners() == [("http", "--http", "0.0.0.0:9192")]
    assert settings.insecure_listen == ("http",)


def test_kubernetes_example_takes_the_fleet_secret_from_a_secret() -> None:
    """The shared cache's secret and password are env: references to variables filled from a
    Kubernetes Secret, never values written in the manifest."""
    from sidecar.settings import Settings

    (doc,) = _documents(KUBERNETES_EXAMPLE)
    env = {e["name"]: e for e in _sidecar_container(doc)["env"]}
    assert env["SAFOUS_SHARED_CACHE"]["value"].startswith(("redis://", "rediss://"))
    for setting in ("SAFOUS_SHARED_CACHE_KEY", "SAFOUS_SHARED_CACHE_PASSWORD"):
        variable = env[setting]["value"].removeprefix("env:")
        assert variable.startswith(Settings.model_fields["secret_env_prefix"].default)
        assert env[variable]["valueFrom"]["secretKeyRef"]["name"] == "safous-shared-cache"


# --------------------------------------------------------------------------- Envoy


def _jwks(path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()

    def b64(n: int) -> str:
        return base64.urlsafe_b64encode(n.to_bytes(32, "big")).rstrip(b"=").decode()

    path.write_text(json.dumps({"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig",
                                          "kid": "test", "x": b64(key.x), "y": b64(key.y)}]}))


def _materialize(text: str, tmp_path: Path) -> tuple[Path | None, dict[str, str]]:
    """Real files for every ``/etc/safous/DIR/NAME`` a config names: per DIR a CA (``ca.crt``),
    a certificate and key it signed per other ``STEM.crt``/``STEM.key``, a JWKS per
    ``*.json``. Returns (the tls directory for render_config's ``tls_dir``, the ``extra``
    replacements for the other paths)."""
    tls_dir: Path | None = None
    extra: dict[str, str] = {}
    by_dir: dict[str, set[str]] = {}
    for directory, name in ETC_PATH.findall(text):
        by_dir.setdefault(directory, set()).add(name)
    for directory, names in sorted(by_dir.items()):
        out = tmp_path / directory
        if directory == "tls":
            tls_dir = make_tls_dir(out).directory  # render_config's own TLS layout
            continue
        ca = make_ca(out)
        for name in sorted(names):
            stem, suffix = Path(name).stem, Path(name).suffix
            if (suffix == ".crt" and stem != "ca") or (suffix == ".key" and f"{stem}.crt" not in names):
                make_client_cert(out, ca, stem, stem=stem)
            elif suffix == ".json":
                _jwks(out / name)
            elif suffix not in (".crt", ".key"):
                pytest.fail(f"no test file for /etc/safous/{directory}/{name}: teach _materialize its kind")
            extra[f"/etc/safous/{directory}/{name}"] = str(out / name)
    return tls_dir, extra


def _envoy_validate(text: str, tmp_path: Path, name: str) -> None:
    config = tmp_path / name
    config.write_text(text)
    result = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config), "--disable-hot-restart",
                             "-l", "warning"], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and f"configuration '{config}' OK" in output, output
    assert "deprecated" not in output.lower(), output


@pytest.mark.parametrize("path", ENVOY, ids=_id)
def test_envoy_config_validates(path: Path, tmp_path: Path):
    text = path.read_text()
    tls_dir, extra = _materialize(text, tmp_path)
    rendered = render_config(path, sidecar_port=9191, upstream_port=8081, tls_dir=tls_dir, extra=extra)
    assert not ETC_PATH.search(rendered)
    _envoy_validate(rendered, tmp_path, path.name)


@pytest.mark.parametrize("path", ENVOY, ids=_id)
def test_envoy_sends_the_sidecar_no_more_checks_than_it_admits(path: Path):
    from sidecar.settings import Settings

    (doc,) = _documents(path)
    (cluster,) = [c for c in doc["static_resources"]["clusters"] if c["name"] == "safous_sidecar"]
    assert cluster["circuit_breakers"]["thresholds"] == [
        {"max_requests": Settings.model_fields["max_checks_in_progress"].default}]


def test_envoy_config_as_the_kubernetes_example_ships_it(tmp_path: Path):
    """The example's ConfigMap holds envoy/envoy.yaml with the listener on 0.0.0.0, made by the
    sed command its comment gives; that command must still apply, and its result validate."""
    old, new = K8S_LISTENER_EDIT
    assert f"sed 's/{old}/{new}/'" in KUBERNETES_EXAMPLE.read_text()
    text = ENVOY_YAML.read_text()
    assert text.count(old) == 1, f"the example's sed no longer matches envoy/envoy.yaml once: {old!r}"
    _envoy_validate(text.replace(old, new), tmp_path, "envoy-kubernetes.yaml")


def test_envoy_validation_catches_a_bad_field(tmp_path: Path):
    """Control: validate mode rejects what a running Envoy would."""
    text = ENVOY_YAML.read_text().replace("generate_request_id: true", "generate_request_id: yes_please")
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    result = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config), "--disable-hot-restart",
                             "-l", "error"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "generate_request_id" in result.stderr + result.stdout

"""The image and the Kubernetes manifests, checked offline: hadolint on the Dockerfile,
kubernetes-validate (the API's own schemas, strict) on deploy/kubernetes/, and the few facts
they must agree on with the code. The image itself is built and run by
scripts/image-check.sh, where a container runtime runs the default base: not here (podman
needed a stand-in base and a cgroup workaround, run by hand: docs/containers.md), so it is
not a test that would only skip."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import REPO

from hotswap.service.supervisor import DEFAULT_GRACE

BIN = Path(sys.executable).parent
MANIFESTS = sorted((REPO / "deploy" / "kubernetes").glob("*.yaml"))
DOCKERFILE = (REPO / "Dockerfile").read_text()


def tool(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{name} is missing: install the test extra (pip install -e '.[test]')"
    return str(path)


def test_dockerfile_passes_hadolint():
    done = subprocess.run([tool("hadolint"), "--no-color", "Dockerfile"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_manifests_validate_against_the_kubernetes_schemas():
    assert MANIFESTS
    done = subprocess.run([tool("kubernetes-validate"), "--strict", "--quiet",
                           *map(str, MANIFESTS)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def deployment() -> dict:
    return yaml.safe_load((REPO / "deploy" / "kubernetes" / "deployment.yaml").read_text())


def test_image_and_manifests_agree_with_the_kit():
    """PID 1 is the supervisor; its grace fits inside the pod's; the pod runs as the image's
    user; the probes are the CLI's; the proxy reads the socket srv.ini names."""
    assert 'ENTRYPOINT ["hotswap", "start"]' in DOCKERFILE
    assert f"HOTSWAP_GRACE={DEFAULT_GRACE:g}" in DOCKERFILE
    pod = deployment()["spec"]["template"]["spec"]
    app = next(c for c in pod["containers"] if c["name"] == "app")
    grace = float(next(e["value"] for e in app["env"] if e["name"] == "HOTSWAP_GRACE"))
    assert grace < pod["terminationGracePeriodSeconds"]
    uid = re.search(r"--uid (\d+)", DOCKERFILE).group(1)
    assert f"USER {uid}" in DOCKERFILE and pod["securityContext"]["runAsUser"] == int(uid)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert app[probe]["exec"]["command"][:2] == ["hotswap", "probe"]
    mounts = {m["name"]: m["mountPath"] for m in app["volumeMounts"]}
    assert mounts["run"] == "/srv/hotswap/run" and "WORKDIR /srv/hotswap" in DOCKERFILE
    proxy = (REPO / "deploy" / "kubernetes" / "proxy-configmap.yaml").read_text()
    assert "unix:/srv/hotswap/run/http.sock" in proxy
    assert "http-socket = %(run_dir)/http.sock" in (REPO / "srv.ini").read_text()

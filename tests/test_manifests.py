"""The image and the Kubernetes manifests, checked offline: hadolint on the Dockerfile,
kubernetes-validate (the API's own schemas, strict) on deploy/kubernetes/, and the few facts
they must agree on with the code. The image itself is built and run only where a container
runtime runs the default base (here podman needed a stand-in base and a cgroup workaround,
run by hand: docs/containers.md)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
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


BASE = re.search(r"^ARG BASE=(\S+)$", DOCKERFILE, re.M).group(1)


def runtime() -> str | None:
    """A container runtime that runs the base image here, or None (here: no registry to pull
    it from, and crun refuses this host's hybrid cgroups without the doc's workaround)."""
    for name in ("podman", "docker"):
        if shutil.which(name) and subprocess.run(
                [name, "run", "--rm", "--pull", "never", BASE, "true"], capture_output=True,
                timeout=120).returncode == 0:
            return name
    return None


@pytest.mark.slow
@pytest.mark.skipif(runtime() is None, reason=f"no container runtime runs {BASE} here (podman or "
                    "docker): docs/containers.md says what was tried")
def test_the_image_builds_and_serves():
    name, tag = runtime(), "hotswap-test:latest"
    subprocess.run([name, "build", "-t", tag, "."], cwd=REPO, check=True, timeout=1200)
    container = subprocess.run([name, "run", "-d", tag], capture_output=True, text=True,
                               check=True, timeout=120).stdout.strip()
    try:
        probe = subprocess.run([name, "exec", container, "hotswap", "probe", "--timeout", "60"],
                               capture_output=True, text=True, timeout=120)
        assert probe.returncode == 0, probe.stdout + probe.stderr
        assert subprocess.run([name, "exec", container, "hotswap", "reload"],
                              timeout=300).returncode == 0
    finally:
        subprocess.run([name, "rm", "-f", container], capture_output=True, timeout=120)

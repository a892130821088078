"""A real Kubernetes control plane for the tests: etcd, kube-apiserver, kube-controller-manager and
kube-scheduler from envtest's assets, started once per test session on free loopback ports.

The binaries come from ``KUBEBUILDER_ASSETS`` (envtest's convention: a directory holding ``etcd``,
``kube-apiserver``, ``kube-controller-manager``, ``kube-scheduler``). ``make test`` unpacks
``../shared/envtest/kube-1.36.2-envtest-linux-amd64.tar.xz`` into ``~/.cache/kontinue/envtest/``
and points the variable there (``python -m tests.control_plane unpack`` does the same by hand).
Without them the tests that need a cluster are skipped with the reason, never passed.

What is not here is a node: tests/kube_fixtures.py's Kubelet plays one (Node objects with their
Lease, bound pods run as local processes, their log served to the API server over HTTPS).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import requests
import yaml

ASSETS_ENV = "KUBEBUILDER_ASSETS"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
VERSION = "1.36.2"
ARCHIVE_NAME = f"kube-{VERSION}-envtest-linux-amd64.tar.xz"
# ../shared/envtest beside the checkout (or beside any folder above it), or where the variable says
ARCHIVES = [Path(os.environ["KONTINUE_ENVTEST_ARCHIVE"])] if os.environ.get("KONTINUE_ENVTEST_ARCHIVE") else [
    folder / "shared" / "envtest" / ARCHIVE_NAME for folder in Path(__file__).resolve().parents[1:]]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kontinue" / "envtest" / VERSION
SHA256 = {
    "etcd": "83132c8ce953edef48a50b419a5bf0bfd732f7b4527dd60ce0bfef646b3dd380",
    "kube-apiserver": "effd2fd19036541e9ef639fe8bdbd55de9ac092c6f57527f0faa78ae625f1bcc",
    "kube-controller-manager": "2001614967b7e914fa33ce90310ced77ff22b8cb07e095b2106282ea35cec9ad",
    "kube-scheduler": "5a19d3959631fd448f99c95944c0bb69cd25cda69d4bb69d031980c0ca6996d6",
}
HOW_TO_GET_THEM = (
    f"set {ASSETS_ENV} to a directory holding {', '.join(BINARIES)} v{VERSION}: `make test` unpacks "
    f"{ARCHIVE_NAME} from ../shared/envtest (or KONTINUE_ENVTEST_ARCHIVE) into {CACHE}; elsewhere `setup-envtest use 1.36.x` gives "
    "etcd and kube-apiserver, and a Kubernetes v1.36 server release the controller manager and scheduler")
ADMIN_TOKEN = "kontinue-tests-admin"  # system:masters, on loopback only
# Controllers a test cluster needs (no kubelet, no cloud): owners collect their pods, namespaces go,
# ServiceAccounts get tokens, orphaned pods are collected, lost nodes get tainted and their pods
# evicted, PodDisruptionBudgets get the status the Eviction API reads, claims get bound to their
# volumes and quotas get their usage.
CONTROLLERS = ("garbage-collector-controller", "namespace-controller", "serviceaccount-controller",
               "serviceaccount-token-controller", "pod-garbage-collector-controller",
               "node-lifecycle-controller", "taint-eviction-controller", "disruption-controller",
               "persistentvolume-binder-controller", "resourcequota-controller")
NODE_MONITOR_GRACE_SECONDS = 8  # a node whose Lease is this old is NotReady (default 50 s)


def cached(into: Path = CACHE) -> bool:
    return all(_sha256(into / name) == digest for name, digest in SHA256.items())


def find_archive() -> Path | None:
    return next((path for path in ARCHIVES if path.exists()), None)


def unpack(archive: Path | None = None, into: Path = CACHE) -> Path:
    """Unpack the envtest archive once (checked against the README's sha256); returns the directory."""
    if cached(into):
        return into
    archive = archive or find_archive()
    if archive is None:
        raise FileNotFoundError(f"no {ARCHIVE_NAME} found: {HOW_TO_GET_THEM}")
    partial = into.with_name(into.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(partial, filter="data")
    for name, digest in SHA256.items():
        found = next(partial.rglob(name))
        if _sha256(found) != digest:
            raise RuntimeError(f"{found}: sha256 differs from the envtest README's")
        found.rename(partial / name)
        (partial / name).chmod(0o755)
    shutil.rmtree(into, ignore_errors=True)
    partial.rename(into)
    return into


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def assets() -> Path | None:
    """The directory named by KUBEBUILDER_ASSETS if it holds all four binaries."""
    directory = os.environ.get(ASSETS_ENV)
    if directory and all(os.access(Path(directory) / name, os.X_OK) for name in BINARIES):
        return Path(directory)
    return None


def free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1/localhost and its key (the kubelet's log endpoint)."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


class ControlPlane:
    """The four processes, their logs under `root`, and how to reach the API server as admin."""

    def __init__(self, root: Path, binaries: Path):
        self.root, self.binaries = Path(root), Path(binaries)
        self.processes: dict[str, subprocess.Popen] = {}
        self.url = ""
        self.ca = self.root / "apiserver.crt"
        self.admin_kubeconfig = self.root / "admin.kubeconfig"
        self.kubelet_cert = self.kubelet_key = self.root / "missing"

    def start(self) -> ControlPlane:
        self.root.mkdir(parents=True, exist_ok=True)
        etcd_port, apiserver_port = free_port(), free_port()
        self._spawn("etcd", "--data-dir", str(self.root / "etcd"), "--listen-client-urls",
                    f"http://127.0.0.1:{etcd_port}", "--listen-peer-urls", f"http://127.0.0.1:{free_port()}")
        subprocess.run(["openssl", "genrsa", "-out", str(self.root / "sa.key"), "2048"], check=True, capture_output=True)
        subprocess.run(["openssl", "rsa", "-in", str(self.root / "sa.key"), "-pubout", "-out",
                        str(self.root / "sa.pub")], check=True, capture_output=True)
        (self.root / "tokens.csv").write_text(f'{ADMIN_TOKEN},admin,admin,"system:masters"\n')
        self.kubelet_cert, self.kubelet_key = self_signed(self.root, "kubelet")
        serving_cert, serving_key = self_signed(self.root, "apiserver")
        self._spawn(
            "kube-apiserver", f"--etcd-servers=http://127.0.0.1:{etcd_port}", f"--tls-cert-file={serving_cert}",
            f"--tls-private-key-file={serving_key}",
            f"--secure-port={apiserver_port}", "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            "--service-cluster-ip-range=10.0.0.0/24", "--allow-privileged=true", "--authorization-mode=RBAC",
            f"--token-auth-file={self.root / 'tokens.csv'}", "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={self.root / 'sa.pub'}",
            f"--service-account-signing-key-file={self.root / 'sa.key'}",
            f"--kubelet-certificate-authority={self.kubelet_cert}", "--kubelet-preferred-address-types=InternalIP")
        self.url = f"https://127.0.0.1:{apiserver_port}"
        self._wait_ready()
        self._write_kubeconfig(self.admin_kubeconfig, "admin", ADMIN_TOKEN)
        common = [f"--kubeconfig={self.admin_kubeconfig}", "--leader-elect=false", "--bind-address=127.0.0.1"]
        self._spawn("kube-controller-manager", *common, f"--secure-port={free_port()}",
                    f"--service-account-private-key-file={self.root / 'sa.key'}",
                    "--use-service-account-credentials=false", f"--controllers={','.join(CONTROLLERS)}",
                    "--node-monitor-period=1s", f"--node-monitor-grace-period={NODE_MONITOR_GRACE_SECONDS}s",
                    "--concurrent-gc-syncs=5")
        self._spawn("kube-scheduler", *common, f"--secure-port={free_port()}")
        return self

    def _spawn(self, name: str, *args: str) -> None:
        log = open(self.root / f"{name}.log", "ab")
        self.processes[name] = subprocess.Popen([str(self.binaries / name), *args], stdin=subprocess.DEVNULL,
                                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited {process.returncode}:\n{self.log_tail(name)}")
            try:
                ready = requests.get(f"{self.url}/readyz", verify=str(self.ca), timeout=2,
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
                if ready.status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"kube-apiserver not ready after {timeout:g}s:\n{self.log_tail('kube-apiserver')}")

    def _write_kubeconfig(self, path: Path, user: str, token: str, namespace: str = "default") -> Path:
        path.write_text(kubeconfig(self.url, self.ca, user, token, namespace))
        return path

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def dump(self) -> str:
        dead = {name: process.returncode for name, process in self.processes.items() if process.poll() is not None}
        return f"--- control plane at {self.url}; exited: {dead or 'none'}" + "".join(
            f"\n--- {name} log tail:\n{self.log_tail(name, 1500)}" for name in dead)

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(5)  # a test cluster has nothing to drain; kube-apiserver waits ~15 s otherwise
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def kubeconfig(server: str, ca: Path, user: str, token: str, namespace: str) -> str:
    """A kubeconfig for one bearer token (kubectl, helm, kopf and the kubernetes client read it)."""
    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": user,
        "clusters": [{"name": "test", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": "test", "user": user, "namespace": namespace}}],
    })


if __name__ == "__main__":
    # `python -m tests.control_plane unpack`: prints the directory for KUBEBUILDER_ASSETS.
    if sys.argv[1:] != ["unpack"]:
        sys.exit("usage: python -m tests.control_plane unpack")
    try:
        print(unpack())
    except FileNotFoundError as missing:  # the cluster tests then skip, saying how to get the binaries
        print(missing, file=sys.stderr)

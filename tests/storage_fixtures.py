"""Storage fixtures shared by every test module: a real in-process S3 server (moto) and stores on it.

Registered from tests/conftest.py with ``pytest_plugins = ["tests.storage_fixtures"]``.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import pytest
from minio import Minio
from moto.server import ThreadedMotoServer

from kontinue.storage import LocalStore, S3Config, S3Store, open_store


@dataclass
class S3Server:
    endpoint: str  # "http://127.0.0.1:PORT"
    access_key: str = "kontinue-test-access"
    secret_key: str = "kontinue-test-secret-value"
    region: str = "us-east-1"
    _names: itertools.count = field(default_factory=itertools.count, repr=False)

    @property
    def environ(self) -> dict[str, str]:
        """What a pod would get from the Kubernetes Secret."""
        return {
            "KONTINUE_S3_ENDPOINT": self.endpoint,
            "KONTINUE_S3_ACCESS_KEY": self.access_key,
            "KONTINUE_S3_SECRET_KEY": self.secret_key,
            "KONTINUE_S3_REGION": self.region,
        }

    @property
    def config(self) -> S3Config:
        return S3Config.from_environ(self.environ)

    def client(self) -> Minio:
        """A raw minio client, for poking at the bucket behind a store's back."""
        return self.config.client()

    def make_bucket(self, stem: str = "test") -> str:
        """Create and return a fresh, uniquely named bucket."""
        name = f"{stem}-{next(self._names)}"
        S3Store(self.config, name).ensure_bucket()
        return name


@pytest.fixture(scope="session")
def s3_server():
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request drowns test output
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Server(endpoint=f"http://{host}:{port}")
    finally:
        server.stop()


@pytest.fixture
def s3_store(s3_server: S3Server) -> S3Store:
    """An S3Store at the root of a fresh, empty bucket."""
    return open_store(f"s3://{s3_server.make_bucket()}", environ=s3_server.environ)


@pytest.fixture
def local_store(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "store")

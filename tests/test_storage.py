"""The storage contract, run against a local directory and a real (in-process moto) S3 server."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
import urllib.parse

import pytest
import urllib3

from kontinue.storage import (
    ChecksumMismatch,
    LocalStore,
    ObjectNotFound,
    S3Config,
    S3Store,
    StorageError,
    open_store,
)

MiB = 1 << 20


@pytest.fixture(params=["local", "s3"])
def store(request):
    """Each backend, one level below its root so key <-> path/object-name mapping is exercised."""
    return request.getfixturevalue(f"{request.param}_store").child("run-1")


def overwrite_behind_the_store(store, key: str, data: bytes) -> None:
    if path := store.local_path(key):
        path.write_bytes(data)
    else:
        store.client.put_object(store.bucket, f"{store.prefix}/{key}", io.BytesIO(data), len(data))


def read_behind_the_store(store, key: str) -> bytes:
    if isinstance(store, LocalStore):
        return (store.root / key).read_bytes()
    return store.client.get_object(store.bucket, f"{store.prefix}/{key}").read()


def keys(store, prefix: str = "") -> list[str]:
    return [info.key for info in store.list(prefix)]


class Exploding:
    """A stream of ``size`` bytes that fails after ``fail_at`` bytes, calling ``during`` first."""

    def __init__(self, size: int, fail_at: int, during):
        self.size, self.fail_at, self.during, self.pos = size, fail_at, during, 0

    def read(self, n: int = -1) -> bytes:
        if self.pos >= self.fail_at:
            self.during()
            raise RuntimeError("boom")
        n = min(self.fail_at - self.pos, self.size if n < 0 else n)
        self.pos += n
        return b"x" * n


def test_bytes_and_text_round_trip(store):
    info = store.put_bytes("a/b.bin", b"\x00\x01payload")
    assert (info.key, info.size, info.sha256) == ("a/b.bin", 9, None)
    assert info.modified > 0
    assert store.get_bytes("a/b.bin") == b"\x00\x01payload"
    store.put_bytes("a/b.bin", b"v2")
    assert store.get_bytes("a/b.bin") == b"v2"
    store.write_text("notes.txt", "grüße ✓\n")
    assert store.read_text("notes.txt") == "grüße ✓\n"


def test_file_round_trip(store, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(100_000))
    assert store.put_file("ckpt/model.bin", src).size == 100_000
    dest = tmp_path / "down" / "deeper" / "model.bin"
    info = store.get_file("ckpt/model.bin", dest)
    assert dest.read_bytes() == src.read_bytes()
    assert (info.key, info.size) == ("ckpt/model.bin", 100_000)
    assert os.listdir(dest.parent) == ["model.bin"]  # no temp left behind


def test_list_exists_stat_delete(store):
    for key in ["top", "dir/b", "dir/sub/c", "dirx/d"]:
        store.put_bytes(key, key.encode())
    assert keys(store) == ["dir/b", "dir/sub/c", "dirx/d", "top"]
    assert keys(store, "dir/") == ["dir/b", "dir/sub/c"]
    assert keys(store, "dir") == ["dir/b", "dir/sub/c", "dirx/d"]
    assert keys(store, "nothing/") == []
    assert store.exists("dir/sub/c") and not store.exists("dir/sub") and not store.exists("nope")
    assert store.stat("dir/sub/c").size == len("dir/sub/c")

    with pytest.raises(ObjectNotFound, match="nope") as missing:
        store.stat("nope")
    assert isinstance(missing.value, FileNotFoundError) and store.uri in str(missing.value)
    with pytest.raises(ObjectNotFound):
        store.get_bytes("dir/nope")

    store.delete("dir/b")
    store.delete("dir/b")  # missing is fine
    assert keys(store) == ["dir/sub/c", "dirx/d", "top"]


def test_move_carries_the_sidecar(store):
    store.put_bytes("staging/ckpt", b"weights", checksum=True)
    store.put_bytes("final/ckpt", b"old", checksum=True)
    store.move("staging/ckpt", "final/ckpt")
    assert keys(store) == ["final/ckpt"]
    assert store.get_bytes("final/ckpt") == b"weights"
    assert store.sha256_of("final/ckpt") == hashlib.sha256(b"weights").hexdigest()

    store.put_bytes("plain", b"no digest")
    store.move("plain", "final/ckpt")  # the stale digest must not survive
    assert store.sha256_of("final/ckpt") is None

    store.move("final/ckpt", "final/ckpt")
    assert store.get_bytes("final/ckpt") == b"no digest"
    with pytest.raises(ObjectNotFound):
        store.move("missing", "elsewhere")


def test_delete_all_empties_a_run_directory_and_leaves_its_siblings(store):
    run, sibling = store.child("ns", "run"), store.child("ns", "run-2")
    run.put_bytes("last.ckpt", b"state", checksum=True)
    run.put_bytes("dump/hf_text/model.safetensors", b"weights")
    sibling.put_bytes("last.ckpt", b"other")
    if path := run.local_path("last.ckpt"):  # what a killed writer leaves, which listing skips
        (path.parent / ".last.ckpt.123.tmp").write_bytes(b"half")
    assert run.delete_all() == 2
    assert keys(run) == [] and keys(sibling) == ["last.ckpt"]
    assert not (path and path.parent.exists()), "a local run directory goes as a whole"
    assert run.delete_all() == 0, "deleting an empty or missing directory is fine"


def test_delete_run_dir_command(local_store, capsys):
    from kontinue.cli import main

    local_store.put_bytes("ns/run/status.json", b"{}")
    assert main(["delete-run-dir", local_store.child("ns", "run").uri]) == 0
    assert "deleted 1 objects" in capsys.readouterr().out and keys(local_store) == []


def test_child(store):
    sub = store.child("a", "b/c")
    assert sub.uri == store.uri + "/a/b/c"
    sub.put_bytes("x", b"1")
    assert keys(store) == ["a/b/c/x"]
    assert keys(sub) == ["x"]
    assert store.child().uri == store.uri


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "./a", "a/", "ckpt.sha256"])
def test_invalid_keys(store, key):
    with pytest.raises(StorageError, match="invalid storage key"):
        store.put_bytes(key, b"x")


def test_checksum_sidecar(store, tmp_path):
    src = tmp_path / "model.bin"
    src.write_bytes(os.urandom(50_000))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()

    assert store.put_file("model.bin", src, checksum=True).sha256 == digest
    assert read_behind_the_store(store, "model.bin.sha256") == f"{digest}\n".encode()
    assert store.sha256_of("model.bin") == digest
    assert store.stat("model.bin").sha256 == digest
    [listed] = store.list()  # the sidecar is folded into its object
    assert (listed.key, listed.sha256) == ("model.bin", digest)
    assert store.get_file("model.bin", tmp_path / "out.bin", verify=True).sha256 == digest

    store.put_file("model.bin", src)  # rewritten without a checksum: no stale digest
    assert store.sha256_of("model.bin") is None


def test_corrupted_object_raises_checksum_mismatch(store, tmp_path):
    store.put_bytes("model.bin", b"good weights", checksum=True)
    overwrite_behind_the_store(store, "model.bin", b"bad weights!")
    dest = tmp_path / "dl" / "model.bin"
    dest.parent.mkdir()
    dest.write_bytes(b"previous")
    with pytest.raises(ChecksumMismatch, match="model.bin"):
        store.get_file("model.bin", dest, verify=True)
    assert dest.read_bytes() == b"previous"
    assert os.listdir(dest.parent) == ["model.bin"]  # the bad temp download is gone
    store.get_file("model.bin", dest)  # without verify the bytes are taken as they are
    assert dest.read_bytes() == b"bad weights!"


def test_verify_without_sidecar_raises(store, tmp_path):
    store.put_bytes("model.bin", b"weights")
    with pytest.raises(ChecksumMismatch, match=r"model\.bin\.sha256 is missing"):
        store.get_file("model.bin", tmp_path / "model.bin", verify=True)
    assert not (tmp_path / "model.bin").exists()


def test_failed_write_leaves_no_partial_object(store):
    """Fails after two 5 MiB parts went out (multipart on S3); the key must keep its old bytes throughout."""
    if isinstance(store, S3Store):
        store.part_size = 5 * MiB
    store.put_bytes("ckpt", b"old")

    def visible_state():
        assert keys(store) == ["ckpt"]
        assert store.get_bytes("ckpt") == b"old"

    for key in ["ckpt", "fresh"]:
        stream = Exploding(12 * MiB, fail_at=11 * MiB, during=visible_state)
        with pytest.raises(RuntimeError, match="boom"):
            store._write(key, stream, 12 * MiB)
        assert stream.pos == 11 * MiB
        visible_state()
    if isinstance(store, LocalStore):
        assert os.listdir(store.root) == ["ckpt"]  # no stray temp file


def test_a_write_killed_midway_leaves_a_temp_file_that_only_the_sweep_of_its_prefix_removes(local_store):
    """SIGKILL gives atomic_file no chance to clean up; what is left is swept once no writer is at work."""
    import signal
    import subprocess
    import sys
    script = ("import sys, time; from kontinue.storage import LocalStore\n"
              "with LocalStore(sys.argv[1]).writer(sys.argv[2]) as out:\n"
              "    out.write(b'x' * 4096); out.flush(); print('writing', flush=True); time.sleep(60)\n")
    local_store.put_bytes("checkpoints/step-1.ckpt", b"whole")
    for key in ("checkpoints/step-2.ckpt", "elsewhere/object"):
        child = subprocess.Popen([sys.executable, "-c", script, str(local_store.root), key], stdout=subprocess.PIPE)
        assert child.stdout.readline() == b"writing\n"
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    leftovers = lambda: sorted(p.relative_to(local_store.root).parent.as_posix()  # noqa: E731
                               for p in local_store.root.rglob(".*.tmp"))
    assert leftovers() == ["checkpoints", "elsewhere"] and keys(local_store) == ["checkpoints/step-1.ckpt"]
    local_store.remove_interrupted_writes("checkpoints/")
    assert leftovers() == ["elsewhere"] and keys(local_store) == ["checkpoints/step-1.ckpt"]


def test_multipart_round_trip(store, tmp_path):
    if isinstance(store, S3Store):
        store.part_size = 5 * MiB
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(12 * MiB))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()

    info = store.put_file("big.bin", src, checksum=True)
    assert (info.size, info.sha256) == (12 * MiB, digest)
    if isinstance(store, S3Store):  # a multipart object's ETag ends in -<number of parts>
        etag = store.client.stat_object(store.bucket, f"{store.prefix}/big.bin").etag
        assert etag.endswith("-3")
    out = tmp_path / "out.bin"
    assert store.get_file("big.bin", out, verify=True).sha256 == digest
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest


def test_streamed_write_appears_whole_with_its_sha256_in_parallel_parts(store):
    """A checkpoint streamed from its serializer: written in pieces of any size, stored multipart
    (S3: parts uploaded in parallel), hashed on the way."""
    if isinstance(store, S3Store):
        store.part_size = 5 * MiB
    data = os.urandom(13 * MiB)
    with store.writer("checkpoints/step-1.ckpt", checksum=True) as out:
        for start, size in zip(range(0, len(data), 3 * MiB + 17), [3 * MiB + 17] * 10):
            out.write(memoryview(data)[start:start + size])
        assert not store.exists("checkpoints/step-1.ckpt"), "visible before the writer finished"
    digest = hashlib.sha256(data).hexdigest()
    assert (out.info.size, out.info.sha256) == (len(data), digest)
    assert store.get_bytes("checkpoints/step-1.ckpt") == data
    assert store.verify("checkpoints/step-1.ckpt", sha256=digest) == digest
    if isinstance(store, S3Store):
        assert store.client.stat_object(store.bucket, f"{store.prefix}/checkpoints/step-1.ckpt").etag.endswith("-3")
    with store.writer("empty") as out:
        pass
    assert store.get_bytes("empty") == b""


class RecordingHTTP(urllib3.PoolManager):
    """A real connection pool that notes each request to the server (and can stand in for the
    server's answer to one, for replies moto never gives)."""

    def __init__(self, answer=None):
        super().__init__(retries=False)
        self.requests, self.in_flight, self.most_in_flight = [], 0, 0
        self._lock, self._answer = threading.Lock(), answer

    def urlopen(self, method, url, body=None, headers=None, **kwargs):
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query, keep_blank_values=True)
        self.requests.append((method, query, dict(headers or {}), body))
        if self._answer and (answer := self._answer(method, query)):
            return answer
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if "partNumber" in query:
                time.sleep(0.05)  # parts that take a while, so a fast writer has to wait for a free buffer
            return super().urlopen(method, url, body=body, headers=headers, **kwargs)
        finally:
            with self._lock:
                self.in_flight -= 1


def test_a_streamed_upload_sends_presigned_unhashed_parts_from_buffers_kept_for_the_next(s3_store):
    """minio's put_object hashed every part to sign it (sha256 over HTTP, MD5 over HTTPS): more CPU
    than the rest of a checkpoint's upload. Parts now go out presigned, unhashed, two at a time here,
    each from one of three buffers, while the writer goes on (and waits when all are taken); the
    next upload takes the same buffers instead of faulting in fresh pages."""
    http = RecordingHTTP()
    store = S3Store(s3_store.config, s3_store.bucket, "presigned", part_size=5 * MiB, parallel_uploads=2, http=http)
    data = os.urandom(6 * 5 * MiB + 123)
    with store.writer("checkpoints/step-1.ckpt", checksum=True) as out:
        for start in range(0, len(data), MiB):
            out.write(data[start:start + MiB])
    uploads = [(method, query, headers, body) for method, query, headers, body in http.requests
               if method in ("PUT", "POST")]
    parts = [body for method, query, headers, body in uploads if "partNumber" in query]
    assert [len(body) for body in parts] == [5 * MiB] * 6 + [123]
    assert len({id(body.obj) for body in parts}) <= 3, "a fresh buffer for every part"
    assert http.most_in_flight == 2
    for method, query, headers, body in uploads:
        assert query["X-Amz-SignedHeaders"] == ["host"] and "X-Amz-Signature" in query
        assert not {name.lower() for name in headers} & {"content-md5", "x-amz-content-sha256"}
    posts = [("uploads" in query, "uploadId" in query) for method, query, headers, body in uploads if method == "POST"]
    assert posts == [(True, False), (False, True)]  # create, complete
    assert store.get_bytes("checkpoints/step-1.ckpt") == data
    assert store.verify("checkpoints/step-1.ckpt") == hashlib.sha256(data).hexdigest()
    plain_puts = [query for method, query, headers, body in uploads if method == "PUT" and "partNumber" not in query]
    assert len(plain_puts) == 1 and "uploadId" not in plain_puts[0]  # the sidecar: a small object, one PUT

    del http.requests[:]
    store.put_bytes("checkpoints/step-2.ckpt", data)
    again = {id(body.obj) for method, query, headers, body in http.requests if "partNumber" in query}
    assert again and again <= {id(body.obj) for body in parts}


def test_a_complete_that_fails_after_its_200_leaves_nothing_and_says_why(s3_store):
    """S3 may answer CompleteMultipartUpload 200 and put the error in the body."""
    error = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
             b'<Message>We encountered an internal error. Please try again.</Message></Error>')
    http = RecordingHTTP(answer=lambda method, query: urllib3.HTTPResponse(error, status=200, preload_content=False)
                         if method == "POST" and "uploadId" in query else None)
    store = S3Store(s3_store.config, s3_store.bucket, "complete", part_size=5 * MiB, http=http)
    with pytest.raises(StorageError, match="complete/ckpt: InternalError: We encountered an internal error"):
        with store.writer("ckpt") as out:
            out.write(os.urandom(11 * MiB))
    assert not store.exists("ckpt")
    assert [method for method, query, headers, body in http.requests if "uploadId" in query][-1] == "DELETE"


def test_part_sizes_double_every_2000_parts_so_that_10000_hold_almost_2_tib():
    from kontinue.storage.s3 import MAX_PARTS, part_size_for

    assert [part_size_for(n, 32 * MiB) // MiB for n in (1, 2000, 2001, 4001, MAX_PARTS)] == [32, 32, 64, 128, 512]
    assert sum(part_size_for(n, 32 * MiB) for n in range(1, MAX_PARTS + 1)) >= 1.85 * (1 << 40)


def test_streamed_write_that_fails_leaves_nothing(store):
    """The serializer fails after two parts went out: the old object stays, no new one appears."""
    if isinstance(store, S3Store):
        store.part_size = 5 * MiB
    store.put_bytes("ckpt", b"old", checksum=True)
    for key in ["ckpt", "fresh"]:
        with pytest.raises(RuntimeError, match="serializer"):
            with store.writer(key, checksum=True) as out:
                out.write(os.urandom(11 * MiB))
                raise RuntimeError("the serializer failed")
        assert keys(store) == ["ckpt"] and store.get_bytes("ckpt") == b"old"
        assert store.verify("ckpt") == hashlib.sha256(b"old").hexdigest()
    if isinstance(store, LocalStore):
        assert sorted(os.listdir(store.root)) == ["ckpt", "ckpt.sha256"]  # no stray temp file
    else:  # the abandoned multipart upload was aborted, not left to accumulate parts
        import boto3

        s3 = boto3.client("s3", endpoint_url=f"http://{store.config.endpoint}", region_name="us-east-1",
                          aws_access_key_id=store.config.access_key, aws_secret_access_key=store.config.secret_key)
        assert not s3.list_multipart_uploads(Bucket=store.bucket).get("Uploads")


def test_a_failed_upload_stops_the_streamed_writer(s3_store):
    """The server refuses the upload (no such bucket): the writer gets the error instead of blocking."""
    store = S3Store(s3_store.config, "no-such-bucket", "run", part_size=5 * MiB)
    with pytest.raises(StorageError, match="does not exist"):
        with store.writer("big") as out:
            for _ in range(20):
                out.write(os.urandom(4 * MiB))


def test_sync_up_and_down(store, tmp_path):
    up = tmp_path / "up"
    files = {"metadata.json": b"{}", "dump/model.safetensors": b"w" * 1000, "dump/a/b/c.txt": b"deep"}
    for rel, data in files.items():
        (up / rel).parent.mkdir(parents=True, exist_ok=True)
        (up / rel).write_bytes(data)
    for rel in ["dump/x.tmp", "dump/y.tmp.123", "dump/ckpt.tmp/part"]:  # temporaries are skipped
        (up / rel).parent.mkdir(parents=True, exist_ok=True)
        (up / rel).write_bytes(b"partial")

    uploaded = store.sync_up(up, "runs/7", checksum=True)
    assert sorted(i.key for i in uploaded) == sorted(f"runs/7/{rel}" for rel in files)
    assert keys(store) == sorted(f"runs/7/{rel}" for rel in files)

    down = tmp_path / "down"
    store.sync_down(down, "runs/7/", verify=True)
    got = {p.relative_to(down).as_posix(): p.read_bytes() for p in down.rglob("*") if p.is_file()}
    assert got == files

    dump = tmp_path / "dump-only"
    store.sync_down(dump, "runs/7/dump")
    assert sorted(p.relative_to(dump).as_posix() for p in dump.rglob("*") if p.is_file()) == [
        "a/b/c.txt", "model.safetensors"]


def test_sync_up_of_a_local_store_carries_its_checksums(local_store, store):
    """A run directory copied from disk to a store keeps its digests, not its sidecar files."""
    local_store.put_bytes("last.ckpt", b"state", checksum=True)
    local_store.put_bytes("status.json", b"{}")
    store.sync_up(local_store.root, "copy")
    assert [(info.key, info.sha256) for info in store.list("copy/")] == [
        ("copy/last.ckpt", hashlib.sha256(b"state").hexdigest()), ("copy/status.json", None)]


def test_local_path(local_store, s3_store):
    assert local_store.local_path("a/b") == local_store.root / "a" / "b"
    assert s3_store.local_path("a/b") is None


def test_open_store_local_uris(tmp_path, monkeypatch):
    assert open_store(tmp_path.as_uri()).root == tmp_path
    assert open_store(str(tmp_path)).uri == tmp_path.as_uri()
    spaced = tmp_path / "with space"
    assert open_store(spaced.as_uri()).root == spaced
    monkeypatch.chdir(tmp_path)
    store = open_store("rel/dir")
    assert isinstance(store, LocalStore) and store.root == tmp_path / "rel" / "dir"


def test_open_store_s3_uri_does_no_io(s3_server):
    store = open_store("s3://no-such-bucket/runs/7/", environ=s3_server.environ)
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.uri) == ("no-such-bucket", "runs/7", "s3://no-such-bucket/runs/7")
    assert open_store("s3://bkt", environ=s3_server.environ).uri == "s3://bkt"
    with pytest.raises(StorageError, match="does not exist.*ensure_bucket"):
        store.put_bytes("x", b"1")


@pytest.mark.parametrize("uri", ["gs://bucket/x", "s3:///no-bucket", "file://otherhost/x"])
def test_open_store_rejects_unknown_uris(uri):
    with pytest.raises(StorageError, match="unsupported storage URI") as err:
        open_store(uri, environ={})
    assert uri in str(err.value)


def test_ensure_bucket_is_idempotent(s3_server):
    store = open_store("s3://made-by-ensure/p", environ=s3_server.environ)
    store.ensure_bucket()
    store.ensure_bucket()
    store.put_bytes("k", b"v")
    assert keys(store) == ["k"]


SECRET = "wJalrXUtnFEMI-very-secret"


@pytest.mark.parametrize(
    ("env", "endpoint", "secure"),
    [
        ({"KONTINUE_S3_ENDPOINT": "minio.kontinue:9000"}, "minio.kontinue:9000", True),
        ({"KONTINUE_S3_ENDPOINT": "http://127.0.0.1:9000"}, "127.0.0.1:9000", False),
        ({"KONTINUE_S3_ENDPOINT": "https://s3.example.com/"}, "s3.example.com", True),
        ({"KONTINUE_S3_ENDPOINT": "http://h:1", "KONTINUE_S3_SECURE": "TRUE"}, "h:1", True),
        ({"KONTINUE_S3_ENDPOINT": "h:1", "KONTINUE_S3_SECURE": "false"}, "h:1", False),
    ],
)
def test_s3_config_endpoint(env, endpoint, secure):
    config = S3Config.from_environ({**env, "KONTINUE_S3_ACCESS_KEY": "ak", "KONTINUE_S3_SECRET_KEY": SECRET})
    assert (config.endpoint, config.secure, config.access_key, config.secret_key) == (endpoint, secure, "ak", SECRET)


def test_s3_config_falls_back_to_aws_variables():
    config = S3Config.from_environ({
        "AWS_ENDPOINT_URL": "http://aws:1", "AWS_ACCESS_KEY_ID": "ak", "AWS_SECRET_ACCESS_KEY": SECRET,
        "KONTINUE_S3_ACCESS_KEY": "", "KONTINUE_S3_REGION": "eu-west-1",
    })
    assert (config.endpoint, config.access_key, config.secret_key, config.region) == ("aws:1", "ak", SECRET, "eu-west-1")


@pytest.mark.parametrize("missing", ["KONTINUE_S3_ENDPOINT", "KONTINUE_S3_ACCESS_KEY", "KONTINUE_S3_SECRET_KEY"])
def test_missing_setting_names_the_variable_not_the_secret(missing):
    env = {"KONTINUE_S3_ENDPOINT": "h:1", "KONTINUE_S3_ACCESS_KEY": "ak", "KONTINUE_S3_SECRET_KEY": SECRET}
    del env[missing]
    with pytest.raises(StorageError, match=missing) as err:
        open_store("s3://bucket/prefix", environ=env)
    assert SECRET not in str(err.value) and SECRET not in repr(err.value)


@pytest.mark.parametrize("env", [
    {"KONTINUE_S3_ENDPOINT": f"http://user:{SECRET}@h:1"},
    {"KONTINUE_S3_ENDPOINT": "ftp://h:1"},
    {"KONTINUE_S3_ENDPOINT": "h:1", "KONTINUE_S3_SECURE": "maybe"},
])
def test_bad_s3_settings(env):
    with pytest.raises(StorageError, match="KONTINUE_S3_") as err:
        S3Config.from_environ({"KONTINUE_S3_ACCESS_KEY": "ak", "KONTINUE_S3_SECRET_KEY": SECRET, **env})
    assert SECRET not in str(err.value)


def test_credentials_in_uri_are_refused_without_echo():
    with pytest.raises(StorageError, match="must not contain credentials") as err:
        open_store(f"s3://ak:{SECRET}@bucket/x", environ={})
    assert SECRET not in str(err.value)


def test_secrets_stay_out_of_reprs(s3_server):
    config = S3Config("h:1", "AKIA-ACCESS", SECRET, secure=False)
    assert repr(config) == "S3Config(endpoint='h:1', secure=False, region=None)"
    store = open_store("s3://bucket/p", environ=s3_server.environ)
    for text in (repr(store), str(store), repr(store.config)):
        assert s3_server.secret_key not in text and s3_server.access_key not in text



def test_spare_buffers_keep_the_most_recently_given_back_and_close_the_rest():
    import mmap

    from kontinue.storage.buffers import SpareBuffers

    pool = SpareBuffers(3, lambda size: mmap.mmap(-1, size))
    taken = [pool.take(4096) for _ in range(5)]
    assert len({id(buffer) for buffer in taken}) == 5
    for buffer in taken:
        pool.give_back(buffer)
    assert [buffer.closed for buffer in taken] == [True, True, False, False, False]
    assert pool.take(4096) is taken[-1] and pool.take(4096) is taken[-2]
    other = pool.take(8192)
    assert len(other) == 8192 and all(other is not buffer for buffer in taken)


def test_no_presigned_signature_reaches_an_error_or_the_log(s3_server, caplog):
    """A presigned URL grants its request for an hour: neither the error of an upload that failed
    (retried, then given up) nor urllib3's log of the requests may show its signature or key."""
    import dataclasses
    import logging
    import re
    import socket
    import traceback

    caplog.set_level(logging.DEBUG, logger="urllib3")
    store = S3Store(s3_server.config, s3_server.make_bucket(), "secrets", part_size=5 * MiB)
    store.put_bytes("ok", b"x" * 100)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    unreachable = S3Store(dataclasses.replace(s3_server.config, endpoint=f"127.0.0.1:{port}"), "bucket", "run")
    with pytest.raises(StorageError, match="run/lost: HTTPError: NewConnectionError") as failed:
        unreachable.put_bytes("lost", b"y" * 100)
    text = "".join(traceback.format_exception(failed.value)) + caplog.text
    assert "X-Amz-Signature=<redacted>" in caplog.text  # the requests are logged, their signatures blanked
    assert s3_server.access_key not in text and s3_server.secret_key not in text
    assert not re.search(r"X-Amz-Signature=[0-9a-f]", text, re.IGNORECASE)

"""CPU per resume point: kontinue's checkpoint write against a plain write, side by side.

On a node whose cores are all busy training, every CPU-second a checkpoint write takes is taken from
training, wherever it runs. This measures those CPU-seconds for one MiniLM resume point (weights and
AdamW's two moments, 271.5 MB) written to local disk and to S3 (moto's server over HTTP):

- kontinue: `Snapshot` (the copy into shared memory, in the trainer's process) written by the
  helper process (`SerializerProcess`): torch.save streamed into the store, its sha256 on the way, the
  object all-or-nothing (a temporary file renamed; a multipart upload with parts sent in parallel),
  then its sha256 sidecar. CPU of the trainer's process, of the helper and of the S3 server.
- reference: a plain write. `torch.save` into memory, then one minio `put_object` of those
  bytes with their length (minio: the same 32 MiB parts, 4 in parallel; it hashes each part to sign
  it over HTTP), or `torch.save` to a file and fsync. No snapshot, no checksum, not atomic.

Each is done --repeats times, alternating; the report gives the medians and the ratio of kontinue's
CPU (trainer + helper) to the reference's. The S3 server's CPU is reported apart: a real endpoint is
not on the trainer's machine.

    python benchmarks/bench_checkpoint_cpu.py [--repeats N]
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from benchmarks.bench_text_trainer import (MOTO_SERVER, default_model_path, describe_machine,  # noqa: E402
                                           helper_pid, moto_s3, print_table, process_cpu)
from kontinue.storage import LocalStore, S3Config, S3Store, Store  # noqa: E402
from kontinue.trainer.serializer import SerializerProcess, Snapshot  # noqa: E402

MB = 1e6


def minilm_resume_point() -> dict[str, Any]:
    """What a MiniLM resume point holds, shaped as Lightning's checkpoint: the weights and AdamW's
    state after one step."""
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_pretrained(default_model_path())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model(input_ids=ids).last_hidden_state.sum().backward()
    optimizer.step()
    return {"state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()],
            "epoch": 0, "global_step": 1}


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


def measured(write: Callable[[], None], helper: int | None) -> dict[str, float]:
    """CPU-seconds of this process, the helper and moto's server while `write` runs, and its wall time."""
    before = own_cpu(), process_cpu(helper), process_cpu(MOTO_SERVER["pid"]), time.perf_counter()
    write()
    after = own_cpu(), process_cpu(helper), process_cpu(MOTO_SERVER["pid"]), time.perf_counter()
    return {"trainer": after[0] - before[0],
            "helper": after[1] - before[1] if helper is not None else 0.0,
            "server": after[2] - before[2] if MOTO_SERVER["pid"] is not None else 0.0,
            "wall": after[3] - before[3]}


def kontinue_write(checkpoint: dict, store: Store, key: str, serializer: SerializerProcess) -> Callable[[], None]:
    def write() -> None:
        snapshot = Snapshot(checkpoint, serializer)
        try:
            snapshot.write(store, key)
        finally:
            snapshot.close()
    return write


def reference_write(checkpoint: dict, store: Store, key: str) -> Callable[[], None]:
    def write() -> None:
        if isinstance(store, S3Store):
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            size = buffer.tell()
            buffer.seek(0)
            store.client.put_object(store.bucket, f"{store.prefix}/{key}", buffer, size,
                                    part_size=store.part_size, num_parallel_uploads=store.parallel_uploads)
        else:
            path = store.root / key
            with path.open("wb") as out:
                torch.save(checkpoint, out)
                out.flush()
                os.fsync(out.fileno())
    return write


def compare(checkpoint: dict, store: Store, serializer: SerializerProcess, repeats: int) -> dict[str, list]:
    runs: dict[str, list] = {"kontinue": [], "reference": []}
    helper = helper_pid(serializer)
    for repeat in range(repeats):
        runs["kontinue"].append(measured(kontinue_write(checkpoint, store, f"k-{repeat}.ckpt", serializer), helper))
        runs["reference"].append(measured(reference_write(checkpoint, store, f"r-{repeat}.ckpt"), None))
    return runs


def rows_for(where: str, runs: dict[str, list], size: int) -> list[tuple[str, str]]:
    def median(name: str, field: str) -> float:
        return statistics.median(run[field] for run in runs[name])

    ours = statistics.median(run["trainer"] + run["helper"] for run in runs["kontinue"])
    theirs = median("reference", "trainer")
    rows = [(f"{where}: one resume point of {size / MB:.1f} MB (medians of {len(runs['kontinue'])})", ""),
            ("  kontinue: trainer's process (the snapshot)", f"{median('kontinue', 'trainer'):.2f} CPU-s"),
            ("  kontinue: helper process (torch.save, sha256, the write)", f"{median('kontinue', 'helper'):.2f} CPU-s"),
            ("  kontinue: both", f"{ours:.2f} CPU-s = {size / MB / ours:.0f} MB per CPU-s; "
                                  f"wall {median('kontinue', 'wall'):.2f} s"),
            ("  reference: torch.save and one plain write", f"{theirs:.2f} CPU-s = {size / MB / theirs:.0f} MB per "
                                                            f"CPU-s; wall {median('reference', 'wall'):.2f} s"),
            ("  kontinue / reference, CPU", f"{ours / theirs:.2f}")]
    if MOTO_SERVER["pid"] is not None:
        rows.append(("  S3 server's CPU (kontinue / reference)",
                     f"{median('kontinue', 'server'):.2f} / {median('reference', 'server'):.2f} CPU-s"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="writes of each kind per store")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    start = time.perf_counter()
    print(f"machine: {describe_machine()}")
    checkpoint = minilm_resume_point()
    serializer = SerializerProcess(min_bytes=0)
    serializer.start(wait=True)
    size = Snapshot(checkpoint).size
    rows: list[tuple[str, str]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="kontinue-bench-cpu-") as scratch:
            rows += rows_for("local disk", compare(checkpoint, LocalStore(scratch), serializer, args.repeats), size)
        with moto_s3():
            store = S3Store(S3Config.from_environ(), "kontinue-bench", "cpu")
            store.ensure_bucket()
            rows += rows_for("S3 (moto over HTTP, this machine)", compare(checkpoint, store, serializer, args.repeats),
                             size)
    finally:
        serializer.close()
    print()
    print_table(rows)
    print(f"\ntotal benchmark wall time {time.perf_counter() - start:.0f} s; "
          f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

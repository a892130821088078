"""The AutoMM-style dotted hyperparameter keys kontinue understands.

One table serves the API (validation of `spec.hyperparameters`), the CRD descriptions and the
trainer (defaults), so a key the trainer does not know can never be accepted.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

from kontinue.api.families import FAMILIES, FUSION_HEADS, family_of, unsupported_model_names


class HyperparameterError(ValueError):
    """A hyperparameter key is unknown or its value is out of range; `key` names it."""

    def __init__(self, key: str, message: str):
        super().__init__(f"hyperparameters.{key}: {message}")
        self.key = key
        self.message = message


@dataclass(frozen=True)
class Hyperparameter:
    default: Any
    description: str
    check: Callable[[Any], str | None]


def _number(minimum: float | None = None, maximum: float | None = None, integer: bool = False,
            allow: tuple = ()) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value in allow:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, got {value!r}"
        if integer and not float(value).is_integer():
            return f"must be a whole number, got {value!r}"
        if minimum is not None and value < minimum:
            return f"must be >= {minimum}, got {value!r}"
        if maximum is not None and value > maximum:
            return f"must be <= {maximum}, got {value!r}"
        return None
    return check


def _choice(*choices: Any) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {list(choices)}, got {value!r}"
    return check


def _optional_string(value: Any) -> str | None:
    return None if value is None or isinstance(value, str) else f"must be a string, got {value!r}"


def _optional_size(value: Any) -> str | None:
    return None if value is None else _number(8, 4096, integer=True)(value)


def _names_from(choices: tuple[str, ...], what: str, allow_empty: bool = False) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not isinstance(value, list) or (not value and not allow_empty) or not all(isinstance(v, str) for v in value):
            return f"must be a list of {what}, got {value!r}"
        unknown = [v for v in value if v not in choices]
        return f"unknown {what} {unknown}; use any of {list(choices)}" if unknown else None
    return check


def _sizes(value: Any) -> str | None:
    if not isinstance(value, list) or not value or not all(_number(1, 65536, integer=True)(v) is None for v in value):
        return f"must be a non-empty list of layer widths, got {value!r}"
    return None


def _backbone_names(value: Any) -> str | None:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        return f"must be a non-empty list of backbone names, got {value!r}"
    unknown = unsupported_model_names(value)
    if unknown:
        return (f"{unknown} not supported by this trainer; it runs {list(FAMILIES)} "
                f"(a repeated family takes a numeric suffix, such as timm_image_1) and the fusion head "
                f"{list(FUSION_HEADS)}")
    return None


IMAGE_TRANSFORMS = ("resize_shorter_side", "resize_to_square", "center_crop", "random_resize_crop",
                    "random_horizontal_flip", "random_vertical_flip", "color_jitter", "affine", "trivial_augment")


HYPERPARAMETERS: dict[str, Hyperparameter] = {
    "model.names": Hyperparameter(
        ["hf_text", "timm_image", "mmdet_image", "numerical_mlp", "categorical_mlp", "fusion_mlp"],
        "Models to build, by AutoMM prefix; those with no column of their modality in the data are left out, "
        "and fusion_mlp fuses several.", _backbone_names),
    "model.hf_text.checkpoint_name": Hyperparameter(
        "google/electra-base-discriminator",
        "A transformers model name or a local directory (a dump's hf_text/ works).", _optional_string),
    "model.hf_text.max_text_len": Hyperparameter(
        512, "Tokens kept per text; longer texts are truncated.", _number(1, 100_000, integer=True)),
    "model.hf_text.pooling_mode": Hyperparameter(
        "cls", "How token states become one vector.", _choice("cls", "mean")),
    "model.timm_image.checkpoint_name": Hyperparameter(
        "swin_base_patch4_window7_224", "A timm architecture name (random weights: nothing is downloaded) or a "
        "dump's timm_image/ directory (its trained weights).", _optional_string),
    "model.timm_image.image_size": Hyperparameter(
        None, "Image side in pixels (unset: the architecture's own input size).", _optional_size),
    "model.timm_image.train_transforms": Hyperparameter(
        ["resize_shorter_side", "center_crop", "trivial_augment"],
        "Training transforms in order, before normalisation with timm's data config.",
        _names_from(IMAGE_TRANSFORMS, "image transforms", allow_empty=True)),
    "model.timm_image.val_transforms": Hyperparameter(
        ["resize_shorter_side", "center_crop"], "Evaluation and prediction transforms in order.",
        _names_from(IMAGE_TRANSFORMS, "image transforms", allow_empty=True)),
    "model.mmdet_image.checkpoint_name": Hyperparameter(
        "yolov3_mobilenetv2_8xb24-320-300e_coco", "An MMDetection config name (its architecture with random "
        "weights: nothing is downloaded), a .json or .yaml config file, or a dump's mmdet_image/ directory.",
        _optional_string),
    "model.mmdet_image.image_size": Hyperparameter(
        None, "Images are resized to fit a square of this side, keeping their aspect ratio (unset: the "
        "config's test scale).", _optional_size),
    "model.numerical_mlp.hidden_size": Hyperparameter(
        128, "Width of the numerical columns' MLP.", _number(1, 65536, integer=True)),
    "model.numerical_mlp.num_layers": Hyperparameter(1, "Layers of the numerical MLP.", _number(1, 16, integer=True)),
    "model.numerical_mlp.drop_rate": Hyperparameter(0.1, "Dropout in the numerical MLP.", _number(0, 0.99)),
    "model.categorical_mlp.hidden_size": Hyperparameter(
        128, "Width of the categorical columns' MLP.", _number(1, 65536, integer=True)),
    "model.categorical_mlp.num_layers": Hyperparameter(
        1, "Layers of the categorical MLP.", _number(1, 16, integer=True)),
    "model.categorical_mlp.drop_rate": Hyperparameter(0.1, "Dropout in the categorical MLP.", _number(0, 0.99)),
    "model.fusion_mlp.hidden_sizes": Hyperparameter([128], "Hidden layer widths of the fusion MLP.", _sizes),
    "model.fusion_mlp.drop_rate": Hyperparameter(0.1, "Dropout in the fusion MLP.", _number(0, 0.99)),
    "model.fusion_mlp.adapt_in_features": Hyperparameter(
        "max", "Each backbone's features are first mapped to the widest (max) or narrowest (min) width.",
        _choice("max", "min")),
    "optim.optim_type": Hyperparameter("adamw", "Optimizer.", _choice("adamw", "adam", "sgd")),
    "optim.lr": Hyperparameter(1e-4, "Peak learning rate (of the head, with layer-wise decay).", _number(0, 10)),
    "optim.weight_decay": Hyperparameter(
        1e-3, "Decoupled weight decay, on weights only (not biases or normalisation layers).", _number(0, 10)),
    "optim.lr_choice": Hyperparameter(
        "layerwise_decay", "How learning rates differ across the model: layerwise_decay (each layer below the "
        "head trains at optim.lr_decay times the rate of the one above it), two_stages (the head at optim.lr "
        "times optim.lr_mult, the backbones at optim.lr) or single_stage (one rate).",
        _choice("layerwise_decay", "two_stages", "single_stage")),
    "optim.lr_decay": Hyperparameter(
        0.9, "Layer-wise decay factor: a layer k blocks below the head trains at optim.lr * lr_decay**k.",
        _number(0, 1)),
    "optim.lr_mult": Hyperparameter(
        1, "With lr_choice two_stages, the head's learning rate is optim.lr times this.", _number(0, 10_000)),
    "optim.lr_schedule": Hyperparameter(
        "cosine_decay", "Learning-rate schedule after warm-up (polynomial_decay ends at optim.end_lr).",
        _choice("cosine_decay", "linear_decay", "polynomial_decay", "constant")),
    "optim.end_lr": Hyperparameter(0, "Final learning rate of polynomial_decay.", _number(0, 10)),
    "optim.warmup_steps": Hyperparameter(
        0.1, "Linear warm-up: up to 1, a fraction of all optimizer steps; above 1, a number of steps.",
        _number(0)),
    "optim.max_epochs": Hyperparameter(20, "Epochs to train.", _number(1, 100_000, integer=True)),
    "optim.max_steps": Hyperparameter(
        -1, "Stop after this many optimizer steps (-1: no limit).", _number(-1, integer=True)),
    "optim.gradient_clip_val": Hyperparameter(1.0, "Clip gradients to this size (0: off).", _number(0)),
    "optim.gradient_clip_algorithm": Hyperparameter(
        "norm", "Clip the gradients' norm or each value.", _choice("norm", "value")),
    "optim.val_check_interval": Hyperparameter(
        0.5, "Validate every this fraction of an epoch (or every N batches if > 1).", _number(0)),
    "optim.check_val_every_n_epoch": Hyperparameter(
        1, "Validate in every Nth epoch only.", _number(1, integer=True)),
    "optim.patience": Hyperparameter(
        10, "Stop after this many validations without improvement.", _number(1, integer=True)),
    "optim.top_k": Hyperparameter(
        3, "Validated states kept as candidates for model.ckpt: the best top_k.", _number(1, 100, integer=True)),
    "optim.top_k_average_method": Hyperparameter(
        "greedy_soup", "How model.ckpt is made of the candidates at the end: greedy_soup (the best, then "
        "each next one averaged in if the average validates at least as well), uniform_soup (the average "
        "of all) or best.", _choice("greedy_soup", "uniform_soup", "best")),
    "env.per_gpu_batch_size": Hyperparameter(8, "Samples per device per step.", _number(1, integer=True)),
    "env.batch_size": Hyperparameter(
        128, "Effective batch size; gradients accumulate to reach it.", _number(1, integer=True)),
    "env.eval_batch_size_ratio": Hyperparameter(
        4, "Evaluation batch size as a multiple of per_gpu_batch_size.", _number(1, integer=True)),
    "env.num_gpus": Hyperparameter(-1, "GPUs to use (-1: all visible, 0: CPU).", _number(-1, integer=True)),
    "env.num_processes": Hyperparameter(
        1, "Processes on the CPU when no GPU is used: more than 1 trains with DDP over gloo, each process "
        "taking env.per_gpu_batch_size samples of every batch (env.batch_size counts them all). Ignored on "
        "GPUs, which run one process each.",
        _number(1, 256, integer=True)),
    "env.precision": Hyperparameter(
        "auto", "Lightning precision; auto is bf16-mixed on GPUs that support it, else 32.",
        _choice("auto", "32-true", "32", "bf16-mixed", "16-mixed", 32, 16)),
    "env.num_workers": Hyperparameter(0, "DataLoader worker processes.", _number(0, 64, integer=True)),
    "env.checkpoint_every_n_steps": Hyperparameter(
        None, "Take a resume point every N optimizer steps (unset: only by time and on SIGTERM).",
        _number(1, integer=True, allow=(None,))),
    "env.checkpoint_every_n_minutes": Hyperparameter(
        5.0, "Take a resume point at least this often in minutes (unset: only by steps and on SIGTERM); "
        "it is written in the background, so training stalls only while the state is copied.",
        _number(0.001, allow=(None,))),
    "env.checkpoint_keep": Hyperparameter(
        2, "Resume points kept: the newest N (the older ones are fallbacks for a damaged newest one).",
        _number(1, 100, integer=True)),
}


def registry_key(key: str) -> str:
    """The registry key of `key`: a repeated family's options (model.timm_image_1.image_size) are its
    family's (model.timm_image.image_size)."""
    parts = key.split(".")
    if len(parts) == 3 and parts[0] == "model":
        family = family_of(parts[1])
        if family is not None and family.prefix != parts[1]:
            return f"model.{family.prefix}.{parts[2]}"
    return key


def validate_hyperparameters(hyperparameters: dict[str, Any] | None) -> dict[str, Any]:
    """Checks user hyperparameters and returns them merged over the defaults.

    Raises HyperparameterError naming the first bad key.
    """
    merged = {key: spec.default for key, spec in HYPERPARAMETERS.items()}
    for key, value in (hyperparameters or {}).items():
        if registry_key(key) not in HYPERPARAMETERS:
            close = difflib.get_close_matches(key, HYPERPARAMETERS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {sorted(HYPERPARAMETERS)}"
            raise HyperparameterError(key, f"unknown hyperparameter; {hint}")
        problem = HYPERPARAMETERS[registry_key(key)].check(value)
        if problem:
            raise HyperparameterError(key, problem)
        merged[key] = value
    return merged


# How a run trained before these keys existed. A saved predictor stores every key there was (the
# defaults included), so a key missing there is one it predates: it goes on as it started.
EARLIER_BEHAVIOUR = {"optim.lr_choice": "single_stage", "optim.top_k": 1, "optim.top_k_average_method": "best"}


def stored_hyperparameters(stored: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters of a saved predictor, merged over the defaults as `validate_hyperparameters`
    does, the keys it predates at their EARLIER_BEHAVIOUR."""
    return validate_hyperparameters({**EARLIER_BEHAVIOUR, **stored})


def hyperparameter_problems(hyperparameters: dict[str, Any] | None) -> list[HyperparameterError]:
    """Every problem at once, for `kontinue validate` and the pydantic models."""
    problems = []
    for key, value in (hyperparameters or {}).items():
        try:
            validate_hyperparameters({key: value})
        except HyperparameterError as error:
            problems.append(error)
    return problems

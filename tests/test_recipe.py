"""AutoMM's training recipe: layer ids and learning rates per parameter group, the schedules, model
soups of the top_k candidates, and what a fit makes of them (model.ckpt, candidates/, resume)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from kontinue.api.hyperparameters import (EARLIER_BEHAVIOUR, HyperparameterError, stored_hyperparameters,
                                          validate_hyperparameters)
from kontinue.trainer.augment import OPERATIONS, TrivialAugment
from kontinue.trainer.backbones.timm_image import TimmImageBackbone, TimmImageOptions
from kontinue.trainer.columns import column_roles
from kontinue.trainer.model import build_module, select_models
from kontinue.trainer.module import PredictorModule
from kontinue.trainer.optimization import decayed_parameter_names, encoder_layer_ids, schedule
from kontinue.trainer.predictor import Predictor
from kontinue.trainer.problem import Problem
from kontinue.trainer.soup import make_soup
from kontinue.api.contract import PREEMPTED_EXIT_CODE
from tests.test_resume import assert_same_outcome, finish, read_status
from tests.trainer_fixtures import Trainer, has_no_resume_points, resume_points, training_run


@pytest.fixture(scope="module")
def minilm_module(minilm_path, reviews):
    """MiniLM (6 layers) with a binary head, as a fit builds it."""
    hp = validate_hyperparameters({"model.hf_text.checkpoint_name": minilm_path})
    data = reviews[:32]
    problem = Problem.from_data("label", data, None, None)
    columns = select_models(hp["model.names"], column_roles(data, ["label"]), problem.problem_type)
    return build_module(hp, problem, columns, data)


def lr_of(optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> dict[str, tuple[float, float]]:
    """parameter name -> (peak learning rate, weight decay) of its optimizer group."""
    by_id = {id(p): (g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    return {name: by_id[id(p)] for name, p in module.named_parameters() if id(p) in by_id}


def test_layer_ids_count_from_the_head_down_to_the_embeddings_as_automm_does(minilm_module):
    ids = minilm_module.layer_ids()
    encoder = "backbones.hf_text.encoder."
    assert ids[encoder + "encoder.layer.5.output.dense.weight"] == 1
    assert ids[encoder + "encoder.layer.0.attention.self.query.weight"] == 6
    assert ids[encoder + "embeddings.word_embeddings.weight"] == ids[encoder + "embeddings.LayerNorm.weight"] == 7
    assert ids[encoder + "pooler.dense.weight"] == 0
    assert set(ids) == {n for n, _ in minilm_module.named_parameters() if not n.startswith("head.")}


def test_an_unfamiliar_layout_gets_one_id_for_all_as_in_automm():
    names = ["model.stem.weight", "model.mystery.weight", "model.blocks.0.weight"]
    assert encoder_layer_ids(names, "model", ("stem",), ("head",)) == dict.fromkeys(names, 0)
    names = ["model.blocks.0.a", "model.blocks.0.b", "model.blocks.1.a", "model.norm.weight", "outside.w"]
    assert encoder_layer_ids(names, "model", ("stem",), ("norm",)) == {
        "model.blocks.0.a": 2, "model.blocks.0.b": 2, "model.blocks.1.a": 1, "model.norm.weight": 0, "outside.w": 0}


@pytest.mark.parametrize("choice", ["layerwise_decay", "two_stages", "single_stage"])
def test_learning_rates_and_weight_decay_per_parameter(minilm_module, choice):
    hp = validate_hyperparameters({"optim.lr_choice": choice, "optim.lr": 1e-3, "optim.lr_decay": 0.8,
                                   "optim.lr_mult": 10, "optim.weight_decay": 0.01})
    minilm_module.hyperparameters = hp
    minilm_module.total_steps = 100
    optimizer = minilm_module.configure_optimizers()["optimizer"]
    rates = lr_of(optimizer, minilm_module)
    assert set(rates) == {n for n, p in minilm_module.named_parameters() if p.requires_grad}
    encoder = "backbones.hf_text.encoder."
    head, top, bottom = rates["head.weight"], rates[encoder + "encoder.layer.5.output.dense.weight"], \
        rates[encoder + "embeddings.word_embeddings.weight"]
    expected = {"layerwise_decay": (1e-3, 1e-3 * 0.8, 1e-3 * 0.8 ** 7), "two_stages": (1e-2, 1e-3, 1e-3),
                "single_stage": (1e-3, 1e-3, 1e-3)}[choice]
    assert [r for r, _ in (head, top, bottom)] == pytest.approx(expected)
    assert rates[encoder + "pooler.dense.weight"][0] == pytest.approx(expected[0])  # layer id 0, as the head
    # weights decay; biases and normalisation layers do not
    assert head[1] == top[1] == 0.01
    assert rates["head.bias"][1] == rates[encoder + "embeddings.LayerNorm.weight"][1] == 0.0
    assert encoder + "encoder.layer.0.output.LayerNorm.weight" not in decayed_parameter_names(minilm_module)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert {(g["eps"], g["betas"]) for g in optimizer.param_groups} == {(1e-6, (0.9, 0.999))}, "AutoMM's constants"


def test_heads_start_as_automm_starts_them(minilm_module):
    """Xavier-uniform with zero biases over hf_text (and fused or tabular features); torch's default
    over a timm model alone, as AutoMM's timm head."""
    head = minilm_module.head
    bound = math.sqrt(6 / (head.in_features + head.out_features))
    assert not head.bias.any() and head.weight.abs().max() <= bound
    timm = TimmImageBackbone("timm_image", TimmImageOptions("test_resnet", image_size=32), ["image"])
    hp = validate_hyperparameters({"model.names": ["timm_image"]})
    alone = PredictorModule({"timm_image": timm}, minilm_module.problem, hp).head
    assert alone.bias.any(), "torch's default draws the bias too"


@pytest.mark.parametrize("name, at_half, at_end", [
    ("cosine_decay", 0.5, 0.0), ("linear_decay", 0.5, 0.0), ("polynomial_decay", 0.55, 0.1), ("constant", 1.0, 1.0)])
def test_schedules_warm_up_from_zero_then_decay(name, at_half, at_end):
    hp = validate_hyperparameters({"optim.lr_schedule": name, "optim.warmup_steps": 0.1, "optim.lr": 1.0,
                                   "optim.end_lr": 0.1})
    factor = schedule(hp, 111)  # 11 steps of warm-up, 100 of decay
    assert [factor(0), factor(5), factor(11)] == pytest.approx([0.0, 5 / 11, 1.0])
    assert factor(11 + 50) == pytest.approx(at_half)
    assert factor(111) == pytest.approx(at_end) and factor(500) == pytest.approx(at_end)
    assert schedule({**hp, "optim.warmup_steps": 20}, 111)(10) == pytest.approx(0.5)  # above 1: steps


@pytest.mark.parametrize("key, value, message", [
    ("optim.lr_choice", "layerwise", "must be one of"), ("optim.lr_decay", 1.5, "must be <= 1"),
    ("optim.top_k", 0, "must be >= 1"), ("optim.top_k_average_method", "soup", "must be one of"),
    ("optim.lr_schedule", "multi_step", "must be one of"), ("optim.gradient_clip_algorithm", "l2", "must be one of")])
def test_bad_recipe_values_are_refused_with_the_key_named(key, value, message):
    with pytest.raises(HyperparameterError, match=rf"hyperparameters\.{key}: {message}"):
        validate_hyperparameters({key: value})


def test_a_predictor_saved_before_the_recipe_keys_existed_goes_on_as_it_started():
    """Its stored hyperparameters hold every key of its time: a missing one keeps its earlier behaviour
    (one learning rate, model.ckpt the best state), so its optimizer state still fits on resume."""
    stored = {key: value for key, value in validate_hyperparameters({}).items() if key not in EARLIER_BEHAVIOUR}
    assert {key: stored_hyperparameters(stored)[key] for key in EARLIER_BEHAVIOUR} == EARLIER_BEHAVIOUR
    assert stored_hyperparameters(validate_hyperparameters({}))["optim.lr_choice"] == "layerwise_decay"


def test_the_recipe_is_in_the_crd():
    text = (Path(__file__).parent.parent / "crds" / "kontinue.dev_trainingruns.yaml").read_text()
    for key in ("optim.lr_choice", "optim.lr_decay", "optim.lr_mult", "optim.top_k", "optim.top_k_average_method",
                "optim.end_lr", "optim.check_val_every_n_epoch"):
        assert key in text, key


def states(*values: float) -> list[dict[str, torch.Tensor]]:
    return [{"w": torch.tensor([v], dtype=torch.float32), "n": torch.tensor([7])} for v in values]


def test_uniform_soup_is_the_mean_and_best_is_the_first():
    candidates = [{"step": s, "score": sc} for s, sc in ((30, 0.9), (10, 0.8), (20, 0.7))]
    ingredients = dict(zip((30, 10, 20), states(1.0, 2.0, 6.0)))
    soup = make_soup(candidates, "uniform_soup", lambda c: ingredients[c["step"]], None, True)
    assert soup.steps == [30, 10, 20] and soup.state["w"].item() == 3.0 and soup.state["w"].dtype == torch.float32
    assert soup.state["n"].item() == 7
    best = make_soup(candidates, "best", lambda c: ingredients[c["step"]], None, True)
    assert best.steps == [30] and best.state["w"].item() == 1.0 and best.score == 0.9


def test_greedy_soup_keeps_a_candidate_only_if_the_mean_with_it_scores_at_least_as_well():
    candidates = [{"step": s, "score": sc} for s, sc in ((1, 0.90), (2, 0.85), (3, 0.80), (4, 0.79))]
    ingredients = dict(zip((1, 2, 3, 4), states(1.0, 3.0, 100.0, 2.0)))
    scored = []

    def score(state):  # the closer to 2.0, the better; the 100.0 one spoils any mean
        scored.append(state["w"].item())
        return 0.95 - abs(state["w"].item() - 2.0) / 100

    soup = make_soup(candidates, "greedy_soup", lambda c: ingredients[c["step"]], score, True)
    assert scored == [2.0, pytest.approx(104 / 3), 2.0]
    assert soup.steps == [1, 2, 4] and soup.state["w"].item() == 2.0 and soup.score == 0.95
    lower = make_soup(candidates, "greedy_soup", lambda c: ingredients[c["step"]], lambda s: 1.0, False)
    assert lower.steps == [1]  # a loss of 1.0 is worse than 0.9: nothing joins


def test_a_fit_averages_its_best_states_into_model_ckpt_and_keeps_no_candidates(tmp_path, reviews, tiny_bert):
    data = reviews[:160].reset_index(drop=True)
    hp = {"model.hf_text.checkpoint_name": tiny_bert, "optim.max_epochs": 2, "env.per_gpu_batch_size": 8,
          "env.batch_size": 16, "optim.lr": 1e-3, "optim.val_check_interval": 0.25,
          "optim.top_k_average_method": "uniform_soup"}
    predictor = Predictor(label="label", path=str(tmp_path / "run"), verbosity=0)
    predictor.fit(data[:128], tuning_data=data[128:], hyperparameters=hp, seed=3)
    best = torch.load(tmp_path / "run" / "model.ckpt", weights_only=True)
    assert best["soup"]["method"] == "uniform_soup" and len(best["soup"]["steps"]) == 3
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["bestScore"] == best["score"] and math.isfinite(best["score"])
    assert has_no_resume_points(tmp_path / "run")
    # the predictor holds the soup: its scores on the tuning data are model.ckpt's
    assert predictor.evaluate(data[128:])[predictor.problem.eval_metric] == pytest.approx(best["score"])
    assert isinstance(predictor.predict(pd.DataFrame({"text": ["fine"]})), pd.Series)


@pytest.fixture(scope="module")
def soup_reference(tmp_path_factory, tiny_bert, review_tables) -> tuple[dict, Path]:
    """A run whose model.ckpt is always a soup (uniform, of 3 of 8 validated states), never interrupted."""
    workdir = tmp_path_factory.mktemp("soup-reference")
    manifest = training_run("soup", str(workdir / "store"), review_tables, tiny_bert, hyperparameters={
        "optim.top_k_average_method": "uniform_soup", "optim.val_check_interval": 0.25})
    run_dir = workdir / "store" / "tests" / "soup"
    attempt = Trainer(workdir).attempt(manifest, str(run_dir))
    assert attempt.exit_code == 0, attempt.output[-3000:]
    return manifest, run_dir


def test_sigterm_at_random_steps_with_top_k_averaging_ends_with_a_bit_identical_model_ckpt(soup_reference, tmp_path):
    manifest, reference_dir = soup_reference
    total = read_status(reference_dir)["finalState"]["step"]
    harness, run_dir = Trainer(tmp_path), tmp_path / "store" / "tests" / "soup"
    seed = random.randrange(1 << 30)
    rng, stopped_at, named = random.Random(seed), 0, set()
    for _ in range(3):
        # Targets within the first two thirds: a stop lands a step or two after its target.
        stop_after = max(stopped_at + 1, min(stopped_at + rng.randint(2, 7), 2 * total // 3))
        attempt = harness.attempt(manifest, str(run_dir), preempt_after_step=stop_after)
        assert attempt.exit_code == PREEMPTED_EXIT_CODE, f"seed {seed}:\n{attempt.output[-3000:]}"
        stopped_at = read_status(run_dir)["lastCheckpoint"]["step"]
        assert stopped_at < total, f"seed {seed}: the run finished before it could be preempted"
        kept = {key for point in resume_points(run_dir) for key in point["candidates"]}
        assert all((run_dir / key).exists() for key in kept), f"seed {seed}: a kept point's candidate is gone"
        named |= kept
    assert named, f"seed {seed}: no resume point kept a candidate; the test did not test that"
    finish(harness, manifest, run_dir)

    status = assert_same_outcome(run_dir, reference_dir)  # finalState, metrics and model.ckpt's weights
    ours, theirs = (torch.load(d / "model.ckpt", weights_only=True) for d in (run_dir, reference_dir))
    assert ours["soup"] == theirs["soup"] and len(ours["soup"]["steps"]) == 3 and ours["score"] == theirs["score"]
    assert [a["outcome"] for a in status["attempts"]] == ["preempted"] * 3 + ["completed"]
    assert has_no_resume_points(run_dir)


def test_trivial_augment_is_automms_mild_one_and_repeats_under_a_seed():
    """AutoMM's operations and ranges (rotations within 30 degrees, shifts within 10 pixels), not
    torchvision's TrivialAugmentWide; each draw from torch's RNG, which the loader seeds per sample."""
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
    for operation in OPERATIONS:
        for level in (0.0, 0.5, 1.0):
            out = operation(image, level)
            assert out.size == image.size and out.mode == "RGB"
    marker = Image.new("RGB", (64, 64))
    marker.putpixel((32, 10), (255, 255, 255))
    shifted = np.argwhere(np.asarray(OPERATIONS[-1](marker, 1.0))[..., 0] > 0)
    assert [abs(r - 10) for r, _ in shifted] == [10], "the strongest shift is 10 pixels"

    def draws(seed: int) -> list[np.ndarray]:
        torch.manual_seed(seed)
        return [np.asarray(TrivialAugment()(image)) for _ in range(30)]
    assert all((a == b).all() for a, b in zip(draws(1), draws(1)))
    assert TimmImageBackbone("timm_image", TimmImageOptions("test_resnet", image_size=32), ["image"]) \
        .processor._transform(training=True).transforms[2].__class__ is TrivialAugment

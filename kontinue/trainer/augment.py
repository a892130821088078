"""AutoMM's TrivialAugment for images (Müller and Hutter 2021, with AutoMM's operations and
ranges): milder than torchvision's TrivialAugmentWide, which rotates up to 135 degrees and shifts
up to 32 pixels; here rotations stay within 30 degrees, shears within 0.3, shifts within 10 pixels.
Every draw comes from torch's RNG, which the loader seeds per sample, so augmentation is part of the
exactly resumed state."""

from __future__ import annotations

from typing import Callable

import torch
from PIL import Image, ImageEnhance, ImageOps

STRENGTHS = 30  # a strength is drawn from 0/30 .. 30/30 of each operation's range


def _signed(value: float) -> float:
    return -value if torch.rand(()) < 0.5 else value


def _enhance(enhancer: type) -> Callable[[Image.Image, float], Image.Image]:
    return lambda image, level: enhancer(image).enhance(0.1 + 1.7 * level)


def _affine(coefficients: Callable[[float], tuple[float, ...]]) -> Callable[[Image.Image, float], Image.Image]:
    return lambda image, level: image.transform(image.size, Image.AFFINE, coefficients(level))


OPERATIONS: tuple[Callable[[Image.Image, float], Image.Image], ...] = (
    lambda image, level: image,
    lambda image, level: ImageOps.autocontrast(image),
    lambda image, level: ImageOps.equalize(image),
    lambda image, level: image.rotate(_signed(int(30 * level))),
    lambda image, level: ImageOps.solarize(image, 256 - int(256 * level)),
    _enhance(ImageEnhance.Color),
    lambda image, level: ImageOps.posterize(image, max(1, 4 - int(4 * level))),  # Pillow refuses 0 bits
    _enhance(ImageEnhance.Contrast),
    _enhance(ImageEnhance.Brightness),
    _enhance(ImageEnhance.Sharpness),
    _affine(lambda level: (1, _signed(0.3 * level), 0, 0, 1, 0)),
    _affine(lambda level: (1, 0, 0, _signed(0.3 * level), 1, 0)),
    _affine(lambda level: (1, 0, _signed(int(10 * level)), 0, 1, 0)),
    _affine(lambda level: (1, 0, 0, 0, 1, _signed(int(10 * level)))),
)


class TrivialAugment:
    """One operation drawn uniformly, at a strength drawn uniformly."""

    def __call__(self, image: Image.Image) -> Image.Image:
        operation = OPERATIONS[int(torch.randint(len(OPERATIONS), ()))]
        return operation(image, int(torch.randint(STRENGTHS + 1, ())) / STRENGTHS)

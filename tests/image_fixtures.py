"""Offline images: scikit-learn's handwritten digits written as PNG files (paths and bytes), and
rows that mix a digit image, a text, a number and a category for fusion models."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digit_png(pixels: np.ndarray, size: int = 32) -> bytes:
    """An 8x8 digit (0..16) as an RGB PNG of `size` pixels."""
    image = Image.fromarray((pixels * 255 / 16).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def digit_table(root: Path, count: int = 400, seed: int = 0) -> pd.DataFrame:
    """`count` digits as PNG files under `root`: columns image (path), image_bytes, label (0..9),
    parity ("even"/"odd"), ink (a number), caption (a text with the digit's word in it)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))[:count]
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for position, index in enumerate(order):
        data = digit_png(digits.images[index])
        path = root / f"digit-{position:04d}.png"
        path.write_bytes(data)
        label = int(digits.target[index])
        rows.append({"image": str(path), "image_bytes": data, "label": label, "parity": "even odd".split()[label % 2],
                     "ink": float(digits.images[index].sum()), "caption": f"a handwritten {WORDS[label]}"})
    return pd.DataFrame(rows)


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> pd.DataFrame:
    return digit_table(tmp_path_factory.mktemp("digits"))

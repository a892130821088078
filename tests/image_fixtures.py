"""Offline images: scikit-learn's handwritten digits as PNG files and bytes, with a caption, a number
and a category per row for fusion models (examples/prepare_digits.py makes them)."""

from __future__ import annotations

import pandas as pd
import pytest

from examples.prepare_digits import digit_table


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> pd.DataFrame:
    """400 digits: image (a PNG path), image_bytes, label, parity, ink, caption."""
    return digit_table(tmp_path_factory.mktemp("digits"), count=400)


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> pd.DataFrame:
    """160 generated 64x64 images of squares and circles: image (a PNG path), rois (their boxes)."""
    from examples.prepare_shapes import shape_table

    return shape_table(tmp_path_factory.mktemp("shapes"), count=160)

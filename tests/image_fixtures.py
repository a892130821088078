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

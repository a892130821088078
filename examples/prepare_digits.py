"""Prepares the digits examples (timm image, fusion, transfer) for a run on this machine.

scikit-learn's 1,797 handwritten digits (8x8, shipped with the package) become PNG images: the
tables hold each image as bytes (so they need no image files beside them), a caption naming the
digit, its ink (a number) and its parity (a category). Writes train / validation / test parquet
files and copies of the digits-*.yaml manifests whose paths point at them.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

HERE = Path(__file__).parent
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
MANIFESTS = ("digits-timm.yaml", "digits-fusion.yaml", "transfer-digits-ink.yaml")


def digit_png(pixels: np.ndarray, size: int = 32) -> bytes:
    """An 8x8 digit (values 0..16) as an RGB PNG of `size` pixels."""
    image = Image.fromarray((pixels * 255 / 16).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def digit_table(image_dir: Path | None = None, count: int | None = None, seed: int = 0, size: int = 32) -> pd.DataFrame:
    """Digits in a shuffled order: columns image_bytes, label (0..9), parity ("even"/"odd"), ink (a
    number) and caption (a text naming the digit); with `image_dir`, also image (a PNG file's path)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))[:count]
    if image_dir is not None:
        image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for position, index in enumerate(order):
        data, label = digit_png(digits.images[index], size), int(digits.target[index])
        row = {"image_bytes": data, "label": label, "parity": ("even", "odd")[label % 2],
               "ink": float(digits.images[index].sum()), "caption": f"a handwritten {WORDS[label]}"}
        if image_dir is not None:
            path = image_dir / f"digit-{position:04d}.png"
            path.write_bytes(data)
            row = {"image": str(path), **row}
        rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=HERE / "data")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs the local runs may use")
    args = parser.parse_args()
    out = args.out.absolute()
    tables = out / "digits"
    tables.mkdir(parents=True, exist_ok=True)
    digits = digit_table()
    bounds = {"train": (0, 1200), "validation": (1200, 1450), "test": (1450, len(digits))}
    for name, (start, stop) in bounds.items():
        digits[start:stop].reset_index(drop=True).to_parquet(tables / f"{name}.parquet")
    for manifest_name in MANIFESTS:
        manifest = yaml.safe_load((HERE / manifest_name).read_text())
        spec = manifest["spec"]
        spec["data"] = {name: str(tables / f"{name}.parquet") for name in spec["data"]}
        spec["checkpoint"] = {"storage": str(out / "store"), "intervalMinutes": 1}
        spec["resources"] = {"gpus": args.gpus}
        spec.pop("volumes", None)  # this machine's paths need none
        local = out / manifest_name.replace(".yaml", ".local.yaml")
        local.write_text("# Written by prepare_digits.py: the example with this machine's paths.\n"
                         + yaml.safe_dump(manifest, sort_keys=False))
        print(f"manifest for this machine: {local}")


if __name__ == "__main__":
    main()

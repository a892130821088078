"""Generated detection data: squares and circles on a plain background, with their boxes known
exactly: AutoMM's detection table (image, rois) for tests, and as a script the COCO files and a
copy of shapes-detection.yaml with this machine's paths."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image, ImageDraw

HERE = Path(__file__).parent
CLASSES = ("square", "circle")


def shape_table(image_dir: Path, count: int, seed: int = 0, size: int = 64) -> pd.DataFrame:
    """`count` PNG images of `size` pixels under `image_dir`, each with one or two shapes: columns
    image (the file's path) and rois ([[x1, y1, x2, y2, "square" | "circle"], ...])."""
    rng = np.random.default_rng(seed)
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        background = tuple(int(v) for v in rng.integers(0, 80, 3))
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        boxes = []
        for _ in range(int(rng.integers(1, 3))):
            side = int(rng.integers(size // 5, size // 2))
            x1, y1 = (int(v) for v in rng.integers(0, size - side, 2))
            kind = CLASSES[int(rng.integers(0, 2))]
            colour = tuple(int(v) for v in rng.integers(150, 256, 3))
            (draw.rectangle if kind == "square" else draw.ellipse)([x1, y1, x1 + side - 1, y1 + side - 1], fill=colour)
            boxes.append([x1, y1, x1 + side, y1 + side, kind])
        path = image_dir / f"shapes-{index:04d}.png"
        image.save(path)
        rows.append({"image": str(path), "rois": boxes})
    return pd.DataFrame(rows)


def to_coco(table: pd.DataFrame, path: Path) -> None:
    """The table as a COCO detection file, image file names relative to its folder."""
    categories = [{"id": index + 1, "name": name} for index, name in enumerate(CLASSES)]
    ids = {name: index + 1 for index, name in enumerate(CLASSES)}
    images, annotations = [], []
    for image_id, row in enumerate(table.itertuples(), start=1):
        with Image.open(row.image) as image:
            width, height = image.size
        images.append({"id": image_id, "file_name": str(Path(row.image).relative_to(path.parent)),
                       "width": width, "height": height})
        for x1, y1, x2, y2, name in row.rois:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": ids[name],
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=HERE / "data")
    args = parser.parse_args()
    root = args.out.absolute() / "shapes"
    table = shape_table(root / "images", 300)
    for name, part in (("train", table[:240]), ("validation", table[240:])):
        to_coco(part, root / f"{name}.json")
        print(f"wrote {root / f'{name}.json'}")
    manifest = yaml.safe_load((HERE / "shapes-detection.yaml").read_text())
    spec = manifest["spec"]
    spec["data"] = {name: str(root / f"{name}.json") for name in spec["data"]}
    spec["checkpoint"] = {"storage": str(args.out.absolute() / "store"), "intervalMinutes": 1}
    spec["resources"] = {"gpus": 0}
    spec.pop("volumes", None)  # this machine's paths need none
    local = args.out.absolute() / "shapes-detection.local.yaml"
    local.write_text("# Written by prepare_shapes.py: the example with this machine's paths.\n"
                     + yaml.safe_dump(manifest, sort_keys=False))
    print(f"manifest for this machine: {local}")


if __name__ == "__main__":
    main()

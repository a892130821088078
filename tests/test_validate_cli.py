"""`kontinue validate`: exit codes and problems named FILE:DOC: KIND/NAME: field.path: message."""

import io
import subprocess
import sys
from pathlib import Path

import yaml

from kontinue.cli import main

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = Path(__file__).parent / "manifests"
GOOD = [str(MANIFESTS / "valid-trainingrun.yaml"), str(MANIFESTS / "valid-transferrun.yaml")]
BAD = str(MANIFESTS / "invalid-runs.yaml")
BAD_LINES = [
    f"{BAD}:1: TrainingRun/typos: spec.task.problemType: ",
    f"{BAD}:1: TrainingRun/typos: spec.hyperparameters.optim.lrr: unknown hyperparameter",
    f"{BAD}:1: TrainingRun/typos: spec.hyperparameters.optim.max_epochs: ",
    f"{BAD}:1: TrainingRun/typos: spec.checkpoint.intervalSteps: ",
    f"{BAD}:1: TrainingRun/typos: spec.colour: unknown field",
    f"{BAD}:2: ConfigMap/unrelated: skipped",
    f"{BAD}:3: TransferRun/two-sources: spec.data.train: ",
    f"{BAD}:3: TransferRun/two-sources: spec.source: give exactly one of trainingRun or modelUri",
    f"{BAD}:3: TransferRun/two-sources: spec.checkpoint: checkpoint.secretRef is required",
]


def test_good_files_pass(capsys):
    assert main(["validate", *GOOD]) == 0
    out = capsys.readouterr().out
    assert f"{GOOD[0]}:1: Secret/minio-credentials: skipped" in out
    assert f"{GOOD[0]}:2: TrainingRun/petfinder-adoption: valid" in out
    assert f"{GOOD[1]}:1: TransferRun/sts-from-sst: valid" in out


def test_examples_are_valid(capsys):
    examples = sorted(str(path) for path in (ROOT / "examples").glob("*.yaml"))
    assert main(["validate", *examples]) == 0, capsys.readouterr().out
    assert capsys.readouterr().out.count(": valid") == len(examples) >= 5


def test_the_digits_examples_prepare_tables_and_local_manifests_that_validate(tmp_path, capsys):
    subprocess.run([sys.executable, str(ROOT / "examples" / "prepare_digits.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    local = sorted(str(path) for path in tmp_path.glob("*.local.yaml"))
    assert len(local) == 3 and main(["validate", *local]) == 0, capsys.readouterr().out
    import pandas as pd

    train = pd.read_parquet(tmp_path / "digits" / "train.parquet")
    assert list(train.columns) == ["image_bytes", "label", "parity", "ink", "caption"] and len(train) == 1200
    assert train["image_bytes"].map(lambda data: data[:4] == b"\x89PNG").all()


def test_the_shapes_example_prepares_coco_files_and_a_local_manifest(tmp_path, capsys):
    subprocess.run([sys.executable, str(ROOT / "examples" / "prepare_shapes.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    assert main(["validate", str(tmp_path / "shapes-detection.local.yaml")]) == 0, capsys.readouterr().out
    from kontinue.trainer.data import read_table

    table = read_table(str(tmp_path / "shapes" / "train.json"))
    assert list(table.columns) == ["image", "rois"] and len(table) == 240
    assert all(Path(path).is_file() for path in table["image"])
    assert all(box[4] in ("square", "circle") and box[2] > box[0] for rois in table["rois"] for box in rois)


def test_bad_file_names_every_field(capsys):
    assert main(["validate", GOOD[1], BAD]) == 1
    lines = capsys.readouterr().out.splitlines()
    for expected in BAD_LINES:
        assert any(line.startswith(expected) for line in lines), expected
    assert not any("(CRD schema)" in line for line in lines)  # the models found everything first


def test_unreadable_input_exits_2(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: TrainingRun\nspec: [unclosed\n")
    assert main(["validate", str(broken), GOOD[1]]) == 2
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    captured = capsys.readouterr()
    assert "broken.yaml: cannot read" in captured.err and "sts-from-sst: valid" in captured.out


def test_stdin_and_non_objects(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("- just\n- a list\n---\n"))
    assert main(["validate", "-"]) == 1
    assert "<stdin>:1: not a Kubernetes object" in capsys.readouterr().out


def test_module_entry_point():
    def run(*args, **kwargs):
        return subprocess.run([sys.executable, "-m", "kontinue", "validate", *args], cwd=ROOT,
                              capture_output=True, text=True, **kwargs)

    bad = run(BAD)
    assert bad.returncode == 1, bad.stderr
    assert all(any(line.startswith(expected) for line in bad.stdout.splitlines()) for expected in BAD_LINES)
    good = run("-", input=Path(GOOD[1]).read_text())
    assert good.returncode == 0 and "<stdin>:1: TransferRun/sts-from-sst: valid" in good.stdout


def test_in_cluster_also_reports_paths_that_no_volume_holds(tmp_path, capsys):
    document = yaml.safe_load(Path(GOOD[1]).read_text())
    document["spec"]["volumes"] = document["spec"]["volumes"][:1]  # the data only: no /checkpoints
    unmounted = tmp_path / "unmounted.yaml"
    unmounted.write_text(yaml.safe_dump(document))
    assert main(["validate", str(unmounted)]) == 0, "paths are fine on this machine"
    assert main(["validate", "--in-cluster", *GOOD]) == 0
    capsys.readouterr()
    assert main(["validate", "--in-cluster", str(unmounted)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{unmounted}:1: TransferRun/sts-from-sst: spec.checkpoint.storage: /checkpoints is on no "
                     "volume: the trainer pod's root filesystem is read-only; mount a PersistentVolumeClaim "
                     "there with spec.volumes"]

"""The status line a trainer pod prints and the operator reads from its log."""

from __future__ import annotations

import json
import math

from kontinue.api.reports import MAX_WARNINGS, last_status, status_line
from kontinue.operator.reconcile import reported_status

TRAINER_STATUS = {  # status.json as the trainer keeps it
    "phase": "Running", "step": 40, "epoch": 1, "progress": 0.4213, "updated": "2026-11-22T12:00:00+00:00",
    "lastCheckpoint": {"uri": "s3://runs/ml/sst/last.ckpt", "step": 40, "sha256": "ab" * 32},
    "bestCheckpoint": {"uri": "s3://runs/ml/sst/model.ckpt", "score": 0.81, "metric": "accuracy"},
    "metrics": {"accuracy": 0.81}, "attempts": [{"fromStep": 0}],
    "warnings": [{"time": "t", "message": f"warning {i}"} for i in range(12)],
}


def test_a_status_line_survives_the_log_around_it():
    log = "\n".join([
        "2026-11-22 INFO kontinue.trainer: resume point saved at step 20",
        status_line({**TRAINER_STATUS, "step": 20, "progress": 0.2}),
        "Writing model shards: 100%|██████████| 1/1\r",
        status_line(TRAINER_STATUS),
        "kontinue-status: {\"step\": 41, \"progr",  # cut by a log rotation: skipped
        "Traceback (most recent call last):",
    ])
    report = last_status(log)
    assert report["step"] == 40 and report["progress"] == 0.4213
    assert report["lastCheckpoint"] == TRAINER_STATUS["lastCheckpoint"]
    assert report["warnings"] == [f"warning {i}" for i in range(12 - MAX_WARNINGS, 12)]
    assert "attempts" not in report, "only what the run's status shows travels"
    assert last_status("no status here\n") is None and last_status("") is None


def test_the_operator_copies_only_what_changed():
    report = json.loads(status_line(TRAINER_STATUS).partition(": ")[2])
    update = reported_status(report, {"metrics": {"accuracy": 0.81}})
    assert update["progress"] == "42%" and update["progressRatio"] == 0.4213
    assert update["lastCheckpoint"]["step"] == 40 and update["bestCheckpoint"]["score"] == 0.81
    assert "metrics" not in update
    assert reported_status(report, {**update, "metrics": {"accuracy": 0.81}}) == {}
    assert reported_status(None, {}) == {}


def test_a_diverged_run_prints_strict_json_and_the_operator_reports_what_is_not_a_number():
    diverged = {**TRAINER_STATUS, "progress": math.inf, "metrics": {"accuracy": 0.5, "val_loss": math.nan},
                "bestCheckpoint": {**TRAINER_STATUS["bestCheckpoint"], "score": -math.inf}}
    line = status_line(diverged)

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    printed = json.loads(line.partition(": ")[2], parse_constant=refuse)  # what jq and Go's encoding/json accept
    assert printed["metrics"] == {"accuracy": 0.5, "val_loss": "NaN"} and printed["progress"] == "Infinity"
    assert printed["bestCheckpoint"]["score"] == "-Infinity"

    report = last_status(line)
    assert math.isnan(report["metrics"]["val_loss"]) and report["progress"] == math.inf
    update = reported_status(report, {"metrics": {"accuracy": 0.4, "val_loss": 0.7}, "progressRatio": 0.3})
    json.dumps(update, allow_nan=False)
    assert update["metrics"] == {"accuracy": 0.5, "val_loss": None}, "None: the merge patch removes the stale loss"
    assert "score" not in update["bestCheckpoint"] and "progressRatio" not in update
    assert [w.split(" (")[0] for w in update["warnings"] if "JSON cannot carry it" in w] == [
        "progress is inf", "bestCheckpoint.score is -inf", "metric val_loss is NaN"]

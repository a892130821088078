"""The trainer's last word and its numbers as the operator and strict JSON readers get them: the
termination message always valid JSON within the 4 KiB Kubernetes keeps (bytes, not characters),
and NaN or infinite numbers as strings no JSON reader refuses, floats again for Python readers."""

from __future__ import annotations

import datetime as dt
import json
import math

import pytest

from kontinue.api.reports import NON_FINITE, TERMINATION_MESSAGE_BYTES, dumps, loads, termination_message
from kontinue.operator.verdicts import FAILED, PREEMPTED, SUCCEEDED, judge_pod

NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.timezone.utc)
CHECKPOINT = {"uri": "s3://runs/ckpt/ml/sst/last.ckpt", "step": 40, "epoch": 1, "sha256": "ab" * 32,
              "time": "2026-11-22T12:00:00+00:00"}
PREEMPTED_WORD = {"result": "preempted", "step": 40, "run_dir": "s3://runs/ckpt/ml/sst", "model": None,
                  "checkpoint": CHECKPOINT, "dump": None, "scores": {"accuracy": 0.81}, "test_scores": {},
                  "message": None}


def strict_json(text: str | bytes):
    """What jq, Go's encoding/json and kubectl accept: JSON without NaN or Infinity."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def terminated_pod(message: bytes, exit_code: int) -> dict:
    """The trainer pod as the kubelet reports it, its termination message decoded as UTF-8."""
    terminated = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                  "message": message.decode("utf-8")}
    return {"metadata": {"name": "sst-1", "uid": "pod-sst-1", "creationTimestamp": NOW.isoformat()},
            "status": {"phase": "Succeeded" if exit_code == 0 else "Failed",
                       "containerStatuses": [{"name": "trainer", "state": {"terminated": terminated}}]}}


def test_an_outcome_that_fits_is_written_whole():
    message = termination_message(PREEMPTED_WORD)
    assert strict_json(message) == PREEMPTED_WORD and "shortened" not in strict_json(message)


def test_a_huge_message_is_shortened_and_the_operator_still_reads_the_resume_point():
    word = {**PREEMPTED_WORD, "result": "superseded", "message": "uid 1234 holds the run directory; " * 5000}
    message = termination_message(word)
    assert len(message) <= TERMINATION_MESSAGE_BYTES
    read = strict_json(message)
    assert read["shortened"] == ["message"]
    assert read["message"].startswith("uid 1234 holds the run directory; ")
    assert read["message"].endswith(f"... [shortened from {len(word['message'])} bytes]")
    assert {key: read[key] for key in ("result", "step", "checkpoint", "scores")} == {
        "result": "superseded", "step": 40, "checkpoint": CHECKPOINT, "scores": {"accuracy": 0.81}}
    verdict = judge_pod(terminated_pod(termination_message({**word, "result": "preempted"}), 75), NOW)
    assert verdict.outcome == PREEMPTED and verdict.trainer["checkpoint"] == CHECKPOINT
    assert verdict.message == "the trainer saved a resume point at step 40 and stopped"


def test_many_scores_are_trimmed_the_first_ones_kept_whole():
    scores = {f"per_class_recall_{index:04d}": index / 1000 for index in range(2000)}
    word = {**PREEMPTED_WORD, "result": "succeeded", "step": 900, "model": "s3://runs/ckpt/ml/sst/model.ckpt",
            "checkpoint": None, "scores": scores, "test_scores": {"accuracy": 0.79}}
    message = termination_message(word)
    assert len(message) <= TERMINATION_MESSAGE_BYTES
    read = strict_json(message)
    assert read["shortened"] == ["scores"]
    assert 50 < len(read["scores"]) < len(scores)
    assert read["scores"] == dict(list(scores.items())[:len(read["scores"])])
    assert read["test_scores"] == {"accuracy": 0.79} and read["model"] == word["model"] and read["step"] == 900
    verdict = judge_pod(terminated_pod(message, 0), NOW)
    assert verdict.outcome == SUCCEEDED and verdict.trainer["scores"] == read["scores"]


def test_the_limit_counts_bytes_of_utf8_and_never_cuts_a_character_in_half():
    # 3,000 characters, 4 bytes each: a cut at 4,096 characters kept all of them, 12 KB
    word = {**PREEMPTED_WORD, "result": "superseded", "message": "grüße 🚀 " * 375}
    message = termination_message(word)
    assert len(message) <= TERMINATION_MESSAGE_BYTES < len(json.dumps(word, ensure_ascii=False).encode())
    read = strict_json(message.decode("utf-8"))  # strict: no half character at the cut
    assert read["message"].startswith("grüße 🚀 grüße") and read["shortened"] == ["message"]
    assert "grüße 🚀" in message.decode("utf-8"), "non-ASCII text is written as it is, not escaped"


def test_when_the_rest_needs_room_the_urls_go_whole_and_result_and_step_stay():
    long_uri = "s3://runs/" + "deep/" * 1000
    word = {**PREEMPTED_WORD, "run_dir": long_uri, "model": long_uri + "model.ckpt", "dump": long_uri + "dump",
            "checkpoint": {**CHECKPOINT, "uri": long_uri + "last.ckpt"}, "message": "x" * 3000,
            "scores": {f"s{index}": 0.5 for index in range(500)}}
    message = termination_message(word)
    assert len(message) <= TERMINATION_MESSAGE_BYTES
    read = strict_json(message)
    assert read["result"] == "preempted" and read["step"] == 40
    assert read["shortened"] == ["message", "scores", "run_dir", "dump", "model", "checkpoint"]
    for key in ("run_dir", "dump", "model", "checkpoint"):
        assert key not in read, f"{key}: a cut URI would name the wrong thing"
    assert len(read["message"].encode()) == 1024, "the message for people keeps 1 KiB"


def test_a_refused_spec_leaves_its_reason_as_text_within_the_limit():
    reason = "invalid input: data: no column any model can use; columns: " + ", ".join(
        f"spalte_ä{index}" for index in range(1500))
    message = termination_message(reason)
    assert len(message) <= TERMINATION_MESSAGE_BYTES < len(reason.encode())
    text = message.decode("utf-8")
    assert text.startswith("invalid input: data: no column any model can use")
    assert text.endswith(f"... [shortened from {len(reason.encode())} bytes]")
    verdict = judge_pod(terminated_pod(message, 2), NOW)
    assert verdict.outcome == FAILED and verdict.reason == "InvalidSpec" and verdict.trainer == {}
    assert termination_message("refused: spec.seed") == b"refused: spec.seed"


def test_nan_and_infinite_scores_leave_as_strict_json_and_come_back_as_floats():
    word = {**PREEMPTED_WORD, "result": "succeeded", "checkpoint": None,
            "scores": {"accuracy": 0.5, "log_loss": math.nan}, "test_scores": {"mse": math.inf, "r2": -math.inf}}
    message = termination_message(word)
    assert strict_json(message)["scores"] == {"accuracy": 0.5, "log_loss": "NaN"}
    assert strict_json(message)["test_scores"] == {"mse": "Infinity", "r2": "-Infinity"}
    trainer = judge_pod(terminated_pod(message, 0), NOW).trainer
    assert math.isnan(trainer["scores"]["log_loss"]) and trainer["test_scores"] == {"mse": math.inf, "r2": -math.inf}
    huge = termination_message({**word, "message": "ü" * 10_000,
                                "scores": {f"loss_{index}": math.nan for index in range(1000)}})
    assert len(huge) <= TERMINATION_MESSAGE_BYTES and set(strict_json(huge)["scores"].values()) == {"NaN"}


@pytest.mark.parametrize("number, name", [(math.nan, "NaN"), (math.inf, "Infinity"), (-math.inf, "-Infinity")])
def test_dumps_names_non_finite_numbers_and_loads_reads_them_back(number, name):
    document = {"metrics": {"loss": number, "acc": 0.5}, "history": [1.0, number, (number, 2)], "label": "NaN-free"}
    text = dumps(document, sort_keys=True)
    assert strict_json(text) == {"history": [1.0, name, [name, 2]], "label": "NaN-free",
                                 "metrics": {"acc": 0.5, "loss": name}}
    read = loads(text)
    assert read["metrics"]["acc"] == 0.5 and read["label"] == "NaN-free"
    same = (lambda value: math.isnan(value)) if math.isnan(number) else (lambda value: value == number)
    assert same(read["metrics"]["loss"]) and same(read["history"][1]) and same(read["history"][2][0])
    assert same(NON_FINITE[name])
    assert same(loads(json.dumps(document))["metrics"]["loss"]), "the bare constants of older trainers read too"


def test_the_trainer_writes_its_outcome_fitted_and_strict(tmp_path):
    from kontinue.trainer.runner import Outcome, write_termination_message

    path = tmp_path / "termination-log"
    outcome = Outcome(result="superseded", step=40, run_dir="s3://runs/ckpt/ml/sst", message="ü" * 4000,
                      scores={"accuracy": 0.5, "log_loss": math.nan})
    write_termination_message(outcome, str(path))
    assert len(path.read_bytes()) <= TERMINATION_MESSAGE_BYTES
    read = strict_json(path.read_bytes())
    assert (read["result"], read["step"], read["scores"]) == ("superseded", 40, {"accuracy": 0.5, "log_loss": "NaN"})
    write_termination_message("invalid input: " + "ü" * 4000, str(path))
    assert len(path.read_bytes()) <= TERMINATION_MESSAGE_BYTES
    assert path.read_text(encoding="utf-8").startswith("invalid input: üü")


def test_a_run_directory_keeps_nan_metrics_as_strict_json_and_reads_them_back_as_floats(tmp_path):
    """A diverged validation (NaN loss, infinite score) in status.json, its status line and the
    attempt's Outcome: every reader parses them, and the trainer reads NaN back after a restart."""
    from kontinue.api.reports import status_line
    from kontinue.trainer.rundir import RunDirectory
    from kontinue.trainer.runner import _outcome

    run_dir = RunDirectory(tmp_path / "run")
    lines = []
    run_dir.report = lambda status: lines.append(status_line(status))
    run_dir.update_status(step=3, metrics={"val_loss": math.nan, "accuracy": math.inf, "f1": 0.5})
    written = strict_json((tmp_path / "run" / "status.json").read_text())
    assert written["metrics"] == {"val_loss": "NaN", "accuracy": "Infinity", "f1": 0.5}
    assert strict_json(lines[-1].partition("kontinue-status: ")[2])["metrics"]["val_loss"] == "NaN"
    again = RunDirectory(tmp_path / "run").status["metrics"]
    assert math.isnan(again["val_loss"]) and again["accuracy"] == math.inf and again["f1"] == 0.5
    word = strict_json(termination_message(_outcome(run_dir, "succeeded").__dict__))
    assert word["scores"]["val_loss"] == "NaN"

"""A TrainingRun whose run directory and data live on PersistentVolumeClaims, end to end: the
operator mounts them into every attempt's pod and the run survives a preemption on them."""

from __future__ import annotations

import json

from tests.operator_helpers import (OPERATOR_ARGS, local_trainer_status, preempt_after_checkpoint, run_status,
                                    tables_on_claim)
from tests.trainer_fixtures import training_run


def test_run_directory_and_data_on_claims_survive_a_preemption(kube, kubelet, operator_process, tiny_bert,
                                                               review_tables):
    data, data_volume = tables_on_claim(kubelet, review_tables)
    manifest = training_run("vol", "/runs", data, tiny_bert, volumes=[
        {"name": "runs", "claimName": "runs", "mountPath": "/runs", "subPath": "kontinue"}, data_volume])
    manifest["metadata"]["namespace"] = kube.namespace
    run_dir = kubelet.claim_dir("runs") / "kontinue" / kube.namespace / "vol"
    operator_process.start(*OPERATOR_ARGS)
    kube.create(manifest)

    preempt_after_checkpoint(kube, kubelet, local_trainer_status(run_dir), 1, "vol")
    kube.wait_for(lambda: run_status(kube, "vol").get("phase") in ("Succeeded", "Failed"), 240, "the run to finish")
    status = run_status(kube, "vol")
    assert status["phase"] == "Succeeded" and status["preemptions"] == 1, status
    assert (run_dir / "model.ckpt").is_file()
    attempts = json.loads((run_dir / "status.json").read_text())["attempts"]
    assert [attempt["outcome"] for attempt in attempts][-2:] == ["preempted", "completed"], attempts

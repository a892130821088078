"""A TransferRun through the operator: applied together with the TrainingRun it starts from, it
waits for that run to succeed, then trains a new task on its dumped backbone."""

from __future__ import annotations

import json

from tests.operator_helpers import OPERATOR_ARGS, run_status, tables_on_claim, transition_reasons
from tests.trainer_fixtures import training_run


def test_a_transfer_run_waits_for_its_source_then_trains_on_its_dump(kube, kubelet, operator_process, tiny_bert,
                                                                    review_tables):
    data, data_volume = tables_on_claim(kubelet, review_tables)
    volumes = [data_volume, {"name": "runs", "claimName": "runs", "mountPath": "/runs"}]
    source = training_run("source", "/runs", data, tiny_bert, volumes=volumes)
    source["spec"]["hyperparameters"]["optim.max_epochs"] = 1
    transfer = {
        "apiVersion": "kontinue.dev/v1alpha1", "kind": "TransferRun",
        "metadata": {"name": "transfer", "namespace": "tests"},
        "spec": {"source": {"trainingRun": "source"}, "task": {"label": "label"}, "data": data, "seed": 7,
                 "hyperparameters": {"optim.max_epochs": 1, "env.per_gpu_batch_size": 8, "env.batch_size": 16},
                 "checkpoint": {"storage": "/runs", "intervalSteps": 3}, "volumes": volumes},
    }
    operator_process.start(*OPERATOR_ARGS)
    kube.create(transfer)  # first: it must wait, not fail, when its source is not there yet
    kube.wait_for(lambda: "waiting for TrainingRun source" in (transfer_status(kube).get("message") or ""), 30,
                  "the TransferRun to wait for its source")
    kube.create(source)
    kube.wait_for(lambda: transfer_status(kube).get("phase") in ("Succeeded", "Failed"), 300, "the transfer to finish")

    status, source_status = transfer_status(kube), run_status(kube, "source")
    assert source_status["phase"] == "Succeeded" and status["phase"] == "Succeeded", (source_status, status)
    assert status["attempt"] == 1 and status["dumpedModelUri"].endswith("/runs/tests/transfer/dump")
    assert status["sourceDumpUri"].endswith("/tests/source/dump"), "read from the trainer's status line"
    assert transition_reasons(kube, "transfer") == ["AttemptStarted", "Running", "Succeeded"]
    run_dir = kubelet.claim_dir("runs") / "tests" / "transfer"
    metadata = json.loads((run_dir / "kontinue.json").read_text())
    assert "source/dump/hf_text" in json.dumps(metadata), "the new model was built from the source's dump"
    assert [p["metadata"]["name"] for p in kube.list("pods", kube.namespace)] == ["source-1", "transfer-1"]


def transfer_status(kube) -> dict:
    return (kube.get("transferruns", kube.namespace, "transfer") or {}).get("status") or {}

"""A TransferRun through the operator: applied together with the TrainingRun it starts from, it
waits for that run to succeed, then trains a new task on its dumped backbone."""

from __future__ import annotations

import json

from tests.operator_helpers import (OPERATOR_ARGS, local_trainer_status, preempt_after_checkpoint, run_status,
                                   tables_on_claim, transition_reasons)
from tests.trainer_fixtures import training_run


def test_a_transfer_run_waits_for_its_source_then_trains_on_its_dump(kube, kubelet, operator_process, tiny_bert,
                                                                    review_tables):
    data, data_volume = tables_on_claim(kubelet, review_tables)
    volumes = [data_volume, {"name": "runs", "claimName": "runs", "mountPath": "/runs"}]
    source = training_run("source", "/runs", data, tiny_bert, volumes=volumes)
    source["metadata"]["namespace"] = kube.namespace
    source["spec"]["hyperparameters"]["optim.max_epochs"] = 1
    kubelet.claim_dir("runs")
    transfer = {
        "apiVersion": "kontinue.dev/v1alpha1", "kind": "TransferRun",
        "metadata": {"name": "transfer", "namespace": kube.namespace},
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
    assert status["attempt"] == 1 and status["dumpedModelUri"].endswith(f"/runs/{kube.namespace}/transfer/dump")
    assert status["sourceDumpUri"].endswith(f"/{kube.namespace}/source/dump"), "read from the trainer's status line"
    assert transition_reasons(kube, "transfer") == ["AttemptStarted", "Running", "Succeeded"]
    run_dir = kubelet.claim_dir("runs") / kube.namespace / "transfer"
    metadata = json.loads((run_dir / "kontinue.json").read_text())
    assert "source/dump/hf_text" in json.dumps(metadata), "the new model was built from the source's dump"
    assert [p["metadata"]["name"] for p in kube.list("pods", kube.namespace)] == ["source-1", "transfer-1"]


def transfer_status(kube, name: str = "transfer") -> dict:
    return (kube.get("transferruns", kube.namespace, name) or {}).get("status") or {}


def test_an_image_run_preempted_then_dumped_feeds_a_transfer_run_that_starts_only_then(
        kube, kubelet, operator_process, tmp_path, digits):
    """timm_image through the operator: the source TrainingRun is preempted, resumes, succeeds and
    dumps timm_image/; the TransferRun applied with it starts only then, on the dumped weights."""
    data_dir = kubelet.claim_dir("digits")
    kubelet.claim_dir("runs")
    table = digits[["image_bytes", "ink", "parity", "label"]]  # images as bytes: no paths to map into the pod
    table[:96].to_parquet(data_dir / "train.parquet")
    table[96:128].to_parquet(data_dir / "validation.parquet")
    data = {"train": "/data/train.parquet", "validation": "/data/validation.parquet"}
    volumes = [{"name": "data", "claimName": "digits", "mountPath": "/data", "readOnly": True},
               {"name": "runs", "claimName": "runs", "mountPath": "/runs"}]
    common = {"data": data, "seed": 7, "volumes": volumes, "checkpoint": {"storage": "/runs", "intervalSteps": 2},
              "hyperparameters": {"optim.max_epochs": 2, "env.per_gpu_batch_size": 8, "env.batch_size": 8,
                                  "model.names": ["timm_image"]}}
    source = {"apiVersion": "kontinue.dev/v1alpha1", "kind": "TrainingRun",
              "metadata": {"name": "digits", "namespace": kube.namespace},
              "spec": {**common, "task": {"label": "label"},
                       "model": {"timmImage": {"checkpoint": "test_resnet", "imageSize": 32}}}}
    transfer = {"apiVersion": "kontinue.dev/v1alpha1", "kind": "TransferRun",
                "metadata": {"name": "ink", "namespace": kube.namespace},
                "spec": {**common, "source": {"trainingRun": "digits"},
                         "task": {"label": "ink", "problemType": "regression"}}}
    operator_process.start(*OPERATOR_ARGS)
    kube.create(source)
    kube.create(transfer)
    source_dir = kubelet.claim_dir("runs") / kube.namespace / "digits"
    preempt_after_checkpoint(kube, kubelet, local_trainer_status(source_dir), 4, name="digits")
    kube.wait_for(lambda: transfer_status(kube, "ink").get("phase") in ("Succeeded", "Failed"), 400,
                  "the transfer to finish")

    status, source_status = transfer_status(kube, "ink"), run_status(kube, "digits")
    assert source_status["phase"] == "Succeeded" and source_status["preemptions"] == 1, source_status
    assert source_status["dumpedModelUri"].endswith(f"/runs/{kube.namespace}/digits/dump")
    assert status["phase"] == "Succeeded" and status["attempt"] == 1, status
    assert (source_dir / "dump" / "timm_image" / "model.safetensors").is_file()
    assert [p["metadata"]["name"] for p in kube.list("pods", kube.namespace)] == ["digits-2", "ink-1"]  # digits-1 preempted
    # the transfer's pod was created only after the source succeeded
    events = [(e["reason"], e["involvedObject"]["name"]) for e in kube.events(kube.namespace)]
    assert events.index(("Succeeded", "digits")) < events.index(("AttemptStarted", "ink")), events
    metadata = json.loads((kubelet.claim_dir("runs") / kube.namespace / "ink" / "kontinue.json").read_text())
    assert metadata["hyperparameters"]["model.timm_image.checkpoint_name"].endswith(f"{kube.namespace}/digits/dump/timm_image")
    assert metadata["columns"] == {"timm_image": ["image_bytes"]}

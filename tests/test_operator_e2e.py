"""The operator end to end: kopf (its own process) against the API emulator over HTTP, a
harness kubelet running the real trainer, checkpoints in a real S3-protocol server."""

from __future__ import annotations

import json
import random

import pytest

from tests.operator_helpers import (OPERATOR_ARGS, preempt_after_checkpoint, run_status, tables_on_claim,
                                    transition_reasons)
from tests.trainer_fixtures import training_run


@pytest.fixture
def s3_run(kube, kubelet, s3_server, tiny_bert, review_tables):
    """A TrainingRun checkpointing to S3, with its credentials in a Secret and its data on a claim."""
    bucket = s3_server.make_bucket("e2e")
    kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-credentials"},
                 "stringData": {"endpoint": s3_server.endpoint, "accessKey": s3_server.access_key,
                                "secretKey": s3_server.secret_key}})
    data, data_volume = tables_on_claim(kubelet, review_tables)
    manifest = training_run("e2e", f"s3://{bucket}/store", data, tiny_bert, volumes=[data_volume])
    manifest["spec"]["checkpoint"]["secretRef"] = {"name": "s3-credentials"}
    manifest["metadata"]["namespace"] = kube.namespace

    def trainer_status() -> dict:
        try:
            return json.loads(s3_server.client().get_object(bucket, f"store/{kube.namespace}/e2e/status.json").read())
        except Exception:  # not written yet
            return {}
    return manifest, trainer_status


def test_preempted_twice_the_run_finishes_bit_identical(kube, kubelet, operator_process, s3_run, reference_state):
    manifest, trainer_status = s3_run
    operator_process.start(*OPERATOR_ARGS)
    kube.create(manifest)
    preempt_after_checkpoint(kube, kubelet, trainer_status, random.randint(1, 8))
    preempt_after_checkpoint(kube, kubelet, trainer_status, trainer_status()["lastCheckpoint"]["step"] + random.randint(1, 6))
    kube.wait_for(lambda: run_status(kube).get("phase") in ("Succeeded", "Failed"), 240, "the run to finish")

    status = run_status(kube)
    assert status["phase"] == "Succeeded", status
    assert status["preemptions"] == 2 and status.get("failures", 0) == 0 and status["attempt"] == 3
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Succeeded"]["status"] == "True" and conditions["Running"]["status"] == "False"
    trainer = trainer_status()
    assert trainer["finalState"]["sha256"] == reference_state, \
        f"the resumed run must end bit-identical: {json.dumps(trainer, indent=1)}\n{kubelet.dump()}"
    attempts = trainer["attempts"]
    assert [a["outcome"] for a in attempts][-2:] == ["preempted", "completed"]
    for before, after in zip(attempts, attempts[1:]):
        assert after["fromStep"] == before["toStep"], attempts
    assert transition_reasons(kube) == ["AttemptStarted", "Running", "Preempted"] * 2 + \
        ["AttemptStarted", "Running", "Succeeded"]
    resumed = [event["message"] for event in kube.events(kube.namespace, "e2e") if event["reason"] == "AttemptStarted"]
    for message, before in zip(resumed[1:], attempts):  # the checkpoint each preempted pod left
        assert f"resuming from s3://" in message and f"(step {before['toStep']})" in message, resumed
    assert status["metrics"] and status["dumpedModelUri"].endswith("/dump")
    pods = kube.list("pods", kube.namespace)
    assert [p["metadata"]["name"] for p in pods] == ["e2e-3"], "earlier attempts' pods are gone"

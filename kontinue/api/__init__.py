"""The TrainingRun / TransferRun API (group kontinue.dev, version v1alpha1): models, CRDs, validation."""

from kontinue.api.crd import build_crds, crd_schema
from kontinue.api.hyperparameters import (HYPERPARAMETERS, HyperparameterError, hyperparameter_problems,
                                          validate_hyperparameters)
from kontinue.api.manifests import (Problem, SpecError, document_problems, load_documents, load_manifest,
                                    parse_resource, parse_training_run, parse_transfer_run, schema_problems)
from kontinue.api.models import (API_VERSION, GROUP, VERSION, CheckpointSpec, Condition, DataSpec, ModelSource,
                                 ModelSpec, ResourcesSpec, TaskSpec, TrainingRun, TrainingRunSpec,
                                 TrainingRunStatus, TransferRun, TransferRunSpec, TransferRunStatus, VolumeSpec)

__all__ = [
    "API_VERSION", "GROUP", "HYPERPARAMETERS", "VERSION", "CheckpointSpec", "Condition", "DataSpec",
    "HyperparameterError", "ModelSource", "ModelSpec", "Problem", "ResourcesSpec", "SpecError", "TaskSpec",
    "TrainingRun", "TrainingRunSpec", "TrainingRunStatus", "TransferRun", "TransferRunSpec",
    "TransferRunStatus", "VolumeSpec", "build_crds", "crd_schema", "document_problems",
    "hyperparameter_problems", "load_documents", "load_manifest", "parse_resource", "parse_training_run",
    "parse_transfer_run", "schema_problems", "validate_hyperparameters",
]

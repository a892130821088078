"""The trainer: `from kontinue.trainer import Predictor` (imported lazily so the CLI starts fast)."""

from __future__ import annotations

from typing import Any

_EXPORTS = {"Predictor": "kontinue.trainer.predictor", "Preempted": "kontinue.trainer.callbacks",
            "PREEMPTED_EXIT_CODE": "kontinue.api.contract"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kontinue.trainer' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)

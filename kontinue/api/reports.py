"""What a trainer pod tells the operator while it runs: one status line on stdout at a time.

The operator reads the newest line from the pod's log (`pods/log`), so it learns progress, the
last resume point and metrics without reading the run directory: it needs no storage credentials
and works for any storage, a PersistentVolumeClaim included.
"""

from __future__ import annotations

import json
from typing import Any

STATUS_LINE = "kontinue-status: "
REPORTED = ("progress", "step", "epoch", "lastCheckpoint", "bestCheckpoint", "metrics", "sourceDumpUri")
MAX_WARNINGS = 10


def status_line(status: dict[str, Any]) -> str:
    """The part of status.json the operator shows, as one log line."""
    report = {key: status[key] for key in REPORTED if status.get(key) is not None}
    warnings = [w["message"] if isinstance(w, dict) else str(w) for w in status.get("warnings") or []]
    if warnings:
        report["warnings"] = warnings[-MAX_WARNINGS:]
    return STATUS_LINE + json.dumps(report, sort_keys=True, default=str)


def last_status(log: str) -> dict[str, Any] | None:
    """The newest status line in a log tail; lines cut or garbled by the log's rotation are skipped."""
    for line in reversed(log.splitlines()):
        _, marker, payload = line.partition(STATUS_LINE)
        if not marker:
            continue
        try:
            report = json.loads(payload)
        except ValueError:
            continue
        if isinstance(report, dict):
            return report
    return None

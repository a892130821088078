"""What a trainer pod tells the operator: one status line on stdout at a time while it runs, and its
last word (the Outcome) in the termination message when it ends.

The operator reads the newest line from the pod's log (`pods/log`), so it learns progress, the
last resume point and metrics without reading the run directory: it needs no storage credentials
and works for any storage, a PersistentVolumeClaim included.

Both are strict JSON, which has no NaN or infinity (jq, Go's encoding/json and kubectl refuse the
bare NaN Python writes), yet a diverged loss is worth reporting: such a number travels as the string
"NaN", "Infinity" or "-Infinity" (`dumps`), and Python readers get the float back (`loads`).
"""

from __future__ import annotations

import json
import math
from itertools import islice
from typing import Any, Callable

STATUS_LINE = "kontinue-status: "
REPORTED = ("progress", "step", "epoch", "lastCheckpoint", "bestCheckpoint", "metrics", "sourceDumpUri")
MAX_WARNINGS = 10

NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}  # as strict JSON carries them

TERMINATION_MESSAGE_BYTES = 4096  # what Kubernetes keeps of a container's termination message
# What an Outcome too long for its termination message gives up, first to last, until it fits,
# and how much of each stays however little room the rest leaves (bytes of a text, items of a dict;
# None: left out whole, as a cut URI names the wrong thing). The message for people keeps 1 KiB and
# the scores make room for it, the validation scores before the final test scores; the resume point
# goes last. `result` and `step`, which every verdict reads, always stay.
SHRINKING: dict[str, int | None] = {"message": 1024, "scores": 0, "test_scores": 0, "run_dir": None,
                                    "dump": None, "model": None, "checkpoint": None}


def dumps(obj: Any, **kwargs: Any) -> str:
    """json.dumps that writes strict JSON: NaN and infinite floats as the strings of NON_FINITE."""
    return json.dumps(_non_finite_named(obj), allow_nan=False, **kwargs)


def loads(text: str) -> Any:
    """json.loads undoing `dumps`: a string value spelled as in NON_FINITE reads as that float (and
    so do the bare NaN and Infinity that trainers before `dumps` printed)."""
    return _non_finite_numbers(json.loads(text))


def _non_finite_named(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, dict):
        return {key: _non_finite_named(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_non_finite_named(item) for item in value]
    return value


def _non_finite_numbers(value: Any) -> Any:
    if isinstance(value, str):
        return NON_FINITE.get(value, value)
    if isinstance(value, dict):
        return {key: _non_finite_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_non_finite_numbers(item) for item in value]
    return value


def status_line(status: dict[str, Any]) -> str:
    """The part of status.json the operator shows, as one log line."""
    report = {key: status[key] for key in REPORTED if status.get(key) is not None}
    warnings = [w["message"] if isinstance(w, dict) else str(w) for w in status.get("warnings") or []]
    if warnings:
        report["warnings"] = warnings[-MAX_WARNINGS:]
    return STATUS_LINE + dumps(report, sort_keys=True, default=str)


def last_status(log: str) -> dict[str, Any] | None:
    """The newest status line in a log tail; lines cut or garbled by the log's rotation are skipped."""
    for line in reversed(log.splitlines()):
        _, marker, payload = line.partition(STATUS_LINE)
        if not marker:
            continue
        try:
            report = loads(payload)
        except ValueError:
            continue
        if isinstance(report, dict):
            return report
    return None


def _utf8(text: str) -> bytes:
    """Kubernetes counts bytes; a lone surrogate (an undecodable file name) becomes '?' instead of failing."""
    return text.encode("utf-8", "replace")


def shorten(text: str, max_bytes: int) -> str:
    """`text` in at most `max_bytes` of UTF-8: its head, and a marker saying it was cut (no character
    is cut in half)."""
    data = _utf8(text)
    if len(data) <= max_bytes:
        return text
    marker = f"... [shortened from {len(data)} bytes]"
    if len(marker) > max_bytes:
        return data[:max_bytes].decode("utf-8", "ignore")
    return data[:max_bytes - len(marker)].decode("utf-8", "ignore") + marker


def termination_message(word: dict[str, Any] | str) -> bytes:
    """The trainer's last word, its Outcome as JSON or why it refused the spec as text, in the bytes
    Kubernetes keeps of a termination message. JSON cut anywhere is no JSON, so an Outcome too long
    gives up parts in SHRINKING's order until it fits, and names them in `shortened`."""
    if isinstance(word, str):
        return _utf8(shorten(word, TERMINATION_MESSAGE_BYTES))
    if _fits(word):
        return _compact(word)
    word = {key: value for key, value in word.items() if value is not None}  # null says what absence says
    unknown = [key for key in word if key not in SHRINKING and key not in ("result", "step")]
    order = unknown + [key for key in SHRINKING if key in word]  # what it does not know goes first
    shortened: list[str] = []
    for key in order:
        if _fits(word):
            break
        value, at_least = word[key], SHRINKING.get(key)
        if at_least is not None and _size(value) <= at_least:
            continue
        del word[key]
        shortened.append(key)
        word["shortened"] = shortened
        if at_least is not None:
            kept = max(at_least, _largest(lambda n: _fits({**word, key: _trimmed(value, n)}), _size(value)))
            if kept:
                word[key] = _trimmed(value, kept)
    return _compact(word)


def _compact(word: dict[str, Any]) -> bytes:
    return _utf8(dumps(word, ensure_ascii=False, separators=(",", ":")))


def _fits(word: dict[str, Any]) -> bool:
    return len(_compact(word)) <= TERMINATION_MESSAGE_BYTES


def _size(value: str | dict[str, Any]) -> int:
    """How far a trimmable value can be trimmed: bytes of a string (no more than a message holds), items of a dict."""
    return min(len(_utf8(value)), TERMINATION_MESSAGE_BYTES) if isinstance(value, str) else len(value)


def _trimmed(value: str | dict[str, Any], size: int) -> str | dict[str, Any]:
    return shorten(value, size) if isinstance(value, str) else dict(islice(value.items(), size))


def _largest(fits: Callable[[int], bool], most: int) -> int:
    """The largest n in 1..most that `fits` (true up to some n, false beyond), or 0 if none does."""
    low, high = 0, most
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low

"""Corrupt data, bounded: skipped samples are counted by reason, warned about sparingly, and stop the run
when there are too many.

Each loader worker keeps one ``DataFaults``. A sample that cannot be decoded, or a shard that cannot be
read as a tar, is skipped and counted under a reason (``REASONS``). Warnings (logger ``apt.data``, one
line each) are rate-limited: one at the 1st, 2nd, 4th, 8th ... skip of a worker (20 lines for a million
skips), each with the running counts. The run stops with ``DataFaultError`` (one line naming the shards and the reasons) when

- ``data.max_consecutive_skipped`` samples in a row were skipped (no valid sample arrives: an all-corrupt
  shard directory used to loop forever), or
- more than ``data.max_skipped_fraction`` of the samples read so far were skipped, once at least
  ``FRACTION_AFTER`` samples were read.

A stop signal (``apt.preemption``) received while the worker is skipping is honoured at the next skip.
The counts travel with every batch (``FAULTS_KEY``: this worker's running counts), so the runners log
them as metrics (``data_skipped``, ``data_skipped_<reason>``) without another channel between processes.
"""

from __future__ import annotations

import logging
import os
from collections import Counter

from apt.errors import RunFailure
from apt.preemption import stop_if_requested

REASONS = {
    "tar": "shard not readable as a tar",
    "missing_member": "a member of the sample is missing",
    "bad_array": "an .npy member does not load",
    "bad_json": "the json member does not parse",
    "bad_shape": "the array has the wrong dtype or rank",
}
FRACTION_AFTER = 1000
FAULTS_KEY = "data_faults"
log = logging.getLogger("apt.data")


class DataFaultError(RunFailure):
    """Too much of the data is corrupt to go on; the message names the shards and the reasons."""


class DataFaults:
    """Skips of one loader worker (or one eval pass), with the bounds above; ``None`` bounds = unbounded."""

    def __init__(self, *, max_consecutive: int | None = None, max_fraction: float | None = None, source: str = "", worker: int = 0):
        self.max_consecutive, self.max_fraction = max_consecutive, max_fraction
        self.source, self.worker = source, worker
        self.reasons: Counter[str] = Counter()
        self.shards: Counter[str] = Counter()
        self.good = 0
        self.consecutive = 0

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    def ok(self) -> None:
        """A sample was decoded."""
        self.good += 1
        self.consecutive = 0

    def skip(self, reason: str, shard: str, detail: str) -> None:
        assert reason in REASONS, reason
        detail = detail if len(detail) <= 240 else detail[:240] + "..."
        self.reasons[reason] += 1
        self.shards[os.path.basename(shard)] += 1
        self.consecutive += 1
        n = self.skipped
        if n & (n - 1) == 0:  # 1, 2, 4, 8, ...: O(log n) lines however long the run skips
            log.warning(f"skipped corrupt data ({detail}); {n} skipped so far in this worker ({self.summary()})")
        stop_if_requested("while the data loader was skipping corrupt samples")
        if self.max_consecutive is not None and self.consecutive >= self.max_consecutive:
            raise DataFaultError(f"data: no valid sample in the last {self.consecutive} read (data.max_consecutive_skipped="
                                 f"{self.max_consecutive}); {self.summary()}; last: {detail}")
        seen = self.good + n
        if self.max_fraction is not None and seen >= FRACTION_AFTER and n > self.max_fraction * seen:
            if not self.good:
                raise DataFaultError(f"data: none of the first {seen} samples read could be used; {self.summary()}; last: {detail}")
            raise DataFaultError(f"data: {n} of the {seen} samples read were skipped ({n / seen:.1%}, more than data.max_skipped_fraction="
                                 f"{self.max_fraction}); {self.summary()}; last: {detail}")

    def summary(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in self.reasons.most_common())
        shards = ", ".join(f"{k} ({v})" for k, v in self.shards.most_common(5))
        more = f" and {len(self.shards) - 5} more" if len(self.shards) > 5 else ""
        return f"skipped by reason: {reasons}; in shards: {shards}{more}"

    def handler(self, exn: Exception) -> bool:
        """webdataset's handler for errors below the sample (an unreadable tar): count, go on (True)."""
        shard = next((a for a in reversed(exn.args) if isinstance(a, str) and ".tar" in a), "?")
        self.skip("tar", shard, f"{shard}: {type(exn).__name__}: {str(exn.args[0]) if exn.args else exn}")
        return True

    __call__ = handler

    def snapshot(self) -> dict:
        """This worker's running counts, attached to each batch under ``FAULTS_KEY``."""
        return {"source": self.source, "worker": self.worker, "skipped": self.skipped, **{f"skipped_{k}": v for k, v in self.reasons.items()}}


def merge_snapshots(latest: dict[tuple[str, int], dict], batch) -> dict[str, float]:
    """Update ``latest`` ((source, worker) -> snapshot) from the snapshots found in a batch (a dict, a combined dict of
    loaders, or a list of micro-batches); returns the totals over workers as metrics, empty while nothing was skipped."""
    stack = [batch]
    while stack:
        b = stack.pop()
        if isinstance(b, list):
            stack.extend(b)
        elif isinstance(b, dict):
            if FAULTS_KEY in b:
                snap = b[FAULTS_KEY]
                latest[snap["source"], snap["worker"]] = snap
            else:
                stack.extend(v for v in b.values() if isinstance(v, (dict, list)))
    totals: Counter[str] = Counter()
    for snap in latest.values():
        totals.update({k: v for k, v in snap.items() if k not in ("source", "worker")})
    return {f"data_{k}": float(v) for k, v in totals.items()} if totals["skipped"] else {}

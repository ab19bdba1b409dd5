"""Progress lines for a stage's batches: done/total, rate and ETA in one format for every stage."""

from __future__ import annotations

import logging
import time


def log_progress(log: logging.Logger, what: str, done: int, total: int, unit: str, started: float) -> None:
    """Log `what: done/total unit, rate unit/min, ETA`; `started` is the `time.perf_counter()` at the start."""
    elapsed = max(time.perf_counter() - started, 1e-9)
    log.info(
        "%s: %d/%d %s, %.2f %s/min, ETA %.0fs",
        what,
        done,
        total,
        unit,
        60 * done / elapsed,
        unit,
        (total - done) * elapsed / max(done, 1),
    )

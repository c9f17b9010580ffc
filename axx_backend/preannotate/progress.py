"""What `axx-backend preannotate` shows while it runs: a progress bar, or log lines when not on a terminal."""

from __future__ import annotations

import logging
import sys
import time

from .plan import ChunkState

log = logging.getLogger(__name__)


class ProgressReport:
    """A tqdm bar on a terminal; otherwise a log line every `every` seconds (counts and ETA)."""

    def __init__(self, total: int, every: float = 10.0, desc: str = "preannotate") -> None:
        self.total, self.every, self.done = total, every, 0
        self.start = self.last = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="task", desc=desc)

    def update(self, done: int, **counts: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.done)
            self.bar.set_postfix(counts, refresh=False)
        self.done = done
        now = time.monotonic()
        if self.bar is None and (now - self.last >= self.every or done >= self.total):
            self.last = now
            rate = done / (now - self.start) if now > self.start else 0.0
            eta = f"{(self.total - done) / rate:.0f} s" if rate > 0 else "?"
            extra = ", ".join(f"{k} {v}" for k, v in counts.items())
            log.info("preannotate: %d/%d tasks (%s), %.1f tasks/s, ETA %s", done, self.total, extra, rate, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def report_chunks(chunks: list[ChunkState], report: ProgressReport) -> None:
    """Tasks of the chunks that ended, posted predictions, failed chunks and retries so far."""
    finished = [c for c in chunks if c.state != "queued"]
    report.update(
        sum(len(c.task_ids) for c in finished),
        posted=sum(int(c.result.get("posted", 0)) for c in finished),
        failed_chunks=sum(c.state == "failed" for c in chunks),
        retries=sum(c.attempt for c in chunks),
    )

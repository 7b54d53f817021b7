"""Peak memory of one stage of work: process RSS sampled in a thread, CUDA peak from torch."""

from __future__ import annotations

import threading
from types import TracebackType

import psutil

#: Seconds between two RSS samples: short against any training or prediction stage.
SAMPLE_INTERVAL = 0.05
MIB = 1024.0 * 1024.0


class PeakMemory:
    """Context manager: ``peak_rss_mb`` (this process and its children, the largest sum seen)
    and ``peak_cuda_mb`` (``torch.cuda.max_memory_allocated``, NaN without a GPU) over the block.

    RSS includes what the process already held when the block started (libraries, data): it is
    the memory a machine needs to run that stage in this process, not the stage's increment.
    """

    def __init__(self, interval: float = SAMPLE_INTERVAL) -> None:
        self.interval = interval
        self.peak_rss_mb = 0.0
        self.peak_cuda_mb = float("nan")
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _rss(self) -> int:
        total = 0
        for process in [self._process, *self._process.children(recursive=True)]:
            try:
                total += process.memory_info().rss
            except psutil.Error:  # a child that ended between listing and reading
                continue
        return total

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_rss_mb = max(self.peak_rss_mb, self._rss() / MIB)

    def __enter__(self) -> PeakMemory:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.peak_rss_mb = self._rss() / MIB
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        import torch

        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_rss_mb = max(self.peak_rss_mb, self._rss() / MIB)
        if torch.cuda.is_available():
            self.peak_cuda_mb = torch.cuda.max_memory_allocated() / MIB

"""Wall time and peak memory of a block of work (one task's training)."""

from __future__ import annotations

import threading
import time

import psutil
import torch


class ResourceMonitor:
    """Context manager measuring wall time and peak memory.

    On CUDA the peak is ``torch.cuda.max_memory_allocated`` (reset on entry); on CPU it is the peak resident set
    size of this process, sampled every ``interval`` seconds by a background thread (so it includes the model and
    data already resident, and may miss spikes shorter than the interval).
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.05):
        self.device = torch.device(device)
        self.interval = interval
        self.wall_time_s = 0.0
        self.peak_memory_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak_rss = 0

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self._peak_rss = max(self._peak_rss, process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "ResourceMonitor":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._peak_rss = psutil.Process().memory_info().rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_memory_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.wall_time_s = time.perf_counter() - self._start
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak_rss = max(self._peak_rss, psutil.Process().memory_info().rss)
            self.peak_memory_mb = self._peak_rss / 2**20

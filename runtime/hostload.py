"""How loaded the host is, from psutil (the only module importing it). Sampled at most every 0.5 s."""

from __future__ import annotations

import time

import psutil

from toolcell.policy.limits import HostSample


class HostSampler:
    def __init__(self, min_interval_s: float = 0.5) -> None:
        self.min_interval_s = min_interval_s
        psutil.cpu_percent(interval=None)  # prime: the first reading is relative to this one
        self._at = time.monotonic()
        self._sample = HostSample(available_memory_bytes=psutil.virtual_memory().available, cpu_percent=0.0)

    def __call__(self) -> HostSample:
        now = time.monotonic()
        if now - self._at >= self.min_interval_s:
            self._sample = HostSample(available_memory_bytes=psutil.virtual_memory().available,
                                      cpu_percent=psutil.cpu_percent(interval=None))
            self._at = now
        return self._sample

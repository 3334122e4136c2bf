"""A progress line for long work: bytes and layers, on a terminal only, silent when piped."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from aufs.cli.sizes import human_size


class Progress:
    """Called as progress("bytes", n) or progress("layer", 1); redraws at most 10 times a
    second on stderr when it is a terminal."""

    def __init__(self, label: str, layers: int | None = None, stream: TextIO | None = None
                 ) -> None:
        self.label = label
        self.total_layers = layers
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.bytes = 0
        self.layer_bytes = 0  # of the layer under way
        self.layers = 0
        self._started = time.monotonic()
        self._drawn = 0.0

    def __call__(self, event: str, amount: int) -> None:
        if event == "bytes":
            self.bytes += amount
            self.layer_bytes += amount
        elif event == "layer":
            self.layers += amount
            self.layer_bytes = 0
        now = time.monotonic()
        if self.enabled and (now - self._drawn > 0.1 or event == "layer"):
            self._drawn = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        done = f"{self.layers}/{self.total_layers}" if self.total_layers else str(self.layers)
        rate = self.bytes / max(now - self._started, 1e-6)
        self.stream.write(f"\r{self.label}: {done} layers done, this layer "
                          f"{human_size(self.layer_bytes)}, {human_size(self.bytes)} in "
                          f"all ({human_size(rate)}/s)   ")
        self.stream.flush()

    def done(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()

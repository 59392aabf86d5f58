"""The demo's console: timestamped progress lines and numbered step headers with an ETA."""
from __future__ import annotations

import logging
import time
from typing import Sequence, Tuple

from llmasr.config import format_duration

T_START = time.time()  # (imported first thing by src/demo.py: the demo's clock)


def fmt_time(seconds: float) -> str:
    return format_duration(seconds, short=True)


def say(msg: str) -> None:
    print(f"[demo {fmt_time(time.time() - T_START)}] {msg}", flush=True)


def show_progress_of(logger_name: str) -> None:
    """Print a library module's INFO log lines as demo progress lines."""

    class Say(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            say("  " + record.getMessage())

    log = logging.getLogger(logger_name)
    log.setLevel(logging.INFO)
    if not any(type(h).__name__ == "Say" for h in log.handlers):  # main() may run twice in one process
        log.addHandler(Say())
    log.propagate = False


class Steps:
    """Numbered step headers with the time of the previous step and a rough ETA of the rest."""

    def __init__(self, plan: Sequence[Tuple[str, float]]):
        self.plan = list(plan)  # (title, expected seconds on an idle 2-core machine)
        self.i = -1
        self.t = time.time()
        self.speed = 1.0  # measured / expected, updated as steps finish

    def next(self) -> None:
        now = time.time()
        if self.i >= 0:
            took = now - self.t
            expected = self.plan[self.i][1]
            # Steps that found their outputs cached take ~0 s and say nothing about the speed.
            if expected > 20 and took > 10:
                self.speed = 0.5 * self.speed + 0.5 * (took / expected)
            say(f"  done in {fmt_time(took)}")
        self.i += 1
        self.t = now
        if self.i < len(self.plan):
            rest = sum(s for _, s in self.plan[self.i:]) * self.speed
            title = self.plan[self.i][0]
            print("", flush=True)
            say(f"Step {self.i + 1}/{len(self.plan)}: {title}  (ETA of the remaining steps ~{fmt_time(rest)})")

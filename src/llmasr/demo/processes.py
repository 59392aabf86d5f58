"""Running the toolkit's scripts from the demo: subprocesses with a log file, their environment and
the number of threads each may use."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from pathlib import Path
from typing import Dict, Sequence, Tuple


def busy_cores(window: float = 1.0) -> Tuple[float, str]:
    """Cores in use by other processes right now: from /proc/stat over ``window`` seconds (the
    load average lags by minutes and still counts a job that has just ended), else the 1-minute
    load average."""
    def read():
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
        return sum(fields), idle

    ncpu = os.cpu_count() or 1
    try:
        total0, idle0 = read()
        time.sleep(window)
        total1, idle1 = read()
        busy = ncpu * (1.0 - (idle1 - idle0) / max(total1 - total0, 1e-9))
        return busy, f"{busy:.1f} busy now"
    except (OSError, ValueError, IndexError):
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
        return load, f"load average {load:.1f}"


def choose_threads(requested: int) -> Tuple[int, str]:
    """Intra-op threads for the training/decoding processes.

    On a machine where other processes already use the cores, OpenMP threads spin-wait for each
    other and 2 threads can be several times slower than 1; so we only take cores that are idle.
    """
    ncpu = os.cpu_count() or 1
    if requested > 0:
        return requested, "--num-threads"
    busy, how = busy_cores()
    n = max(1, min(ncpu, int(ncpu - busy + 0.5)))
    return n, f"{ncpu} cores, {how}"


def run(cmd: Sequence[str], log_file: Path, env: Dict[str, str], cwd: Path, echo=None) -> None:
    """Run ``cmd`` in ``cwd``; its output goes to ``log_file`` and ``echo`` (a regex) selects lines
    shown on the console. Raises with the log's tail on failure."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    echo_re = re.compile(echo) if echo else None
    with open(log_file, "a") as log:
        log.write(f"\n$ {' '.join(shlex.quote(c) for c in cmd)}\n")
        log.flush()
        proc = subprocess.Popen(
            list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(cwd),
            bufsize=1,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if echo_re is not None and echo_re.search(line):
                print("    " + short_line(line.rstrip("\n")), flush=True)
        rc = proc.wait()
    if rc != 0:
        tail = log_file.read_text(errors="replace").splitlines()[-25:]
        raise RuntimeError(
            f"command failed with exit code {rc}: {' '.join(cmd)}\n--- last lines of {log_file} ---\n"
            + "\n".join(tail)
        )


_LOG_PREFIX = re.compile(r"^\S+ \S+ (INFO|WARNING|ERROR) \[[^\]]*\] ")


def short_line(line: str) -> str:
    """A log line without its time stamp, level and source (for the console)."""
    return _LOG_PREFIX.sub("", line)[:200]


def child_env(threads: int) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env

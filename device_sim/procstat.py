"""CPU time and RSS of a local process, read from /proc (Linux)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class ProcSample:
    cpu_seconds: float  # user + system
    rss_bytes: int


def sample(pid: int) -> ProcSample:
    """CPU seconds (utime + stime) and resident set size of ``pid`` and of its live descendants (the
    workers of `jitp serve --workers N`); raises OSError if ``pid`` is gone."""
    own = _sample_one(pid)
    cpu, rss = own.cpu_seconds, own.rss_bytes
    for child in _descendants(pid):
        try:
            s = _sample_one(child)
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
        cpu, rss = cpu + s.cpu_seconds, rss + s.rss_bytes
    return ProcSample(cpu_seconds=cpu, rss_bytes=rss)


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    stack = [pid]
    while stack:
        parent = stack.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
            found.extend(children)
            stack.extend(children)
    return found


def _sample_one(pid: int) -> ProcSample:
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
            break
    return ProcSample(cpu_seconds=(utime + stime) / _TICKS, rss_bytes=rss)


def try_sample(pid: int | None) -> ProcSample | None:
    if pid is None:
        return None
    try:
        return sample(pid)
    except (OSError, ValueError, IndexError):
        return None

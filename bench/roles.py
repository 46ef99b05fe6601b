"""The role processes `spendstream run` starts, found through /proc: their pids and resident memory."""

from __future__ import annotations

import os
from pathlib import Path


def role_pids(parent: int) -> dict[str, int]:
    """Role name -> pid, for the children of `parent`; a second worker is `worker-2`, and so on."""
    out: dict[str, int] = {}
    for proc in sorted((p for p in Path("/proc").iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) != parent or len(cmdline) < 4:
            continue
        # `python -m pipeline ROLE ...`; the embedded broker is a native program
        role = cmdline[3].decode() if Path(cmdline[0].decode()).name.startswith("python") else "broker"
        same = sum(r == role or r.startswith(f"{role}-") for r in out)
        out[f"{role}-{same + 1}" if same else role] = int(proc.name)
    return out


def rss_mb(pid: int) -> float:
    """VmRSS of a process, 0 once it is gone."""
    try:
        status = (Path("/proc") / str(pid) / "status").read_text()
    except OSError:
        return 0.0
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024


def children_rss_mb(parent: int) -> dict[str, float]:
    """VmRSS of each role `spendstream run` started, by role."""
    return {role: rss_mb(pid) for role, pid in role_pids(parent).items()}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used: on a shared machine, what a role costs regardless of how
    much of the CPU it was given."""
    try:
        fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

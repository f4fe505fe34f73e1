"""Host memory: how much a run may still use, and sizes written as text ("8GB", "512MiB").

The limit a process meets first is the smallest of the memory the kernel reports available, a
cgroup's memory limit (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``) less what the cgroup
uses, and the address-space limit (``ulimit -v`` / RLIMIT_AS) less the address space in use.
"""

from __future__ import annotations

import re
import resource
from pathlib import Path

from ..errors import ConfigError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int, what: str) -> int:
    """Bytes in ``text`` ("8GB", "512MiB", "1.5 GB" or a plain number of bytes); ``what`` names the
    option in the error."""
    if isinstance(text, int):
        if text <= 0:
            raise ConfigError(f"{what} must be positive, got {text}")
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"{what} '{text}' is not a size: write e.g. 8GB, 512MiB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[unit])


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_headroom() -> int | None:
    """The memory limit of this process's cgroup less its usage (None without a limit)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    headroom = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            folder = Path("/sys/fs/cgroup") / path.lstrip("/")
            limit, used = _read_int(folder / "memory.max"), _read_int(folder / "memory.current")
        elif "memory" in controllers.split(","):  # v1
            folder = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            limit, used = _read_int(folder / "memory.limit_in_bytes"), _read_int(folder / "memory.usage_in_bytes")
        else:
            continue
        if limit is not None and used is not None and limit < 2**60:
            headroom = limit - used if headroom is None else min(headroom, limit - used)
    return headroom


def _address_space_headroom() -> int | None:
    """RLIMIT_AS (``ulimit -v``) less the address space this process already maps."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return soft - int(line.split()[1]) * 1024
    except OSError:
        pass
    return soft


def available_memory() -> int | None:
    """Bytes this process can still allocate before some limit stops it (None when unknown)."""
    limits = [value for value in (_meminfo_available(), _cgroup_headroom(), _address_space_headroom())
              if value is not None]
    return max(0, min(limits)) if limits else None


def resident_peak() -> int:
    """This process's peak resident set size so far, in bytes (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

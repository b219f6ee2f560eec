import math
import os

import torch

from rankest.errors import UserError


#: The largest --max-memory: 1 EiB, more than any machine holds (a larger or infinite number is a typo).
MAX_SIZE = 2**60


def parse_size(text: str) -> int:
    """'16GB', '512MiB', '1e9' → bytes, a finite size from 1 byte to :data:`MAX_SIZE`."""
    t = str(text).strip().upper().replace(" ", "")
    units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "TB": 10**12, "GB": 10**9, "MB": 10**6,
             "KB": 10**3, "T": 10**12, "G": 10**9, "M": 10**6, "K": 10**3, "B": 1}
    for u, mult in units.items():
        if t.endswith(u):
            num = t[: -len(u)]
            break
    else:
        num, mult = t, 1
    try:
        value = float(num) * mult
    except ValueError:
        raise UserError(f"--max-memory must be a size such as 16GB or 512MiB, got {text!r}.") from None
    if not math.isfinite(value) or not 1 <= value <= MAX_SIZE:
        raise UserError(f"--max-memory must be a finite size from 1B to 1EiB such as 16GB, got {text!r}.")
    return int(value)


def available_memory(device: torch.device) -> int:
    """Free memory where the accumulators live: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"

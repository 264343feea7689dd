"""A simulated NVML, importable as `pynvml`, for testing GPU placement on hosts without GPUs.

Put this file's directory first on PYTHONPATH (`llamarouter.devtools.nvmlsim.SIM_DIR`) and set
the devices; the router then sees GPUs through its ordinary `import pynvml`. Nothing is
monkeypatched: a router started as a subprocess, and every child it starts, sees the same.

Environment (read on every call, so nothing is cached between calls):

- `LLAMAROUTER_NVMLSIM`: the devices' sizes, e.g. `24GiB,12GiB` (NVML indices 0, 1). Unset or
  empty: `nvmlInit` fails as on a host without the NVIDIA driver.
- `LLAMAROUTER_NVMLSIM_OVERHEAD`: bytes charged per process on each device it uses (the
  device context a real CUDA child holds); default 0.
- `LLAMAROUTER_NVMLSIM_CHARGE`: `file` (default) charges the model file's size (every shard
  of a split model); `rss` charges the process's resident memory instead.
- `LLAMAROUTER_NVMLSIM_USED`: bytes already used on each device by something else, e.g.
  `0,2GiB`; default none.
- `LLAMAROUTER_NVMLSIM_MATCH`: which processes are GPU processes, a comma list of names;
  default `llama-server`. A process matches when the file name of its program (or, for an
  interpreter such as `python script.py`, of its script) contains one of them.

Which devices a process uses, as a CUDA build of llama-server would:

- its `CUDA_VISIBLE_DEVICES` (from /proc/PID/environ) picks and renumbers the devices: `2,0`
  makes device 2 its 0 and device 0 its 1; unset means all; the list ends at the first entry
  that is not a device number (as CUDA ends it), so `""` means none;
- `-dev/--device CUDA1,CUDA0` or `none` picks among those (in their renumbered order);
- `-sm/--split-mode none` puts everything on `-mg/--main-gpu` (default 0);
- `-ts/--tensor-split 3,1` splits the charge over them in those proportions; without it, in
  proportion to the devices' sizes (llama.cpp splits by free memory; sizes keep the figures
  steady while processes come and go).

Each device a process uses lists it with the overhead plus its share of the charge. -ngl is
not read: every weight counts on the GPUs. Processes whose /proc entries cannot be read
(another user's) are not listed, as NVML lists no figure without permission.

Not simulated: MIG, utilisation, clocks, events, and the order of nvmlInit/nvmlShutdown
(every call works without nvmlInit, which only checks the configuration).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_UNKNOWN = 999

# Names below are pynvml's, so code written against it runs unchanged.
_MESSAGES = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}

_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _MESSAGES.get(self.value, f"NVML error {self.value}")


@dataclass(frozen=True)
class c_nvmlMemory_t:
    total: int
    free: int
    used: int


@dataclass(frozen=True)
class c_nvmlProcessInfo_t:
    pid: int
    usedGpuMemory: int
    gpuInstanceId: int = 0xFFFFFFFF
    computeInstanceId: int = 0xFFFFFFFF


@dataclass(frozen=True)
class Handle:
    index: int


def _bytes(text: str) -> int:
    m = _SIZE.match(text)
    if m is None:
        raise ValueError(f"not a size: {text!r}")
    number, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    if not unit:
        return int(number)
    decimal = text.strip().upper().endswith(unit + "B") and not binary
    return int(number * (1000 if decimal else 1024) ** ("KMGT".index(unit) + 1))


def _list(name: str) -> list[int]:
    text = os.environ.get(name, "").strip()
    return [_bytes(part) for part in text.split(",")] if text else []


def _sizes() -> list[int]:
    try:
        sizes = _list("LLAMAROUTER_NVMLSIM")
    except ValueError:
        raise NVMLError(NVML_ERROR_UNKNOWN) from None
    if not sizes:
        raise NVMLError(NVML_ERROR_DRIVER_NOT_LOADED)
    return sizes


def _handle(handle: Handle) -> int:
    if not isinstance(handle, Handle) or not 0 <= handle.index < len(_sizes()):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return handle.index


def nvmlInit() -> None:
    _sizes()


def nvmlInitWithFlags(flags: int) -> None:
    _sizes()


def nvmlShutdown() -> None:
    return None


def nvmlSystemGetDriverVersion() -> str:
    return "0.0-nvmlsim"


def nvmlDeviceGetCount() -> int:
    return len(_sizes())


def nvmlDeviceGetHandleByIndex(index: int) -> Handle:
    if not 0 <= index < len(_sizes()):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return Handle(index)


def nvmlDeviceGetIndex(handle: Handle) -> int:
    return _handle(handle)


def nvmlDeviceGetName(handle: Handle) -> str:
    i = _handle(handle)
    return f"Simulated GPU {_sizes()[i] // 2**20} MiB"


def nvmlDeviceGetUUID(handle: Handle) -> str:
    return f"GPU-00000000-0000-0000-0000-{_handle(handle):012d}"


def nvmlDeviceGetMemoryInfo(handle: Handle) -> c_nvmlMemory_t:
    i = _handle(handle)
    total = _sizes()[i]
    used = sum(p.usedGpuMemory for p in nvmlDeviceGetComputeRunningProcesses(handle))
    base = _list("LLAMAROUTER_NVMLSIM_USED")
    used += base[i] if i < len(base) else 0
    used = min(used, total)
    return c_nvmlMemory_t(total=total, free=total - used, used=used)


def nvmlDeviceGetComputeRunningProcesses(handle: Handle) -> list[c_nvmlProcessInfo_t]:
    i = _handle(handle)
    sizes = _sizes()
    out = []
    for pid, charges in _gpu_processes(sizes):
        if charges.get(i):
            out.append(c_nvmlProcessInfo_t(pid=pid, usedGpuMemory=charges[i]))
    return out


def nvmlDeviceGetComputeRunningProcesses_v3(handle: Handle) -> list[c_nvmlProcessInfo_t]:
    return nvmlDeviceGetComputeRunningProcesses(handle)


def nvmlDeviceGetGraphicsRunningProcesses(handle: Handle) -> list[c_nvmlProcessInfo_t]:
    _handle(handle)
    return []


# --- what each process holds ---------------------------------------------------------


def _markers() -> list[str]:
    text = os.environ.get("LLAMAROUTER_NVMLSIM_MATCH", "llama-server")
    return [m.strip() for m in text.split(",") if m.strip()]


def _matches(argv: list[str], markers: list[str]) -> bool:
    if not argv:
        return False
    program = os.path.basename(argv[0])
    names = [program]
    if program.startswith("python") and len(argv) > 1:
        names.append(os.path.basename(argv[1]))
    return any(m in n for m in markers for n in names)


def _read_argv(pid: str) -> list[str]:
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _read_env(pid: str) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            env[key] = value
    return env


def _gpu_processes(sizes: list[int]) -> Iterator[tuple[int, dict[int, int]]]:
    markers = _markers()
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            argv = _read_argv(entry.name)
            if not _matches(argv, markers):
                continue
            env = _read_env(entry.name)
            charges = charge(argv, env, sizes, entry.name)
        except OSError:  # gone, or another user's: not listed
            continue
        except ValueError:  # a command line llama-server itself would refuse
            continue
        if charges:
            yield int(entry.name), charges


def _opt(argv: list[str], *names: str) -> str | None:
    """The last value given to any of `names` (`--x v` or `--x=v`), as llama.cpp takes it."""
    found = None
    for i, arg in enumerate(argv):
        key, eq, value = arg.partition("=")
        if key in names:
            if eq:
                found = value
            elif i + 1 < len(argv):
                found = argv[i + 1]
    return found


def visible(env: dict[str, str], count: int) -> list[int]:
    """The devices CUDA_VISIBLE_DEVICES gives a process, in its own numbering's order."""
    text = env.get("CUDA_VISIBLE_DEVICES")
    if text is None:
        return list(range(count))
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) >= count or int(part) in out:
            break
        out.append(int(part))
    return out


def _model_bytes(argv: list[str]) -> int:
    path = _opt(argv, "-m", "--model")
    if path is None:
        return 0
    p = Path(path)
    shard = _SHARD.search(p.name)
    if shard is None:
        return p.stat().st_size
    total = int(shard.group(2))
    stem = p.name[: shard.start()]
    return sum((p.parent / f"{stem}-{k:05d}-of-{total:05d}.gguf").stat().st_size for k in range(1, total + 1))


def _rss(pid: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def charge(argv: list[str], env: dict[str, str], sizes: list[int], pid: str | None = None) -> dict[int, int]:
    """Bytes per device (NVML index) for one process with this command line and environment."""
    devices = visible(env, len(sizes))
    dev = _opt(argv, "-dev", "--device")
    if dev is not None:
        if dev.strip().lower() == "none":
            return {}
        picked = []
        for name in dev.split(","):
            local = name.strip().upper().removeprefix("CUDA")
            if local.isdigit() and int(local) < len(devices):
                picked.append(devices[int(local)])
        devices = picked
    if not devices:
        return {}
    mode = _opt(argv, "-sm", "--split-mode")
    if mode is not None and mode.strip().lower() == "none":
        main = int(_opt(argv, "-mg", "--main-gpu") or 0)
        devices = [devices[main]] if main < len(devices) else []
        weights = [1.0] * len(devices)
    else:
        ts = _opt(argv, "-ts", "--tensor-split")
        if ts:
            shares = [float(x) for x in re.split(r"[,/]", ts) if x.strip()]
            weights = [shares[k] if k < len(shares) else 0.0 for k in range(len(devices))]
        else:
            weights = [float(sizes[d]) for d in devices]
    if sum(weights) <= 0:
        return {}
    mode_charge = os.environ.get("LLAMAROUTER_NVMLSIM_CHARGE", "file").strip().lower()
    total = _rss(pid) if mode_charge == "rss" and pid is not None else _model_bytes(argv)
    overhead = _bytes(os.environ.get("LLAMAROUTER_NVMLSIM_OVERHEAD", "0") or "0")
    whole = sum(weights)
    return {d: overhead + int(total * w / whole) for d, w in zip(devices, weights, strict=True) if w > 0}

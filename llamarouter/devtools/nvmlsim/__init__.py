"""A simulated NVML (see `pynvml.py` here): put `SIM_DIR` on PYTHONPATH to use it."""

from __future__ import annotations

from pathlib import Path

# The directory to put first on PYTHONPATH: `import pynvml` then finds the simulation.
SIM_DIR = Path(__file__).resolve().parent


def sim_env(sizes: str, base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """A copy of `base` (or nothing) with the simulation first on PYTHONPATH and its devices
    set; `extra` sets LLAMAROUTER_NVMLSIM_<KEY> (overhead="256MiB", charge="rss", ...)."""
    env = dict(base or {})
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{SIM_DIR}:{path}" if path else str(SIM_DIR)
    env["LLAMAROUTER_NVMLSIM"] = sizes
    for key, value in extra.items():
        env[f"LLAMAROUTER_NVMLSIM_{key.upper()}"] = value
    return env

"""What a refused request is told: the scheduler says why (`Why`), this says it in the
words and status codes upstream uses (and, for the memory budget, with the figures)."""

from __future__ import annotations

from ..errors import (
    BudgetExceeded,
    InvalidRequest,
    LlamaRouterError,
    ModelFailed,
    ModelNotFound,
    ShuttingDown,
    StartAborted,
    Unavailable,
)
from ..settings.config import RouterConfig
from .memory import MemoryManager
from .process import ModelProcess
from .scheduler import Refuse, Why


def refusal(
    action: Refuse, proc: ModelProcess | None, config: RouterConfig, memory: MemoryManager | None,
    retry_after: float,
) -> LlamaRouterError:
    """The error for a refused waiter; `proc` is the listed model of that name, if any."""
    name, why = action.model, action.why
    if why == Why.SHUTDOWN:
        return ShuttingDown("server is shutting down")
    if why == Why.REMOVED:
        return ModelNotFound(f"model '{name}' not found")
    if why == Why.NOT_LOADED:
        return InvalidRequest("model is not loaded")
    if why == Why.RUNNING:
        return InvalidRequest("model is already running")
    if why == Why.NO_ROOM:
        return LlamaRouterError("model limit reached, try again later")
    if why == Why.DEADLINE:
        wait = config.limits.max_wait or 0.0
        return Unavailable(
            f"model name={name} was not ready within {wait:g}s; try again later", retry_after=retry_after,
        )
    if why == Why.FAILED and proc is not None:
        return ModelFailed(proc.failure_message(), retry_after=action.retry_after)
    if why == Why.ABORTED and proc is not None:
        return StartAborted(f"model name={name} stopped while loading ({proc.stop_reason or 'stopped'})")
    if why == Why.BUDGET and proc is not None and memory is not None:
        return budget_error(proc, memory, action.detail)
    return LlamaRouterError(f"model name={name}: {why}")


def budget_error(proc: ModelProcess, memory: MemoryManager, fixed: int) -> BudgetExceeded:
    """Why `proc` does not fit: its estimate in parts against the budget, and what pinned
    models (`fixed` bytes) hold of it."""
    est = memory.estimate_of(proc)
    budget = _mib(memory.budget)
    if est is None:
        return BudgetExceeded(f"model name={proc.name} does not fit the memory budget {budget}")
    # On a GPU host, the VRAM a child needs beyond its buffers (learned from others).
    overhead = max(memory.footprint(proc) - est.total, 0)
    return BudgetExceeded(
        f"model name={proc.name} needs an estimated {_mib(est.total + overhead)} (weights "
        f"{_mib(est.weights)}, KV cache {_mib(est.kv)} for {est.n_ctx} tokens, compute "
        f"{_mib(est.compute)}" + (f", GPU overhead {_mib(overhead)}" if overhead else "")
        + f") but the memory budget is {budget}"
        + (f" with {_mib(fixed)} held by pinned models" if fixed else "")
    )


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"

"""One exception hierarchy, mapped to OpenAI-shaped HTTP errors in one middleware (app.py)."""

from __future__ import annotations


class LlamaRouterError(Exception):
    """Base class. `status` and `type` are what the client sees."""

    status = 500
    type = "server_error"
    retry_after: float | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(LlamaRouterError):
    """Bad command line, preset or environment; raised before anything is spawned."""


class BinaryNotFound(ConfigError):
    pass


class InvalidRequest(LlamaRouterError):
    status = 400
    type = "invalid_request_error"


class ModelNotFound(InvalidRequest):
    pass


class NotFound(LlamaRouterError):
    status = 404
    type = "not_found_error"


class Unauthorized(LlamaRouterError):
    status = 401
    type = "authentication_error"


class PayloadTooLarge(LlamaRouterError):
    status = 413
    type = "invalid_request_error"


class Unavailable(LlamaRouterError):
    status = 503
    type = "unavailable_error"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueFull(Unavailable):
    pass


class BudgetExceeded(Unavailable):
    """The model cannot fit the memory budget even with every evictable model stopped."""


class ModelFailed(Unavailable):
    """The model is in FAILED state (crash loop exhausted); carries the cause."""


class StartFailed(LlamaRouterError):
    """A load did not reach READY. Upstream answers 500 "model name=X failed to load"."""


class StartAborted(StartFailed):
    """The load was cancelled by an unload, eviction or shutdown while waiting."""


class ShuttingDown(Unavailable):
    pass


class UpstreamError(LlamaRouterError):
    """The child broke the connection or could not be reached."""


class ChildUnreachable(UpstreamError):
    """Connecting to the child failed, so it never saw the request: safe to send again."""


class ChildBroke(UpstreamError):
    """The child took the request but our client got nothing: the connection was reset or
    closed, the response was malformed, or nothing came within the proxy timeout."""


class CommandLineRejected(ConfigError):
    """llama-server refused the command line; `message` is its own text, printed as is."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ListenFailed(LlamaRouterError):
    """An address of --host could not be bound at startup."""

"""The controller's exception tree, one class per thing a caller can get wrong or run into.

    ControllerError
    ├── InvalidRequest        bad input; nothing was stored             -> INVALID_ARGUMENT
    ├── NotFound              unknown pod or capture                    -> NOT_FOUND
    │   ├── PodNotFound
    │   └── CaptureNotFound
    ├── WrongState            pod not running, download too early, ...  -> FAILED_PRECONDITION
    │   └── NoAgentOnNode
    ├── Unauthenticated       no, unknown or malformed credentials      -> UNAUTHENTICATED
    ├── Forbidden             the caller (or, in Kubernetes, the        -> PERMISSION_DENIED
    │                         controller itself) lacks a permission
    ├── LimitExceeded         a limit or quota                          -> RESOURCE_EXHAUSTED
    └── Unavailable           Kubernetes, an agent, S3 or the DB down   -> UNAVAILABLE

The mapping to gRPC status codes lives in one table, `ERRORS` in `_servicer.py`; the rest of the controller only raises.
A client library's exception is chained as `__cause__`.
"""


class ControllerError(Exception):
    """Base of every error the controller reports to a caller; the message is for a person."""


class InvalidRequest(ControllerError):
    pass


class NotFound(ControllerError):
    pass


class PodNotFound(NotFound):
    pass


class CaptureNotFound(NotFound):
    pass


class WrongState(ControllerError):
    pass


class NoAgentOnNode(WrongState):
    pass


class Unauthenticated(ControllerError):
    pass


class Forbidden(ControllerError):
    pass


class LimitExceeded(ControllerError):
    pass


class Unavailable(ControllerError):
    pass

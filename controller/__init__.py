"""podcap's controller: the public CaptureService, pod lookup, agent dispatch and the capture state machine."""

from ._captures import CaptureSettings
from ._quotas import Quotas
from ._retention import RetentionSettings
from ._server import ControllerSettings, serve
from ._tokens import new_token
from ._validation import CaptureLimitsCaps

__all__ = [
    "CaptureLimitsCaps",
    "CaptureSettings",
    "ControllerSettings",
    "Quotas",
    "RetentionSettings",
    "new_token",
    "serve",
]

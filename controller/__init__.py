"""podcap's controller: the public CaptureService, pod lookup, agent dispatch and the capture state machine."""

from ._captures import CaptureSettings
from ._server import ControllerSettings, serve
from ._validation import CaptureLimitsCaps

__all__ = ["CaptureLimitsCaps", "CaptureSettings", "ControllerSettings", "serve"]

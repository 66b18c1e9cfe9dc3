"""podcap's node agent: finds a pod's host-side device, runs tcpdump on it and uploads the pcap."""

from ._model import Limits
from ._server import AgentSettings, serve

__all__ = ["AgentSettings", "Limits", "serve"]

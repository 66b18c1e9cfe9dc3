"""What a failed client command says: what went wrong, then what to do next.

The server's status and message come first, as before (scripts and people grep for them); a line of advice follows
for the mistakes people make most: no controller at the address, no or a wrong token, TLS on one side only, a pod
on a node without an agent, a misspelt pod.
"""

from __future__ import annotations

import re

from ._config import CA_ENV, SERVER_ENV, TOKEN_ENV, ClientSettings

_NO_AGENT = re.compile(r"(?:no podcap agent on node|the podcap agent on node) (\S+)")
_UNREACHABLE = ("failed to connect", "connection refused", "dns resolution failed", "name resolution")


def advise(message: str, settings: ClientSettings) -> str:
    """`message` is ClientError's text ("CODE: details"); returns it with advice on what to do."""
    code, _, details = message.partition(": ")
    lowered = details.lower()
    config = settings.config_file or "~/.config/podcap/config.yaml"
    hint = ""
    agent = _NO_AGENT.search(details)
    if agent:
        node = agent.group(1).rstrip(",;:()")
        hint = (
            f"is the podcap agent DaemonSet running on node {node}? Check with: kubectl get pods -A -o wide "
            f"-l app.kubernetes.io/name=podcap-agent --field-selector spec.nodeName={node}"
        )
    elif code == "UNAVAILABLE" and "capture agent" in lowered:
        hint = "the controller cannot reach that node's podcap agent: check the agent pod on the node and its logs"
    elif code in ("UNAVAILABLE", "DEADLINE_EXCEEDED") and (
        any(s in lowered for s in _UNREACHABLE) or code == "DEADLINE_EXCEEDED"
    ):
        hint = (
            f"no podcap controller answered at {settings.server} (server from {settings.sources.get('server')}); "
            f"check the address, or set it with --server HOST:PORT, ${SERVER_ENV} or 'server:' in {config}"
        )
    elif code == "UNAVAILABLE" and ("ssl" in lowered or "handshake" in lowered or "tls" in lowered):
        hint = (
            f"TLS to {settings.server} failed: give the controller's CA with --ca FILE, ${CA_ENV} or 'ca:' in "
            f"{config}, or drop --tls/ca if the controller serves plaintext"
        )
    elif code == "UNAVAILABLE":
        hint = (
            f"the controller at {settings.server} is unavailable: retry shortly; the address comes from "
            f"{settings.sources.get('server')}"
        )
    elif code == "UNAUTHENTICATED":
        where = (
            "no token was given" if not settings.token else f"the token from {settings.sources.get('token')}"
        )
        hint = (
            f"{where}: set a valid one with ${TOKEN_ENV}, 'token_file:' in {config}, or --token "
            "(an administrator makes one with `podcap token` and adds its hash to the controller's token file)"
        )
    elif code == "PERMISSION_DENIED":
        hint = "ask an administrator of podcap to grant you that action in that namespace (docs/security.md)"
    elif code == "NOT_FOUND" and "pod" in lowered:
        hint = (
            "check the pod's namespace and name (kubectl get pods -n NAMESPACE); a pod without NS/ is looked "
        )
        hint += f"for in the default namespace ({settings.namespace or 'none set'}, from {settings.sources.get('namespace')})"
    elif code == "NOT_FOUND" and "capture" in lowered:
        hint = "`podcap list` shows the captures you can see, with their ids"
    return f"{message}\n  hint: {hint}" if hint else message

"""ListPods: the running pods a caller may capture, for pickers (`podcap pods`, the Wireshark extcap).

A pod is listed only where the caller may CAPTURE, so the list is exactly what a capture would accept. Asked for
one namespace, a caller who may not capture there is refused (PERMISSION_DENIED) before the inventory is asked.
Asked for every namespace, the authoriser is asked once whether it allows capturing everywhere; if not, once per
namespace that has running pods (for Kubernetes RBAC that is one SubjectAccessReview per namespace and call),
and pods in namespaces the caller may not capture in are left out without a word. Listing is reading: it is
authorised and not audited.
"""

from __future__ import annotations

import asyncio

from ._access import AccessControl, Action, Caller
from ._inventory import Inventory, Pod
from ._validation import check_label


async def capturable_pods(
    inventory: Inventory, access: AccessControl, caller: Caller, namespace: str
) -> list[Pod]:
    """Running pods in `namespace` (empty: every namespace) that `caller` may capture, by namespace and name."""
    if namespace:
        check_label("namespace", namespace)
        await access.require(caller, Action.CAPTURE, namespace)
        return await asyncio.to_thread(inventory.running_pods, namespace)
    pods = await asyncio.to_thread(inventory.running_pods, "")
    if await access.namespaces(caller, Action.CAPTURE) is None:
        return pods
    namespaces = sorted({pod.namespace for pod in pods})
    decisions = await asyncio.gather(*(access.allows(caller, Action.CAPTURE, ns) for ns in namespaces))
    allowed = {ns for ns, yes in zip(namespaces, decisions, strict=True) if yes}
    return [pod for pod in pods if pod.namespace in allowed]

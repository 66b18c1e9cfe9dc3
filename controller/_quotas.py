"""Quotas: how many captures one caller may have running, and how many pcap bytes a namespace may fill a day.

Bytes are committed, not only spent: a running capture counts with its `max_bytes` (the most it can still
write), and under a byte quota every new capture gets a `max_bytes` no larger than what is left, split across
its pods. So the namespace's captures of the last 24 hours can never store more than the quota, up to what
the agent writes between two of its size checks (every 200 ms).

The check runs twice: before the audit entry (a refusal is recorded as denied, with the numbers), and again in
the transaction that writes the capture, under a lock per caller and per namespace, so concurrent requests
cannot together pass a quota that each alone would.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timedelta

from podcap.storage import CaptureRepository

from ._errors import LimitExceeded
from ._validation import CaptureRequest

_DAY = timedelta(days=1)
# Below this a capture would end before it showed anything useful; refuse instead of starting it.
MIN_CAPTURE_BYTES = 64 << 10


@dataclass(frozen=True)
class Quotas:
    """0 means no quota."""

    max_active_per_user: int = 0
    max_bytes_per_namespace_per_day: int = 0

    @property
    def enabled(self) -> bool:
        return bool(self.max_active_per_user or self.max_bytes_per_namespace_per_day)


def apply(
    quotas: Quotas,
    repo: CaptureRepository,
    requester: str,
    request: CaptureRequest,
    targets: int,
    now: datetime,
) -> CaptureRequest:
    """The request as the quotas allow it (max_bytes lowered to what is left), or LimitExceeded with numbers."""
    if quotas.max_active_per_user:
        active = repo.active_count(requester)
        if active >= quotas.max_active_per_user:
            raise LimitExceeded(
                f"{requester} has {active} captures running; the quota is {quotas.max_active_per_user} "
                "at once (stop one, or wait for one to end)"
            )
    quota = quotas.max_bytes_per_namespace_per_day
    if not quota:
        return request
    used = repo.bytes_committed(request.namespace, now - _DAY)
    per_target = (quota - used) // targets
    if per_target < MIN_CAPTURE_BYTES:
        raise LimitExceeded(
            f"namespace {request.namespace} has used {used} of its {quota} bytes of captures in the last 24 "
            f"hours (running captures count with their max_bytes); {max(quota - used, 0)} bytes are left, "
            f"less than {MIN_CAPTURE_BYTES} per pod for {targets} pod(s)"
        )
    if request.max_bytes and request.max_bytes <= per_target:
        return request
    return dataclasses.replace(request, max_bytes=per_target)

"""Which HOST of `podcap diagnose --to HOST:PORT` names a Service, by the cluster's DNS scheme, as seen from a pod
in namespace `shop` (the end-to-end ladder is tests/e2e/test_diagnose.py)."""

from __future__ import annotations

import pytest

from podcap.controller._diagnose import service_ref


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("checkout", ("shop", "checkout")),
        ("Checkout", ("shop", "checkout")),  # DNS is case-insensitive
        ("checkout.payments", ("payments", "checkout")),
        ("checkout.payments.svc", ("payments", "checkout")),
        ("checkout.payments.svc.cluster.local", ("payments", "checkout")),
        ("checkout.payments.svc.cluster.local.", ("payments", "checkout")),
        ("checkout.", None),  # absolute: the name "checkout", not a Service
        ("api.example.com", None),
        ("checkout.payments.svc.other.domain", None),
        ("10.96.0.20", None),
        ("fd00::20", None),
        ("under_score", None),  # no Service can be named so
    ],
)
def test_service_names(host: str, expected: tuple[str, str] | None) -> None:
    assert service_ref(host, "shop") == expected

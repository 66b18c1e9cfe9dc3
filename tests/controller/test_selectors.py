"""Label selectors match and fail the way the Kubernetes API server's do."""

import pytest

from podcap.controller._selectors import parse

WEB = {"app": "web", "tier": "frontend", "example.com/team": "shop"}


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("", True),
        ("   ", True),
        ("app=web", True),
        ("app==web", True),
        ("app = web", True),
        ("app=db", False),
        ("app!=db", True),
        ("app!=web", False),
        ("missing!=x", True),
        ("app", True),
        ("missing", False),
        ("!missing", True),
        ("!app", False),
        ("app in (web,db)", True),
        ("app in (db, cache)", False),
        ("missing in (web)", False),
        ("app notin (db)", True),
        ("app notin (web,db)", False),
        ("missing notin (web)", True),
        ("app=web,tier=frontend", True),
        ("app=web,tier=backend", False),
        ("app=web, tier in (frontend), !canary", True),
        ("example.com/team=shop", True),
        ("tier in (frontend,)", True),
        ("label=", False),
    ],
)
def test_selector_matches_like_kubernetes(selector: str, expected: bool) -> None:
    assert parse(selector).matches(WEB) is expected


def test_empty_value_matches_an_empty_label() -> None:
    assert parse("flag=").matches({"flag": ""})
    assert parse("flag in (a,)").matches({"flag": ""})


@pytest.mark.parametrize(
    ("selector", "problem"),
    [
        ("app=web,", "expected a label key"),
        (",app=web", "expected a label key"),
        ("app=web tier=x", "expected ',' or the end"),
        ("app in web", "expected '('"),
        ("app in (web", "missing ')'"),
        ("app in ()", "must not be empty"),
        ("app notin ()", "must not be empty"),
        ("app>3", "'>' operator is not supported"),
        ("-app=web", "label key '-app' is invalid"),
        ("a" * 64 + "=x", "is invalid"),
        ("app=" + "v" * 64, "label value"),
        ("app=we b", "expected ',' or the end"),
        ("Example.com/team=shop", "invalid prefix"),
        ("/team=shop", "invalid prefix"),
        ("!app=web", "expected ',' or the end"),
        ("app=(", "label value '('"),
    ],
)
def test_invalid_selector_is_refused_with_the_reason(selector: str, problem: str) -> None:
    with pytest.raises(ValueError, match="invalid label selector") as raised:
        parse(selector)
    assert problem in str(raised.value)
    assert repr(selector) in str(raised.value)

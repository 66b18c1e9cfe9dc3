"""The token file: what it grants, and the mistakes in it that the controller refuses at start."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from podcap.controller._access import Action, Principal
from podcap.controller._errors import Unauthenticated
from podcap.controller._tokens import TokenFile, TokenFileError, new_token, token_hash

TOKEN, DIGEST = new_token()


def _file(**user: Any) -> dict[str, Any]:
    entry = {"name": "alice", "token_sha256": DIGEST, "grants": [{"role": "support", "namespaces": ["shop"]}]}
    return {"roles": {"support": ["capture", "read"], "admin": ["*"]}, "users": [entry | user]}


def test_a_token_names_its_user_and_the_grants_say_where_it_may_do_what() -> None:
    tokens = TokenFile.parse(
        _file(grants=[{"role": "support", "namespaces": ["shop"]}, {"role": "admin", "namespaces": ["lab"]}])
    )
    alice = asyncio.run(tokens.authenticate(TOKEN))
    assert alice == Principal("alice")
    assert token_hash(TOKEN) == DIGEST and len(TOKEN) >= 43  # 256 random bits
    allowed = {
        (a, ns)
        for a in Action
        for ns in ("shop", "lab", "other")
        if asyncio.run(tokens.allowed(alice, a, ns))
    }
    assert allowed == {(Action.CAPTURE, "shop"), (Action.READ, "shop")} | {(a, "lab") for a in Action}
    assert asyncio.run(tokens.namespaces(alice, Action.READ)) == {"shop", "lab"}
    assert asyncio.run(tokens.namespaces(alice, Action.DELETE)) == {"lab"}
    assert not asyncio.run(tokens.allowed(Principal("mallory"), Action.READ, "shop"))


def test_an_every_namespace_grant_lists_everything() -> None:
    tokens = TokenFile.parse(_file(grants=[{"role": "support", "namespaces": ["*"]}]))
    assert asyncio.run(tokens.namespaces(Principal("alice"), Action.READ)) is None
    assert asyncio.run(tokens.allowed(Principal("alice"), Action.CAPTURE, "anything"))


@pytest.mark.parametrize("token", ["", "wrong", TOKEN + "x", TOKEN[:-1], DIGEST])
def test_anything_but_the_token_itself_is_refused(token: str) -> None:
    with pytest.raises(Unauthenticated):
        asyncio.run(TokenFile.parse(_file()).authenticate(token))


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"roles": {}}, "expected a mapping with a 'users' list"),
        (_file(token_sha256="abc"), "token_sha256 of 'alice' must be 64 hex digits"),
        (_file(name=""), "a user needs a name"),
        (_file(name="anonymous"), "a user needs a name (not '-' or 'anonymous')"),
        (
            _file(grants=[{"role": "root", "namespaces": ["shop"]}]),
            "users[0].grants[0]: expected {role: ROLE",
        ),
        (_file(grants=[{"role": "support", "namespaces": []}]), "namespaces must be a non-empty list"),
        ({"roles": {"r": ["capture", "sniff"]}, "users": []}, "role 'r': 'sniff' is not a valid Action"),
        (
            {
                "users": [_file()["users"][0], _file()["users"][0] | {"name": "bob"}],
                "roles": {"support": ["read"]},
            },
            "'bob' has the same token as another user",
        ),
    ],
)
def test_mistakes_in_the_file_are_refused_saying_where(document: dict[str, Any], message: str) -> None:
    with pytest.raises(TokenFileError, match=r"^token file: ") as refused:
        TokenFile.parse(document)
    assert message in str(refused.value)

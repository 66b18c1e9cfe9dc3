"""Static bearer tokens: a YAML file of users, the sha256 of each one's token, and what each may do where.

    roles:                      # a role is a set of actions
      support: [capture, read, download, stop]
      auditor: [read]
      admin: ["*"]              # every action
    users:
      - name: alice
        token_sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
        grants:
          - {role: support, namespaces: [shop, payments]}
          - {role: auditor, namespaces: ["*"]}   # every namespace

Only hashes are stored, so the file (a Kubernetes Secret, say) does not hold usable credentials; `podcap token`
makes a random token and its hash. A presented token is hashed and compared with every user's hash in constant
time (`hmac.compare_digest`, no early exit), so response times tell nothing about how close a guess was.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ._access import Action, Principal
from ._errors import Unauthenticated

_HEX64 = re.compile(r"[0-9a-f]{64}")
_EVERY = "*"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> tuple[str, str]:
    """A random token (256 bits, URL-safe) and its sha256, the line to put in the token file. The prefix names
    it (for secret scanners and people) and keeps it from starting with `-`, which a command line reads as an
    option (`--token -x...`)."""
    token = "podcap_" + secrets.token_urlsafe(32)
    return token, token_hash(token)


@dataclass(frozen=True)
class _User:
    name: str
    digest: bytes
    # action -> namespaces where it is allowed ("*" for every namespace)
    grants: Mapping[Action, frozenset[str]]


class TokenFileError(ValueError):
    """The token file is not what this module documents; the message says where."""


class TokenFile:
    """Authenticator and Authorizer from a token file, loaded once at start-up."""

    def __init__(self, users: list[_User]) -> None:
        self._users = users
        self._by_name = {user.name: user for user in users}

    @classmethod
    def load(cls, path: Path) -> TokenFile:
        try:
            document = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise TokenFileError(f"cannot read token file {path}: {exc}") from exc
        return cls.parse(document, str(path))

    @classmethod
    def parse(cls, document: Any, source: str = "token file") -> TokenFile:
        if not isinstance(document, dict) or not isinstance(document.get("users"), list):
            raise TokenFileError(f"{source}: expected a mapping with a 'users' list (and optional 'roles')")
        roles = {
            name: _actions(actions, f"{source}: role {name!r}")
            for name, actions in (document.get("roles") or {}).items()
        }
        users: list[_User] = []
        seen_names: set[str] = set()
        seen_hashes: set[str] = set()
        for i, entry in enumerate(document["users"]):
            where = f"{source}: users[{i}]"
            if not isinstance(entry, dict):
                raise TokenFileError(f"{where}: expected a mapping with name, token_sha256 and grants")
            name, digest = str(entry.get("name", "")).strip(), str(entry.get("token_sha256", "")).lower()
            if not name or name in ("-", "anonymous"):
                raise TokenFileError(f"{where}: a user needs a name (not '-' or 'anonymous')")
            if name in seen_names:
                raise TokenFileError(f"{where}: user {name!r} appears twice")
            if not _HEX64.fullmatch(digest):
                raise TokenFileError(
                    f"{where}: token_sha256 of {name!r} must be 64 hex digits (podcap token)"
                )
            if digest in seen_hashes:
                raise TokenFileError(f"{where}: {name!r} has the same token as another user")
            seen_names.add(name)
            seen_hashes.add(digest)
            grants: dict[Action, set[str]] = {}
            for j, grant in enumerate(entry.get("grants") or []):
                gwhere = f"{where}.grants[{j}]"
                if not isinstance(grant, dict) or grant.get("role") not in roles:
                    raise TokenFileError(
                        f"{gwhere}: expected {{role: ROLE, namespaces: [...]}} with a role from 'roles'"
                    )
                namespaces = grant.get("namespaces")
                if (
                    not isinstance(namespaces, list)
                    or not namespaces
                    or not all(isinstance(n, str) and n for n in namespaces)
                ):
                    raise TokenFileError(f'{gwhere}: namespaces must be a non-empty list of names, or ["*"]')
                for action in roles[grant["role"]]:
                    grants.setdefault(action, set()).update(namespaces)
            users.append(_User(name, bytes.fromhex(digest), {a: frozenset(n) for a, n in grants.items()}))
        return cls(users)

    async def authenticate(self, token: str) -> Principal:
        if not token:
            raise Unauthenticated("no credentials: send 'authorization: Bearer TOKEN' (podcap --token)")
        presented = hashlib.sha256(token.encode()).digest()
        found: _User | None = None
        for user in self._users:  # every hash is compared, whichever matches
            if hmac.compare_digest(presented, user.digest):
                found = user
        if found is None:
            raise Unauthenticated("unknown token")
        return Principal(found.name)

    async def allowed(self, principal: Principal, action: Action, namespace: str) -> bool:
        user = self._by_name.get(principal.name)
        if user is None:
            return False
        namespaces = user.grants.get(action, frozenset())
        return _EVERY in namespaces or namespace in namespaces

    async def namespaces(self, principal: Principal, action: Action) -> frozenset[str] | None:
        user = self._by_name.get(principal.name)
        namespaces = user.grants.get(action, frozenset()) if user else frozenset()
        return None if _EVERY in namespaces else namespaces


def _actions(value: Any, where: str) -> frozenset[Action]:
    if not isinstance(value, list) or not value:
        raise TokenFileError(
            f'{where}: expected a list of actions ({", ".join(a.value for a in Action)} or "*")'
        )
    if _EVERY in value:
        return frozenset(Action)
    try:
        return frozenset(Action(v) for v in value)
    except ValueError as exc:
        raise TokenFileError(
            f'{where}: {exc}; actions are {", ".join(a.value for a in Action)} or "*"'
        ) from exc

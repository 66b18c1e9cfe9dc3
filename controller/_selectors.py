"""Kubernetes label selectors, parsed and matched without a cluster.

The static inventory answers `list_pods(namespace, "app=web,tier in (a,b)")` the way the API server would, so
that a selector that works in the lab also works in a cluster and one the API server rejects is rejected here
too. The grammar and the key/value rules follow k8s.io/apimachinery/pkg/labels: comma-separated requirements,
all of which must hold, each equality-based (`a=b`, `a==b`, `a!=b`), existence (`a`, `!a`) or set-based
(`a in (x,y)`, `a notin (x)`). The numeric `>`/`<` operators, which `kubectl` does not document for selectors,
are refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# Longest first, so that "!=" is not read as "!" then "=".
_SYMBOLS = ("==", "!=", "=", "!", "(", ")", ",", ">", "<")
_SPECIAL = frozenset("=!(),><")
_EXACT_OPERATORS = {"=": "=", "==": "=", "!=": "!="}


@dataclass(frozen=True)
class Requirement:
    """One clause: `operator` is "=", "!=", "in", "notin", "exists" or "!exists"."""

    key: str
    operator: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.operator in ("=", "in"):
            return present and value in self.values
        if self.operator in ("!=", "notin"):
            return not present or value not in self.values
        if self.operator == "exists":
            return present
        return not present


@dataclass(frozen=True)
class Selector:
    """All requirements must hold; the empty selector matches every set of labels, as in Kubernetes."""

    requirements: tuple[Requirement, ...]

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(requirement.matches(labels) for requirement in self.requirements)


class _Tokens:
    """The selector's lexemes with one of look-ahead; `None` marks the end."""

    def __init__(self, text: str) -> None:
        self._tokens = list(_lex(text))
        self._position = 0

    def peek(self) -> str | None:
        return self._tokens[self._position] if self._position < len(self._tokens) else None

    def take(self) -> str | None:
        lexeme = self.peek()
        self._position += 1
        return lexeme


def parse(selector: str) -> Selector:
    """The selector, or ValueError saying what is wrong with it."""
    tokens = _Tokens(selector)
    requirements: list[Requirement] = []
    if tokens.peek() is None:
        return Selector(())
    while True:
        try:
            requirements.append(_requirement(tokens))
        except ValueError as error:
            raise ValueError(f"invalid label selector {selector!r}: {error}") from None
        lexeme = tokens.take()
        if lexeme is None:
            return Selector(tuple(requirements))
        if lexeme != ",":
            raise ValueError(
                f"invalid label selector {selector!r}: expected ',' or the end, found {lexeme!r}"
            )


def _requirement(tokens: _Tokens) -> Requirement:
    lexeme = tokens.take()
    if lexeme == "!":
        return Requirement(_key(tokens.take()), "!exists")
    key = _key(lexeme)
    operator = tokens.peek()
    if operator is None or operator == ",":
        return Requirement(key, "exists")
    tokens.take()
    if operator in _EXACT_OPERATORS:
        value = "" if tokens.peek() in (None, ",") else tokens.take()
        return Requirement(key, _EXACT_OPERATORS[operator], frozenset({_value(value)}))
    if operator in ("in", "notin"):
        return Requirement(key, operator, _value_set(tokens, operator))
    raise ValueError(f"expected one of =, ==, !=, in, notin after {key!r}, found {operator!r}")


def _value_set(tokens: _Tokens, operator: str) -> frozenset[str]:
    if tokens.take() != "(":
        raise ValueError(f"expected '(' after {operator!r}")
    values: list[str] = []
    expecting_value = True
    while (lexeme := tokens.take()) != ")":
        if lexeme is None:
            raise ValueError("missing ')'")
        if lexeme == ",":
            if expecting_value:
                values.append("")
            expecting_value = True
        elif expecting_value and lexeme not in _SYMBOLS:
            values.append(_value(lexeme))
            expecting_value = False
        else:
            raise ValueError(f"expected a value or ')' in the {operator!r} set, found {lexeme!r}")
    if expecting_value and values:
        values.append("")
    if not values:
        raise ValueError(f"the {operator!r} set must not be empty")
    return frozenset(values)


def _key(lexeme: str | None) -> str:
    if lexeme is None or lexeme in _SYMBOLS or lexeme in ("in", "notin"):
        raise ValueError(f"expected a label key, found {'the end' if lexeme is None else repr(lexeme)}")
    prefix, _, name = lexeme.rpartition("/")
    if "/" in lexeme and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        raise ValueError(f"label key {lexeme!r} has an invalid prefix (a DNS subdomain is expected)")
    if not name or len(name) > 63 or not _NAME.match(name):
        raise ValueError(
            f"label key {lexeme!r} is invalid: at most 63 characters of [A-Za-z0-9-_.], "
            "starting and ending with a letter or digit"
        )
    return lexeme


def _value(lexeme: str | None) -> str:
    lexeme = lexeme or ""
    if lexeme in _SYMBOLS or len(lexeme) > 63 or not _NAME.match(lexeme):
        raise ValueError(
            f"label value {lexeme!r} is invalid: at most 63 characters of [A-Za-z0-9-_.], "
            "starting and ending with a letter or digit"
        )
    return lexeme


def _lex(text: str) -> Iterator[str]:
    position = 0
    while position < len(text):
        char = text[position]
        if char.isspace():
            position += 1
            continue
        if char in _SPECIAL:
            symbol = next(s for s in _SYMBOLS if text.startswith(s, position))
            if symbol in (">", "<"):
                raise ValueError(f"invalid label selector {text!r}: the {symbol!r} operator is not supported")
            yield symbol
            position += len(symbol)
            continue
        end = position
        while end < len(text) and not text[end].isspace() and text[end] not in _SPECIAL:
            end += 1
        yield text[position:end]
        position = end

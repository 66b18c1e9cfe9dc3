"""Where the client commands' server, token, CA and default namespace come from, resolved once per command.

Flags over environment over the config file over built-in defaults; the kubectl plugin adds the current kubeconfig
context's namespace below the file, as kubectl does. Every value remembers its source, so `podcap config` can say
where it came from. The environment variable names are written here and nowhere else. yaml is imported only when
a file is actually read (CLI start-up time, bench/cli_start.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SERVER_ENV = "PODCAP_SERVER"
TOKEN_ENV = "PODCAP_TOKEN"  # noqa: S105  # the variable's name, not a token
CA_ENV = "PODCAP_CA"
NAMESPACE_ENV = "PODCAP_NAMESPACE"
CONFIG_ENV = "PODCAP_CONFIG"
DEFAULT_SERVER = "127.0.0.1:7070"

# key: the type a file's value must have
_FILE_KEYS: dict[str, type] = {
    "server": str,
    "token": str,
    "token_file": str,
    "ca": str,
    "tls": bool,
    "namespace": str,
}


class ConfigError(Exception):
    """A config file or kubeconfig that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class ClientSettings:
    """What a client command connects with; `sources` says where each value came from."""

    server: str = DEFAULT_SERVER
    token: str = ""
    ca: Path | None = None
    tls: bool = False
    namespace: str = ""
    config_file: Path | None = None
    config_found: bool = False
    sources: Mapping[str, str] = field(default_factory=dict)


def config_path(environ: Mapping[str, str]) -> tuple[Path, bool]:
    """The config file and whether it was named explicitly ($PODCAP_CONFIG): a named file must exist."""
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV]).expanduser(), True
    base = environ.get("XDG_CONFIG_HOME") or str(Path(environ.get("HOME", "~")).expanduser() / ".config")
    return Path(base) / "podcap" / "config.yaml", False


def _load_yaml(path: Path, what: str) -> Any:
    import yaml

    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror or exc}") from exc
    try:
        return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506  # safe loaders
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from exc


def read_config_file(path: Path) -> dict[str, Any]:
    """The file's keys, checked: a mapping of the known keys, each of its type; paths relative to the file."""
    data = _load_yaml(path, "config file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of keys ({', '.join(_FILE_KEYS)})")
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in _FILE_KEYS:
            raise ConfigError(
                f"config file {path}: unknown key {key!r}; the keys are {', '.join(_FILE_KEYS)}"
            )
        wanted = _FILE_KEYS[key]
        if not isinstance(value, wanted):
            raise ConfigError(
                f"config file {path}: {key} must be {'true or false' if wanted is bool else 'a string'}, "
                f"not {type(value).__name__} {value!r}"
            )
        # paths in the file are relative to it
        values[key] = (
            str(path.parent / Path(str(value)).expanduser()) if key in ("ca", "token_file") else value
        )
    if "token" in values and "token_file" in values:
        raise ConfigError(f"config file {path}: give token or token_file, not both")
    return values


def kubeconfig_namespace(environ: Mapping[str, str]) -> tuple[str, str]:
    """The namespace of the current kubeconfig context and where it came from, as kubectl finds it: the files of
    $KUBECONFIG (first current-context and first definition of each context win) or ~/.kube/config."""
    if environ.get("KUBECONFIG"):
        files = [Path(p).expanduser() for p in environ["KUBECONFIG"].split(os.pathsep) if p]
    else:
        files = [Path(environ.get("HOME", "~")).expanduser() / ".kube" / "config"]
    current = ""
    contexts: dict[str, Any] = {}
    for path in files:
        if not path.is_file():
            continue
        data = _load_yaml(path, "kubeconfig")
        if not isinstance(data, dict):
            continue
        current = current or str(data.get("current-context") or "")
        for entry in data.get("contexts") or []:
            if isinstance(entry, dict) and entry.get("name"):
                contexts.setdefault(str(entry["name"]), entry.get("context") or {})
    context = contexts.get(current)
    if isinstance(context, dict) and context.get("namespace"):
        return str(context["namespace"]), f"kubeconfig context {current}"
    return (
        "default",
        "default (kubeconfig context has no namespace)" if current else "default (no kubeconfig)",
    )


def resolve(
    flags: Mapping[str, Any], environ: Mapping[str, str] | None = None, *, kubectl: bool = False
) -> ClientSettings:
    """`flags` holds what was given on the command line (None: not given) under server, token, ca, tls and
    namespace; the rest comes from the environment, the config file and the defaults, in that order."""
    env = os.environ if environ is None else environ
    path, explicit = config_path(env)
    file_values: dict[str, Any] = {}
    found = path.exists()
    if explicit and not found:
        raise ConfigError(f"config file {path} (from ${CONFIG_ENV}) does not exist")
    if found:
        file_values = read_config_file(path)
    in_file = f"file {path}"
    env_names = {"server": SERVER_ENV, "token": TOKEN_ENV, "ca": CA_ENV, "namespace": NAMESPACE_ENV}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in ("server", "token", "ca", "tls", "namespace"):
        flag = flags.get(key)
        name = env_names.get(key)
        if flag not in (None, ""):
            values[key], sources[key] = flag, f"flag --{key}"
        elif name and env.get(name):
            values[key], sources[key] = env[name], f"env ${name}"
        elif key in file_values:
            values[key], sources[key] = file_values[key], in_file
        elif key == "token" and "token_file" in file_values:
            token_path = Path(file_values["token_file"])
            try:
                values[key] = token_path.read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"config file {path}: token_file {token_path} cannot be read: {exc.strerror or exc}"
                ) from exc
            sources[key] = f"token_file {token_path} (named in {in_file})"
        elif key == "namespace" and kubectl:
            values[key], sources[key] = kubeconfig_namespace(env)
        else:
            sources[key] = "default"
    ca = values.get("ca")
    return ClientSettings(
        server=str(values.get("server", DEFAULT_SERVER)),
        token=str(values.get("token", "")),
        ca=Path(ca) if ca else None,
        tls=bool(values.get("tls", False)),
        namespace=str(values.get("namespace", "")),
        config_file=path,
        config_found=found,
        sources=sources,
    )


def describe(settings: ClientSettings) -> dict[str, Any]:
    """What `podcap config` shows: each value and its source; the token only as set or not."""
    s = settings.sources
    token = f"set (from {s['token']})" if settings.token else "not set"
    return {
        "config_file": f"{settings.config_file}" + ("" if settings.config_found else " (not found)"),
        "server": {"value": settings.server, "source": s["server"]},
        "token": {"value": token, "source": s["token"]},
        "ca": {"value": str(settings.ca) if settings.ca else "", "source": s["ca"]},
        "tls": {"value": settings.tls or settings.ca is not None, "source": s["tls"]},
        "namespace": {"value": settings.namespace, "source": s["namespace"]},
    }

"""The layer rules of DESIGN.md, checked on the source: a violation fails the build, not a code review.

- storage imports neither controller nor agent (nor the CLI);
- controller and agent never import each other; they share podcap.api, and podcap.storage, of which the agent
  uses only the object store it uploads to (SQL is the controller's);
- grpc only in servicer/client/server modules; boto3 only in the S3 store; kubernetes only in the Kubernetes
  inventory; subprocess calls to tcpdump in one module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "podcap.storage": ROOT / "storage",
    "podcap.controller": ROOT / "controller",
    "podcap.agent": ROOT / "capture-agent",
    "podcap.cli": ROOT / "cli",
    "podcap.api": ROOT / "proto" / "podcap" / "api",
}
FORBIDDEN = {
    "podcap.storage": ("podcap.controller", "podcap.agent", "podcap.cli"),
    "podcap.controller": ("podcap.agent", "podcap.cli"),
    "podcap.agent": ("podcap.controller", "podcap.cli"),
    "podcap.api": ("podcap.controller", "podcap.agent", "podcap.storage", "podcap.cli"),
}
# Third-party modules confined to the named modules (path relative to the repo root).
CONFINED = {
    "grpc": {
        "controller/_servicer.py",
        "controller/_server.py",
        "controller/_agents.py",
        "capture-agent/_servicer.py",
        "capture-agent/_server.py",
        "cli/_client.py",
        "proto/podcap/api/status.py",
        "proto/podcap/api/serving.py",
        "proto/podcap/api/malformed.py",
    },
    "boto3": {"storage/_s3.py"},
    "botocore": {"storage/_s3.py"},
    "kubernetes": {"controller/_kube.py"},
}


def _imports(path: Path, package: str) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                names.add(package)  # relative: stays inside its own package
            elif node.module:
                names.add(node.module)
    return names


def _sources() -> list[tuple[str, Path]]:
    return [
        (package, path)
        for package, folder in PACKAGES.items()
        for path in sorted(folder.rglob("*.py"))
        if not path.name.endswith(("_pb2.py", "_pb2_grpc.py"))
    ]


@pytest.mark.parametrize(("package", "path"), _sources(), ids=lambda v: str(v).replace(str(ROOT) + "/", ""))
def test_module_respects_layers(package: str, path: Path) -> None:
    imported = _imports(path, package)
    relative = str(path.relative_to(ROOT))
    for forbidden in FORBIDDEN.get(package, ()):
        offending = sorted(n for n in imported if n == forbidden or n.startswith(forbidden + "."))
        assert not offending, f"{relative} imports {offending}, which the layer rules forbid"
    for module, allowed in CONFINED.items():
        uses = sorted(n for n in imported if n == module or n.startswith(module + "."))
        if uses:
            assert relative in allowed, f"{relative} imports {uses}; only {sorted(allowed)} may"


# What the agent may take from podcap.storage: the object store it uploads to, never the SQL side.
AGENT_STORAGE_NAMES = {"ObjectStore", "StoredObject", "StorageError", "Upload", "context_key", "open_store"}


@pytest.mark.parametrize("path", sorted((ROOT / "capture-agent").rglob("*.py")), ids=lambda p: p.name)
def test_the_agent_uses_only_the_object_store_of_storage(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    taken = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("podcap.storage")
        for alias in node.names
    }
    assert taken <= AGENT_STORAGE_NAMES, (
        f"{path.name} takes {sorted(taken - AGENT_STORAGE_NAMES)} from podcap.storage"
    )


def test_the_agent_starts_without_the_sql_side() -> None:
    """Importing the agent loads neither SQLAlchemy nor Alembic: podcap.storage hands out its names lazily."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, podcap.agent._server; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert not [m for m in loaded if m.split(".")[0] in {"sqlalchemy", "alembic"}]


def test_storage_names_agree_for_the_lazy_loader_type_checkers_and_star_imports() -> None:
    import podcap.storage

    tree = ast.parse((ROOT / "storage" / "__init__.py").read_text())
    type_checking = next(node for node in tree.body if isinstance(node, ast.If))
    typed = {
        alias.name: f".{imported.module}"
        for imported in type_checking.body
        if isinstance(imported, ast.ImportFrom)
        for alias in imported.names
    }
    assert typed == podcap.storage._HOME
    assert sorted(podcap.storage.__all__) == sorted(typed)
    for name in podcap.storage.__all__:
        assert getattr(podcap.storage, name) is not None

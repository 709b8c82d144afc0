"""Imports point one way: the domain depends on nothing of ours, the adapters on the
domain and shared infrastructure, never on each other's internals."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from tests.sidecar import REPO

APP = REPO / "app"
# The composition root wires the parts together; the actions are the application
# services; the adapters face HTTP callers (api), AWS (aws) and the store (queue).
COMPOSITION = ("app.main", "app.state", "app.server", "app.__main__")
SERVICES = ("app.actions",)
ADAPTERS = ("app.api", "app.aws", "app.queue")
INFRASTRUCTURE = ("app.config", "app.runtime")
# The one interface of the actions the adapters may know: what answers for AWS.
PORTS = ("app.actions.backend",)
# The api's route modules; nothing else in app.api renders through them.
ROUTES = ("app.api.routes",)
# Every package of app and what it is for: a newcomer finds where a thing is decided.
PACKAGES = {
    "app.actions": "the four actions and what answers them",
    "app.api": "HTTP surfaces",
    "app.api.routes": "one router per surface",
    "app.aws": "credentials, signing, the HTTP client, AWS's answers",
    "app.metering": "the domain",
    "app.queue": "the durable usage queue",
    "app.runtime": "shared at run time",
    "app.server": "the listeners",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _all_imports() -> dict[str, set[str]]:
    """Every module of app, and every module it imports (at any depth of its code)."""
    found: dict[str, set[str]] = {}
    for path in sorted(APP.rglob("*.py")):
        name = _module_name(path)
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        found[name] = targets
    return found


ALL_IMPORTS = _all_imports()
# The app modules each module imports.
IMPORTS = {
    module: {t for t in targets if t == "app" or t.startswith("app.")}
    for module, targets in ALL_IMPORTS.items()
}
# Outbound HTTP is httpx's own transport (httpcore): the sidecar's own HTTP/1.1
# client on httptools and the aiohttp transport are gone, and stay gone. (uvicorn's
# server uses httptools; uvicorn's modules are not these.)
RETIRED_HTTP_CLIENTS = ("httptools", "aiohttp", "httpx_aiohttp")


def _within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _offences(source: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{module} imports {target}"
        for module, targets in IMPORTS.items()
        if _within(module, source)
        for target in targets
        if _within(target, forbidden) and not _within(target, source) and not _within(target, PORTS)
    )


def test_the_rules_see_every_module() -> None:
    assert "app.metering.grains" in IMPORTS
    assert "app.api.context" in IMPORTS
    assert "app.metering.grains" in IMPORTS["app.queue.plan"]


def test_no_module_imports_a_retired_http_client() -> None:
    offences = sorted(
        f"{module} imports {target}"
        for module, targets in ALL_IMPORTS.items()
        for target in targets
        if _within(target, RETIRED_HTTP_CLIENTS)
    )
    assert offences == []
    # The rule sees third-party imports (the one client's own).
    assert {"httpx", "botocore.auth"} <= ALL_IMPORTS["app.aws.http_client"] | ALL_IMPORTS[
        "app.aws.signing"
    ]


def test_the_domain_depends_on_nothing_of_ours() -> None:
    offences = sorted(
        f"{module} imports {target}"
        for module, targets in IMPORTS.items()
        if _within(module, ("app.metering",))
        for target in targets
        if not _within(target, ("app.metering",))
    )
    assert offences == []


def test_shared_infrastructure_depends_on_no_adapter() -> None:
    assert _offences(INFRASTRUCTURE, ADAPTERS + COMPOSITION + SERVICES) == []


@pytest.mark.parametrize("adapter", ["app.aws", "app.queue"])
def test_an_adapter_imports_no_other_adapter(adapter: str) -> None:
    others = tuple(a for a in ADAPTERS if a != adapter)
    assert _offences((adapter,), others + COMPOSITION + SERVICES) == []


def test_the_api_uses_the_queue_through_its_interface_only() -> None:
    internals = [
        f"{module} imports {target}"
        for module, targets in IMPORTS.items()
        if _within(module, ("app.api",))
        for target in targets
        if _within(target, ("app.queue",))
        and not _within(target, ("app.queue.usage_queue", "app.queue.records"))
    ]
    assert internals == []
    assert _offences(("app.api",), ("app.aws",)) == []


def test_nothing_in_the_api_renders_through_a_route_module() -> None:
    offences = [
        f"{module} imports {target}"
        for module, targets in IMPORTS.items()
        if _within(module, ("app.api",))
        and not _within(module, ROUTES)
        # The operations listener serves the probe routes.
        and module != "app.api.ops_listener"
        for target in targets
        if _within(target, ROUTES)
    ]
    assert offences == []


def test_route_dependencies_are_coroutines() -> None:
    # FastAPI runs a plain-function dependency in a worker thread: a thread-pool
    # hop on every request of the route, for what is a lookup.
    from fastapi.dependencies.models import Dependant
    from fastapi.routing import APIRoute

    from app.main import ROUTERS

    def sync_calls(dependant: Dependant) -> list[str]:
        found = [
            f"{d.call.__module__}.{d.call.__qualname__}"
            for d in dependant.dependencies
            if d.call is not None and not inspect.iscoroutinefunction(d.call)
        ]
        return found + [name for d in dependant.dependencies for name in sync_calls(d)]

    routes = [r for router in ROUTERS for r in router.routes if isinstance(r, APIRoute)]
    assert len(routes) > 10
    offences = sorted(
        f"{route.path}: {name}" for route in routes for name in sync_calls(route.dependant)
    )
    assert offences == []


def test_every_module_name_is_used_once() -> None:
    """A module's name says where it lives: no two modules share one (``models.py`` in
    two packages, ``entitlement.py`` twice, ``ops`` three ways, as there once were)."""
    names: dict[str, list[str]] = {}
    for path in sorted(APP.rglob("*.py")):
        if path.name not in ("__init__.py", "__main__.py"):
            names.setdefault(path.stem, []).append(str(path.relative_to(REPO)))
    assert {name: paths for name, paths in names.items() if len(paths) > 1} == {}
    packages = {_module_name(p.parent) for p in APP.rglob("*.py")} - {"app"}
    for package in packages:
        assert package.rsplit(".", 1)[-1] not in names, f"{package} shares a module's name"


def test_the_tree_shows_the_layers() -> None:
    """Only the entry points, the settings, the composition root and its state sit at
    the top; every other module is in a package named for its layer."""
    top = sorted(p.name for p in APP.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "config.py", "main.py", "state.py"]
    packages = sorted(_module_name(p.parent) for p in APP.rglob("__init__.py") if p.parent != APP)
    assert packages == sorted(PACKAGES)
    for package in PACKAGES:
        init = REPO / package.replace(".", "/") / "__init__.py"
        assert ast.get_docstring(ast.parse(init.read_text())), f"{package} says what it is for"

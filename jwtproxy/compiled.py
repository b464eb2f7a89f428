"""Which modules of the request path run compiled, and how to run them as pure Python instead.

Theory of operation
-------------------
The modules in :data:`HOT_MODULES` are the source of truth as plain Python. When jwtproxy is
installed on a machine with a C compiler, ``setup.py`` also compiles them with mypyc (the compiler
that ships with mypy, used the same way by black and mypy itself): the same source, each module
built into an extension that Python's import system prefers to the ``.py`` beside it. Where
compiling is impossible (no compiler, mypyc absent, a build error) the install falls back to the
pure-Python modules and says so; so does ``JWTPROXY_PURE_PYTHON=1`` at build time.

At run time ``JWTPROXY_PURE_PYTHON=1`` selects the pure-Python modules even when compiled ones
are installed: :func:`select` (called by the package's ``__init__``, before any of these modules
is imported) puts a finder first on ``sys.meta_path`` that loads each of them from its ``.py``.
It does the same when a module's source is newer than its extension (edited after an editable
install built it), so an edit always takes effect.
The test suite runs on both (``.ci/run``), and the daemon says once at start which it runs
(:func:`describe`).

Behaviour is the same either way; a compiled class differs in what a program may do to it at run
time (its methods cannot be replaced, as a test's ``monkeypatch`` would), which the code never does.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType

# The request path: codec, routing, header policy, the connection and its state machine, the auth
# stage, verifier, JOSE parsing and JSON, the token cache, identity rendering, the upstream side,
# and the per-request metrics. Measured in docs/performance.md; setup.py compiles exactly these.
HOT_MODULES: tuple[str, ...] = (
    "jose",
    "strictjson",
    "identity",
    "tokencache",
    "routing",
    "codec",
    "responses",
    "headerpolicy",
    "lifecycle",
    "verifier",
    "auth",
    "connection",
    "upstream",
    "metrics",
    "sharedtable",
    "ratelimit",
    "outbox",
)

PURE_ENV = "JWTPROXY_PURE_PYTHON"
PACKAGE = "jwtproxy"
# A source this much newer than its extension was edited after the build (an installer writes
# both within a second or two).
STALE_AFTER = 2.0

_stale: list[str] = []  # set by select(): hot modules whose extension is older than its source


def pure_requested(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Whether ``JWTPROXY_PURE_PYTHON`` asks for the pure-Python modules (any value but ``""``/``0``)."""
    return environ.get(PURE_ENV, "") not in ("", "0")


class PurePythonFinder(importlib.abc.MetaPathFinder):
    """Finds the hot modules as their ``.py`` source, ahead of any compiled extension."""

    def __init__(self, package_dir: str) -> None:
        self.package_dir = package_dir
        self.names = {f"{PACKAGE}.{name}" for name in HOT_MODULES}

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.names:
            return None
        source = os.path.join(self.package_dir, fullname.rpartition(".")[2] + ".py")
        if not os.path.exists(source):
            return None
        return importlib.util.spec_from_file_location(fullname, source)


def stale_extensions(package_dir: str) -> list[str]:
    """Hot modules whose compiled extension is older than their source: edited since the build
    (an editable install builds in place), so the extension would run code that is not there."""
    stale = []
    for name in HOT_MODULES:
        try:
            source = os.stat(os.path.join(package_dir, name + ".py")).st_mtime
        except OSError:
            continue
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            try:
                built = os.stat(os.path.join(package_dir, name + suffix)).st_mtime
            except OSError:
                continue
            if source > built + STALE_AFTER:
                stale.append(name)
            break
    return stale


def select(package_dir: str) -> None:
    """Install the pure-Python finder when ``JWTPROXY_PURE_PYTHON`` asks for it, or when a compiled
    module is older than its source: then all of them run from source (idempotent)."""
    if any(isinstance(finder, PurePythonFinder) for finder in sys.meta_path):
        return
    if not pure_requested():
        _stale[:] = stale_extensions(package_dir)
        if not _stale:
            return
    sys.meta_path.insert(0, PurePythonFinder(package_dir))


def is_compiled(module: ModuleType) -> bool:
    """Whether ``module`` was loaded from a compiled extension rather than its source."""
    origin = getattr(module, "__file__", None) or ""
    return origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def compiled_modules() -> list[str]:
    """The hot modules that run compiled in this process (importing them if needed)."""
    found = []
    for name in HOT_MODULES:
        module = importlib.import_module(f"{PACKAGE}.{name}")
        if is_compiled(module):
            found.append(name)
    return found


def describe() -> str:
    """One line for the start log: compiled or pure Python, and why pure."""
    compiled = compiled_modules()
    if len(compiled) == len(HOT_MODULES):
        return f"compiled ({len(compiled)} modules, mypyc)"
    if compiled:
        return f"partly compiled ({len(compiled)} of {len(HOT_MODULES)} modules: {', '.join(compiled)})"
    if pure_requested():
        return f"pure Python ({PURE_ENV} is set)"
    if _stale:
        return (f"pure Python (compiled modules older than their source: {', '.join(_stale)}; "
                "rebuild with pip install -e .)")
    return "pure Python (this install has no compiled modules: built without a C compiler or mypyc)"

"""Build jwtproxy: the request path's modules compiled with mypyc where that can be done.

The pure-Python modules are the source of truth and are always installed. On a machine with a C
compiler and mypy, the modules listed in ``jwtproxy/compiled.py`` (``HOT_MODULES``) are also
compiled from that same source into extensions, which Python then imports instead. Without a
compiler, without mypyc, with ``JWTPROXY_PURE_PYTHON=1`` set, or when compiling fails, the install
goes on with pure Python only and says so (the daemon says which at start, too).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


def _hot_modules() -> tuple[str, ...]:
    # jwtproxy/compiled.py imports only the standard library, so it can be read before the
    # package's dependencies are installed.
    spec = importlib.util.spec_from_file_location("_jwtproxy_compiled", HERE / "jwtproxy" / "compiled.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return tuple(module.HOT_MODULES)


def _say(message: str) -> None:
    print(f"jwtproxy build: {message}", file=sys.stderr)


def _compiler_missing() -> str | None:
    compiler = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    program = compiler.split()[0]
    if shutil.which(program) is None:
        return f"no C compiler ({program} not found)"
    return None


def _remove_stale_extensions() -> None:
    """Not compiling: remove this interpreter's extensions of the hot modules left in the tree by
    an earlier editable build, which would otherwise shadow the sources being installed."""
    from importlib.machinery import EXTENSION_SUFFIXES

    for name in _hot_modules():
        for suffix in EXTENSION_SUFFIXES:
            (HERE / "jwtproxy" / f"{name}{suffix}").unlink(missing_ok=True)


def _extensions() -> list:
    found = _compiled_extensions()
    if not found:
        _remove_stale_extensions()
    return found


def _compiled_extensions() -> list:
    if os.environ.get("JWTPROXY_PURE_PYTHON", "") not in ("", "0"):
        _say("JWTPROXY_PURE_PYTHON is set: installing the pure-Python modules only")
        return []
    missing = _compiler_missing()
    if missing is not None:
        _say(f"{missing}: installing the pure-Python modules only (slower request path)")
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        _say("mypyc is not available: installing the pure-Python modules only (slower request path)")
        return []
    paths = [f"jwtproxy/{name}.py" for name in _hot_modules()]
    # Third-party packages are never read (--no-site-packages): their types are Any, whether or
    # not the build environment happens to have them installed, so every build compiles the same
    # code. That costs nothing (calls into them are generic calls either way) and keeps mypyc from
    # checking their values against their annotations at run time (h11 annotates as bytes what is
    # a bytearray).
    try:
        return mypycify(["--no-site-packages", "--ignore-missing-imports", *paths], opt_level="3")
    except (Exception, SystemExit) as exc:  # mypyc reports type errors by exiting
        _say(f"mypyc could not compile the request path ({exc!r}): installing pure Python only")
        return []


class OptionalBuildExt(build_ext):
    """Compile the extensions; if any of them fails, remove them all and install pure Python.

    All or nothing: mypyc's modules share one runtime library, and a half-compiled install
    would mix the two for no gain.
    """

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # CompileError, LinkError, a missing header...
            self._remove_outputs()
            _say(f"compiling the request path failed ({exc}): installing the pure-Python modules only")

    def _remove_outputs(self) -> None:
        for ext in self.extensions:
            for inplace in (0, 1):
                self.inplace = inplace
                try:
                    Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
                except OSError:
                    pass


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})

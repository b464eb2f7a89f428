"""The request path compiled or pure Python (jwtproxy.compiled, setup.py): selectable, and said."""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import jwtproxy
from daemon_harness import Daemon, free_port
from helpers import AUDIENCE, ISSUER, Backend
from jwtproxy import compiled

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = os.path.dirname(jwtproxy.__file__)


def run_python(code: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k != compiled.PURE_ENV}
    environ.update(env)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=environ, cwd="/", timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_every_hot_module_is_a_module_of_the_package() -> None:
    for name in compiled.HOT_MODULES:
        assert os.path.exists(os.path.join(PACKAGE_DIR, name + ".py")), name
    assert "compiled" not in compiled.HOT_MODULES  # it decides, so it must not be among them


def test_pure_python_is_selected_by_the_environment() -> None:
    out = run_python(
        """
        import importlib
        from jwtproxy import compiled
        for name in compiled.HOT_MODULES:
            module = importlib.import_module("jwtproxy." + name)
            print(module.__file__)
        print(compiled.describe())
        """,
        JWTPROXY_PURE_PYTHON="1",
    )
    *files, described = out.strip().splitlines()
    assert len(files) == len(compiled.HOT_MODULES)
    assert all(f.endswith(".py") for f in files), files
    assert described == "pure Python (JWTPROXY_PURE_PYTHON is set)"


def test_zero_means_not_set() -> None:
    assert not compiled.pure_requested({"JWTPROXY_PURE_PYTHON": "0"})
    assert not compiled.pure_requested({"JWTPROXY_PURE_PYTHON": ""})
    assert not compiled.pure_requested({})
    assert compiled.pure_requested({"JWTPROXY_PURE_PYTHON": "1"})


def test_without_the_variable_an_install_runs_what_it_built() -> None:
    out = run_python(
        """
        from jwtproxy import compiled
        print(len(compiled.compiled_modules()))
        print(compiled.describe())
        """
    )
    count, described = out.strip().splitlines()
    built = [name for name in compiled.HOT_MODULES if any(
        f.startswith(name + ".") and f.endswith(".so") and f".cpython-{sys.version_info[0]}{sys.version_info[1]}" in f
        for f in os.listdir(PACKAGE_DIR))]
    assert int(count) == len(built)
    if built:
        assert described == f"compiled ({len(compiled.HOT_MODULES)} modules, mypyc)"
    else:
        assert described.startswith("pure Python (this install has no compiled modules")


def test_the_running_tests_say_which_path_they_test() -> None:
    # The conftest's report header and the pure_python marker depend on this being right.
    running_compiled = bool(compiled.compiled_modules())
    assert running_compiled == (not compiled.pure_requested() and any(
        os.path.exists(os.path.join(PACKAGE_DIR, "connection" + suffix))
        for suffix in importlib.machinery.EXTENSION_SUFFIXES))


@pytest.mark.slow
async def test_the_daemon_says_at_start_which_it_runs(tmp_path: Path, backend: Backend, jwks_path: str) -> None:
    # The daemon inherits this process's environment (and so its JWTPROXY_PURE_PYTHON).
    daemon = Daemon(tmp_path, dict(listen_port=free_port(), admin_port=free_port(), backend_port=backend.port,
                                   jwks_file=jwks_path, tmp=tmp_path, issuer=ISSUER, audience=AUDIENCE))
    try:
        await daemon.wait_ready()
        starting = [json.loads(line) for line in daemon.log().splitlines() if '"event":"starting"' in line]
    finally:
        daemon.kill()
    assert len(starting) == 1
    assert starting[0]["request_path"] == compiled.describe()


def test_a_build_without_a_compiler_installs_pure_python(tmp_path: Path) -> None:
    # setup.py's first fallback: no compiler found, the modules are installed from source only,
    # and the build says so (in a copy of the tree, without the network).
    pytest.importorskip("setuptools", reason="setuptools is not installed here (pip's build isolation brings it)")
    copy = tmp_path / "src"
    shutil.copytree(ROOT / "jwtproxy", copy / "jwtproxy",
                    ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, copy / name)
    environ = {k: v for k, v in os.environ.items() if k != compiled.PURE_ENV}
    environ["CC"] = "/nonexistent/cc"
    done = subprocess.run([sys.executable, "setup.py", "-q", "build", "--build-base", str(tmp_path / "build")],
                          cwd=copy, capture_output=True, text=True, env=environ, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "jwtproxy build: no C compiler (/nonexistent/cc not found)" in done.stderr
    built = {p.relative_to(tmp_path / "build").as_posix() for p in (tmp_path / "build").rglob("*") if p.is_file()}
    assert "lib/jwtproxy/connection.py" in built
    assert not [name for name in built if name.endswith(".so")], built


@pytest.mark.skipif(not compiled.compiled_modules(), reason="this install is pure Python: nothing compiled to compare")
def test_compiled_and_pure_answer_alike() -> None:
    # One check of the same source both ways, beyond the suite itself (which runs both ways in
    # .ci/run): the strict JSON reader and the target normaliser on inputs they refuse and accept.
    code = """
        from jwtproxy import strictjson, routing
        out = []
        for raw in (b'{"a":1}', b'{"a":1,"a":2}', b'[1e400]', b'{"x":"\\\\ud800"}'):
            try:
                out.append(repr(strictjson.loads(raw)))
            except Exception as exc:
                out.append(type(exc).__name__)
        for target in (b"/a/./b?x", b"/a/../../b", b"/a%2fb", b"http://h:1/x"):
            try:
                out.append(repr(routing.normalise_target(target)))
            except routing.BadRequest as exc:
                out.append(f"{exc.status} {exc.description}")
        print("\\n".join(out))
        """
    assert run_python(code) == run_python(code, JWTPROXY_PURE_PYTHON="1")


def test_a_source_edited_after_the_build_runs_from_source(tmp_path: Path) -> None:
    # An editable install builds its extensions in place; a module edited afterwards must not be
    # shadowed by the older extension, so every hot module then runs from source, and it is said.
    package = tmp_path / "jwtproxy"
    shutil.copytree(PACKAGE_DIR, package, ignore=shutil.ignore_patterns("__pycache__"))
    code = """
        from jwtproxy import compiled
        import jwtproxy.connection as connection
        print(connection.__file__)
        print(compiled.describe())
        """
    environ = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    edited = package / "connection.py"
    # This interpreter's extension only (a tree tested by several Pythons holds several).
    extension = [package / f"connection{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES
                 if (package / f"connection{suffix}").exists()]
    for ext in extension:
        os.utime(ext, (1_000_000_000, 1_000_000_000))  # built long before the edit below
    os.utime(edited, None)
    out = run_python(code, **environ)
    if not extension:
        assert out.strip().splitlines()[0].endswith("connection.py")
        return
    module_file, described = out.strip().splitlines()
    assert module_file == str(edited)
    assert described.startswith("pure Python (compiled modules older than their source: connection")


def test_stale_extensions_compares_each_source_with_its_extension(tmp_path: Path) -> None:
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    for name in ("codec", "routing"):
        (tmp_path / f"{name}.py").write_text("")
        (tmp_path / f"{name}{suffix}").write_bytes(b"")
    os.utime(tmp_path / f"routing{suffix}", (1_000_000_000, 1_000_000_000))
    os.utime(tmp_path / f"codec{suffix}", None)
    os.utime(tmp_path / "codec.py", (time.time() - 1, time.time() - 1))  # within STALE_AFTER
    assert compiled.stale_extensions(str(tmp_path)) == ["routing"]

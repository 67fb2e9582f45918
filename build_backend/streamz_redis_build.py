"""The build backend: setuptools's, which first writes the stub package.

PEP 561's ``py.typed`` marker covers packages, not single-file modules, so an
installed ``streamz_redis.py`` carries no type information a type checker
will read. A stub-only package does: ``streamz_redis-stubs/__init__.pyi``,
which type checkers read instead of the module. Its stub is the module
itself, copied at build time: the signatures are the module's annotations,
so there is nothing to keep in step by hand, and a vendored copy (the one
file) has the same types. Type checkers read a stub's signatures and skip
its bodies.
"""
import pathlib
import shutil

from setuptools.build_meta import *  # noqa: F401,F403 - the rest of the backend as setuptools has it

ROOT = pathlib.Path(__file__).resolve().parent.parent
STUBS = ROOT / "build" / "stubs" / "streamz_redis-stubs"  # pyproject.toml's package-dir


def write_stubs():
    STUBS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ROOT / "streamz_redis.py", STUBS / "__init__.pyi")


# Every hook (metadata, sdist, wheel, editable) imports this module first,
# and setuptools reads the package's directory in each of them.
write_stubs()

"""Sphinx configuration of the streamz-redis documentation.

Build it with warnings as errors, as CI does (``.ci/run``)::

    sphinx-build -W -n --keep-going -b html docs docs/_build/html

autodoc imports the modules from the source tree, one directory up, so the
site documents the code beside it, installed or not (their dependencies,
redis-py and streamz, must be importable).
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import streamz_redis  # noqa: E402  (after the path is set)

project = "streamz-redis"
author = "The streamz-redis maintainers"
copyright = "streamz-redis maintainers"  # noqa: A001  (Sphinx's name for it)
version = release = streamz_redis.__version__

extensions = [
    "sphinx.ext.autodoc",
    "numpydoc",
]

exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path = []
html_show_sourcelink = False

# Every reference must resolve (sphinx-build -n): a link that goes nowhere is
# a warning, and CI builds with -W.
nitpicky = True

# The signatures show names and defaults, not annotations: the docstrings
# give each type in words ("str or list of str"), and annotations would add
# references to redis-py and typing objects that no inventory can resolve
# offline (no intersphinx: CI has no internet).
autodoc_typehints = "none"
autodoc_member_order = "bysource"
autodoc_default_options = {"exclude-members": "__init__, __new__"}

# numpydoc: the docstrings are the reference. Each public member is listed in
# api.rst explicitly, so numpydoc's own member tables would only repeat them
# (and list streamz's hundreds of inherited methods).
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
# Types in "Parameters" stay text: they name redis-py and streamz classes,
# which cannot be linked offline.
numpydoc_xref_param_type = False

# numpydoc's validation runs during the build; a failure is a warning, so
# -W makes it an error. Left out, and why:
# - ES01 (no extended summary): a one-line method such as ``flush()`` says
#   all there is to say in its summary.
# - SA01 (no See Also): the guides are the cross-references (the API page
#   links each node to its guide); a See Also on every node would repeat them.
# - EX01 (no Examples): the runnable examples are the guides' code blocks,
#   which the tests run; methods such as ``metrics()`` have none of their own.
# - GL01 (summary not on the line after the opening quotes): every docstring
#   here starts its summary on the line of the quotes (PEP 257). numpydoc
#   1.11 accepts that; 1.6, the docs extra's floor, flags it.
numpydoc_validation_checks = {"all", "ES01", "SA01", "EX01", "GL01"}


# No nitpick_ignore: with the annotations left out of the signatures and the
# parameter types left as text, nothing the pages render refers to redis-py,
# streamz or Python's own objects, so every reference resolves without their
# inventories. A name added here would be a link that goes nowhere.

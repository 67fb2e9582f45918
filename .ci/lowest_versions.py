"""Print, one a line, the lowest versions that pyproject.toml allows on this
Python: each ``name>=X`` of the dependencies and of the test extra becomes
``name==X`` (the highest floor, where several apply). A dependency without a
floor is an error: CI could not prove it.

    python .ci/lowest_versions.py   # needs packaging (and tomli before 3.11)
"""

import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from packaging.requirements import Requirement
from packaging.version import Version

project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
floors = {}
for text in project["dependencies"] + project["optional-dependencies"]["test"]:
    requirement = Requirement(text)
    if requirement.marker is not None and not requirement.marker.evaluate():
        continue
    lowest = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    if not lowest:
        sys.exit(f"{text!r} in pyproject.toml has no floor (>=)")
    extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
    floor = max(lowest + [floors.get(requirement.name, (None, lowest[0]))[1]])
    floors[requirement.name] = (requirement.name + extras, floor)

for name, floor in floors.values():
    print(f"{name}=={floor}")

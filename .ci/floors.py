"""Print pip constraints that pin every runtime dependency of the installed onnxq to its declared floor.

``onnx>=1.20`` becomes ``onnx==1.20``, so CI can install the oldest versions the package claims to support
and run the tests on them. Run it with a Python where onnxq is installed (it reads the package metadata, which
pyproject.toml generates); name the extras whose dependencies to pin too. A runtime dependency without a ``>=``
floor is an error: every floor must be tested.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import requires

REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^]]*\])?\s*([^;]*?)\s*(?:;\s*(.*))?$")
FLOOR = re.compile(r"^>=\s*([0-9][0-9A-Za-z.]*)$")
EXTRA = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


def floors(extras: list[str]) -> list[str]:
    """``name==floor`` for onnxq's dependencies and those of the named extras."""
    pins = []
    for requirement in requires("onnxq") or []:
        name, specifier, marker = REQUIREMENT.match(requirement).groups()
        extra = EXTRA.search(marker or "")
        if extra and extra[1] not in extras:
            continue
        floor = FLOOR.match(specifier.replace(" ", ""))
        if not floor:
            sys.exit(f"floors.py: {requirement!r} has no single '>=' floor; declare one so CI can test it")
        pins.append(f"{name}=={floor[1]}")
    return pins


if __name__ == "__main__":
    print("\n".join(floors(sys.argv[1:])))

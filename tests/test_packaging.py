"""``pip install slak-orchestrator`` must give a package that imports: pyproject declares every third-party
package the library imports, and requirements.txt's tested pins lie inside those ranges."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("kernels", "slak_model", "orchestrator")
# import name -> distribution name, where they differ
DISTRIBUTION = {"yaml": "pyyaml", "PIL": "pillow", "sklearn": "scikit-learn"}
# pulled in by a declared dependency (torch brings numpy and filelock; timm brings pillow via torchvision)
TRANSITIVE = {"numpy", "pillow", "packaging", "typing_extensions"}
# imported lazily by GPU-only tools (kernels.bench's eager timer); ships with CUDA builds of torch
OPTIONAL = {"triton"}


def _declared() -> dict[str, Requirement]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {Requirement(d).name.lower(): Requirement(d) for d in deps}


def _imported_distributions() -> set[str]:
    names: set[str] = set()
    for package in LIBRARY:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    third_party = names - set(sys.stdlib_module_names) - set(LIBRARY) - {"__future__"}
    return {DISTRIBUTION.get(n, n).lower() for n in third_party}


def test_every_imported_third_party_package_is_declared() -> None:
    missing = _imported_distributions() - set(_declared()) - TRANSITIVE - OPTIONAL
    assert not missing, f"imported by the library but not in pyproject dependencies: {sorted(missing)}"


def test_the_tested_pins_satisfy_the_declared_ranges() -> None:
    declared = _declared()
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        pin = Requirement(line)
        assert pin.name.lower() in declared, f"{pin.name} is pinned but not declared in pyproject"
        versions = [s.version for s in pin.specifier if s.operator == "=="]
        for version in versions:
            assert declared[pin.name.lower()].specifier.contains(version), (pin, declared[pin.name.lower()])

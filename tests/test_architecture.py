"""Import boundaries between the layers, checked by parsing every module (no module is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kernels", "slak_model", "orchestrator", "experiments")

# package -> top-level modules it must never import
FORBIDDEN = {
    "kernels": {"slak_model", "orchestrator", "experiments", "ray", "mlflow", "pandas"},
    "slak_model": {"orchestrator", "experiments", "ray", "mlflow", "pandas", "argparse"},
    "orchestrator": {"experiments"},
    "experiments": {"experiments"},
}
# Inside orchestrator only these adapters may touch Ray / MLflow.
RAY_ADAPTERS = {"ray_train.py", "tune_runner.py", "tune_trial.py", "search_space.py", "ray_cluster.py"}


def _python_files(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


def _imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _all_files() -> list[tuple[str, Path]]:
    return [(pkg, path) for pkg in PACKAGES if (ROOT / pkg).exists() for path in _python_files(pkg)]


def test_every_layer_has_modules() -> None:
    for pkg in ("kernels", "slak_model", "orchestrator"):
        assert _python_files(pkg), f"{pkg}/ has no Python modules"


@pytest.mark.parametrize("package,path", _all_files(), ids=lambda v: str(v.relative_to(ROOT)) if isinstance(v, Path) else v)
def test_layer_imports(package: str, path: Path) -> None:
    imported = _imported_top_levels(path)
    bad = sorted(imported & FORBIDDEN[package])
    assert not bad, f"{path.relative_to(ROOT)} ({package}) imports {bad}, which sits above it or is banned there"
    if package == "orchestrator":
        if "ray" in imported:
            assert path.name in RAY_ADAPTERS, f"{path.relative_to(ROOT)} imports ray; only {sorted(RAY_ADAPTERS)} may"
        if "mlflow" in imported:
            assert path.parent.name == "tracking", f"{path.relative_to(ROOT)} imports mlflow; only tracking/ may"


def test_experiments_is_not_a_package() -> None:
    assert not (ROOT / "experiments" / "__init__.py").exists(), "experiments/ holds entry scripts, not a package"


def test_nothing_reads_the_shared_folder() -> None:
    for _, path in _all_files():
        text = path.read_text(encoding="utf-8")
        assert "../shared" not in text and "shared/reference" not in text, f"{path} refers to shared/"


# The team's internal reference notes live outside the repository; users never see them, so no file may point
# at them, by path or by name.
_INTERNAL_NOTES = ("../shared", "shared/reference", "kernel_anchors", "slak_spec.md", "paper_numbers.md")


def test_no_file_names_the_internal_notes() -> None:
    skip = {".git", ".venv", "node_modules", "__pycache__", ".pytest_cache"}
    this = Path(__file__).resolve()
    offenders = []
    for path in ROOT.rglob("*"):
        if not path.is_file() or skip & set(path.relative_to(ROOT).parts) or path.resolve() == this:
            continue
        if path.suffix not in {".py", ".md", ".cu", ".cpp", ".h", ".yaml", ".yml", ".toml", ".txt", ".cfg", ""}:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        offenders += [f"{path.relative_to(ROOT)}: {name}" for name in _INTERNAL_NOTES if name in text]
    assert not offenders, offenders


def test_checker_catches_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom ray import train\nimport slak_model.layers as L\n")
    assert _imported_top_levels(bad) == {"os", "ray", "slak_model"}

"""README's Quickstart stays true: exactly two commands, the second is what `.ci/run` runs verbatim,
and every script or module they name exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)]


def test_quickstart_has_exactly_two_single_line_commands() -> None:
    commands = _quickstart_commands()
    assert len(commands) == 2, commands
    assert all("\n" not in c for c in commands), commands
    install, tests = commands
    assert "pip install -r requirements.txt -e ." in install
    assert install.endswith(".venv/bin/python experiments/tune_sparsity_width.py")
    assert "pip install -r requirements-dev.txt -e ." in tests and "pytest" in tests


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert _quickstart_commands()[1] in ci_lines


def test_named_scripts_and_files_exist() -> None:
    text = (ROOT / "README.md").read_text()
    for path in set(re.findall(r"`(?:python )?((?:experiments|docs|kernels|slak_model)/[\w./-]+\.(?:py|md))", text)):
        assert (ROOT / path).is_file(), path
    for module in set(re.findall(r"python -m ([\w.]+)", text)):
        if module in ("pytest", "venv"):
            continue
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module

"""The README's front door stays true: two set-up commands, and CI runs exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_readme_has_exactly_two_setup_commands_pinning_torch():
    commands = setup_commands()
    assert len(commands) == 2
    assert all('"torch==2.13.0"' in c for c in commands)
    assert "peft-d2c run" in commands[0]


def test_ci_runs_the_readme_test_command():
    install, test_command = setup_commands()[1].split(" && ")
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()
    assert install.replace("python -m pip install", "python -m pip install --quiet") in ci

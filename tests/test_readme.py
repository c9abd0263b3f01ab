"""The documentation's install commands: each one that resolves dependencies keeps torch at the pin."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def install_commands():
    """(file, line number, command) of every ``pip install`` in the project's Markdown files."""
    files = [ROOT / "README.md", ROOT / "DEVELOPERS.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for path in files:
        if not path.exists():
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            # a command ends at `&&`, a backtick, a comment or the line's end
            for command in re.findall(r"pip install[^`&#]*", line):
                yield path.name, number, command.strip()


def test_every_install_that_resolves_dependencies_passes_the_constraints():
    commands = list(install_commands())
    assert len(commands) >= 8  # the set-up lines, the demo, the extras, the benchmarks
    unpinned = [f"{name}:{number}: {command}" for name, number, command in commands
                if "--no-deps" not in command and "-c constraints.txt" not in command]
    assert not unpinned, "without -c constraints.txt pip may replace the pinned torch:\n" + "\n".join(unpinned)

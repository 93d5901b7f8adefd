"""The docs cannot go stale: the CLI reference is regenerated from --help and compared."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_cli_reference_is_current() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "cogapp", "--check", "docs/cli.md"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"COLUMNS": "100", "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, "docs/cli.md is stale: run `make docs`\n" + r.stdout + r.stderr


def test_every_command_has_a_docs_page() -> None:
    from loratools.cli import cli

    for name in cli.commands:
        page = ROOT / "docs" / f"{name}.md"
        assert page.is_file(), f"docs/{name}.md is missing"
        assert f"loratools {name}" in page.read_text()

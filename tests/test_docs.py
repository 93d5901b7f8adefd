"""The docs cannot go stale: the CLI reference is regenerated from --help and compared, and the Python examples of
the README and the library page run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
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


def python_blocks(page: Path) -> list[str]:
    """The ```python blocks of a Markdown page, in order."""
    return re.findall(r"^```python\n(.*?)^```$", page.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)


@pytest.mark.parametrize("page", ["README.md", "docs/api.md"])
def test_python_examples_run_as_written(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every Python example of the page, run in order in one namespace, in a folder holding the fixtures (as the
    repository's root does): what the docs show works, and the asserts in them hold."""
    blocks = python_blocks(ROOT / page)
    assert blocks, f"{page} has no python examples"
    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # an example may add to it
    namespace: dict[str, object] = {"__name__": f"docs_{Path(page).stem}"}
    for i, code in enumerate(blocks, 1):
        try:
            exec(compile(code, f"{page} python block {i}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{page}, python block {i} fails: {type(e).__name__}: {e}\n{code}") from e


def test_api_page_documents_every_public_name() -> None:
    """docs/api.md names every function loratools exports."""
    import inspect

    import loratools

    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    functions = [n for n in loratools.__all__ if inspect.isfunction(getattr(loratools, n))]
    assert len(functions) >= 16
    missing = [n for n in functions if f"`{n}" not in text]
    assert not missing, f"docs/api.md does not mention {missing}"


def console_commands(page: Path) -> list[list[str]]:
    """The ``$ loratools ...`` lines of a page's ```console blocks, as argument lists (comments dropped)."""
    import shlex

    out = []
    for block in re.findall(r"^```console\n(.*?)^```$", page.read_text(encoding="utf-8"), flags=re.S | re.M):
        for line in block.splitlines():
            if line.startswith("$ loratools "):
                out.append(shlex.split(line[2:], comments=True)[1:])
    return out


#: README lines that need what the committed fixtures are not: a real base model, the Hub
NEEDS_MORE = ("./base-model", "someone/", "me/llama-lora")


def test_readme_commands_run_on_the_fixtures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every README command that needs only the committed fixtures (and what the lines before it wrote) runs, in
    order, and exits 0 (validate of a sound fixture included); the others are the ones naming a real base model
    or the Hub."""
    from conftest import run_cli

    commands = console_commands(ROOT / "README.md")
    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    ran = 0
    for args in commands:
        if any(a.startswith(NEEDS_MORE) for a in args):
            continue
        code, out, err = run_cli(*args)
        answer = args[0] in ("validate", "diff") and code == 1 and out and "Error:" not in err  # findings
        assert code == 0 or answer, f"loratools {' '.join(args)}: exit {code}\n{err}"
        ran += 1
    assert ran >= 10, f"only {ran} README commands ran"

"""The package's shape: no module over 500 lines, nothing inside it importing its root, and each shared table or
helper defined once. (The import direction itself is import-linter's contract in pyproject.toml, run by `make lint`.)"""

from __future__ import annotations

import ast
import re

from conftest import ROOT

PACKAGE = ROOT / "loratools"
MAX_LINES = 500
#: modules being split by other changes of issue #13; each must still be over the limit (remove it once split)
SPLIT_ELSEWHERE: set[str] = set()  # modules over the limit whose split is under way elsewhere (none now)


def modules() -> dict[str, str]:
    return {p.relative_to(PACKAGE).as_posix(): p.read_text(encoding="utf-8") for p in sorted(PACKAGE.rglob("*.py"))}


def test_no_module_over_500_lines() -> None:
    sizes = {name: text.count("\n") for name, text in modules().items()}
    over = sorted(n for n, lines in sizes.items() if lines > MAX_LINES and n not in SPLIT_ELSEWHERE)
    assert not over, f"over {MAX_LINES} lines: {over}"
    done = sorted(n for n in SPLIT_ELSEWHERE if sizes.get(n, 0) <= MAX_LINES)
    assert not done, f"now within the limit: take {done} out of SPLIT_ELSEWHERE"


def root_imports(name: str, text: str) -> list[str]:
    """The names module ``name`` imports from the package root itself (not from its submodules), function-level
    imports included."""
    package = ["loratools", *name.removesuffix(".py").split("/")]
    package = package[:-1]  # a module's package; a package's __init__ is the package itself
    if name.endswith("__init__.py"):
        package = ["loratools", *name.split("/")[:-1]]
    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            submodules = {p.stem for p in PACKAGE.iterdir()}
            if target == "loratools":
                found += [a.name for a in node.names if a.name not in submodules]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name == "loratools"]
    return found


def test_nothing_imports_the_package_root() -> None:
    found = {n: names for n, text in modules().items() if n != "__init__.py" and (names := root_imports(n, text))}
    assert not found, f"these import from the package root (use loratools.version): {found}"
    assert root_imports("ops/x.py", "def f():\n    from .. import __version__\n") == ["__version__"]
    assert root_imports("hub.py", "from . import __version__\nfrom .ops import mix\n") == ["__version__"]
    assert root_imports("io/x.py", "from . import jsonfile\n") == []


def definitions(pattern: str) -> list[str]:
    rx = re.compile(pattern, re.MULTILINE)
    return [name for name, text in modules().items() for _ in rx.finditer(text)]


def test_each_helper_is_defined_once() -> None:
    assert definitions(r"^def rank_for_energy\(") == ["ops/linalg.py"]
    assert definitions(r"hashlib\.sha256\(\)") == ["io/digest.py"]  # the incremental hash of a file's bytes
    assert definitions(r"^class Progress\b|^Progress\s*=") == ["io/progress.py"]
    assert definitions(r"^class Tick\b|^Tick\s*=") == ["io/progress.py"]
    assert definitions(r"cumsum\(0\)") == ["ops/linalg.py", "ops/linalg.py", "ops/linalg.py"]  # energies: linalg only
    assert definitions(r"^def \w*progress\w*\(") == ["cli/output.py"]  # the one bar builder (progress_bar)
    assert definitions(r'^\w*KEY\w* = "loratools"$') == ["model/adapter.py"]  # the provenance key


def test_each_name_table_is_defined_once() -> None:
    assert definitions(r"^KOHYA_COMPONENTS\s*=") == ["model/components.py"]
    assert definitions(r"^COMPONENT_KOHYA\s*=") == ["model/components.py"]
    assert definitions(r"^COMPONENT_RE\s*=") == ["model/components.py"]
    # the diffusers component list
    assert definitions(r'^\w*COMPONENTS\s*=\s*\(\s*$|^\w*COMPONENTS\s*=\s*\("unet"') == ["model/components.py"]
    assert definitions(r"^INDEX_SUFFIX\s*=") == ["io/checkpoint.py"]

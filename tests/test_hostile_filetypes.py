"""Wrong file types: a config, a README, a GGUF file, a zip or a pickle, an empty file given where an adapter is
expected get a message about what they are (not "header length 8028899034890504827 is beyond the limit"), the
same through inspect, validate, convert, mix and merge. And the library's entry points given arguments of the
wrong type: a LoratoolsError subclass with a one-line message, never TypeError/AttributeError.
"""

from __future__ import annotations

import pickle
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hostile
import pytest
import readers_kit as kit
import torch
from readers_kit import FIXTURES, put

from loratools import load_adapter, save_adapter
from loratools.errors import FileFormatError, LoratoolsError, UsageError
from loratools.formats import detect

Build = Callable[[Path], Path]
CASES: dict[str, tuple[Build, str]] = {}


def case(name: str, says: str, build: Build) -> None:
    assert name not in CASES, name
    CASES[name] = (build, says)


def file(name: str, content: bytes | str) -> Build:
    return lambda tmp: put(tmp / name, content)


def _torch_zip(tmp: Path) -> Path:
    p = tmp / "lora.safetensors"
    torch.save({"a": torch.zeros(2)}, p)
    return p


def _plain_zip(tmp: Path) -> Path:
    p = tmp / "lora.safetensors"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("readme.txt", "hello")
    return p


def _config_itself(tmp: Path) -> Path:
    return kit.peft_folder(tmp / "adapter") / "adapter_config.json"


def _index_itself(tmp: Path) -> Path:
    return put(tmp / "model.safetensors.index.json", '{"metadata": {}, "weight_map": {}}')


def _readme_folder(tmp: Path) -> Path:
    put(tmp / "repo" / "README.md", "# an adapter\n")
    return tmp / "repo"


LFS = "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 1234\n"
case("peft-config", "a JSON file", _config_itself)
case("index-json", "a JSON file", _index_itself)
case("json-object", "a JSON file", file("weights.json", '{"a": [1, 2, 3]}'))
case("json-list", "a JSON file", file("weights.safetensors", "[1, 2, 3, 4, 5, 6, 7, 8]"))
case("readme", "a text file", file("README.md", "# My LoRA\n\nTrained on cats.\n"))
case("html-error-page", "a text file", file("lora.safetensors", "<!DOCTYPE html><html><body>404</body></html>"))
case("git-lfs-pointer", "Git LFS pointer", file("lora.safetensors", LFS))
# a GGUF file with no keys: read as GGUF (by its magic, whatever its name), and it is no adapter
case("gguf", "no general.type, not an adapter", file("adapter.gguf", b"GGUF\x03\x00\x00\x00" + b"\x00" * 64))
case(
    "gguf-named-safetensors",
    "no general.type, not an adapter",
    file("a.safetensors", b"GGUF\x03\x00\x00\x00" + b"\0" * 64),
)
case("torch-zip-named-safetensors", "a torch pickle (zip)", _torch_zip)
case("plain-zip", "a zip archive", _plain_zip)
case(
    "legacy-pickle-named-safetensors", "a pickle", file("lora.safetensors", pickle.dumps({"a": [1.0] * 8}, protocol=2))
)
case("empty-file", "empty file", file("lora.safetensors", b""))
case("two-bytes-of-json", "a JSON file", file("lora.safetensors", "{}"))
case("png-image", "beyond the", file("preview.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 64))
case("folder-with-readme-only", "no adapter found", _readme_folder)
case("missing-path", "no such file", lambda tmp: tmp / "nowhere.safetensors")

SLOW: set[str] = set()


@pytest.mark.parametrize("name", sorted(CASES))
def test_wrong_file_type(tmp_path: Path, name: str) -> None:
    build, says = CASES[name]
    src = build(tmp_path)
    inputs = [src] if src.exists() else []
    hostile.run(["inspect", src], inputs=inputs, code=1, says=says)
    kit.validate([src], inputs=inputs, ok=False, says=says)
    out = tmp_path / "out"
    hostile.run(["convert", src, "--to", "kohya", "-o", out], inputs=inputs, code=1, out=out, says=says)
    hostile.run(["mix", src, FIXTURES / "peft_llama", "-o", out], inputs=inputs, code=1, out=out, says=says)
    base = shutil.copy(FIXTURES / "peft_llama" / "adapter_model.safetensors", tmp_path / "base.safetensors")
    hostile.run(["merge", base, src, "-o", out], inputs=[*inputs, base], code=1, out=out, says=says)


# ---- the library's arguments ----------------------------------------------------------------------------------------

ADAPTER = FIXTURES / "peft_llama"


def _loaded() -> Any:
    return load_adapter(ADAPTER)


LIBRARY: dict[str, tuple[Callable[[Path], tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]], type, str]] = {
    "load-none": (lambda t: (load_adapter, (None,), {}), UsageError, "source must be a path"),
    "load-int": (lambda t: (load_adapter, (123,), {}), UsageError, "not int"),
    "load-bytes": (lambda t: (load_adapter, (b"adapter",), {}), UsageError, "not bytes"),
    "load-empty-string": (lambda t: (load_adapter, ("",), {}), UsageError, "empty path"),
    "load-nul": (lambda t: (load_adapter, ("a\0b",), {}), UsageError, "NUL"),
    "load-list": (lambda t: (load_adapter, ([ADAPTER],), {}), UsageError, "not list"),
    "load-problems-string": (lambda t: (load_adapter, (ADAPTER,), {"problems": "x"}), UsageError, "problems"),
    "load-problems-dict": (lambda t: (load_adapter, (ADAPTER,), {"problems": {}}), UsageError, "problems"),
    "load-problems-tuple": (lambda t: (load_adapter, (ADAPTER,), {"problems": ()}), UsageError, "problems"),
    "load-format-int": (lambda t: (load_adapter, (ADAPTER,), {"format": 1}), UsageError, "format must be"),
    "load-format-bytes": (lambda t: (load_adapter, (ADAPTER,), {"format": b"peft"}), UsageError, "format"),
    "load-format-unknown": (lambda t: (load_adapter, (ADAPTER,), {"format": "nope"}), FileFormatError, "unknown"),
    "detect-none": (lambda t: (detect, (None,), {}), UsageError, "source must be a path"),
    "save-none-adapter": (lambda t: (save_adapter, (None, t / "o"), {}), UsageError, "adapter must be"),
    "save-dict-adapter": (lambda t: (save_adapter, ({"a": 1}, t / "o"), {}), UsageError, "adapter must be"),
    "save-none-out": (lambda t: (save_adapter, (_loaded(), None), {}), UsageError, "out must be a path"),
    "save-int-out": (lambda t: (save_adapter, (_loaded(), 5), {}), UsageError, "out must be a path"),
    "save-format-int": (lambda t: (save_adapter, (_loaded(), t / "o", 3), {}), UsageError, "format must be"),
    "save-format-unknown": (lambda t: (save_adapter, (_loaded(), t / "o", "nope"), {}), FileFormatError, "unknown"),
    "save-force-string": (lambda t: (save_adapter, (_loaded(), t / "o"), {"force": "yes"}), UsageError, "force"),
}


@pytest.mark.parametrize("name", sorted(LIBRARY))
def test_library_arguments(tmp_path: Path, name: str) -> None:
    make, err, says = LIBRARY[name]
    fn, args, kwargs = make(tmp_path)
    assert issubclass(err, LoratoolsError)
    hostile.call(fn, *args, raises=err, says=says, inputs=[ADAPTER], **kwargs)
    assert not (tmp_path / "o").exists()


def test_counts() -> None:
    assert len(CASES) >= 15 and len(LIBRARY) >= 15

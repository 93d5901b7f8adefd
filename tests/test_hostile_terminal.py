"""Names printed to the terminal are data: Rich markup in a path, a tensor name, a config value or a shard name is
printed as it is (never parsed: ``[/x]`` used to crash the error handler, ``[4.0, 36.0]`` used to vanish), emoji
codes stay text, and control characters (a terminal escape hidden in a name) are shown as ``\\xNN``, never sent."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import hostile
import pytest
import torch
from conftest import FIXTURES

from loratools.io.safetensors import write_safetensors

#: name -> what the terminal must show for it
NAMES = {
    "closing-tag": ("a[/]b", "a[/]b"),
    "closing-style": ("x[/red]", "x[/red]"),
    "style-pair": ("[bold]big[/bold]", "[bold]big[/bold]"),
    "only-closing": ("[/x]", "[/x]"),
    "link": ("[link=http://example.invalid]click[/link]", "[link=http://example.invalid]click[/link]"),
    "emoji-code": (":smile:", ":smile:"),
    "escaped-bracket": ("\\[kept]", "\\[kept]"),
    "list-like": ("[4.0, 36.0]", "[4.0, 36.0]"),
    "ansi-clear": ("\x1b[2Jcleared", "\\x1b[2Jcleared"),
    "ansi-colour": ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
    "bell": ("ring\x07", "ring\\x07"),
    "carriage-return": ("over\rwrite", "over\\x0dwrite"),
    "bidi-override": ("abc\u202edcba", "abc\\u202edcba"),
    "c1-control": ("csi\x9b2J", "csi\\x9b2J"),
}


def _peft(folder: Path, module_word: str, base_model: str, junk: bool = False) -> Path:
    """A PEFT folder whose module path and base model name carry the hostile text (and, with ``junk``, a key no
    reader understands, which inspect refuses and validate reports, both naming it)."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    mod = f"model.layers.0.{module_word}.q_proj"
    tensors = {
        f"base_model.model.{mod}.lora_A.weight": torch.randn(2, 8, generator=g),
        f"base_model.model.{mod}.lora_B.weight": torch.randn(8, 2, generator=g),
    }
    if junk:
        tensors[f"base_model.model.{mod}.junk"] = torch.zeros(1)
    write_safetensors(folder / "adapter_model.safetensors", tensors)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
              "base_model_name_or_path": base_model}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def _shown(text: str, want: str) -> None:
    # a carriage return may be shown as \x0d or, in a quoted name, as \r: shown either way, never sent
    assert want in text or want.replace("\\x0d", "\\r") in text, f"expected {want!r} in:\n{text!r}"
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text, f"a control character got out: {text!r}"


@pytest.mark.parametrize("name", list(NAMES))
@pytest.mark.parametrize("command", ["inspect", "inspect --fast"])
def test_names_in_an_adapter_are_printed_as_they_are(tmp_path: Path, name: str, command: str) -> None:
    text, want = NAMES[name]
    folder = _peft(tmp_path / "a", text, text)
    r = hostile.run([*command.split(), folder], inputs=[folder], code=0)
    _shown(r.stdout, want)  # the base model's name in the summary, the module in the table


@pytest.mark.parametrize("name", list(NAMES))
@pytest.mark.parametrize("command", ["inspect", "validate", "validate --strict"])
def test_names_in_findings_and_errors_are_printed_as_they_are(tmp_path: Path, name: str, command: str) -> None:
    text, want = NAMES[name]
    folder = _peft(tmp_path / "a", text, text, junk=True)
    r = hostile.run([*command.split(), folder], inputs=[folder], code=1, findings=command != "inspect")
    _shown(r.stdout + r.stderr, want)


@pytest.mark.parametrize("name", list(NAMES))
def test_names_in_paths_are_printed_as_they_are(tmp_path: Path, name: str) -> None:
    text, want = NAMES[name]
    missing = tmp_path / f"no{text}such"
    r = hostile.run(["inspect", missing], code=(1, 2), says="no such")
    _shown(r.stderr, want.replace("//", "/"))  # the path as the system spells it


@pytest.mark.parametrize("name", list(NAMES))
def test_names_in_error_messages_are_printed_as_they_are(tmp_path: Path, name: str) -> None:
    """An error whose message quotes a tensor name from a lying header."""
    text, want = NAMES[name]
    header = {f"bad{text}name": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    raw = json.dumps(header).encode()
    p = tmp_path / "lora.safetensors"
    p.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 4)
    r = hostile.run(["inspect", p], inputs=[p], code=1)
    _shown(r.stderr, want)


def test_float_offsets_are_shown_not_eaten(tmp_path: Path) -> None:
    header = {"lora_unet_x.lora_down.weight": {"dtype": "F32", "shape": [2], "data_offsets": [4.0, 36.0]}}
    raw = json.dumps(header).encode()
    p = tmp_path / "lora.safetensors"
    p.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 36)
    r = hostile.run(["validate", p], inputs=[p], code=1, findings=True)
    assert "data_offsets [4.0, 36.0]" in r.stdout


@pytest.mark.parametrize("name", ["closing-tag", "only-closing", "ansi-clear", "emoji-code"])
def test_names_in_merge_and_diff_tables(tmp_path: Path, name: str) -> None:
    """A base tensor name with markup, through merge's table and diff's."""
    text, want = NAMES[name]
    g = torch.Generator().manual_seed(0)
    base = tmp_path / "base.safetensors"
    other = tmp_path / "other.safetensors"
    write_safetensors(base, {f"w{text}.weight": torch.randn(4, 4, generator=g)})
    write_safetensors(other, {f"w{text}.weight": torch.randn(4, 4, generator=g)})
    r = hostile.run(["diff", base, other, "--all"], inputs=[base, other], code=1, findings=True)
    _shown(r.stdout, want)


def test_a_shard_named_with_markup(tmp_path: Path) -> None:
    """A base index naming a shard ``[/x].safetensors`` that is missing: the message names it as it is."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"model.layers.0.self_attn.q_proj.weight": "[x]/[/x].safetensors"}})
    )
    r = hostile.run(["merge", base, FIXTURES / "peft_llama", "-o", tmp_path / "out"], inputs=[base, FIXTURES],
                    code=1, out=tmp_path / "out")  # fmt: skip
    assert "[/x].safetensors" in r.stderr


def test_json_output_keeps_names_exactly(tmp_path: Path) -> None:
    text = "\x1b[2J[/x]:smile:"
    folder = _peft(tmp_path / "a", text, text)
    r = hostile.run(["inspect", folder, "--json"], inputs=[folder], code=0)
    data = json.loads(r.stdout)
    assert data["base_model"] == text
    assert "\x1b" not in r.stdout  # JSON escapes it (\u001b)


def test_a_fixture_copy_still_prints_normally(tmp_path: Path) -> None:
    """The styling of loratools' own words is kept (Error/Hint/Warning prefixes come from Text objects)."""
    shutil.copytree(FIXTURES / "peft_llama", tmp_path / "p")
    r = hostile.run(["inspect", tmp_path / "p" / "nope"], code=(1, 2))
    assert r.stderr.startswith("Error: ")

"""Hostile configs: PEFT ``adapter_config.json``, diffusers ``lora_adapter_metadata``, kohya ``ss_*`` header
metadata, loratools' own provenance record, and a base model's ``config.json``.

Wrong types everywhere, numbers JSON cannot hold (``10**400``, NaN, Infinity), non-positive ranks, nested junk,
a config that is a list or a string, duplicate keys, depth bombs, a 1 GB config. A config that cannot be honoured
is refused with one ``Error:`` line naming the file and the field (``validate``: a finding); metadata that only
describes the file must not break anything.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import hostile
import pytest
import readers_kit as kit
from readers_kit import FIXTURES, put

from loratools.io import jsonfile

Build = Callable[[Path], Path]  # tmp folder -> the adapter (file or folder)


@dataclass(frozen=True)
class Case:
    build: Build
    says: str | None = None  # None with refused=False: readable
    refused: bool = True


CASES: dict[str, Case] = {}


def peft(name: str, config: object = None, says: str | None = None, *, raw: str | bytes | None = None) -> None:
    """A PEFT folder whose config gets ``config`` merged in (or is ``raw``)."""

    def build(tmp: Path) -> Path:
        return kit.peft_folder(tmp / "adapter", config, raw=raw)

    assert name not in CASES, name
    CASES[name] = Case(build, says, says is not None)


def readable(name: str, build: Build) -> None:
    CASES[name] = Case(build, None, False)


def refused(name: str, build: Build, says: str) -> None:
    CASES[name] = Case(build, says, True)


BIG = "1" + "0" * 400  # 10**400 as JSON text: json gives a Python int that float() cannot hold

# ---- every field PEFT's math reads, with a type it never writes ------------------------------------------------
for value, tag in [
    ("8", "string"), (8.5, "float"), (True, "true"), (-1, "negative"), (0, "zero"), ([8], "list"),
    ({"a": 1}, "object"), (2**31, "beyond-2^31"),
]:  # fmt: skip
    peft(f"r-{tag}", {"r": value}, "r must be")
peft("r-10^400", raw=json.dumps({"r": 4, "lora_alpha": 8}).replace('"r": 4', f'"r": {BIG}'), says="r must be")
for value, tag in [("8", "string"), (True, "true"), ([8], "list"), ({}, "object")]:
    peft(f"alpha-{tag}", {"lora_alpha": value}, "lora_alpha must be")
for text, tag in [("NaN", "nan"), ("Infinity", "inf"), ("-Infinity", "minus-inf")]:
    peft(f"alpha-{tag}", raw=f'{{"r": 4, "lora_alpha": {text}}}', says=f"{text} is not a JSON value")
peft("alpha-1e400", raw='{"r": 4, "lora_alpha": 1e400}', says="out of range")
peft("alpha-10^400", raw=f'{{"r": 4, "lora_alpha": {BIG}}}', says="lora_alpha must be a finite number")
for value, tag in [
    ([4], "list"), ("x", "string"), ({"q_proj": "4"}, "string-rank"), ({"q_proj": 0}, "zero-rank"),
    ({"q_proj": -1}, "negative-rank"), ({"q_proj": 4.5}, "float-rank"), ({"q_proj": True}, "bool-rank"),
    ({"q_proj": {"y": 1}}, "nested"), ({"q_proj": None}, "null-rank"),
]:  # fmt: skip
    peft(f"rank_pattern-{tag}", {"rank_pattern": value}, "rank_pattern must be")
peft(
    "rank_pattern-10^400", raw=f'{{"r": 4, "lora_alpha": 8, "rank_pattern": {{"q_proj": {BIG}}}}}', says="rank_pattern"
)
for value, tag in [([8], "list"), ({"q_proj": "8"}, "string"), ({"q_proj": True}, "bool"), ({"q_proj": [1]}, "nested")]:
    peft(f"alpha_pattern-{tag}", {"alpha_pattern": value}, "alpha_pattern")
peft("alpha_pattern-nan", raw='{"r": 4, "lora_alpha": 8, "alpha_pattern": {"q_proj": NaN}}', says="NaN")
for field, value, tag in [
    ("target_modules", 5, "int"), ("target_modules", [1], "int-list"), ("target_modules", {"a": 1}, "object"),
    ("target_modules", [["q_proj"]], "nested"), ("modules_to_save", 5, "int"), ("modules_to_save", [None], "null"),
    ("use_rslora", "yes", "string"), ("use_rslora", 1, "int"), ("use_dora", "true", "string"),
    ("fan_in_fan_out", 0, "int"), ("peft_type", 5, "int"), ("peft_type", ["LORA"], "list"),
    ("init_lora_weights", 3, "int"), ("base_model_name_or_path", ["a"], "list"),
    ("base_model_name_or_path", {"a": 1}, "object"), ("layers_to_transform", "0", "string"),
    ("layers_to_transform", [True], "bool"), ("bias", 1, "int"), ("task_type", 5, "int"),
    ("exclude_modules", 5, "int"), ("layers_pattern", {"a": 1}, "object"),
]:  # fmt: skip
    peft(f"{field}-{tag}", {field: value}, f"{field} must be")
peft("peft_type-ia3", {"peft_type": "IA3"}, "not supported")  # a type loratools does not read: refused by name
peft("peft_type-loha-over-lora-keys", {"peft_type": "LOHA"}, "peft LOHA")  # LoHa config, LoRA tensors
for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern"):  # PEFT fails on an explicit null in these
    peft(f"{field}-null", {field: None}, f"{field} must be")

# ---- the document itself -------------------------------------------------------------------------------------------
for text, tag in [("[1, 2]", "list"), ('"LORA"', "string"), ("8", "number"), ("null", "null"), ("true", "true")]:
    peft(f"config-is-{tag}", raw=text, says="must be a JSON object")
peft("config-empty-file", raw="", says="not valid JSON")
peft("config-bom", raw=b"\xef\xbb\xbf{}", says="byte-order mark")
peft("config-not-utf8", raw=b'{"r": 4, "x": "\xff"}', says="not UTF-8")
peft("config-lone-surrogate", raw='{"r": 4, "lora_alpha": 8, "x": "\\ud800"}', says="surrogate")
peft("config-duplicate-r", raw='{"r": 4, "lora_alpha": 8, "r": 64}', says="duplicate key 'r'")
peft("config-duplicate-nested", raw='{"r": 4, "lora_alpha": 8, "rank_pattern": {"q": 2, "q": 3}}', says="duplicate")
peft("config-depth-65", raw='{"r": 4, "x": ' + "[" * 65 + "]" * 65 + "}", says="deeper")
peft("config-depth-100000", raw='{"r": 4, "x": ' + "[" * 100_000 + "]" * 100_000 + "}", says="deeper")
peft("config-trailing-garbage", raw='{"r": 4}}', says="not valid JSON")
peft("config-nan-elsewhere", raw='{"r": 4, "lora_alpha": 8, "lora_dropout": NaN}', says="NaN")
peft("config-int-5000-digits", raw='{"r": 4, "lora_alpha": 8, "x": ' + "7" * 5000 + "}", says="digits")


def _gigabyte_config(tmp: Path) -> Path:
    d = kit.peft_folder(tmp / "adapter")
    with open(d / "adapter_config.json", "r+b") as fh:  # sparse: 1 GB on paper, nothing on disk
        fh.truncate(1 << 30)
    return d


def _just_beyond_limit(tmp: Path) -> Path:
    d = kit.peft_folder(tmp / "adapter")
    with open(d / "adapter_config.json", "r+b") as fh:
        fh.truncate(jsonfile.MAX_BYTES + 1)
    return d


refused("config-1GB", _gigabyte_config, "beyond the")
refused("config-just-beyond-the-limit", _just_beyond_limit, "beyond the")


def _config_is_folder(tmp: Path) -> Path:
    d = kit.peft_folder(tmp / "adapter")
    (d / "adapter_config.json").unlink()
    (d / "adapter_config.json").mkdir()
    return d


def _config_is_fifo(tmp: Path) -> Path:
    d = kit.peft_folder(tmp / "adapter")
    (d / "adapter_config.json").unlink()
    os.mkfifo(d / "adapter_config.json")  # opening it to read would block forever
    return d


refused("config-is-a-folder", _config_is_folder, "is a folder")
refused("config-is-a-fifo", _config_is_fifo, "not a regular file")

# ---- configs loratools can read (controls: they must not break, and be read as PEFT reads them) ---------------------
readable("config-empty-object", lambda tmp: kit.peft_folder(tmp / "adapter", raw="{}"))
readable("alpha-negative", lambda tmp: kit.peft_folder(tmp / "adapter", {"lora_alpha": -5}))
readable("alpha-zero", lambda tmp: kit.peft_folder(tmp / "adapter", {"lora_alpha": 0}))
readable("init-pissa", lambda tmp: kit.peft_folder(tmp / "adapter", {"init_lora_weights": "pissa"}))
readable("unknown-fields", lambda tmp: kit.peft_folder(tmp / "adapter", {"zzz": {"a": [1, {"b": None}]}, "r": 4}))

# ---- diffusers: the config is JSON inside the header -----------------------------------------------------------------


def with_metadata(src: Path, dst: Path, **changes: str | None) -> Path:
    """``src`` with its header ``__metadata__`` changed (None removes a key); the data section is kept."""
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.setdefault("__metadata__", {})
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    hb = json.dumps(header).encode()
    return put(dst, struct.pack("<Q", len(hb)) + hb + raw[8 + n :])


DIFFUSERS = FIXTURES / "diffusers_sd" / "pytorch_lora_weights.safetensors"


def diffusers(name: str, text: str, says: str | None) -> None:
    def build(tmp: Path) -> Path:
        return with_metadata(DIFFUSERS, tmp / "pytorch_lora_weights.safetensors", lora_adapter_metadata=text)

    CASES[f"diffusers-{name}"] = Case(build, says, says is not None)


diffusers("not-json", "{unet.r: 4", "not valid JSON")
diffusers("list", "[1, 2]", "must be a JSON object")
diffusers("string", '"r=4"', "must be a JSON object")
diffusers("duplicate", '{"text_encoder.r": 4, "text_encoder.r": 8}', "duplicate key")
diffusers("rank-string", '{"text_encoder.r": "4"}', "r must be")
diffusers("alpha-nan", '{"text_encoder.lora_alpha": NaN}', "NaN")
diffusers("alpha-10^400", '{"text_encoder.lora_alpha": ' + BIG + "}", "lora_alpha must be")
diffusers("depth", '{"text_encoder.x": ' + "[" * 70 + "]" * 70 + "}", "deeper")
diffusers("bad-regex", '{"text_encoder.rank_pattern": {"(": 4}}', "not a valid regular expression")
diffusers("empty-object", "{}", None)


# ---- kohya ss_* and loratools' provenance: metadata that describes, never decides --------------------------------------
def _small_kohya(tmp: Path) -> Path:
    return put(tmp / "small.safetensors", kit.st_bytes(kit.entries()))


for key, value, tag in [
    ("ss_network_dim", "abc", "dim-text"), ("ss_network_alpha", "1e400", "alpha-1e400"),
    ("ss_network_alpha", "NaN", "alpha-nan"), ("ss_base_model_version", "v" * 1_000_000, "1MB-string"),
    ("ss_network_args", "{" * 100_000, "args-bomb"), ("ss_sd_model_name", "\x1b]0;pwned\x07", "control-chars"),
    ("sshs_model_hash", "zz", "hash-junk"), ("modelspec.architecture", "", "empty"),
    ("loratools", '{"inputs": [1], "command": "mix"}', "provenance-int-input"),
    ("loratools", '{"weights": ["x"], "inputs": []}', "provenance-string-weight"),
    ("loratools", "[" * 100_000 + "]" * 100_000, "provenance-depth"),
    ("loratools", '{"inputs": [], "inputs": [{"source": 1}]}', "provenance-duplicate"),
    ("loratools", '{"energy": NaN, "inputs": []}', "provenance-nan"),
]:  # fmt: skip
    readable(
        f"kohya-{tag}", lambda tmp, k=key, v=value: with_metadata(_small_kohya(tmp), tmp / "lora.safetensors", **{k: v})
    )


#: over a second each: hashing a 1 GB sparse input before and after each run
SLOW = {"config-1GB"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(CASES)])
def test_hostile_config(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jsonfile, "MAX_BYTES", 1 << 20)  # the size limit's cases stay small
    c = CASES[name]
    src = c.build(tmp_path)
    if c.refused:
        hostile.run(["inspect", src], inputs=[src], code=1, says=c.says)
        kit.validate([src], inputs=[src], ok=False, says=c.says)
    else:
        hostile.run(["inspect", "--json", "--metadata", src], inputs=[src], code=0)
        if "provenance" in name:  # the table describes loratools' record
            hostile.run(["inspect", src], inputs=[src], code=0)
        kit.validate([src], inputs=[src], ok=None)


@pytest.mark.parametrize(
    "name",
    ["alpha-10^400", "rank_pattern-zero-rank", "config-duplicate-r", "config-depth-100000", "diffusers-alpha-nan"],
)
def test_hostile_config_through_convert_and_merge(tmp_path: Path, name: str) -> None:
    """The same refusal from the commands that write: nothing written, nothing left behind."""
    src = CASES[name].build(tmp_path)
    says = CASES[name].says
    out = tmp_path / "out"
    hostile.run(["convert", src, "--to", "kohya", "-o", out], inputs=[src], code=1, out=out, says=says)
    hostile.run(["mix", src, src, "-o", out], inputs=[src], code=1, out=out, says=says)
    base = tmp_path / "base.safetensors"
    shutil.copy(FIXTURES / "peft_llama" / "adapter_model.safetensors", base)
    hostile.run(["merge", base, src, "-o", out], inputs=[src, base], code=1, out=out, says=says)


def _base(tmp: Path, config: str | bytes) -> Path:
    base = tmp / "base"
    base.mkdir()
    shutil.copy(FIXTURES / "peft_llama" / "adapter_model.safetensors", base / "model.safetensors")
    put(base / "config.json", config)
    return base


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ('{"architectures": ["LlamaForCausalLM"], "architectures": []}', "duplicate key"),
        ('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}", "deeper"),
        ("\ufeff{}", "byte-order mark"),
        ('{"num_hidden_layers": 1' + "0" * 5000 + "}", "digits"),
    ],
    ids=["duplicate", "depth", "bom", "huge-int"],
)
def test_hostile_base_config(tmp_path: Path, config: str, says: str) -> None:
    """A base model's config.json (read for GGUF hyper-parameters) through the same JSON reader."""
    pytest.importorskip("gguf")
    base = _base(tmp_path, config)
    out = tmp_path / "a.gguf"
    src = FIXTURES / "peft_llama"
    hostile.run(["convert", src, "--to", "gguf", "--base", base, "-o", out], inputs=[src, base], out=out, says=says)


def test_every_kind_is_covered() -> None:
    assert len(CASES) >= 60
    assert sum(not c.refused for c in CASES.values()) >= 10

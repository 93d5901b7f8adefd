"""Hostile GGUF, both ways. Exports: base configs with wrong, missing, huge or contradictory values, config files
that are not configs, head counts that do not divide the rows, and no ``gguf`` package. Reads: GGUF adapters whose
bytes lie (truncated, lying counts, offsets, types, dimensions, names, keys, architectures, alphas, pairs). Each is
one Error line (nothing written; validate: a finding), or a correct file, in bounded time: no count from a config
or a file is ever looped over before it is checked.

The base is built from code: a safetensors file with the tiny Llama's tensor names (two blocks), and a config.json
per case beside it.
"""

from __future__ import annotations

import builtins
import json
import math
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any

import hostile
import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import save_file

from loratools.errors import LoratoolsError
from loratools.formats import gguf as gguf_format
from loratools.model import Adapter, Module, TensorRef

ADAPTER = FIXTURES / "peft_llama"  # q/k/v/o on both blocks: q 32 rows (4 heads of 8), k 16 rows (2 kv heads)
GOOD = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_size": 32,
}


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama's tensor names and shapes (values do not matter to an export)."""
    shapes = {"model.embed_tokens.weight": (128, 32), "model.norm.weight": (32,), "lm_head.weight": (128, 32)}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (32, 32), p + "self_attn.k_proj.weight": (16, 32),
            p + "self_attn.v_proj.weight": (16, 32), p + "self_attn.o_proj.weight": (32, 32),
            p + "mlp.gate_proj.weight": (64, 32), p + "mlp.up_proj.weight": (64, 32), p + "mlp.down_proj.weight": (32, 64),
            p + "input_layernorm.weight": (32,), p + "post_attention_layernorm.weight": (32,),
        }  # fmt: skip
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path))
    return path


def base_with(weights: Path, tmp_path: Path, config: Any = None, *, raw: bytes | None = None) -> Path:
    """A base folder: the weights (linked) and a config.json holding ``config`` (as JSON) or ``raw`` bytes."""
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(weights)
    if raw is not None:
        (folder / "config.json").write_bytes(raw)
    elif config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def export(base: Path, tmp_path: Path, *, says: str | list[str], code: int = 1, adapter: Path = ADAPTER) -> str:
    out = tmp_path / "out.gguf"
    r = hostile.run(
        ["convert", adapter, "--to", "gguf", "--base", base, "-o", out],
        inputs=[adapter, base], out=out if code else None, code=code, says=says, seconds=10,
    )  # fmt: skip
    assert out.exists() == (code == 0)
    return r.stderr


def edited(**changes: Any) -> dict[str, Any]:
    cfg = dict(GOOD)
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    return cfg


#: id -> (config, words of the Error)
CONFIGS: dict[str, tuple[dict[str, Any], str | list[str]]] = {
    "layers-1e9": (edited(num_hidden_layers=10**9), ["num_hidden_layers 1000000000", "hold 2 blocks"]),
    "layers-1e30": (edited(num_hidden_layers=10**30), "hold 2 blocks"),
    "layers-1": (edited(num_hidden_layers=1), "hold 2 blocks"),
    "layers-0": (edited(num_hidden_layers=0), ["num_hidden_layers", "positive integer"]),
    "layers-negative": (edited(num_hidden_layers=-2), "positive integer"),
    "layers-float": (edited(num_hidden_layers=2.0), ["positive integer", "2.0"]),
    "layers-true": (edited(num_hidden_layers=True), ["positive integer", "true"]),
    "layers-string": (edited(num_hidden_layers="2"), "positive integer"),
    "layers-null": (edited(num_hidden_layers=None), "positive integer"),
    "layers-list": (edited(num_hidden_layers=[2]), "positive integer"),
    "layers-missing": (edited(num_hidden_layers=...), "has no num_hidden_layers"),
    "heads-0": (edited(num_attention_heads=0), ["num_attention_heads", "positive integer"]),
    "heads-negative": (edited(num_attention_heads=-4), "positive integer"),
    "heads-float": (edited(num_attention_heads=4.0), "positive integer"),
    "heads-true": (edited(num_attention_heads=True, num_key_value_heads=...), "positive integer"),
    "heads-missing": (edited(num_attention_heads=...), "has no num_attention_heads"),
    "heads-3": (edited(num_attention_heads=3, num_key_value_heads=...), ["output rows", "3 heads", "do not split"]),
    "heads-64": (edited(num_attention_heads=64), ["q_proj", "64 heads"]),
    "heads-1e30": (edited(num_attention_heads=10**30, num_key_value_heads=...), "do not split"),
    "heads-16-sizes-differ": (edited(num_attention_heads=16), "one size"),
    "kv-0": (edited(num_key_value_heads=0), ["num_key_value_heads", "positive integer"]),
    "kv-3": (edited(num_key_value_heads=3), "must divide"),
    "kv-8-above-heads": (edited(num_key_value_heads=8), "must divide"),
    "kv-string": (edited(num_key_value_heads="2"), "positive integer"),
    "kv-null-means-heads": (edited(num_key_value_heads=None), "one size"),
    "kv-1-sizes-differ": (edited(num_key_value_heads=1), "one size"),
    "arch-string": (edited(architectures="LlamaForCausalLM"), "list of names"),
    "arch-int": (edited(architectures=[1]), "list of names"),
    "arch-dict": (edited(architectures=[{"a": 1}]), "list of names"),
    "arch-unknown": (edited(architectures=["GPT2LMHeadModel"]), "knows no rules"),
    "arch-empty-model-type": (edited(architectures=[]), ["knows no rules", "llama"]),
    "arch-none-at-all": (edited(architectures=..., model_type=...), "names no architecture"),
    "arch-huge-name": (edited(architectures=["X" * 100_000]), "knows no rules"),
}
#: the cases every default run tries; the rest run under -m slow
CONFIG_DEFAULT = {
    "layers-1e9", "layers-true", "layers-missing", "heads-0", "heads-3", "heads-16-sizes-differ", "kv-3",
    "kv-null-means-heads", "arch-dict", "arch-huge-name",
}  # fmt: skip


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=() if c in CONFIG_DEFAULT else pytest.mark.slow) for c in sorted(CONFIGS)]
)
def test_hostile_base_config(case: str, weights: Path, tmp_path: Path) -> None:
    config, says = CONFIGS[case]
    stderr = export(base_with(weights, tmp_path, config), tmp_path, says=says)
    assert max(len(line) for line in stderr.splitlines()) < 400  # a value from the config is shown cut short


#: id -> (raw config.json bytes, words of the Error)
FILES: dict[str, tuple[bytes, list[str]]] = {
    "a-list": (b"[1, 2]", ["config.json", "not a JSON object"]),
    "a-string": (b'"llama"', ["config.json", "not a JSON object"]),
    "null": (b"null", ["config.json", "not a JSON object"]),
    "not-json": (b"{num_hidden_layers: 2", ["config.json", "not valid JSON"]),
    "empty": (b"", ["config.json", "not valid JSON"]),
    "not-utf8": (b'{"model_type": "\xff\xfe"}', ["config.json", "not valid JSON"]),
    "deeply-nested": (b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", ["config.json", "nested deeper than"]),
    "duplicate-key": (
        json.dumps(GOOD)[:-1].encode() + b', "num_hidden_layers": 99}',
        ["config.json", "duplicate key"],
    ),  # fmt: skip
    "nan-layers": (
        json.dumps(GOOD).replace("2,", "NaN,", 1).encode(),
        ["num_hidden_layers", "positive integer", "NaN"],
    ),  # fmt: skip
    "infinity-heads": (
        json.dumps(GOOD).replace('"num_attention_heads": 4', '"num_attention_heads": Infinity').encode(),
        ["positive integer", "Infinity"],
    ),  # fmt: skip
    "5000-digit-int": (
        json.dumps(GOOD).replace('"num_hidden_layers": 2', '"num_hidden_layers": ' + "9" * 5000).encode(),
        ["config.json", "more than 4300 digits"],
    ),  # fmt: skip
    "5-mib": (b'{"pad": "' + b"x" * (5 << 20) + b'"}', ["config.json", "beyond the"]),
}
FILE_DEFAULT = {"a-list", "not-json", "deeply-nested", "duplicate-key", "5-mib"}


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=() if c in FILE_DEFAULT else pytest.mark.slow) for c in sorted(FILES)]
)
def test_config_file_that_is_not_a_config(case: str, weights: Path, tmp_path: Path) -> None:
    raw, says = FILES[case]
    export(base_with(weights, tmp_path, raw=raw), tmp_path, says=says)


@pytest.mark.parametrize("kind", ["missing", "folder", "fifo", "device-link"])
def test_config_json_that_is_not_a_file(kind: str, weights: Path, tmp_path: Path) -> None:
    """No config: the export says it needs one; a folder, a FIFO or a link to a device: refused, never read
    (a FIFO would block the read forever)."""
    base = base_with(weights, tmp_path)
    cfg = base / "config.json"
    if kind == "folder":
        cfg.mkdir()
    elif kind == "fifo":
        os.mkfifo(cfg)
    elif kind == "device-link":
        cfg.symlink_to("/dev/zero")
    export(base, tmp_path, says="needs the base model's config.json" if kind == "missing" else "config.json")


def test_good_config_exports_bounded_by_the_adapter(weights: Path, tmp_path: Path) -> None:
    """The same export with a sound config works (a control for every case above)."""
    export(base_with(weights, tmp_path, GOOD), tmp_path, says=[], code=0)


# ---- without the gguf package -------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["sys-modules", "import-hook"])
def test_without_the_gguf_package(how: str, weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One Error with the install hint, before the adapter is even read (a missing adapter is not reached)."""
    if how == "sys-modules":
        monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    else:
        real = builtins.__import__

        def no_gguf(name: str, *args: Any, **kwargs: Any) -> Any:
            if name == "gguf" or name.startswith("gguf."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return real(name, *args, **kwargs)

        monkeypatch.delitem(sys.modules, "gguf", raising=False)
        monkeypatch.setattr(builtins, "__import__", no_gguf)
    base = base_with(weights, tmp_path, GOOD)
    out = tmp_path / "out.gguf"
    r = hostile.run(
        ["convert", ADAPTER, "--to", "gguf", "--base", base, "-o", out],
        inputs=[ADAPTER, base], out=out, says=["gguf package", "pip install"],
    )  # fmt: skip
    assert "Hint:" in r.stderr
    missing = tmp_path / "no-such-adapter"
    hostile.run(["convert", missing, "--to", "gguf", "--base", base, "-o", out], out=out, says="gguf package")
    hostile.call(gguf_format.plan, Adapter("peft"), GOOD, raises=LoratoolsError, says="gguf package")


# ---- the planner, as a library call -------------------------------------------------------------------------------


def adapter(*mods: tuple[str, int, float | None], kind: str = "lora") -> Adapter:
    """``(module name, rank, alpha)`` modules with the tiny Llama's shapes."""
    a = Adapter("peft")
    rows = {"q_proj": 32, "k_proj": 16, "v_proj": 16, "o_proj": 32}
    for name, rank, alpha in mods:
        out = rows[name.rsplit(".", 1)[-1]]
        g = torch.Generator().manual_seed(rank)
        f = {"down": TensorRef.of(torch.randn(rank, 32, generator=g)), "up": TensorRef.of(torch.randn(out, rank, generator=g))}  # fmt: skip
        a.modules[name] = Module(name, kind, f, alpha=alpha)  # type: ignore[arg-type]
    return a


Q0, Q1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"

#: id -> (adapter, config, words of the Error)
PLANS: dict[str, tuple[Any, dict[str, Any], str]] = {
    "rank-0": (lambda: adapter((Q0, 0, 1.0)), GOOD, "rank 0"),
    "nan-alpha": (lambda: adapter((Q0, 4, math.nan)), GOOD, "alpha is nan"),
    "inf-alpha": (lambda: adapter((Q0, 4, math.inf)), GOOD, "alpha is inf"),
    "alpha-beyond-float32": (lambda: adapter((Q0, 4, 1e300)), GOOD, "overflows float32"),
    "block-beyond-the-base": (
        lambda: adapter((Q1, 4, 8.0), ("model.layers.5.self_attn.q_proj", 4, 8.0)),
        GOOD,
        "num_hidden_layers is 2",
    ),  # fmt: skip
    "block-number-of-12-digits": (
        lambda: adapter(("model.layers.999999999999.self_attn.q_proj", 4, 8.0)),
        edited(num_hidden_layers=10**13),
        "no llama GGUF tensor",
    ),  # fmt: skip
    "block-number-with-leading-zero": (
        lambda: adapter(("model.layers.01.self_attn.q_proj", 4, 8.0)),
        GOOD,
        "no llama GGUF tensor",
    ),  # fmt: skip
    "module-name-of-100k-chars": (
        lambda: adapter(("model." + "x" * 100_000 + ".q_proj", 4, 8.0)),
        GOOD,
        "no llama GGUF tensor",
    ),  # fmt: skip
    "loha-module": (
        lambda: Adapter(
            "kohya",
            modules={
                "m": Module("m", "loha", {k: TensorRef.of(torch.ones(2, 2)) for k in ("w1a", "w1b", "w2a", "w2b")})
            },
        ),
        GOOD,
        "only plain LoRA",
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", sorted(PLANS))
def test_hostile_plan(case: str) -> None:
    build, config, says = PLANS[case]
    hostile.call(gguf_format.plan, build(), config, raises=LoratoolsError, says=says, seconds=5)


def test_a_huge_block_count_costs_nothing() -> None:
    """num_hidden_layers 10^9 (a Hub config, no weights to check it against) and a module in block 999,999,999:
    the name map is made for block 0 alone, so this takes milliseconds, not the hours a map of every block would."""
    a = adapter((Q1, 4, 8.0), ("model.layers.999999999.self_attn.k_proj", 2, 4.0))
    t0 = time.perf_counter()
    arch, alpha, tensors = gguf_format.plan(a, edited(num_hidden_layers=10**9))
    assert time.perf_counter() - t0 < 2
    assert arch == "llama" and [t[0] for t in tensors] == ["blk.1.attn_q.weight", "blk.999999999.attn_k.weight"]


def test_zero_alphas_keep_a_usable_file_alpha() -> None:
    """All alphas 0: each module adds nothing; the file alpha llama.cpp divides by stays 1 (not 0)."""
    a = adapter((Q0, 4, 0.0), (Q1, 4, 0.0))
    _, alpha, tensors = gguf_format.plan(a, GOOD)
    assert alpha == 1.0 and all(not bool(b.any()) for _, _, b in tensors)


# ---- hostile GGUF adapters (reading) ----------------------------------------------------------------------------
#
# Files built byte by byte, so that any field can lie. The control (`good`) is a sound llama adapter: one v_proj
# LoRA (rank 2, 32 -> 16), alpha 8, head counts 4 / 2. Each case is read by inspect, validate and convert (and a
# few by mix, merge and diff too): one Error line (validate: a finding), nothing written, inputs untouched,
# bounded time; no count from the file is looped over before the bytes it claims are known to exist.

U32, U64, F32, STR, ARR = 4, 10, 6, 8, 9


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def kv_str(key: str, value: str) -> bytes:
    return kv(key, STR, s(value))


def info(name: str | bytes, ne: list[int], ggml_type: int, offset: int) -> bytes:
    return (
        s(name)
        + struct.pack("<I", len(ne))
        + b"".join(struct.pack("<Q", d) for d in ne)
        + struct.pack("<IQ", ggml_type, offset)
    )


def floats(n: int, value: float = 0.25) -> bytes:
    return struct.pack(f"<{n}f", *([value] * n))


def keys(arch: str = "llama", **over: bytes | None) -> list[bytes]:
    """The control's key/value pairs, with some replaced (bytes) or left out (None)."""
    base: dict[str, bytes] = {
        "general.architecture": kv_str("general.architecture", arch),
        "general.type": kv_str("general.type", "adapter"),
        "adapter.type": kv_str("adapter.type", "lora"),
        "adapter.lora.alpha": kv("adapter.lora.alpha", F32, struct.pack("<f", 8.0)),
        f"{arch}.attention.head_count": kv(f"{arch}.attention.head_count", U32, struct.pack("<I", 4)),
        f"{arch}.attention.head_count_kv": kv(f"{arch}.attention.head_count_kv", U32, struct.pack("<I", 2)),
    }
    for k, v in over.items():
        k = k.replace("__", ".")
        if v is None:
            base.pop(k, None)
        else:
            base[k] = v
    return list(base.values())


V_A, V_B = "blk.0.attn_v.weight.lora_a", "blk.0.attn_v.weight.lora_b"


def tensors(*specs: tuple[str | bytes, list[int], int]) -> tuple[list[bytes], bytes]:
    """Tensor infos packed as ggml packs them (each at an offset aligned to 32) and their data (F32 0.25)."""
    infos, data = [], b""
    for name, ne, gtype in specs:
        infos.append(info(name, ne, gtype, len(data)))
        n = math.prod(ne) * (4 if gtype == 0 else 2 if gtype in (1, 30) else 4)
        data += floats(n // 4 + 1)[:n] + b"\0" * (-n % 32)
    return infos, data


def gguf_bytes(kvs: list[bytes], infos: list[bytes], data: bytes, *, version: int = 3,
               n_tensors: int | None = None, n_kv: int | None = None, align: int = 32) -> bytes:  # fmt: skip
    head = b"GGUF" + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)  # fmt: skip
    head += b"".join(kvs) + b"".join(infos)
    return head + b"\0" * (-len(head) % align) + data


GOOD_TENSORS = ((V_A, [32, 2], 0), (V_B, [2, 16], 0))


def good(**over: Any) -> bytes:
    infos, data = tensors(*GOOD_TENSORS)
    return gguf_bytes(keys(**over), infos, data)


def with_tensors(*specs: tuple[str | bytes, list[int], int], kvs: list[bytes] | None = None) -> bytes:
    infos, data = tensors(*specs)
    return gguf_bytes(keys() if kvs is None else kvs, infos, data)


def lying_offset() -> bytes:
    infos, data = tensors(*GOOD_TENSORS)
    infos[1] = info(V_B, [2, 16], 0, 64)  # the first tensor ends at 256: ggml packs the next one there
    return gguf_bytes(keys(), infos, data)


HUGE = 2**62
#: id -> (file bytes, words of the Error / finding)
GGUF_CASES: dict[str, tuple[Any, str]] = {
    "magic-only": (lambda: b"GGUF", "past the end"),
    "truncated-in-keys": (lambda: good()[:60], "past the end"),
    "truncated-in-data": (lambda: good()[:-200], "past the end of the"),
    "version-1": (lambda: gguf_bytes(keys(), *tensors(*GOOD_TENSORS), version=1), "version 1 is not supported"),
    "version-99": (lambda: gguf_bytes(keys(), *tensors(*GOOD_TENSORS), version=99), "version 99"),
    "byte-swapped": (lambda: gguf_bytes(keys(), *tensors(*GOOD_TENSORS), version=3 << 24), "other byte order"),
    "tensor-count-2e63": (lambda: gguf_bytes(keys(), *tensors(*GOOD_TENSORS), n_tensors=2**63), "past the end"),
    "kv-count-2e64": (lambda: gguf_bytes(keys(), *tensors(*GOOD_TENSORS), n_kv=2**64 - 1), "past the end"),
    "tensor-count-one-more": (lambda: gguf_bytes(keys(), *tensors(*GOOD_TENSORS), n_tensors=3), ""),
    "kv-count-one-more": (lambda: gguf_bytes(keys(), *tensors(*GOOD_TENSORS), n_kv=7), ""),
    "key-length-2e62": (lambda: good(x=struct.pack("<Q", HUGE) + b"k"), "past the end"),
    "u8-array-of-2e60": (lambda: good(x=kv("x", ARR, struct.pack("<IQ", 0, 2**60))), "past the end"),
    "string-array-of-2e60": (lambda: good(x=kv("x", ARR, struct.pack("<IQ", STR, 2**60))), "past the end"),
    "string-of-2e62-in-array": (lambda: good(x=kv("x", ARR, struct.pack("<IQQ", STR, 2, HUGE))), "past the end"),
    "nested-array": (
        lambda: good(x=kv("x", ARR, struct.pack("<IQ", ARR, 1) + struct.pack("<IQ", 0, 0))),
        "arrays of arrays",
    ),
    "unknown-value-type": (lambda: good(x=kv("x", 99, b"\0" * 8)), "unknown value type 99"),
    "duplicate-key": (
        lambda: gguf_bytes(keys() + [kv_str("adapter.type", "lora")], *tensors(*GOOD_TENSORS)),
        "duplicate key",
    ),
    "duplicate-tensor": (lambda: with_tensors(*GOOD_TENSORS, (V_A, [32, 2], 0)), "duplicate tensor name"),
    "name-of-64-bytes": (lambda: with_tensors(("x" * 64, [4], 0)), "at most 63"),
    "five-dims": (lambda: with_tensors((V_A, [1, 1, 1, 1, 1], 0)), "at most 4"),
    "dims-2e62-squared": (lambda: gguf_bytes(keys(), [info(V_A, [HUGE, HUGE], 0, 0)], b""), "more elements"),
    "dim-2e63": (lambda: gguf_bytes(keys(), [info(V_A, [2**63, 1], 0, 0)], b""), "more elements"),
    "dims-that-fit-but-no-data": (lambda: gguf_bytes(keys(), [info(V_A, [2**30, 2**20], 0, 0)], b""), "past the end"),
    "unknown-ggml-type": (lambda: with_tensors((V_A, [32, 2], 99), (V_B, [2, 16], 0)), "unknown ggml type 99"),
    "removed-ggml-type-4": (lambda: with_tensors((V_A, [32, 2], 4), (V_B, [2, 16], 0)), "unknown ggml type 4"),
    "q8-row-not-whole-blocks": (lambda: with_tensors((V_A, [31, 2], 8), (V_B, [2, 16], 0)), "whole number of Q8_0"),
    "offset-lies": (lying_offset, "expected 256"),
    "alignment-24": (
        lambda: good(general__alignment=kv("general.alignment", U32, struct.pack("<I", 24))),
        "power of two",
    ),
    "alignment-0": (
        lambda: good(general__alignment=kv("general.alignment", U32, struct.pack("<I", 0))),
        "power of two",
    ),
    "alignment-as-u64": (
        lambda: good(general__alignment=kv("general.alignment", U64, struct.pack("<Q", 32))),
        "power of two",
    ),
    "key-not-utf8": (lambda: good(x=kv(b"\xff\xfe", U32, b"\0" * 4)), "not UTF-8"),
    "tensor-name-not-utf8": (
        lambda: with_tensors((b"\xff" + V_A.encode(), [32, 2], 0), (V_B, [2, 16], 0)),
        "not UTF-8",
    ),
    "a-model-not-an-adapter": (lambda: good(general__type=kv_str("general.type", "model")), "not an adapter"),
    "no-general-type": (lambda: good(general__type=None), "no general.type"),
    "control-vector": (lambda: good(adapter__type=kv_str("adapter.type", "control_vector")), "only LoRA"),
    "made-up-architecture": (lambda: with_tensors(*GOOD_TENSORS, kvs=keys("made-up")), "unknown GGUF architecture"),
    "architecture-without-rules": (lambda: with_tensors(*GOOD_TENSORS, kvs=keys("bert")), "knows no rules"),
    "architecture-not-a-string": (
        lambda: good(general__architecture=kv("general.architecture", U32, b"\0" * 4)),
        "general.architecture",
    ),  # fmt: skip
    "alpha-as-u32": (lambda: good(adapter__lora__alpha=kv("adapter.lora.alpha", U32, struct.pack("<I", 8))), "float32"),
    "alpha-nan": (lambda: good(adapter__lora__alpha=kv("adapter.lora.alpha", F32, struct.pack("<f", math.nan))), "nan"),
    "unknown-tensor": (
        lambda: with_tensors(("blk.0.made_up.weight.lora_a", [32, 2], 0), ("blk.0.made_up.weight.lora_b", [2, 16], 0)),
        "blk.0.made_up.weight.lora_a",
    ),
    "a-model-tensor": (lambda: with_tensors(*GOOD_TENSORS, ("blk.0.attn_v.weight", [32, 16], 0)), "key(s)"),
    "unpaired-lora-a": (lambda: with_tensors((V_A, [32, 2], 0)), "missing factor"),
    "ranks-differ": (lambda: with_tensors((V_A, [32, 2], 0), (V_B, [3, 16], 0)), "rank"),
    "three-dims-not-an-expert": (lambda: with_tensors((V_A, [32, 2, 2], 0), (V_B, [2, 16, 2], 0)), "2-D"),
    "expert-counts-differ": (
        lambda: with_tensors(
            ("blk.0.ffn_up_exps.weight.lora_a", [32, 2, 4], 0), ("blk.0.ffn_up_exps.weight.lora_b", [2, 16, 3], 0)
        ),
        "one expert count",
    ),  # fmt: skip
    "integer-factor": (lambda: with_tensors((V_A, [32, 2], 26), (V_B, [2, 16], 0)), "not a LoRA factor"),
    "head-count-3": (
        lambda: with_tensors(
            ("blk.0.attn_q.weight.lora_a", [32, 2], 0),
            ("blk.0.attn_q.weight.lora_b", [2, 32], 0),
            kvs=keys(
                llama__attention__head_count=kv("llama.attention.head_count", U32, struct.pack("<I", 3)),
                llama__attention__head_count_kv=None,
            ),
        ),
        "does not split",
    ),  # fmt: skip
    "kv-heads-above-heads": (
        lambda: with_tensors(
            ("blk.0.attn_k.weight.lora_a", [32, 2], 0),
            ("blk.0.attn_k.weight.lora_b", [2, 16], 0),
            kvs=keys(llama__attention__head_count_kv=kv("llama.attention.head_count_kv", U32, struct.pack("<I", 8))),
        ),
        "must divide",
    ),  # fmt: skip
    "qk-without-head-counts": (
        lambda: with_tensors(
            ("blk.0.attn_q.weight.lora_a", [32, 2], 0),
            ("blk.0.attn_q.weight.lora_b", [2, 32], 0),
            kvs=keys(llama__attention__head_count=None, llama__attention__head_count_kv=None),
        ),
        "config.json beside",
    ),  # fmt: skip
    "no-tensors": (lambda: gguf_bytes(keys(), [], b""), "no LoRA modules"),
}
GGUF_DEFAULT = {
    "magic-only", "truncated-in-data", "byte-swapped", "tensor-count-2e63", "u8-array-of-2e60", "string-array-of-2e60",
    "nested-array", "duplicate-tensor", "dims-2e62-squared", "unknown-ggml-type", "offset-lies", "alignment-24",
    "a-model-not-an-adapter", "architecture-without-rules", "alpha-nan", "unknown-tensor", "unpaired-lora-a",
    "qk-without-head-counts", "three-dims-not-an-expert",
}  # fmt: skip
#: what inspect --fast (the header alone) still reads: the damage is in the data or the head counts
HEADER_FINE = {"qk-without-head-counts", "head-count-3", "kv-heads-above-heads"}


def test_the_control_is_sound(tmp_path: Path) -> None:
    path = tmp_path / "good.gguf"
    path.write_bytes(good())
    hostile.run(["inspect", path], inputs=[path], code=0)
    import gguf

    r = gguf.GGUFReader(path)  # the owner reads it too
    assert [t.name for t in r.tensors] == [V_A, V_B]
    out = tmp_path / "peft"
    hostile.run(["convert", path, "--to", "peft", "-o", out], inputs=[path], out=out, code=0)


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=() if c in GGUF_DEFAULT else pytest.mark.slow) for c in sorted(GGUF_CASES)]
)
def test_hostile_gguf_adapter(case: str, tmp_path: Path) -> None:
    import readers_kit as kit

    build, says = GGUF_CASES[case]
    path = tmp_path / "adapter.gguf"
    path.write_bytes(build())
    inputs = [path]
    fast = ["inspect", path, "--fast"]
    if case in HEADER_FINE:
        hostile.run(fast, inputs=inputs, code=0)
        hostile.run(["inspect", path], inputs=inputs, code=1, says=says)
    elif case == "no-tensors":
        hostile.run(fast, inputs=inputs, code=0)
    else:
        hostile.run(fast, inputs=inputs, code=1, says=says, seconds=5)
    kit.validate([path], inputs=inputs, ok=False, says=says or None)
    out = tmp_path / "out"
    if case == "no-tensors":  # an empty adapter converts to an empty one, as from every other format
        hostile.run(["convert", path, "--to", "peft", "-o", out], inputs=inputs, code=0)
        return
    hostile.run(["convert", path, "--to", "peft", "-o", out], inputs=inputs, out=out, code=1, says=says or None)


@pytest.mark.parametrize("case", ["truncated-in-data", "unknown-tensor", "offset-lies"])
def test_hostile_gguf_into_mix_merge_and_diff(case: str, tmp_path: Path) -> None:
    build, says = GGUF_CASES[case]
    path = tmp_path / "adapter.gguf"
    path.write_bytes(build())
    out = tmp_path / "out"
    hostile.run(["mix", path, ADAPTER, "--to", "peft", "-o", out], inputs=[path], out=out, says=says)
    base = tmp_path / "base.safetensors"
    save_file({"model.layers.0.self_attn.v_proj.weight": torch.zeros(16, 32)}, str(base))
    hostile.run(["merge", base, path, "-o", out], inputs=[path, base], out=out, says=says)
    # diff compares stored tensors when one side is no readable adapter: a GGUF file has none it can compare
    hostile.run(["diff", path, ADAPTER], inputs=[path], code=2, says="a GGUF file, not safetensors")


@pytest.mark.slow
def test_a_vocabulary_sized_string_array_is_walked_in_bounded_time(tmp_path: Path) -> None:
    """12 million empty strings (a 100 MB header of nothing) before the tensors: read in bounded time, kept as
    nothing, and the adapter after it still reads."""
    n = 12_000_000
    vocab = kv("tokenizer.ggml.tokens", ARR, struct.pack("<IQ", STR, n) + b"\0" * 8 * n)
    infos, data = tensors(*GOOD_TENSORS)
    path = tmp_path / "big.gguf"
    path.write_bytes(gguf_bytes([*keys(), vocab], infos, data))
    t0 = time.perf_counter()
    hostile.run(["inspect", path, "--fast"], inputs=[path], code=0, seconds=60)
    assert time.perf_counter() - t0 < 60

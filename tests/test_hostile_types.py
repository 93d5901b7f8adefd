"""Hostile PEFT LoHa / LoKr / AdaLoRA / VeRA folders and mlx-lm adapter folders.

Factors missing or of shapes that do not fit together, ranks the config claims and the tensors do not have (huge
ones included), AdaLoRA masks of the wrong length or type, VeRA projections missing or too small, mlx-lm configs
of every wrong type and tensors mlx-lm would not load. Each is refused with one ``Error:`` line naming the module or
the field (``validate``: a finding), never a traceback, inputs untouched.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import hostile
import pytest
import readers_kit as kit
import torch
from readers_kit import FIXTURES, put
from safetensors.torch import load_file, save_file

Build = Callable[[Path], Path]  # tmp folder -> the adapter folder
Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Case:
    build: Build
    says: str


CASES: dict[str, Case] = {}
P = "base_model.model.model.layers.0."


def peft_type(name: str, src: str, says: str, *, config: dict[str, object] | None = None,
              change: Callable[[Tensors], Tensors] | None = None) -> None:  # fmt: skip
    """A copy of the PEFT fixture ``src`` with ``config`` merged into its config and ``change`` applied to its
    tensors."""

    def build(tmp: Path) -> Path:
        folder = kit.peft_folder(tmp / "adapter", config, src=src)
        if change is not None:
            weights = folder / "adapter_model.safetensors"
            save_file(change(load_file(weights)), weights)
        return folder

    assert name not in CASES, name
    CASES[name] = Case(build, says)


def drop(*keys: str) -> Callable[[Tensors], Tensors]:
    return lambda t: {k: v for k, v in t.items() if k not in keys}


def replace(key: str, value: torch.Tensor) -> Callable[[Tensors], Tensors]:
    return lambda t: {**t, key: value}


def add(key: str, value: torch.Tensor) -> Callable[[Tensors], Tensors]:
    return lambda t: {**t, key: value}


# ---- LoHa ------------------------------------------------------------------------------------------------------
Q = P + "self_attn.q_proj."
peft_type("loha-missing-w2b", "peft_llama_loha", "w2b", change=drop(Q + "hada_w2_b"))
peft_type("loha-only-w1", "peft_llama_loha", "missing factor", change=drop(Q + "hada_w2_a", Q + "hada_w2_b"))
peft_type("loha-inner-mismatch", "peft_llama_loha", "rank mismatch", change=replace(Q + "hada_w1_b", torch.ones(5, 32)))
peft_type("loha-sides-differ", "peft_llama_loha", "Hadamard halves", change=replace(Q + "hada_w2_a", torch.ones(16, 4)))
peft_type("loha-3d-factor", "peft_llama_loha", "must be 2-D", change=replace(Q + "hada_w1_a", torch.ones(32, 4, 2)))
peft_type("loha-rank-claimed-2^40", "peft_llama_loha", "rank", config={"r": 2**40, "rank_pattern": {}})
peft_type("loha-rank-pattern-huge", "peft_llama_loha", "rank", config={"rank_pattern": {"q_proj": 2**31}})
peft_type("loha-alpha-string", "peft_llama_loha", "alpha", config={"alpha": "8"})
peft_type("loha-lora-keys-too", "peft_llama_loha", "lora_A", change=add(Q + "lora_A.weight", torch.ones(4, 32)))
peft_type("loha-scalar-factor", "peft_llama_loha", "must be 2-D", change=replace(Q + "hada_w1_a", torch.tensor(1.0)))

# ---- LoKr ------------------------------------------------------------------------------------------------------
K = P + "self_attn.k_proj."
D = P + "mlp.down_proj."
peft_type("lokr-missing-w2", "peft_llama_lokr", "missing factor", change=drop(K + "lokr_w2_a", K + "lokr_w2_b"))
peft_type("lokr-missing-w1", "peft_llama_lokr", "missing factor", change=drop(D + "lokr_w1"))
peft_type(
    "lokr-w1-twice", "peft_llama_lokr", "both a full and a low-rank w1", change=add(D + "lokr_w1_a", torch.ones(4, 2))
)
peft_type("lokr-half-w2", "peft_llama_lokr", "missing factor", change=drop(K + "lokr_w2_b"))
peft_type("lokr-inner-mismatch", "peft_llama_lokr", "rank mismatch", change=replace(K + "lokr_w2_b", torch.ones(3, 8)))
peft_type("lokr-rank-claimed-2^40", "peft_llama_lokr", "rank", config={"r": 2**40, "rank_pattern": {}})

# ---- AdaLoRA ---------------------------------------------------------------------------------------------------
AQ = P + "self_attn.q_proj."
MASKS = "model.layers.0.self_attn.q_proj.lora_E"
#: the fixture's masks (every module's), with q_proj's replaced
ALL_MASKS = json.loads((FIXTURES / "peft_llama_adalora" / "adapter_config.json").read_text())["rank_pattern"]


def masks(q_proj: object) -> dict[str, object]:
    return {"rank_pattern": {**ALL_MASKS, MASKS: q_proj}}


peft_type("adalora-missing-E", "peft_llama_adalora", "lora_E", change=drop(AQ + "lora_E"))
peft_type("adalora-missing-B", "peft_llama_adalora", "q_proj", change=drop(AQ + "lora_B"))
peft_type("adalora-E-wrong-shape", "peft_llama_adalora", "q_proj", change=replace(AQ + "lora_E", torch.ones(3, 2)))
peft_type("adalora-rank-mismatch", "peft_llama_adalora", "q_proj", change=replace(AQ + "lora_B", torch.ones(32, 4)))
peft_type("adalora-mask-too-short", "peft_llama_adalora", "rank_pattern",
          config=masks([True, False]))  # fmt: skip
peft_type("adalora-mask-not-bool", "peft_llama_adalora", "rank_pattern",
          config=masks(["yes"] * 6))  # fmt: skip
peft_type("adalora-mask-keeps-too-few", "peft_llama_adalora", "q_proj",
          config=masks([True, False, False, False, False, False]))  # fmt: skip
peft_type("adalora-init_r-2^40", "peft_llama_adalora", "init_r", config={"init_r": 2**40})
peft_type("adalora-init_r-string", "peft_llama_adalora", "init_r", config={"init_r": "6"})

# ---- VeRA ------------------------------------------------------------------------------------------------------
VQ = P + "self_attn.q_proj."
peft_type("vera-missing-A", "peft_llama_vera", "vera_A", change=drop("base_model.vera_A"))
peft_type("vera-no-projection", "peft_llama_vera", "save_projection", config={"save_projection": False},
          change=drop("base_model.vera_A", "base_model.vera_B"))  # fmt: skip
peft_type(
    "vera-lambda_d-wrong-length", "peft_llama_vera", "q_proj", change=replace(VQ + "vera_lambda_d", torch.ones(5))
)
peft_type("vera-lambda_b-beyond-B", "peft_llama_vera", "q_proj", change=replace(VQ + "vera_lambda_b", torch.ones(999)))
peft_type("vera-lambda_b-2d", "peft_llama_vera", "q_proj", change=replace(VQ + "vera_lambda_b", torch.ones(32, 1)))
peft_type("vera-missing-lambda_d", "peft_llama_vera", "q_proj", change=drop(VQ + "vera_lambda_d"))
peft_type("vera-A-3d", "peft_llama_vera", "vera_A", change=replace("base_model.vera_A", torch.ones(8, 64, 2)))
peft_type("vera-rank-claimed-2^40", "peft_llama_vera", "r", config={"r": 2**40})


# ---- mlx-lm ----------------------------------------------------------------------------------------------------
M = "model.layers.0.self_attn.q_proj."
GOOD_CONFIG = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 20.0, "dropout": 0.0,
               "keys": ["self_attn.q_proj"]}}  # fmt: skip


def good_tensors() -> Tensors:
    return {M + "lora_a": torch.ones(32, 4) * 0.01, M + "lora_b": torch.ones(4, 32) * 0.01}


def mlx(name: str, says: str, *, config: object = None, raw: str | bytes | None = None,
        change: Callable[[Tensors], Tensors] | None = None) -> None:  # fmt: skip
    """An mlx-lm folder as mlx_lm.lora writes it, its config replaced by ``config`` (a dict merged into the good
    one, anything else written as it is) or ``raw``, its tensors changed by ``change``."""

    def build(tmp: Path) -> Path:
        folder = tmp / "adapter"
        folder.mkdir()
        tensors = good_tensors()
        save_file(change(tensors) if change else tensors, folder / "adapters.safetensors")
        cfg = {**GOOD_CONFIG, **config} if isinstance(config, dict) else (GOOD_CONFIG if config is None else config)
        put(folder / "adapter_config.json", raw if raw is not None else json.dumps(cfg, allow_nan=True))
        return folder

    assert name not in CASES, name
    CASES[name] = Case(build, says)


for value, tag in [([1], "list"), ("lora", "string"), (None, "null"), (7, "number")]:
    mlx(f"mlx-config-is-{tag}", "JSON object" if value is not None else "JSON object", raw=json.dumps(value))
mlx("mlx-config-not-json", "not valid JSON", raw="{lora_parameters: 1")
mlx("mlx-config-bom", "byte-order mark", raw=b"\xef\xbb\xbf{}")
mlx("mlx-config-duplicate", "duplicate key", raw='{"num_layers": 2, "num_layers": 4, "lora_parameters": {}}')
mlx("mlx-config-depth", "deeper", raw='{"x": ' + "[" * 100_000 + "]" * 100_000 + "}")
mlx("mlx-full-fine-tune", "fine_tune_type full", config={"fine_tune_type": "full"})
mlx("mlx-type-unknown", "fine_tune_type", config={"fine_tune_type": "qlora"})
mlx("mlx-type-number", "fine_tune_type", config={"fine_tune_type": 3})
mlx("mlx-num_layers-string", "num_layers", config={"num_layers": "16"})
mlx("mlx-num_layers-float", "num_layers", config={"num_layers": 1.5})
mlx("mlx-no-lora_parameters", "lora_parameters", config={"lora_parameters": None})
mlx("mlx-lora_parameters-list", "lora_parameters", config={"lora_parameters": [4, 20.0]})
for value, tag in [("4", "string"), (0, "zero"), (-4, "negative"), (4.0, "float"), (True, "bool"), (None, "null")]:
    mlx(f"mlx-rank-{tag}", "rank", config={"lora_parameters": {"rank": value, "scale": 20.0}})
mlx("mlx-rank-claimed-2^40", "rank", config={"lora_parameters": {"rank": 2**40, "scale": 20.0}})
mlx("mlx-rank-claimed-8", "rank", config={"lora_parameters": {"rank": 8, "scale": 20.0}})
for value, tag in [("20", "string"), (None, "null"), ([20], "list"), (True, "bool")]:
    mlx(f"mlx-scale-{tag}", "scale", config={"lora_parameters": {"rank": 4, "scale": value}})
mlx("mlx-scale-alpha-instead", "scale, not alpha", config={"lora_parameters": {"rank": 4, "alpha": 16}})
mlx("mlx-scale-nan", "NaN", raw='{"lora_parameters": {"rank": 4, "scale": NaN}}')
mlx("mlx-scale-1e308", "scale", config={"lora_parameters": {"rank": 4, "scale": 1e308}})
mlx("mlx-keys-string", "keys", config={"lora_parameters": {"rank": 4, "scale": 2.0, "keys": "self_attn.q_proj"}})
mlx("mlx-keys-ints", "keys", config={"lora_parameters": {"rank": 4, "scale": 2.0, "keys": [1, 2]}})
mlx("mlx-missing-lora_b", "lora_b", change=drop(M + "lora_b"))
mlx("mlx-missing-lora_a", "lora_a", change=drop(M + "lora_a"))
mlx("mlx-inner-mismatch", "lora_parameters.rank", change=replace(M + "lora_b", torch.ones(8, 32)))
mlx("mlx-switch-linear", "SwitchLinear", change=lambda t: {M + "lora_a": torch.ones(4, 32, 4),
                                                           M + "lora_b": torch.ones(4, 4, 32)})  # fmt: skip
mlx("mlx-vector-factor", "q_proj", change=replace(M + "lora_a", torch.ones(32)))
mlx("mlx-magnitude-in-lora", "DoRA magnitude", change=add(M + "m", torch.ones(32)))
mlx(
    "mlx-magnitude-wrong-length",
    "DoRA magnitude",
    config={"fine_tune_type": "dora"},
    change=add(M + "m", torch.ones(7)),
)
mlx("mlx-unknown-key", "model.layers.0.self_attn.q_proj.lora_c", change=add(M + "lora_c", torch.ones(2)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_type(tmp_path: Path, name: str) -> None:
    c = CASES[name]
    src = c.build(tmp_path)
    hostile.run(["inspect", src], inputs=[src], code=1, says=c.says)
    kit.validate([src], inputs=[src], ok=False, says=c.says)


@pytest.mark.parametrize("name", ["loha-inner-mismatch", "lokr-missing-w2", "adalora-mask-too-short",
                                  "vera-lambda_b-beyond-B", "mlx-rank-claimed-8", "mlx-scale-nan"])  # fmt: skip
def test_hostile_type_through_convert_mix_and_merge(tmp_path: Path, name: str) -> None:
    """The same refusal from the commands that write: nothing written, nothing left behind."""
    src = CASES[name].build(tmp_path)
    says = CASES[name].says
    out = tmp_path / "out"
    hostile.run(["convert", src, "--to", "peft", "-o", out], inputs=[src], code=1, out=out, says=says)
    hostile.run(["mix", src, src, "--method", "ties", "--density", "0.5", "--rank", "2", "-o", out], inputs=[src],
                code=1, out=out, says=says)  # fmt: skip
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes((FIXTURES / "peft_llama" / "adapter_model.safetensors").read_bytes())
    hostile.run(["merge", base, src, "-o", out], inputs=[src, base], code=1, out=out, says=says)


@pytest.mark.parametrize(
    ("w1", "w2", "says"),
    [((4, 8), (8, 9), "32, 72"), ((1024, 1024), (1024, 1024), "1048576")],
    ids=["kron-wrong-size", "kron-claims-2^40-elements"],
)
def test_hostile_lokr_against_its_base(
    tmp_path: Path, mf: ModuleType, w1: tuple[int, int], w2: tuple[int, int], says: str
) -> None:
    """A LoKr whose Kronecker product is not its layer's shape (a 64 KB file may claim a 2^20 x 2^20 delta) reads,
    as the file alone is consistent; merging it into the base is refused before anything that big is formed."""
    src = tmp_path / "adapter"
    peft_type("tmp", "peft_llama_lokr", "", change=lambda t: {**t, D + "lokr_w1": torch.ones(w1) * 1e-3,
                                                                  D + "lokr_w2": torch.ones(w2)})  # fmt: skip
    try:
        src = CASES["tmp"].build(tmp_path)
    finally:
        del CASES["tmp"]
    mf.tiny_llama().save_pretrained(tmp_path / "base")
    out = tmp_path / "out"
    hostile.run(["merge", tmp_path / "base", src, "-o", out], inputs=[src, tmp_path / "base"], code=1, out=out,
                says=says)  # fmt: skip


def test_every_kind_is_covered() -> None:
    kinds = {name.split("-")[0] for name in CASES}
    assert kinds == {"loha", "lokr", "adalora", "vera", "mlx"} and len(CASES) >= 70

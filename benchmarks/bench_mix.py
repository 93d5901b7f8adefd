"""mix --method svd against PEFT's add_weighted_adapter(combination_type="svd"), on the same adapters.

1. One Llama-7B-shaped layer (hidden 4096, intermediate 11008; q/k/v/o/gate/up/down), two rank-16 adapters,
   weights 0.7/0.3, target rank 16: PEFT's time vs loratools' time, and both reconstruction errors against the
   exact weighted sum (relative Frobenius error over all modules; the optimal rank-16 error is printed too).
2. A whole 32-layer 7B-shaped two-adapter mix, file to file (`loratools mix a b --rank 16 -o out`), wall time.

    python benchmarks/bench_mix.py            # both parts (PEFT's part takes minutes on 2 cores)
    python benchmarks/bench_mix.py --skip-peft

Prints a Markdown table for docs/performance.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODULES, machine, write_peft  # noqa: E402

LAYERS, RANK = 32, 16
WEIGHTS = [0.7, 0.3]


def exact_sum(adapters: list, name: str) -> torch.Tensor:
    total = None
    for a, w in zip(adapters, WEIGHTS, strict=True):
        d = a.modules[name].delta(dtype=torch.float64) * w
        total = d if total is None else total + d
    assert total is not None
    return total


def errors(adapters: list, deltas: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(relative error of ``deltas`` against the exact weighted sum, relative optimal rank-16 error)."""
    err = opt = ref = 0.0
    for name, d in deltas.items():
        want = exact_sum(adapters, name)
        err += float((d.double() - want).norm() ** 2)
        ref += float(want.norm() ** 2)
        # the exact sum has rank <= 32; its optimal rank-16 error, from the 32 singular values
        from loratools.ops.linalg import lowrank_svd

        ups, downs = [], []
        for a, w in zip(adapters, WEIGHTS, strict=True):
            up, down = a.modules[name].lora_factors(dtype=torch.float64)
            ups.append(up)
            downs.append(down * w)
        s = lowrank_svd(torch.cat(ups, 1), torch.cat(downs, 0)).s
        opt += float((s[RANK:] ** 2).sum())
    return (err / ref) ** 0.5, (opt / ref) ** 0.5


def one_layer(tmp: Path, skip_peft: bool) -> list[str]:
    from loratools import load_adapter
    from loratools.ops.mix import mix, mix_adapters

    a_dir, b_dir = tmp / "a", tmp / "b"
    write_peft(a_dir, 1, seed=1)
    write_peft(b_dir, 1, seed=2, alpha=16)
    adapters = [load_adapter(a_dir), load_adapter(b_dir)]
    rows = []

    t = time.perf_counter()
    mixed, _ = mix_adapters(adapters, WEIGHTS, "svd", RANK)
    ours_compute = time.perf_counter() - t
    t = time.perf_counter()
    mix([a_dir, b_dir], tmp / "ours", WEIGHTS, "svd", RANK)
    ours_file = time.perf_counter() - t
    ours_err, opt_err = errors(adapters, {n: m.delta(dtype=torch.float64) for n, m in mixed.modules.items()})
    rows.append(f"| loratools `mix --method svd` (compute) | {ours_compute:.3f} s | {ours_err:.6e} |")
    rows.append(f"| loratools `mix --method svd` (file to file) | {ours_file:.3f} s | {ours_err:.6e} |")

    if not skip_peft:
        from common import HIDDEN, INTER
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=1, num_attention_heads=32,
            num_key_value_heads=32, vocab_size=256,
        )  # fmt: skip
        with torch.device("cpu"):
            base = LlamaForCausalLM(cfg)
        model = PeftModel.from_pretrained(base, a_dir, adapter_name="a")
        model.load_adapter(b_dir, adapter_name="b")
        t = time.perf_counter()
        model.add_weighted_adapter(["a", "b"], WEIGHTS, "svd", combination_type="svd", svd_rank=RANK)
        peft_time = time.perf_counter() - t
        deltas = {}
        for name, mod in model.named_modules():
            if isinstance(mod, LoraLayer) and "svd" in mod.lora_A:
                deltas[name.removeprefix("base_model.model.")] = mod.get_delta_weight("svd")
        peft_err, _ = errors(adapters, deltas)
        rows.insert(0, f'| PEFT `add_weighted_adapter(combination_type="svd")` | {peft_time:.1f} s | {peft_err:.6e} |')
        rows.append(f"| speedup (PEFT / loratools compute) | {peft_time / ours_compute:,.0f}x | |")
        rows.append(f"| speedup (PEFT / loratools file to file) | {peft_time / ours_file:,.0f}x | |")
    rows.append(f"| optimal rank-16 error (Eckart-Young) | | {opt_err:.6e} |")
    return rows


def whole_model(tmp: Path) -> list[str]:
    a_dir, b_dir = tmp / "a32", tmp / "b32"
    write_peft(a_dir, LAYERS, seed=3)
    write_peft(b_dir, LAYERS, seed=4, alpha=16)
    size = (a_dir / "adapter_model.safetensors").stat().st_size
    loratools = Path(sys.executable).with_name("loratools")
    cmd = [
        str(loratools),
        "mix",
        str(a_dir),
        str(b_dir),
        "--weights",
        "0.7,0.3",
        "--rank",
        "16",
        "-o",
        str(tmp / "out32"),
    ]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.perf_counter() - t
    return [
        f"| `loratools mix a b --weights 0.7,0.3 --rank 16` ({LAYERS} layers, {LAYERS * len(MODULES)} modules, "
        f"2 x {size / 2**20:.0f} MiB fp32 inputs), wall, process start included | {wall:.2f} s | |"
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-peft", action="store_true", help="leave out PEFT's (slow) run")
    args = p.parse_args()
    print(f"machine: {machine()}\n")
    print("| what (one Llama-7B-shaped layer, 2 x rank 16 -> rank 16) | time | relative error vs exact sum |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        for row in one_layer(Path(d), args.skip_peft):
            print(row, flush=True)
    with tempfile.TemporaryDirectory() as d:
        for row in whole_model(Path(d)):
            print(row, flush=True)


if __name__ == "__main__":
    main()

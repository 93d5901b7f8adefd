"""Extract a rank-16 LoRA from a Llama-shaped bf16 pair of over 1 GB: `loratools extract` against
`mergekit-extract-lora` on the same pair.

    python benchmarks/bench_extract.py [--layers 12] [--rank 16] [--mergekit PATH] [--device cuda] [--keep DIR]

BASE is random (N(0, 0.02)); TUNED = BASE + a random rank-16 change on every q/k/v/o/gate/up/down (RMS 1e-3)
+ dense noise (RMS 1e-4, so the best rank-16 error is about 0.1, not 0), stored in bf16. Embeddings and norms
are unchanged. Each tool runs as its own process (wall time and peak RSS from common.run_measured); each output
is then loaded with loratools and compared with the true difference TUNED - BASE (float32 from the files):
relative Frobenius error over all modules together, and the largest per module.

mergekit runs with `--skip-undecomposable -e embed_tokens -e lm_head`, so that it, like loratools (which skips
unchanged tensors), factors the 7 linear weights per layer and writes no full-size embeddings or norms. mergekit
is run from its own environment (`--mergekit`, default: `mergekit-extract-lora` on PATH, else
/tmp/venv_mk/bin/mergekit-extract-lora); install it there with
`python3 -m venv /tmp/venv_mk && /tmp/venv_mk/bin/pip install mergekit torch==2.13.0`.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import llama_modules, llama_shapes, machine, run_measured, write_sharded  # noqa: E402

HIDDEN, INTER, VOCAB, HEADS, KV_HEADS = 2048, 5632, 32000, 32, 4
KV = HIDDEN // HEADS * KV_HEADS
MODULES = llama_modules(HIDDEN, INTER, KV)
DELTA_RMS, NOISE_RMS = 1e-3, 1e-4


def shapes(layers: int) -> dict[str, tuple[int, ...]]:
    return llama_shapes(layers, MODULES, HIDDEN, VOCAB)


def write_pair(base: Path, tuned: Path, layers: int, rank: int, shard_bytes: int = 1 << 30) -> int:
    """Both checkpoints, sharded as transformers does; returns the bytes of one."""
    from loratools.model import TensorRef

    names = shapes(layers)

    def weight(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        if len(shape) == 1:
            return torch.ones(shape) + 0.1 * torch.randn(shape, generator=g)
        return torch.randn(shape, generator=g) * 0.02

    def changed(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        w = weight(name, shape).float()
        if not any(name.endswith(m + ".weight") for m in MODULES):
            return w
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 1)
        out, inn = shape
        b = torch.randn(out, rank, generator=g)
        a = torch.randn(rank, inn, generator=g)
        w += (b @ a) * (DELTA_RMS / math.sqrt(rank))
        w += torch.randn(shape, generator=g) * NOISE_RMS
        return w

    for folder, make in ((base, weight), (tuned, changed)):

        def ref(name: str, shape: tuple[int, ...], make: Any = make) -> TensorRef:
            return TensorRef(shape, "BF16", lambda: make(name, shape).to(torch.bfloat16))

        total = write_sharded(folder, {n: ref(n, s) for n, s in names.items()}, shard_bytes)
        config = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
            "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "bos_token_id": 1, "eos_token_id": 2,
        }  # fmt: skip
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return total


def errors(base: Path, tuned: Path, adapter: Path) -> tuple[float, float, int]:
    """(relative error over all modules, largest per module, modules) of an adapter against TUNED - BASE."""
    from loratools import load_adapter
    from loratools.io.checkpoint import read_checkpoint
    from loratools.io.safetensors import read_tensor

    a, b = read_checkpoint(base).tensors, read_checkpoint(tuned).tensors
    got = load_adapter(adapter)
    lost = total = 0.0
    worst = 0.0
    for name, m in got.modules.items():
        key = name + ".weight"
        d = read_tensor(b[key].file, b[key].info).float() - read_tensor(a[key].file, a[key].info).float()
        e = float(torch.linalg.vector_norm(m.delta() - d)) ** 2
        t = float(torch.linalg.vector_norm(d)) ** 2
        lost, total, worst = lost + e, total + t, max(worst, math.sqrt(e / t))
    return math.sqrt(lost / total), worst, len(got.modules)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12, help="decoder layers (12 gives 1.32 GB per checkpoint)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--device", default="cpu", help="device for loratools extract (cpu or cuda)")
    p.add_argument("--mergekit", help="mergekit-extract-lora executable (default: on PATH, else /tmp/venv_mk/bin)")
    p.add_argument("--skip-mergekit", action="store_true")
    p.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder)")
    args = p.parse_args()
    mk = args.mergekit or shutil.which("mergekit-extract-lora") or "/tmp/venv_mk/bin/mergekit-extract-lora"
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_extract_", dir="."))
    try:
        base, tuned = work / "base", work / "tuned"
        if not base.exists():
            total = write_pair(base, tuned, args.layers, args.rank)
        else:
            total = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        print(f"machine: {machine()}")
        print(f"pair: {args.layers} Llama-shaped layers (hidden {HIDDEN}, intermediate {INTER}, {KV_HEADS} kv heads, "
              f"vocab {VOCAB}), bf16, {total / 1e9:.2f} GB each; TUNED = BASE + rank-{args.rank} change "
              f"(RMS {DELTA_RMS:g}) + noise (RMS {NOISE_RMS:g}) on q/k/v/o/gate/up/down\n")  # fmt: skip
        print("| tool | wall | peak RSS | modules | relative error (all modules) | largest per module |")
        print("|---|---|---|---|---|---|")
        rows: dict[str, float] = {}
        out = work / "ours"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [str(Path(sys.executable).with_name("loratools")), "extract", str(base), str(tuned), "--rank", str(args.rank),
               "-o", str(out), "--device", args.device]  # fmt: skip
        wall, rss = run_measured(cmd)
        err, worst, n = errors(base, tuned, out)
        rows["ours"], rows["ours_err"] = wall, err
        print(f"| `loratools extract --rank {args.rank}` (--device {args.device}) | {wall:.2f} s | {rss:.2f} GiB | "
              f"{n} | {err:.6e} | {worst:.6e} |", flush=True)  # fmt: skip
        if not args.skip_mergekit:
            out = work / "mergekit"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [mk, "--model", str(tuned), "--base-model", str(base), "--out-path", str(out),
                   "--max-rank", str(args.rank), "--skip-undecomposable", "-e", "embed_tokens", "-e", "lm_head",
                   "--quiet"]  # fmt: skip
            if args.device.startswith("cuda"):
                cmd.append("--cuda")
            wall, rss = run_measured(cmd)
            err, worst, n = errors(base, tuned, out)
            rows["mk"], rows["mk_err"] = wall, err
            print(f"| `mergekit-extract-lora --max-rank {args.rank}` | {wall:.2f} s | {rss:.2f} GiB | {n} | "
                  f"{err:.6e} | {worst:.6e} |")  # fmt: skip
            print(f"\nspeedup (mergekit / loratools wall): {rows['mk'] / rows['ours']:.1f}x; "
                  f"error ratio (loratools / mergekit): {rows['ours_err'] / rows['mk_err']:.6f}")  # fmt: skip
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

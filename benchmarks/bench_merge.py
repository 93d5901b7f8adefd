"""Merge a rank-16 adapter into a Llama-7B-shaped bf16 checkpoint of over 4 GB: `loratools merge` against
`cp -r` of the same checkpoint and against PEFT (load, merge_and_unload, save_pretrained).

    python benchmarks/bench_merge.py [--layers 9] [--repeat 3] [--skip-peft] [--device cuda] [--keep DIR]

Each is run as its own process, --repeat times; the median wall time and the process's peak RSS (VmHWM) are
printed as a Markdown table. The checkpoint is written first, so all three read it from the page cache; with
--keep DIR an existing checkpoint there is reused.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HIDDEN, INTER, VOCAB, llama_shapes, machine, run_measured, write_peft, write_sharded  # noqa: E402

PEFT_SCRIPT = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""


def write_checkpoint(folder: Path, layers: int, shard_bytes: int = 2 << 30) -> tuple[int, int]:
    """A sharded HF Llama checkpoint of random bf16 weights; returns (total bytes, largest tensor bytes)."""
    from loratools.model import TensorRef

    shapes = llama_shapes(layers)

    def ref(name: str, shape: tuple[int, ...]) -> TensorRef:
        def make() -> torch.Tensor:
            g = torch.Generator().manual_seed(hash(name) % 2**31)
            return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

        return TensorRef(shape, "BF16", make)

    total = write_sharded(folder, {name: ref(name, shape) for name, shape in shapes.items()}, shard_bytes)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": 32,
        "num_key_value_heads": 32, "vocab_size": VOCAB, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return total, max(math.prod(s) * 2 for s in shapes.values())


def arithmetic_floor(layers: int, repeat: int) -> float:
    """Seconds for the arithmetic of the merge alone, in memory, on all cores: per targeted weight, in row
    chunks, the rank-16 product in float32, the bf16 base cast in, the add and the cast out; no reading, no
    writing, no report. No merge that computes in float32 (PEFT's semantics) can take less."""
    from common import MODULES

    best = math.inf
    for _ in range(repeat):
        spent = 0.0
        for rows, cols in MODULES.values():
            w = (torch.randn(rows, cols) * 0.02).to(torch.bfloat16)
            up, down = torch.randn(rows, 16), torch.randn(16, cols)
            step = max(1, (2 << 20) // (cols * 4))
            merged, base = torch.empty(step, cols), torch.empty(step, cols)
            out = torch.empty(step, cols, dtype=torch.bfloat16)
            t = time.perf_counter()
            for r0 in range(0, rows, step):
                n = min(rows, r0 + step) - r0
                torch.matmul(up[r0 : r0 + n], down, out=merged[:n])
                base[:n].copy_(w[r0 : r0 + n])
                out[:n].copy_(merged[:n].add_(base[:n]))
            spent += time.perf_counter() - t
        best = min(best, spent * layers)
    return best


def measure(label: str, cmd: list[str], out: Path, repeat: int) -> tuple[float, float]:
    """Median wall time and the largest peak RSS of ``repeat`` runs of ``cmd`` writing ``out`` (removed before
    each run, so that every run writes a fresh output)."""
    walls, peaks = [], []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        wall, rss = run_measured(cmd)
        walls.append(wall)
        peaks.append(rss)
    shutil.rmtree(out, ignore_errors=True)
    print(f"  {label}: " + ", ".join(f"{w:.2f}" for w in walls) + " s", file=sys.stderr, flush=True)
    return statistics.median(walls), max(peaks)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=9, help="decoder layers (9 gives 4.2 GB)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each command; the median wall time is shown")
    p.add_argument("--skip-peft", action="store_true")
    p.add_argument("--device", default="cpu", help="device for loratools merge (cpu or cuda)")
    p.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder)")
    args = p.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_merge_", dir="."))
    try:
        base = work / "base"
        if not (base / "config.json").exists():
            shutil.rmtree(base, ignore_errors=True)
            write_checkpoint(base, args.layers)
        if not (work / "adapter").exists():
            write_peft(work / "adapter", args.layers, seed=5)
        total = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        largest = max(math.prod(s) * 2 for s in llama_shapes(args.layers).values())
        gb = total / 1e9
        print(f"machine: {machine()}")
        print(f"checkpoint: {args.layers} Llama-7B-shaped layers, bf16, {gb:.2f} GB in "
              f"{len(list(base.glob('*.safetensors')))} shards; largest tensor {largest / 2**20:.0f} MiB; "
              f"adapter rank 16 on q/k/v/o/gate/up/down; median of {args.repeat} runs each\n")  # fmt: skip
        print("| what | wall | peak RSS | throughput |")
        print("|---|---|---|---|")
        rows = {}

        def row(key: str, label: str, cmd: list[str], out: Path) -> None:
            wall, rss = measure(key, cmd, out, args.repeat)
            rows[key] = wall
            print(f"| {label} | {wall:.2f} s | {rss:.3f} GiB | {gb / wall:.2f} GB/s |", flush=True)

        row("cp", "`cp -r` of the checkpoint", ["cp", "-r", str(base), str(work / "copy")], work / "copy")
        loratools = str(Path(sys.executable).with_name("loratools"))
        cmd = [loratools, "merge", str(base), str(work / "adapter"), "-o", str(work / "ours"), "--device", args.device]
        row("ours", f"`loratools merge` (--device {args.device})", cmd, work / "ours")
        if not args.skip_peft:
            cmd = [sys.executable, "-c", PEFT_SCRIPT, str(base), str(work / "adapter"), str(work / "peft")]
            row("peft", "PEFT: load, `merge_and_unload`, `save_pretrained`", cmd, work / "peft")
        wall, _ = measure("import", [sys.executable, "-c", "import torch"], work / "none", args.repeat)
        print(f"\n`python -c 'import torch'` alone: {wall:.2f} s (paid by loratools and PEFT, not by cp)")
        floor = arithmetic_floor(args.layers, args.repeat)
        print(f"the arithmetic alone (float32 product, cast in, add, cast out; in memory, {torch.get_num_threads()} "
              f"threads, best of {args.repeat}): {floor:.2f} s; with the import: {wall + floor:.2f} s "
              f"= {(wall + floor) / rows['cp']:.2f}x the copy, before any reading, writing or report")  # fmt: skip
        print(f"merge / copy: {rows['ours'] / rows['cp']:.2f}x"
              + (f"; PEFT / merge: {rows['peft'] / rows['ours']:.1f}x" if "peft" in rows else "")
              + f"; RSS budget (0.5 GiB + largest tensor): {0.5 + largest / 2**30:.2f} GiB")  # fmt: skip
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Merge a rank-16 adapter into a Llama-shaped bf16 checkpoint: `loratools merge` (with its report) side by side
with `cp -r` of the same checkpoint, the merge's arithmetic alone, and PEFT (load, merge_and_unload, save).

    python benchmarks/bench_merge.py [--preset 4gb|1gb] [--layers N] [--repeat 5] [--skip-peft] [--device cuda]
                                     [--keep DIR] [--compare DIR] [--skip-torch-engine]

Presets: ``4gb`` (default) is 9 Llama-7B-shaped layers (hidden 4096, intermediate 11008), 4.2 GB; ``1gb`` is 8
layers of hidden 2048, intermediate 5632 (TinyLlama's widths, full attention), 1.07 GB. The adapter has rank 16 on
q/k/v/o/gate/up/down of every layer. The checkpoint is written first, so every command reads it from the page cache.

Each command runs as its own process, ALTERNATING (cp, loratools, PEFT, start-up, cp, loratools, ...), --repeat
times; the table shows medians and the largest peak RSS (VmHWM). Also measured, in alternation:

* start-up: ``python -c "import torch, loratools"``, and for the merge the time from its process start to the first
  byte of a .safetensors file appearing in its output (polled every 2 ms by this process);
* the arithmetic floor, in this process, in memory, on all cores: every targeted weight bf16 -> float32,
  ``addmm_(scale * B, A)``, -> bf16; no reading, writing or report; and loratools' compiled loop the same way;
* on the CPU, the same merge by loratools' torch engine (``LORATOOLS_KERNEL=torch``: an install without a C
  compiler).

loratools' work is its wall time minus the start-up; the target of issue 18 is work <= 1.5 x (floor + cp).
The loratools run is the worktree's own code (this file's repository first on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import llama_modules, llama_shapes, machine, run_timed, write_peft, write_sharded  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 32000
PRESETS = {"4gb": (9, 4096, 11008), "1gb": (8, 2048, 5632)}  # layers, hidden, intermediate
RANK, ALPHA = 16, 32

PEFT_SCRIPT = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""


def write_checkpoint(folder: Path, layers: int, hidden: int, inter: int, shard_bytes: int = 2 << 30) -> None:
    """A sharded HF Llama checkpoint of random bf16 weights (tensors made one at a time)."""
    from loratools.model import TensorRef

    shapes = llama_shapes(layers, llama_modules(hidden, inter), hidden, VOCAB)

    def ref(name: str, shape: tuple[int, ...]) -> TensorRef:
        def make() -> torch.Tensor:
            g = torch.Generator().manual_seed(hash(name) % 2**31)
            return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

        return TensorRef(shape, "BF16", make)

    write_sharded(folder, {name: ref(name, shape) for name, shape in shapes.items()}, shard_bytes)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 32,
        "num_key_value_heads": 32, "vocab_size": VOCAB, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2))


#: the start-up with the collector set as the ``loratools`` program sets it (loratools.cli.entry) before it imports
#: torch: what of the merge's gain is in its own import of torch
BARE_GC = "import gc; gc.set_threshold(100_000, 50, 100); import os, torch, loratools; os._exit(0)"


def arithmetic_floor(layers: int, modules: dict[str, tuple[int, int]]) -> tuple[float, float, float | None]:
    """Seconds for the merge's arithmetic alone, in memory, on all cores: per targeted weight, bf16 -> float32,
    ``addmm_(scale * B, A)``, -> bf16; no reading, no writing, no report: no merge that computes in float32 (PEFT's
    semantics) can take less. Two ways: (whole tensors, torch's threads; as issue 18 defines it) and (row chunks
    of 2 MiB of float32 into warm buffers, one thread per core: no fresh pages, which this VM makes expensive).
    Each shape is timed once and counted ``layers`` times. Third: loratools' compiled loop alone the same way (the
    floor's arithmetic plus the report's numbers, 2 MiB blocks of output into warm buffers); None where it is not
    built."""
    from concurrent.futures import ThreadPoolExecutor

    cores = len(os.sched_getaffinity(0))
    local = threading.local()

    def chunk(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, r0: int, n: int) -> None:
        if getattr(local, "cols", None) != w.shape[1]:
            torch.set_num_threads(1)
            local.cols, local.step = w.shape[1], (2 << 20) // (w.shape[1] * 4)
            local.work = torch.empty(local.step, w.shape[1])
            local.out = torch.empty(local.step, w.shape[1], dtype=torch.bfloat16)
        work = local.work[:n]
        work.copy_(w[r0 : r0 + n]).addmm_(b[r0 : r0 + n], a)
        local.out[:n].copy_(work)

    def chunks(pool: ThreadPoolExecutor, w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, every: int) -> None:
        rows, step = w.shape[0], (2 << 20) // (w.shape[1] * 4)
        list(pool.map(lambda r0: chunk(w, b, a, r0, min(rows, r0 + step) - r0), range(0, rows, every * step)))

    try:
        from loratools.ops import _rows
    except ImportError:
        _rows = None

    def loop(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, r0: int, n: int) -> None:
        if not hasattr(local, "block"):
            local.block = bytearray(2 << 20)
        cols = w.shape[1]
        src = w.view(torch.uint8).numpy()
        _rows.merge_rows(src, r0 * cols * 2, 1, b, r0 * RANK * 4, a, n, cols, RANK, local.block, 0, 1)

    def loops(pool: ThreadPoolExecutor, w: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> None:
        rows, step = w.shape[0], (2 << 20) // (w.shape[1] * 2) // 4 * 4
        list(pool.map(lambda r0: loop(w, b, a, r0, min(rows, r0 + step) - r0), range(0, rows, step)))

    whole = chunked = looped = 0.0
    with ThreadPoolExecutor(cores) as pool:
        for rows, cols in modules.values():
            w = (torch.randn(rows, cols) * 0.02).to(torch.bfloat16)
            b, a = torch.randn(rows, RANK) * 0.01, torch.randn(RANK, cols) / cols**0.5
            scale = ALPHA / RANK
            t = time.perf_counter()
            w32 = w.float()
            w32.addmm_(scale * b, a)
            w32.to(torch.bfloat16)
            whole += time.perf_counter() - t
            del w32
            chunks(pool, w, b, a, cores)  # the threads' buffers made, for this width
            t = time.perf_counter()
            chunks(pool, w, scale * b, a, 1)
            chunked += time.perf_counter() - t
            if _rows is not None:
                bn, an = (scale * b).contiguous().numpy(), a.contiguous().numpy()
                loops(pool, w, bn, an)  # warm
                t = time.perf_counter()
                loops(pool, w, bn, an)
                looped += time.perf_counter() - t
    return whole * layers, chunked * layers, looped * layers if _rows is not None else None


def first_byte(work: Path, name: str) -> bool:
    """Has a .safetensors file in the output ``name`` (or its temp, ``.name.*``) got its first byte?"""
    for entry in os.scandir(work):
        if entry.name == name or entry.name.startswith(f".{name}."):
            try:
                for f in os.scandir(entry.path):
                    if f.name.endswith(".safetensors") and f.stat().st_size > 0:
                        return True
            except (NotADirectoryError, FileNotFoundError):
                pass
    return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="4gb")
    p.add_argument("--layers", type=int, help="decoder layers (default: the preset's)")
    p.add_argument("--repeat", type=int, default=5, help="rounds of alternating runs; medians are shown")
    p.add_argument("--skip-peft", action="store_true")
    p.add_argument("--device", default="cpu", help="device for loratools merge (cpu or cuda)")
    p.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder)")
    p.add_argument("--compare", type=Path, help="another loratools source tree: its merge runs too, in alternation")
    p.add_argument("--skip-torch-engine", action="store_true", help="leave out the merge by the torch engine")
    args = p.parse_args()
    layers, hidden, inter = PRESETS[args.preset]
    layers = args.layers or layers
    modules = llama_modules(hidden, inter)
    shapes = llama_shapes(layers, modules, hidden, VOCAB)
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_merge_", dir="."))
    work.mkdir(parents=True, exist_ok=True)
    try:
        base, adapter = work / "base", work / "adapter"
        if not (base / "config.json").exists():
            shutil.rmtree(base, ignore_errors=True)
            write_checkpoint(base, layers, hidden, inter)
        if not (adapter / "adapter_config.json").exists():
            shutil.rmtree(adapter, ignore_errors=True)
            write_peft(adapter, layers, seed=5, r=RANK, alpha=ALPHA, modules=modules)
        total = sum(f.stat().st_size for f in base.glob("*.safetensors"))
        largest = max(math.prod(s) * 2 for s in shapes.values())
        gb = total / 1e9
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        report = work / "r.json"
        ours = [sys.executable, "-m", "loratools", "merge", str(base), str(adapter), "-o", str(work / "ours"),
                "--device", args.device, "--report", str(report)]  # fmt: skip
        cmds: dict[str, tuple[list[str], Path | None]] = {
            "cp": (["cp", "-r", str(base), str(work / "copy")], work / "copy"),
            "ours": (ours, work / "ours"),
            "peft": ([sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter), str(work / "peft")], work / "peft"),
            "startup": ([sys.executable, "-c", "import torch, loratools"], None),
            "bare": ([sys.executable, "-c", "import os, torch, loratools; os._exit(0)"], None),
            "bare_gc": ([sys.executable, "-c", BARE_GC], None),
        }
        if args.skip_peft:
            del cmds["peft"]
        if args.compare:
            cmds["other"] = (ours[:7] + [str(work / "other")] + ours[8:], work / "other")
        if args.device == "cpu" and not args.skip_torch_engine:
            cmds["torch"] = (ours[:7] + [str(work / "torch")] + ours[8:], work / "torch")
        walls: dict[str, list[float]] = {k: [] for k in [*cmds, "whole", "chunked", "loop", "first"]}
        peaks: dict[str, float] = dict.fromkeys(cmds, 0.0)
        print(f"machine: {machine()}; load average before: {os.getloadavg()[0]:.2f}")
        print(f"checkpoint: {layers} Llama-shaped layers (hidden {hidden}, intermediate {inter}, vocab {VOCAB}), "
              f"bf16, {gb:.2f} GB in {len(list(base.glob('*.safetensors')))} shard(s); largest tensor "
              f"{largest / 2**20:.0f} MiB; adapter rank {RANK} on q/k/v/o/gate/up/down; {args.repeat} alternating "
              "rounds\n")  # fmt: skip
        for i in range(args.repeat):
            order = list(cmds)
            if "other" in cmds:  # right after ours, and before it every other round: this VM's page faults vary
                order.remove("other")
                order.insert(order.index("ours") + i % 2, "other")
            for key in order:
                cmd, out = cmds[key]
                if out is not None:
                    shutil.rmtree(out, ignore_errors=True)
                report.unlink(missing_ok=True)
                probe = (lambda: first_byte(work, "ours")) if key == "ours" else None
                run_env = {**env, "PYTHONPATH": str(args.compare.resolve())} if key == "other" else env
                if key == "torch":
                    run_env = {**env, "LORATOOLS_KERNEL": "torch"}
                wall, rss, first = run_timed(cmd, probe, run_env)
                if key in ("ours", "other", "torch"):
                    if not report.is_file():
                        raise SystemExit("loratools merge wrote no report")
                    if first is not None:
                        walls["first"].append(first)
                walls[key].append(wall)
                peaks[key] = max(peaks[key], rss)
                if out is not None:
                    shutil.rmtree(out, ignore_errors=True)
            whole, chunked, looped = arithmetic_floor(layers, modules)
            walls["whole"].append(whole)
            walls["chunked"].append(chunked)
            if looped is not None:
                walls["loop"].append(looped)
            print(f"  round {i + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in walls.items() if v), file=sys.stderr,
                  flush=True)  # fmt: skip
        med = {k: statistics.median(v) for k, v in walls.items() if v}
        med["floor"] = min(med["whole"], med["chunked"])
        work_s = med["ours"] - min(med["startup"], med["bare"])
        print("| what | median wall | peak RSS | single runs (s) |")
        print("|---|---|---|---|")
        labels = {
            "cp": "`cp -r` of the checkpoint",
            "whole": "the arithmetic floor, whole tensors (bf16 -> f32, addmm_, -> bf16; in memory, torch's threads)",
            "chunked": "the arithmetic floor, 2 MiB row chunks into warm buffers, one thread per core",
            "loop": "loratools' compiled loop alone (the floor's arithmetic and the report's numbers), 2 MiB blocks "
            "into warm buffers, one thread per core",
            "ours": f"`loratools merge --report r.json` (--device {args.device})",
            "other": f"the same, by the loratools in {args.compare}",
            "torch": "the same, by the torch engine (`LORATOOLS_KERNEL=torch`, as without a C compiler)",
            "startup": '`python -c "import torch, loratools"` (start-up, as issue 18 defines it)',
            "bare": "the same, leaving by `os._exit(0)` as loratools does after a success (no teardown)",
            "bare_gc": "the same, with the garbage collector set as the `loratools` program sets it",
            "first": "loratools: process start to the output's first byte",
            "peft": "PEFT: load, `merge_and_unload`, `save_pretrained`",
        }
        for key, label in labels.items():
            if key in med:
                rss = f"{peaks[key]:.3f} GiB" if key in peaks else ""
                runs = " / ".join(f"{w:.2f}" for w in walls[key])
                print(f"| {label} | {med[key]:.2f} s | {rss} | {runs} |")
        budget = 0.5 + largest / 2**30
        target = 1.5 * (med["floor"] + med["cp"])
        print(f"\nloratools work (wall - the smaller start-up): {work_s:.2f} s = {work_s / (med['floor'] + med['cp']):.2f}x "
              f"(floor + cp) = {med['floor'] + med['cp']:.2f} s; target 1.5x: {target:.2f} s, "
              f"{'met' if work_s <= target else f'missed by {work_s - target:.2f} s'}")  # fmt: skip
        print(f"peak RSS {peaks['ours']:.3f} GiB; budget 0.5 GiB + largest tensor = {budget:.3f} GiB, "
              f"{'met' if peaks['ours'] <= budget else 'MISSED'}")  # fmt: skip
        strict = med["ours"] - med["bare_gc"]
        print(f"the same against the start-up with loratools' collector setting: {strict:.2f} s = "
              f"{strict / (med['floor'] + med['cp']):.2f}x (floor + cp), "
              f"{'met' if strict <= target else f'missed by {strict - target:.2f} s'}")  # fmt: skip
        if "torch" in med:
            print(
                f"torch engine / compiled loop, work: {(med['torch'] - min(med['startup'], med['bare'])) / work_s:.2f}x"
            )
        print(f"merge / cp: {med['ours'] / med['cp']:.2f}x"
              + (f"; PEFT / merge: {med['peft'] / med['ours']:.1f}x" if "peft" in med else ""))  # fmt: skip
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

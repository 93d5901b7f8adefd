"""`inspect --fast` of a 1 GB GGUF adapter reads its header only: time and bytes read, against reading it whole.

The adapter: a Llama-7B-shaped LoRA (32 layers, q/k/v/o/gate/up/down, rank 100, float32), 1.0 GB, written with
gguf's own streaming writer (``GGUFWriter``: header, key/values and tensor infos first, then each tensor) as
llama.cpp's converter writes one. Each command runs in its own process, three times, after the file's pages are
dropped from the page cache (``posix_fadvise(DONTNEED)`` once it is synced), so nothing is read for free:

* ``read_bytes``: what the process made the kernel read from the disk (``/proc/self/io``), taken around the
  command alone (the interpreter and its imports are loaded before the first reading);
* ``in cache after``: how much of the file sits in the page cache after the run (``fincore``): every byte of the
  file any read brought in, memory-mapped reads included (they do not show in ``rchar``);
* the command's own wall time (in-process, imports excluded) and the process's.

    python benchmarks/bench_gguf_header.py            # writes a 1 GB file under the system temp folder
    python benchmarks/bench_gguf_header.py --keep DIR  # ... or in DIR, kept for a re-run

Prints a Markdown table for docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODULES, machine  # noqa: E402

LAYERS, RANK, ALPHA = 32, 100, 16.0
RUNS = 3
#: gguf's names of a Llama block's projections
GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}  # fmt: skip

#: run in a child: the command in-process, /proc/self/io and the clock read around it alone
CHILD = r"""
import json, sys, time
from loratools.cli import cli
import loratools.formats.gguf, numpy, torch  # imports loaded before the first reading
def io():
    return {k: int(v) for k, v in (l.split(": ") for l in open("/proc/self/io").read().splitlines())}
mode, path = sys.argv[1], sys.argv[2]
before, t0 = io(), time.perf_counter()
if mode == "whole":
    with open(path, "rb") as fh:
        while fh.read(1 << 20):
            pass
else:
    try:
        cli.main(["inspect", *(["--fast"] if mode == "fast" else []), path, "--json"], standalone_mode=False)
    except SystemExit as e:
        assert not e.code, e.code
took, after = time.perf_counter() - t0, io()
print(json.dumps({"seconds": took, **{k: after[k] - before[k] for k in ("rchar", "read_bytes")}}), file=sys.stderr)
"""


def write_adapter(path: Path) -> int:
    """The adapter, tensor by tensor (never more than one tensor in memory)."""
    import gguf

    w = gguf.GGUFWriter(path, "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, ALPHA)
    w.add_uint32("llama.attention.head_count", 32)
    w.add_uint32("llama.attention.head_count_kv", 32)
    specs = []
    for layer in range(LAYERS):
        for mod, (out, inn) in MODULES.items():
            name = f"blk.{layer}.{GGUF_NAMES[mod]}.weight"
            specs += [(f"{name}.lora_a", (RANK, inn)), (f"{name}.lora_b", (out, RANK))]
    for name, shape in specs:
        w.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for _, shape in specs:
        w.write_tensor_data(rng.standard_normal(shape, dtype=np.float32) * 0.01)
    w.close()
    return path.stat().st_size


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cached(path: Path) -> int:
    """Bytes of the file in the page cache (fincore), or -1 without fincore."""
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return -1
    return int(out.split()[0])


def run(mode: str, path: Path) -> dict[str, float]:
    drop_cache(path)
    assert cached(path) in (0, -1), "the file is still in the page cache"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD, mode, str(path)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{mode}: exit {r.returncode}\n{r.stderr[-2000:]}")
    got: dict[str, float] = json.loads(r.stderr.strip().splitlines()[-1])
    return {**got, "wall": wall, "cached": cached(path)}


def mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", type=Path, help="write (or reuse) the adapter in this folder")
    a = ap.parse_args()
    folder = a.keep or Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "adapter.gguf"
    if not path.exists():
        t0 = time.perf_counter()
        write_adapter(path)
        print(f"wrote {path} ({path.stat().st_size:,} bytes) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    size = path.stat().st_size
    rows = []
    for mode, what in (
        ("fast", "`loratools inspect --fast adapter.gguf --json` (header only)"),
        ("norms", "`loratools inspect adapter.gguf --json` (every tensor read for the delta norms)"),
        ("whole", "reading the file whole (1 MiB `read` calls, as `cat`)"),
    ):
        runs = [run(mode, path) for _ in range(RUNS)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        rows.append((what, med, [r["seconds"] for r in runs]))
        print(f"{mode}: {json.dumps(med)}", file=sys.stderr)
    print(f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}.")
    from loratools.formats.gguf import read_header

    head = read_header(path).data_start
    print(f"File: {size:,} bytes ({mib(size)}), {LAYERS * len(MODULES) * 2} tensors, rank {RANK}, float32; "
          f"its header (key/values and tensor infos, up to the aligned data start) is {head:,} bytes.\n")  # fmt: skip
    print("| what | command time | process wall | read from disk (`read_bytes`) | file in page cache after |")
    print("|---|---|---|---|---|")
    for what, m, _ in rows:
        print(f"| {what} | {m['seconds']:.3f} s | {m['wall']:.2f} s | {mib(m['read_bytes'])} | {mib(m['cached'])} |")
    fast, whole = rows[0][1], rows[2][1]
    print("\nSingle runs (command time): " + "; ".join(
        f"{w.split('`')[1] if '`' in w else 'whole'} " + " / ".join(f"{s:.3f}" for s in t) for w, _, t in rows))  # fmt: skip
    if fast["read_bytes"]:
        print(
            f"\nHeader only reads {whole['read_bytes'] / fast['read_bytes']:,.0f}x fewer bytes than reading it whole."
        )
    if not a.keep:
        path.unlink()
        folder.rmdir()


if __name__ == "__main__":
    main()

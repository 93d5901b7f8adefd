"""What the benchmarks share: the machine line, Llama-7B shapes, and synthetic PEFT adapters."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HIDDEN, INTER, VOCAB = 4096, 11008, 32000


def llama_modules(hidden: int, inter: int, kv: int | None = None) -> dict[str, tuple[int, int]]:
    """The projections of a Llama decoder layer, ``out x in``; ``kv`` is the key/value width (grouped-query)."""
    kv = kv or hidden
    return {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }


MODULES = llama_modules(HIDDEN, INTER)


def llama_shapes(
    layers: int, modules: dict[str, tuple[int, int]] | None = None, hidden: int = HIDDEN, vocab: int = VOCAB
) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Llama-shaped checkpoint: embedding, per layer the projections and two norms, the
    final norm and lm_head."""
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        for mod, shape in (modules or MODULES).items():
            out[p + mod + ".weight"] = shape
        out[p + "input_layernorm.weight"] = (hidden,)
        out[p + "post_attention_layernorm.weight"] = (hidden,)
    out["model.norm.weight"] = (hidden,)
    out["lm_head.weight"] = (vocab, hidden)
    return out


def write_sharded(folder: Path, refs: dict[str, Any], shard_bytes: int) -> int:
    """Tensors (``TensorRef`` s, written one at a time) as transformers shards them: files of at most
    ``shard_bytes`` and a ``model.safetensors.index.json``. Returns the bytes of data."""
    from loratools.io.safetensors import write_safetensors

    shards: list[dict[str, Any]] = [{}]
    size = 0
    for name, ref in refs.items():
        if size and size + ref.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = ref
        size += ref.nbytes
    folder.mkdir(parents=True)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / fname, shard, {"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(ref.nbytes for ref in refs.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return total


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {gpu}, torch {torch.__version__}"


def write_peft(
    folder: Path,
    layers: int,
    seed: int,
    r: int = 16,
    alpha: int = 32,
    modules: dict[str, tuple[int, int]] | None = None,
) -> None:
    """A random PEFT LoRA adapter on every q/k/v/o/gate/up/down of a Llama-shaped model (7B-shaped by default)."""
    from loratools.io.safetensors import write_safetensors

    modules = modules or MODULES
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for mod, (out, inn) in modules.items():
            key = f"base_model.model.model.layers.{layer}.{mod}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, inn, generator=g) / inn**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, r, generator=g) * 0.01
    folder.mkdir(parents=True)
    write_safetensors(folder / "adapter_model.safetensors", tensors, {"format": "pt"})
    cfg = {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "task_type": "CAUSAL_LM", "bias": "none",
        "target_modules": sorted({m.split(".")[-1] for m in modules}), "base_model_name_or_path": "llama-shaped",
    }  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """Run a command; return (wall seconds, peak RSS in GiB of that process). See :func:`run_timed`."""
    wall, rss, _ = run_timed(cmd)
    return wall, rss


def run_timed(
    cmd: list[str], first: Callable[[], bool] | None = None, env: dict[str, str] | None = None
) -> tuple[float, float, float | None]:
    """Run a command; return (wall seconds, peak RSS in GiB of that process, seconds from its start to the first
    time ``first()`` was true, or None).

    The peak is the kernel's VmHWM of the process's own address space, polled every 10 ms: ru_maxrss would
    also count the forked copy of this (large) parent from before the exec. ``first`` is polled every 2 ms (e.g.
    "has the output's first byte appeared?").
    """
    import threading

    os.sync()  # start each run with no dirty pages of the previous one still being written back
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    peak = [0]
    seen: list[float] = []

    def poll() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        last = 0.0
        while proc.poll() is None:
            now = time.perf_counter()
            if first is not None and not seen and first():
                seen.append(now - t)
            if now - last >= 0.01:
                last = now
                try:
                    for line in status.read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            peak[0] = max(peak[0], int(line.split()[1]))
                except (OSError, ValueError):
                    pass
            time.sleep(0.002 if first is not None and not seen else 0.01)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return wall, peak[0] / 2**20, seen[0] if seen else None  # KiB -> GiB

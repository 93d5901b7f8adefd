"""mix --method ties|magnitude_prune --rank 16 against PEFT's add_weighted_adapter(combination_type="ties_svd" /
"magnitude_prune_svd", svd_rank=16), on the same adapters.

One Llama-7B-shaped layer (a 4096 x 4096 projection), three random rank-16 PEFT adapters (made and saved by PEFT),
weights 0.5/0.3/0.2, density 0.2, target rank 16. For each method: PEFT's time, loratools' time (compute, and file
to file), and how far each result is from the merged dense delta (relative Frobenius error; PEFT's full SVD gives
the optimal rank-16 error) and from each other.

    python benchmarks/bench_mix_methods.py                 # PEFT's full SVD takes about a minute per method
    python benchmarks/bench_mix_methods.py --skip-peft
    python benchmarks/bench_mix_methods.py --device cuda    # both on the GPU

Prints a Markdown table for docs/performance.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HIDDEN, machine  # noqa: E402

RANK, DENSITY, ADAPTERS = 16, 0.2, ("t1", "t2", "t3")
WEIGHTS = [0.5, 0.3, 0.2]
METHODS = {"ties": "ties_svd", "magnitude_prune": "magnitude_prune_svd"}


class Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(HIDDEN, HIDDEN, bias=False)


def peft_model(tmp: Path):  # type: ignore[no-untyped-def]
    """A PEFT model of one 4096 x 4096 layer holding three random rank-16 adapters, each also saved to a folder."""
    import peft

    cfg = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["q_proj"])
    model = peft.get_peft_model(Layer(), cfg, adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        model.add_adapter(name, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    for name in ADAPTERS:
        model.save_pretrained(tmp / "saved", selected_adapters=[name])
    return model


def folder(tmp: Path, name: str) -> Path:
    return tmp / "saved" / name  # PEFT saves an adapter not named "default" in a subfolder of its name


def merged_dense(model, method: str) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The merged dense delta before any SVD (PEFT's merge_utils on PEFT's deltas): what both results approximate."""
    from peft.utils import merge_utils

    layer = model.base_model.model.q_proj
    deltas = [layer.get_delta_weight(n).detach() for n in ADAPTERS]
    weights = torch.tensor(WEIGHTS, device=deltas[0].device)
    return getattr(merge_utils, method)(deltas, weights, DENSITY).double()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(tmp: Path, skip_peft: bool, device: str) -> list[str]:
    from loratools import load_adapter
    from loratools.ops.mix import mix, mix_adapters

    model = peft_model(tmp).to(device)
    sources = [folder(tmp, n) for n in ADAPTERS]
    adapters = [load_adapter(s) for s in sources]
    rows = []
    for method, combination in METHODS.items():
        dense = merged_dense(model, method)
        times, cpu_times = [], []
        for _ in range(3):  # the best of three: the machine is shared
            t, c = time.perf_counter(), time.process_time()
            mixed, _ = mix_adapters(adapters, WEIGHTS, method, RANK, density=DENSITY, device=device)  # type: ignore[arg-type]
            sync(device)
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - c)
        ours_compute, ours_cpu = min(times), min(cpu_times)
        t = time.perf_counter()
        mix(sources, tmp / f"ours-{method}", WEIGHTS, method, RANK, density=DENSITY, force=True, device=device)  # type: ignore[arg-type]
        ours_file = time.perf_counter() - t
        ours = next(iter(mixed.modules.values())).delta(dtype=torch.float64).to(device)
        rows.append(f"| {method} | loratools `mix --method {method} --density {DENSITY} --rank {RANK}` (compute) | "
                    f"{ours_compute:.2f} s ({ours_cpu:.2f} s CPU) | {rel(ours, dense):.6e} | |")  # fmt: skip
        rows.append(f"| {method} | loratools, file to file (read three, mix, write) | {ours_file:.2f} s | | |")
        if not skip_peft:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t, c = time.perf_counter(), time.process_time()
                model.add_weighted_adapter(
                    list(ADAPTERS), WEIGHTS, combination, combination_type=combination, svd_rank=RANK, density=DENSITY
                )
                sync(device)
                peft_time, peft_cpu = time.perf_counter() - t, time.process_time() - c
            theirs = model.base_model.model.q_proj.get_delta_weight(combination).double()
            rows.insert(len(rows) - 2, f'| {method} | PEFT `add_weighted_adapter("{combination}", svd_rank={RANK})` '
                        f"| {peft_time:.1f} s ({peft_cpu:.1f} s CPU) | {rel(theirs, dense):.6e} | |")  # fmt: skip
            rows.append(f"| {method} | loratools against PEFT (relative difference of the results) | | | "
                        f"{rel(ours, theirs):.2e} |")  # fmt: skip
            rows.append(f"| {method} | speedup (PEFT / loratools: wall, compute; wall, file to file; CPU time, compute) | "
                        f"{peft_time / ours_compute:,.0f}x; {peft_time / ours_file:,.0f}x; {peft_cpu / ours_cpu:,.0f}x "
                        "| | |")  # fmt: skip
            model.delete_adapter(combination)
        if skip_peft:  # PEFT's full SVD gives the optimum; without it, from the singular values
            s = torch.linalg.svdvals(dense)
            optimal = float(s[RANK:].square().sum().sqrt() / s.square().sum().sqrt())
            rows.append(f"| {method} | optimal rank-{RANK} error (Eckart-Young) | | {optimal:.6e} | |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-peft", action="store_true", help="leave out PEFT's (slow) runs")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: where both PEFT and loratools compute")
    args = p.parse_args()
    print(f"machine: {machine()}; device {args.device}, torch threads {torch.get_num_threads()}\n")
    print(f"| method | what (one 4096 x 4096 layer, 3 x rank {RANK} -> rank {RANK}, density {DENSITY}) | time | "
          "relative error vs the merged dense delta | difference |")  # fmt: skip
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        for row in run(Path(d), args.skip_peft, args.device):
            print(row, flush=True)


if __name__ == "__main__":
    main()

"""The figures of docs/reliability.md: the hostile battery by category, damaged files through every reader, runs
stopped and killed at random points.

    python benchmarks/reliability.py [--cases 300] [--kills 20] [--battery-only | --kills-only]

The battery is tests/test_hostile_*.py, every case (the slow ones too): each checks that the command ends with the
expected exit code and one Error line (no traceback), within its time limit (no hang), with its inputs byte and mode
identical, nothing left beside its output, umask modes on what it wrote, and (push) nothing uploaded that should not
be. Each damaged file goes through `inspect --fast`, `inspect` and `validate` in a fresh CLI invocation; each
outcome is a result, a clean `Error:` line or a traceback (a bug). Each stopped run is checked afterwards: exit
130/143 and no temp (SIGINT, SIGTERM), or a temp the next run removes with a note (SIGKILL); no output, or a whole
one; inputs unchanged.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_fuzz import damaged  # noqa: E402

from loratools.cli import cli  # noqa: E402

FIXTURES = ROOT / "fixtures"
READERS = {
    "peft (safetensors)": ("peft_llama", "adapter_model.safetensors"),
    "peft (legacy .bin)": ("peft_llama_bin", "adapter_model.bin"),
    "kohya": ("kohya_sd/lora.safetensors", None),
    "lycoris loha": ("lycoris_loha.safetensors", None),
    "lycoris lokr": ("lycoris_lokr.safetensors", None),
    "diffusers": ("diffusers_sd/pytorch_lora_weights.safetensors", None),
    "diffusers (old)": ("diffusers_sd_old/pytorch_lora_weights.safetensors", None),
}


def fuzz(cases: int) -> list[str]:
    rows = []
    runner = CliRunner()
    for label, (src, inner) in READERS.items():
        rng = random.Random(label)
        counts: collections.Counter[str] = collections.Counter()
        with tempfile.TemporaryDirectory() as d:
            for i in range(cases):
                case = Path(d) / f"c{i}"
                if inner:
                    shutil.copytree(FIXTURES / src, case)
                    target = case / inner
                else:
                    case.mkdir()
                    target = case / Path(src).name
                original = (FIXTURES / src / inner if inner else FIXTURES / src).read_bytes()
                target.write_bytes(damaged(original, rng))
                for args in (["inspect", "--fast", "--json"], ["inspect", "--json"], ["validate", "--json"]):
                    r = runner.invoke(cli, [*args, str(case)])
                    if r.exception is not None and not isinstance(r.exception, SystemExit):
                        counts["traceback"] += 1
                    elif r.exit_code == 0:
                        counts["result"] += 1
                    else:
                        counts["clean error"] += 1
                shutil.rmtree(case)
        rows.append(
            f"| {label} | {cases} | {3 * cases} | {counts['result']} | {counts['clean error']} | {counts['traceback']} |"
        )
    return rows


def digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for root in paths:
        for f in sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]:
            h.update(f.read_bytes())
    return h.hexdigest()


def wait_for_work(proc: subprocess.Popen[bytes], out: Path, limit: float = 60.0) -> None:
    """Until the run has started writing (a temp beside the output) or has ended: kill points then fall in the
    work, not in Python's start-up."""
    t = time.perf_counter()
    while proc.poll() is None and time.perf_counter() - t < limit:
        if any(x.name.startswith(".") for x in out.iterdir()):
            return
        time.sleep(0.005)


def kills(points: int) -> list[str]:
    import torch

    from loratools.io.safetensors import write_safetensors

    rows = []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        base = work / "base.safetensors"
        g = torch.Generator().manual_seed(0)
        tensors = {f"model.layers.{i}.self_attn.{n}.weight": torch.randn(16 if n in ("k_proj", "v_proj") else 32, 32, generator=g)
                   for i in range(2) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}  # fmt: skip
        tensors["model.filler.weight"] = torch.randn(30_000_000, generator=g)
        write_safetensors(base, tensors)
        tuned = work / "tuned.safetensors"  # a fine-tuned twin for extract: a rank-2 change on every projection
        write_safetensors(tuned, {k: t + torch.randn(t.shape[0], 2, generator=g) @ torch.randn(2, t.shape[1], generator=g)
                                  if t.dim() == 2 else t for k, t in tensors.items()})  # fmt: skip
        exe = [sys.executable, "-m", "loratools"]
        out = work / "out"
        out.mkdir()
        commands = {
            "merge": [*exe, "merge", str(base), str(FIXTURES / "peft_llama"), "-o", str(out / "o.safetensors")],
            "mix": [*exe, "mix", str(FIXTURES / "kohya_sd/lora.safetensors"), str(FIXTURES / "lycoris_loha.safetensors"), "--rank", "2", "-o", str(out / "o.safetensors")],
            "resize": [*exe, "resize", str(FIXTURES / "peft_llama_patterns"), "--rank", "2", "-o", str(out / "o")],
            "convert": [*exe, "convert", str(FIXTURES / "lycoris_lokr.safetensors"), "--to", "diffusers", "-o", str(out / "o.safetensors")],
            "extract": [*exe, "extract", str(base), str(tuned), "--rank", "2", "-o", str(out / "o")],
        }  # fmt: skip
        before = digest([base, tuned, FIXTURES])
        for name, cmd in commands.items():
            # how long the command runs once its temp exists: the kill points are drawn inside that span (a
            # fixed window would mostly land after a fast command had finished)
            p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            wait_for_work(p, out)
            t0 = time.perf_counter()
            p.communicate(timeout=120)
            span = time.perf_counter() - t0
            for x in out.iterdir():
                shutil.rmtree(x) if x.is_dir() else x.unlink()
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
                rng = random.Random(f"{name}{sig}")
                stats: collections.Counter[str] = collections.Counter()
                for _ in range(points):
                    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                    wait_for_work(p, out)
                    time.sleep(rng.uniform(0.0, span))
                    p.send_signal(sig)
                    p.communicate(timeout=120)
                    items = list(out.iterdir())
                    temps = [x for x in items if x.name.startswith(".")]
                    outputs = [x for x in items if not x.name.startswith(".")]
                    stats["finished first" if p.returncode == 0 else "interrupted"] += 1
                    stats["temps left"] += bool(temps)
                    stats["bad"] += bool(temps) and sig != signal.SIGKILL
                    stats["bad"] += p.returncode not in (0, {signal.SIGINT: 130, signal.SIGTERM: 143}.get(sig, -9))
                    for x in outputs:
                        shutil.rmtree(x) if x.is_dir() else x.unlink()
                    if temps:  # the next run must clean them up and say so
                        r = subprocess.run(cmd, capture_output=True, timeout=300)
                        cleaned = b"left by an interrupted run" in r.stderr and not [
                            x for x in out.iterdir() if x.name.startswith(".")
                        ]
                        stats["cleaned by next run"] += cleaned
                        stats["bad"] += not cleaned
                        for x in out.iterdir():
                            shutil.rmtree(x) if x.is_dir() else x.unlink()
                signame = signal.Signals(sig).name
                rows.append(
                    f"| {name} | {signame} | {points} | {stats['interrupted']} | {stats['temps left']} | "
                    f"{stats['cleaned by next run']} | {stats['bad']} |"
                )
        rows.append(f"\ninputs byte-identical after all runs: {digest([base, tuned, FIXTURES]) == before}")
    return rows


#: battery file -> the category docs/reliability.md counts it under
CATEGORIES = {
    "test_hostile_headers.py": "safetensors headers",
    "test_hostile_configs.py": "configs (adapter, base, metadata)",
    "test_hostile_regex.py": "regexes from configs and options",
    "test_hostile_pickles.py": "pickles",
    "test_hostile_lycoris.py": "LyCORIS shapes",
    "test_hostile_math.py": "numbers and bounded work (NaN, Inf, huge products)",
    "test_hostile_indexes.py": "base indexes and shards",
    "test_hostile_gguf.py": "GGUF adapters read and written, base configs",
    "test_hostile_types.py": "PEFT LoHa/LoKr/AdaLoRA/VeRA and mlx-lm folders",
    "test_hostile_families.py": "image-model names, single-file layouts, report numbers, output names",
    "test_hostile_filetypes.py": "wrong file types, library arguments of load/save",
    "test_hostile_hub.py": "Hub responses (test Hub server)",
    "test_hostile_push.py": "push contents (secrets, links, pickles)",
    "test_hostile_outputs.py": "output paths (inputs, reports, special files, concurrent writers, leftovers, "
    "read-only, full disk, umask, fsync)",
    "test_hostile_signals.py": "signals (Ctrl-C, SIGTERM, SIGHUP, SIGKILL)",
    "test_hostile_usage.py": "usage errors (exit 2 before loading)",
    "test_hostile_library.py": "library arguments of the operations",
    "test_hostile_terminal.py": "names printed to the terminal (markup, escapes)",
}


def battery() -> list[str]:
    """Every hostile case, slow ones included, counted by category and outcome."""
    import pytest

    class Recorder:
        def __init__(self) -> None:
            self.counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
            self.default: collections.Counter[str] = collections.Counter()

        def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
            for item in items:
                if item.get_closest_marker("slow") is None:
                    self.default[Path(str(item.fspath)).name] += 1

        def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
            name = Path(report.nodeid.split("::")[0]).name
            if report.when == "call" or (report.when == "setup" and not report.passed):
                self.counts[name][report.outcome] += 1

    rec = Recorder()
    files = [str(ROOT / "tests" / f) for f in CATEGORIES]
    pytest.main(["-q", "-m", "", "-p", "no:cacheprovider", "--rootdir", str(ROOT), *files], plugins=[rec])
    rows = []
    total: collections.Counter[str] = collections.Counter()
    for f, label in CATEGORIES.items():
        c = rec.counts[f]
        n = sum(c.values())
        total.update(c)
        total["default"] += rec.default[f]
        rows.append(f"| {label} | {n} | {rec.default[f]} | {c['passed']} | {c['failed']} | {c['skipped']} |")
    n = sum(v for k, v in total.items() if k != "default")
    rows.append(f"| **all** | **{n}** | **{total['default']}** | **{total['passed']}** | **{total['failed']}** | "
                f"**{total['skipped']}** |")  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=300, help="damaged files per reader")
    p.add_argument("--kills", type=int, default=20, help="kill points per command and signal")
    p.add_argument("--battery-only", action="store_true", help="only the hostile battery's table")
    p.add_argument("--kills-only", action="store_true", help="only the stopped and killed runs' table")
    args = p.parse_args()
    if not args.kills_only:
        battery_and_fuzz(args)
    if args.battery_only:
        return
    print(
        "\n| command | signal | kill points | interrupted | temp left | removed by next run (with a note) | lost or left behind |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in kills(args.kills):
        print(row, flush=True)


def battery_and_fuzz(args: argparse.Namespace) -> None:
    table = battery()
    print("\n| category | cases | in make test | passed | failed | skipped |")
    print("|---|---|---|---|---|---|")
    for row in table:
        print(row, flush=True)
    if args.battery_only:
        return
    print("| reader | damaged files | runs | result | clean Error | traceback |")
    print("|---|---|---|---|---|---|")
    for row in fuzz(args.cases):
        print(row, flush=True)


if __name__ == "__main__":
    main()

"""--device cuda: the same results as on the CPU. Skipped where no GPU is present (CI has none); the error
for asking without one is tested everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import FIXTURES

from loratools import load_adapter
from loratools.cli import cli
from loratools.ops.mix import mix_adapters
from loratools.ops.resize import resize_adapter

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path: Path) -> None:
    r = CliRunner().invoke(
        cli, ["resize", str(FIXTURES / "peft_llama"), "--rank", "2", "--device", "cuda", "-o", str(tmp_path / "x")]
    )
    assert r.exit_code == 1 and "no CUDA device" in r.stderr and not (tmp_path / "x").exists()


@cuda
def test_mix_and_resize_on_cuda_match_cpu() -> None:
    a, b = load_adapter(FIXTURES / "peft_llama"), load_adapter(FIXTURES / "peft_llama_patterns")
    for method, rank in (("cat", None), ("svd", 3)):
        cpu, _ = mix_adapters([a, b], [0.7, -0.3], method, rank, dtype="fp32")  # type: ignore[arg-type]
        gpu, _ = mix_adapters([a, b], [0.7, -0.3], method, rank, dtype="fp32", device="cuda")  # type: ignore[arg-type]
        for name, m in cpu.modules.items():
            torch.testing.assert_close(gpu.modules[name].delta(), m.delta(), rtol=1e-4, atol=1e-5)
    cpu, _ = resize_adapter(b, rank=3)
    gpu, _ = resize_adapter(b, rank=3, device="cuda")
    for name, m in cpu.modules.items():
        torch.testing.assert_close(gpu.modules[name].delta(), m.delta(), rtol=1e-4, atol=1e-5)


@cuda
def test_pruning_methods_on_cuda_match_cpu() -> None:
    """ties and magnitude_prune (deterministic) give the CPU's result on the GPU; DARE's masks come from the
    device's generator, so there the same seed gives the same result twice."""
    a, b = load_adapter(FIXTURES / "peft_llama"), load_adapter(FIXTURES / "peft_llama_patterns")
    for method in ("ties", "magnitude_prune"):
        cpu, _ = mix_adapters([a, b], [0.7, 0.4], method, 3, dtype="fp32", density=0.5)  # type: ignore[arg-type]
        gpu, _ = mix_adapters([a, b], [0.7, 0.4], method, 3, dtype="fp32", density=0.5, device="cuda")  # type: ignore[arg-type]
        for name, m in cpu.modules.items():
            want = m.delta()
            torch.testing.assert_close(gpu.modules[name].delta(), want, rtol=0, atol=1e-4 * float(want.abs().max()))
    one, _ = mix_adapters([a, b], [0.7, 0.4], "dare_ties", 3, density=0.5, seed=4, device="cuda")
    two, _ = mix_adapters([a, b], [0.7, 0.4], "dare_ties", 3, density=0.5, seed=4, device="cuda")
    for name, m in one.modules.items():
        assert torch.equal(m.delta(), two.modules[name].delta())

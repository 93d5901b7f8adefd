"""The compiled inner loop of merge (loratools/ops/_rows.c) against torch doing the same arithmetic: every pair of
stored dtypes, shapes with rows and columns left over from its 4 x 16 tiles, NaN, inf, overflow in storage,
huge finite values, both of its code paths (AVX+FMA and plain), bad buffers; and whole merges by it against
merges by the torch path (``KERNEL = None``)."""

from __future__ import annotations

import itertools
import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch

from loratools.ops import merge, merge_engine

# not importorskip: that would skip the whole module, test_the_loop_is_built_where_a_compiler_is with it, where
# the build failed on a machine that has a compiler (the one case that test is there to catch)
rows_mod = merge_engine._compiled  # None where the compiled loop is not built
needs_loop = pytest.mark.skipif(rows_mod is None, reason="the compiled loop is not built (no C compiler)")

DTYPES = {0: torch.float32, 1: torch.bfloat16, 2: torch.float16}
BITS = {0: torch.int32, 1: torch.int16, 2: torch.int16}
SHAPES = [(4, 16), (7, 37), (13, 200), (1, 5), (9, 33), (64, 1000)]


def test_the_loop_is_built_where_a_compiler_is() -> None:
    """setup.py builds it as optional (an install without a compiler goes on): where one is found, a failed build
    is a bug, not a fallback."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine")
    assert rows_mod is not None, "a C compiler is here, but loratools.ops._rows is not built (see setup.py's output)"


@pytest.fixture(params=["avx+fma", "default"])
def simd(request: pytest.FixtureRequest) -> str:
    try:
        old = rows_mod.set_simd(request.param)
    except ValueError:
        pytest.skip(f"this CPU has no {request.param} path")
    yield request.param
    rows_mod.set_simd(old)


def _run(base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, sdt: int, odt: int) -> tuple[torch.Tensor, tuple]:
    rows, cols = base.shape
    out = bytearray(rows * cols * DTYPES[odt].itemsize)
    res = rows_mod.merge_rows(
        base.contiguous().view(torch.uint8).numpy().tobytes(), 0, sdt, a.contiguous().numpy(), 0,
        b.contiguous().numpy(), rows, cols, a.shape[1], out, 0, odt,
    )  # fmt: skip
    got = torch.frombuffer(out, dtype=DTYPES[odt]).view(rows, cols) if out else torch.empty(rows, cols)
    return got, res


def _reference(base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, odt: int) -> tuple[torch.Tensor, tuple]:
    """torch's merge of one chunk (merge_engine._chunk's arithmetic), with float64 sums."""
    delta = a @ b if a.shape[1] != 1 else a * b  # rank 1: one product per element, the loop's exactly
    merged = delta + base.float()
    stored = merged.to(DTYPES[odt])
    lost = stored.float() - merged
    fin = torch.isfinite(lost)
    mx = float(delta.abs().max()) if delta.numel() else 0.0
    return stored, (mx, float((base.double() ** 2).sum()), float((lost[fin].double() ** 2).sum()), int((~fin).sum()))


def _close(x: float, y: float, rel: float = 1e-5) -> bool:
    return x == y or (math.isnan(x) and math.isnan(y)) or abs(x - y) <= rel * max(abs(x), abs(y))


def _specials(base: torch.Tensor, sdt: int) -> None:
    flat = base.view(-1)
    flat[3], flat[5], flat[6] = float("nan"), float("inf"), float("-inf")
    flat[7] = 6.5e4 if sdt == 2 else 3.3e38  # the delta pushes it over the largest finite value
    flat[11] = 1e-7  # a float16 subnormal, a bfloat16 normal


@needs_loop
@pytest.mark.parametrize(("sdt", "odt"), list(itertools.product(DTYPES, DTYPES)))
def test_rank_one_is_bit_exact(simd: str, sdt: int, odt: int) -> None:
    """With one rank term the product is one rounding in both: the stored bits, max |delta|, |base|^2, |lost|^2
    and the overflow count must be torch's exactly (NaN payloads aside: both store a NaN there)."""
    torch.manual_seed(sdt * 3 + odt)
    for rows, cols in SHAPES:
        base = (torch.randn(rows, cols) * 3).to(DTYPES[sdt])
        if rows * cols > 20:
            _specials(base, sdt)
        a, b = torch.randn(rows, 1), torch.randn(1, cols) * 50
        got, res = _run(base, a, b, sdt, odt)
        want, ref = _reference(base, a, b, odt)
        nan = torch.isnan(want.float())
        assert torch.equal(torch.isnan(got.float()), nan)
        assert torch.equal(got.view(BITS[odt])[~nan], want.view(BITS[odt])[~nan]), (rows, cols)
        assert _close(res[0], ref[0], 0) and _close(res[1], ref[1]) and _close(res[2], ref[2]), (res, ref)
        assert res[3] == ref[3]
        if rows * cols > 20 and odt != 0:
            assert res[3] >= 1  # the value pushed past the largest finite one


@needs_loop
@pytest.mark.parametrize(("sdt", "odt"), [(1, 1), (2, 2), (0, 0), (1, 0), (0, 1), (2, 1)])
def test_rank_sixteen_matches_torch(simd: str, sdt: int, odt: int) -> None:
    """Sixteen rank terms: the product's terms meet in another order than in a BLAS, so a stored value may differ
    by one unit in the last place where the float32 sum falls on a rounding boundary; the numbers to 1e-5."""
    torch.manual_seed(7)
    for rows, cols in SHAPES:
        base = torch.randn(rows, cols).to(DTYPES[sdt])
        a, b = torch.randn(rows, 16) * 0.1, torch.randn(16, cols) * 0.1
        got, res = _run(base, a, b, sdt, odt)
        want, ref = _reference(base, a, b, odt)
        ulp = {0: 1e-5, 1: 2**-7, 2: 2**-10}[odt]
        assert torch.allclose(got.float(), want.float(), rtol=ulp, atol=1e-6)
        if odt != 0:  # float32 keeps the sum's last bit, where the two orders differ; 16 bits: boundary cases only
            assert (got != want).float().mean() < 0.01
        assert _close(res[0], ref[0]) and _close(res[1], ref[1])
        assert _close(res[2], ref[2], 0.02)  # a flipped rounding moves |lost| by up to one unit
        assert res[3] == ref[3] == 0


@needs_loop
def test_huge_finite_values_are_summed_in_float64(simd: str) -> None:
    """|lost|^2 of values near bfloat16's largest overflows a float32 sum: the block is summed again in float64,
    so the report says a large finite number, not inf."""
    base = torch.full((8, 32), 1e37).to(torch.bfloat16)
    a, b = torch.ones(8, 1), torch.full((1, 32), 3e34)
    got, res = _run(base, a, b, 1, 1)
    want, ref = _reference(base, a, b, 1)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert math.isfinite(res[2]) and res[2] > 1e60 and _close(res[2], ref[2])
    assert math.isfinite(res[1]) and _close(res[1], ref[1])


@needs_loop
def test_zero_rank_and_empty() -> None:
    base = torch.randn(5, 7).to(torch.bfloat16)
    got, res = _run(base, torch.empty(5, 0), torch.empty(0, 7), 1, 1)
    assert torch.equal(got, base) and res[0] == 0 and res[2] == 0
    assert rows_mod.merge_rows(b"", 0, 1, b"", 0, bytes(84), 0, 7, 3, bytearray(), 0, 1) == (0.0, 0.0, 0.0, 0)
    # no columns and no rank: nothing bounds the row count but there is nothing to do (it returns at once)
    assert rows_mod.merge_rows(b"", 0, 1, b"", 0, b"", 1 << 40, 0, 0, bytearray(), 0, 1) == (0.0, 0.0, 0.0, 0)


@needs_loop
@pytest.mark.parametrize(
    "args",
    [
        (bytes(10), 0, 1, bytes(4 * 4 * 2), 0, bytes(2 * 4 * 4), 4, 4, 2, bytearray(32), 0, 1),  # src too short
        (bytes(32), 8, 1, bytes(4 * 4 * 2), 0, bytes(2 * 4 * 4), 4, 4, 2, bytearray(32), 0, 1),  # offset past it
        (bytes(32), 0, 1, bytes(4 * 4 * 2), 0, bytes(2 * 4 * 4), 4, 4, 2, bytearray(30), 0, 1),  # out too short
        (bytes(32), 0, 1, bytes(4 * 4 * 2), 0, bytes(2 * 4 * 4), 4, 4, 2, bytes(32), 0, 1),  # out read-only
        (bytes(32), 0, 1, bytes(4 * 4 * 2), 0, bytes(2 * 4 * 4), 4, 4, 2, bytearray(32), 0, 7),  # unknown dtype
        (bytes(32), 0, 1, bytes(4 * 4 * 2), 0, bytes(2 * 4 * 4), -4, 4, 2, bytearray(32), 0, 1),  # negative rows
        (bytes(32), -2, 1, bytes(4 * 4 * 2), 0, bytes(2 * 4 * 4), 4, 4, 2, bytearray(32), 0, 1),  # negative offset
        (bytes(32), 0, 1, bytes(4 * 4 * 2), 1, bytes(2 * 4 * 4), 4, 4, 2, bytearray(32), 0, 1),  # a short
        (bytes(32), 0, 1, bytes(4 * 4 * 2 + 1), 1, bytes(2 * 4 * 4), 4, 4, 2, bytearray(32), 0, 1),  # a misaligned
        (bytes(32), 0, 1, bytes(8), 0, bytes(8), 1 << 62, 1 << 62, 2, bytearray(32), 0, 1),  # sizes overflow
    ],
)
def test_bad_buffers_are_refused(args: tuple) -> None:
    with pytest.raises((ValueError, TypeError, BufferError)):
        rows_mod.merge_rows(*args)


# ---- whole merges: the compiled loop against the torch path ---------------------------------------------------


def _checkpoint(folder: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(1)
    folder.mkdir()
    tensors = {
        f"model.layers.{i}.self_attn.{p}.weight": torch.randn(68 + 4 * i, 53).to(dtype)
        for i in range(2)
        for p in ("q_proj", "v_proj")
    }
    tensors["model.embed_tokens.weight"] = torch.randn(30, 53).to(dtype)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 53}))


def _adapter(folder: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(2)
    folder.mkdir()
    tensors = {}
    for i in range(2):
        for p in ("q_proj", "v_proj"):
            stem = f"base_model.model.model.layers.{i}.self_attn.{p}"
            tensors[f"{stem}.lora_A.weight"] = torch.randn(8, 53) * 0.1
            tensors[f"{stem}.lora_B.weight"] = torch.randn(68 + 4 * i, 8) * 0.1
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]})
    )


def _data(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


@needs_loop
@pytest.mark.parametrize(
    ("stored", "out_dtype"),
    [
        (torch.bfloat16, None),
        (torch.float16, None),
        (torch.float32, None),
        (torch.float32, "bf16"),
        (torch.bfloat16, "fp32"),
    ],
)
def test_merge_by_the_loop_equals_merge_by_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stored: torch.dtype, out_dtype: str | None
) -> None:
    """The same merge through both engines: same header, same untouched bytes, merged values within one unit in
    the last place (the rank terms' order), and the report's numbers to 1e-4."""
    _checkpoint(tmp_path / "base", stored)
    _adapter(tmp_path / "ad")
    outs = {}
    for name, kernel in (("loop", rows_mod), ("torch", None)):
        monkeypatch.setattr(merge_engine, "KERNEL", kernel)
        rep = merge.merge(tmp_path / "base", [tmp_path / "ad"], tmp_path / name, dtype=out_dtype)
        outs[name] = (_data(tmp_path / name / "model.safetensors"), rep)
    (h1, d1), r1 = outs["loop"]
    (h2, d2), r2 = outs["torch"]
    assert h1 == h2
    assert len(r1.tensors) == len(r2.tensors) == 4
    for name, info in h1.items():
        if name == "__metadata__":
            continue
        lo, hi = info["data_offsets"]
        dt = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[info["dtype"]]
        x = torch.frombuffer(bytearray(d1[lo:hi]), dtype=dt).float()
        y = torch.frombuffer(bytearray(d2[lo:hi]), dtype=dt).float()
        if "embed" in name:
            assert d1[lo:hi] == d2[lo:hi]
        else:
            assert torch.allclose(x, y, rtol=2**-7, atol=1e-6), name
    for t1, t2 in zip(r1.tensors, r2.tensors, strict=True):
        assert t1.name == t2.name
        for field in ("delta_norm", "base_norm", "relative_change", "max_abs_delta"):
            assert _close(getattr(t1, field), getattr(t2, field), 1e-4), (t1.name, field)
        assert abs(t1.retained - t2.retained) < 1e-3 and t1.overflow == t2.overflow


def test_the_torch_engine_is_kept_by_the_environment(tmp_path: Path) -> None:
    """LORATOOLS_KERNEL=torch runs merge without the compiled loop (to rule it out when a result looks wrong)."""
    import subprocess
    import sys

    code = "from loratools.ops import merge_engine; print(merge_engine.KERNEL)"
    env = {"LORATOOLS_KERNEL": "torch", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"


def test_an_install_without_a_c_compiler_goes_on(tmp_path: Path) -> None:
    """setup.py marks the loop optional: with no working compiler the build says so and succeeds without it (and
    merge then runs the torch engine, which the tests above hold equal to the loop)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(root / name, tmp_path / name)
    shutil.copytree(root / "loratools", tmp_path / "loratools", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    env = {"PATH": "/usr/bin:/bin", "CC": "/bin/false", "LDSHARED": "/bin/false", "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "failed" in (r.stdout + r.stderr).lower()
    assert not list((tmp_path / "loratools" / "ops").glob("_rows*.so"))

"""What mix and resize share: a module as two factors, a working device, and LoRA modules built from factors."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..errors import IncompatibleAdaptersError, LoratoolsError, ShapeError
from ..model import Module, TensorRef, torch_dtype
from .linalg import dense_factors

if TYPE_CHECKING:
    import torch

#: --dtype names -> safetensors dtype names
DTYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def pick_device(device: str | None, *, allow_auto: bool = False) -> str:
    """``cpu``, ``cuda[:n]`` (refused when no GPU is there) or, where allowed, ``auto`` (CUDA when present).
    ``cpu`` needs no torch imported (argument checks stay cheap)."""
    dev = device or "cpu"
    if dev == "cpu":
        return dev
    import torch

    if allow_auto and dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    choices = "cpu, cuda or auto" if allow_auto else "cpu or cuda"
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LoratoolsError(
                f"--device {dev}: no CUDA device is available here (torch sees no GPU)",
                "run on the CPU: --device cpu"
                + (", or --device auto (a GPU only when there is one)" if allow_auto else ""),
            )
        return dev
    if dev != "cpu":
        raise LoratoolsError(f"unknown device {dev!r}", f"use {choices}")
    return dev


def work_device(device: str | None) -> tuple[str, torch.dtype]:
    """The device to compute on, and the working dtype: float64 on CPU (cheap at these sizes, and the
    re-compression error then is the math's, not the rounding's), float32 on a GPU."""
    import torch

    dev = pick_device(device)
    return dev, (torch.float32 if dev.startswith("cuda") else torch.float64)


def refuse_dora(m: Module, what: str) -> None:
    if m.magnitude is not None:
        raise IncompatibleAdaptersError(
            f"{m.name}: is a DoRA module; {what} would change the norm its magnitude was trained against",
            "merge the DoRA adapter into its base (loratools merge) instead, or drop it from the inputs",
        )
    if m.origin == "vera":  # its down factor is the shared projection, as wide as the widest layer
        raise IncompatibleAdaptersError(
            f"{m.name}: is a VeRA module whose layer width the folder does not record; {what} needs it",
            "convert it to LoRA against its base first: loratools convert SRC --to peft --base BASE -o OUT",
        )


def factors(m: Module, device: str, work: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, down)`` with ``up @ down == m.delta_matrix()``, scale folded in. LoHa, LoKr, Tucker and full
    modules go through their dense delta (bounded by ``Module.check_dense``) and an exact SVD.

    NaN or Inf (in a factor, in alpha, or from an overflow of the scale) is refused here, naming the module,
    before any SVD sees it."""
    m.check_dense()
    got = m.lora_factors(dtype=work, device=device)
    if got is not None:
        refuse_nonfinite(m, *got)
        return got
    delta = m.delta_matrix(dtype=work, device=device)
    refuse_nonfinite(m, delta)
    return dense_factors(delta)


def check_dense_all(modules: Iterable[Module]) -> None:
    """Every module's dense-delta bound, from the headers alone: refused before any work starts."""
    for m in modules:
        m.check_dense()


def refuse_nonfinite(m: Module, *computed: torch.Tensor, what: str = "") -> None:
    """Refuse NaN or Inf in ``computed`` (tensors made from ``m``), or a size the SVD cannot take, saying where it
    comes from."""
    import torch

    finite = all(bool(torch.isfinite(t).all()) for t in computed)
    bound = _norm_bound(computed)
    if finite and bound < _limit(computed):
        return
    if m.alpha is not None and not math.isfinite(m.alpha):
        why = f"alpha is {m.alpha}: the result would not be a number"
    else:
        bad = [role for role, ref in m.factors.items() if not _finite(ref.load())]
        if bad:
            why = f"NaN or Inf in its {', '.join(bad)} factor(s): the result would not be a number"
        else:
            dtype = str(computed[0].dtype).removeprefix("torch.")
            why = f"{what or 'its delta'} overflows {dtype} arithmetic (a norm of {bound:.3g})"
    raise LoratoolsError(
        f"{m.name}: {why}", "`loratools validate` lists every such module; fix or leave out the adapter"
    )


def _norm_bound(computed: tuple[torch.Tensor, ...]) -> float:
    """``||up|| * ||down||`` (or one matrix's norm): it bounds every entry of the product, of its Gram matrices
    and of the small SVD core, and the singular values."""
    import torch

    bound = 1.0
    for t in computed:
        bound *= float(torch.linalg.vector_norm(t.double())) if t.is_floating_point() else 0.0
    return bound if math.isfinite(bound) else math.inf


def _limit(computed: tuple[torch.Tensor, ...]) -> float:
    """A norm the SVD and its energies (squared singular values) can take in the work dtype, with room to spare."""
    import torch

    if not computed or not computed[0].is_floating_point():
        return math.inf
    return math.sqrt(torch.finfo(computed[0].dtype).max) / 2**10


def _finite(t: torch.Tensor) -> bool:
    import torch

    return not t.is_floating_point() or bool(torch.isfinite(t).all())


def lora_module(
    template: Module, up: torch.Tensor, down: torch.Tensor, dtype: str, shape: tuple[int, ...] | None = None
) -> Module:
    """A plain LoRA module with ``up @ down`` as its delta matrix (scale 1: alpha = rank), in the layout of
    ``template`` (conv kernels, embedding, fan_in_fan_out). ``shape``: the delta's true (out, in[, kh, kw]) shape,
    for a template whose factors do not tell its kernel (:attr:`Module.flattened`): from the base model, or from
    another adapter of the same layer. Without it such a module is refused unless its name is a projection that
    is linear in every model (never guessed: a conv written as linear LoRA does not load)."""
    from ..formats.names import is_linear_leaf

    if shape is None:
        shape = template.delta_shape()
        if template.flattened and not is_linear_leaf(template.name):
            raise ShapeError(
                f"{template.name}: a {template.kind} module stores a conv layer's factors flattened "
                f"({list(shape)}): without the base model its kernel size is unknown, and LoRA needs it",
                "convert it with --base BASE (the base model gives every layer's shape), then resize or mix that",
            )
    elif math.prod(shape) != math.prod(template.delta_shape()) or shape[0] != template.delta_shape()[0]:
        raise ShapeError(f"{template.name}: its delta is {list(template.delta_shape())}, the layer {list(shape)}")
    k = up.shape[1]
    kernel = tuple(shape[2:])
    if kernel:
        up = up.reshape(up.shape[0], k, *([1] * len(kernel)))
        down = down.reshape(k, shape[1], *kernel)
    target = torch_dtype(dtype)
    return Module(
        name=template.name,
        kind="lora",
        factors={
            "down": TensorRef.of(down.to("cpu", target).contiguous()),
            "up": TensorRef.of(up.to("cpu", target).contiguous()),
        },
        alpha=float(k),
        layer="conv" if kernel else template.layer,
        fan_in_fan_out=template.fan_in_fan_out,
    )


def stored_dtype(m: Module, requested: str | None) -> str:
    """The dtype a result is stored in: the one asked for, else the module's own float dtype."""
    if requested:
        if requested not in DTYPES:
            raise LoratoolsError(f"unknown dtype {requested!r}", "use fp32, fp16 or bf16")
        return DTYPES[requested]
    dt = next(iter(m.factors.values())).dtype
    return dt if dt in ("F32", "F16", "BF16", "F64") else "F32"

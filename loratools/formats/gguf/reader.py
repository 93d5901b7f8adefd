"""GGUF LoRA adapters (llama.cpp's ``convert_lora_to_gguf.py``, unsloth's ``save_pretrained_gguf``, Ollama's
store, loratools' own) read back into the canonical model, every rule of the writer undone.

* Names: GGUF tensor names back to module paths through the same tables the writer uses (:mod:`.surgery`).
* Scale: llama.cpp applies ``alpha / r`` with one ``adapter.lora.alpha`` per file and r the rank of each B
  (``llama_adapter_lora_weight::get_scale``); an alpha of 0, or none, means scale 1. Each module gets that alpha.
* Surgery undone: q/k rows of B un-permuted (the head counts come from the file's
  ``{arch}.attention.head_count(_kv)``, which loratools writes, else from a ``config.json`` beside the file: llama.cpp's
  own converter records none); stacked experts split back into one module per expert; ``token_embd.weight.lora_a``
  transposed back; a norm a merge tool stored in the adapter (``*_norm.weight``, which llama.cpp skips) read as a
  full tensor, Gemma's ``+ 1`` taken off.
* Data is memory-mapped and read per tensor (per expert for a stack) when asked for: the header alone answers
  ``inspect --fast``. F32, F16, BF16 and every quantized type gguf can dequantize are read (as float32).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import FileFormatError, HeaderError, IncompatibleAdaptersError, LoratoolsError, ShapeError
from ...io.safetensors import shown
from ...model import PROVENANCE_KEY, Adapter, Extra, Layer, Module, TensorRef
from . import surgery as sg
from .header import GGUFHeader, TensorEntry, read_header
from .pkg import require
from .writer import HUB_URL, check_heads, count, text_hparams, unpermute
from .writer import PROVENANCE_KEY as GGUF_PROVENANCE

if TYPE_CHECKING:
    import torch

NAME = "gguf"
#: the suffix of a written adapter (formats.outputs checks -o against it)
SUFFIX = ".gguf"
EXPERT_KINDS = ("FFN_GATE_EXP", "FFN_UP_EXP", "FFN_DOWN_EXP")
FLOATS = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}


def read(path: str | os.PathLike[str], *, problems: list[str] | None = None) -> Adapter:
    """Read a GGUF LoRA adapter (see the module's docstring). With ``problems`` (a list), what validate reports
    (unknown or unpaired tensors) is collected there instead of raised; a header that lies always raises."""
    gguf = require()
    p = Path(path)
    h = read_header(p, adapter_only=True)
    where = p.name
    kind = h.kv.get("general.type")
    if kind != "adapter":
        raise FileFormatError(
            f"{where}: a GGUF file with {'no general.type' if kind is None else 'general.type ' + shown(str(kind), 40)}"
            ", not an adapter",
            "loratools reads GGUF LoRA adapters (general.type = adapter); give the adapter's .gguf file",
        )
    if h.kv.get("adapter.type") != "lora":
        raise FileFormatError(
            f"{where}: adapter.type is {shown(str(h.kv.get('adapter.type')), 40)}: only LoRA adapters are read",
            "llama.cpp's other adapters (control vectors) are no LoRA",
        )
    arch = h.kv.get("general.architecture")
    if not isinstance(arch, str):
        raise HeaderError(f"{where}: general.architecture is missing or not a string")
    if arch not in gguf.MODEL_ARCH_NAMES.values():
        raise FileFormatError(f"{where}: unknown GGUF architecture {shown(arch, 60)}: not one that gguf names")
    rules = sg.by_gguf_arch(arch)
    if rules is None:
        raise IncompatibleAdaptersError(
            f"{where}: GGUF architecture {shown(arch, 60)}: loratools knows no rules of llama.cpp's converter for it, "
            "so its tensor names cannot be turned back into module paths",
            "supported: " + ", ".join(sorted({sg.gguf_arch(s) for s in sg.SURGERY.values()})),
        )
    alpha = _alpha(h)
    adapter = Adapter(format=NAME, metadata=_metadata(h), base_model=_base_model(h), source=str(p))
    pairs: dict[str, dict[str, TensorEntry]] = {}
    leftovers: list[str] = []
    for name, e in h.tensors.items():
        if name.endswith((".lora_a", ".lora_b")):
            pairs.setdefault(name[:-7], {})[name[-1]] = e
        elif name.endswith("_norm.weight") and (norm := sg.from_gguf(rules, name)) is not None:
            adapter.extras[norm + ".weight"] = Extra(_ref(p, e, offset=-rules.norm_offset), "modules_to_save")
        else:
            leftovers.append(name)
    heads = _Heads(h, rules, p)
    for base, ab in pairs.items():
        kind_ = sg.kind_of(rules, base)
        if kind_ in EXPERT_KINDS and rules.experts is not None:
            if not _experts(adapter, p, rules, base, ab, alpha, problems):
                leftovers += [base + ".lora_" + k for k in ab]
            continue
        module = sg.from_gguf(rules, base)
        if module is None:
            leftovers += [base + ".lora_" + k for k in ab]
            continue
        flat = {k: list(e.shape) for k, e in ab.items() if len(e.shape) != 2}
        if flat:
            _problem(f"{base}: LoRA factors must be 2-D (only expert stacks are 3-D), found {flat}", problems)
            continue
        factors: dict[str, TensorRef] = {}
        layer: Layer = "embedding" if base == "token_embd.weight" else "linear"
        if "a" in ab:
            factors["down"] = _ref(p, ab["a"], transpose=layer == "embedding")
        if "b" in ab:
            qk = rules.permute_qk and kind_ in ("ATTN_Q", "ATTN_K")
            factors["up"] = _ref(p, ab["b"], heads=functools.partial(heads.of, kind_, ab["b"], base) if qk else None)
        adapter.modules[module] = _module(module, factors, alpha, layer)
    _check(leftovers, arch, problems)
    return adapter


def _module(name: str, factors: dict[str, TensorRef], alpha: float | None, layer: Layer) -> Module:
    return Module(name, "lora", factors, alpha=alpha, layer=layer)


def _experts(
    adapter: Adapter,
    p: Path,
    rules: sg.Surgery,
    base: str,
    ab: dict[str, TensorEntry],
    alpha: float | None,
    problems: list[str] | None,
) -> bool:
    """One stack split back into one module per expert; False when the name is no stack of this architecture."""
    assert rules.experts is not None
    m = sg.GGUF_BLOCK_RE.fullmatch(base.removesuffix(".weight"))
    if m is None:
        return False
    bid = int(m.group(1))
    w = next((w for w in rules.experts.names if sg.expert_stack_name(rules, bid, w) == base), None)
    if w is None:
        return False
    dims = {k: e.shape for k, e in ab.items()}
    counts = {s[0] for s in dims.values() if len(s) == 3}
    if any(len(s) != 3 for s in dims.values()) or len(counts) != 1:
        _problem(f"{base}: an expert stack needs 3-D lora_a / lora_b with one expert count, found {dims}", problems)
        return True
    for xid in range(counts.pop()):
        path = rules.experts.per_expert.format(bid=bid, xid=xid, w=w)
        factors = {("down" if k == "a" else "up"): _ref(p, e, expert=xid) for k, e in ab.items()}
        adapter.modules[path] = _module(path, factors, alpha, "linear")
    return True


def _problem(msg: str, problems: list[str] | None) -> None:
    """A shape that no writer makes: raised, or collected for validate."""
    if problems is None:
        raise ShapeError(msg)
    problems.append(msg)


def _check(leftovers: list[str], arch: str, problems: list[str] | None) -> None:
    from ..common import check_leftovers

    check_leftovers(leftovers, [], f"a {arch} GGUF adapter", problems)


def _alpha(h: GGUFHeader) -> float | None:
    """The file's alpha as llama.cpp reads it (a float32; 0 or none: scale 1, returned as None)."""
    key = "adapter.lora.alpha"
    if key not in h.kv:
        return None
    if h.types[key] != 6:
        raise HeaderError(
            f"{h.path.name}: {key} must be a float32 (llama.cpp's loader asserts it), not type {h.types[key]}"
        )
    value = float(h.kv[key])
    if not math.isfinite(value):
        raise HeaderError(f"{h.path.name}: {key} is {value}: not a number llama.cpp can scale by")
    return value or None


def _metadata(h: GGUFHeader) -> dict[str, str]:
    """The file's scalar keys as strings (an array shown when short); loratools' provenance record under the key
    every format carries it."""
    out: dict[str, str] = {}
    for k, v in h.kv.items():
        if k == GGUF_PROVENANCE and isinstance(v, str):
            out[PROVENANCE_KEY] = v
        elif isinstance(v, (str, int, float, bool)):
            out[k] = str(v)
        elif v is not None and len(v) <= 64:
            out[k] = str([x.item() if hasattr(x, "item") else x for x in v])
    return out


def _base_model(h: GGUFHeader) -> str | None:
    url = h.kv.get("general.base_model.0.repo_url")
    if isinstance(url, str) and url.startswith(HUB_URL) and url.count("/") == 4:
        return url.removeprefix(HUB_URL)
    name = h.kv.get("general.base_model.0.name")
    return name if isinstance(name, str) and name else None


class _Heads:
    """The head counts that undo the q/k permutation: from the file's keys, else a config.json beside it; looked up
    only for q/k factors, and checked against each one's rows."""

    def __init__(self, h: GGUFHeader, rules: sg.Surgery, path: Path) -> None:
        self.h, self.rules, self.path = h, rules, path
        self.found: tuple[int, int] | None = None
        self.looked = False

    def _lookup(self) -> tuple[int, int] | None:
        arch = self.h.kv.get("general.architecture")
        n = _int(self.h.kv.get(f"{arch}.attention.head_count"))
        if n is not None:
            kv = _int(self.h.kv.get(f"{arch}.attention.head_count_kv"))
            heads = (n, n if kv is None else kv)
        else:
            from ...io.checkpoint import read_config

            cfg = read_config(self.path)
            if cfg is None:
                return None
            hp = text_hparams(cfg)
            n = count(hp, "num_attention_heads")
            kv = n if hp.get("num_key_value_heads") is None else count(hp, "num_key_value_heads")
            heads = (n, kv)
        check_heads(*heads)
        return heads

    def of(self, kind: str | None, b: TensorEntry, base: str) -> int:
        if not self.looked:
            self.found, self.looked = self._lookup(), True
        if self.found is None:
            raise LoratoolsError(
                f"{self.path.name}: {base}: llama.cpp's converter permutes the rows of {self.rules.arch.lower()} q/k "
                "factors for its rotary layout, and undoing that needs the base's head counts, which this file "
                "does not record",
                "put the base model's config.json beside the .gguf file (only config.json is read)",
            )
        heads = self.found[0] if kind == "ATTN_Q" else self.found[1]
        rows = b.shape[0] if b.shape else 0
        if len(b.shape) != 2 or rows % (2 * heads):
            raise ShapeError(f"{base}: lora_b {list(b.shape)} does not split into {heads} heads of an even size")
        return heads


def _int(value: Any) -> int | None:
    """A head count: an integer, or an array of one repeated integer (some model files keep one per layer)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if (
        value is not None
        and not isinstance(value, (str, float, bool))
        and len(value)
        and len({int(x) for x in value}) == 1
    ):
        first = int(value[0])
        return first if first > 0 else None
    return None


def _ref(
    path: Path,
    e: TensorEntry,
    *,
    expert: int | None = None,
    transpose: bool = False,
    heads: Callable[[], int] | None = None,
    offset: float = 0.0,
) -> TensorRef:
    """A tensor of the file, loaded when asked for: one expert of a stack, transposed, its rows un-permuted (for
    ``heads()`` heads, looked up then), or an offset taken off."""
    gguf = require()
    qtype = gguf.GGMLQuantizationType(e.ggml_type)
    dtype = qtype.name if qtype.name in ("F32", "F16", "BF16", "F64") else "F32"
    if qtype.name in ("I8", "I16", "I32", "I64"):
        raise FileFormatError(f"{path.name}: tensor {shown(e.name)} is stored as {qtype.name}: not a LoRA factor")
    shape = e.shape[1:] if expert is not None else e.shape
    shown_shape = tuple(reversed(shape)) if transpose else shape

    def load() -> torch.Tensor:
        t = _load(path, e, expert, shape)
        if transpose:
            t = t.T.contiguous()
        if heads is not None:
            t = unpermute(t, heads())
        if offset:
            t = (t.float() + offset).to(t.dtype)
        return t

    return TensorRef(shown_shape, dtype, load)


def _load(path: Path, e: TensorEntry, expert: int | None, shape: tuple[int, ...]) -> torch.Tensor:
    import numpy as np
    import torch

    gguf = require()
    qtype = gguf.GGMLQuantizationType(e.ggml_type)
    start, nbytes = e.start, e.nbytes
    if expert is not None:
        nbytes //= e.shape[0]
        start += expert * nbytes
    if nbytes == 0:
        return torch.zeros(shape, dtype=torch.float32)
    try:
        raw = np.array(np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(nbytes,)))
    except (OSError, ValueError) as err:
        raise FileFormatError(
            f"{path.name}: cannot read tensor {shown(e.name)} ({err})", "was the file changed?"
        ) from None
    if qtype.name in FLOATS:
        return torch.from_numpy(raw.view(FLOATS[qtype.name]).copy()).reshape(shape)
    if qtype.name == "BF16":
        return torch.from_numpy(raw.view("<i2").copy()).view(torch.bfloat16).reshape(shape)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows = raw.reshape(-1, shape[-1] // block * size)
    try:
        data = gguf.quants.dequantize(rows, qtype)
    except NotImplementedError:
        raise FileFormatError(f"{path.name}: tensor {shown(e.name)} is stored as {qtype.name}, which gguf cannot "
                              "dequantize") from None  # fmt: skip
    return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).reshape(shape)

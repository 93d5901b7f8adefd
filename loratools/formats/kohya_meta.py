"""kohya header metadata kept true on every write: the stored alpha of each module, the network description
(``ss_network_module``, ``ss_network_dim``, ``ss_network_alpha``, ``ss_network_args``) and the data hashes that
A1111 trusts from the header (``sshs_model_hash``, ``sshs_legacy_hash``; SAI's ``modelspec.hash_sha256``).

The rules, from the peers:

* sd-scripts ``library/train_util.py`` (``precalculate_safetensors_hashes``): ``sshs_model_hash`` is the hex
  sha256 of the data section (every byte after the header) of ``safetensors.torch.save(tensors, ss_metadata)``,
  where ``ss_metadata`` keeps only the ``ss_*`` keys; ``sshs_legacy_hash`` is the first 8 hex digits of the sha256
  of bytes ``0x100000 .. 0x110000`` of that same serialisation (header included: its length shifts the window;
  empty for a file under 1 MiB, which gives ``e3b0c442``). sd-webui-additional-networks recomputes the legacy
  hash the same way (re-serialising with the ``ss_*`` keys only), and A1111 takes ``sshs_model_hash`` as the
  file's hash when present, else hashes the data section itself.
* ModelSpec: ``modelspec.hash_sha256`` is ``0x`` + the sha256 of all tensor content (the data section).

loratools writes the tensors in the reference writer's order (``safetensors``' own: by dtype, then name), so its
data section is byte for byte what ``safetensors.torch.save`` gives and both definitions agree with the file
itself. The hashes need the data, which follows the header: the header is written with placeholders of the
final length, the data is hashed as it streams out, and the header is rewritten in place before the file is
committed (one pass over the tensors: computed tensors are never produced twice). A legacy window that would
start inside the ``ss_*``-only header (more than 1 MiB of ``ss_*`` metadata) depends on the order in which the
reference writer lays out the metadata keys, which is not defined (a hash map): that hash is dropped.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..io.digest import StreamDigest
from ..io.safetensors import encode_header, reference_order, write_safetensors
from ..model import Module, TensorRef, torch_dtype
from .names import is_linear_leaf

#: digests of the data section: recomputed on every kohya write, dropped by every other writer (never carried)
HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")
#: the base model an adapter is for (and how it is used with it): true of a mix whose inputs all agree on them;
#: every other ``ss_*`` training key (learning rates, epochs, datasets, tag frequencies, output name, comment) and
#: the ``modelspec.*`` description keys (title, author, date) describe one training run and are not carried into
#: a mix
BASE_MODEL_KEYS = (
    "ss_base_model_version", "ss_sd_model_name", "ss_sd_model_hash", "ss_new_sd_model_hash", "ss_v2", "ss_clip_skip",
    "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.resolution",
    "modelspec.prediction_type", "ss_network_module",
)  # fmt: skip

LEGACY_AT, LEGACY_LEN = 0x100000, 0x10000
LORA_MODULE, LYCORIS_MODULE = "networks.lora", "lycoris.kohya"
#: LyCORIS algorithms whose files hold plain LoRA factors (its LoCon)
LOCON_ALGOS = ("lora", "locon")
#: ``ss_network_args`` that state ranks or alphas per block: true only while every rank and alpha is as trained
BLOCK_ARGS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
#: LyCORIS arguments that hold only while a module of that kind remains
KIND_ARGS = {
    "dora_wd": "dora",
    "wd_on_output": "dora",
    "use_tucker": "tucker",
    "use_cp": "tucker",
    "factor": "lokr",
    "full_matrix": "lokr",
    "decompose_both": "lokr",
    "unbalanced_factorization": "lokr",
}
#: LyCORIS ``algo`` of each module kind loratools holds
ALGO_OF = {"loha": "loha", "lokr": "lokr", "full": "full", "locon": "locon"}


def stored_alpha(m: Module) -> TensorRef | None:
    """The ``.alpha`` tensor a kohya file holds for ``m``: every module with a rank gets one (alpha = rank where
    the source stored none: the scale 1 that absence meant); rsLoRA's ``alpha / sqrt(r)`` is baked in as
    ``alpha * sqrt(r)``, since consumers apply ``alpha / r``. Stored in the factors' dtype, as kohya does (its
    ``save_weights`` casts the whole state dict), unless that would round it. Modules without a rank (full-matrix
    LoKr, full diffs: scale 1) keep the alpha they had, or none."""
    import torch

    if m.rank is None:
        a = m.alpha
    elif m.alpha is None:
        a = float(m.rank)
    else:
        a = m.alpha * m.rank / m.rank**0.5 if m.rslora else m.alpha
    if a is None:
        return None
    alpha = torch.tensor(a, dtype=torch_dtype(next(iter(m.factors.values())).dtype))
    if not alpha.is_floating_point() or float(alpha) != a:
        alpha = torch.tensor(a, dtype=torch.float32)
    return TensorRef.of(alpha)


# ---- the network description -------------------------------------------------------------------------------


def _kind(m: Module) -> str:
    """``plain`` LoRA, or the LyCORIS kind that needs ``lycoris.kohya``: ``locon`` (Tucker core or DoRA on LoRA
    factors), ``loha``, ``lokr``, ``full``."""
    if m.kind == "lora":
        return "plain" if "mid" not in m.factors and m.magnitude is None else "locon"
    return m.kind


def _features(m: Module) -> set[str]:
    out = {_kind(m)}
    if m.magnitude is not None:
        out.add("dora")
    if any(k in m.factors for k in ("mid", "t1", "t2")):
        out.add("tucker")
    return out


def _group(m: Module) -> str:
    """Which of kohya's two settings a module's rank comes from: ``conv`` (a kernel larger than 1x1:
    ``conv_dim``), ``linear`` (linear and 1x1 conv layers: ``network_dim``), or ``unknown`` (factors stored
    flattened, whose kernel only the base model knows; a known linear projection by name is ``linear``)."""
    if m.flattened:
        return "linear" if is_linear_leaf(m.name) else "unknown"
    return "conv" if math.prod(m.delta_shape()[2:]) > 1 else "linear"


def _number(text: str | None) -> float | None:
    try:
        x = float(text) if text is not None else None
    except ValueError:
        return None
    return x if x is not None and math.isfinite(x) else None


def _same(a: float, b: float | None) -> bool:
    return b is not None and math.isclose(a, b, rel_tol=1e-3)


def _fits(pairs: Iterable[tuple[int, float]], dim: float | None, alpha: float | None) -> bool:
    return all(r == dim and _same(a, alpha) for r, a in pairs)


def _uniform(values: list[Any]) -> Any:
    return values[0] if values and all(v == values[0] for v in values) else None


def _alpha_text(a: float, old: str | None) -> str:
    """An alpha as kohya writes it (``str`` of a float: ``1.0``, ``0.3``: the shortest text that reads back as the
    stored float32 value), or the old text when it says the same."""
    if old is not None and _same(a, _number(old)):
        return old
    packed = struct.pack("<f", a)
    for digits in range(1, 18):
        text = f"{a:.{digits}g}"
        if struct.pack("<f", float(text)) == packed:
            break
    return str(float(text))


def _args(meta: Mapping[str, str]) -> dict[str, str] | None:
    raw = meta.get("ss_network_args")
    if raw is None:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return None  # the file's own word, not readable: it cannot be kept true, so it is dropped
    return {str(k): v for k, v in value.items()} if isinstance(value, dict) else None


def network_metadata(modules: Iterable[Module], metadata: Mapping[str, str]) -> dict[str, str]:
    """``metadata`` with the network keys made true of ``modules`` (as a kohya file stores them):

    * ``ss_network_module``: ``networks.lora`` (or the source's own ``networks.*`` module, such as
      ``networks.lora_flux``) when every module is plain LoRA; ``lycoris.kohya`` when a LyCORIS kind remains (a
      LyCORIS LoCon file of plain factors keeps ``lycoris.kohya``).
    * ``ss_network_dim`` / ``ss_network_alpha`` (linear and 1x1 layers) and ``conv_dim`` / ``conv_alpha`` in
      ``ss_network_args`` (larger kernels): kept when every module still agrees with them; otherwise derived: the
      one rank and alpha, or ``Dynamic`` (as kohya writes) when they differ; conv values that differ are removed
      (kohya's args have no marker for it), and so are per-block ranks. Modules whose kernel is unknown (flattened
      LoHa/LoKr) may agree with either setting; derived, they count with the linear ones.
    * ``ss_network_args``: LyCORIS options (``algo``, ``dora_wd``, ``use_tucker``, LoKr's ``factor`` ...) updated or
      removed as the module kinds change; a LyCORIS network that became plain LoRA keeps only ``conv_dim`` /
      ``conv_alpha``.
    """
    meta = dict(metadata)
    mods = list(modules)
    args = _args(meta)
    readable = args is not None
    args = dict(args or {})
    pairs: dict[str, list[tuple[int, float]]] = {"linear": [], "conv": [], "unknown": []}
    features: set[str] = set()
    for m in mods:
        features |= _features(m)
        stored = stored_alpha(m)
        if m.rank is not None and stored is not None:
            pairs[_group(m)].append((m.rank, stored.item()))
    lin, conv, unk = pairs["linear"], pairs["conv"], pairs["unknown"]

    dim, alpha = _number(meta.get("ss_network_dim")), _number(meta.get("ss_network_alpha"))
    cdim, calpha = _number(str(args.get("conv_dim"))), _number(str(args.get("conv_alpha")))
    agrees = (
        readable
        and _fits(lin, dim, alpha)
        and (not conv or _fits(conv, cdim, calpha))
        and all(_fits([p], dim, alpha) or _fits([p], cdim, calpha) for p in unk)
    )
    if not agrees and (lin or conv or unk):
        net = lin + unk or conv
        r, a = _uniform([p[0] for p in net]), _uniform([p[1] for p in net])
        meta["ss_network_dim"] = str(r) if r is not None else "Dynamic"
        meta["ss_network_alpha"] = _alpha_text(a, meta.get("ss_network_alpha")) if a is not None else "Dynamic"
        for key in BLOCK_ARGS:
            args.pop(key, None)
        cr, ca = _uniform([p[0] for p in conv]), _uniform([p[1] for p in conv])
        if not conv and unk and "conv_dim" in args:  # convs may hide among the flattened modules
            cr, ca = r, a  # what they all share, if they do
        if cr is not None and ca is not None:
            args["conv_dim"] = str(cr) if _number(str(args.get("conv_dim"))) != cr else args["conv_dim"]
            args["conv_alpha"] = _alpha_text(ca, str(args["conv_alpha"]) if "conv_alpha" in args else None)
        elif conv or unk:  # they differ (kohya's args have no "Dynamic"), or cannot be told apart
            args.pop("conv_dim", None)
            args.pop("conv_alpha", None)

    kinds = {k for k in features if k in ALGO_OF}
    source_module = meta.get("ss_network_module")
    algo = args.get("algo")
    if not kinds:  # plain LoRA
        locon = source_module == LYCORIS_MODULE and (algo is None or str(algo).lower() in LOCON_ALGOS)
        if source_module == LYCORIS_MODULE and not locon:  # a LyCORIS network that became LoRA
            args = {k: v for k, v in args.items() if k in ("conv_dim", "conv_alpha")}
            meta["ss_network_module"] = LORA_MODULE
        elif not locon and not (source_module or "").startswith("networks."):
            meta["ss_network_module"] = LORA_MODULE
    else:
        meta["ss_network_module"] = LYCORIS_MODULE
        algo_kinds = {"lora": "locon", "locon": "locon"}.get(str(algo).lower(), str(algo).lower())
        if algo is None or algo_kinds not in kinds:
            if len(kinds) == 1:
                args["algo"] = ALGO_OF[next(iter(kinds))]
            else:
                args.pop("algo", None)
    for key, feature in KIND_ARGS.items():
        if key in args and feature not in features:
            del args[key]
    if features & {"dora"} and kinds and "dora_wd" not in args:
        args["dora_wd"] = "True"
    if args == (_args(metadata) or {}) and readable:
        pass  # unchanged: the source's own text stays
    elif args:
        meta["ss_network_args"] = json.dumps(args)
    else:
        meta.pop("ss_network_args", None)
    return meta


# ---- writing, with the data hashes -------------------------------------------------------------------------


class DataHashes:
    """The :class:`~loratools.io.safetensors.Seal` of a kohya file: sha256 of the whole data section, and of the
    legacy window (``legacy``: its (start, end) in data-section offsets, None when the hash is dropped)."""

    def __init__(self, keys: Iterable[str], legacy: tuple[int, int] | None) -> None:
        self.keys = set(keys)
        self.digest = StreamDigest(legacy)

    def update(self, chunk: bytes | memoryview) -> None:
        self.digest.update(chunk)

    def values(self) -> dict[str, str]:
        digest = self.digest.whole.hexdigest()
        out = {"sshs_model_hash": digest, "modelspec.hash_sha256": "0x" + digest}
        if self.digest.window is not None:
            out["sshs_legacy_hash"] = self.digest.part.hexdigest()[:8]
        return {k: v for k, v in out.items() if k in self.keys}


PLACEHOLDER_LENGTHS = {"sshs_model_hash": 64, "sshs_legacy_hash": 8, "modelspec.hash_sha256": 66}


def legacy_window(
    specs: Sequence[tuple[str, str, Sequence[int]]], metadata: Mapping[str, str]
) -> tuple[int, int] | None:
    """Where kohya's legacy window (file bytes ``0x100000 .. 0x110000`` of the ``ss_*``-only serialisation) lies
    in the data section; None when it starts inside that header, or the header cannot be serialised as the
    reference writer would (text that is not valid Unicode)."""
    ss = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    try:
        head, _ = encode_header(specs, ss, ensure_ascii=False)
    except UnicodeEncodeError:
        return None
    # (``ss`` is never empty here: a kohya write always has the ss_network_* keys; for an empty dict the reference
    # writer would emit "__metadata__":{}, which encode_header leaves out)
    start = LEGACY_AT - len(head)
    return (start, start + LEGACY_LEN) if start >= 0 else None


def write(
    out: str | os.PathLike[str],
    tensors: Mapping[str, TensorRef],
    metadata: Mapping[str, str],
    *,
    spec_hash: bool = False,
    force: bool = False,
) -> None:
    """Write a kohya file: ``tensors`` in the reference order, ``metadata`` without any stale digest, and the
    data hashes (``sshs_model_hash``, ``sshs_legacy_hash``, and with ``spec_hash`` (the source had one)
    ``modelspec.hash_sha256``) computed from the bytes written."""
    meta = {k: v for k, v in metadata.items() if k not in HASH_KEYS}
    keys = ["sshs_model_hash", "sshs_legacy_hash"] + (["modelspec.hash_sha256"] if spec_hash else [])
    specs = reference_order((name, t.dtype, t.shape) for name, t in tensors.items())
    window = legacy_window(specs, meta)
    if window is None:
        keys.remove("sshs_legacy_hash")
    for key in keys:
        meta[key] = "0" * PLACEHOLDER_LENGTHS[key]
    write_safetensors(out, tensors, meta, force=force, order="reference", seal=DataHashes(keys, window))

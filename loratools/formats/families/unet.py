"""The UNet of SD 1.x / 2.x / SDXL: diffusers' ``UNet2DConditionModel`` paths, and the original (SGM / LDM)
``input_blocks`` / ``middle_block`` / ``output_blocks`` numbering of single-file checkpoints, which kohya's SDXL
LoRAs flatten (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``).

The block numbers between the two come from the UNet's config (levels, resnets per level, which levels have
attention), never from the adapter's names: :class:`UNetLayout`. The rules are those of diffusers'
``convert_ldm_unet_checkpoint`` (single-file) and ``_maybe_map_sgm_blocks_to_diffusers`` (kohya SDXL), in
``diffusers/loaders/single_file_utils.py`` and ``lora_conversion_utils.py``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .core import BLOCK, Link, nest, same

_BLOCK = re.compile(BLOCK)

#: a resnet block: SGM ResBlock name -> diffusers ResnetBlock2D name (``update_unet_resnet_ldm_to_diffusers``)
RESNET = [
    Link("in_layers.0", ("norm1",), "norm"),
    Link("in_layers.2", ("conv1",), "conv"),
    Link("emb_layers.1", ("time_emb_proj",), "time embedding"),
    Link("out_layers.0", ("norm2",), "norm"),
    Link("out_layers.3", ("conv2",), "conv"),
    Link("skip_connection", ("conv_shortcut",), "conv"),
]

#: a spatial transformer: named alike in both (``update_unet_attention_ldm_to_diffusers`` only moves the block)
ATTENTION = [
    same("norm", "norm"),
    same("proj_in", "proj in/out"),
    same("proj_out", "proj in/out"),
    *[same(f"transformer_blocks.{{k}}.{a}.{t}", "attention")
      for a in ("attn1", "attn2") for t in ("to_q", "to_k", "to_v", "to_out.0")],
    *[same(f"transformer_blocks.{{k}}.norm{n}", "norm") for n in (1, 2, 3)],
    same("transformer_blocks.{k}.ff.net.0.proj", "ff"),
    same("transformer_blocks.{k}.ff.net.2", "ff"),
]  # fmt: skip

#: modules outside the blocks (``DIFFUSERS_TO_LDM_MAPPING["unet"]``; ``label_emb`` is SDXL's added conditioning)
TOP = [
    Link("input_blocks.0.0", ("conv_in",), "conv"),
    Link("time_embed.0", ("time_embedding.linear_1",), "time embedding"),
    Link("time_embed.2", ("time_embedding.linear_2",), "time embedding"),
    Link("label_emb.0.0", ("add_embedding.linear_1",), "time embedding"),
    Link("label_emb.0.2", ("add_embedding.linear_2",), "time embedding"),
    Link("out.0", ("conv_norm_out",), "norm"),
    Link("out.2", ("conv_out",), "conv"),
]


@dataclass(frozen=True)
class UNetLayout:
    """What numbers the SGM blocks: resnets per down level, and which down levels / up blocks have attention."""

    layers: tuple[int, ...]
    down_attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> UNetLayout:
        """From a diffusers ``UNet2DConditionModel`` config.json (``down_block_types``, ``up_block_types``,
        ``layers_per_block``)."""
        down = list(cfg["down_block_types"])
        up = list(cfg["up_block_types"])
        lpb = cfg.get("layers_per_block", 2)
        layers = tuple(int(n) for n in lpb) if isinstance(lpb, (list, tuple)) else (int(lpb),) * len(down)
        if len(layers) != len(down) or len(up) != len(down) or not all(isinstance(t, str) for t in down + up):
            raise ValueError("down_block_types, up_block_types and layers_per_block do not agree")
        return cls(layers, tuple("CrossAttn" in t for t in down), tuple("CrossAttn" in t for t in up))

    @classmethod
    def from_sgm(cls, modules: Iterable[str]) -> UNetLayout | None:
        """From the SGM module paths of a single-file UNet (``input_blocks.4.1.proj_in``, root removed): a
        downsampler (``input_blocks.N.0.op``) ends a level, ``input_blocks.N.1`` is a resnet's attention, and an
        up block's ``output_blocks.N.1`` is attention unless it is the upsampler (``.1.conv``). None when the
        blocks do not form such a UNet (no guess)."""
        blocks: dict[tuple[str, int], set[str]] = {}
        for name in modules:
            seg = name.split(".")
            if len(seg) >= 3 and seg[0] in ("input_blocks", "output_blocks") and _BLOCK.fullmatch(seg[1]):
                blocks.setdefault((seg[0], int(seg[1])), set()).add(".".join(seg[2:4]))
        ins = sorted(n for kind, n in blocks if kind == "input_blocks" and n > 0)
        if not ins or ins != list(range(1, len(ins) + 1)):
            return None
        layers: list[int] = []
        attention: list[set[bool]] = [set()]
        count = 0
        for n in ins:
            parts = blocks[("input_blocks", n)]
            if "0.op" in parts:
                layers.append(count)
                attention.append(set())
                count = 0
                continue
            count += 1
            attention[-1].add(any(p.startswith("1.") for p in parts))
        layers.append(count)
        if any(len(a) != 1 for a in attention) or not all(layers):
            return None
        outs = sorted(n for kind, n in blocks if kind == "output_blocks")
        if outs != list(range(sum(c + 1 for c in layers))):
            return None
        up, n = [], 0
        for count in reversed(layers):
            parts = blocks[("output_blocks", n)]
            up.append(any(p.startswith("1.") and p != "1.conv" for p in parts))
            n += count + 1
        return cls(tuple(layers), tuple(a.pop() for a in attention), tuple(up))


#: SD 1.x and 2.x (``CrossAttnDownBlock2D`` x3 + ``DownBlock2D``, two resnets per level)
SD_LAYOUT = UNetLayout((2, 2, 2, 2), (True, True, True, False), (False, True, True, True))
#: SDXL (``DownBlock2D`` + ``CrossAttnDownBlock2D`` x2)
SDXL_LAYOUT = UNetLayout((2, 2, 2), (False, True, True), (True, True, False))


def sgm_links(layout: UNetLayout) -> list[Link]:
    """Every module of the UNet: SGM path <-> diffusers path, numbered as ``convert_ldm_unet_checkpoint`` does."""
    links = list(TOP)
    levels = len(layout.layers)
    n = 1
    for level, count in enumerate(layout.layers):
        for j in range(count):
            links += nest((f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{j}"), RESNET)
            if layout.down_attention[level]:
                links += nest((f"input_blocks.{n}.1", f"down_blocks.{level}.attentions.{j}"), ATTENTION)
            n += 1
        if level < levels - 1:
            links.append(Link(f"input_blocks.{n}.0.op", (f"down_blocks.{level}.downsamplers.0.conv",), "conv"))
            n += 1
    links += nest(("middle_block.0", "mid_block.resnets.0"), RESNET)
    links += nest(("middle_block.1", "mid_block.attentions.0"), ATTENTION)
    links += nest(("middle_block.2", "mid_block.resnets.1"), RESNET)
    n = 0
    for u, count in enumerate(reversed(layout.layers)):
        attention = layout.up_attention[u]
        for j in range(count + 1):
            links += nest((f"output_blocks.{n}.0", f"up_blocks.{u}.resnets.{j}"), RESNET)
            if attention:
                links += nest((f"output_blocks.{n}.1", f"up_blocks.{u}.attentions.{j}"), ATTENTION)
            if u < levels - 1 and j == count:
                up = f"output_blocks.{n}.{2 if attention else 1}.conv"
                links.append(Link(up, (f"up_blocks.{u}.upsamplers.0.conv",), "conv"))
            n += 1
    return links


def diffusers_links() -> list[Link]:
    """Every module path of a diffusers UNet, with block numbers as holes: what kohya's SD 1.x / 2.x LoRAs flatten
    (their UNet names are the diffusers paths)."""
    links = [same(t, ln.kind) for ln in TOP for t in ln.diffusers]
    for where in ("down_blocks.{i}", "up_blocks.{i}", "mid_block"):
        links += [same(t, ln.kind) for ln in nest(("", f"{where}.resnets.{{j}}"), RESNET) for t in ln.diffusers]
        links += [same(t, ln.kind) for ln in nest(("", f"{where}.attentions.{{j}}"), ATTENTION) for t in ln.diffusers]
    links.append(same("down_blocks.{i}.downsamplers.{j}.conv", "conv"))
    links.append(same("up_blocks.{i}.upsamplers.{j}.conv", "conv"))
    return links

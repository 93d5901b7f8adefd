"""What an extracted adapter says about itself: its PEFT config (the exact target list, the task type, the base
model's name from its folder's config) and the provenance of its inputs (sha256 of every weights file of both
checkpoints, hashed in a thread beside the extraction)."""

from __future__ import annotations

import hashlib
import re
import threading
from pathlib import Path
from typing import Any

from ..errors import LoratoolsError
from ..io.checkpoint import Checkpoint, read_config
from ..io.digest import file_sha256
from ..model import Adapter, target_kind


def peft_config(
    adapter: Adapter, base: Checkpoint, saves: dict[str, list[str]], lora_bias: bool, src: Any
) -> dict[str, Any]:
    """PEFT config fields the writer does not derive: the rest (``r``, ``lora_alpha``, ``rank_pattern``,
    ``alpha_pattern``, default ``target_modules``) comes from :func:`loratools.formats.peft.make_config`."""
    cfg: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": _task_type(src),
        "base_model_name_or_path": adapter.base_model,
        "bias": "none",
        "lora_dropout": 0.0,
        "inference_mode": True,
        "fan_in_fan_out": False,
        "lora_bias": lora_bias,
        "modules_to_save": sorted(saves) or None,
    }
    targets = _exact_targets(list(adapter.modules), base)
    if targets is not None:
        cfg["target_modules"] = targets
    return cfg


def _exact_targets(modules: list[str], base: Checkpoint) -> str | None:
    """PEFT targets every module whose name ends with a ``target_modules`` entry. When the adapter covers only
    some of the base's modules of a kind (``q_proj`` changed in some layers only, or ``to_out.0``), a list of
    kinds would put zero LoRAs on the rest, or on unrelated modules: give a regex of the exact paths instead."""
    kinds = {target_kind(n) for n in modules}
    if any(k.rpartition(".")[2].isdigit() for k in kinds):
        return _regex(modules)
    have, lasts = set(modules), {k.rpartition(".")[2] for k in kinds}
    for name, t in base.tensors.items():
        module, _, param = name.rpartition(".")
        matrix = len(t.shape) >= 2
        if param == "weight" and matrix and module not in have and module.rpartition(".")[2] in lasts:
            return _regex(modules)
    return None


def _regex(modules: list[str]) -> str:
    return "(" + "|".join(re.escape(m) for m in sorted(modules)) + ")"


def _folder_config(src: Any) -> dict[str, Any]:
    """The base folder's config.json (or a pipeline's model_index.json); only names and task types come from it:
    one that cannot be read says nothing."""
    p = Path(src)
    if not p.is_dir():
        return {}
    for name in ("config.json", "model_index.json"):
        try:
            cfg = read_config(p, name)
        except LoratoolsError:
            cfg = None
        if cfg:
            return cfg
    return {}


def base_name(src: Any) -> str:
    """``_name_or_path`` from the base folder's config (a Hub id when the model came from the Hub), else the
    path as given."""
    name = _folder_config(src).get("_name_or_path")
    return name if isinstance(name, str) and name else str(src)


def _task_type(src: Any) -> str | None:
    archs = _folder_config(src).get("architectures") or []
    return "CAUSAL_LM" if any(str(a).endswith("ForCausalLM") for a in archs) else None


# ---- provenance: sha256 of every weights file, in a thread beside the extraction --------------------------


class Hasher:
    """sha256 of each file, computed in a background thread (hashlib and file reads release the GIL)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.digests: dict[Path, str] = {}
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for p in self.paths:
                self.digests[p] = file_sha256(p, stop=self.stop)
        except BaseException as e:  # surfaced in result()
            self.error = e

    def result(self) -> dict[Path, str]:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.digests

    def cancel(self) -> None:
        """Stop between two reads and wait for the thread (milliseconds): no thread outlives a failed run."""
        self.stop.set()
        self.thread.join()


def weight_files(ckpt: Checkpoint) -> list[Path]:
    return [wf.path for wf in ckpt.files]


def input_record(source: Any, ckpt: Checkpoint, digests: dict[Path, str]) -> dict[str, Any]:
    """One input of the provenance record. ``sha256`` is the file's own for a single file; for a folder, the
    sha256 of its ``sha256sum``-style listing (``<sha256>  <file>`` lines), each file's own under ``files``."""
    listed = [{"file": str(wf.rel), "sha256": digests[wf.path]} for wf in ckpt.files]
    if ckpt.single_file:
        digest = listed[0]["sha256"]
    else:
        digest = hashlib.sha256("".join(f"{f['sha256']}  {f['file']}\n" for f in listed).encode()).hexdigest()
    return {"source": str(source), "format": "checkpoint", "sha256": digest, "files": listed}

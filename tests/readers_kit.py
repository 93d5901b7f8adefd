"""Builders and checks shared by the readers' hostile batteries (headers, configs, regexes, pickles, indexes,
file types): files made from code, and ``validate`` checked the way ``hostile.run`` checks the other commands
(validate reports findings on stdout and exits 1 without an ``Error:`` line)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import hostile

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"

#: a small valid kohya LoRA: one module, rank 2, 4 -> 4 (F32), alpha 1
DOWN = "lora_unet_a.lora_down.weight"
UP = "lora_unet_a.lora_up.weight"
ALPHA = "lora_unet_a.alpha"


def entries() -> dict[str, Any]:
    """The header of the small kohya LoRA (data: 32 + 32 + 4 bytes)."""
    return {
        DOWN: {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]},
        UP: {"dtype": "F32", "shape": [4, 2], "data_offsets": [32, 64]},
        ALPHA: {"dtype": "F32", "shape": [], "data_offsets": [64, 68]},
    }


def data(n: int = 68) -> bytes:
    """``n`` bytes of small float32 values (1.0 repeated), so a valid file holds finite, non-zero factors."""
    one = struct.pack("<f", 1.0)
    return (one * (n // 4 + 1))[:n]


def st_bytes(header: Any, payload: bytes | None = None, *, length: int | None = None) -> bytes:
    """A safetensors file: 8-byte length, the header (a JSON value, or raw bytes as given), the data."""
    raw = header if isinstance(header, bytes) else json.dumps(header, allow_nan=True).encode()
    n = len(raw) if length is None else length
    return struct.pack("<Q", n) + raw + (data() if payload is None else payload)


def put(path: Path, content: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


def peft_folder(dst: Path, config: Any = None, *, raw: bytes | str | None = None, src: str = "peft_llama") -> Path:
    """A copy of a PEFT fixture with its ``adapter_config.json`` replaced: ``config`` (a dict merged into the
    fixture's, a non-dict written as it is) or ``raw`` (the file's exact bytes)."""
    shutil.copytree(FIXTURES / src, dst)
    cfg_path = dst / "adapter_config.json"
    if raw is not None:
        put(cfg_path, raw)
    elif config is not None:
        if isinstance(config, dict):
            cfg = json.loads(cfg_path.read_text())
            cfg.update(config)
        else:
            cfg = config
        cfg_path.write_text(json.dumps(cfg, allow_nan=True))
    return dst


def reference_refuses(path: Path) -> bool:
    """Whether the reference ``safetensors`` reader refuses the file (header, or any tensor's data)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                f.get_tensor(k)
    except Exception:  # the reference raises several types; any refusal counts
        return True
    return False


def validate(
    args: list[str | os.PathLike[str]],
    *,
    inputs: Iterable[str | os.PathLike[str]] = (),
    ok: bool | None = False,
    codes: Iterable[str] = (),
    says: str | None = None,
    seconds: float = hostile.SECONDS,
) -> dict[str, Any]:
    """``loratools validate --json ARGS``: no traceback, exit 0 exactly when sound (``ok``; None: either), a
    finding with one of ``codes`` whose message holds ``says``, inputs untouched, bounded time."""
    from click.testing import CliRunner

    from loratools.cli import cli

    inputs = [Path(p) for p in inputs]
    before = hostile.snapshot(inputs)
    t0 = time.perf_counter()
    r = CliRunner().invoke(cli, ["validate", "--json", *map(str, args)])
    took = time.perf_counter() - t0
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        tb = "".join(traceback.format_exception(r.exception))
        raise AssertionError(f"validate {args} raised:\n{tb}")
    assert "Traceback" not in r.stderr, r.stderr
    if r.exit_code not in (0, 1):  # "could not read" may become 2 (issue 12): then there is an Error line
        hostile.check_error_text(r.exit_code, r.stderr, says)
        assert hostile.snapshot(inputs) == before
        return {}
    rep = json.loads(r.stdout)
    assert r.exit_code == (0 if rep["ok"] else 1), (r.exit_code, rep)
    if ok is not None:
        assert rep["ok"] is ok, json.dumps(rep, indent=1)
    errors = [f for f in rep["findings"] if f["severity"] == "error"]
    if codes:
        want = set(codes)
        assert any(f["code"] in want for f in errors), f"no {sorted(want)} finding in {json.dumps(rep, indent=1)}"
    if says:
        assert any(says.lower() in f["message"].lower() for f in rep["findings"]), (says, rep["findings"])
    assert hostile.snapshot(inputs) == before, f"an input changed: validate {args}"
    assert took < seconds, f"took {took:.1f} s (limit {seconds} s)"
    return dict(rep)

"""Hostile base checkpoints: sharded folders whose ``model.safetensors.index.json`` lies, and the shards it names;
folders that are not one model (several indexes, a pipeline component without weights, pickle weights only).

Read by ``validate --base``, ``diff``, ``merge``, ``extract`` and ``convert --base``, all through one reader
(io.checkpoint.read_checkpoint). Every
case is refused with an error naming the problem (``validate``: a finding), nothing is written, nothing hangs (a
shard that is a FIFO is never opened).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import hostile
import pytest
import readers_kit as kit
import torch
from readers_kit import FIXTURES, put

from loratools.errors import FileFormatError
from loratools.io import jsonfile
from loratools.io.checkpoint import read_checkpoint
from loratools.io.safetensors import write_safetensors

INDEX = "model.safetensors.index.json"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
ADAPTER = FIXTURES / "peft_llama"


def weights() -> dict[str, dict[str, torch.Tensor]]:
    """The base the PEFT fixture targets, split in two shards by layer."""
    g = torch.Generator().manual_seed(0)
    shards: dict[str, dict[str, torch.Tensor]] = {s: {} for s in SHARDS}
    for layer in range(2):
        for proj, out in (("q_proj", 32), ("k_proj", 16), ("v_proj", 16), ("o_proj", 32)):
            shards[SHARDS[layer]][f"model.layers.{layer}.self_attn.{proj}.weight"] = torch.randn(out, 32, generator=g)
    return shards


def weight_map() -> dict[str, str]:
    return {name: shard for shard, ts in weights().items() for name in ts}


def base(tmp: Path, index: object = None, *, raw: str | bytes | None = None) -> Path:
    """A sharded base folder; ``index`` replaces the index's JSON (``raw``: its exact bytes)."""
    d = tmp / "base"
    d.mkdir()
    for shard, ts in weights().items():
        write_safetensors(d / shard, ts)
    if raw is not None:
        put(d / INDEX, raw)
    else:
        doc = {"metadata": {"total_size": 0}, "weight_map": weight_map()} if index is None else index
        put(d / INDEX, json.dumps(doc))
    (d / "config.json").write_text("{}")
    return d


@dataclass(frozen=True)
class Case:
    build: Callable[[Path], Path]
    says: str


CASES: dict[str, Case] = {}


def case(name: str, says: str, build: Callable[[Path], Path]) -> None:
    assert name not in CASES, name
    CASES[name] = Case(build, says)


def index_case(name: str, says: str, index: object) -> None:
    case(name, says, lambda tmp: base(tmp, index))


def raw_case(name: str, says: str, raw: str | bytes) -> None:
    case(name, says, lambda tmp: base(tmp, raw=raw))


# ---- weight_map of the wrong type ------------------------------------------------------------------------------------
for value, tag in [
    (list(weight_map()), "list"), (None, "null"), ("model-00001-of-00002.safetensors", "string"), (3, "int"),
    (True, "true"),
]:  # fmt: skip
    index_case(f"weight_map-{tag}", "weight_map must be an object", {"weight_map": value})
index_case("weight_map-missing", "without a weight_map", {"metadata": {}})
for value, tag in [(1, "int"), (None, "null"), ([SHARDS[0]], "list"), ({"f": SHARDS[0]}, "object"), (True, "bool")]:
    index_case(f"weight_map-value-{tag}", "not a shard file name", {"weight_map": {**weight_map(), "x.weight": value}})

# ---- shard names that leave the folder --------------------------------------------------------------------------------
for name, tag in [
    ("../outside.safetensors", "dotdot"), ("/etc/passwd", "absolute"), ("sub\\..\\..\\x.safetensors", "backslash"),
    ("", "empty"), ("sub/../../x.safetensors", "nested-dotdot"), ("x\u0000y.safetensors", "nul"), ("..", "dotdot-only"),
]:  # fmt: skip
    index_case(f"shard-name-{tag}", "outside its folder", {"weight_map": {**weight_map(), "x.weight": name}})

# ---- shards that are not there, or not files ------------------------------------------------------------------------------


def mutated(mutate: Callable[[Path], None]) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        d = base(tmp)
        mutate(d)
        return d

    return build


def _replace(shard: str, make: Callable[[Path], None]) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        (d / shard).unlink()
        make(d / shard)

    return mutate


case("shard-missing", "missing", mutated(lambda d: (d / SHARDS[1]).unlink()))
case("shard-is-a-folder", "is a folder", mutated(_replace(SHARDS[1], lambda p: p.mkdir())))
case("shard-is-a-fifo", "not a regular file", mutated(_replace(SHARDS[1], lambda p: os.mkfifo(p))))
case("shard-is-dev-zero", "not a regular file", mutated(_replace(SHARDS[1], lambda p: p.symlink_to("/dev/zero"))))
case("shard-broken-link", "missing", mutated(_replace(SHARDS[1], lambda p: p.symlink_to(p.parent / "nowhere"))))
case("shard-is-json", "a JSON file", mutated(_replace(SHARDS[1], lambda p: p.write_text('{"weight_map": {}}'))))
case("shard-is-empty", "empty file", mutated(_replace(SHARDS[1], lambda p: p.write_bytes(b""))))
case(
    "shard-truncated",
    "data section has",
    mutated(lambda d: os.truncate(d / SHARDS[1], (d / SHARDS[1]).stat().st_size - 8)),
)
case(
    "shard-duplicate-keys",
    "duplicate key",
    mutated(_replace(SHARDS[1], lambda p: p.write_bytes(kit.st_bytes(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4)))),
)  # fmt: skip


def _append(d: Path) -> None:
    with open(d / SHARDS[1], "ab") as fh:
        fh.write(b"\0" * 8)


case("shard-trailing-bytes", "after the last tensor", mutated(_append))

# ---- the index and its shards disagree ----------------------------------------------------------------------------------
index_case("tensor-not-in-its-shard", "does not hold it", {"weight_map": {**weight_map(), "model.layers.0.self_attn.q_proj.weight": SHARDS[1]}})  # fmt: skip


def _dup_tensor(d: Path) -> None:
    ts = weights()
    twice = {**ts[SHARDS[1]], "model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 32)}
    write_safetensors(d / SHARDS[1], twice, force=True)


case("tensor-in-two-shards", "in two shards", mutated(_dup_tensor))

# ---- the index document itself ---------------------------------------------------------------------------------------------
raw_case("index-depth", "deeper", '{"weight_map": {}, "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
raw_case("index-depth-in-weight_map", "deeper", '{"weight_map": {"a": ' + "[" * 70 + "]" * 70 + "}}")
raw_case(
    "index-duplicate-weight_map", "duplicate key", '{"weight_map": {}, "weight_map": ' + json.dumps(weight_map()) + "}"
)
raw_case("index-duplicate-tensor", "duplicate key", '{"weight_map": {"a": "x", "a": "y"}}')
raw_case("index-is-list", "must be a JSON object", "[1, 2]")
raw_case("index-is-string", "must be a JSON object", '"weights"')
raw_case("index-empty", "not valid JSON", "")
raw_case("index-bom", "byte-order mark", "\ufeff" + json.dumps({"weight_map": weight_map()}))
raw_case("index-not-utf8", "not UTF-8", b'{"weight_map": {"\xff": "x"}}')
raw_case("index-nan", "NaN", '{"metadata": {"total_size": NaN}, "weight_map": ' + json.dumps(weight_map()) + "}")
index_case("index-metadata-list", "metadata must be an object", {"metadata": [1], "weight_map": weight_map()})
index_case("index-metadata-string", "metadata must be an object", {"metadata": "big", "weight_map": weight_map()})


def _beyond_limit(d: Path) -> None:
    os.truncate(d / INDEX, jsonfile.MAX_BYTES + 1)


case("index-beyond-size-limit", "beyond the", mutated(_beyond_limit))
case("index-1GB", "beyond the", mutated(lambda d: os.truncate(d / INDEX, 1 << 30)))
case("two-index-files", "several safetensors index files", mutated(lambda d: shutil.copy(d / INDEX, d / ("other" + INDEX[5:]))))  # fmt: skip


def _index_is_folder(d: Path) -> None:
    (d / INDEX).unlink()
    (d / INDEX).mkdir()


case("index-is-a-folder", "is a folder", mutated(_index_is_folder))


# ---- what the one reader takes: the strictest rule of the two readers it replaced ------------------------------------


def _named_among_two(tmp: Path) -> Path:
    d = base(tmp)
    shutil.copy(d / INDEX, d / ("other" + INDEX[5:]))
    return d / INDEX  # naming one of them does not make the folder one model: the other's shards would be copied


def _unsharded(d: Path) -> dict[str, torch.Tensor]:
    """The sharded base's tensors, its index and shards removed."""
    (d / INDEX).unlink()
    for shard in SHARDS:
        (d / shard).unlink()
    return {k: v for ts in weights().values() for k, v in ts.items()}


def _weights_file_is_a_folder(d: Path) -> None:
    ts = _unsharded(d)
    (d / "model.safetensors").mkdir()
    write_safetensors(d / "model.safetensors" / "model.safetensors", ts)


def _only_pickles(d: Path) -> None:
    ts = _unsharded(d)
    torch.save(ts, d / "pytorch_model.bin")


def _no_weights(d: Path) -> None:
    _unsharded(d)


def _pipeline(tmp: Path, text_encoder: Callable[[Path], None]) -> Path:
    """A pipeline folder: the base as its ``unet``, and a ``text_encoder`` folder made by ``text_encoder``."""
    d = tmp / "pipe"
    d.mkdir()
    (d / "model_index.json").write_text("{}")
    base(tmp).rename(d / "unet")
    (d / "text_encoder").mkdir()
    (d / "text_encoder" / "config.json").write_text("{}")
    text_encoder(d / "text_encoder")
    return d


case("two-index-files-one-named", "several safetensors index files", _named_among_two)
index_case("weight_map-empty", "names no tensors", {"metadata": {}, "weight_map": {}})
case("weights-file-is-a-folder", "is a folder", mutated(_weights_file_is_a_folder))
case("only-pickle-weights", "only pickle weights", mutated(_only_pickles))
case("no-weights", "no .safetensors weights found", mutated(_no_weights))
case("component-without-weights", "no .safetensors weights found", lambda tmp: _pipeline(tmp, lambda d: None))
case(
    "component-only-pickle-weights",
    "only pickle weights",
    lambda tmp: _pipeline(tmp, lambda d: torch.save({"w": torch.zeros(2)}, d / "pytorch_model.bin")),
)

SLOW = {"index-1GB"}  # hashing a 1 GB sparse input before and after each run


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(CASES)])
def test_hostile_index(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jsonfile, "MAX_BYTES", 1 << 20)  # the size limit's cases stay small
    c = CASES[name]
    b = c.build(tmp_path)
    inputs = [b, ADAPTER]
    kit.validate([ADAPTER, "--base", b], inputs=inputs, ok=False, codes={"unreadable"}, says=c.says)
    hostile.run(["diff", b, b], inputs=[b], code=(1, 2), says=c.says)
    out = tmp_path / "merged"
    hostile.run(["merge", b, ADAPTER, "-o", out], inputs=inputs, code=1, out=out, says=c.says)
    out = tmp_path / "extracted"
    hostile.run(["extract", b, b, "--rank", "1", "-o", out], inputs=[b], code=1, out=out, says=c.says)
    out = tmp_path / "converted.safetensors"
    hostile.run(["convert", ADAPTER, "--to", "kohya", "--base", b, "-o", out], inputs=inputs, code=1, out=out,
                says=c.says)  # fmt: skip


def test_sound_base_is_read(tmp_path: Path) -> None:
    """The control: the same base, honest, is read, validated against and merged into."""
    b = base(tmp_path)
    assert len(read_checkpoint(b).tensors) == 8
    kit.validate([ADAPTER, "--base", b], inputs=[b, ADAPTER], ok=True)
    hostile.run(["diff", b, b], inputs=[b], code=0)
    hostile.run(["merge", b, ADAPTER, "-o", tmp_path / "merged"], inputs=[b, ADAPTER], code=0)
    assert (tmp_path / "merged" / INDEX).is_file()
    hostile.run(["extract", b, b, "--rank", "1", "-o", tmp_path / "x"], inputs=[b], code=1, says="no changed weights")
    out = tmp_path / "converted.safetensors"
    hostile.run(["convert", ADAPTER, "--to", "kohya", "--base", b, "-o", out], inputs=[b, ADAPTER], code=0, out=out)


def test_index_named_directly_is_its_folder(tmp_path: Path) -> None:
    """The index file stands for its folder: the same tensors, the same files, the same output."""
    b = base(tmp_path)
    whole, named = read_checkpoint(b), read_checkpoint(b / INDEX)
    assert named.root == b and [i.rel for i in named.indexes] == [Path(INDEX)]
    assert list(named.tensors) == list(whole.tensors) and [f.rel for f in named.files] == [Path(s) for s in SHARDS]
    hostile.run(["merge", b / INDEX, ADAPTER, "-o", tmp_path / "merged"], inputs=[b, ADAPTER], code=0)
    assert sorted(os.listdir(tmp_path / "merged")) == sorted(os.listdir(b))


def test_index_metadata_null_is_merged(tmp_path: Path) -> None:
    """``"metadata": null`` is an index without metadata: the output's index gets its total size."""
    b = base(tmp_path, {"metadata": None, "weight_map": weight_map()})
    hostile.run(["merge", b, ADAPTER, "-o", tmp_path / "merged"], inputs=[b, ADAPTER], code=0)
    index = json.loads((tmp_path / "merged" / INDEX).read_text())
    shards = sum((tmp_path / "merged" / s).stat().st_size for s in SHARDS)
    assert index["weight_map"] == weight_map() and 0 < index["metadata"]["total_size"] < shards


def test_a_pipeline_is_read_by_component(tmp_path: Path) -> None:
    """The control for the pipeline cases: components with weights are read, their tensors prefixed."""
    d = _pipeline(tmp_path, lambda te: write_safetensors(te / "model.safetensors", {"w.weight": torch.zeros(2, 2)}))
    ckpt = read_checkpoint(d)
    assert [f.prefix for f in ckpt.files] == ["unet.", "unet.", "text_encoder."]
    assert "text_encoder.w.weight" in ckpt.tensors and len(ckpt.tensors) == 9
    assert ckpt.tensors["text_encoder.w.weight"].file == d / "text_encoder" / "model.safetensors"


def test_a_special_file_as_the_base_is_refused(tmp_path: Path) -> None:
    """A FIFO named as the checkpoint is refused by what it is, never opened (it would block)."""
    fifo = tmp_path / "base.safetensors"
    os.mkfifo(fifo)
    hostile.call(read_checkpoint, fifo, raises=FileFormatError, says="not a regular file or folder")


def test_library_raises_one_line(tmp_path: Path) -> None:
    b = CASES["weight_map-list"].build(tmp_path)
    hostile.call(read_checkpoint, b, raises=FileFormatError, inputs=[b], says="weight_map must be an object")
    hostile.call(read_checkpoint, b / INDEX, raises=FileFormatError, inputs=[b], says="weight_map must be an object")


def test_counts() -> None:
    assert len(CASES) >= 47

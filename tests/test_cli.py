"""The CLI as a user meets it: JSON keys, tables, and bad input that never shows a traceback."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import FIXTURES, ROOT, run_cli

from loratools.cli import cli


def run(*args: str) -> tuple[int, str, str]:
    return run_cli(*args)


def test_inspect_json_keys(adapter_fixture: tuple[Path, str]) -> None:
    path, fmt = adapter_fixture
    code, out, _ = run("inspect", str(path), "--json")
    assert code == 0
    data = json.loads(out)
    assert data["format"] == fmt
    assert {"format", "base_model", "num_params", "modules", "size_on_disk", "dtypes"} <= data.keys()
    assert data["num_params"] > 0 and data["num_modules"] == len(data["modules"])
    for m in data["modules"]:
        assert {"name", "type", "rank", "alpha", "scale", "shape", "dtype", "norm"} <= m.keys()
        assert m["norm"] > 0


def test_inspect_peft_facts() -> None:
    data = json.loads(run("inspect", str(FIXTURES / "peft_llama_patterns"), "--json")[1])
    assert data["base_model"] == "tiny-llama-from-config"
    mods = {m["name"]: m for m in data["modules"]}
    k = mods["model.layers.0.self_attn.k_proj"]
    assert (k["rank"], k["alpha"], k["shape"]) == (2, 16, [16, 32])
    assert k["scale"] == pytest.approx(16 / 2**0.5)  # rsLoRA
    v = mods["model.layers.0.self_attn.v_proj"]
    assert (v["rank"], v["alpha"]) == (8, 4)
    assert mods["model.layers.1.self_attn.q_proj"]["rank"] == 4
    assert data["target_modules"]["q_proj"] == 2


def test_inspect_types_and_extras() -> None:
    dora = json.loads(run("inspect", str(FIXTURES / "peft_llama_dora"), "--json")[1])
    assert {m["type"] for m in dora["modules"]} == {"dora"}
    embed = json.loads(run("inspect", str(FIXTURES / "peft_llama_embed"), "--json")[1])
    assert {(e["name"], e["role"]) for e in embed["extras"]} == {
        ("lm_head.weight", "modules_to_save"),
        ("model.embed_tokens.base_layer.weight", "base_layer"),
    }
    lokr = json.loads(run("inspect", str(FIXTURES / "lycoris_lokr_full.safetensors"), "--json")[1])
    assert {m["type"] for m in lokr["modules"]} == {"lokr"} and all(m["scale"] == 1 for m in lokr["modules"])
    assert lokr["metadata"]["ss_network_args"]


def test_inspect_table_and_fast() -> None:
    code, out, _ = run("inspect", str(FIXTURES / "peft_llama"))
    # module names print as a tree: each block (`model.layers.1.`) once, its modules below it
    assert code == 0 and "tiny-llama-from-config" in out
    assert re.search(r"^ *model\.layers\.1\.\s*$(\n.*){0,3}\n +self_attn\.o_proj ", out, re.M), out
    fast = json.loads(run("inspect", str(FIXTURES / "peft_llama"), "--fast", "--json")[1])
    assert all(m["norm"] is None for m in fast["modules"])


def test_validate_json_and_exit_codes(tmp_path: Path) -> None:
    code, out, _ = run("validate", str(FIXTURES / "peft_llama"), "--json")
    assert code == 0 and json.loads(out)["ok"] is True
    bad = tmp_path / "bad"
    shutil.copytree(FIXTURES / "peft_llama", bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 0
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    code, out, _ = run("validate", str(bad), "--json")
    data = json.loads(out)
    assert code == 1 and data["ok"] is False and data["errors"] == 8
    code, out, _ = run("validate", str(bad))
    assert code == 1 and "alpha is 0" in out and "FAILED" in out


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, str, int]]:
    """name -> (path, text the Error line must contain, validate's exit code: 1 a broken adapter, which is a
    finding; 2 nothing validate can judge: not an adapter, not readable as weights at all)."""
    cases: dict[str, tuple[Path, str, int]] = {}

    def put(name: str, data: bytes, fname: str = "x.safetensors") -> Path:
        d = tmp / name
        d.mkdir()
        (d / fname).write_bytes(data)
        return d / fname

    good = (FIXTURES / "peft_llama" / "adapter_model.safetensors").read_bytes()
    cases["empty file"] = (put("empty", b""), "too short", 1)
    cases["garbage"] = (put("garbage", os.urandom(64)), "header length", 1)
    cases["truncated"] = (put("truncated", good[: len(good) // 2]), "truncated", 1)
    cases["text"] = (put("text", b"hello world, not tensors"), "header", 1)
    cases["pickle garbage"] = (put("pickle", b"\x80\x04garbage", "a.bin"), "pickle", 1)
    cases["zip not torch"] = (put("zip", b"PK\x03\x04" + b"\0" * 40, "a.pt"), "pickle", 1)
    d = tmp / "nothing"
    d.mkdir()
    cases["empty folder"] = (d, "no adapter found", 2)
    d = tmp / "badcfg"
    shutil.copytree(FIXTURES / "peft_llama", d)
    (d / "adapter_config.json").write_text("{not json")
    cases["bad config"] = (d, "not valid JSON", 1)
    d = tmp / "noweights"
    d.mkdir()
    shutil.copy(FIXTURES / "peft_llama" / "adapter_config.json", d)
    cases["config without weights"] = (d, "no adapter_model", 1)
    import torch

    from loratools.io.safetensors import write_safetensors

    p = tmp / "base.safetensors"
    write_safetensors(p, {"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2)})
    cases["not an adapter"] = (p, "not a LoRA adapter", 2)
    return cases


def test_bad_input_gives_one_error_line_and_exit_1(tmp_path: Path) -> None:
    """inspect: exit 1 and one Error line. validate: a broken adapter is a finding (exit 1, FAILED on stdout,
    valid JSON with --json); what it cannot judge is exit 2 with one Error line and nothing on stdout."""
    for name, (path, text, validate_code) in _bad_inputs(tmp_path).items():
        for cmd in (["inspect"], ["inspect", "--fast"], ["validate"], ["validate", "--json"]):
            r = CliRunner().invoke(cli, [*cmd, str(path)])
            assert not (r.exception and not isinstance(r.exception, SystemExit)), (name, cmd, r.exception)
            want = validate_code if cmd[0] == "validate" else 1
            assert r.exit_code == want, (name, cmd, r.output)
            if want == 2 or cmd[0] == "inspect":
                lines = r.stderr.strip().splitlines()
                assert lines[0].startswith("Error: ") and text in r.stderr, (name, r.stderr)
                assert "Traceback" not in r.output and len([x for x in lines if x.startswith("Error")]) == 1
                assert r.stdout == "", (name, cmd, r.stdout)
            elif "--json" in cmd:
                data = json.loads(r.stdout)
                assert data["ok"] is False and text.lower() in json.dumps(data).lower(), (name, data)
            else:
                assert "FAILED" in r.stdout and text.lower() in r.stdout.lower(), (name, r.stdout)


def test_usage_errors_exit_2() -> None:
    r = CliRunner().invoke(cli, ["inspect"])
    assert r.exit_code == 2
    r = CliRunner().invoke(cli, ["inspect", str(FIXTURES / "peft_llama"), "--format", "gguf"])
    assert r.exit_code == 2


def test_wrong_forced_format_is_an_error() -> None:
    code, _, err = run("inspect", str(FIXTURES / "kohya_sd" / "lora.safetensors"), "--format", "diffusers")
    assert code == 1 and "not understood as diffusers" in err and "Hint:" in err


def test_every_command_help_has_an_example() -> None:
    for name in cli.commands:
        r = CliRunner().invoke(cli, [name, "--help"])
        assert r.exit_code == 0 and "Example:" in r.output, name
        assert "loratools " + name in r.output


def _imports_torch(*args: str) -> bool:
    code = (
        "import sys\nfrom loratools.cli import main\nsys.argv = ['loratools', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    )
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, check=True)
    return r.stdout.strip().splitlines()[-1] == "TORCH"


def test_header_only_paths_do_not_import_torch() -> None:
    assert not _imports_torch("--help")
    assert not _imports_torch("inspect", "--fast", "--json", str(FIXTURES / "kohya_sd" / "lora.safetensors"))
    assert not _imports_torch("validate", "--fast", str(FIXTURES / "peft_llama_patterns"))
    assert _imports_torch("inspect", "--json", str(FIXTURES / "peft_llama"))  # norms need the data


def test_merge_help_and_argument_checks_do_not_import_torch(tmp_path: Path) -> None:
    """Issue 18: merge's usage errors come before the torch import (a second and more of start-up)."""
    import torch

    from loratools.io.safetensors import write_safetensors

    base = tmp_path / "base.safetensors"
    write_safetensors(base, {"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2)})
    adapter = str(FIXTURES / "peft_llama")
    assert not _imports_torch("merge", "--help")
    assert not _imports_torch("merge", str(tmp_path / "missing"), adapter, "-o", str(tmp_path / "o.safetensors"))
    assert not _imports_torch("merge", str(base), adapter, "-o", str(base))  # the output is an input
    assert not _imports_torch("merge", str(base), adapter, "-o", str(tmp_path / "o.safetensors"), "--report", "r.txt")
    assert not _imports_torch("merge", str(base), adapter, "-o", str(tmp_path / ".safetensors"))  # a suffix, no name
    assert not _imports_torch("merge", str(base), adapter, "-o", str(tmp_path / "o.safetensors"), "--device", "tpu")


def test_the_program_leaves_fast_after_a_success_with_everything_flushed(tmp_path: Path) -> None:
    """Issue 18: after a success `loratools` skips torch's teardown (os._exit), having flushed stdout; a failure
    exits the ordinary way, with its message and code."""
    run = [sys.executable, "-m", "loratools"]
    r = subprocess.run([*run, "inspect", "--json", str(FIXTURES / "peft_llama")], capture_output=True, text=True,
                       cwd=ROOT, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["modules"], "the whole document reached stdout"
    out = tmp_path / "small"
    r = subprocess.run([*run, "resize", str(FIXTURES / "peft_llama"), "--rank", "2", "-o", str(out), "--json"],
                       capture_output=True, text=True, cwd=ROOT, check=False)  # fmt: skip
    assert r.returncode == 0 and json.loads(r.stdout), r.stderr
    assert (out / "adapter_model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp left"
    r = subprocess.run([*run, "inspect", "--json", str(tmp_path / "missing")], capture_output=True, text=True,
                       cwd=ROOT, check=False)  # fmt: skip
    assert r.returncode == 1 and r.stdout == "" and "Error:" in r.stderr


# ---- diff and validate: 0 yes, 1 no, 2 no answer (as diff(1) and cmp) ----------------------------------------


@pytest.fixture(scope="module")
def answers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Inputs for every answer: a twin of peft_llama with one changed tensor, a truncated copy, one with alpha 0,
    a base checkpoint (no adapter), an empty folder."""
    import torch

    from loratools.io.safetensors import write_safetensors

    tmp = tmp_path_factory.mktemp("answers")
    weights = "adapter_model.safetensors"
    changed = tmp / "changed"
    shutil.copytree(FIXTURES / "peft_llama", changed)
    raw = bytearray((changed / weights).read_bytes())
    raw[-4:] = b"\x00\x00\x80\x3f"  # the last float of the data section becomes 1.0
    (changed / weights).write_bytes(bytes(raw))
    truncated = tmp / "truncated"
    shutil.copytree(FIXTURES / "peft_llama", truncated)
    (truncated / weights).write_bytes(raw[: len(raw) - 100])
    alpha0 = tmp / "alpha0"
    shutil.copytree(FIXTURES / "peft_llama", alpha0)
    cfg = json.loads((alpha0 / "adapter_config.json").read_text())
    (alpha0 / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 0}))
    base = tmp / "base.safetensors"
    write_safetensors(base, {"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2)})
    (tmp / "empty").mkdir()
    return {"changed": changed, "truncated": truncated, "alpha0": alpha0, "base": base, "empty": tmp / "empty"}


A_ = str(FIXTURES / "peft_llama")
#: id -> (command line with {name} placeholders for the answers fixture, exit code, words on stderr for 2)
ANSWER_CASES: dict[str, tuple[list[str], int, str]] = {
    "diff-same": (["diff", A_, str(FIXTURES / "peft_llama_bin")], 0, ""),
    "diff-same-infinite-tolerance": (["diff", A_, A_, "--atol", "inf"], 0, ""),
    "diff-differs": (["diff", A_, "{changed}"], 1, ""),
    "diff-differs-tensors": (["diff", A_, "{changed}", "--mode", "tensors"], 1, ""),
    "diff-missing": (["diff", A_, "{empty}/nope"], 2, "no such file or folder"),
    "diff-truncated": (["diff", A_, "{truncated}"], 2, "truncated"),
    "diff-deltas-of-a-checkpoint": (["diff", A_, "{base}", "--mode", "deltas"], 2, "not a LoRA adapter"),
    "diff-readme": (["diff", A_, str(FIXTURES / "README.md")], 2, "README.md"),
    "diff-hub-error": (["diff", A_, "nobody/no-such-adapter"], 2, "no Hub repo nobody/no-such-adapter in the cache"),
    "validate-sound": (["validate", A_], 0, ""),
    "validate-findings": (["validate", "{alpha0}"], 1, ""),
    "validate-damaged-is-a-finding": (["validate", "{truncated}"], 1, ""),
    "validate-missing": (["validate", "{empty}/nope"], 2, "no such file or folder"),
    "validate-not-an-adapter": (["validate", "{base}"], 2, "not a LoRA adapter"),
    "validate-empty-folder": (["validate", "{empty}"], 2, "no adapter found"),
    "validate-readme": (["validate", str(FIXTURES / "README.md")], 2, "README.md"),
    "validate-base-missing": (["validate", A_, "--base", "{empty}/nope"], 2, "no such file or folder"),
    "validate-hub-error": (
        ["validate", "nobody/no-such-adapter"],
        2,
        "no Hub repo nobody/no-such-adapter in the cache",
    ),
}


@pytest.mark.parametrize("json_flag", [False, True], ids=["table", "json"])
@pytest.mark.parametrize("case", sorted(ANSWER_CASES))
def test_diff_and_validate_answer_0_1_or_2(
    case: str, json_flag: bool, answers: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hostile
    import hubserver

    template, code, says = ANSWER_CASES[case]
    args = [a.format(**{k: str(v) for k, v in answers.items()}) for a in template] + (["--json"] * json_flag)
    inputs = [p for p in answers.values() if p.exists()] + [FIXTURES / "peft_llama"]
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # a Hub id fails at once, offline
    hubserver.set_env(monkeypatch, **env)  # as huggingface_hub read them at its import
    if code == 2:
        r = hostile.run(args, inputs=inputs, code=2, says=says, env=env)
        assert r.stdout == "", "no answer: nothing on stdout, also with --json"
        return
    result = CliRunner().invoke(cli, args, env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert "Error:" not in result.stderr, "an answer is no error"
    if json_flag:
        data = json.loads(result.stdout)
        assert data["identical" if args[0] == "diff" else "ok"] is (code == 0)
    else:
        words = {"diff": ("identical", "different"), "validate": ("OK", "FAILED")}[args[0]]
        assert words[code] in result.stdout


# ---- --json: stdout is one JSON document, or nothing when the command fails --------------------------------


def _checkpoints(tmp: Path) -> tuple[Path, Path]:
    import torch

    from loratools.io.safetensors import write_safetensors

    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 8, generator=g)
    delta = torch.randn(8, 1, generator=g) @ torch.randn(1, 8, generator=g)
    for name, t in (("base", w), ("tuned", w + delta)):
        (tmp / name).mkdir()
        write_safetensors(tmp / name / "model.safetensors", {"model.layers.0.mlp.up_proj.weight": t})
    return tmp / "base", tmp / "tuned"


def test_json_is_valid_for_every_outcome(tmp_path: Path) -> None:
    base, tuned = _checkpoints(tmp_path)
    llama, embed = str(FIXTURES / "peft_llama"), str(FIXTURES / "peft_llama_embed")
    missing = str(tmp_path / "missing")
    out = str(tmp_path / "o")
    # (command line, exit code): successes print JSON, failures print nothing on stdout
    runs: list[tuple[list[str], int]] = [
        (["inspect", llama], 0),
        (["inspect", llama, "--fast"], 0),
        (["inspect", missing], 1),
        (["validate", llama], 0),
        (["validate", FIXTURES.as_posix() + "/lycoris_lokr.safetensors", "--strict", "--for", "diffusers"], 1),
        (["validate", missing], 2),
        (["diff", llama, str(FIXTURES / "peft_llama_patterns")], 1),
        (["diff", llama, missing], 2),
        (["mix", llama, str(FIXTURES / "peft_llama_patterns"), "--rank", "2", "-o", out + "1"], 0),
        (["mix", llama, embed, "-o", out + "2"], 1),
        (["resize", llama, "--energy", "0.9", "-o", out + "3"], 0),
        (["resize", missing, "--rank", "2", "-o", out + "4"], 1),
        (["convert", llama, "--to", "kohya", "-o", out + "5.safetensors"], 0),
        (["convert", llama, "--to", "diffusers", "-o", out + "6.safetensors"], 1),
        (["extract", str(base), str(tuned), "--rank", "1", "-o", out + "7"], 0),
        (["extract", str(base), missing, "--rank", "1", "-o", out + "8"], 1),
    ]
    for args, code in runs:
        r = CliRunner().invoke(cli, [*args, "--json"])
        assert r.exception is None or isinstance(r.exception, SystemExit), (args, r.exception)
        assert r.exit_code == code, (args, r.stdout, r.stderr)
        if code == 0 or (code == 1 and args[0] in ("diff", "validate")):
            assert isinstance(json.loads(r.stdout), dict), args  # one document, nothing else on stdout
        else:
            assert r.stdout == "" and r.stderr.startswith("Error: "), (args, r.stdout, r.stderr)


def test_progress_bars_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mf: object) -> None:
    """On a terminal the one bar builder draws what the library reports (modules for mix, bytes and tensors for
    merge), and takes the bar down when the command ends: the result is the same as without a terminal."""
    import io

    from loratools.cli import output

    screen = io.StringIO()
    console = output.SafeConsole(file=screen, force_terminal=True, width=120)
    monkeypatch.setattr(output, "_err", lambda: console)
    code, out, _ = run(
        "mix", str(FIXTURES / "peft_llama"), str(FIXTURES / "peft_llama_patterns"), "-o", str(tmp_path / "m")
    )
    assert code == 0 and "wrote" in out
    assert "mixing modules" in screen.getvalue()
    mf.tiny_llama().save_pretrained(tmp_path / "base")  # type: ignore[attr-defined]
    code, out, _ = run("merge", str(tmp_path / "base"), str(FIXTURES / "peft_llama"), "-o", str(tmp_path / "merged"))
    assert code == 0 and "8 tensors merged" in out
    assert "merging" in screen.getvalue() and "tensors" in screen.getvalue()
    # a bar left running would make the next one fail (rich allows one live display per console)
    code, _, _ = run("resize", str(FIXTURES / "peft_llama"), "--rank", "2", "-o", str(tmp_path / "r"))
    assert code == 0 and "resizing modules" in screen.getvalue()

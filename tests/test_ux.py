"""What a new user meets: output names that say what is written (else a usage error, never a guess), hints that
name the user's own paths and only suggest what works, progress bars with a total on a terminal and none in a
pipe, shell completion of paths, and the commands that work without torch."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from click.testing import CliRunner
from conftest import FIXTURES, ROOT, run_cli

from loratools.cli import cli

PEFT, KOHYA = str(FIXTURES / "peft_llama"), str(FIXTURES / "kohya_sd" / "lora.safetensors")


@pytest.mark.parametrize(
    ("args", "out", "says"),
    [
        (["resize", PEFT, "--rank", "2"], "r6.safetensors", "a peft adapter is written as a folder"),
        (["resize", KOHYA, "--rank", "2"], "r7", "a kohya adapter is written as one .safetensors file"),
        (["convert", PEFT, "--to", "kohya"], "k.pt", "ends in .pt"),
        (["convert", KOHYA, "--to", "diffusers"], "d", "has no suffix"),
        (["mix", PEFT, PEFT], "m.safetensors", "written as a folder"),
        (["mix", KOHYA, KOHYA, "--to", "peft"], "m.bin", "written as a folder"),
        (["mix", PEFT, PEFT, "--to", "kohya"], "m", "has no suffix"),
    ],
)
def test_an_output_name_that_contradicts_the_format_is_a_usage_error(
    args: list[str], out: str, says: str, tmp_path: Path
) -> None:
    target = tmp_path / out
    code, stdout, err = run_cli(*args, "-o", str(target))
    assert code == 2 and stdout == "", err
    assert says in err and str(target) in err
    want = target.with_suffix("") if "folder" in says else target.with_suffix(".safetensors")
    if target.suffix in ("", ".pt"):
        want = Path(str(target.with_suffix("")) + ".safetensors")
    assert f"Hint: {'give a folder name, e.g. -o ' if 'folder' in says else 'name it '}{want}" in err
    assert os.listdir(tmp_path) == []  # nothing written, not even a temporary


def test_merge_output_names_follow_the_base(mf: ModuleType, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    mf.tiny_llama().save_pretrained(tmp_path / "base")  # type: ignore[attr-defined]
    code, _, err = run_cli("merge", str(tmp_path / "base"), PEFT, "-o", str(tmp_path / "m.safetensors"))
    assert code == 2 and "merged model (like its base) is written as a folder" in err
    single = tmp_path / "single.safetensors"
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 32)}, single)
    code, _, err = run_cli(
        "merge", str(single), PEFT, "--include", "layers.0.self_attn.q_proj", "-o", str(tmp_path / "m")
    )
    assert code == 2 and "written as one .safetensors file" in err and f"name it {tmp_path / 'm.safetensors'}" in err
    assert sorted(os.listdir(tmp_path)) == ["base", "single.safetensors"]


def test_the_right_names_still_work(tmp_path: Path) -> None:
    assert run_cli("resize", PEFT, "--rank", "2", "-o", str(tmp_path / "r6"))[0] == 0
    assert (tmp_path / "r6" / "adapter_config.json").is_file()
    assert run_cli("resize", KOHYA, "--rank", "2", "-o", str(tmp_path / "r7.safetensors"))[0] == 0
    assert (tmp_path / "r7.safetensors").is_file()
    assert run_cli("convert", KOHYA, "--to", "diffusers", "-o", str(tmp_path / "d.safetensors"))[0] == 0
    assert (tmp_path / "d.safetensors").is_file()
    (tmp_path / "folder").mkdir()  # an existing folder is no file name either, --force or not
    code, _, err = run_cli("convert", KOHYA, "--to", "diffusers", "-o", str(tmp_path / "folder"), "--force")
    assert code == 2 and "has no suffix" in err and os.listdir(tmp_path / "folder") == []


def test_hints_name_the_users_paths_and_only_what_works() -> None:
    # an image model's adapter cannot be served by vLLM in any format: no conversion is suggested
    code, out, _ = run_cli("validate", KOHYA, "--fast", "--for", "vllm")
    assert code == 1 and "image pipeline" in out and "--to peft" not in out
    assert f"loratools validate {KOHYA} --for diffusers" in out
    # a DoRA adapter for vLLM: merge it, with the user's own adapter path; the base is named only when known
    dora = str(FIXTURES / "peft_llama_dora")
    code, out, _ = run_cli("validate", dora, "--fast", "--for", "vllm")
    assert code == 1 and f"loratools merge BASE {dora} -o peft_llama_dora-merged" in out
    # a PEFT folder for ComfyUI: convert it, to a file named after it
    code, out, _ = run_cli("validate", PEFT, "--fast", "--for", "comfyui")
    assert f"loratools convert {PEFT} --to kohya -o peft_llama.safetensors" in out
    for args in (["validate", PEFT, "--fast", "--for", "comfyui"], ["validate", dora, "--fast", "--for", "tgi"]):
        out = run_cli(*args)[1]
        assert not re.search(r"\bSRC\b|\bOUT\b", out), out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_cuda_without_a_gpu_says_so(tmp_path: Path) -> None:
    code, _, err = run_cli("resize", PEFT, "--rank", "2", "--device", "cuda", "-o", str(tmp_path / "r"))
    assert code == 1 and "no CUDA device is available" in err and "Hint: run on the CPU: --device cpu" in err
    assert "use one of" not in err
    code, _, err = run_cli("merge", PEFT, PEFT, "--device", "cuda", "-o", str(tmp_path / "m"))
    assert code == 1 and "no CUDA device" in err and "--device auto" in err


def test_messages_have_one_capitalisation() -> None:
    """Error:, Hint:, Note:, Warning: - never note: or warning: - in what the CLI prints."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "loratools").rglob("*.py"))
    assert not re.search(r"""["'(](note|warning|error|hint):""", text)


def test_progress_has_a_total_on_a_terminal_and_nothing_in_a_pipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loratools.cli import output

    screen = io.StringIO()
    console = output.SafeConsole(file=screen, force_terminal=True, width=120)
    monkeypatch.setattr(output, "_err", lambda: console)
    assert run_cli("mix", PEFT, str(FIXTURES / "peft_llama_patterns"), "-o", str(tmp_path / "m"))[0] == 0
    drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())  # the text, without the terminal's styles
    assert re.search(r"mixing modules.* 14/14 ", drawn)  # done / total, not "14 done"
    assert run_cli("resize", PEFT, "--rank", "2", "-o", str(tmp_path / "r"))[0] == 0
    drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    assert re.search(r"resizing modules.* 8/8 ", drawn)
    monkeypatch.undo()
    # a real process whose stderr is a pipe: no bar, no escape sequence, only the result on stdout
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-m", "loratools", "mix", PEFT, PEFT, "-o", str(tmp_path / "piped")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0 and "wrote" in r.stdout
    assert "mixing" not in r.stderr and "\x1b[" not in r.stderr and "\r" not in r.stderr, r.stderr


def test_source_and_output_arguments_complete_paths() -> None:
    from click.shell_completion import BashComplete, FishComplete, ZshComplete

    for words, incomplete in (
        (["inspect"], "fix"),
        (["merge"], "ba"),
        (["mix", "a"], "b"),
        (["resize", PEFT, "-o"], "o"),
    ):
        items = BashComplete(cli, {}, "loratools", "_LORATOOLS_COMPLETE").get_completions(words, incomplete)
        assert [(i.type, i.value) for i in items] == [("file", incomplete)], words
    for shell in (BashComplete, ZshComplete, FishComplete):  # the scripts the README tells users to source
        assert "_LORATOOLS_COMPLETE" in shell(cli, {}, "loratools", "_LORATOOLS_COMPLETE").source()
    r = CliRunner().invoke(cli, [], env={"_LORATOOLS_COMPLETE": "bash_source"}, prog_name="loratools")
    assert "_LORATOOLS_COMPLETE=bash_complete" in r.output


#: runs loratools as if torch were not installed: importing it fails as a missing package does
NO_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTorch())
sys.argv[0] = "loratools"
from loratools.cli import main
main()
"""


def without_torch(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT
    )


def test_header_only_commands_work_without_torch(tmp_path: Path) -> None:
    """What the README promises to a `pip install loratools` without torch."""
    for args in (
        ["--help"],
        ["inspect", "--fast", KOHYA],
        ["inspect", "--fast", "--json", PEFT],
        ["validate", "--fast", PEFT],
        ["validate", "--fast", str(FIXTURES / "peft_llama_dora"), "--for", "vllm"],
        ["push", PEFT, "me/llama-lora", "--dry-run"],
    ):
        r = without_torch(*args)
        assert r.returncode in (0, 1) and "Traceback" not in r.stderr and "needs PyTorch" not in r.stderr, (args, r)
        assert r.stdout, args
    for args in (
        ["inspect", PEFT],
        ["convert", PEFT, "--to", "kohya", "-o", str(tmp_path / "x.safetensors")],
        ["diff", PEFT, PEFT],
    ):
        r = without_torch(*args)  # the data is needed: a clear error, not a traceback
        assert r.returncode == 1 and r.stderr.startswith(f"Error: {args[0]} needs PyTorch"), (args, r.stderr)
        assert "Hint: pip install torch" in r.stderr and "Traceback" not in r.stderr

"""The hostile battery, push contents: adapter folders holding secrets, links out of the folder or to hidden files,
pickles in every container, special files, hidden and nested folders, and --include patterns that try to reach them.

Every case pushes for real to tests/hubserver.py and checks what the server received: only what an adapter repo is
made of (or what --include named), never a secret, never a hidden file, never the token (in an upload or in any
output); what was left out is listed with its reason; SOURCE is untouched; an error is one ``Error:`` line and
nothing is uploaded.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import hostile
import hubserver
import pytest
from conftest import FIXTURES
from hubserver import TOKEN, HubServer

from loratools import hub
from loratools.cli.push import publish
from loratools.errors import LoratoolsError
from loratools.io.pickle import COMPRESSION_SUFFIXES, PICKLE_SUFFIXES

no_internet, hf_env, server = hubserver.no_internet, hubserver.hf_env, hubserver.server  # the shared fixtures

REPO = "me/adapter"
ADAPTER = {"adapter_config.json", "adapter_model.safetensors"}
SECRET = f"HF_TOKEN={TOKEN}\n"
KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n"


def slow_but(params: list[Any], *default: str) -> list[Any]:
    """The cases, all but ``default`` (ids) marked slow: the default run keeps a few of each kind."""
    assert set(default) <= {p.id for p in params}, set(default) - {p.id for p in params}
    return [
        p if p.id in default else pytest.param(*p.values, marks=[*p.marks, pytest.mark.slow], id=p.id) for p in params
    ]


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """A PEFT adapter folder to add hostile things to; beside it, a folder of secrets outside SOURCE."""
    folder = tmp_path / "adapter"
    shutil.copytree(FIXTURES / "peft_llama", folder)
    outside = tmp_path / "home"
    outside.mkdir()
    (outside / ".env").write_text(SECRET)
    (outside / "id_rsa").write_text(KEY)
    (outside / "notes.txt").write_text(SECRET)
    return folder


def push(
    server: HubServer, src: Path, *args: str, code: int = 0, says: str | list[str] | None = None
) -> tuple[dict[str, Any] | None, dict[str, bytes], hostile.Outcome]:
    """``push SRC REPO --json ARGS``, checked; returns the report, what the server holds, and the outcome."""
    inputs = [src, src.parent / "home"]
    asked = len(server.log)
    got = hostile.run(["push", str(src), REPO, "--json", *args], inputs=inputs, code=code, says=says)
    assert TOKEN not in got.stdout + got.stderr, "the token was printed"
    files = {k: v for k, v in server.files(REPO).items() if k != ".gitattributes"} if REPO in server.repos else {}
    for name, data in files.items():
        assert TOKEN.encode() not in data, f"{name}: the token was uploaded"
        assert b"PRIVATE KEY" not in data, f"{name}: a private key was uploaded"
        assert not any(part.startswith(".") for part in name.split("/")), f"{name}: a hidden file was uploaded"
    if code != 0:
        assert not [p for m, p, _ in server.log[asked:] if m == "POST"], "a failed push sent something"
        return None, files, got
    return json.loads(got.stdout), files, got


def left(report: dict[str, Any]) -> dict[str, str]:
    return {lo["path"]: lo["why"] for lo in report["left_out"]}


def uploaded(files: dict[str, bytes]) -> set[str]:
    return set(files) - {"README.md"}


# ---- secrets beside the adapter: never uploaded unasked --------------------------------------------------------------

SECRET_FILES: list[Any] = [
    pytest.param("token", SECRET, hub.OTHER, id="token"),
    pytest.param("token.txt", SECRET, hub.OTHER, id="token-txt"),
    pytest.param("id_rsa", KEY, hub.OTHER, id="id_rsa"),
    pytest.param("id_ed25519", KEY, hub.OTHER, id="id_ed25519"),
    pytest.param("credentials.json", '{"token": "' + TOKEN + '"}', hub.OTHER, id="credentials-json"),
    pytest.param("secrets.yaml", f"hf: {TOKEN}\n", hub.OTHER, id="secrets-yaml"),
    pytest.param("training_args.json", f'{{"hub_token": "{TOKEN}"}}', hub.OTHER, id="training-args-json"),
    pytest.param("wandb-settings", SECRET, hub.OTHER, id="wandb-settings"),
    pytest.param("config.json", f'{{"token": "{TOKEN}"}}', hub.OTHER, id="config-json"),
    pytest.param("server.pem", KEY, hub.OTHER, id="pem"),
    pytest.param("notes.md", SECRET, hub.OTHER, id="notes"),
    pytest.param(".env", SECRET, hub.HIDDEN, id="dotenv"),
    pytest.param(".netrc", f"machine huggingface.co password {TOKEN}\n", hub.HIDDEN, id="netrc"),
    pytest.param(".git-credentials", f"https://u:{TOKEN}@huggingface.co\n", hub.HIDDEN, id="git-credentials"),
    pytest.param(".gitattributes", "*.bin filter=lfs\n", hub.HIDDEN, id="gitattributes"),
    pytest.param("optimizer.pt", "not really a pickle", hub.OTHER_PICKLE, id="optimizer-pt"),
    pytest.param("training_args.bin", "not really a pickle", hub.OTHER_PICKLE, id="training-args-bin"),
    pytest.param("rng_state.pth", "x", hub.OTHER_PICKLE, id="rng-state-pth"),
]


@pytest.mark.parametrize(
    ("name", "text", "why"),
    slow_but(SECRET_FILES, "token", "id_rsa", "credentials-json", "secrets-yaml", "dotenv", "optimizer-pt"),
)
def test_a_secret_beside_the_adapter_stays_home(server: HubServer, src: Path, name: str, text: str, why: str) -> None:
    (src / name).write_text(text)
    report, files, got = push(server, src)
    assert report is not None
    assert uploaded(files) == ADAPTER
    assert left(report) == {name: why}
    assert report["skipped"] == [name]


def test_a_trainer_output_folder(server: HubServer, src: Path) -> None:
    """What transformers' Trainer leaves beside an adapter: the tokenizer goes up, the rest is listed."""
    companions = [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "LICENSE",
    ]
    for name in companions:
        (src / name).write_text("{}")
    for name in ["training_args.bin", "optimizer.pt", "scheduler.pt", "trainer_state.json", "all_results.json"]:
        (src / name).write_text("x")
    (src / "checkpoint-500").mkdir()
    (src / "checkpoint-500" / "adapter_model.safetensors").write_bytes(b"x")
    (src / "runs" / "events").mkdir(parents=True)
    (src / "runs" / "events" / "out.tfevents").write_text("x")
    report, files, _ = push(server, src)
    assert report is not None
    assert uploaded(files) == ADAPTER | set(companions)
    assert set(left(report)) == {
        "training_args.bin", "optimizer.pt", "scheduler.pt", "trainer_state.json", "all_results.json",
        "checkpoint-500/adapter_model.safetensors", "runs/events/out.tfevents",
    }  # fmt: skip
    assert left(report)["optimizer.pt"] == hub.OTHER_PICKLE and left(report)["all_results.json"] == hub.OTHER


@pytest.mark.parametrize(
    "folder",
    slow_but(
        [
            pytest.param(".git", id="git"),
            pytest.param(".cache/huggingface", id="cache"),
            pytest.param(".ssh", id="ssh"),
            pytest.param("sub/.hidden", id="nested-hidden"),
            pytest.param(".a/.b/.c", id="hidden-chain"),
        ],
        "git",
        "nested-hidden",
    ),
)
def test_hidden_folders_are_never_entered(server: HubServer, src: Path, folder: str) -> None:
    (src / folder).mkdir(parents=True)
    (src / folder / "config").write_text(SECRET)
    (src / folder / "README.md").write_text(SECRET)
    report, files, _ = push(server, src, "--include", "*")
    assert report is not None
    assert uploaded(files) == ADAPTER
    parts = folder.split("/")
    first = next(i for i, p in enumerate(parts) if p.startswith("."))
    assert left(report) == {"/".join(parts[: first + 1]) + "/": hub.HIDDEN}


def test_nested_folders_go_up_only_when_named(server: HubServer, src: Path) -> None:
    for rel in ["samples/a.png", "samples/deep/b.png", "samples/deep/c.txt", "notes/x.md"]:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(rel)
    report, files, _ = push(server, src, "--include", "*.png", "--include", "notes")
    assert report is not None
    assert uploaded(files) == ADAPTER | {"samples/a.png", "samples/deep/b.png", "notes/x.md"}
    assert files["samples/deep/b.png"] == b"samples/deep/b.png"
    assert left(report) == {"samples/deep/c.txt": hub.OTHER}


# ---- links -----------------------------------------------------------------------------------------------------------


def link(src: Path, name: str, target: str | Path) -> None:
    path = src / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


LINKS: list[Any] = [
    pytest.param("notes.txt", ".env", hub.LINK_HIDDEN, id="to-a-hidden-file"),
    pytest.param("notes.txt", "../home/notes.txt", hub.LINK_OUT, id="to-a-file-outside"),
    pytest.param("notes.txt", "../home/.env", hub.LINK_OUT, id="to-a-hidden-file-outside"),
    pytest.param("key", "/proc/self/environ", hub.LINK_OUT, id="to-proc-environ"),
    pytest.param("passwd", "/etc/passwd", hub.LINK_OUT, id="absolute-outside"),
    pytest.param("git-config", ".git/config", hub.LINK_HIDDEN, id="into-a-hidden-folder"),
    pytest.param("sub/up.txt", "../../home/notes.txt", hub.LINK_OUT, id="nested-up-and-out"),
    pytest.param("chain", "chain2", hub.LINK_HIDDEN, id="chain-to-hidden"),
    pytest.param("broken", "nowhere.txt", hub.BROKEN, id="broken"),
    pytest.param("loop", "loop", hub.BROKEN, id="self-loop"),
    pytest.param("home", "../home", hub.LINK_DIR, id="to-a-folder-outside"),
    pytest.param("inside", ".", hub.LINK_DIR, id="to-the-folder-itself"),
    pytest.param("tokenizer.json", "../home/notes.txt", hub.LINK_OUT, id="a-companion-outside"),
]


@pytest.mark.parametrize(
    ("name", "target", "why"),
    slow_but(
        LINKS, "to-a-hidden-file", "to-a-file-outside", "chain-to-hidden", "to-a-folder-outside", "a-companion-outside"
    ),
)
def test_a_link_is_never_followed_out(server: HubServer, src: Path, name: str, target: str, why: str) -> None:
    (src / ".env").write_text(SECRET)
    (src / ".git").mkdir()
    (src / ".git" / "config").write_text(SECRET)
    (src / "chain2").symlink_to(".env")
    link(src, name, target)
    report, files, _ = push(server, src, "--include", "*")
    assert report is not None
    assert uploaded(files) == ADAPTER
    assert left(report)[name + ("/" if why == hub.LINK_DIR else "")] == why
    assert left(report)["chain2"] == hub.LINK_HIDDEN and left(report)[".env"] == hub.HIDDEN
    if why != hub.LINK_DIR:  # named exactly, it is an error
        hostile.run(["push", str(src), REPO, "--include", name], inputs=[src, src.parent / "home"], code=1, says=f"refusing to upload {name}: {why}")  # fmt: skip


def test_a_link_inside_the_folder_is_uploaded_when_named(server: HubServer, src: Path) -> None:
    (src / "docs").mkdir()
    (src / "docs" / "card.md").write_text("# card\n")
    link(src, "card.md", "docs/card.md")
    report, files, _ = push(server, src, "--include", "card.md")
    assert report is not None and files["card.md"] == b"# card\n"


@pytest.mark.parametrize(
    ("name", "target"),
    slow_but(
        [
            pytest.param("adapter_model.safetensors", "../home/weights.safetensors", id="weights-outside"),
            pytest.param("adapter_config.json", ".config.json", id="config-hidden"),
            pytest.param("README.md", "../home/notes.txt", id="readme-outside"),
            pytest.param("README.md", ".env", id="readme-hidden"),
        ],
        "weights-outside",
        "readme-hidden",
    ),
)
def test_a_file_of_the_adapter_that_is_a_bad_link_is_an_error(
    server: HubServer, src: Path, name: str, target: str
) -> None:
    (src / ".env").write_text(SECRET)
    (src.parent / "home" / "weights.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    (src / ".config.json").write_bytes((src / "adapter_config.json").read_bytes())
    (src / name).unlink(missing_ok=True)
    link(src, name, target)
    push(server, src, code=1, says=f"cannot upload {name}, a file of the adapter: a link")


# ---- pickles in every container ------------------------------------------------------------------------------------

CONTAINERS = [*PICKLE_SUFFIXES, ".pkl.gz", ".joblib.xz", ".npy.bz2", ".pt.zst"]


@pytest.mark.parametrize(
    "suffix",
    slow_but([pytest.param(s, id=s.lstrip(".")) for s in CONTAINERS], "pth.tar", "npy"),
)
def test_a_pickle_in_any_container_is_refused(server: HubServer, src: Path, suffix: str) -> None:
    name = f"extra{suffix.upper() if suffix == '.pkl' else suffix}"
    (src / name).write_bytes(b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR.")
    report, files, _ = push(server, src)  # not part of the adapter: left out
    assert report is not None and left(report) == {name: hub.OTHER_PICKLE} and uploaded(files) == ADAPTER
    push(server, src, "--include", name, code=1, says=f"refusing to upload {name}: a pickle")  # named: an error
    report, _, _ = push(server, src, "--include", "extra*")  # matched by a pattern: left out, and why
    assert report is not None and left(report) == {name: hub.PICKLE}
    report, files, _ = push(server, src, "--include", name, "--allow-pickles")  # asked for: it goes up
    assert report is not None and name in files


def test_the_tables_know_every_pickle_container() -> None:
    from loratools.io.pickle import is_pickle, is_torch_pickle

    assert {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib", ".pth.tar", ".dill", ".npy", ".npz"} <= set(
        PICKLE_SUFFIXES
    )
    for name in ["a.PKL", "a.pkl.gz", "x.pth.tar", "a.npz", "model.sav", "a.joblib.xz", "p.pdparams"]:
        assert is_pickle(name), name
    for name in ["a.safetensors", "a.json", "tokenizer.model", "a.gz", "a.npz.txt", "README.md"]:
        assert not is_pickle(name), name
    assert all(is_torch_pickle(f"a{s}") for s in (".bin", ".pt", ".pth", ".ckpt", ".pth.tar"))
    assert not any(is_torch_pickle(f"a{s}") for s in (".pkl", ".npy", ".joblib", ".safetensors"))
    assert ".gz" in COMPRESSION_SUFFIXES


def test_legacy_pickle_weights(server: HubServer, tmp_path: Path) -> None:
    src = tmp_path / "bin"
    shutil.copytree(FIXTURES / "peft_llama_bin", src)
    push(server, src, code=1, says="refusing to upload pickle file(s): adapter_model.bin")
    report, files, _ = push(server, src, "--allow-pickles")
    assert report is not None and uploaded(files) == {"adapter_config.json", "adapter_model.bin"}


# ---- what the files hold -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "args", "says"),
    slow_but(
        [
            pytest.param("README.md", f"# card\n\n{SECRET}", (), "README.md: it holds the Hugging Face token", id="readme-token"),
            pytest.param("README.md", KEY, (), "README.md: it holds a private key", id="readme-key"),
            pytest.param("tokenizer.json", f'{{"t": "{TOKEN}"}}', (), "tokenizer.json: it holds the Hugging Face token", id="companion-token"),
            pytest.param("notes.md", SECRET, ("--include", "notes.md"), "notes.md: it holds the Hugging Face token", id="included-token"),
            pytest.param("notes.md", SECRET, ("--include", "*.md"), "notes.md: it holds the Hugging Face token", id="globbed-token"),
            pytest.param("id_rsa", KEY, ("--include", "*"), "id_rsa: it holds a private key", id="everything-with-a-key"),
            pytest.param("big.txt", "x" * 3_000_000 + TOKEN, ("--include", "big.txt"), "big.txt: it holds the Hugging Face token", id="token-deep-in-a-big-file"),
            pytest.param("a\nb.txt", SECRET, ("--include", "*.txt"), "'a\\nb.txt': it holds the Hugging Face token", id="a-newline-in-the-name"),
            pytest.param("split.txt", "x" * ((1 << 20) - 10) + TOKEN, ("--include", "split.txt"), "split.txt: it holds the Hugging Face token", id="token-across-a-chunk"),
        ],
        "readme-token", "readme-key", "included-token", "everything-with-a-key", "token-across-a-chunk",
    ),
)  # fmt: skip
def test_a_file_holding_a_secret_is_refused(
    server: HubServer, src: Path, name: str, text: str, args: tuple[str, ...], says: str
) -> None:
    (src / name).write_text(text)
    _, _, got = push(server, src, *args, code=1, says=f"refusing to upload {says}")
    assert "Hint:" in got.stderr


def test_the_token_in_the_adapter_config(server: HubServer, src: Path) -> None:
    config = json.loads((src / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = TOKEN
    (src / "adapter_config.json").write_text(json.dumps(config))
    push(server, src, code=1, says="refusing to upload adapter_config.json: it holds the Hugging Face token")


def test_the_token_in_safetensors_metadata(server: HubServer, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "kohya"
    src.mkdir()
    (tmp_path / "home").mkdir()
    tensors = load_file(str(FIXTURES / "kohya_sd" / "lora.safetensors"))
    save_file(tensors, str(src / "style.safetensors"), metadata={"ss_note": TOKEN})
    push(server, src, code=1, says="refusing to upload style.safetensors: it holds the Hugging Face token")
    save_file(tensors, str(src / "style.safetensors"), metadata={"ss_note": "fine"})
    report, files, _ = push(server, src)
    assert report is not None and uploaded(files) == {"style.safetensors"}


# ---- --include edge cases --------------------------------------------------------------------------------------------

USAGE: list[Any] = [
    pytest.param(".env", "hidden files and folders are never uploaded", id="hidden"),
    pytest.param(".git/config", "hidden files and folders are never uploaded", id="hidden-folder"),
    pytest.param("sub/.secret", "hidden files and folders are never uploaded", id="nested-hidden"),
    pytest.param("*/.env", "hidden files and folders are never uploaded", id="glob-hidden"),
    pytest.param("../home/notes.txt", "must stay inside SOURCE", id="dotdot"),
    pytest.param("a/../../x", "must stay inside SOURCE", id="dotdot-inside"),
    pytest.param("/etc/passwd", "must be relative to SOURCE", id="absolute"),
    pytest.param("C:/x", "must be relative to SOURCE", id="drive"),
    pytest.param("a\\b", "write folders with /", id="backslash"),
    pytest.param("", "an empty pattern", id="empty"),
    pytest.param("a\nb", "control characters", id="newline"),
]


@pytest.mark.parametrize(("pattern", "says"), slow_but(USAGE, "hidden", "dotdot", "absolute", "empty"))
def test_a_bad_include_is_a_usage_error(server: HubServer, src: Path, pattern: str, says: str) -> None:
    push(server, src, "--include", pattern, code=2, says=says)
    with pytest.raises(LoratoolsError, match="--include"):
        hub.select(src, include=[pattern])  # the library refuses it too
    with pytest.raises(LoratoolsError, match="--include"):
        publish(src, REPO, include=[pattern], dry_run=True)


@pytest.mark.parametrize(
    ("pattern", "says"),
    [
        pytest.param("nothing*", "--include 'nothing*' matches no file", id="matches-nothing"),
        pytest.param("[", "matches no file", id="bad-glob"),
        pytest.param("linked/*", "matches no file", id="through-a-folder-link"),
    ],
)
def test_an_include_that_names_nothing(server: HubServer, src: Path, pattern: str, says: str) -> None:
    (src / "real").mkdir()
    (src / "real" / "a.txt").write_text("a")
    (src / "linked").symlink_to("real")
    push(server, src, "--include", pattern, code=1, says=says)


def test_include_star_takes_what_may_go(server: HubServer, src: Path) -> None:
    (src / "notes.md").write_text("notes")
    (src / ".env").write_text(SECRET)
    (src / "opt.pt").write_text("x")
    link(src, "out.txt", "../home/notes.txt")
    report, files, _ = push(server, src, "--include", "*")
    assert report is not None
    assert uploaded(files) == ADAPTER | {"notes.md"}
    assert left(report) == {".env": hub.HIDDEN, "opt.pt": hub.PICKLE, "out.txt": hub.LINK_OUT}


@pytest.mark.parametrize(
    "pattern",
    slow_but(
        [
            pytest.param(p, id=p)
            for p in ["./samples/a.png", "samples/", "samples", "samples/*", "**/a.png", "s?mples/[a-z].png"]
        ],
        "samples",
        "s?mples/[a-z].png",
    ),
)
def test_include_forms(server: HubServer, src: Path, pattern: str) -> None:
    (src / "samples").mkdir()
    (src / "samples" / "a.png").write_text("a")
    report, files, _ = push(server, src, "--include", pattern)
    assert report is not None and uploaded(files) == ADAPTER | {"samples/a.png"}
    assert not left(report)


def test_include_with_a_file_source(server: HubServer, tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    src = tmp_path / "lora.safetensors"
    shutil.copy(FIXTURES / "kohya_sd" / "lora.safetensors", src)
    hostile.run(["push", str(src), REPO, "--include", "x"], inputs=[src], code=1, says="--include applies to a folder")
    hidden = tmp_path / ".lora.safetensors"
    shutil.copy(src, hidden)
    hostile.run(["push", str(hidden), REPO], inputs=[hidden], code=1, says="refusing to upload .lora.safetensors: a hidden file")  # fmt: skip
    assert [p for m, p, _ in server.log if m == "POST"] == []


# ---- special files -------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_special_files(server: HubServer, src: Path) -> None:
    os.mkfifo(src / "pipe")
    report, files, _ = push(server, src, "--include", "*")
    assert report is not None and left(report) == {"pipe": hub.SPECIAL} and uploaded(files) == ADAPTER
    push(server, src, "--include", "pipe", code=1, says="refusing to upload pipe: not a regular file")
    (src / "adapter_model.safetensors").unlink()
    os.mkfifo(src / "adapter_model.safetensors")  # reading it would block for ever: refused before it is opened
    push(server, src, code=1, says="cannot upload adapter_model.safetensors, a file of the adapter: not a regular file")


def test_a_folder_with_no_adapter(server: HubServer, tmp_path: Path) -> None:
    src = tmp_path / "notes"
    src.mkdir()
    (tmp_path / "home").mkdir()
    (src / "id_rsa").write_text(KEY)
    (src / "a.safetensors").write_bytes(b"x")
    (src / "b.safetensors").write_bytes(b"x")
    push(server, src, code=1, says="no adapter found in this folder (2 .safetensors files")


# ---- outputs ----------------------------------------------------------------------------------------------------------


def test_every_output_lists_what_was_left_out_and_never_the_token(server: HubServer, src: Path) -> None:
    (src / "token").write_text(SECRET)
    (src / "[red]x.txt").write_text("markup in a name")
    link(src, "notes.txt", ".env")
    (src / ".env").write_text(SECRET)
    dry = hostile.run(["push", str(src), REPO, "--dry-run"], inputs=[src, src.parent / "home"], code=0)
    assert server.log == []
    normal = hostile.run(["push", str(src), REPO], inputs=[src, src.parent / "home"], code=0)
    for got in (dry, normal):
        assert TOKEN not in got.stdout + got.stderr
        assert "left out (4):" in got.stdout
        assert "  token: not part of the adapter" in got.stdout
        assert "  notes.txt: a link to a hidden file" in got.stdout
        assert "  .env: hidden" in got.stdout
        assert "[red]x.txt: not part of the adapter" in got.stdout  # names are data, not markup
    assert "would upload 3 file(s)" in dry.stdout and "pushed 3 file(s)" in normal.stdout
    report, files, _ = push(server, src)
    assert report is not None and report["skipped"] == [".env", "[red]x.txt", "notes.txt", "token"]
    assert uploaded(files) == ADAPTER

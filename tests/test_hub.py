"""The Hub, end to end: the real huggingface_hub client against a Hub-compatible server on 127.0.0.1 (tests/hubserver.py),
pointed at through HF_ENDPOINT. A guard fails any test that tries to reach another host."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import hubserver
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from conftest import FIXTURES
from hubserver import TOKEN, HubServer
from safetensors.numpy import save as st_save

from loratools import hub, load_adapter
from loratools.cli import Group
from loratools.cli.push import publish, push_cmd
from loratools.errors import FileFormatError, HubError, LoratoolsError
from loratools.ops.inspect import inspect

no_internet, hf_env, server = hubserver.no_internet, hubserver.hf_env, hubserver.server  # the shared fixtures
set_env = hubserver.set_env


def front_matter(text: str) -> tuple[dict[str, Any], str]:
    assert text.startswith("---\n"), text[:80]
    head, body = text[4:].split("\n---\n", 1)
    meta = yaml.safe_load(head)
    assert isinstance(meta, dict)
    return meta, body


def tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def writes(server: HubServer) -> list[str]:
    return [p for m, p, _ in server.log if m == "POST" and not p.endswith("/validate-yaml")]


# ---- repo ids ----------------------------------------------------------------------------------------------------


def test_repo_id_syntax(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(FIXTURES.parent)
    assert hub.is_repo_id("someone/llama-lora")
    assert hub.parse_repo_ref("someone/llama-lora/loras/style.safetensors") == hub.RepoRef(
        "someone/llama-lora", "loras/style.safetensors"
    )
    assert not hub.is_repo_id("fixtures/peft_llama")  # an existing local path wins
    assert hub.is_repo_id("hf://fixtures/peft_llama")  # unless hf:// says otherwise
    for local in ("peft_llama", "./a/b", "/abs/path", "a/../b", "a--b/c", "a/b/../c", "a/.b/", "a\\b/c", "-a/b"):
        assert not hub.is_repo_id(local), local
    assert hub.fetch_if_repo("fixtures/peft_llama") == Path("fixtures/peft_llama")
    with pytest.raises(LoratoolsError, match="--revision applies to Hub repo ids"):
        hub.fetch_if_repo("fixtures/peft_llama", revision="v1")


def test_the_environment_is_huggingface_hubs(hf_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The token from huggingface_hub.get_token() (HF_TOKEN, else the file `hf auth login` saved), the rest from its
    constants, looked up at each call: what huggingface_hub believes is what loratools does."""
    assert hub.environment().token is None and hub.environment().endpoint == "https://huggingface.co"
    (hf_env / "token").parent.mkdir(parents=True, exist_ok=True)
    (hf_env / "token").write_text("hf_from_file\n")
    assert hub.environment().token == "hf_from_file"
    set_env(monkeypatch, HF_TOKEN=TOKEN, HF_ENDPOINT="http://127.0.0.1:9/", HF_HUB_OFFLINE="1")
    env = hub.environment()
    assert (env.token, env.endpoint, env.offline, env.cache_dir) == (TOKEN, "http://127.0.0.1:9", True, hf_env / "hub")
    assert TOKEN not in repr(env)


# ---- push ----------------------------------------------------------------------------------------------------------


def test_push_peft_folder_lands_files_and_card(server: HubServer) -> None:
    src = FIXTURES / "peft_llama"
    before = tree(src)
    rep = publish(src, "me/llama-lora", message="first upload")
    assert tree(src) == before  # the card never lands in the user's folder
    files = server.files("me/llama-lora")
    assert {k: v for k, v in files.items() if k in before} == before
    assert set(files) == {".gitattributes", "adapter_config.json", "adapter_model.safetensors", "README.md"}
    meta, body = front_matter(files["README.md"].decode())
    assert meta["base_model"] == "tiny-llama-from-config"
    assert meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "peft"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["lora", "peft", "loratools"]
    assert "| Rank | 4 |" in body and "| Alpha | 8 |" in body
    assert "k_proj x2, o_proj x2, q_proj x2, v_proj x2" in body
    assert "| Modules | 8 (lora 8) |" in body
    repo = server.repos["me/llama-lora"]
    assert repo.messages[repo.refs["main"]] == "first upload"
    assert rep.card_action == "generated" and rep.commit == repo.refs["main"]
    assert [f.path for f in rep.files] == ["adapter_config.json", "adapter_model.safetensors", "README.md"]
    assert writes(server) == [
        "/api/repos/create",
        "/api/models/me/llama-lora/preupload/main",
        "/api/models/me/llama-lora/commit/main",
    ]
    assert all(authed for m, _, authed in server.log if m == "POST")


def test_push_kohya_file(server: HubServer) -> None:
    src = FIXTURES / "kohya_sd" / "lora.safetensors"
    publish(src, "me/sd-style")
    files = server.files("me/sd-style")
    assert files["lora.safetensors"] == src.read_bytes()
    meta, body = front_matter(files["README.md"].decode())
    assert meta["tags"] == ["lora", "kohya", "loratools"]
    assert "library_name" not in meta and "base_model" not in meta  # sd_v1 is a label, not a Hub id
    assert "| Rank | 2 to 4 (by module) |" in body and "| Modules | 89 (lora 89) |" in body
    assert 'pipe.load_lora_weights("me/sd-style", weight_name="lora.safetensors")' in body


def test_push_of_a_mix_carries_its_recipe(server: HubServer, tmp_path: Path) -> None:
    from loratools.ops.mix import mix

    out = tmp_path / "mixed"
    mix([FIXTURES / "peft_llama", FIXTURES / "peft_llama_patterns"], out, [0.7, 0.3], "svd", 4)
    rep = publish(out, "me/mixed")
    readme = server.files("me/mixed")["README.md"].decode()
    _, body = front_matter(readme)
    assert "## How it was made" in body
    assert "mix of peft_llama (0.7) and peft_llama_patterns (0.3), svd to rank 4." in body
    assert "sha256" in body  # the full record, with each input's hash
    assert rep.card == readme


def test_dry_run_sends_nothing(server: HubServer) -> None:
    rep = publish(FIXTURES / "peft_llama", "me/llama-lora", dry_run=True)
    assert server.log == []
    assert "me/llama-lora" not in server.repos
    assert rep.dry_run and rep.commit is None
    assert [(f.path, f.size) for f in rep.files][:2] == [
        ("adapter_config.json", (FIXTURES / "peft_llama" / "adapter_config.json").stat().st_size),
        ("adapter_model.safetensors", (FIXTURES / "peft_llama" / "adapter_model.safetensors").stat().st_size),
    ]
    assert rep.card is not None and "library_name: peft" in rep.card


def test_pickles_are_refused_unless_asked(server: HubServer) -> None:
    with pytest.raises(LoratoolsError, match=r"refusing to upload pickle file\(s\): adapter_model.bin") as e:
        publish(FIXTURES / "peft_llama_bin", "me/bin")
    assert e.value.hint and "--allow-pickles" in e.value.hint
    assert server.log == []
    publish(FIXTURES / "peft_llama_bin", "me/bin", allow_pickles=True)
    assert {"adapter_model.bin", "adapter_config.json", "README.md"} <= set(server.files("me/bin"))


def test_links_out_of_source_are_never_followed(server: HubServer, tmp_path: Path) -> None:
    src = tmp_path / "adapter"
    shutil.copytree(FIXTURES / "peft_llama", src)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the Hub")
    (src / "notes.txt").symlink_to(secret)
    (src / "more").symlink_to(tmp_path, target_is_directory=True)
    (src / ".env").write_text("HF_TOKEN=...")  # hidden: left out
    (src / "env.txt").symlink_to(src / ".env")  # a link to a hidden file: left out
    (src / "copy.json").symlink_to(src / "adapter_config.json")  # inside: fine, once named
    with pytest.raises(LoratoolsError, match="refusing to upload notes.txt: a link to a file outside the folder"):
        publish(src, "me/x", include=["notes.txt"])
    with pytest.raises(LoratoolsError, match="refusing to upload env.txt: a link to a hidden file"):
        publish(src, "me/x", include=["env.txt"])
    assert server.log == []
    rep = publish(src, "me/x", include=["copy.json"])
    assert {(lo.path, lo.why) for lo in rep.left_out} == {
        (".env", hub.HIDDEN), ("env.txt", hub.LINK_HIDDEN), ("more/", hub.LINK_DIR), ("notes.txt", hub.LINK_OUT),
    }  # fmt: skip
    assert rep.skipped == [".env", "env.txt", "more/", "notes.txt"]
    files = server.files("me/x")
    assert files["copy.json"] == (src / "adapter_config.json").read_bytes()
    assert set(files) == {
        ".gitattributes",
        "adapter_config.json",
        "adapter_model.safetensors",
        "copy.json",
        "README.md",
    }
    (src / "adapter_model.safetensors").rename(tmp_path / "weights.safetensors")
    (src / "adapter_model.safetensors").symlink_to(tmp_path / "weights.safetensors")
    with pytest.raises(LoratoolsError, match="cannot upload adapter_model.safetensors, a file of the adapter: a link"):
        publish(src, "me/y")


def test_existing_readme_kept_or_updated(server: HubServer, tmp_path: Path) -> None:
    src = tmp_path / "adapter"
    shutil.copytree(FIXTURES / "peft_llama", src)
    own = "---\nlicense: mit\ntags:\n- custom\n---\n# Mine\n\nMy own words.\n"
    (src / "README.md").write_text(own)
    publish(src, "me/a")
    assert server.files("me/a")["README.md"].decode() == own
    rep = publish(src, "me/a", update_card=True)
    assert (src / "README.md").read_text() == own  # the folder is left alone
    meta, body = front_matter(server.files("me/a")["README.md"].decode())
    assert meta["license"] == "mit" and meta["library_name"] == "peft"
    assert meta["tags"] == ["custom", "lora", "peft", "loratools"]
    assert body == "# Mine\n\nMy own words.\n"
    assert rep.card_action == "updated"


def test_a_repo_readme_is_not_overwritten(server: HubServer) -> None:
    server.add_repo("me/k", {"README.md": b"# hand written\n"})
    rep = publish(FIXTURES / "kohya_sd" / "lora.safetensors", "me/k")
    assert rep.card_action == "kept-remote" and rep.card is None
    assert server.files("me/k")["README.md"] == b"# hand written\n"
    assert "lora.safetensors" in server.files("me/k")
    rep = publish(FIXTURES / "kohya_sd" / "lora.safetensors", "me/k", update_card=True)
    meta, body = front_matter(server.files("me/k")["README.md"].decode())
    assert meta["tags"] == ["lora", "kohya", "loratools"] and body == "# hand written\n"


def test_push_to_a_branch_and_as_a_pull_request(server: HubServer) -> None:
    publish(FIXTURES / "peft_llama", "me/a")
    main = server.repos["me/a"].refs["main"]
    publish(FIXTURES / "peft_llama_patterns", "me/a", revision="dev")
    assert server.repos["me/a"].refs["main"] == main
    dev = server.files("me/a", "dev")
    assert (
        dev["adapter_model.safetensors"]
        == (FIXTURES / "peft_llama_patterns" / "adapter_model.safetensors").read_bytes()
    )
    rep = publish(FIXTURES / "peft_llama_dora", "me/a", create_pr=True)
    assert rep.pr_url is not None and rep.pr_url.endswith("/me/a/discussions/1")
    assert server.repos["me/a"].refs["main"] == main
    assert "refs/pr/1" in server.repos["me/a"].refs
    with pytest.raises(LoratoolsError, match="--create-pr"):
        publish(FIXTURES / "peft_llama", "me/a", create_pr=True, revision="dev")
    publish(FIXTURES / "peft_llama", "me/secret", private=True)
    assert server.repos["me/secret"].private and not server.repos["me/a"].private


def test_push_with_a_bad_token_is_one_clear_line(server: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_" + TOKEN)
    with pytest.raises(HubError) as e:
        publish(FIXTURES / "peft_llama", "me/a")
    assert "refused the token (401 Unauthorized)" in e.value.message
    assert e.value.hint and "settings/tokens" in e.value.hint
    for text in (e.value.message, e.value.hint, str(e.value)):
        assert TOKEN not in text and "\n" not in text
    assert "me/a" not in server.repos


def test_push_without_a_token(server: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="asks for a token") as e:
        publish(FIXTURES / "peft_llama", "me/a")
    assert e.value.hint and "HF_TOKEN" in e.value.hint
    assert not any(authed for _, _, authed in server.log)


def test_cli_push(server: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    group = Group(name="loratools", commands=[push_cmd])
    r = CliRunner().invoke(group, ["push", str(FIXTURES / "peft_llama"), "me/cli", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "adapter_model.safetensors" in r.stdout and "library_name: peft" in r.stdout
    assert "would upload 3 file(s)" in r.stdout and server.log == []
    r = CliRunner().invoke(group, ["push", str(FIXTURES / "peft_llama"), "me/cli", "--json"])
    data = json.loads(r.stdout)
    assert data["commit"] == server.repos["me/cli"].refs["main"] and data["card_action"] == "generated"
    set_env(monkeypatch, HF_TOKEN="hf_bad_" + TOKEN)
    r = CliRunner().invoke(group, ["push", str(FIXTURES / "peft_llama"), "me/cli2"])
    assert r.exit_code == 1 and r.exception is None or isinstance(r.exception, SystemExit)
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("Error: the Hub at 127.0.0.1:") and lines[1].startswith("Hint: ")
    assert len(lines) == 2 and TOKEN not in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(group, ["push", str(FIXTURES / "peft_llama"), "me/cli/extra"])
    assert r.exit_code == 1 and "is not a Hub repo id" in r.stderr
    assert "Example:" in (push_cmd.help or "")


# ---- fetch ----------------------------------------------------------------------------------------------------------


def peft_repo(server: HubServer, repo_id: str = "someone/llama-lora", **kw: Any) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in (FIXTURES / "peft_llama").iterdir()}
    extra = {
        "README.md": b"# card\n",
        "optimizer.pt": b"\0" * 2_000_000,  # a big file nobody reading the adapter needs
        "base/model.safetensors": b"\0" * 1_000_000,
    }
    server.add_repo(repo_id, {**files, **extra}, **kw)
    return files


def test_inspect_by_repo_id_downloads_only_the_adapter(server: HubServer, hf_env: Path) -> None:
    files = peft_repo(server)
    path = hub.fetch_if_repo("someone/llama-lora")
    assert path.is_relative_to(hf_env / "hub" / "models--someone--llama-lora" / "snapshots")
    assert sorted(server.downloads("someone/llama-lora")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert tree(path) == files
    got, want = inspect(path), inspect(FIXTURES / "peft_llama")
    assert (got.format, got.num_params, got.base_model) == (want.format, want.num_params, want.base_model)
    assert [(m.name, m.rank, m.norm) for m in got.modules] == [(m.name, m.rank, m.norm) for m in want.modules]
    server.log.clear()
    assert hub.fetch("someone/llama-lora") == path  # cached: the files are not fetched again
    assert server.requests("GET", "/resolve/") == [] and server.requests("HEAD") == []


def test_fetch_a_file_in_a_repo(server: HubServer) -> None:
    kohya = (FIXTURES / "kohya_sd" / "lora.safetensors").read_bytes()
    loha = (FIXTURES / "lycoris_loha.safetensors").read_bytes()
    server.add_repo(
        "someone/sd", {"loras/style.safetensors": kohya, "loras/other.safetensors": loha, "a.png": b"x" * 10}
    )
    path = hub.fetch("someone/sd/loras/style.safetensors")
    assert path.name == "style.safetensors" and path.read_bytes() == kohya
    assert server.downloads("someone/sd") == ["loras/style.safetensors"]
    assert inspect(path, norms=False).format == "kohya"
    with pytest.raises(FileFormatError, match=r"someone/sd/loras holds 2 .safetensors files") as e:
        hub.fetch("someone/sd/loras")
    assert e.value.hint == "name one: someone/sd/loras/other.safetensors"
    server.add_repo("someone/diff", {"pytorch_lora_weights.safetensors": (FIXTURES / "diffusers_sd" / "pytorch_lora_weights.safetensors").read_bytes(), "x.safetensors": b"0"})  # fmt: skip
    assert inspect(hub.fetch("someone/diff"), norms=False).format == "diffusers"
    assert server.downloads("someone/diff") == ["pytorch_lora_weights.safetensors"]


def sharded_repo(server: HubServer) -> None:
    a = st_save({"model.embed.weight": np.ones((4, 2), np.float32)})
    b = st_save({"model.layers.0.q_proj.weight": np.ones((2, 2), np.float32)})
    index = {"metadata": {}, "weight_map": {"model.embed.weight": "model-1.safetensors", "model.layers.0.q_proj.weight": "model-2.safetensors"}}  # fmt: skip
    server.add_repo(
        "org/base",
        {
            "config.json": b"{}",
            "tokenizer.json": b'{"tokens": []}',
            "model.safetensors.index.json": json.dumps(index).encode(),
            "model-1.safetensors": a,
            "model-2.safetensors": b,
            "model.fp16.safetensors": b"unused variant",
            "pytorch_model.bin": b"\0" * 1_000_000,
            "original/consolidated.pth": b"\0" * 1_000_000,
        },
    )


def test_fetch_a_checkpoint_skips_other_formats(server: HubServer) -> None:
    sharded_repo(server)
    path = hub.fetch("org/base", kind="checkpoint")
    assert sorted(server.downloads("org/base")) == [
        "config.json", "model-1.safetensors", "model-2.safetensors", "model.safetensors.index.json", "tokenizer.json",
    ]  # fmt: skip
    assert sorted(tree(path)) == sorted(server.downloads("org/base"))


def test_a_cached_sharded_checkpoint_reads(server: HubServer) -> None:
    from loratools.io.checkpoint import read_checkpoint

    sharded_repo(server)
    path = hub.fetch("org/base", kind="checkpoint")
    # merge, extract, convert, validate, diff
    assert sorted(read_checkpoint(path).tensors) == ["model.embed.weight", "model.layers.0.q_proj.weight"]


def test_fetch_a_pipeline_checkpoint(server: HubServer) -> None:
    unet = st_save({"conv_in.weight": np.ones((2, 2), np.float32)})
    server.add_repo(
        "org/sd",
        {
            "model_index.json": b"{}",
            "v1-5-pruned.safetensors": b"\0" * 100_000,
            "unet/config.json": b'{"unet": 1}',
            "unet/diffusion_pytorch_model.safetensors": unet,
            "unet/diffusion_pytorch_model.fp16.safetensors": b"\0" * 1000,
            "unet/diffusion_pytorch_model.bin": b"\0" * 1000,
            "scheduler/scheduler_config.json": b'{"steps": 1}',
        },
    )
    path = hub.fetch("org/sd", kind="checkpoint")
    assert sorted(server.downloads("org/sd")) == [
        "model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]  # fmt: skip
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_fetch_at_a_revision(server: HubServer) -> None:
    peft_repo(server)
    repo = server.repos["someone/llama-lora"]
    old = repo.refs["main"]
    new_files = dict(repo.commits[old])
    new_files["adapter_model.safetensors"] = (
        FIXTURES / "peft_llama_patterns" / "adapter_model.safetensors"
    ).read_bytes()
    new_files["adapter_config.json"] = (FIXTURES / "peft_llama_patterns" / "adapter_config.json").read_bytes()
    repo.refs["main"] = server._commit(repo, new_files, "v2")
    repo.refs["v1"] = old
    assert hub.fetch("someone/llama-lora").parts[-1] == repo.refs["main"]
    v1 = hub.fetch("someone/llama-lora", revision="v1")
    assert v1.parts[-1] == old
    assert inspect(v1, norms=False).num_params == inspect(FIXTURES / "peft_llama", norms=False).num_params
    with pytest.raises(HubError, match="has no revision 'nope'"):
        hub.fetch("someone/llama-lora", revision="nope")


# ---- errors ----------------------------------------------------------------------------------------------------------


def test_unknown_repo_and_file(server: HubServer) -> None:
    with pytest.raises(HubError, match=r"^nobody/nothing: no such local file or folder, and no repo nobody/nothing on 127\.0\.0\.1:\d+ \(not found, or private\)$"):  # fmt: skip
        hub.fetch_if_repo("nobody/nothing")  # a SOURCE that could have been a local path: the error says so first
    with pytest.raises(HubError, match=r"^no repo nobody/nothing on 127\.0\.0\.1:\d+ \(not found, or private\)$"):
        hub.fetch("nobody/nothing")
    with pytest.raises(HubError, match=r"^no repo nobody/nothing on"):
        hub.fetch_if_repo("hf://nobody/nothing")
    peft_repo(server)
    with pytest.raises(HubError, match="has no file or folder missing.safetensors"):
        hub.fetch("someone/llama-lora/missing.safetensors")
    server.add_repo("someone/empty", {"notes.txt": b"hi"})
    with pytest.raises(FileFormatError, match="someone/empty: no adapter found"):
        hub.fetch("someone/empty")


def test_private_and_gated_repos(server: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    peft_repo(server, "someone/private", private=True)
    peft_repo(server, "someone/gated", gated=True)
    assert (hub.fetch("someone/private") / "adapter_config.json").is_file()  # with the token
    with pytest.raises(HubError, match="is a gated repo") as e:
        hub.fetch("someone/gated")
    assert e.value.hint and "accept its conditions" in e.value.hint
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="someone/private") as e:
        hub.fetch("hf://someone/private", revision="other")
    assert e.value.hint and "HF_TOKEN" in e.value.hint


def test_rate_limit(server: HubServer) -> None:
    peft_repo(server)
    server.force = (429, {"Retry-After": "7"})
    start = time.monotonic()
    with pytest.raises(HubError, match=r"rate limiting this client \(429 Too Many Requests\)") as e:
        hub.fetch("someone/llama-lora")
    assert e.value.hint == "wait 7 s and try again"
    assert time.monotonic() - start < 5


def test_no_network_fails_fast_and_falls_back_to_the_cache(server: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    peft_repo(server)
    warm = hub.fetch("someone/llama-lora")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    set_env(monkeypatch, HF_ENDPOINT=dead)
    assert hub.fetch("someone/llama-lora") == warm  # the Hub is unreachable: the cached snapshot serves
    start = time.monotonic()
    with pytest.raises(HubError, match=r"someone/other .* is not in the cache .*cannot be reached") as e:
        hub.fetch("someone/other")
    assert time.monotonic() - start < 5
    assert e.value.hint and "check the network" in e.value.hint


@pytest.fixture
def silent_port() -> Iterator[str]:
    """A server that accepts connections and never answers: a request to it would hang."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def raised_within(seconds: float, call: Any) -> BaseException:
    """Run ``call`` in a thread; fail the test if it has not raised within ``seconds`` (a hang fails, not blocks)."""
    result: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as e:
            result.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still waiting after {seconds} s"
    assert result, "it did not raise"
    return result[0]


def test_a_silent_hub_times_out(hf_env: Path, silent_port: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub's shared client has no timeout: loratools passes one to every metadata call."""
    import huggingface_hub.constants as constants

    set_env(monkeypatch, HF_ENDPOINT=silent_port)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 0.5)  # huggingface_hub's own parser takes integers only
    e = raised_within(5, lambda: hub.fetch("someone/llama-lora"))
    assert isinstance(e, HubError) and "cannot be reached" in e.message


def test_offline_with_an_empty_cache_fails_fast(
    hf_env: Path, silent_port: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_env(monkeypatch, HF_ENDPOINT=silent_port, HF_HUB_OFFLINE="1")
    e = raised_within(5, lambda: hub.fetch("someone/llama-lora"))
    assert isinstance(e, HubError)
    assert "someone/llama-lora (revision 'main') is not in the cache" in e.message
    assert "HF_HUB_OFFLINE is set" in e.message
    with pytest.raises(HubError, match="cannot push while HF_HUB_OFFLINE is set"):
        publish(FIXTURES / "peft_llama", "me/a")


def test_offline_with_a_warm_cache_works(server: HubServer, silent_port: str, monkeypatch: pytest.MonkeyPatch) -> None:
    peft_repo(server)
    warm = hub.fetch("someone/llama-lora")
    server.stop()
    set_env(monkeypatch, HF_ENDPOINT=silent_port, HF_HUB_OFFLINE="1")
    start = time.monotonic()
    assert hub.fetch("someone/llama-lora") == warm
    assert hub.fetch("someone/llama-lora", revision=warm.name) == warm  # by commit
    assert time.monotonic() - start < 5
    assert inspect(warm, norms=False).num_modules == 8
    with pytest.raises(HubError, match="not in the cache"):
        hub.fetch("someone/llama-lora", revision="v2")
    with pytest.raises(HubError, match="has no file or folder base2"):
        hub.fetch("someone/llama-lora/base2")


def test_errors_are_one_line_without_the_token(server: HubServer) -> None:
    """Every mapped error: one line, no token, through the CLI's own error path."""

    @click.command("get")
    @click.argument("arg")
    def get_cmd(arg: str) -> None:
        hub.fetch(arg)

    peft_repo(server, "someone/gated", gated=True)
    group = Group(name="loratools", commands=[get_cmd])
    for arg in ("nobody/nothing", "someone/gated", "someone/gated/nope.safetensors"):
        r = CliRunner().invoke(group, ["get", arg])
        assert r.exit_code == 1, r.output
        lines = r.stderr.strip().splitlines()
        assert [line.split(":")[0] for line in lines] in (["Error"], ["Error", "Hint"]), r.stderr
        assert TOKEN not in r.output


def test_a_mix_of_hub_inputs_records_their_repo_ids(server: HubServer, tmp_path: Path) -> None:
    """Provenance names the repo id a source was fetched as, not the cache path it landed in."""
    import json as _json

    from conftest import run_cli

    peft_repo(server)
    code, _, err = run_cli("resize", "someone/llama-lora", "--rank", "2", "-o", str(tmp_path / "small"))
    assert code == 0, err
    made = _json.loads(load_adapter(tmp_path / "small").metadata["loratools"])
    assert made["inputs"][0]["source"] == "someone/llama-lora"
    assert (
        made["inputs"][0]["sha256"]
        == hashlib.sha256((FIXTURES / "peft_llama" / "adapter_model.safetensors").read_bytes()).hexdigest()
    )


def test_gguf_export_reads_the_base_config_from_the_hub(server: HubServer, mf: Any, tmp_path: Path) -> None:
    """No --base: the adapter's base_model_name_or_path names a Hub model, and only its config.json is fetched."""
    import json as _json
    import shutil as _shutil

    from conftest import run_cli

    mf.tiny_llama().save_pretrained(tmp_path / "llama")
    server.add_repo(
        "someone/tiny-llama",
        {
            "config.json": (tmp_path / "llama" / "config.json").read_bytes(),
            "model.safetensors": (tmp_path / "llama" / "model.safetensors").read_bytes(),
        },
    )
    adapter = tmp_path / "adapter"
    _shutil.copytree(FIXTURES / "peft_llama", adapter)
    cfg = _json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someone/tiny-llama"
    (adapter / "adapter_config.json").write_text(_json.dumps(cfg))
    code, _, err = run_cli("convert", str(adapter), "--to", "gguf", "-o", str(tmp_path / "a.gguf"))
    assert code == 0, err  # the CLI resolves the Hub id; ops.convert takes the config.json it fetched
    assert server.downloads("someone/tiny-llama") == ["config.json"]
    import gguf

    assert gguf.GGUFReader(tmp_path / "a.gguf").get_field("general.architecture").contents() == "llama"


# ---- header-only reads ------------------------------------------------------------------------------------------------


def split_base(tmp_path: Path, mf: Any, *, shards: int = 2) -> dict[str, bytes]:
    """tiny_llama's files as a Hub repo holds them: config.json, its weights in ``shards`` shards with an index, and
    big files nobody reading names and shapes needs."""
    from safetensors.torch import load_file, save_file

    mf.tiny_llama().save_pretrained(tmp_path / "llama")
    tensors = load_file(tmp_path / "llama" / "model.safetensors")
    names = sorted(tensors)
    files: dict[str, bytes] = {"config.json": (tmp_path / "llama" / "config.json").read_bytes()}
    weight_map = {}
    for i in range(shards):
        part = {n: tensors[n].contiguous() for n in names[i::shards]}
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, tmp_path / name, metadata={"format": "pt"})
        files[name] = (tmp_path / name).read_bytes()
        weight_map |= dict.fromkeys(part, name)
    files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    files["tokenizer.json"] = b'{"model": "' + b"x" * 100_000 + b'"}'
    files["pytorch_model.bin"] = b"\0" * 1_000_000
    return files


def test_validate_against_a_hub_base_reads_headers_only(server: HubServer, mf: Any, tmp_path: Path) -> None:
    """`validate --base owner/model` needs names and shapes: each shard's header by range requests, no weights."""
    from conftest import run_cli

    files = split_base(tmp_path, mf)
    server.add_repo("org/llama", files)
    code, out, err = run_cli("validate", str(FIXTURES / "peft_llama"), "--base", "org/llama", "--json")
    assert code == 0, err
    remote = json.loads(out)
    assert sorted(server.downloads("org/llama")) == ["config.json", "model.safetensors.index.json"]
    shards = sorted(n for n in files if n.startswith("model-"))
    assert sorted({p for p, _ in server.ranged("org/llama")}) == shards
    assert all(r.startswith("bytes=0-") for _, r in server.ranged("org/llama"))
    code, out, err = run_cli("validate", str(FIXTURES / "peft_llama"), "--base", str(tmp_path / "llama"), "--json")
    assert json.loads(out) == remote  # the same findings as against the whole base (none)
    # a base the adapter does not fit: the same findings as well
    gpt2 = tmp_path / "gpt2"
    mf.tiny_gpt2().save_pretrained(gpt2)
    server.add_repo("org/gpt2", {p.name: p.read_bytes() for p in gpt2.iterdir() if p.is_file()})
    remote = json.loads(run_cli("validate", str(FIXTURES / "peft_llama"), "--base", "org/gpt2", "--json")[1])
    local = json.loads(run_cli("validate", str(FIXTURES / "peft_llama"), "--base", str(gpt2), "--json")[1])
    assert remote["findings"] and remote["findings"] == local["findings"]
    assert "model.safetensors" not in server.downloads("org/gpt2")


def test_a_long_header_takes_a_second_range(server: HubServer, tmp_path: Path) -> None:
    """A header longer than the first range (100 kB) is read with a second one, from where the first ended."""
    from conftest import run_cli

    from loratools.hub import headers

    names = {f"model.layers.{i}.mlp.up_proj.weight": np.zeros((2, 2), np.float32) for i in range(3000)}
    data = st_save(names)
    assert int.from_bytes(data[:8], "little") > headers.FIRST
    server.add_repo("org/long", {"model.safetensors": data})
    code, _, err = run_cli("validate", str(FIXTURES / "peft_llama"), "--base", "org/long", "--json")
    assert code == 1, err  # findings: the adapter's modules are not in this base
    assert [r for _, r in server.ranged("org/long")] == [
        f"bytes=0-{headers.FIRST - 1}",
        f"bytes={headers.FIRST}-{int.from_bytes(data[:8], 'little') + 7}",
    ]
    assert server.downloads("org/long") == []


def test_convert_with_a_hub_base_reads_headers_only(server: HubServer, mf: Any, tmp_path: Path) -> None:
    """`convert --to gguf --base owner/model`: the base's names (its blocks) and config.json, not its weights; the
    export is the one made with the whole base."""
    from conftest import run_cli

    server.add_repo("org/llama", split_base(tmp_path, mf))
    code, _, err = run_cli("convert", str(FIXTURES / "peft_llama"), "--to", "gguf", "--base", "org/llama", "-o", str(tmp_path / "hub.gguf"))  # fmt: skip
    assert code == 0, err
    assert sorted(server.downloads("org/llama")) == ["config.json", "model.safetensors.index.json"]
    code, _, err = run_cli("convert", str(FIXTURES / "peft_llama"), "--to", "gguf", "--base", str(tmp_path / "llama"), "-o", str(tmp_path / "local.gguf"))  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "hub.gguf").read_bytes() == (tmp_path / "local.gguf").read_bytes()


def test_a_gguf_export_that_compares_base_tensors_fetches_the_base(server: HubServer, mf: Any, tmp_path: Path) -> None:
    """An adapter with PEFT's saved base layer: the export compares it with the base's own (and drops it when it is
    the same), so a Hub base is fetched whole (a header-only view has no tensor data); the export is the one made
    with a local base."""
    from conftest import run_cli
    from safetensors.torch import load_file, save_file

    from loratools.ops.convert import reads_base_weights

    adapter = tmp_path / "embed"  # peft_llama_embed without its modules_to_save (GGUF cannot hold those)
    adapter.mkdir()
    tensors = load_file(FIXTURES / "peft_llama_embed" / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if "lm_head" not in k}, adapter / "adapter_model.safetensors")
    cfg = json.loads((FIXTURES / "peft_llama_embed" / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "modules_to_save": None}))
    assert reads_base_weights(adapter, "gguf") and not reads_base_weights(adapter, "kohya")
    server.add_repo("org/llama", split_base(tmp_path, mf))
    args = ["convert", str(adapter), "--to", "gguf"]
    code, _, err = run_cli(*args, "--base", "org/llama", "-o", str(tmp_path / "hub.gguf"))
    assert code == 0, err
    assert "unchanged copy of the base's model.embed_tokens.weight" in err  # compared with the real tensor
    assert sorted(n for n in server.downloads("org/llama") if n.startswith("model-")) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
    ]  # fmt: skip
    code, _, err = run_cli(*args, "--base", str(tmp_path / "llama"), "-o", str(tmp_path / "local.gguf"))
    assert code == 0, err
    assert (tmp_path / "hub.gguf").read_bytes() == (tmp_path / "local.gguf").read_bytes()


@pytest.mark.parametrize(
    ("files", "weights", "whole"),
    [
        pytest.param("peft_llama", "adapter_model.safetensors", False, id="peft"),
        pytest.param("diffusers_sd", "pytorch_lora_weights.safetensors", False, id="diffusers"),
        pytest.param("kohya_sd", "lora.safetensors", True, id="kohya-alphas-are-read"),
        pytest.param("lycoris_loha.safetensors", "lycoris_loha.safetensors", True, id="lycoris-alphas-are-read"),
    ],
)
def test_inspect_fast_by_repo_id_reads_headers_only(server: HubServer, files: str, weights: str, whole: bool) -> None:
    """`inspect --fast owner/name` reads the weights' header by range requests; a file whose header lists values a
    reader reads (kohya's alphas) is downloaded whole. The answer is the local file's."""
    from conftest import run_cli

    src = FIXTURES / files
    content = {p.name: p.read_bytes() for p in src.iterdir()} if src.is_dir() else {src.name: src.read_bytes()}
    server.add_repo("someone/a", {**content, "README.md": b"# card\n"})
    code, out, err = run_cli("inspect", "someone/a", "--fast", "--json")
    assert code == 0, err
    remote = json.loads(out)
    local = json.loads(run_cli("inspect", str(src), "--fast", "--json")[1])
    remote.pop("source"), local.pop("source")
    assert remote == local
    assert (weights in server.downloads("someone/a")) is whole
    assert bool(server.ranged("someone/a")) is True


def test_header_views_leave_no_stub_behind(
    server: HubServer, mf: Any, tmp_path: Path, hf_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stub never enters the cache, and its temporary folder is gone when the command ends."""
    import tempfile

    from conftest import run_cli

    server.add_repo("org/llama", split_base(tmp_path, mf))
    before = set(Path(tempfile.gettempdir()).glob("loratools-headers-*"))
    code, _, err = run_cli("validate", str(FIXTURES / "peft_llama"), "--base", "org/llama")
    assert code == 0, err
    assert set(Path(tempfile.gettempdir()).glob("loratools-headers-*")) == before
    cached = {p.name for p in (hf_env / "hub").rglob("*") if p.is_file() or p.is_symlink()}
    assert not any(n.startswith("model-") for n in cached)
    # offline, no view can be made and the cache holds no weights: one line says so, at once
    set_env(monkeypatch, HF_HUB_OFFLINE="1")
    code, _, err = run_cli("validate", str(FIXTURES / "peft_llama"), "--base", "org/llama")
    assert code == 2 and "in the cache" in err and "HF_HUB_OFFLINE is set" in err
    # with the whole base cached (a merge fetched it), offline reads it from the cache
    set_env(monkeypatch, HF_HUB_OFFLINE=None)
    hub.fetch("org/llama", kind="checkpoint")
    server.ranges.clear()
    code, _, err = run_cli("validate", str(FIXTURES / "peft_llama"), "--base", "org/llama")
    assert code == 0 and server.ranged("org/llama") == []  # online too: cached weights are read, not their headers
    set_env(monkeypatch, HF_HUB_OFFLINE="1")
    code, _, err = run_cli("validate", str(FIXTURES / "peft_llama"), "--base", "org/llama")
    assert code == 0, err


# ---- model cards ------------------------------------------------------------------------------------------------------


def test_the_card_links_the_base_model_on_the_hub_in_use(server: HubServer) -> None:
    rep = publish(FIXTURES / "peft_llama", "me/a", dry_run=True)
    assert rep.card is not None
    # peft_llama's base (tiny-llama-from-config) is a legacy bare model id: linked on the endpoint in use
    assert f"[tiny-llama-from-config]({server.url}/tiny-llama-from-config)" in rep.card
    assert "https://huggingface.co" not in rep.card


def peft_template(base: str = "") -> str:
    """The README.md PEFT's save_pretrained writes (huggingface_hub's template), for a model it knew no name for."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(base_model=base, library_name="peft", tags=[f"base_model:adapter:{base}", "lora", "transformers"])  # fmt: skip
    return str(ModelCard.from_template(data))


def test_peft_template_with_an_empty_base_model_gets_the_facts(server: HubServer, tmp_path: Path) -> None:
    """PEFT's own push fills a template card's base model in: so does loratools', never touching the prose."""
    src = tmp_path / "adapter"
    shutil.copytree(FIXTURES / "peft_llama", src)
    cfg = json.loads((src / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "org/tiny-llama"}))
    template = peft_template()
    (src / "README.md").write_text(template)
    rep = publish(src, "me/t")
    assert rep.card_action == "filled"
    assert (src / "README.md").read_text() == template  # the folder is left alone
    meta, body = front_matter(server.files("me/t")["README.md"].decode())
    assert meta["base_model"] == "org/tiny-llama" and meta["base_model_relation"] == "adapter"
    assert meta["pipeline_tag"] == "text-generation" and meta["library_name"] == "peft"
    assert meta["tags"] == ["base_model:adapter:org/tiny-llama", "lora", "transformers"]  # completed, none added
    assert body == template.split("\n---\n", 1)[1]  # the prose as PEFT wrote it
    # a template whose base_model the user filled in stays as it is
    (src / "README.md").write_text(peft_template("someone/else"))
    assert publish(src, "me/t", dry_run=True).card_action == "kept"
    # and so does one with nothing to fill in (the adapter names no Hub model)
    (src / "README.md").write_text(template)
    (src / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "/local/path/x"}))
    assert publish(src, "me/t", dry_run=True).card_action == "kept"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        pytest.param("---\n- a\n---\nx", "its front matter is not a YAML mapping", id="a-list"),
        pytest.param("---\na: [\n---\nx", "its YAML front matter does not parse", id="broken-yaml"),
        pytest.param("---\n1: x\n---\nx", "README.md: its front matter", id="a-number-key"),
    ],
)
def test_a_bad_front_matter_is_one_line(server: HubServer, tmp_path: Path, text: str, says: str) -> None:
    src = tmp_path / "adapter"
    shutil.copytree(FIXTURES / "peft_llama", src)
    (src / "README.md").write_text(text)
    with pytest.raises(FileFormatError, match=re.escape(says)):
        publish(src, "me/x", update_card=True, dry_run=True)
    assert server.log == []


def test_a_byte_order_mark_before_the_front_matter(server: HubServer, tmp_path: Path) -> None:
    src = tmp_path / "adapter"
    shutil.copytree(FIXTURES / "peft_llama", src)
    (src / "README.md").write_text("\ufeff---\nlicense: mit\n---\n# Mine\n")
    rep = publish(src, "me/x", update_card=True, dry_run=True)
    assert rep.card is not None and rep.card.startswith("---\n") and rep.card.count("---\n") == 2
    meta, body = front_matter(rep.card)
    assert meta["license"] == "mit" and body == "# Mine\n"


# ---- progress, layers, provenance ---------------------------------------------------------------------------------


def test_downloads_report_to_loratools_bar_and_huggingface_hub_draws_none(
    server: HubServer, capfd: pytest.CaptureFixture[str]
) -> None:
    """One style per run: huggingface_hub's tqdm bars are replaced by a callback that drives loratools' own."""
    files = peft_repo(server)
    seen: dict[str, tuple[int, int | None]] = {}
    hub.fetch("someone/llama-lora", on_bytes=lambda name, done, total: seen.__setitem__(name, (done, total)))
    assert seen == {name: (len(data), len(data)) for name, data in files.items()}
    assert capfd.readouterr().err == ""  # no tqdm bar, no warning


def test_the_cli_download_bar_is_a_rich_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from loratools.cli import output

    screen = io.StringIO()
    console = output.SafeConsole(file=screen, force_terminal=True, width=100)
    monkeypatch.setattr(output, "err_console", lambda: console)
    with output.download_bar() as on_bytes:
        assert on_bytes is not None
        on_bytes("[red]adapter_model.safetensors", 10, 100)  # a name from the Hub is text, not markup
        on_bytes("[red]adapter_model.safetensors", 100, 100)
    assert "downloading [red]adapter_model.safetensors" in screen.getvalue()
    monkeypatch.undo()
    with output.download_bar() as on_bytes:  # not a terminal (the tests' stderr): nothing to report to
        assert on_bytes is None


def test_hub_and_ops_never_import_each_other() -> None:
    """The layers (an import-linter contract holds them too): hub knows no ops and no cli, ops knows no hub; imports
    inside functions count."""
    import ast

    root = Path(hub.__file__).parent.parent

    def imports(package: str) -> set[str]:
        found = set()
        for path in (root / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level:
                    base = ".".join(["loratools", *path.relative_to(root).parent.parts][: len(path.relative_to(root).parts) - node.level + 1])  # fmt: skip
                    found.add(f"{base}.{node.module}" if node.module else base)
                    found.update(f"{base}.{a.name}" for a in node.names if not node.module)
                elif isinstance(node, ast.ImportFrom) and node.module:
                    found.add(node.module)
                elif isinstance(node, ast.Import):
                    found.update(a.name for a in node.names)
        return {f for f in found if f.startswith("loratools")}

    assert not {m for m in imports("hub") if m.startswith(("loratools.ops", "loratools.cli"))}
    assert not {m for m in imports("ops") if m.startswith("loratools.hub")}
    assert "loratools" not in imports("hub")  # the version comes from the leaf loratools.version
    assert not hasattr(hub, "_ORIGINS")


def test_provenance_names_what_the_cli_resolved(tmp_path: Path) -> None:
    """ops take local paths; the name a fetched input is recorded under is passed in, never looked up."""
    from loratools.errors import UsageError
    from loratools.ops.resize import resize

    src = str(FIXTURES / "peft_llama")
    resize(src, tmp_path / "a", 2, origins={src: "someone/llama-lora@v1"})
    made = json.loads(load_adapter(tmp_path / "a").metadata["loratools"])
    assert made["inputs"][0]["source"] == "someone/llama-lora@v1"
    resize(src, tmp_path / "b", 2)
    assert json.loads(load_adapter(tmp_path / "b").metadata["loratools"])["inputs"][0]["source"] == src
    with pytest.raises(UsageError, match="origins must map"):
        resize(src, tmp_path / "c", 2, origins={src: 5})  # type: ignore[dict-item]
    assert not (tmp_path / "c").exists()

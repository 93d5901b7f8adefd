"""The Hub, end to end: the real huggingface_hub client against a Hub-compatible server on 127.0.0.1 (tests/hubserver.py),
pointed at through HF_ENDPOINT. A guard fails any test that tries to reach another host."""

from __future__ import annotations

import hashlib
import json
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
from loratools.cli.push import push_cmd
from loratools.errors import FileFormatError, HubError, LoratoolsError
from loratools.ops.inspect import inspect_adapter

no_internet, hf_env, server = hubserver.no_internet, hubserver.hf_env, hubserver.server  # the shared fixtures


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
    assert hub.resolve("fixtures/peft_llama") == Path("fixtures/peft_llama")
    with pytest.raises(LoratoolsError, match="--revision applies to Hub repo ids"):
        hub.resolve("fixtures/peft_llama", revision="v1")


def test_environment_is_read_per_call(hf_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert hub.environment().token is None and hub.environment().endpoint == "https://huggingface.co"
    (hf_env / "token").parent.mkdir(parents=True, exist_ok=True)
    (hf_env / "token").write_text("hf_from_file\n")
    assert hub.environment().token == "hf_from_file"
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9/")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env = hub.environment()
    assert (env.token, env.endpoint, env.offline, env.cache_dir) == (TOKEN, "http://127.0.0.1:9", True, hf_env / "hub")
    assert TOKEN not in repr(env)


# ---- push ----------------------------------------------------------------------------------------------------------


def test_push_peft_folder_lands_files_and_card(server: HubServer) -> None:
    src = FIXTURES / "peft_llama"
    before = tree(src)
    rep = hub.push(src, "me/llama-lora", message="first upload")
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
    hub.push(src, "me/sd-style")
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
    rep = hub.push(out, "me/mixed")
    readme = server.files("me/mixed")["README.md"].decode()
    _, body = front_matter(readme)
    assert "## How it was made" in body
    assert "mix of peft_llama (0.7) and peft_llama_patterns (0.3), svd to rank 4." in body
    assert "sha256" in body  # the full record, with each input's hash
    assert rep.card == readme


def test_dry_run_sends_nothing(server: HubServer) -> None:
    rep = hub.push(FIXTURES / "peft_llama", "me/llama-lora", dry_run=True)
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
        hub.push(FIXTURES / "peft_llama_bin", "me/bin")
    assert e.value.hint and "--allow-pickles" in e.value.hint
    assert server.log == []
    hub.push(FIXTURES / "peft_llama_bin", "me/bin", allow_pickles=True)
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
        hub.push(src, "me/x", include=["notes.txt"])
    with pytest.raises(LoratoolsError, match="refusing to upload env.txt: a link to a hidden file"):
        hub.push(src, "me/x", include=["env.txt"])
    assert server.log == []
    rep = hub.push(src, "me/x", include=["copy.json"])
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
        hub.push(src, "me/y")


def test_existing_readme_kept_or_updated(server: HubServer, tmp_path: Path) -> None:
    src = tmp_path / "adapter"
    shutil.copytree(FIXTURES / "peft_llama", src)
    own = "---\nlicense: mit\ntags:\n- custom\n---\n# Mine\n\nMy own words.\n"
    (src / "README.md").write_text(own)
    hub.push(src, "me/a")
    assert server.files("me/a")["README.md"].decode() == own
    rep = hub.push(src, "me/a", update_card=True)
    assert (src / "README.md").read_text() == own  # the folder is left alone
    meta, body = front_matter(server.files("me/a")["README.md"].decode())
    assert meta["license"] == "mit" and meta["library_name"] == "peft"
    assert meta["tags"] == ["custom", "lora", "peft", "loratools"]
    assert body == "# Mine\n\nMy own words.\n"
    assert rep.card_action == "updated"


def test_a_repo_readme_is_not_overwritten(server: HubServer) -> None:
    server.add_repo("me/k", {"README.md": b"# hand written\n"})
    rep = hub.push(FIXTURES / "kohya_sd" / "lora.safetensors", "me/k")
    assert rep.card_action == "kept-remote" and rep.card is None
    assert server.files("me/k")["README.md"] == b"# hand written\n"
    assert "lora.safetensors" in server.files("me/k")
    rep = hub.push(FIXTURES / "kohya_sd" / "lora.safetensors", "me/k", update_card=True)
    meta, body = front_matter(server.files("me/k")["README.md"].decode())
    assert meta["tags"] == ["lora", "kohya", "loratools"] and body == "# hand written\n"


def test_push_to_a_branch_and_as_a_pull_request(server: HubServer) -> None:
    hub.push(FIXTURES / "peft_llama", "me/a")
    main = server.repos["me/a"].refs["main"]
    hub.push(FIXTURES / "peft_llama_patterns", "me/a", revision="dev")
    assert server.repos["me/a"].refs["main"] == main
    dev = server.files("me/a", "dev")
    assert (
        dev["adapter_model.safetensors"]
        == (FIXTURES / "peft_llama_patterns" / "adapter_model.safetensors").read_bytes()
    )
    rep = hub.push(FIXTURES / "peft_llama_dora", "me/a", create_pr=True)
    assert rep.pr_url is not None and rep.pr_url.endswith("/me/a/discussions/1")
    assert server.repos["me/a"].refs["main"] == main
    assert "refs/pr/1" in server.repos["me/a"].refs
    with pytest.raises(LoratoolsError, match="--create-pr"):
        hub.push(FIXTURES / "peft_llama", "me/a", create_pr=True, revision="dev")
    hub.push(FIXTURES / "peft_llama", "me/secret", private=True)
    assert server.repos["me/secret"].private and not server.repos["me/a"].private


def test_push_with_a_bad_token_is_one_clear_line(server: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_" + TOKEN)
    with pytest.raises(HubError) as e:
        hub.push(FIXTURES / "peft_llama", "me/a")
    assert "refused the token (401 Unauthorized)" in e.value.message
    assert e.value.hint and "settings/tokens" in e.value.hint
    for text in (e.value.message, e.value.hint, str(e.value)):
        assert TOKEN not in text and "\n" not in text
    assert "me/a" not in server.repos


def test_push_without_a_token(server: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="asks for a token") as e:
        hub.push(FIXTURES / "peft_llama", "me/a")
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
    monkeypatch.setenv("HF_TOKEN", "hf_bad_" + TOKEN)
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
    path = hub.resolve("someone/llama-lora", progress=False)
    assert path.is_relative_to(hf_env / "hub" / "models--someone--llama-lora" / "snapshots")
    assert sorted(server.downloads("someone/llama-lora")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert tree(path) == files
    got, want = inspect_adapter(path), inspect_adapter(FIXTURES / "peft_llama")
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
    path = hub.fetch("someone/sd/loras/style.safetensors", progress=False)
    assert path.name == "style.safetensors" and path.read_bytes() == kohya
    assert server.downloads("someone/sd") == ["loras/style.safetensors"]
    assert inspect_adapter(path, norms=False).format == "kohya"
    with pytest.raises(FileFormatError, match=r"someone/sd/loras holds 2 .safetensors files") as e:
        hub.fetch("someone/sd/loras")
    assert e.value.hint == "name one: someone/sd/loras/other.safetensors"
    server.add_repo("someone/diff", {"pytorch_lora_weights.safetensors": (FIXTURES / "diffusers_sd" / "pytorch_lora_weights.safetensors").read_bytes(), "x.safetensors": b"0"})  # fmt: skip
    assert inspect_adapter(hub.fetch("someone/diff"), norms=False).format == "diffusers"
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
    path = hub.fetch("org/base", kind="checkpoint", progress=False)
    assert sorted(server.downloads("org/base")) == [
        "config.json", "model-1.safetensors", "model-2.safetensors", "model.safetensors.index.json", "tokenizer.json",
    ]  # fmt: skip
    assert sorted(tree(path)) == sorted(server.downloads("org/base"))


def test_a_cached_sharded_checkpoint_reads(server: HubServer) -> None:
    from loratools.io.checkpoint import read_checkpoint

    sharded_repo(server)
    path = hub.fetch("org/base", kind="checkpoint", progress=False)
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
    path = hub.fetch("org/sd", kind="checkpoint", progress=False)
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
    assert (
        inspect_adapter(v1, norms=False).num_params == inspect_adapter(FIXTURES / "peft_llama", norms=False).num_params
    )
    with pytest.raises(HubError, match="has no revision 'nope'"):
        hub.fetch("someone/llama-lora", revision="nope")


# ---- errors ----------------------------------------------------------------------------------------------------------


def test_unknown_repo_and_file(server: HubServer) -> None:
    with pytest.raises(HubError, match=r"^nobody/nothing: no such local file or folder, and no repo nobody/nothing on 127\.0\.0\.1:\d+ \(not found, or private\)$"):  # fmt: skip
        hub.resolve("nobody/nothing")  # a SOURCE that could have been a local path: the error says so first
    with pytest.raises(HubError, match=r"^no repo nobody/nothing on 127\.0\.0\.1:\d+ \(not found, or private\)$"):
        hub.fetch("nobody/nothing")
    with pytest.raises(HubError, match=r"^no repo nobody/nothing on"):
        hub.resolve("hf://nobody/nothing")
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
    monkeypatch.setenv("HF_ENDPOINT", dead)
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
    monkeypatch.setenv("HF_ENDPOINT", silent_port)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "0.5")
    e = raised_within(5, lambda: hub.fetch("someone/llama-lora"))
    assert isinstance(e, HubError) and "cannot be reached" in e.message


def test_offline_with_an_empty_cache_fails_fast(
    hf_env: Path, silent_port: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", silent_port)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    e = raised_within(5, lambda: hub.fetch("someone/llama-lora"))
    assert isinstance(e, HubError)
    assert "someone/llama-lora (revision 'main') is not in the cache" in e.message
    assert "HF_HUB_OFFLINE is set" in e.message
    with pytest.raises(HubError, match="cannot push while HF_HUB_OFFLINE is set"):
        hub.push(FIXTURES / "peft_llama", "me/a")


def test_offline_with_a_warm_cache_works(server: HubServer, silent_port: str, monkeypatch: pytest.MonkeyPatch) -> None:
    peft_repo(server)
    warm = hub.fetch("someone/llama-lora")
    server.stop()
    monkeypatch.setenv("HF_ENDPOINT", silent_port)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    assert hub.fetch("someone/llama-lora") == warm
    assert hub.fetch("someone/llama-lora", revision=warm.name) == warm  # by commit
    assert time.monotonic() - start < 5
    assert inspect_adapter(warm, norms=False).num_modules == 8
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

    from loratools.ops.convert import convert

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
    convert(adapter, "gguf", tmp_path / "a.gguf")
    assert server.downloads("someone/tiny-llama") == ["config.json"]
    import gguf

    assert gguf.GGUFReader(tmp_path / "a.gguf").get_field("general.architecture").contents() == "llama"

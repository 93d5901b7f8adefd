"""Hostile regular expressions: from a config (``rank_pattern``, ``alpha_pattern``, ``target_modules``) and from
the command line (``extract --include/--exclude``).

Python's ``re`` takes minutes or hours on a pattern such as ``(.|.)*[XY]``; loratools matches with ``re``'s exact
semantics (what PEFT uses) at bounded cost, and refuses what it cannot match in time with an ``Error:`` naming
the pattern and the field. Invalid patterns are refused, as PEFT fails on them. Patterns that the ``regex``
module reads differently from ``re`` (``[[:alpha:]]``, ``a{e<=1}``) keep ``re``'s meaning.
"""

from __future__ import annotations

import json
import random
import re
import time
import warnings
from pathlib import Path

import hostile
import pytest
import readers_kit as kit
import torch
from readers_kit import FIXTURES

from loratools.errors import FileFormatError
from loratools.formats import patterns
from loratools.io.safetensors import write_safetensors

#: patterns on which Python's re backtracks catastrophically on a module name, and so does an unguarded regex
CATASTROPHIC = [
    "(.|.)*[XY]",
    r"(\w|\W|.)*[0-9]{2}",
    "(.|..)*[A-Z]",
    r"(.|.)*\d{3}",
    r"(.|.)*(x|\d{3})",
    "((.|.)*[XY])*",
]
#: patterns on which re hangs but whose answer the bounded matcher finds at once (a required literal is missing)
QUICK = ["(.|.)*Z", "(a|a)*Z", "(.*)*Z", "((.+)+)+Z"]
#: not regular expressions to Python's re (PEFT raises on them): refused, named
INVALID = ["(", "[", "*", "(?P<x>", "\\", "a{2,1}", r"(?<=a+)b", r"\p{L}+", "(?|a)", "(?i)q_proj", "(?P=nope)"]

SECONDS = 10.0  # the bounded cost: the budget (patched small below) plus the reading around it


def first_in_default_run(values: list[str], keep: int = 1) -> list[object]:
    """All of ``values`` as parameters, those after the first ``keep`` marked slow (``make reliability``)."""
    return [v if i < keep else pytest.param(v, marks=pytest.mark.slow) for i, v in enumerate(values)]


@pytest.fixture(autouse=True)
def small_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tenth of a CPU second per pattern set instead of two: the same path, a faster battery."""
    monkeypatch.setattr(patterns, "BUDGET", 0.1)
    patterns._SETS.clear()


def config(tmp: Path, field: str, pattern: str, value: object = 4) -> Path:
    if field == "target_modules":
        return kit.peft_folder(tmp / "adapter", {"target_modules": pattern})
    return kit.peft_folder(tmp / "adapter", {field: {pattern: value}})


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base with the weights the PEFT fixture targets (its shapes; values made up)."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(2):
        for proj, out in (("q_proj", 32), ("k_proj", 16), ("v_proj", 16), ("o_proj", 32)):
            tensors[f"model.layers.{layer}.self_attn.{proj}.weight"] = torch.randn(out, 32, generator=g)
    p = tmp_path_factory.mktemp("base") / "model.safetensors"
    write_safetensors(p, tensors)
    return p


# ---- catastrophic patterns: an Error naming the pattern and the field, in bounded time --------------------------------


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
@pytest.mark.parametrize("pattern", first_in_default_run(CATASTROPHIC, keep=2))
def test_catastrophic_pattern_is_refused_in_time(tmp_path: Path, base: Path, field: str, pattern: str) -> None:
    src = config(tmp_path, field, pattern)
    says = [field, repr(pattern), "too long"]
    hostile.run(["inspect", src], inputs=[src], code=1, says=says, seconds=SECONDS)
    kit.validate([src], inputs=[src], ok=False, codes={"unreadable"}, says="too long", seconds=SECONDS)
    out = tmp_path / "merged"
    hostile.run(["merge", base, src, "-o", out], inputs=[src, base], out=out, says=says, seconds=SECONDS)


@pytest.mark.parametrize("pattern", first_in_default_run(CATASTROPHIC))
def test_catastrophic_target_modules(tmp_path: Path, pattern: str) -> None:
    """target_modules is matched by validate (does any module match?): a finding, in bounded time; inspect does
    not match it at all."""
    src = config(tmp_path, "target_modules", pattern)
    kit.validate([src], inputs=[src], ok=False, codes={"unreadable"}, says="target_modules", seconds=SECONDS)
    hostile.run(["inspect", src], inputs=[src], code=0, seconds=SECONDS)


@pytest.mark.slow
def test_default_budget_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At the shipped budget (2 s) too: the whole command well under the harness's limit."""
    monkeypatch.setattr(patterns, "BUDGET", 2.0)
    src = config(tmp_path, "rank_pattern", CATASTROPHIC[0])
    t0 = time.process_time()
    hostile.run(["inspect", src], inputs=[src], code=1, says="too long", seconds=8)
    assert time.process_time() - t0 > 1.5  # the budget (CPU seconds) was really spent: the pattern is catastrophic


# ---- patterns Python's re hangs on, answered at once ------------------------------------------------------------------


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern", "target_modules"])
@pytest.mark.parametrize("pattern", first_in_default_run(QUICK))
def test_pattern_that_hangs_re_is_answered(tmp_path: Path, base: Path, field: str, pattern: str) -> None:
    """The issue's own example: ``(.|.)*Z`` hung inspect, validate and merge. It matches no module, so the config's
    r and lora_alpha hold; target_modules matching nothing is a warning."""
    src = config(tmp_path, field, pattern)
    hostile.run(["inspect", src], inputs=[src], code=0, seconds=SECONDS)
    rep = kit.validate([src], inputs=[src], ok=True, seconds=SECONDS)
    if field == "target_modules":
        assert [f["code"] for f in rep["findings"]] == ["target-unmatched"]
    out = tmp_path / "merged.safetensors"  # (output modes are another part of issue 12: not checked here)
    hostile.run(["merge", base, src, "-o", out], inputs=[src, base], code=0, seconds=SECONDS)
    assert out.is_file()


# ---- invalid patterns: refused as PEFT fails on them -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "pattern"),
    [
        (f, p)
        for f in ("rank_pattern", "alpha_pattern", "target_modules")
        for p in INVALID
        # valid on its own: the global flag is only misplaced inside PEFT's rank/alpha wrapper
        if not (f == "target_modules" and p == "(?i)q_proj")
    ],
)
def test_invalid_pattern_is_refused(tmp_path: Path, field: str, pattern: str) -> None:
    src = config(tmp_path, field, pattern)
    says = [field, "not a valid regular expression"]
    hostile.run(["inspect", src], inputs=[src], code=1, says=says, seconds=SECONDS)
    kit.validate([src], inputs=[src], ok=False, says="not a valid regular expression", seconds=SECONDS)


def test_key_that_breaks_out_of_peft_wrapper(tmp_path: Path) -> None:
    """PEFT pastes the key into ``(.*\\.)?({key})$``: ``a)|(.*`` is then a valid pattern that matches every name,
    with PEFT's meaning, not a refusal."""
    src = kit.peft_folder(tmp_path / "adapter", {"alpha_pattern": {"a)|(.*": 16}})
    out = hostile.run(["inspect", "--json", src], inputs=[src], code=0)
    assert {m["alpha"] for m in json.loads(out.stdout)["modules"]} == {16.0}


# ---- re's meaning, never the regex module's --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "q_alpha"),
    [
        ("[[:alpha:]]+_proj", 8.0),  # regex: a POSIX class matching q_proj; re: a set, then "]+_proj": no match
        ("q_proj{e<=1}", 8.0),  # regex: fuzzy, matching k_proj too; re: the literal text "q_proj{e<=1}"
        ("(?i:Q_PROJ)", 16.0),  # scoped flag: matches q_proj in both
        ("self_attn\\.q_proj", 16.0),
        ("layers\\.0\\..*q_proj", None),  # layer 0 only
    ],
)
def test_patterns_mean_what_re_means(tmp_path: Path, pattern: str, q_alpha: float | None) -> None:
    src = kit.peft_folder(tmp_path / "adapter", {"alpha_pattern": {pattern: 16}})
    out = hostile.run(["inspect", "--json", src], inputs=[src], code=0)
    alphas = {m["name"]: m["alpha"] for m in json.loads(out.stdout)["modules"]}
    for name, alpha in alphas.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = 16.0 if re.match(rf"(.*\.)?({pattern})$", name) else 8.0
        assert alpha == expected, (name, alpha, expected)
    if q_alpha is not None:
        assert alphas["model.layers.0.self_attn.q_proj"] == q_alpha


def test_first_key_in_order_wins(tmp_path: Path) -> None:
    """PEFT's get_pattern_key: the first key in the config's order that matches, not the most specific."""
    src = kit.peft_folder(tmp_path / "adapter", {"alpha_pattern": {"self_attn\\..*": 2, "q_proj": 16, "proj": 4}})
    out = hostile.run(["inspect", "--json", src], inputs=[src], code=0)
    assert {m["alpha"] for m in json.loads(out.stdout)["modules"]} == {2.0}
    # "proj" must follow a dot or start the name: it matches none of these modules, so lora_alpha holds
    src = kit.peft_folder(tmp_path / "adapter2", {"alpha_pattern": {"proj": 4, "q_proj": 16}})
    out = hostile.run(["inspect", "--json", src], inputs=[src], code=0)
    alphas = {m["name"].rpartition(".")[2]: m["alpha"] for m in json.loads(out.stdout)["modules"]}
    assert alphas == {"q_proj": 16.0, "k_proj": 8.0, "v_proj": 8.0, "o_proj": 8.0}


def test_overlong_pattern_and_name(tmp_path: Path) -> None:
    src = config(tmp_path, "rank_pattern", "a" * (patterns.MAX_PATTERN + 1))
    hostile.run(["inspect", src], inputs=[src], code=1, says=["rank_pattern", "longer than"])
    ps = patterns.pattern_set([r".*\.q_proj"], "config rank_pattern", "peft")
    hostile.call(ps.first, "x." * 3000, raises=FileFormatError, says="too long to match")


def test_non_ascii_name_against_a_class_pattern_is_refused_not_guessed() -> None:
    """re and regex read \\w and (?i) differently outside ASCII: such a name is refused, not matched wrongly."""
    ps = patterns.pattern_set([r"\w+_proj"], "config rank_pattern", "peft")
    assert ps.first("model.q_proj") == r"\w+_proj"
    hostile.call(ps.first, "model.\u00b2_proj", raises=FileFormatError, says="not ASCII")
    plain = patterns.pattern_set(["[a-z]+_proj"], "config alpha_pattern", "peft")
    assert plain.first("model.\u00e9.q_proj") == "[a-z]+_proj"  # no class, no flag: exact for any name


def test_the_matcher_agrees_with_re() -> None:
    """A differential test: random patterns over re's syntax, random names; the bounded matcher gives re's answer
    (for ASCII names where the pattern uses classes or (?i)). ``make reliability`` runs it longer (slow test)."""
    _differential(1500, seed=1)


@pytest.mark.slow
def test_the_matcher_agrees_with_re_long() -> None:
    _differential(100_000, seed=2)


def _differential(n: int, seed: int) -> None:
    toks = [
        "a", "b", ".", "\\.", "*", "+", "?", "|", "(", ")", "(?:", "[ab]", "[^a]", "[a-c]", "\\d", "\\w", "\\W",
        "\\s", "\\S", "^", "$", "\\b", "\\B", "\\A", "\\Z", "{2}", "{1,3}", "*?", "+?", "(?=a)", "(?!b)",
        "(?<=a)", "(?<!b)", "\\1", "(?P<n>", "(?P=n)", "(?i:", "(?s:", "(?a:", "[[:alpha:]]", "{e<=1}", "\n",
        "_", "0", "(?>", "*+", "(?(1)a|b)", "[\\d.]", "\\x41", "A", "[^\\w]", "{0}", "é",
    ]  # fmt: skip
    names = ["", "a", "ab", "a.b", "model.layers.0.q_proj", "aa\n", "a\nb", "A.B", "ba.", "x\x1c y", "é", "a_é"]
    rng = random.Random(seed)
    checked = 0
    for _ in range(n):
        p = "".join(rng.choice(toks) for _ in range(rng.randint(1, 6)))
        for mode in ("peft", "fullmatch", "search"):
            full = patterns.peft_compose(p) if mode == "peft" else p
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    want_re = re.compile(full)
            except re.error:
                assert isinstance(patterns._compiled(full), str)  # refused, as PEFT would fail
                continue
            rx = patterns._compiled(full)
            if isinstance(rx, str):
                assert "case-insensitive non-ASCII" in rx, (full, rx)
                continue
            if mode == "search" and "(?a:" in p:
                continue  # CPython's search prefix check ignores a scoped (?a:...) at the start (its own bug)
            for s in names:
                if rx.ascii_only and not s.isascii():
                    continue
                method = "match" if mode == "peft" else mode
                want = getattr(want_re, method)(s) is not None
                got = getattr(rx.compiled, method)(s) is not None
                assert want == got, (mode, p, s, want, got, patterns.translate(full)[0])
                checked += 1
    assert checked > n  # the random patterns were mostly valid and mostly compared


# ---- extract's own --include / --exclude ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(1)
    w = {f"model.layers.{i}.q_proj.weight": torch.randn(8, 8, generator=g) for i in range(2)}
    tuned = {k: v + torch.randn(8, 1, generator=g) @ torch.randn(1, 8, generator=g) for k, v in w.items()}
    d = tmp_path_factory.mktemp("pair")
    write_safetensors(d / "base.safetensors", w)
    write_safetensors(d / "tuned.safetensors", tuned)
    return d / "base.safetensors", d / "tuned.safetensors"


@pytest.mark.parametrize("option", ["--include", "--exclude"])
@pytest.mark.parametrize("pattern", [CATASTROPHIC[0], *first_in_default_run(["(", r"\p{L}"])])
def test_extract_patterns(tmp_path: Path, pair: tuple[Path, Path], option: str, pattern: str) -> None:
    base, tuned = pair
    out = tmp_path / "out"
    hanging = pattern in CATASTROPHIC  # valid but too costly: a data error; invalid: a usage error
    says = [option, "too long" if hanging else "not a regular expression"]
    args = ["extract", base, tuned, "--rank", "1", option, pattern, "-o", out]
    hostile.run(args, inputs=[base, tuned], code=1 if hanging else 2, out=out, says=says, seconds=SECONDS)


def test_extract_pattern_hanging_re_is_answered(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    base, tuned = pair
    out = tmp_path / "out"
    args = ["extract", base, tuned, "--rank", "1", "--exclude", QUICK[0], "-o", out]
    hostile.run(args, inputs=[base, tuned], code=0, seconds=SECONDS)
    assert len(json.loads((out / "adapter_config.json").read_text())["target_modules"]) > 0


def test_counts() -> None:
    assert FIXTURES.is_dir()
    assert len(CATASTROPHIC) * 3 + len(QUICK) * 3 + len(INVALID) * 3 >= 40

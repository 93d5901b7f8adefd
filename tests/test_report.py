"""The HTML reports: a real merge's page rendered in headless Chromium (no console error, charts with axes and tick
labels, a table that sorts and filters), names from adapters escaped, scales linear with honest ticks, and the
report's name checked before any work."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from chromium_kit import Page, find_chromium
from click.testing import CliRunner
from conftest import FIXTURES

from loratools.cli import cli
from loratools.ops.merge_html import render
from loratools.ops.merge_report import MergeReport, TensorReport
from loratools.ops.report_data import AdapterFacts, layer_and_type
from loratools.ops.report_svg import colour, tick_label, ticks


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium. `make test` installs it where it can (as root with apt-get); where it truly cannot be
    had the page tests are skipped with this reason in the summary, unless LORATOOLS_REQUIRE_CHROMIUM=1 (then they
    fail)."""
    exe = find_chromium()
    if exe is None:
        reason = (
            "CHROMIUM NOT FOUND: the HTML report was NOT rendered in a browser. Install Debian's chromium "
            "(apt-get install chromium; `make test` does it as root) or set LORATOOLS_CHROMIUM"
        )
        if os.environ.get("LORATOOLS_REQUIRE_CHROMIUM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return exe


@pytest.fixture(scope="module")
def merged_page(mf: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report of a real merge: two adapters, weights 1 and 0.5, stored as bf16."""
    tmp = tmp_path_factory.mktemp("report")
    mf.tiny_llama().save_pretrained(tmp / "base")  # type: ignore[attr-defined]
    args = [str(tmp / "base"), str(FIXTURES / "peft_llama"), str(FIXTURES / "peft_llama_patterns")]
    r = CliRunner().invoke(
        cli, ["merge", *args, "--weights", "1,0.5", "--dtype", "bf16", "-o", str(tmp / "out"), "--report", str(tmp / "r.html")]
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    return tmp / "r.html"


CHART_FACTS = """Array.from(document.querySelectorAll("svg.chart")).map(function (svg) {
  return {kind: svg.getAttribute("class"), title: svg.querySelector("title").textContent,
          axes: Array.from(svg.querySelectorAll(".axis")).map(function (a) {
            return {cls: a.getAttribute("class"),
                    ticks: Array.from(a.querySelectorAll("text.tick")).map(function (t) { return t.textContent; }),
                    label: (a.querySelector("text.label") || {}).textContent || ""}; }),
          labels: Array.from(svg.querySelectorAll(":scope > text")).map(function (t) { return t.textContent; }),
          cells: svg.querySelectorAll("rect.cell").length, bars: svg.querySelectorAll("rect.bar").length,
          width: svg.getBoundingClientRect().width};
})"""

COLUMN = """(function (col) {
  var heads = Array.from(document.querySelectorAll("#tensors thead th"));
  var i = heads.findIndex(function (th) { return th.textContent === col; });
  return Array.from(document.querySelectorAll("#tensors tbody tr")).filter(function (r) { return !r.hidden; })
    .map(function (r) { var td = r.cells[i]; return td.hasAttribute("data-v") ? Number(td.getAttribute("data-v"))
                                                                               : td.textContent; });
})"""


def click_header(page: Page, label: str) -> None:
    page.eval(
        f"""Array.from(document.querySelectorAll("#tensors thead th")).find(function (th) {{
              return th.textContent === {json.dumps(label)}; }}).querySelector("button").click()"""
    )


def test_merge_report_in_headless_chromium(chromium: str, merged_page: Path) -> None:
    with Page(chromium) as page:
        page.open(merged_page.as_uri())
        assert page.eval("document.title") == "Merge report"
        # the page's own script ran (it writes the row count) and nothing went wrong: no exception, no console
        # error, nothing the page's policy blocked, no request
        assert page.eval('document.getElementById("tensors-count").textContent') == "14 of 14 rows"
        charts: list[dict[str, Any]] = page.eval(CHART_FACTS)
        kinds = sorted(c["kind"].split()[1] for c in charts)
        assert kinds == ["bars", "heatmap", "heatmap", "heatmap", "histogram"], kinds
        for c in charts:
            assert c["width"] > 100, c
            assert c["axes"], f"{c['title']}: no axis"
            for axis in c["axes"]:
                assert len(axis["ticks"]) >= 2 and all(t.strip() for t in axis["ticks"]), (c["title"], axis)
                assert axis["label"], (c["title"], axis)
            if "heatmap" in c["kind"]:  # a colour scale with ticks, labelled rows and columns
                assert c["cells"] >= 7 and "module type" in c["labels"] and "layer (model.layers.N)" in c["labels"]
                ticks_text = " ".join(c["labels"])
                assert "self_attn.q_proj" in ticks_text or c["cells"]
            if "histogram" in c["kind"]:  # a value axis and a count axis, both numeric and increasing
                x, y = (next(a for a in c["axes"] if a["cls"] == f"axis {k}") for k in "xy")
                xs, ys = [float(t) for t in x["ticks"]], [float(t) for t in y["ticks"]]
                assert xs == sorted(xs) and ys == sorted(ys) and ys[0] == 0, (xs, ys)
                steps = {round(b - a, 12) for a, b in zip(xs, xs[1:], strict=False)}
                assert len(steps) == 1, f"x ticks are not evenly spaced (not linear): {xs}"
                assert c["bars"] >= 1
        # heatmap rows and columns are labelled with the model's own names
        text = page.eval('Array.from(document.querySelectorAll("svg.heatmap text.tick")).map(t => t.textContent)')
        assert {"0", "1", "self_attn.q_proj", "mlp.down_proj"} <= set(text)
        # the table: least retained first, then sorted by whichever header is clicked, both ways
        kept = page.eval(COLUMN + '("retained")')
        assert kept == sorted(kept) and len(kept) == 14
        click_header(page, "relative change")
        rel = page.eval(COLUMN + '("relative change")')
        assert rel == sorted(rel) and rel != page.eval(COLUMN + '("retained")')
        click_header(page, "relative change")
        assert page.eval(COLUMN + '("relative change")') == sorted(rel, reverse=True)
        click_header(page, "tensor")
        names = page.eval(COLUMN + '("tensor")')
        assert names == sorted(names, key=str.lower) and names[0].startswith("model.layers.0.mlp.down_proj")
        # the filter box, and a heatmap cell that fills it
        page.eval(
            'var f = document.querySelector("input.filter"); f.value = "q_proj"; f.dispatchEvent(new Event("input"))'
        )
        shown = page.eval(COLUMN + '("tensor")')
        assert len(shown) == 2 and all("q_proj" in n for n in shown)
        assert page.eval('document.getElementById("tensors-count").textContent') == "2 of 14 rows"
        page.eval(
            'document.querySelector("rect.cell[data-filter=\'model.layers.1.mlp.up_proj\']").dispatchEvent(new MouseEvent("click"))'
        )
        assert page.eval(COLUMN + '("tensor")') == ["model.layers.1.mlp.up_proj.weight"]
        # one file: nothing fetched; light, and dark where the system asks for it
        assert page.eval('performance.getEntriesByType("resource").length') == 0
        background = "getComputedStyle(document.body).backgroundColor"
        assert page.eval(background) == "rgb(255, 255, 255)"
        page.send("Emulation.setEmulatedMedia", session=page.session,
                  features=[{"name": "prefers-color-scheme", "value": "dark"}])  # fmt: skip
        assert page.eval(background) == "rgb(20, 23, 28)"
        assert page.errors == []


HOSTILE = [
    "model.layers.0.</script><script>window.pwned=1</script>.q_proj.weight",
    'model.layers.1.<img src=x onerror="window.pwned=2">.v_proj.weight',
    "model.layers.2.'\"><svg onload=window.pwned=3>.k_proj.weight",
    "model.layers.3.&amp;&lt;b&gt;.o_proj.weight",
]


def hostile_report() -> MergeReport:
    r = MergeReport('base"></p><script>window.pwned=4</script>', "out<b>", ["a</script>.safetensors", "b'.x"],
                    [1.0, 0.5], "cpu", "bf16")  # fmt: skip
    for i, name in enumerate(HOSTILE):
        r.tensors.append(TensorReport(name, [4, 4], "BF16", 2, 1.0 + i, 10.0, 0.1 * (i + 1), 0.5, 0.95 + 0.01 * i, 0,
                                      contributions=[0.5, 0.25 * i]))  # fmt: skip
    r.adapter_facts = [
        AdapterFacts("a</script>.safetensors", "kohya", "<img src=x onerror=window.pwned=5>", 4, [4], [8.0],
                     {"</script>": 4}, {"lora": 4}, 1.0),
        AdapterFacts("b'.x", "peft", None, 4, [2], [], {"q_proj": 4}, {"lora": 4}, 0.5),
    ]  # fmt: skip
    r.warnings.append("not copied: <script>window.pwned=6</script>")
    return r


def test_hostile_names_are_escaped() -> None:
    page = render(hostile_report())
    for bad in ("<script>window", "<img", "<svg onload", 'onerror="', "out<b>", "&lt;b&gt;.o_proj"):
        assert bad not in page, bad
    assert page.count("<script>") == 1 and page.count("</script>") == 1  # the page's own, at its end
    assert "&amp;amp;&amp;lt;b&amp;gt;.o_proj" in page  # escaped once more, shown as it was written


def test_hostile_names_render_as_text_in_chromium(chromium: str, tmp_path: Path) -> None:
    (tmp_path / "r.html").write_text(render(hostile_report()), encoding="utf-8")
    with Page(chromium) as page:
        page.open((tmp_path / "r.html").as_uri())
        assert page.eval("window.pwned === undefined") is True
        assert page.eval('document.querySelectorAll("img, iframe, object, embed, script").length') == 1
        names = page.eval(COLUMN + '("tensor")')
        assert sorted(names) == sorted(HOSTILE)
        assert page.eval('document.getElementById("tensors-count").textContent') == "4 of 4 rows"
        assert page.errors == []


def test_axes_are_linear_with_readable_ticks() -> None:
    """The issue's two values 1.5% apart get ticks that tell them apart, on a linear axis."""
    start, end, marks = ticks(7.24e-2, 7.35e-2)
    assert start <= 7.24e-2 and end >= 7.35e-2 and len(marks) >= 3
    steps = {round(b - a, 15) for a, b in zip(marks, marks[1:], strict=False)}
    assert len(steps) == 1
    labels = [tick_label(v, marks[1] - marks[0]) for v in marks]
    assert len(set(labels)) == len(labels) and all(abs(float(t) - v) < 1e-9 for t, v in zip(labels, marks, strict=True))
    start, end, marks = ticks(0.9615, 0.9619)
    assert [tick_label(v, marks[1] - marks[0]) for v in marks][:2] == ["0.9615", "0.9616"]
    assert tick_label(2.5e-5, 2.5e-5) == "2.5e-05" and tick_label(1200, 200) == "1200" and tick_label(0, 1) == "0"
    assert ticks(3.0, 3.0)[0] < 3.0 < ticks(3.0, 3.0)[1]  # one value: a range around it
    # colours: the ends of the ramp, and a middle value in between
    assert colour(0) == "#440154" and colour(1) == "#fde725" and colour(0.5) not in (colour(0), colour(1))


def test_layer_and_type() -> None:
    assert layer_and_type("model.layers.3.self_attn.q_proj.weight") == ("model.layers.3", "self_attn.q_proj")
    assert layer_and_type("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight") == (
        "down_blocks.1.attentions.0.transformer_blocks.0",
        "attn1.to_q",
    )
    assert layer_and_type("lm_head.weight") == ("", "lm_head")


def test_report_json_has_facts_and_contributions(merged_page: Path) -> None:
    runner_out = merged_page.parent
    r = CliRunner().invoke(
        cli, ["merge", str(runner_out / "base"), str(FIXTURES / "peft_llama"), str(FIXTURES / "peft_llama_patterns"),
              "--weights", "1,0.5", "-o", str(runner_out / "out2"), "--report", str(runner_out / "r.json"), "--json"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    doc = json.loads((runner_out / "r.json").read_text())
    assert json.loads(r.stdout)["summary"] == doc["summary"]
    facts = doc["adapter_facts"]
    assert [f["format"] for f in facts] == ["peft", "peft"] and [f["weight"] for f in facts] == [1.0, 0.5]
    assert facts[0]["ranks"] == [4] and facts[0]["targets"]["q_proj"] == 2
    q = next(t for t in doc["tensors"] if t["name"] == "model.layers.0.self_attn.q_proj.weight")
    assert len(q["contributions"]) == 2 and all(c > 0 for c in q["contributions"])
    gate = next(t for t in doc["tensors"] if t["name"] == "model.layers.0.mlp.gate_proj.weight")
    assert gate["contributions"][0] == 0 and gate["contributions"][1] > 0  # only the second adapter has an MLP
    assert "below_threshold" in doc["summary"]


@pytest.mark.parametrize("name", ["r.pdf", "r", "r.html.txt", "report.JSONL"])
def test_report_name_is_checked_before_any_work(name: str, tmp_path: Path) -> None:
    """A report named neither .html nor .json is a usage error (exit 2) before the base is read, naming the user's
    own file in the hint."""
    missing = tmp_path / "no-such-base"  # never read: the refusal comes first
    r = CliRunner().invoke(cli, ["merge", str(missing), str(FIXTURES / "peft_llama"), "-o", str(tmp_path / "o"),
                                 "--report", str(tmp_path / name)])  # fmt: skip
    assert r.exit_code == 2, r.output
    assert ".json or .html" in r.stderr and "no such" not in r.stderr
    assert str((tmp_path / name).with_suffix(".html")) in r.stderr.replace("\n", "")
    assert not (tmp_path / "o").exists() and not (tmp_path / name).exists()


def chart_checks(page: Page) -> list[dict[str, Any]]:
    """Every chart of the page has axes with at least two tick labels and a title."""
    charts: list[dict[str, Any]] = page.eval(CHART_FACTS)
    for c in charts:
        assert c["axes"] and c["width"] > 100, c
        for axis in c["axes"]:
            assert len(axis["ticks"]) >= 2 and all(t.strip() for t in axis["ticks"]) and axis["label"], (c, axis)
    return charts


def test_extract_and_diff_reports_in_headless_chromium(chromium: str, merged_page: Path) -> None:
    """The same renderer draws extract's page (energy kept, error per module) and diff's (relative difference,
    cosine per pair), from real runs on the merge above."""
    tmp = merged_page.parent
    r = CliRunner().invoke(cli, ["extract", str(tmp / "base"), str(tmp / "out"), "--rank", "2", "-o", str(tmp / "ex"),
                                 "--report", str(tmp / "extract.html")])  # fmt: skip
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["diff", str(tmp / "base"), str(tmp / "out"), "--report", str(tmp / "diff.html")])
    assert r.exit_code == 1 and (tmp / "diff.html").is_file(), r.output  # they differ: exit 1, the page still written
    r = CliRunner().invoke(cli, ["diff", str(tmp / "base"), str(tmp / "out"), "--report", str(tmp / "diff.json")])
    differ = json.loads((tmp / "diff.json").read_text())["differ"]
    assert differ >= 14  # the 14 merged weights, and what the cast to bf16 changed
    with Page(chromium) as page:
        page.open((tmp / "extract.html").as_uri())
        assert page.eval("document.title") == "Extract report"
        kinds = sorted(c["kind"].split()[1] for c in chart_checks(page))
        assert kinds == ["heatmap", "heatmap", "heatmap", "histogram"], kinds
        click_header(page, "error")
        errors = page.eval(COLUMN + '("error")')
        assert len(errors) >= 14 and errors == sorted(errors)
        assert (
            page.eval('document.getElementById("tensors-count").textContent') == f"{len(errors)} of {len(errors)} rows"
        )
        page.open((tmp / "diff.html").as_uri())
        assert page.eval("document.title") == "Diff report"
        kinds = sorted(c["kind"].split()[1] for c in chart_checks(page))
        assert kinds == ["heatmap", "heatmap", "histogram"], kinds
        assert "log10" in page.eval('document.querySelector("svg.histogram .axis.x .label").textContent')
        click_header(page, "cosine")
        cos = page.eval(COLUMN + '("cosine")')
        assert cos == sorted(cos) and len(cos) == 21  # every tensor of the checkpoint, merged or copied
        assert page.errors == []


def test_extract_and_diff_pages_escape_names_too() -> None:
    from loratools.ops.diff import Change, DiffReport, TensorDiff
    from loratools.ops.extract_report import ExtractedModule, ExtractReport, SkippedTensor
    from loratools.ops.report_pages import render_diff, render_extract

    ex = ExtractReport(HOSTILE[0], HOSTILE[1], "out<b>", "peft", 2, None, None, "cpu", "save")
    ex.modules = [ExtractedModule(n.removesuffix(".weight"), [4, 4], "linear", 2, 0.9, 0.1, 1.0) for n in HOSTILE]
    ex.skipped = [SkippedTensor(HOSTILE[2], "<script>window.pwned=7</script>")]
    ex.warnings = ["<img src=x onerror=window.pwned=8>"]
    df = DiffReport(HOSTILE[0], HOSTILE[1], "tensors", 0.0, 0.0)
    df.tensors = [TensorDiff(n, [4, 4], "F32", 0.5, 0.1 * i, 0.99, True) for i, n in enumerate(HOSTILE)]
    df.only_in_a, df.only_in_b = [HOSTILE[3]], [HOSTILE[2]]
    df.changed = [Change(HOSTILE[1], [4, 4], [4, 4], "F32", "BF16")]
    df.notes = ["<svg onload=window.pwned=9>"]
    for page in (render_extract(ex), render_diff(df)):
        for bad in ("<script>window", "<img", "<svg onload", 'onerror="', "out<b>"):
            assert bad not in page, bad
        assert page.count("<script>") == 1 and page.count("</script>") == 1

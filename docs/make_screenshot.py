"""Re-make docs/merge-report.png, the example in docs/merge.md: a real merge of two committed fixtures into a tiny
Llama (stored as bf16), its --report page opened in headless Chromium, the screenshot taken by Chromium.

Run by `make docs` (which installs Debian's chromium where it can); by hand: python docs/make_screenshot.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "fixtures"), str(ROOT / "tests")]

from chromium_kit import find_chromium, screenshot  # noqa: E402
from make_fixtures import tiny_llama  # noqa: E402

OUT = ROOT / "docs" / "merge-report.png"


def main() -> None:
    exe = find_chromium()
    if exe is None:
        sys.exit("make_screenshot: chromium not found (apt-get install chromium, or set LORATOOLS_CHROMIUM)")
    with tempfile.TemporaryDirectory(prefix="loratools-docs-") as tmp:
        work = Path(tmp)
        tiny_llama().save_pretrained(work / "base")
        for name in ("peft_llama", "peft_llama_patterns"):  # relative names, as a user would type them
            shutil.copytree(ROOT / "fixtures" / name, work / name)
        subprocess.run(
            [sys.executable, "-m", "loratools", "merge", "base", "peft_llama", "peft_llama_patterns",
             "--weights", "1,0.5", "--dtype", "bf16", "-o", "merged", "--report", "report.html"],
            cwd=work, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        screenshot(exe, (work / "report.html").as_uri(), OUT, width=1280, height=2250)
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

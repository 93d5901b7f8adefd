# Two commands on a fresh clone: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed only when the environment has none: a user's own torch (CUDA or not) is left alone.
TORCH_SPEC ?= torch==2.13.0
OUT ?= demo-out

.PHONY: setup browser demo test pytest lint fixtures docs reliability clean

setup: $(VENV)/.installed

# the dev extra includes the test extra: PEFT, diffusers, lycoris-lora, gguf, and mlx-lm (CPU wheels on Linux, Python
# 3.11+), the oracle tests/test_mlx.py runs in a subprocess
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	@rm -rf $(OUT) && mkdir -p $(OUT)
	$(VENV)/bin/loratools inspect fixtures/peft_llama_patterns
	$(VENV)/bin/loratools inspect fixtures/lycoris_lokr.safetensors --json > $(OUT)/lokr.json
	$(VENV)/bin/loratools inspect fixtures/kohya_sd/lora.safetensors --fast
	$(VENV)/bin/loratools validate fixtures/peft_llama_dora
	$(VENV)/bin/loratools validate fixtures/diffusers_sd --strict
	$(VENV)/bin/loratools mix fixtures/peft_llama fixtures/peft_llama_patterns --weights 0.7,0.3 -o $(OUT)/mixed
	$(VENV)/bin/loratools mix fixtures/kohya_sd/lora.safetensors fixtures/lycoris_loha.safetensors --rank 4 -o $(OUT)/svd.safetensors
	$(VENV)/bin/loratools resize fixtures/peft_llama_patterns --energy 0.9 -o $(OUT)/small --json > $(OUT)/resize.json
	$(VENV)/bin/loratools validate $(OUT)/mixed
	$(VENV)/bin/loratools inspect $(OUT)/small --spectrum
	$(VENV)/bin/loratools convert fixtures/peft_llama_patterns --to kohya -o $(OUT)/patterns.safetensors
	$(VENV)/bin/loratools convert $(OUT)/patterns.safetensors --to peft -o $(OUT)/patterns-back
	$(VENV)/bin/loratools diff fixtures/peft_llama_patterns $(OUT)/patterns-back
	$(VENV)/bin/loratools convert fixtures/lycoris_lokr.safetensors --to diffusers -o $(OUT)/lokr-lora.safetensors
	$(PY) -c "import sys; sys.path.insert(0, 'fixtures'); from make_fixtures import tiny_llama; tiny_llama().save_pretrained('$(OUT)/base')"
	$(VENV)/bin/loratools merge $(OUT)/base fixtures/peft_llama -o $(OUT)/merged --report $(OUT)/merge-report.html
	$(VENV)/bin/loratools convert fixtures/peft_llama --to gguf --base $(OUT)/base -o $(OUT)/adapter.gguf
	@echo "demo: all commands ran; JSON written to $(OUT)/"

# Debian's chromium renders the HTML report in tests/test_report.py and makes docs/merge-report.png: installed
# when absent, as root with apt-get (CI); elsewhere the report tests are skipped with a loud reason
browser:
	@if [ -z "$$LORATOOLS_CHROMIUM" ] && ! command -v chromium chromium-browser >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } || \
	      echo "*** apt-get could not install chromium: the HTML report tests will be SKIPPED"; \
	  else \
	    echo "*** chromium is absent and cannot be installed here (not root, or no apt-get):"; \
	    echo "*** the HTML report tests will be SKIPPED; install Debian's chromium to run them"; \
	  fi; \
	fi

test: setup browser lint pytest

# once chromium is there, its tests may not skip
pytest: setup
	$(if $(shell command -v chromium chromium-browser 2>/dev/null)$(LORATOOLS_CHROMIUM),LORATOOLS_REQUIRE_CHROMIUM=1) $(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check loratools tests fixtures docs $(wildcard benchmarks)
	$(VENV)/bin/ruff format --check loratools tests
	$(VENV)/bin/mypy loratools
	$(VENV)/bin/lint-imports

# the long run: every slow case (the whole hostile battery, 2000 fuzz examples, 20 kill points per command and
# signal), then the figures of docs/reliability.md
reliability: setup
	LORATOOLS_FUZZ_EXAMPLES=2000 LORATOOLS_KILL_POINTS=20 $(PY) -m pytest -q -m "" tests/
	$(PY) benchmarks/reliability.py --cases 200 --kills 8

fixtures: setup
	$(PY) fixtures/make_fixtures.py

docs: setup browser
	$(VENV)/bin/cog -r docs/cli.md
	$(PY) docs/make_screenshot.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .mypy_cache .ruff_cache

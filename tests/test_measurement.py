"""The measurement protocol: rotation, warm-up, A/A control, fixed length, strict pairing, stop accounting."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from harness.config import GenerationConfig, RunConfig
from harness.generators import StopCondition, build_generator
from harness.report import build_table, control_notes, load_runs, markdown
from harness.runner import rotation, run_many

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 8


def test_rotation_is_a_latin_square():
    for C in (1, 2, 3, 5, 10):
        for R in (1, 2, 3):
            rows = [rotation(C, i, r, R) for i in range(C) for r in range(R)]
            assert all(sorted(row) == list(range(C)) for row in rows)  # every configuration once per row
            # over every C consecutive rows each configuration sits in each slot exactly once
            for start in range(0, len(rows) - C + 1):
                block = rows[start:start + C]
                for slot in range(C):
                    assert sorted(row[slot] for row in block) == list(range(C))


@pytest.fixture(scope="module")
def multi(model, tmp_path_factory):
    """3 configurations (+ the A/A control) over 4 real GSM8K prompts, with --fixed_length and 2 repeats.

    Greedy answers to the first four GSM8K questions end (blank line or EOS) after 12, 14, 6 and 4 tokens.
    """
    out = tmp_path_factory.mktemp("multi")
    run = RunConfig(dataset="gsm8k", num_samples=4, output_dir=str(out), warmup=1, repeats=2,
                    fixed_length=True, exits="none")  # as the shared model was loaded: --resume reloads it so
    configs = [GenerationConfig(max_steps=MAX_STEPS), GenerationConfig(max_steps=MAX_STEPS, exit_layer=15),
               GenerationConfig(generation_strategy="self_speculative", exit_layer=8, num_speculations=5,
                                max_steps=MAX_STEPS)]
    parent, summaries = run_many(run, configs, progress=False, model=model)
    return parent, load_runs([str(parent)])


def test_each_configuration_runs_first_equally_often(multi):
    _, runs = multi
    assert len(runs) == 4  # baseline, control, static exit, self_speculative
    first = Counter()
    for r in runs:
        for e in r["examples"]:
            assert [x["repeat"] for x in e["repeats"]] == [0, 1]  # every repeat is logged
            first[r["run"]["schedule"]["config_index"]] += sum(x["slot"] == 0 for x in e["repeats"])
    # 4 examples x 2 repeats = 8 rotation rows over 4 configurations: each is first exactly twice
    assert dict(first) == {0: 2, 1: 2, 2: 2, 3: 2}
    for r in runs:
        assert r["run"]["schedule"]["num_configs"] == 4 and r["run"]["schedule"]["repeats"] == 2
        assert r["run"]["schedule"]["per_example_warmup_steps"] > 0


def test_fixed_length_times_exactly_max_steps_and_scores_up_to_the_first_stop(multi):
    _, runs = multi
    cut = 0
    for r in runs:
        for e in r["examples"]:
            assert e["new_tokens"] == MAX_STEPS == len(e["token_ids"])
            assert all(x["new_tokens"] == MAX_STEPS for x in e["repeats"])
            assert e["prediction_tokens"] <= e["new_tokens"]
            cut += e["prediction_tokens"] < e["new_tokens"]
            assert "\n\n" not in e["prediction"]  # GSM8K stops at a blank line: the scored text honours it
    assert cut > 0  # some generation did hit a stop, and timing went on to max_steps regardless


def test_control_row_and_decode_speedup(multi):
    _, runs = multi
    df = build_table(runs)
    assert list(df["control"]) == [False, True, False, False]
    base, ctl = df.iloc[0], df.iloc[1]
    assert base["decode_speedup"] == 1.0 and ctl["baseline"] == base["run_id"]
    assert 0.5 < ctl["decode_speedup"] < 2.0
    # speedup = median over examples of baseline decode time/token / method decode time/token
    by_id = {r["run"]["run_id"]: r for r in runs}
    b = {e["id"]: e["decode_time_per_token"] for e in by_id[base["run_id"]]["examples"]}
    for _, row in df.iloc[1:].iterrows():
        ratios = sorted(b[e["id"]] / e["decode_time_per_token"] for e in by_id[row["run_id"]]["examples"])
        assert row["decode_speedup"] == pytest.approx((ratios[1] + ratios[2]) / 2)
        assert row["n_paired"] == 4 and math.isnan(row["decode_speedup_ci95_low"])  # n < 10: no CI
    md = markdown(df)
    assert "A/A control" in md and "n too small for a CI" in md
    assert "median of per-example ratios" in md


def test_control_outside_the_band_is_flagged():
    import pandas as pd

    g = pd.DataFrame([{"control": True, "decode_speedup": 0.91, "decode_speedup_q25": 0.9,
                       "decode_speedup_q75": 0.93, "decode_speedup_min": 0.88, "decode_speedup_max": 0.95,
                       "n_paired": 12}])
    notes = control_notes(g)
    assert any("cannot be told from 1.0" in n and "0.91x and 1.10x" in n for n in notes)  # 1/0.91: a ratio's band
    g.loc[0, "decode_speedup"] = 2.5  # a wild control (n=1 happens): the band stays positive
    assert any("between 0.40x and 2.50x" in n for n in control_notes(g))
    g.loc[0, "decode_speedup"] = 1.02
    assert not any("cannot be told" in n for n in control_notes(g))


@pytest.mark.parametrize("edit,field", [
    (lambda i: i["task"].update(max_steps=99), "max_steps"),
    (lambda i: i["task"].update(examples_sha256="0" * 64), "example ids and prompt hashes"),
    (lambda i: i["task"].update(n_shot=3), "n_shot"),
    (lambda i: i["model"].update(dtype="bfloat16"), "dtype"),
    (lambda i: i["run"].update(fixed_length=False), "fixed_length"),
    (lambda i: i["generation"].update(sample=True, temperature=0.7), "sampling"),
    (lambda i: i["environment"].update(world_size=2), "world_size"),
    (lambda i: i["task"].update(data_sha256="f" * 64), "data file (content hash)"),
])
def test_mismatched_runs_are_never_paired(multi, tmp_path, edit, field):
    parent, runs = multi
    base = next(r for r in runs if r["run"]["schedule"]["config_index"] == 0)
    method = next(r for r in runs if r["run"]["strategy"] == "self_speculative")
    for r in (base, method):
        shutil.copytree(r["path"], tmp_path / r["path"].name)
    info_path = tmp_path / method["path"].name / "run.json"
    info = json.loads(info_path.read_text())
    edit(info)
    info_path.write_text(json.dumps(info))
    df = build_table(load_runs([str(tmp_path)]))
    row = df[df["strategy"] == "self_speculative"].iloc[0]
    assert row["baseline"].startswith(f"not paired: {field} differs")
    assert math.isnan(row["decode_speedup"]) and math.isnan(row["delta_exact_match"])


def test_resume_of_a_multi_configuration_folder(multi, tmp_path):
    parent, runs = multi
    copy = tmp_path / parent.name
    shutil.copytree(parent, copy, ignore=shutil.ignore_patterns("report"))
    victim = next(d for d in copy.iterdir() if "self_speculative" in d.name)
    lines = (victim / "examples.jsonl").read_text().splitlines()
    (victim / "examples.jsonl").write_text("\n".join(lines[:2]) + "\n")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), "--resume", str(copy)], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for d in copy.iterdir():
        if (d / "run.json").exists():
            assert [json.loads(x)["index"] for x in (d / "examples.jsonl").read_text().splitlines()] == [0, 1, 2, 3]
    assert "A/A control" in proc.stdout


# -- stop / EOS / max_steps accounting -------------------------------------------------------------
@torch.inference_mode()
@pytest.mark.parametrize("max_steps", [1, 2, 3, 5, 7, 8, 13])
def test_self_speculation_never_emits_or_counts_past_max_steps(model, real_prompts, max_steps):
    ids = model.encode(real_prompts[0])
    ar = build_generator(model, GenerationConfig()).generate(ids, StopCondition(model, max_steps, eos_ids=set()))
    gen = build_generator(model, GenerationConfig(generation_strategy="self_speculative", exit_layer=20,
                                                  num_speculations=6))
    ss = gen.generate(ids, StopCondition(model, max_steps, eos_ids=set()))
    assert ss.tokens == ar.tokens and len(ss.tokens) == max_steps
    assert len(ss.exit_layers) == max_steps
    assert ss.accepted <= ss.drafted and ss.accepted <= max_steps - 1
    # every drafted token was verifiable within max_steps: verified positions never exceed the limit
    assert ss.drafted <= max_steps - 1 + (ss.drafted - ss.accepted)


@torch.inference_mode()
def test_stop_inside_a_speculative_chunk_cuts_tokens_and_acceptance(model, real_prompts):
    ids = model.encode(real_prompts[1])
    free = build_generator(model, GenerationConfig()).generate(ids, StopCondition(model, 16, eos_ids=set()))
    j = 5
    eos = {free.tokens[j]} - set(free.tokens[:j])
    if not eos:
        pytest.skip("token at position 5 repeats an earlier one")
    ss = build_generator(model, GenerationConfig(generation_strategy="self_speculative", exit_layer=24,
                                                 num_speculations=6)).generate(ids, StopCondition(model, 16,
                                                                                                  eos_ids=eos))
    assert ss.tokens == free.tokens[:j + 1] and ss.stop_reason == "eos"
    assert ss.accepted <= j  # at most the kept tokens that came from drafts


def test_stop_rules_apply_in_generation_order(model):
    """EOS and stop strings are one rule checked token by token: whichever comes first ends generation."""
    text_ids = model.tokenizer("one two\n\nthree four five", add_special_tokens=False)["input_ids"]
    eos = {text_ids[-1]}
    stop = StopCondition(model, 50, ("\n\n",), eos_ids=eos)
    keep, reason = stop.check(list(text_ids), new=len(text_ids))
    assert reason == "stop_string" and "\n\n" in model.decode(text_ids[:keep])
    assert "\n\n" not in model.decode(text_ids[:keep - 1])
    stop = StopCondition(model, 50, ("five",), eos_ids={text_ids[1]})
    assert stop.check(list(text_ids), new=len(text_ids)) == (2, "eos")
    assert StopCondition(model, 3, ("\n\n",), eos_ids=set()).check(list(text_ids), new=len(text_ids)) == \
        (3, "max_steps")
    fixed = StopCondition(model, 50, ("\n\n",), eos_ids=eos, fixed_length=True)
    assert fixed.check(list(text_ids), new=len(text_ids)) is None
    assert fixed.first_stop(text_ids)[1] == "stop_string"

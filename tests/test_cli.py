"""The three CLIs as a user runs them: run logs that parse, and one-line errors with exit code 2."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.logs import ExampleRecord, RunInfo, Summary
from harness.model import hub_reachable

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args, stdin=None, env=None):
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          cwd=ROOT, input=stdin, timeout=600, env=env)


def assert_one_line_error(proc, needle):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_benchmark_writes_the_documented_run_log(tmp_path):
    curve_on = {**os.environ, "EE_HARNESS_COST_CURVE": "1"}  # conftest leaves it out of the other runs
    proc = run("benchmark.py", "--dataset", "gsm8k", "--num_samples", "2", "--max_steps", "12", "--n_shot", "1",
               "--exit_layer", "20", "--output_dir", str(tmp_path), "--warmup", "1", env=curve_on)
    assert proc.returncode == 0, proc.stderr
    assert "| decode ms/token (median)" in proc.stdout
    (run_dir,) = tmp_path.iterdir()
    info = json.loads((run_dir / "run.json").read_text())
    assert set(info) == {f.name for f in dataclasses.fields(RunInfo)}
    assert info["strategy"] == "autoregressive" and info["knobs"] == {"exit_layer": 20}
    assert info["model"]["num_layers"] == 30 and info["environment"]["packages"]["torch"]
    curve = info["cost_curve"]  # the invocation's own: k = 1, 2, 4, 8 after 400 cached positions
    assert [p["k"] for p in curve["points"]] == [1, 2, 4, 8] and curve["context"] == 400
    assert all(p["total"] > 0 for p in curve["points"]) and curve["floor"] > 0
    lines = (run_dir / "examples.jsonl").read_text().splitlines()
    assert len(lines) == 2
    fields = {f.name for f in dataclasses.fields(ExampleRecord)}
    for line in lines:
        rec = json.loads(line)
        assert set(rec) == fields
        assert rec["exit_layers"] == [20] * rec["new_tokens"]
        assert isinstance(rec["prefill_seconds"], float) and isinstance(rec["decode_seconds"], float)
        assert "exact_match" in rec["metrics"] and rec["prompt"].count("Question:") == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary) == {f.name for f in dataclasses.fields(Summary)}
    assert summary["status"] == "complete" and summary["num_examples"] == 2 and summary["avg_exit_layer"] == 20.0


def test_criteria_alone_selects_dynamic_and_speculative_records_acceptance(tmp_path):
    proc = run("benchmark.py", "--criteria", "entropy_based", "--min_exit_layer", "12", "--num_samples", "1",
               "--max_steps", "6", "--dataset", "cnn_dm_lm", "--output_dir", str(tmp_path / "dyn"))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(next((tmp_path / "dyn").iterdir()).joinpath("run.json").read_text())
    assert info["strategy"] == "dynamic" and info["knobs"]["criteria"] == "entropy_based"
    assert info["knobs"]["min_exit_layer"] == 12
    proc = run("benchmark.py", "--generation_strategy", "self_speculative", "--exit_layer", "12", "--exits", "none",
               "--num_speculations", "3", "--num_samples", "2", "--max_steps", "10", "--dataset", "gsm8k",
               "--output_dir", str(tmp_path / "ss"))
    assert proc.returncode == 0, proc.stderr
    run_dir = next((tmp_path / "ss").iterdir())
    recs = [json.loads(x) for x in (run_dir / "examples.jsonl").read_text().splitlines()]
    assert all(r["drafted"] >= 1 and 0 <= r["accepted"] <= r["drafted"] for r in recs)
    assert all(set(r["exit_layers"]) <= {12, 30} for r in recs)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["acceptance_rate"] == sum(r["accepted"] for r in recs) / sum(r["drafted"] for r in recs)


def test_generate_streams_a_one_shot_answer():
    proc = run("generate.py", "--prompt", "What is the capital of France?", "--max_steps", "20")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "tokens/s" in proc.stderr


def test_generate_interactive_mode_reads_until_empty_line():
    proc = run("generate.py", "--max_steps", "8", "--no-chat_template", stdin="Once upon a time\n\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("> ") and len(proc.stdout) > 4


@pytest.mark.parametrize("args,needle", [
    (["--generation_strategy", "warp_drive"], "unknown --generation_strategy"),
    (["--dataset", "imagenet"], "unknown --dataset"),
    (["--model", "/nonexistent/model"], "not a transformers directory"),
    (["--model", "nobody-here/no-such-model-xyz"], "could not be fetched"),
    (["--exit_layer", "31"], "outside 1..30"),
    (["--exit_layer", "0"], "--exit_layer must be >= 1"),
    (["--data_path", "/nonexistent.jsonl"], "cannot read data file"),
    (["--num_samples", "abc"], "invalid int value"),
    (["--generation_strategy", "self_speculative", "--exit_layer", "8", "--num_speculations", "0"],
     "num_speculations must be >= 1"),
    (["--generation_strategy", "calm", "--criteria", "entropy_based"], "--criteria applies to the dynamic"),
    (["--criteria", "nonsense"], "invalid choice"),
    (["--generation_strategy", "self_speculative", "--exit_layer", "40"], "outside 1..30"),
    (["--threshold", "0.5"], "--threshold applies to calm, free"),
])
def test_bad_input_gets_one_line_and_exit_2(args, needle, tmp_path):
    assert_one_line_error(run("benchmark.py", "--output_dir", str(tmp_path), "--num_samples", "1", *args), needle)


@pytest.mark.skipif(hub_reachable(), reason="only meaningful offline")
def test_hf_data_source_offline_gets_one_line_and_exit_2(tmp_path):
    assert_one_line_error(run("benchmark.py", "--data_source", "hf", "--output_dir", str(tmp_path)), "unreachable")


def test_malformed_jsonl_line_gets_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"article": "a", "highlights": "b"}\n{"article": \n')
    assert_one_line_error(run("benchmark.py", "--data_path", str(bad), "--output_dir", str(tmp_path)),
                          "bad.jsonl:2: malformed JSON")


def test_help_documents_every_flag_with_its_default():
    out = run("benchmark.py", "--help").stdout
    for flag in ("--model", "--dataset", "--data_path", "--data_source", "--num_samples", "--n_shot", "--output_dir",
                 "--device", "--dtype", "--generation_strategy", "--exit_layer", "--num_speculations", "--sample",
                 "--temperature", "--top_p", "--top_k", "--max_steps", "--seed", "--criteria", "--confidence",
                 "--threshold", "--threshold_decay", "--min_exit_layer", "--shallow_exit_layer",
                 "--adaptive_threshold", "--vocab_reduction", "--vocab_k", "--contrastive_alpha"):
        assert flag in out
    assert out.count("(default:") >= 35
    for name in ("cnn_dm_summarization", "autoregressive", "self_speculative", "calm", "free", "dynamic"):
        assert name in out


def test_a_crash_keeps_every_finished_record(tmp_path, model, monkeypatch):
    """Records are on disk as each example finishes; a failure still leaves a summary saying so."""
    from harness.config import GenerationConfig, RunConfig
    from harness.runner import Benchmark

    bench = Benchmark(RunConfig(dataset="gsm8k", num_samples=3, output_dir=str(tmp_path), warmup=0),
                      GenerationConfig(max_steps=4), model=model)
    real = bench.generator.generate
    calls = []

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device fell over")
        return real(*a, **kw)

    monkeypatch.setattr(bench.generator, "generate", flaky)
    with pytest.raises(RuntimeError):
        bench.execute(progress=False)
    (run_dir,) = tmp_path.iterdir()
    assert len((run_dir / "examples.jsonl").read_text().splitlines()) == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "device fell over" in summary["error"]
    assert summary["num_examples"] == 2


def test_resume_finishes_an_interrupted_run(tmp_path, model, monkeypatch):
    from harness.config import GenerationConfig, RunConfig
    from harness.runner import Benchmark

    bench = Benchmark(RunConfig(dataset="xsum_summarization", num_samples=3, output_dir=str(tmp_path), warmup=0,
                                exits="none"),  # as the shared `model` fixture was loaded: resume reloads it so
                      GenerationConfig(max_steps=4), model=model)
    real, calls = bench.generator.generate, []

    def dies_on_third(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(bench.generator, "generate", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        bench.execute(progress=False)
    (run_dir,) = tmp_path.iterdir()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    with open(run_dir / "examples.jsonl", "a") as f:
        f.write('{"id": "cut short by a cra')  # a record half-written when the process died
    proc = run("benchmark.py", "--resume", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    recs = [json.loads(x) for x in (run_dir / "examples.jsonl").read_text().splitlines()]
    assert [r["index"] for r in recs] == [0, 1, 2]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["num_examples"] == 3
    assert_one_line_error(run("benchmark.py", "--resume", str(tmp_path / "nope")), "not a run directory")


def test_torchrun_shards_examples_and_rank0_merges(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(ROOT / "benchmark.py"),
                           "--dataset", "gsm8k", "--num_samples", "5", "--max_steps", "4",
                           "--output_dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("| decode ms/token (median)") == 1  # only rank 0 reports
    (run_dir,) = tmp_path.iterdir()
    assert sorted(p.name for p in run_dir.iterdir()) == ["examples.jsonl", "run.json", "shards", "summary.json"]
    recs = [json.loads(x) for x in (run_dir / "examples.jsonl").read_text().splitlines()]
    assert [r["index"] for r in recs] == [0, 1, 2, 3, 4]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["environment"]["world_size"] == 2
    assert json.loads((run_dir / "summary.json").read_text())["num_examples"] == 5


def _tokenizer_files(model):
    """The embedded model's converted directory (tokenizer files to build half-broken checkpoints from)."""
    from harness.model import resolve_checkpoint

    return Path(resolve_checkpoint(None)[1])


@pytest.mark.parametrize("case,needle", [
    ("foreign_gguf", "not a GGUF file"),
    ("truncated_gguf", "cannot read this GGUF file"),
    ("config_only_dir", "no usable tokenizer"),
    ("no_weights_dir", "cannot load the causal-LM weights"),
    ("output_dir_is_a_file", "cannot create or write the output directory"),
    ("output_dir_unwritable", "cannot create or write the output directory"),
])
def test_bad_model_files_and_output_dirs_get_one_line_and_exit_2(case, needle, tmp_path, model):
    args = ["--num_samples", "1", "--max_steps", "2", "--output_dir", str(tmp_path / "out")]
    if case == "foreign_gguf":
        (tmp_path / "m.gguf").write_bytes(b"PK\x03\x04 this is a zip, not a model")
        args += ["--model", str(tmp_path / "m.gguf")]
    elif case == "truncated_gguf":
        (tmp_path / "m.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x05\x00")
        args += ["--model", str(tmp_path / "m.gguf")]
    elif case == "config_only_dir":
        (tmp_path / "ckpt").mkdir()
        (tmp_path / "ckpt" / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
        args += ["--model", str(tmp_path / "ckpt")]
    elif case == "no_weights_dir":
        src = _tokenizer_files(model)
        (tmp_path / "ckpt").mkdir()
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(src / f, tmp_path / "ckpt" / f)
        args += ["--model", str(tmp_path / "ckpt")]
    elif case == "output_dir_is_a_file":
        (tmp_path / "afile").write_text("")
        args += ["--output_dir", str(tmp_path / "afile" / "sub")]
    else:
        args += ["--output_dir", "/proc/not-writable-here"]
    assert_one_line_error(run("benchmark.py", *args), needle)


def test_a_run_says_when_the_self_speculation_verdict_was_recosted_for_it(tmp_path):
    # --exit_layer given: the run happens whatever the re-costed verdict says (near 1.0x here it can go either way)
    proc = run("benchmark.py", "--generation_strategy", "self_speculative", "--exit_layer", "6", "--exits", "auto",
               "--num_samples", "1", "--max_steps", "6", "--dataset", "cnn_dm_lm", "--output_dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = tmp_path.iterdir()
    info = json.loads((run_dir / "run.json").read_text())
    verdict, dtype = info["model"]["speculation_verdict"], info["model"]["dtype"].removeprefix("torch.")
    assert verdict["fitted_dtype"] == dtype  # timed in the run's dtype: by the fit itself, or re-costed here
    recosted = dtype != "float32"  # the shipped fit was timed on a CPU in fp32
    assert ("recosted_from" in verdict and verdict["recosted_from"]) if recosted else not verdict["recosted_from"]
    assert (f"re-costed on cpu {dtype}" in proc.stderr) == recosted, proc.stderr

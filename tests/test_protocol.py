"""--protocol layerskip reproduces LayerSkip's benchmark.py defaults; LayerSkip's flag spellings are accepted."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from harness.config import GenerationConfig, RunConfig, UsageError
from harness.metrics import rouge, rouge_layerskip
from harness.tasks import DATA_DIR, Example, get_task, load_examples, read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def test_layerskip_protocol_shuffles_with_the_seed_before_taking_the_first_n():
    task = get_task("cnn_dm_summarization")
    ids = [r["id"] for _, r in read_jsonl(DATA_DIR / task.eval_file)]
    random.seed(42)  # LayerSkip: setup() seeds python's random, data.py's get_data shuffles the list
    random.shuffle(ids)
    got = [e.id for e in load_examples("cnn_dm_summarization", 5, seed=42, shuffle=True)]
    assert got == ids[:5]
    assert got != [e.id for e in load_examples("cnn_dm_summarization", 5, seed=42)]


def test_layerskip_rouge_lowercases_without_stemming_or_stripping_punctuation():
    ex = Example(id="1", prompt="", reference="The cats ran home.")
    assert rouge_layerskip("the cats ran home.", ex)["rouge1"] == pytest.approx(1.0)
    assert rouge_layerskip("The cat ran home", ex)["rouge1"] == pytest.approx(0.5)  # cat != cats, home != home.
    assert rouge("The cat ran home", ex)["rouge1"] == pytest.approx(1.0)  # the harness default stems and strips


def test_layerskip_protocol_settings_reach_the_benchmark(model):
    from harness.runner import Benchmark

    run = RunConfig(dataset="cnn_dm_summarization", num_samples=2, protocol="layerskip")
    b = Benchmark(run, GenerationConfig(sample=True), model=model)
    assert b.stops == () and b.max_steps == 512 and b.metric == "rouge_layerskip"
    assert (b.gen.temperature, b.gen.top_p, b.gen.top_k) == (0.6, 0.9, 0)
    info = b.info("x", {})
    assert info.task["protocol"] == "layerskip" and info.task["stop"] == [] and info.run["protocol"] == "layerskip"
    greedy = Benchmark(run, GenerationConfig(temperature=0.3, sample=True), model=model)
    assert greedy.gen.temperature == 0.3  # an explicit value is kept
    default = Benchmark(RunConfig(dataset="cnn_dm_summarization", num_samples=2), GenerationConfig(), model=model)
    assert default.stops == get_task("cnn_dm_summarization").stop and default.metric == "rouge"


def test_sample_accepts_layerskip_true_false_spelling():
    from harness.cli import make_parser

    p = make_parser("x")
    assert p.parse_args(["--sample", "True"]).sample is True
    assert p.parse_args(["--sample", "False"]).sample is False
    assert p.parse_args(["--sample"]).sample is True
    assert p.parse_args([]).sample is False
    assert p.parse_args(["--no-chat_template"]).chat_template is False
    assert p.parse_args(["--chat_template"]).chat_template is True


def test_eval_takes_layerskip_generation_flags_directly():
    sys.path.insert(0, str(ROOT))
    import eval as eval_cli

    p = eval_cli.build_parser()
    args = p.parse_args(["--tasks", "gsm8k", "--generation_strategy", "self_speculative", "--exit_layer", "8",
                         "--num_speculations", "6", "--output_dir", "logs", "--model", "m.gguf",
                         "--model_args", "device=cpu"])
    merged = eval_cli.model_args_from(args)
    assert merged == {"device": "cpu", "generation_strategy": "self_speculative", "exit_layer": 8,
                      "num_speculations": 6, "model": "m.gguf"}
    assert args.output_path == "logs"
    clash = p.parse_args(["--tasks", "gsm8k", "--exit_layer", "8", "--model_args", "exit_layer=4"])
    with pytest.raises(UsageError, match="exit_layer given twice"):
        eval_cli.model_args_from(clash)

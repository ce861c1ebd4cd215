"""The lm-eval plug-in agrees with lm-eval's own `hf` model on the same local checkpoint."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from harness.lm_eval_model import EarlyExitLM  # noqa: E402
from harness.model import resolve_checkpoint  # noqa: E402
from harness.tasks import load_examples  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "harness" / "lm_eval_tasks"


@pytest.fixture(scope="module")
def pair():
    _, local_dir, _ = resolve_checkpoint(None)  # the converted embedded model, a plain transformers dir
    ours = EarlyExitLM(model=local_dir, device="cpu", dtype="float32")
    theirs = HFLM(pretrained=local_dir, device="cpu", dtype="float32", batch_size=1)
    return ours, theirs


def _requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihoods_match_lm_evals_hf_model(pair):
    ours, theirs = pair
    exs = load_examples("gsm8k", 3)
    args = [(e.prompt, " " + e.reference.split("\n")[0]) for e in exs]
    args.append(("", "The cat sat on the mat."))  # empty context uses the prefix token
    a = ours.loglikelihood(_requests("loglikelihood", args))
    b = theirs.loglikelihood(_requests("loglikelihood", args))
    for (ll_a, g_a), (ll_b, g_b) in zip(a, b):
        assert abs(ll_a - ll_b) < 1e-3 * max(1.0, abs(ll_b))
        assert g_a == g_b
    text = load_examples("cnn_dm_lm", 1)[0].prompt
    ra = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))[0]
    rb = theirs.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))[0]
    assert abs(ra - rb) < 1e-3 * abs(rb)


def test_gsm8k_exact_match_matches_lm_evals_hf_model(pair):
    ours, theirs = pair
    manager = TaskManager(include_path=str(TASKS))
    kw = dict(tasks=["gsm8k"], limit=3, num_fewshot=1, task_manager=manager, log_samples=True,
              gen_kwargs="max_gen_toks=48")
    ra = lm_eval.simple_evaluate(model=ours, **kw)
    rb = lm_eval.simple_evaluate(model=theirs, **kw)
    for key in ("exact_match,strict-match", "exact_match,flexible-extract"):
        assert ra["results"]["gsm8k"][key] == rb["results"]["gsm8k"][key]
    outs_a = [s["resps"] for s in ra["samples"]["gsm8k"]]
    outs_b = [s["resps"] for s in rb["samples"]["gsm8k"]]
    assert outs_a == outs_b  # identical generations, not just equal scores
    assert len({s["doc_id"] for s in ra["samples"]["gsm8k"]}) == 3
    assert any(r[0][0].strip() for r in outs_a)  # something was actually generated
    assert ours.speed_summary()["requests"] >= 3


def test_generation_knobs_reach_the_generator_and_loglikelihood_depth():
    lm = EarlyExitLM(generation_strategy="self_speculative", exit_layer="8", num_speculations="3",
                     loglikelihood_exit_layer="12", device="cpu", dtype="float32", exits="none")
    knobs = lm.generator.knobs()
    assert lm.generator.name == "self_speculative" and (knobs["exit_layer"], knobs["num_speculations"]) == (8, 3)
    full = EarlyExitLM(device="cpu", dtype="float32")
    req = _requests("loglikelihood", [("The capital of France is", " Paris")])
    assert lm.loglikelihood(req)[0][0] != pytest.approx(full.loglikelihood(req)[0][0])
    out = lm.generate_until(_requests("generate_until", [("Question: 2+2?\nAnswer:", {"until": ["\n"], "max_gen_toks": 8})]))
    assert isinstance(out[0], str)
    speed = lm.speed_summary()
    assert speed["requests"] == 1 and speed["acceptance_rate"] is not None


def _eval(*args):
    return subprocess.run([sys.executable, str(ROOT / "eval.py"), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


def test_eval_cli_bundled_task_offline(tmp_path):
    proc = _eval("--tasks", "xsum", "--limit", "2", "--model_args", "max_steps=8,criteria=max_probability,exits=none",
                 "--baseline", "--output_path", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    (out,) = tmp_path.iterdir()
    results = json.loads((out / "results.json").read_text())
    assert "rouge1,none" in results["results"]["xsum"] and results["results"]["xsum"]["sample_len"] == 2
    speed = json.loads((out / "speed.json").read_text())
    assert speed["strategy"] == "dynamic" and speed["requests"] == 2 and speed["avg_exit_layer"] < 30
    # --baseline: autoregressive + A/A control on the same requests, paired speedup and metric deltas
    comp = json.loads((out / "comparison.json").read_text())
    assert comp["speed"]["paired_requests"] == 2 and comp["speed"]["decode_speedup"] > 0
    assert comp["speed"]["control_decode_speedup"] > 0
    d = comp["deltas"]["xsum"]["rouge1,none"]
    assert abs(d["method"] - d["baseline"] - d["delta"]) < 1e-12
    base = json.loads((out / "results_baseline.json").read_text())
    assert base["results"]["xsum"]["rouge1,none"] == d["baseline"]


@pytest.mark.parametrize("args,needle", [
    (["--tasks", "no_such_task_xyz"], "unknown lm-eval task"),
    (["--tasks", "humaneval", "--limit", "1"], "--confirm_run_unsafe_code"),
    (["--tasks", "gsm8k", "--model_args", "generation_strategy=warp"], "unknown --generation_strategy"),
])
def test_eval_cli_bad_input(args, needle):
    proc = _eval(*args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("Task '")]
    assert needle in lines[-1]

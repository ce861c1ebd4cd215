"""Spec-Bench in the report and the export (no model): the answer file's format and refusals, Spec-Bench's speed.py
re-derived here and applied to the exported files against the report's figures, consistency with the baseline, the
never-engaged guard and acceptance by draft position, on small synthetic run directories."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from harness.report import build_table, load_runs, write_report
from harness.report.consistency import rouge_l, token_agreement
from test_report import N, ROOT, _examples, _info, _md_row, _write

# Spec-Bench's MT-bench categories, as its evaluation/speed.py:9 lists them
MT_BENCH_LIST = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"]
L = 10  # layers of the pretend model (run.json model.num_layers)
# question id -> (category, new tokens per turn); written out of order, so the export must sort (numerically: 10 > 9)
QUESTIONS = {10: ("qa", [7]), 3: ("roleplay", [5, 9]), 1: ("writing", [6, 4]), 2: ("writing", [8, 8]),
             4: ("translation", [5]), 9: ("translation", [11])}


def _turn(qid: int, t: int, n: int, method: str) -> dict:
    """One turn: plain decoding takes 50 ms a decoded token; `ss` 25 ms a token, 2 tokens a pass where it can."""
    decoded = n - 1
    accepts = [2] * (decoded // 2) + [1] * (decoded % 2) if method == "ss" else None
    return {"text": f"answer {qid} turn {t} by {'base' if method != 'ss' else 'ss'}", "new_tokens": n,
            "prefill_seconds": 0.1 + 0.01 * qid, "decode_seconds": decoded * (0.025 if method == "ss" else 0.05),
            "accept_lengths": accepts, "step_drafts": [1] * len(accepts) if accepts else None}


def _records(method: str, same_text: bool = True) -> list[dict]:
    out = []
    for i, (qid, (cat, ns)) in enumerate(QUESTIONS.items()):
        turns = [_turn(qid, t, n, method) for t, n in enumerate(ns)]
        if same_text:  # lossless: the baseline's answers
            for t in turns:
                t["text"] = t["text"].replace(" by ss", " by base")
        new = sum(ns)
        decode = sum(t["decode_seconds"] for t in turns)
        ids = [qid * 100 + k for k in range(new)]
        accepts = [a for t in turns for a in (t["accept_lengths"] or [])] or None
        out.append({
            "id": str(qid), "index": i, "prompt_sha256": f"p{qid}", "prediction": "\n".join(t["text"] for t in turns),
            "metrics": {}, "category": cat, "turns": turns, "new_tokens": new, "token_ids": ids,
            "decode_time_per_token": decode / (new - len(ns)), "prefill_seconds": turns[0]["prefill_seconds"],
            "decode_seconds": decode, "total_seconds": decode + sum(t["prefill_seconds"] for t in turns),
            "e2e_tokens_per_second": 1.0, "exit_layers": [L] * new,
            "drafted": len(accepts) if accepts else None, "accepted": sum(a - 1 for a in accepts) if accepts else None,
            "verify_passes": len(accepts) if accepts else new - len(ns), "accept_lengths": accepts,
            "step_drafts": [1] * len(accepts) if accepts else None})
    return out


SS = ("self_speculative", {"exit_layer": 2, "num_speculations": 1})


@pytest.fixture
def spec_runs(tmp_path):
    root = tmp_path / "runs"
    dirs = {"base": _write(root, _info("base", task="spec_bench", num_layers=L), _records("base")),
            "ctl": _write(root, _info("ctl", task="spec_bench", control=True, num_layers=L), _records("base")),
            "ss": _write(root, _info("ss", *SS, task="spec_bench", num_layers=L), _records("ss"))}
    return root, dirs


def export(run_dir, out, fmt="spec_bench"):
    return subprocess.run([sys.executable, "-m", "harness.export", fmt, str(run_dir), str(out)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def _lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_export_writes_spec_bench_answer_lines(spec_runs, tmp_path):
    _, dirs = spec_runs
    proc = export(dirs["ss"], tmp_path / "ss.jsonl")
    assert proc.returncode == 0, proc.stderr
    lines = _lines(tmp_path / "ss.jsonl")
    assert [x["question_id"] for x in lines] == [1, 2, 3, 4, 9, 10]  # sorted as integers (reorg_answer_file)
    for x in lines:
        assert list(x) == ["question_id", "category", "answer_id", "model_id", "choices", "tstamp"]
        assert isinstance(x["question_id"], int) and x["answer_id"] == f"ss-{x['question_id']}"
        assert x["model_id"] == "m-self_speculative" and x["tstamp"] == 1767225600.0  # 2026-01-01T00:00:00 UTC
        (c,) = x["choices"]
        assert list(c) == ["index", "turns", "decoding_steps", "new_tokens", "wall_time", "accept_lengths"]
        cat, ns = QUESTIONS[x["question_id"]]
        assert x["category"] == cat and c["index"] == 0 and c["new_tokens"] == ns
        assert all(isinstance(t, str) for t in c["turns"]) and len(c["turns"]) == len(ns)
        turns = [_turn(x["question_id"], t, n, "ss") for t, n in enumerate(ns)]
        assert c["wall_time"] == pytest.approx([t["prefill_seconds"] + t["decode_seconds"] for t in turns])
        # per turn: the prefill's token as a pass of 1, then the decode passes; steps = passes
        per_turn = [[1] + t["accept_lengths"] for t in turns]
        assert c["accept_lengths"] == [a for p in per_turn for a in p]
        assert c["decoding_steps"] == [len(p) for p in per_turn]
        assert sum(c["accept_lengths"]) == sum(ns)  # every token of every turn, once
    # plain decoding: one token a pass, the prefill's included
    assert export(dirs["base"], tmp_path / "base.jsonl").returncode == 0
    for x in _lines(tmp_path / "base.jsonl"):
        c = x["choices"][0]
        assert c["accept_lengths"] == [1] * sum(c["new_tokens"]) and c["decoding_steps"] == c["new_tokens"]


def test_export_refuses_what_it_cannot_write(spec_runs, tmp_path):
    root, dirs = spec_runs

    def refused(proc, *words):
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
        assert all(w in proc.stderr for w in words), proc.stderr

    refused(export(root, tmp_path / "x.jsonl"), "not a run directory", "name one of them")
    refused(export(tmp_path / "nowhere", tmp_path / "x.jsonl"), "not a run directory")
    other = _write(tmp_path / "other", _info("g", task="gsm8k"), _examples(3, 50.0))
    refused(export(other, tmp_path / "x.jsonl"), "gsm8k, not spec_bench")
    old = _write(tmp_path / "old", _info("o", task="spec_bench"),
                 [dict(r, turns=None) for r in _records("base")])
    refused(export(old, tmp_path / "x.jsonl"), "6 of 6 records have no `turns`")
    refused(export(dirs["ss"], tmp_path / "x.jsonl", fmt="mt_bench"), "unknown format 'mt_bench'", "spec_bench")
    assert not (tmp_path / "x.jsonl").exists()


def speed_py(method_file, base_file, tokenizer, task):
    """hemingkx/Spec-Bench evaluation/speed.py:7-69 (`speed`), re-derived: the questions of `task` (a category,
    "mt_bench" for MT-bench's 8, or "overall"); the method's per-question speed = its new tokens / its wall time
    (summed over turns), with every step's accept length pooled; the baseline's the same, but its tokens counted by
    re-tokenizing each turn's text minus 1 (a BOS); speedup = mean method speed / mean baseline speed. Returns
    (speedup, mean accepted tokens)."""
    def keep(x):
        return task == "overall" or (task == "mt_bench" and x["category"] in MT_BENCH_LIST) or \
            x["category"] == task

    speeds, accepts = [], []
    for x in filter(keep, _lines(method_file)):
        c = x["choices"][0]
        speeds.append(sum(c["new_tokens"]) / sum(c["wall_time"]))
        accepts.extend(c["accept_lengths"])
    speeds0 = []
    for x in filter(keep, _lines(base_file)):
        c = x["choices"][0]
        tokens = sum(len(tokenizer(text).input_ids) - 1 for text in c["turns"])
        speeds0.append(tokens / sum(c["wall_time"]))
    return np.mean(speeds) / np.mean(speeds0), np.mean(accepts)


class FakeTokenizer:
    """Re-tokenizes a baseline answer into its new_tokens plus `extra` ids (a BOS: extra = 1, as speed.py assumes)."""

    def __init__(self, counts: dict, extra: int = 1):
        self.counts, self.extra = counts, extra

    def __call__(self, text: str):
        return SimpleNamespace(input_ids=[0] * (self.counts[text] + self.extra))


def test_report_spec_bench_figures_are_speed_pys_on_the_exported_files(spec_runs, tmp_path):
    root, dirs = spec_runs
    df, files = write_report([str(root)], str(tmp_path / "report"), plots=True)
    out = tmp_path / "report"
    assert {"spec_bench.csv", "spec_bench_speedup.png", "acceptance_by_position.png"} <= {f.name for f in files}
    sb = pd.read_csv(out / "spec_bench.csv")
    cols = ["writing", "roleplay", "mt_bench", "translation", "qa", "overall"]
    assert list(dict.fromkeys(sb["category"])) == cols  # MT-bench's categories, their pool, the others, overall
    for name in ("ss", "base"):
        assert export(dirs[name], tmp_path / f"{name}.jsonl").returncode == 0
    counts = {t["text"]: t["new_tokens"] for r in _records("base") for t in r["turns"]}
    ss = sb[sb["run_id"] == "ss"].set_index("category")
    for task in cols:
        speedup, tau = speed_py(tmp_path / "ss.jsonl", tmp_path / "base.jsonl", FakeTokenizer(counts), task)
        assert ss.loc[task, "specbench_speedup"] == pytest.approx(speedup, rel=1e-9)
        assert ss.loc[task, "tau"] == pytest.approx(tau, rel=1e-9)
        # a tokenizer that adds no BOS: speed.py counts one token a turn fewer for the baseline, we do not
        theirs, _ = speed_py(tmp_path / "ss.jsonl", tmp_path / "base.jsonl", FakeTokenizer(counts, extra=0), task)
        assert theirs > ss.loc[task, "specbench_speedup"] * 1.01
    # by hand, qa (question 10, 7 tokens in one turn): 6 decoded at 50 ms vs 25 ms, both after a 0.2 s prefill
    assert ss.loc["qa", "specbench_speedup"] == pytest.approx((7 / (0.2 + 6 * 0.025)) / (7 / (0.2 + 6 * 0.05)))
    assert ss.loc["qa", "tau"] == pytest.approx(7 / 4)  # passes [1, 2, 2, 2]
    assert ss.loc["qa", "decode_speedup"] == pytest.approx(2.0)  # ours: prefill excluded
    base = sb[sb["run_id"] == "base"]
    assert (base["tau"] == 1.0).all() and (base["decode_speedup"] == 1.0).all() and base["n"].tolist() == \
        [2, 1, 3, 2, 1, 6]
    # the lossless row repeats the baseline's answers: consistency 1.0 everywhere; the baseline and control: blank
    assert (ss["consistency_rougeL"] == 1.0).all() and (ss["consistency_tokens"] == 1.0).all()
    assert sb[sb["run_id"] != "ss"]["consistency_rougeL"].isna().all()
    md = (out / "report.md").read_text()
    section = md.split("### Spec-Bench by category (m)")[1]
    assert "re-tokenizes" in section and "harness.export" in section
    speed_table = section.split("#### decode speedup")[1].split("####")[0]
    header = next(line for line in speed_table.splitlines() if line.startswith("| method "))
    assert [c.strip() for c in header.strip("|").split("|")] == ["method", *cols]
    assert "| SS E2 k1 " in speed_table and "| AR (A/A control) " in speed_table
    assert "1.000 / 1.000" in section.split("#### consistency")[1]
    assert md.index("### spec_bench (m)") < md.index("### Spec-Bench by category")  # appended after the tables


def test_reports_of_other_tasks_get_no_spec_bench_section(tmp_path):
    root = tmp_path / "runs"
    _write(root, _info("base"), _examples(N, 50.0))
    _write(root, _info("calm", "calm", {"threshold": 0.9}), _examples(N, 40.0))
    df, files = write_report([str(root)], str(tmp_path / "report"), plots=False)
    assert "spec_bench.csv" not in {f.name for f in files} and not (tmp_path / "report" / "spec_bench.csv").exists()
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Spec-Bench by category" not in md and "never engaged" not in md
    csv = pd.read_csv(tmp_path / "report" / "report.csv")
    assert {"consistency_rougeL", "consistency_tokens", "never_engaged"} <= set(csv.columns)
    assert not any(c.startswith("accept_pos_") for c in csv.columns)  # no per-step counts: no such columns


def test_consistency_identical_and_a_known_difference(tmp_path):
    root = tmp_path / "runs"
    base_tokens = [1, 2, 3, 4, 5]
    _write(root, _info("base"), _examples(N, 50.0, prediction="the cat sat on the mat", token_ids=base_tokens))
    _write(root, _info("ctl", control=True), _examples(N, 50.0, prediction="the cat sat on the mat",
                                                       token_ids=base_tokens))
    _write(root, _info("same", "calm", {"threshold": 0.9}),
           _examples(N, 40.0, prediction="the cat sat on the mat", token_ids=base_tokens))
    # one word of six differs (LCS 5 of 6 either way: F = 5/6); tokens agree at positions 0, 1, 3 of max(4, 5) = 5
    _write(root, _info("diff", "calm", {"threshold": 0.5}),
           _examples(N, 30.0, prediction="the cat sat on a mat", token_ids=[1, 2, 9, 4]))
    r = build_table(load_runs([str(root)])).set_index("run_id")
    assert r.loc["same", "consistency_rougeL"] == 1.0 and r.loc["same", "consistency_tokens"] == 1.0
    assert r.loc["diff", "consistency_rougeL"] == pytest.approx(5 / 6)
    assert r.loc["diff", "consistency_tokens"] == pytest.approx(3 / 5)
    assert r.loc[["base", "ctl"], ["consistency_rougeL", "consistency_tokens"]].isna().all().all()
    assert token_agreement([], []) == 1.0 and token_agreement([1], None) is None
    assert rouge_l("", "") == 1.0 and rouge_l("", "words") == 0.0


def test_rouge_l_is_rouge_scores():
    """The array LCS gives rouge-score's ROUGE-L F (the metric harness.metrics.rouge uses) to the last bit."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rng = random.Random(0)
    words = "the a cat cats sat sitting on mat mats dog ran running quickly, fast! 42 x".split()
    for _ in range(200):
        a = " ".join(rng.choice(words) for _ in range(rng.randint(0, 30)))
        b = " ".join(rng.choice(words) for _ in range(rng.randint(0, 30)))
        if a != b:
            assert rouge_l(a, b) == scorer.score(b, a)["rougeL"].fmeasure, (a, b)


def test_never_engaged_is_marked_in_every_table(tmp_path):
    root = tmp_path / "runs"
    spec = {"num_layers": L}
    _write(root, _info("base", **spec), _examples(N, 50.0, exit_layers=[L] * 5))
    _write(root, _info("ctl", control=True, **spec), _examples(N, 50.0, exit_layers=[L] * 5))
    # drafts nothing over the whole run (a draft threshold nothing passes)
    _write(root, _info("ss0", *SS, **spec), _examples(N, 50.0, drafted=0, accepted=0, step_drafts=[0] * 4,
                                                      accept_lengths=[1] * 4))
    _write(root, _info("ss", "self_speculative", {"exit_layer": 2, "num_speculations": 3}, **spec),
           _examples(N, 40.0, drafted=6, accepted=3, step_drafts=[3, 3], accept_lengths=[3, 2]))
    # exits only at the last layer; exits once at layer 5; no num_layers in run.json (cannot tell)
    _write(root, _info("calm_never", "calm", {"threshold": 1.0}, **spec),
           _examples(N, 60.0, exit_layers=[L] * 5, breakdown=True))
    _write(root, _info("calm_once", "calm", {"threshold": 0.9}, **spec),
           _examples(N, 45.0, exit_layers=lambda i: [L, L, 5, L, L] if i == 3 else [L] * 5))
    _write(root, _info("calm_unknown", "calm", {"threshold": 0.8}), _examples(N, 45.0, exit_layers=[L] * 5))
    # transformers' peers count no drafts: nothing to say
    _write(root, _info("peer", "hf_prompt_lookup", {"num_speculations": 10}, **spec), _examples(N, 45.0))
    _write(root, _info("cb", "calm", {"threshold": 0.95}, task="cnn_dm_lm", **spec),
           _examples(N, 45.0, exit_layers=[L] * 5))  # a second task, for the summary across tasks
    _write(root, _info("cb_base", task="cnn_dm_lm", **spec), _examples(N, 50.0))
    out = tmp_path / "report"
    write_report([str(root)], str(out), plots=False)
    csv = pd.read_csv(out / "report.csv").set_index("run_id")
    assert csv["never_engaged"].dtype == bool
    assert set(csv.index[csv["never_engaged"]]) == {"ss0", "calm_never", "cb"}
    md = (out / "report.md").read_text()
    assert _md_row(md, "gsm8k", "calm threshold=1.0").split("|")[1].strip() == "calm threshold=1.0 (never engaged)"
    assert "(never engaged)" in _md_row(md, "gsm8k", "self_speculative exit_layer=2 num_speculations=1")
    for method in ("calm threshold=0.9", "calm threshold=0.8", "self_speculative exit_layer=2 num_speculations=3",
                   "hf_prompt_lookup", "autoregressive", "autoregressive (A/A control)"):
        assert "never engaged" not in _md_row(md, "gsm8k", method), method
    gsm = md.split("### gsm8k (")[1].split("\n### ")[0]
    assert "- Never engaged (drafted nothing, or never exited before the last layer" in gsm
    assert "CALM t1, SS E2 k1." in gsm or "SS E2 k1, CALM t1." in gsm
    summary = md.split("### Summary across tasks")[1].split("\n### ")[0]
    assert "CALM t0.95 (cnn_dm_lm)" in summary.split("Never engaged")[1]  # a note under the summary, its table as is
    assert "| CALM t1 (never engaged)" in md.split("Where the decode time goes")[1]  # the breakdown's table


def test_acceptance_by_draft_position(tmp_path):
    root = tmp_path / "runs"
    _write(root, _info("base"), _examples(N, 50.0))
    # drafted 3, 3, 2, 0 per step; accepted (accept_length - 1) 3, 1, 0, 0
    _write(root, _info("ss3", "self_speculative", {"exit_layer": 2, "num_speculations": 3}),
           _examples(N, 40.0, drafted=8, accepted=4, step_drafts=[3, 3, 2, 0], accept_lengths=[4, 2, 1, 1]))
    _write(root, _info("ss2", *SS), _examples(N, 40.0, drafted=2, accepted=1, step_drafts=[1, 1],
                                               accept_lengths=[2, 1]))
    _write(root, _info("calm", "calm", {"threshold": 0.9}), _examples(N, 30.0))
    csv = pd.read_csv(write_report([str(root)], str(tmp_path / "report"), plots=False)[1][0]).set_index("run_id")
    pos = ["accept_pos_1", "accept_pos_2", "accept_pos_3"]
    assert [c for c in csv.columns if c.startswith("accept_pos_")] == pos
    # position 1: 2 of the 3 steps that drafted >= 1; 2: 1 of 3; 3: 1 of 2
    assert csv.loc["ss3", pos].tolist() == pytest.approx([2 / 3, 1 / 3, 1 / 2])
    assert csv.loc["ss2", "accept_pos_1"] == 0.5 and csv.loc["ss2", pos[1:]].isna().all()
    assert csv.loc[["base", "calm"], pos].isna().all().all()

"""Tasks read the bundled real data in LayerSkip's formats; metrics score real references correctly."""
from __future__ import annotations

import gzip
import json

import pytest

from harness.config import UsageError
from harness.metrics import gsm8k_answer, gsm8k_exact_match, pass_at_1, rouge
from harness.tasks import DATA_DIR, TASKS, load_examples, read_jsonl


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_loads_real_examples(name):
    exs = load_examples(name, 3)
    per = max(len(TASKS[name].categories), 1)  # a task with categories takes 3 of each
    assert len(exs) == 3 * per and len({e.id for e in exs}) == 3 * per
    assert all(e.prompt and (e.reference or not TASKS[name].scores_reference) for e in exs)


def test_prompt_formats_follow_layerskip():
    cnn = load_examples("cnn_dm_summarization", 1)[0]
    assert cnn.prompt.startswith("Article: ") and cnn.prompt.endswith("\nSummary:")
    xsum = load_examples("xsum_summarization", 1)[0]
    assert xsum.prompt.startswith("Article: Prison Link Cymru") and xsum.prompt.endswith("\nSummary:")
    lm = load_examples("cnn_dm_lm", 1)[0]
    assert len(lm.prompt.split()) == 100 and lm.reference.split()[0] not in ("",)
    gsm = load_examples("gsm8k", 1)[0]
    assert gsm.prompt.startswith("Question: ") and gsm.prompt.endswith("\nAnswer:")
    he = load_examples("human_eval", 1)[0]
    assert he.id == "HumanEval/0" and "def has_close_elements" in he.prompt


def test_shots_come_from_the_training_split_for_gsm8k():
    test_questions = {r["question"] for _, r in read_jsonl(DATA_DIR / "gsm8k_main_test.jsonl")}
    ex = load_examples("gsm8k", 2, n_shot=3, seed=7)[0]
    shots = ex.prompt.split("Question: ")[1:-1]
    assert len(shots) == 3
    assert all(s.split("\nAnswer:")[0] not in test_questions for s in shots)
    assert load_examples("gsm8k", 1, n_shot=3, seed=7)[0].prompt == ex.prompt  # seeded
    assert load_examples("gsm8k", 1, n_shot=3, seed=8)[0].prompt != ex.prompt


def test_cnn_dm_shots_never_overlap_the_evaluated_articles():
    evaluated = load_examples("cnn_dm_summarization", 20)
    shot_prompt = load_examples("cnn_dm_summarization", 20, n_shot=2)[0].prompt
    articles = shot_prompt.split("Article: ")[1:-1]
    assert len(articles) == 2
    for a in articles:
        assert all(a.split("\nSummary:")[0] not in e.prompt for e in evaluated)


def test_n_shot_rejected_where_no_exemplar_format():
    with pytest.raises(UsageError, match="not supported"):
        load_examples("human_eval", 2, n_shot=1)


def test_data_path_malformed_missing_and_unreadable(tmp_path):
    good = tmp_path / "ok.jsonl.gz"
    with gzip.open(good, "wt") as f:
        f.write(json.dumps({"question": "What is 2+3?", "answer": "2+3=5\n#### 5"}) + "\n")
    assert load_examples("gsm8k", data_path=str(good))[0].prompt == "Question: What is 2+3?\nAnswer:"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{not json\n')
    with pytest.raises(UsageError, match=r"bad.jsonl:2: malformed JSON"):
        load_examples("gsm8k", data_path=str(bad))
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"question": "q"}\n')
    with pytest.raises(UsageError, match="lacks field"):
        load_examples("gsm8k", data_path=str(missing))
    with pytest.raises(UsageError, match="cannot read"):
        load_examples("gsm8k", data_path=str(tmp_path / "nope.jsonl"))


def test_gsm8k_exact_match_on_real_answers():
    ex = load_examples("gsm8k", 5)
    for e in ex:  # the reference itself scores 1
        assert gsm8k_exact_match(e.reference, e)["exact_match"] == 1.0
    gold = gsm8k_answer(ex[0].reference)
    assert gsm8k_exact_match(f"so the answer is ${gold + 1:,.0f}.", ex[0])["exact_match"] == 0.0
    assert gsm8k_exact_match(f"... she makes {gold:,.2f} dollars", ex[0])["exact_match"] == 1.0
    assert gsm8k_answer("The total is 1,234. #### 1,234") == 1234.0
    assert gsm8k_answer("no number here") is None


def test_rouge_scores():
    e = load_examples("cnn_dm_summarization", 1)[0]
    assert rouge(e.reference, e) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert rouge("zzz qqq", e)["rouge1"] == 0.0


def test_human_eval_executes_canonical_and_wrong_solutions():
    exs = load_examples("human_eval", 3)
    for e in exs:
        assert pass_at_1(e.reference, e)["pass_at_1"] == 1.0
    wrong = pass_at_1("    return None\n", exs[0])
    assert wrong["pass_at_1"] == 0.0 and wrong["execution"] == "failed"
    hang = pass_at_1("    while True:\n        pass\n", exs[1], timeout=2)
    assert hang["execution"] == "timeout"


def test_generated_code_cannot_touch_the_harness_process(tmp_path):
    e = load_examples("human_eval", 1)[0]
    marker = tmp_path / "marker"
    # code that writes a file via an absolute path still runs in a separate process and a temp cwd
    res = pass_at_1(f"    import os\n    open({str(marker)!r}, 'w').write(os.getcwd())\n    return True\n", e)
    assert res["pass_at_1"] == 0.0
    assert marker.read_text() != str(tmp_path) and "ee_sandbox_" in marker.read_text()

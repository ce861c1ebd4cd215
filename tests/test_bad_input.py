"""The bad-input matrix: every entry point answers bad input with one `error:` line and a non-zero exit.

One row per (entry point, input): argv, what stdin holds, the expected exit code and a piece of the error line.
Each row runs as a user would (a subprocess from the repository root). A new entry point or flag joins by adding
a row. Most rows fail at argument or data-loading time, before any model loads, so each takes a few seconds.

In argv, `{tmp}` is a per-test folder holding FILES (written before the run).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLOSED = "closed"  # stdin: file descriptor 0 closed (as `cmd <&-`); None = /dev/null; bytes = piped input

FILES = {
    "file.txt": "an existing file, not a folder\n",
    "gsm8k_null.jsonl": '{"question": "What is 1 + 1?", "answer": "1 + 1 = 2\\n#### 2"}\n'
                        '{"question": null, "answer": null}\n',
    "gsm8k_number.jsonl": '{"question": 12, "answer": "#### 12"}\n',
    "cnn_empty.jsonl": '{"id": "cnn-empty-1", "article": "", "highlights": "A summary."}\n',
    "cnn_lm_empty.jsonl": '{"id": "lm-empty-1", "article": ""}\n',
    "cnn_lm_short.jsonl": '{"id": "lm-short-1", "article": "Only a few words, all of them prompt."}\n',
}
NOT_UTF8 = "caf\udce9"  # argv bytes b"caf\xe9" (Latin-1), as the shell passes them: not UTF-8
BENCH = ["--num_samples", "1", "--output_dir", "{tmp}/runs"]  # keeps an unfixed row short, and out of the repo
DATA = ["--output_dir", "{tmp}/runs"]  # the default --num_samples (10) covers every record of these files
EVAL = ["eval.py", "--output_path", "{tmp}/lm_eval"]
DIAG = ["-m", "harness.diagnose", "--out", "{tmp}/diag"]
TRAIN = ["-m", "harness.train", "--work_dir", "{tmp}/train"]


ROWS = [
    # -- eval.py (lm-eval) ---------------------------------------------------------------------------------------
    pytest.param([*EVAL, "--tasks", "gsm8k", "--model_args", "nosuch=1"], None, 2, "unknown key(s) nosuch",
                 id="eval-model_args-unknown"),
    pytest.param([*EVAL, "--tasks", "gsm8k", "--model_args", "exit_layer=abc"], None, 2, "exit_layer",
                 id="eval-model_args-bad-value"),
    pytest.param([*EVAL, "--tasks", "gsm8k", "--limit", "0"], None, 2, "--limit", id="eval-limit-0"),
    pytest.param([*EVAL, "--tasks", "gsm8k", "--limit", "-3"], None, 2, "--limit", id="eval-limit-negative"),
    pytest.param([*EVAL, "--tasks", "gsm8k", "--limit", "nan"], None, 2, "--limit", id="eval-limit-nan"),
    pytest.param([*EVAL, "--tasks", "gsm8k", "--num_fewshot", "-1"], None, 2, "--num_fewshot",
                 id="eval-num_fewshot-negative"),
    pytest.param([*EVAL, "--tasks", "gsm8k", "--limit", "1", "--output_path", "{tmp}/file.txt"], None, 2,
                 "is a file, not a folder", id="eval-output_path-is-a-file"),
    pytest.param([*EVAL, "--tasks", "gsm8k", "--limit", "1", "--output_path", "/proc/no-such/out"], None, 2,
                 "--output_path /proc/no-such/out: cannot create", id="eval-output_path-unwritable"),
    pytest.param([*EVAL, "--tasks", "no_such_task_xyz"], None, 2, "unknown lm-eval task",
                 id="eval-unknown-task-after-registry"),
    # -- generate.py ---------------------------------------------------------------------------------------------
    pytest.param(["generate.py"], None, 2, "no prompt on stdin", id="generate-stdin-devnull"),
    pytest.param(["generate.py"], CLOSED, 2, "stdin is closed", id="generate-stdin-closed"),
    pytest.param(["generate.py"], b"caf\xe9 au lait\n", 2, "stdin line 1 is not valid UTF-8",
                 id="generate-stdin-not-utf8"),
    pytest.param(["generate.py", "--prompt", NOT_UTF8], None, 2, "--prompt is not valid UTF-8",
                 id="generate-prompt-not-utf8"),
    pytest.param(["generate.py", "--no-chat_template", "--prompt", ""], None, 2, "--prompt is empty",
                 id="generate-empty-prompt"),
    pytest.param(["generate.py", "--prompt", "   "], None, 2, "--prompt is empty", id="generate-blank-prompt"),
    pytest.param(["generate.py", "--prompt", "hi", "--max_steps", "0"], None, 2, "--max_steps",
                 id="generate-max_steps-0"),
    # -- data (harness.tasks, through benchmark.py) ---------------------------------------------------------------
    pytest.param(["benchmark.py", "--dataset", "gsm8k", "--data_path", "{tmp}/gsm8k_null.jsonl", *DATA], None, 2,
                 "example 2: field 'question' is null", id="data-gsm8k-null-fields"),
    pytest.param(["benchmark.py", "--dataset", "gsm8k", "--data_path", "{tmp}/gsm8k_number.jsonl", *DATA], None,
                 2, "field 'question' is not a string", id="data-gsm8k-number-field"),
    pytest.param(["benchmark.py", "--dataset", "cnn_dm_summarization", "--data_path", "{tmp}/cnn_empty.jsonl",
                  *DATA], None, 2, "example cnn-empty-1: field 'article' is empty", id="data-cnn_dm-empty-article"),
    pytest.param(["benchmark.py", "--dataset", "cnn_dm_lm", "--data_path", "{tmp}/cnn_lm_empty.jsonl", *DATA],
                 None, 2, "example lm-empty-1: field 'article' is empty", id="data-cnn_dm_lm-empty-article"),
    pytest.param(["benchmark.py", "--dataset", "cnn_dm_lm", "--data_path", "{tmp}/cnn_lm_short.jsonl", *DATA],
                 None, 2, "example lm-short-1: empty reference", id="data-cnn_dm_lm-article-too-short"),
    # -- harness.diagnose -----------------------------------------------------------------------------------------
    pytest.param([*DIAG[:2], "--out", "{tmp}/file.txt"], None, 2, "--out", id="diagnose-out-is-a-file"),
    pytest.param([*DIAG[:2], "--out", "/proc/no-such/out"], None, 2, "--out", id="diagnose-out-unwritable"),
    pytest.param([*DIAG, "--static_layers", "0,99"], None, 2, "--static_layers", id="diagnose-static_layers-0"),
    pytest.param([*DIAG, "--static_layers", "4,x"], None, 2, "--static_layers", id="diagnose-static_layers-syntax"),
    pytest.param([*DIAG, "--static_layers", "1,99", "--num_samples", "1"], None, 2, "--static_layers 1,99",
                 id="diagnose-static_layers-above-L"),  # needs L: refused once the model is loaded, before any work
    pytest.param([*DIAG, "--num_samples", "0"], None, 2, "--num_samples", id="diagnose-num_samples-0"),
    pytest.param([*DIAG, "--max_tokens", "0"], None, 2, "--max_tokens", id="diagnose-max_tokens-0"),
    pytest.param([*DIAG, "--static_max_steps", "-1"], None, 2, "--static_max_steps",
                 id="diagnose-static_max_steps-negative"),
    # -- harness.train ----------------------------------------------------------------------------------------------
    pytest.param([*TRAIN, "--steps", "0"], None, 2, "--steps must be >= 1", id="train-steps-0"),
    pytest.param([*TRAIN, "--steps", "-5"], None, 2, "--steps must be >= 1", id="train-steps-negative"),
    pytest.param([*TRAIN, "--lr", "nan"], None, 2, "--lr", id="train-lr-nan"),
    pytest.param([*TRAIN, "--seq_len", "1"], None, 2, "--seq_len must be >= 2", id="train-seq_len-1"),
    pytest.param([*TRAIN, "--recipe", "free", "--free_kd_temperature", "inf"], None, 2, "--free_kd_temperature",
                 id="train-recipe-option-inf"),
    # -- benchmark.py: the lead's items -------------------------------------------------------------------------------
    pytest.param(["benchmark.py", "--max_steps", "0", *BENCH], None, 2, "--max_steps", id="benchmark-max_steps-0"),
    pytest.param(["benchmark.py", "--generation_strategy", "calm", "--threshold", "nan", "--max_steps", "2", *BENCH],
                 None, 2, "--threshold", id="benchmark-threshold-nan"),
    pytest.param(["benchmark.py", "--max_prompt_tokens", "0", "--max_steps", "2", *BENCH], None, 2,
                 "--max_prompt_tokens", id="benchmark-max_prompt_tokens-0"),
    pytest.param(["benchmark.py", "--max_prompt_tokens", "9000", "--max_steps", "2", *BENCH], None, 2,
                 "--max_prompt_tokens", id="benchmark-max_prompt_tokens-9000"),
    pytest.param(["benchmark.py", "--generation_strategy", "calm", "--sweep", "threshold=", "--max_steps", "2",
                  *BENCH], None, 2, "threshold", id="benchmark-sweep-empty-value"),
    pytest.param(["benchmark.py", "--device_map", '{"nosuch.module": "cpu"}', "--max_steps", "2", *BENCH], None, 2,
                 "nosuch.module", id="benchmark-device_map-unknown-module"),
]


def _close_stdin():
    os.close(0)


def run_row(argv: list[str], stdin, tmp: Path) -> subprocess.CompletedProcess:
    for name, text in FILES.items():
        (tmp / name).write_text(text, encoding="utf-8")
    args = [a.replace("{tmp}", str(tmp)) for a in argv]
    kw = {"stdin": subprocess.DEVNULL} if stdin is None else {"preexec_fn": _close_stdin} if stdin is CLOSED \
        else {"input": stdin}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], check=False, cwd=ROOT, capture_output=True, timeout=600, env=env,
                          **kw)


@pytest.mark.parametrize("argv,stdin,code,needle", ROWS)
def test_bad_input_gets_one_error_line(argv, stdin, code, needle, tmp_path):
    proc = run_row(argv, stdin, tmp_path)
    err = proc.stderr.decode("utf-8", "replace")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert proc.returncode == code, err
    assert lines and lines[-1].startswith("error:") and needle in lines[-1], err
    assert "overrides existing task" not in err  # lm-eval's registry noise stays off stderr


def _bounds():
    from harness.train import TRAIN_RANGES

    for name, low, _, closed in TRAIN_RANGES:
        yield pytest.param(name, low - 1 if closed else low, low if closed else None, id=name)
    yield pytest.param("lr", float("nan"), None, id="lr-nan")


@pytest.mark.parametrize("field,bad,ok", list(_bounds()))
def test_training_numbers_are_checked_where_they_enter(field, bad, ok):
    """Every bounded number of TrainConfig (the flags of every recipe) is refused below its bound, in-process; the
    matrix above runs a few of them through the CLI."""
    from harness.config import UsageError
    from harness.train.common import TrainConfig

    with pytest.raises(UsageError, match=f"^--{field} must be"):
        TrainConfig(**{field: bad})
    if ok is not None:
        assert getattr(TrainConfig(**{field: ok}), field) == ok


def test_every_bundled_example_passes_the_record_check():
    """The load-time check refuses bad records, never the shipped data: every bundled evaluation file loads whole."""
    from harness.tasks import TASKS, load_examples

    for name in TASKS:
        assert load_examples(name)  # all records (num_samples None), each checked

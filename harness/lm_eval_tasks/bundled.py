"""Datasets and scoring for the bundled lm-eval tasks (referenced by the YAML files with !function).

Each `*_dataset` returns a datasets.DatasetDict built from the files in harness/data, so these tasks
never touch the hub. Scoring reuses harness.metrics (rouge-score; the harness sandbox for HumanEval).
"""
from __future__ import annotations

import datasets

from harness.metrics import pass_at_1, rouge
from harness.tasks import DATA_DIR, Example, read_jsonl


def _split(name: str) -> datasets.Dataset:
    return datasets.Dataset.from_list([r for _, r in read_jsonl(DATA_DIR / name)])


def gsm8k_dataset(**kwargs) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": _split("gsm8k_main_test.jsonl"), "train": _split("gsm8k_main_train.jsonl.gz")})


def humaneval_dataset(**kwargs) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": _split("openai_humaneval_test.jsonl")})


def cnn_dailymail_dataset(**kwargs) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": _split("cnn_dailymail_3.0.0_test.jsonl.gz")})


def xsum_dataset(**kwargs) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": _split("xsum_test.jsonl.gz"), "validation": _split("xsum_validation.jsonl.gz")})


def rouge_results(doc: dict, results: list[str], reference_field: str) -> dict:
    ex = Example(id="", prompt="", reference=doc[reference_field])
    return rouge(results[0].strip(), ex)


def cnn_dailymail_results(doc: dict, results: list[str]) -> dict:
    return rouge_results(doc, results, "highlights")


def xsum_results(doc: dict, results: list[str]) -> dict:
    return rouge_results(doc, results, "summary")


def humaneval_results(doc: dict, results: list[str]) -> dict:
    """pass@1 of one greedy completion, executed in the harness sandbox (a subprocess, never in-process)."""
    ex = Example(id=doc["task_id"], prompt=doc["prompt"], reference="",
                 meta={"test": doc["test"], "entry_point": doc["entry_point"]})
    return {"pass@1": pass_at_1(results[0], ex)["pass_at_1"]}

"""Quality metrics, one function per name: prediction + example -> {metric: value}."""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Callable, Optional

from .sandbox import run_program
from .tasks import Example

_NUMBER = re.compile(r"-?[$0-9.,]*[0-9]")


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def rouge(prediction: str, example: Example) -> dict:
    """ROUGE-1/2/L F-measures (rouge-score, Porter stemming), in [0, 1]."""
    s = _rouge().score(example.reference, prediction)
    return {k: s[k].fmeasure for k in ("rouge1", "rouge2", "rougeL")}


class _LowercaseWhitespace:
    """LayerSkip's ROUGE tokenization: torchmetrics ROUGEScore with normalizer=LowercaseProcessingFunction
    lowercases only (punctuation stays on the words) and splits on whitespace; no stemming."""

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return [t for t in text.lower().split() if t]


@lru_cache(maxsize=1)
def _rouge_layerskip():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False,
                                    tokenizer=_LowercaseWhitespace())


def rouge_layerskip(prediction: str, example: Example) -> dict:
    """ROUGE-1/2/L F-measures as LayerSkip's benchmark.py computes them (lowercased, whitespace, no stemming)."""
    s = _rouge_layerskip().score(example.reference, prediction)
    return {k: s[k].fmeasure for k in ("rouge1", "rouge2", "rougeL")}


def _to_number(text: str) -> Optional[float]:
    text = text.replace(",", "").replace("$", "").rstrip(".")
    try:
        return float(text)
    except ValueError:
        return None


def gsm8k_answer(text: str) -> Optional[float]:
    """The final number of a GSM8K answer: after '####' if present, else the last number in the text."""
    if "####" in text:
        m = _NUMBER.search(text.split("####", 1)[1])
        if m:
            return _to_number(m.group())
    found = _NUMBER.findall(text)
    return _to_number(found[-1]) if found else None


def gsm8k_exact_match(prediction: str, example: Example) -> dict:
    """1.0 when the prediction's final number equals the reference's '#### N' numerically."""
    gold, pred = gsm8k_answer(example.reference), gsm8k_answer(prediction)
    ok = gold is not None and pred is not None and abs(gold - pred) < 1e-6
    return {"exact_match": float(ok), "predicted_answer": pred, "gold_answer": gold}


def humaneval_program(completion: str, example: Example) -> str:
    """The script HumanEval runs: prompt + completion + tests + check(entry_point)."""
    return (f"{example.prompt}{completion}\n\n{example.meta['test']}\n\n"
            f"check({example.meta['entry_point']})\n")


def extract_code(answer: str, entry_point: str) -> Optional[str]:
    """The markdown code block of a chat answer that defines `entry_point` (else the first block), or None."""
    import re

    blocks = re.findall(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:\n```|$)", answer, flags=re.S)
    if not blocks:
        return None
    return next((b for b in blocks if re.search(rf"def\s+{re.escape(entry_point)}\s*\(", b)), blocks[0])


def humaneval_chat_program(answer: str, example: Example) -> str:
    """What HumanEval runs for a chat answer: the prompt's imports + the extracted block defining the entry point
    (or, without one, prompt + block as a completion) + tests + check(entry_point)."""
    import re

    entry = example.meta["entry_point"]
    code = extract_code(answer, entry)
    if code is None:
        return humaneval_program(answer, example)
    if not re.search(rf"def\s+{re.escape(entry)}\s*\(", code):
        return humaneval_program(code, example)
    imports = "\n".join(line for line in example.prompt.splitlines() if line.startswith(("import ", "from ")))
    return f"{imports}\n{code}\n\n{example.meta['test']}\n\ncheck({entry})\n"


def pass_at_1_chat(prediction: str, example: Example, timeout: float = 10.0) -> dict:
    """pass@1 of a chat answer: its code block is extracted first (so the metric measures the model's code, not
    its markdown habit)."""
    res = run_program(humaneval_chat_program(prediction, example), timeout=timeout)
    return {"pass_at_1": float(res.passed), "execution": res.status, "execution_detail": res.detail,
            "code_block": extract_code(prediction, example.meta["entry_point"]) is not None}


def pass_at_1(prediction: str, example: Example, timeout: float = 10.0) -> dict:
    """1.0 when the completed function passes the problem's tests in the sandbox (one sample = pass@1)."""
    res = run_program(humaneval_program(prediction, example), timeout=timeout)
    return {"pass_at_1": float(res.passed), "execution": res.status, "execution_detail": res.detail}


def no_reference(prediction: str, example: Example) -> dict:
    """A task without references (Spec-Bench measures speed): no score; its quality is consistency with the
    baseline's output, which the report computes across runs."""
    return {}


METRICS: dict[str, Callable[[str, Example], dict]] = {
    "none": no_reference,
    "rouge": rouge,
    "rouge_layerskip": rouge_layerskip,
    "gsm8k_exact_match": gsm8k_exact_match,
    "pass_at_1": pass_at_1,
    "pass_at_1_chat": pass_at_1_chat,
}

# Which keys of a metric's output are scores to average in summaries (others are diagnostics).
SCORE_KEYS = ("rouge1", "rouge2", "rougeL", "exact_match", "pass_at_1")
# A report table's main quality metric is the first of these it has: one per task family (summaries: ROUGE-L).
PRIMARY_ORDER = ("rougeL", "exact_match", "pass_at_1")

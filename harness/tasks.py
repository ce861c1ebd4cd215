"""Task registry: where each task's data lives, how a prompt is built, how a prediction is scored.

Prompt formats follow LayerSkip's ``data.py`` so numbers are comparable:

* ``cnn_dm_summarization``: ``Article: {article}\\nSummary:``; reference = highlights.
* ``xsum_summarization``: ``Article: {document}\\nSummary:``; reference = summary.
* ``cnn_dm_lm``: the first 100 whitespace-separated words of the article; reference = the rest of it.
* ``human_eval``: the problem's prompt (signature + docstring); scored by executing its tests.
* ``gsm8k``: ``Question: {question}\\nAnswer:`` (lm-eval's format); scored on the number after ``####``.
* ``spec_bench``: Spec-Bench's 480 questions in 13 categories, each turn through the chat template, MT-bench's
  second turn asked after the method's own first answer (its evaluation/eval.py); speed only (no reference), so
  its quality column is consistency with the baseline's output. ``--num_samples`` counts per category.

Few-shot exemplars (``--n_shot``) are rendered in the same format with their reference, each followed
by a newline (LayerSkip) or a blank line (gsm8k), and drawn with ``--seed`` from another split where
one is bundled (gsm8k: train, xsum: validation); otherwise from the same file's records *after* the
evaluated ones, so they never overlap the examples scored.
"""
from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from .config import UsageError

DATA_DIR = Path(__file__).parent / "data"
LM_PREFIX_WORDS = 100  # LayerSkip's PREFIX_LENGTH for cnn_dm_lm


@dataclass(frozen=True)
class Example:
    """One evaluation item."""

    id: str  # stable identifier (dataset id or file line number)
    prompt: str  # full prompt text, shots included
    reference: str  # gold text the metric compares against
    meta: dict = field(default_factory=dict)  # task extras (e.g. HumanEval tests and entry point)


@dataclass(frozen=True)
class Task:
    """A dataset with its prompt format, metric and stopping rules."""

    name: str
    eval_file: str  # bundled file evaluated by default
    hf: tuple  # (path, config, split) for --data_source hf
    fields: tuple  # fields every record must have
    prompt: Callable[[dict], str]  # record -> prompt without shots
    reference: Callable[[dict], str]  # record -> reference text
    shot: Optional[Callable[[dict], str]]  # record -> exemplar text; None = no few-shot
    metric: str  # key into harness.metrics.METRICS
    stop: tuple = ()  # stop strings ending the continuation
    max_steps: int = 128  # default new-token limit
    shot_file: Optional[str] = None  # bundled split for exemplars, if any
    hf_shot_split: Optional[str] = None
    shot_sep: str = ""  # text between the exemplars and the prompt
    id_field: Optional[str] = None
    meta_fields: tuple = ()
    chat_stop: tuple = ()  # stop strings with --chat_template (an instruct model answers in its own format)
    chat_metric: Optional[str] = None  # metric with --chat_template, when the answer format differs
    scores_reference: bool = True  # the metric compares against the reference (pass@1 runs the tests instead)
    in_all: bool = True  # `--dataset all` runs it
    lm_eval_task: Optional[str] = None  # its bundled offline lm-eval task (harness/lm_eval_tasks), if any
    chat_only: bool = False  # every prompt goes through the chat template (a conversation benchmark)
    categories: tuple = ()  # its categories, if --categories selects among them and --num_samples counts per one


def _summary_shot(doc: str, ref: str) -> Callable[[dict], str]:
    return lambda r: f"Article: {r[doc]}\nSummary: {r[ref].replace(chr(10), '')}\n"


def _lm_prompt(r: dict) -> str:
    return " ".join(r["article"].split()[:LM_PREFIX_WORDS])


def _lm_reference(r: dict) -> str:
    return " ".join(r["article"].split()[LM_PREFIX_WORDS:])


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("cnn_dm_summarization", "cnn_dailymail_3.0.0_test.jsonl.gz", ("cnn_dailymail", "3.0.0", "test"),
         ("article", "highlights"), lambda r: f"Article: {r['article']}\nSummary:", lambda r: r["highlights"],
         _summary_shot("article", "highlights"), "rouge", stop=("\nArticle:", "\n\n"), max_steps=128,
         hf_shot_split="train", shot_sep="\n", id_field="id", lm_eval_task="cnn_dailymail"),
    Task("xsum_summarization", "xsum_test.jsonl.gz", ("xsum", None, "test"),
         ("document", "summary"), lambda r: f"Article: {r['document']}\nSummary:", lambda r: r["summary"],
         _summary_shot("document", "summary"), "rouge", stop=("\nArticle:", "\n"), max_steps=64,
         shot_file="xsum_validation.jsonl.gz", hf_shot_split="validation", shot_sep="\n", id_field="id",
         lm_eval_task="xsum"),
    Task("cnn_dm_lm", "cnn_dailymail_3.0.0_test.jsonl.gz", ("cnn_dailymail", "3.0.0", "test"),
         ("article",), _lm_prompt, _lm_reference, None, "rouge", stop=(), max_steps=128, id_field="id",
         in_all=False),  # LayerSkip's language-modelling variant of CNN/DM, not a task of its own
    Task("human_eval", "openai_humaneval_test.jsonl", ("openai_humaneval", None, "test"),
         ("task_id", "prompt", "test", "entry_point"), lambda r: r["prompt"], lambda r: r.get("canonical_solution", ""),
         None, "pass_at_1", stop=("\nclass", "\ndef", "\n#", "\nif", "\nprint"), max_steps=256,
         id_field="task_id", meta_fields=("test", "entry_point"),
         # with the chat template the model writes a markdown answer: stop after the closing fence of a code
         # block and run the extracted block (pass_at_1_chat), not prompt + markdown
         chat_stop=("\n```\n",), chat_metric="pass_at_1_chat", scores_reference=False, lm_eval_task="humaneval"),
    Task("gsm8k", "gsm8k_main_test.jsonl", ("gsm8k", "main", "test"), ("question", "answer"),
         lambda r: f"Question: {r['question']}\nAnswer:", lambda r: r["answer"],
         lambda r: f"Question: {r['question']}\nAnswer: {r['answer']}\n\n", "gsm8k_exact_match",
         stop=("Question:", "\n\n"), max_steps=256, shot_file="gsm8k_main_train.jsonl.gz", hf_shot_split="train",
         lm_eval_task="gsm8k"),
]}


# Spec-Bench's categories (hemingkx/Spec-Bench evaluation/speed.py:9 lists MT-bench's; :73 the others)
SPEC_BENCH_MT_BENCH = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
SPEC_BENCH_CATEGORIES = SPEC_BENCH_MT_BENCH + ("translation", "summarization", "qa", "math_reasoning", "rag")
TASKS["spec_bench"] = Task(
    "spec_bench", "spec_bench_question.jsonl.gz", None, ("category", "turns"), lambda r: r["turns"][0],
    lambda r: "", None, "none", stop=(), max_steps=1024, id_field="question_id", meta_fields=("category", "turns"),
    scores_reference=False, in_all=False, chat_only=True, categories=SPEC_BENCH_CATEGORIES)


ALL_TASKS = tuple(name for name, t in TASKS.items() if t.in_all)  # `--dataset all`, in registry order
LM_EVAL_TASKS = tuple(t.lm_eval_task for t in TASKS.values() if t.lm_eval_task)  # eval.py's bundled offline tasks


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UsageError(f"unknown --dataset {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[name]


def read_jsonl(path: Path | str) -> Iterator[tuple[int, dict]]:
    """(line number, record) for every non-empty line of a .jsonl or .jsonl.gz file; clear errors."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UsageError(f"{path}:{n}: malformed JSON line ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise UsageError(f"{path}:{n}: expected a JSON object per line")
                yield n, rec
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read data file {path}: {e}") from None


def _records_from_file(task: Task, path: Path | str) -> list[dict]:
    out = []
    for n, rec in read_jsonl(path):
        missing = [f for f in task.fields if f not in rec]
        if missing:
            raise UsageError(f"{path}:{n}: record lacks field(s) {', '.join(missing)} needed by {task.name}")
        rec.setdefault("_line", n)
        out.append(rec)
    return out


def example_id(task: Task, rec: dict) -> str:
    """The id an Example of this record gets: the dataset's id field, else the record's line number."""
    return str(rec.get(task.id_field) if task.id_field and rec.get(task.id_field) is not None else rec["_line"])


def record_problem(task: Task, rec: dict) -> Optional[str]:
    """Why this record cannot be an example of `task` (None if it can). The one place every task's fields are
    checked: each field the task reads is a non-blank string, and the prompt (and the reference, where the
    metric reads it) it builds is not empty, so a bad record stops the run at load time, not at scoring."""
    for f in task.fields:
        v = rec.get(f)
        if isinstance(v, list):  # a conversation's turns: one or more non-empty strings
            bad = not v or any(not isinstance(t, str) or not t.strip() for t in v)
            problem = "has an empty or non-string turn (or none)" if bad else None
        else:
            problem = "is null" if v is None else "is not a string" if not isinstance(v, str) \
                else "is empty" if not v.strip() else None
        if problem:
            return f"field {f!r} {problem} ({task.name} needs a non-empty string)"
    if not task.prompt(rec).strip():
        return f"empty prompt ({task.name} builds it from {', '.join(task.fields)})"
    if task.categories and rec["category"] not in task.categories:
        return f"unknown category {rec['category']!r} ({task.name} has {', '.join(task.categories)})"
    if task.scores_reference and not task.reference(rec).strip():
        hint = f": the article has no words after the first {LM_PREFIX_WORDS}" if task.name == "cnn_dm_lm" else ""
        return f"empty reference{hint}"
    return None


def check_records(task: Task, records: list[dict], source: str) -> None:
    """One line naming the first record that cannot be an example (see record_problem)."""
    for rec in records:
        problem = record_problem(task, rec)
        if problem:
            raise UsageError(f"{source}:{rec['_line']}: example {example_id(task, rec)}: {problem}")


def _records_from_hf(task: Task, split: str) -> list[dict]:
    from .model import hub_reachable

    path, cfg, _ = task.hf
    if not hub_reachable():
        raise UsageError("--data_source hf: the Hugging Face hub is unreachable (offline?); "
                         "use the bundled data (--data_source bundled) or --data_path FILE")
    try:
        import datasets

        ds = datasets.load_dataset(path, cfg, split=split)
    except Exception as e:  # network, missing dataset, ... : one line for the user
        raise UsageError(f"--data_source hf: cannot load {path} ({split}) through datasets: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return [dict(r, _line=i + 1) for i, r in enumerate(ds)]


def parse_categories(task: Task, text: Optional[str]) -> tuple:
    """--categories a,b (or mt_bench for its 8) -> the task's categories to run, in the task's order (all if None)."""
    if not text:
        return task.categories
    if not task.categories:
        raise UsageError(f"--categories applies to a task with categories (spec_bench), not {task.name}")
    asked = set()
    for c in (c.strip() for c in text.split(",")):
        group = SPEC_BENCH_MT_BENCH if c == "mt_bench" else (c,)
        unknown = [g for g in group if g not in task.categories]
        if unknown or not c:
            raise UsageError(f"--categories: unknown category {c!r}; {task.name} has mt_bench, "
                             f"{', '.join(task.categories)}")
        asked.update(group)
    return tuple(c for c in task.categories if c in asked)


def load_examples(name: str, num_samples: Optional[int] = None, n_shot: int = 0, seed: int = 42,
                  data_path: Optional[str] = None, data_source: str = "bundled",
                  shuffle: bool = False, categories: Optional[str] = None) -> list[Example]:
    """The first `num_samples` examples of a task (all if None/0), with `n_shot` exemplars in each prompt. A task
    with categories takes the first `num_samples` of each category asked for (`categories`, all by default), so a
    small run still covers every one.

    With `shuffle` the records are first shuffled by random.Random(seed), as LayerSkip's benchmark.py
    does (random.seed(seed) then random.shuffle in data.py's get_data) before taking the first N.
    """
    task = get_task(name)
    chosen = parse_categories(task, categories)
    if data_source == "hf" and task.hf is None:
        raise UsageError(f"--data_source hf: {name} is not on the Hugging Face hub as a dataset; it is bundled "
                         "(--data_source bundled) or read from --data_path FILE")
    if n_shot < 0:
        raise UsageError(f"--n_shot must be >= 0, got {n_shot}")
    if n_shot and task.shot is None:
        raise UsageError(f"--n_shot is not supported for {name} (it has no exemplar format)")
    if data_path is not None:
        source = str(data_path)
        records = _records_from_file(task, data_path)
    elif data_source == "hf":
        source = f"{task.hf[0]} ({task.hf[2]})"
        records = _records_from_hf(task, task.hf[2])
    else:
        source = str(DATA_DIR / task.eval_file)
        records = _records_from_file(task, DATA_DIR / task.eval_file)
    if shuffle:
        records = list(records)
        random.Random(seed).shuffle(records)
    if task.categories:
        check_records(task, records, source)  # a category must be known before records are counted per category
        evaluated = [r for c in chosen for r in [r for r in records if r["category"] == c][:num_samples or None]]
    else:
        evaluated = records[:num_samples] if num_samples else records
    check_records(task, evaluated, source)  # before any model work
    shots = ""
    if n_shot:
        if data_source == "hf" and task.hf_shot_split:
            pool = _records_from_hf(task, task.hf_shot_split)
        elif task.shot_file:
            pool = _records_from_file(task, DATA_DIR / task.shot_file)
        else:  # no other split: exemplars from the records not evaluated
            pool = records[len(evaluated):]
        pool = [r for r in pool if record_problem(task, r) is None]  # an empty exemplar is no exemplar
        if len(pool) < n_shot:
            raise UsageError(f"--n_shot {n_shot}: only {len(pool)} records available for exemplars "
                             f"outside the evaluated ones; lower --num_samples or --n_shot")
        shots = "".join(task.shot(r) for r in random.Random(seed).sample(pool, n_shot)) + task.shot_sep
    return [Example(id=example_id(task, r), prompt=shots + task.prompt(r), reference=task.reference(r),
                    meta={k: r[k] for k in task.meta_fields}) for r in evaluated]

"""What every training recipe shares: config, data (train/validation splits only), the teacher, the loop.

The loop logs loss and per-exit agreement to `<work_dir>/train_log.jsonl` with a progress bar, checkpoints every
`--save_every` steps to `<work_dir>/checkpoint.pt` (trainable state, optimizer, RNG, step) and resumes from it when
restarted with the same `--work_dir`. On CUDA the forward runs under bf16 autocast; on CPU in the model's dtype.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..config import UsageError, _f
from ..tasks import DATA_DIR, read_jsonl
from ..trained_exits import ExitArtifact

# Training / calibration text: train and validation splits only (never the test files the harness reports on).
# name -> (bundled file, record -> text in the task's own prompt format)
SOURCES: dict[str, tuple[str, Callable[[dict], str]]] = {
    "xsum_validation": ("xsum_validation.jsonl.gz", lambda r: f"Article: {r['document']}\nSummary: {r['summary']}\n"),
    "gsm8k_train": ("gsm8k_main_train.jsonl.gz", lambda r: f"Question: {r['question']}\nAnswer: {r['answer']}\n\n"),
}
# name -> (task whose prompt format, reference and stop strings held-out prompts of the source use, split name)
SPLITS: dict[str, tuple[str, str]] = {"xsum_validation": ("xsum_summarization", "xsum validation"),
                                      "gsm8k_train": ("gsm8k", "gsm8k train")}


@dataclass
class TrainConfig:
    """Flags shared by every recipe (recipe-specific ones come from each recipe's own options dataclass)."""

    recipe: str = _f("exit_adapters", "training recipe (see the list below)")
    model: Optional[str] = _f(None, "model: omitted = embedded SmolLM2-135M-Instruct; or a directory, .gguf, hub id")
    exits: str = _f("none", "start from this exit artifact (none, auto = the shipped one, or a path); the recipe "
                            "adds what it learns to it and writes the result to --output")
    output: Optional[str] = _f(None, "exit artifact to write (default: <work_dir>/exits.safetensors)")
    work_dir: Optional[str] = _f(None, "checkpoints and train_log.jsonl; a restart with the same dir resumes "
                                       "(default: results/train/<recipe>)")
    data: str = _f("xsum_validation,gsm8k_train", "comma-separated training sources (train/validation splits "
                   "only): " + ", ".join(SOURCES))
    max_docs: int = _f(2000, "at most this many documents per source (shuffled with --seed)")
    holdout_docs: int = _f(200, "the last N documents (file order) of every source are never trained on: "
                                "calibration and the self-speculation fit read only those (0 = train on all)")
    seq_len: int = _f(256, "tokens per training sequence")
    batch_size: int = _f(4, "sequences per step")
    steps: int = _f(200, "optimizer steps")
    schedule_steps: Optional[int] = _f(None, "length of the learning-rate schedule (linear decay to 10%%); default "
                                             "--steps. Longer than --steps = stop early on a longer schedule")
    lr: float = _f(1e-3, "learning rate (AdamW)")
    seed: int = _f(0, "seed for data order, initialisation and dropout")
    eval_sequences: int = _f(8, "held-out sequences (from the same splits, never trained on) for agreement")
    exit_layers: str = _f("6,8,10", "comma-separated exit layers the recipe trains or reads")
    log_every: int = _f(10, "evaluate agreement and log every N steps")
    save_every: int = _f(50, "checkpoint every N steps")
    device: str = _f("auto", "torch device: auto, cpu, cuda, ...")
    dtype: str = _f("auto", "float32 | bfloat16 | auto (float32 on cpu; on cuda float32 weights + bf16 autocast)")

    def __post_init__(self) -> None:
        from ..config import check_values
        from . import TRAIN_RANGES  # the ranges live with the training CLI (harness/train/__init__.py)

        check_values(self, TRAIN_RANGES)

    def layers(self, num_layers: int) -> list[int]:
        try:
            out = sorted({int(x) for x in self.exit_layers.split(",") if x.strip()})
        except ValueError:
            raise UsageError(f"--exit_layers {self.exit_layers!r}: expected comma-separated integers") from None
        bad = [x for x in out if not 1 <= x < num_layers]
        if bad or not out:
            raise UsageError(f"--exit_layers {self.exit_layers}: each must be in 1..{num_layers - 1}")
        return out

    def paths(self) -> tuple[Path, Path]:
        work = Path(self.work_dir or f"results/train/{self.recipe}")
        return work, Path(self.output) if self.output else work / "exits.safetensors"


# -- data ---------------------------------------------------------------------------------------------
# Documents are named by their record index in the source's bundled file (0-based, file order). Every source is
# split once, by position, into a training pool and a held-out tail of --holdout_docs documents: no recipe
# trains on the tail, so calibration (Learn then Test needs calibration data exchangeable with test data, which
# training on them breaks) and the self-speculation fit can read it. Recipes record the documents they read
# (`documents_record`) in the artifact's provenance; `trained_records` reads those records back.
def source_records(name: str) -> tuple[dict, ...]:
    """Every record of a training source, in file order (read once per process; do not modify)."""
    if name not in SOURCES:
        raise UsageError(f"--data {name!r}: unknown source; choose from {', '.join(SOURCES)}")
    return _read_source(name)


@functools.lru_cache(maxsize=None)
def _read_source(name: str) -> tuple[dict, ...]:
    return tuple(r for _, r in read_jsonl(DATA_DIR / SOURCES[name][0]))


def split_source(size: int, holdout: int) -> tuple[list[int], list[int]]:
    """(training pool, held-out tail) record indices of a source of `size` records."""
    if holdout < 0:
        raise UsageError(f"--holdout_docs must be >= 0, got {holdout}")
    cut = max(0, size - holdout)
    return list(range(cut)), list(range(cut, size))


def _selected(size: int, seed: int, max_docs: int, holdout: int) -> list[int]:
    """load_texts' choice from one source: the pool shuffled with the seed, its first max_docs (the permutation
    only depends on the pool's length, so with holdout 0 it equals shuffling the formatted documents)."""
    order, _ = split_source(size, holdout)
    random.Random(seed).shuffle(order)
    return order[:max_docs]


def training_documents(cfg: TrainConfig) -> dict[str, list[int]]:
    """Record indices that load_texts(cfg) reads, per source, in reading order."""
    out = {}
    for name in [s.strip() for s in cfg.data.split(",") if s.strip()]:
        out[name] = _selected(len(source_records(name)), cfg.seed, cfg.max_docs, cfg.holdout_docs)
    return out


def heldout_documents(name: str, holdout: int) -> list[int]:
    """The held-out tail of a source: record indices no recipe trained with --holdout_docs >= `holdout` reads."""
    return split_source(len(source_records(name)), holdout)[1]


def load_texts(cfg: TrainConfig) -> list[str]:
    """Documents of the chosen sources' training pools, shuffled with the seed, at most max_docs per source."""
    texts = []
    for name, chosen in training_documents(cfg).items():
        records, fmt = source_records(name), SOURCES[name][1]
        texts += [fmt(records[i]) for i in chosen]
    random.Random(cfg.seed + 1).shuffle(texts)
    return texts


def documents_record(name: str, indices) -> dict:
    """Provenance of the documents of one source a recipe read: split, file, record indices, content hash."""
    import hashlib

    records, fmt = source_records(name), SOURCES[name][1]
    ids = sorted({int(i) for i in indices})
    digest = hashlib.sha256("".join(fmt(records[i]) for i in ids).encode("utf-8")).hexdigest()
    return {"split": SPLITS[name][1], "file": SOURCES[name][0], "records": ids, "documents": len(ids),
            "sha256": digest}


def trained_records(art, name: str) -> tuple[set[int], list[str]]:
    """Record indices of source `name` that the artifact's training recipes read, and which recipes read any.

    Exact records (`training_data` in a recipe's provenance) are used where present; otherwise the selection is
    rebuilt from the recipe's recorded config (data, seed, max_docs, holdout_docs: load_texts' choice), which
    covers every recipe that trains on load_texts. The calibrate recipe trains nothing and is skipped.
    """
    used: set[int] = set()
    by = []
    size = None
    for recipe_name, prov in sorted((getattr(art, "provenance", None) or {}).items()):
        if recipe_name == "calibrate" or not isinstance(prov, dict):
            continue
        mine: set[int] = set((prov.get("training_data") or {}).get(name, {}).get("records", []))
        c = prov.get("config") or {}
        if name in [s.strip() for s in str(c.get("data", "")).split(",")]:
            size = size if size is not None else len(source_records(name))
            mine |= set(_selected(size, c.get("seed", 0), c.get("max_docs", size), c.get("holdout_docs", 0)))
        if mine:
            used |= mine
            by.append(recipe_name)
    return used, by


@torch.no_grad()
def greedy_continuations_of(model, pending: dict[str, list[int]], count: int, max_new: int, prompt_tokens: int,
                            min_new: int = 1, progress: Optional[str] = None,
                            task_stops: bool = True) -> tuple[list, dict, int]:
    """The full model's greedy continuations of up to `count` documents taken in turn from each source's list
    (`pending`, consumed from the front): each in its task's prompt format cut from the left to `prompt_tokens`,
    ended as evaluation ends it (the task's stop strings, EOS, or `max_new` tokens; without `task_stops` only EOS
    and `max_new` end it: training data, where text past a stop string is still the model's own). Continuations
    shorter than `min_new` tokens are skipped. Returns ([(prompt + continuation ids, prompt length)], record indices
    used per source, skipped)."""
    from ..config import GenerationConfig
    from ..generators import StopCondition, build_generator
    from ..tasks import TASKS

    gen = build_generator(model, GenerationConfig(max_steps=max_new))  # full depth
    seqs, used, skipped = [], {s: [] for s in pending}, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=count, desc=progress, dynamic_ncols=True)
    while len(seqs) < count and any(pending.values()):
        for s in pending:
            if not pending[s] or len(seqs) == count:
                continue
            i = pending[s].pop(0)
            task = TASKS[SPLITS[s][0]]
            ids = model.encode(task.prompt(source_records(s)[i]))[-prompt_tokens:]
            res = gen.generate(ids, StopCondition(model, max_new, task.stop if task_stops else ()))
            if len(res.tokens) < min_new:
                skipped += 1
                continue
            seqs.append((ids + res.tokens, len(ids)))
            used[s].append(i)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return seqs, used, skipped


def pack(tokenizer, texts: list[str], seq_len: int, limit: Optional[int] = None) -> torch.Tensor:
    """Token ids of the texts, each ended by EOS, concatenated and cut into (N, seq_len) rows."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"] + [eos]
        if limit is not None and len(ids) >= limit * seq_len:
            break
    n = len(ids) // seq_len
    if limit is not None:
        n = min(n, limit)
    if n == 0:
        raise UsageError(f"not enough training text for one sequence of {seq_len} tokens")
    return torch.tensor(ids[:n * seq_len]).view(n, seq_len)


def train_eval_split(cfg: TrainConfig, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(training rows, held-out rows): the held-out rows are the last eval_sequences of the packed stream."""
    rows = pack(tokenizer, load_texts(cfg), cfg.seq_len)
    if len(rows) <= cfg.eval_sequences:
        raise UsageError(f"only {len(rows)} sequences of {cfg.seq_len} tokens; lower --eval_sequences or --seq_len")
    return rows[:-cfg.eval_sequences], rows[-cfg.eval_sequences:]


# -- the model as teacher -------------------------------------------------------------------------------
def autocast(device: torch.device):
    """bf16 autocast on CUDA (weights stay fp32 for the optimizer); nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def hidden_states(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Raw hidden state after every depth 0..L-1 (0 = embeddings) and the final-normed state at depth L."""
    out = model.hf.model(input_ids=ids.to(model.device), output_hidden_states=True, use_cache=False)
    return list(out.hidden_states)


@torch.no_grad()
def agreement(model, rows: torch.Tensor, layers: list[int], batch: int = 4) -> dict[int, float]:
    """Teacher-forced top-1 agreement of each exit (with its attached adapter, if any) with the last layer."""
    hits = {d: 0 for d in layers}
    total = 0
    for i in range(0, len(rows), batch):
        with autocast(model.device):
            hs = hidden_states(model, rows[i:i + batch])
            target = model.lm_head(hs[-1]).argmax(-1)
            for d in layers:
                hits[d] += int((model.exit_logits(hs[d], layer=d).argmax(-1) == target).sum())
        total += target.numel()
    return {d: hits[d] / total for d in layers}


# -- loop -------------------------------------------------------------------------------------------------
@dataclass
class Loop:
    """One recipe's optimisation: trainable modules, a loss per batch, an evaluation, checkpoints."""

    cfg: TrainConfig
    modules: dict[str, torch.nn.Module]  # what is trained and checkpointed, by name
    loss: Callable[[torch.Tensor, int], tuple[torch.Tensor, dict]]  # (batch rows, step) -> (loss, metrics)
    evaluate: Callable[[], dict]  # -> metrics logged every log_every steps and at the end
    lr: Optional[float] = None  # overrides cfg.lr
    weight_decay: float = 0.0
    history: list[dict] = field(default_factory=list)  # every logged line

    def run(self, rows: torch.Tensor) -> dict:
        """Train for cfg.steps (resuming from the work dir's checkpoint); returns the last evaluation."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        work, _ = cfg.paths()
        work.mkdir(parents=True, exist_ok=True)
        params = [p for m in self.modules.values() for p in m.parameters() if p.requires_grad]
        if not params:
            raise UsageError(f"recipe {cfg.recipe}: nothing to train")
        opt = torch.optim.AdamW(params, lr=self.lr or cfg.lr, weight_decay=self.weight_decay)
        horizon = cfg.schedule_steps or cfg.steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(
            0.1, 1 - s / max(horizon, 1)))  # short warm-up, linear decay to 10%
        gen = torch.Generator().manual_seed(cfg.seed)
        step = 0
        ckpt = work / "checkpoint.pt"
        log_path = work / "train_log.jsonl"
        if ckpt.exists():
            state = torch.load(ckpt, map_location="cpu", weights_only=False)
            if state.get("recipe") != cfg.recipe:
                raise UsageError(f"{ckpt} belongs to recipe {state.get('recipe')}; use another --work_dir")
            for name, m in self.modules.items():
                m.load_state_dict(state["modules"][name])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            gen.set_state(state["rng"])
            step = state["step"]
        bar = tqdm(total=cfg.steps, initial=step, desc=cfg.recipe, dynamic_ncols=True)
        last_eval: dict = {}
        t0 = time.perf_counter()
        while step < cfg.steps:
            idx = torch.randint(len(rows), (cfg.batch_size,), generator=gen)
            for m in self.modules.values():
                m.train()
            loss, metrics = self.loss(rows[idx], step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            line = {"step": step, "loss": float(loss.detach()), "lr": sched.get_last_lr()[0],
                    "seconds": time.perf_counter() - t0, **metrics}
            if step % cfg.log_every == 0 or step == cfg.steps:
                for m in self.modules.values():
                    m.eval()
                last_eval = self.evaluate()
                line.update(last_eval)
            self.history.append(line)
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", **{k: f"{v:.3f}" for k, v in last_eval.items()
                                                          if isinstance(v, float)})
            if step % cfg.save_every == 0 or step == cfg.steps:
                tmp = ckpt.with_suffix(".tmp")
                torch.save({"recipe": cfg.recipe, "step": step, "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "rng": gen.get_state(),
                            "modules": {n: m.state_dict() for n, m in self.modules.items()}}, tmp)
                tmp.replace(ckpt)
        bar.close()
        for m in self.modules.values():
            m.eval()
        return last_eval or self.evaluate()


# -- artifact ----------------------------------------------------------------------------------------------
def start_artifact(cfg: TrainConfig, model) -> ExitArtifact:
    """The artifact this recipe adds to: --exits (checked against the model) or a new one for this model."""
    if cfg.exits and cfg.exits != "none":
        if model.exits is None:
            raise UsageError(f"--exits {cfg.exits}: no artifact for this model")
        return model.exits
    return ExitArtifact(model=ExitArtifact.identity(model))


def provenance(cfg: TrainConfig, seconds: float, metrics: dict, **extra) -> dict:
    """How an artifact part was made: enough to reproduce it and to judge it."""
    from ..provenance import git_commit

    # `auto` resolves as load_model does: a recipe run on a GPU by default must not be recorded as a CPU run
    wanted = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(wanted) if wanted.startswith("cuda") and torch.cuda.is_available() else None
    return {"command": "python -m harness.train " + " ".join(sys.argv[1:]), "config": asdict(cfg),
            "seconds": round(seconds, 1), "hardware": torch.cuda.get_device_name(dev) if dev else
            f"{platform.processor() or platform.machine()} CPU x{os.cpu_count()}",
            "device_type": "cuda" if dev else "cpu",
            "torch": torch.__version__, "commit": git_commit(), "metrics": metrics, **extra}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)

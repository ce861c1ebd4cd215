"""What the trained-drafter recipes (`kangaroo`, `eagle`) share: their data, the fit of their chain drafts, and the
artifact they write.

Data (train/validation splits only, as every recipe): packed text of the --data training pools, plus the model's
own greedy continuations of training-pool prompts (what drafts are verified against), kept in a file so that a
second recipe or a resumed run reuses them. The trunk is frozen: its states are computed once per sequence.

The fit: the trained module is attached to a copy of the model in the dtype runs use (--drafter_fit_dtype), and the
method's own generator drafts a full chain (--drafter_fit_chain drafts, no stop) at every decode position of the
full model's greedy continuations of held-out prompts (the --holdout_docs tail, never trained on), teacher-forced
on those tokens: at each position the draft module's caches hold exactly what generation gives them there. Each
draft's correctness and confidence are recorded, and costs are timed on the same copy: a proposal (a line through
its fixed cost and its cost per draft), a one-position verification along the walk (the step), and a verification
pass over q positions (speedup_model.measure_costs: its shape, scaled to that step). A walk along each sequence then
predicts the speedup of every (draft length, threshold) under the method's stop rule; the best is recommended, or
"don't speculate" when its 95% interval does not lie above 1.0x (speedup_model.worth_speculating).
"""
from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

import torch

from ..config import UsageError, _f
from ..speedup_model import worth_speculating
from ..trained_exits import ExitArtifact
from .common import TrainConfig, documents_record, greedy_continuations_of, source_records, split_source

THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class DrafterOptions:
    """Flags shared by --recipe kangaroo and --recipe eagle."""

    drafter_text_sequences: int = _f(192, "training sequences of --seq_len tokens of the --data training pools' text")
    drafter_prompts: int = _f(64, "the model's greedy continuations of training-pool prompts added to the training "
                                  "sequences (alternating over the --data sources; the last documents of each pool)")
    drafter_tokens: int = _f(64, "most new tokens per greedy continuation (the task's stop strings and EOS also end "
                                 "it); its prompt is cut from the left to --seq_len minus this")
    drafter_task_stops: bool = _f(True, "end those continuations at the task's stop strings as evaluation does; "
                                        "false: only EOS and --drafter_tokens end them (the model's own text past a "
                                        "stop string is still what a drafter must predict)")
    drafter_continuations: Optional[str] = _f(None, "file keeping those continuations, reused when made with the same "
                                                    "model and settings (default <work_dir>/continuations.json)")
    drafter_loss_on: str = _f("responses", "positions the loss is taken on: 'responses' = the text rows and the "
                                           "continuations' new tokens, not their prompts (EAGLE's loss_mask, which "
                                           "leaves out the user's turns: SafeAILab/EAGLE v1 at 4a9cf3a, "
                                           "eagle/ge_data/ge_data_all_vicuna.py:86-120, eagle/train/main.py:244); "
                                           "'all' = every real position, prompts too (what make drafters uses: "
                                           "with 256 continuations it drafted better, docs/drafters.md)")
    drafter_vocab: int = _f(8192, "draft-head rows: the --exits artifact's candidate vocabulary (it must have this "
                                  "many); 0 = every row")
    drafter_fit_prompts: int = _f(48, "held-out prompts (the --holdout_docs tail) whose greedy continuations fit the "
                                      "recommended draft length and threshold (the median prompt's speedup, with a "
                                      "bootstrap interval over prompts); 0 = recommend nothing")
    drafter_fit_tokens: int = _f(64, "new tokens per greedy continuation of the fit")
    drafter_fit_chain: int = _f(8, "drafts recorded at each position of the fit (the longest draft length tried)")
    drafter_fit_dtype: str = _f("auto", "dtype of the model copy the fit drafts and times on: what benchmark runs "
                                        "use (auto: as benchmark.py resolves it on this device)")


# -- data ---------------------------------------------------------------------------------------------
def continuation_key(model, cfg: TrainConfig, opts: DrafterOptions) -> dict:
    return {"model": model.checkpoint, "data": cfg.data, "holdout_docs": cfg.holdout_docs, "seq_len": cfg.seq_len,
            "prompts": opts.drafter_prompts, "tokens": opts.drafter_tokens, "dtype": str(model.dtype),
            **({} if opts.drafter_task_stops else {"task_stops": False})}


@torch.no_grad()
def training_continuations(model, cfg: TrainConfig, opts: DrafterOptions) -> tuple[list[list[int]], dict, list[int]]:
    """(prompt tail + greedy continuation ids, documents record, prompt lengths): the last documents of each
    source's training pool in the task's prompt format, alternating over sources; read from / written to
    --drafter_continuations."""

    work, _ = cfg.paths()
    path = Path(opts.drafter_continuations or work / "continuations.json")
    key = continuation_key(model, cfg, opts)
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key and "prompt_lengths" in saved:
            print(f"{cfg.recipe}: {len(saved['sequences'])} greedy continuations from {path}")
            return saved["sequences"], saved["documents"], saved["prompt_lengths"]
    if opts.drafter_tokens >= cfg.seq_len:
        raise UsageError(f"--drafter_tokens {opts.drafter_tokens} leaves no prompt in --seq_len {cfg.seq_len}")
    sources = [s.strip() for s in cfg.data.split(",") if s.strip()]
    pending = {}
    for s in sources:
        pool, _ = split_source(len(source_records(s)), cfg.holdout_docs)
        pending[s] = list(reversed(pool))  # the pool's last documents first
    found, used, _ = greedy_continuations_of(model, pending, opts.drafter_prompts, opts.drafter_tokens,
                                             cfg.seq_len - opts.drafter_tokens,
                                             progress=f"{cfg.recipe}: greedy continuations",
                                             task_stops=opts.drafter_task_stops)
    seqs, lengths = [ids for ids, _ in found], [n for _, n in found]
    documents = {s: documents_record(s, v) for s, v in used.items() if v}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "sequences": seqs, "documents": documents, "prompt_lengths": lengths}))
    tmp.replace(path)
    return seqs, documents, lengths


def padded(seqs: Sequence[Sequence[int]], length: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (N, length), mask (N, length): True on real tokens) of sequences cut to their last `length` tokens."""
    ids = torch.full((len(seqs), length), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.bool)
    for r, s in enumerate(seqs):
        s = list(s)[-length:]
        ids[r, :len(s)] = torch.tensor(s)
        mask[r, :len(s)] = True
    return ids, mask


def generated_positions(seqs: Sequence[Sequence[int]], prompt_lengths: Sequence[int], length: int) -> torch.Tensor:
    """(N, length) True at each sequence's tokens after its prompt, in padded()'s layout (the last `length` tokens
    of each sequence, from column 0)."""
    out = torch.zeros((len(seqs), length), dtype=torch.bool)
    for r, (s, n) in enumerate(zip(seqs, prompt_lengths)):
        cut = max(0, len(s) - length)
        out[r, max(0, n - cut):len(s) - cut] = True
    return out


def candidate_rows(model, art: Optional[ExitArtifact], size: int) -> Optional[torch.Tensor]:
    """The draft head's rows: the artifact's candidate vocabulary (sizes must agree), or None for every row."""
    if size == 0:
        return None
    vocab = art.vocab if art is not None else None
    if vocab is None or len(vocab) != size:
        have = "none" if vocab is None else f"{len(vocab)} rows"
        raise UsageError(f"--drafter_vocab {size}: the --exits artifact's candidate vocabulary has {have} (train "
                         "exit_adapters first, pass its size, or 0 for every row)")
    return vocab


def drafter_artifact(cfg: TrainConfig, model) -> ExitArtifact:
    """What a drafter recipe writes to: --output when it already is an artifact for this model (a sibling file
    collecting drafters), else a new one; the --exits artifact itself when --output names it."""
    _, out = cfg.paths()
    exits = model.exits
    if exits is not None and exits.path and Path(exits.path).resolve() == out.resolve():
        return exits
    if out.is_file():
        art = ExitArtifact.load(out)
        why = art.matches(model)
        if why is not None:
            raise UsageError(f"--output {out} is an artifact of another model ({why})")
        return art
    art = ExitArtifact(model=ExitArtifact.identity(model))
    return art


# -- the fit ------------------------------------------------------------------------------------------
@dataclass
class ChainFit:
    """Chains drafted along held-out greedy continuations, and what passes cost where they were timed."""

    chains: list  # per sequence, per decode position: [(draft correct, its confidence)] for the full chain
    draft_pass: float  # seconds per draft pass (median over the fit's proposals, per pass)
    verify: dict  # positions q -> seconds of the verification pass over q positions
    extra_last: float  # seconds to bring the last draft's input to the drafter's layer when drafting did not
    step: float  # seconds of one autoregressive decode step
    record: dict  # what was fitted on
    draft_fixed: float = 0.0  # seconds a proposal costs whatever its length (a draft module catching up, setup)


def run_model(model, cfg: TrainConfig, opts: DrafterOptions):
    """The model as runs use it (--drafter_fit_dtype): what generates the continuations and what the fit drafts and
    times on (loaded once per process)."""
    from ..model import load_model

    dtype = str(model.dtype).removeprefix("torch.")
    if opts.drafter_fit_dtype in (dtype, "fp32" if dtype == "float32" else dtype):
        return model
    cached = getattr(model, "_run_copy", None)
    if cached is None:
        cached = model._run_copy = load_model(cfg.model, cfg.device, opts.drafter_fit_dtype, exits="none")
    return cached


def fit_chains(method: str, art: ExitArtifact, model, cfg: TrainConfig, opts: DrafterOptions,
               training_data: dict) -> ChainFit:
    """Draft chains with `method`'s generator (the artifact attached to a copy of the model in --drafter_fit_dtype)
    at every decode position of held-out greedy continuations, teacher-forced."""
    from ..config import GenerationConfig
    from ..generators import build_generator
    from ..generators.proposers import ModelProposer, Proposal
    from ..speedup_model import measure_costs
    from .exit_adapters import greedy_continuations

    fit_model = run_model(model, cfg, opts)
    fit_model.set_exits(art)
    like = SimpleNamespace(adapters_fit_prompts=opts.drafter_fit_prompts, adapters_fit_tokens=opts.drafter_fit_tokens,
                           adapters_fit_prompt_tokens=cfg.seq_len)
    seqs, record = greedy_continuations(fit_model, cfg, like)
    for s, rec in record["documents"].items():  # the held-out tail is never trained on; checked, not assumed
        if set(rec["records"]) & set(training_data.get(s, {}).get("records", [])):
            raise UsageError(f"the {method} fit's prompts of {s} overlap the training documents")
    k = opts.drafter_fit_chain
    rows = art.vocab if opts.drafter_vocab else None
    gen = build_generator(fit_model, GenerationConfig(generation_strategy=method, num_speculations=k,
                                                      draft_threshold=1e-9, draft_vocab=len(rows) if rows is not None
                                                      else 0))
    (proposer,) = [p for p in gen.proposers if isinstance(p, ModelProposer)]
    chains, proposals = [], []  # proposals: (seconds, draft passes) of each timed proposal
    scored = []  # seconds of each one-position verification from the proposal's depth, timed beside the proposals
    with torch.inference_mode():
        for ids, n in seqs:
            cache, _, _, _ = gen.prefill(ids[:n], keep=gen.keep_layer)
            proposer.start(ids[:n], ids[n], gen.prefill_states)
            seq = []
            for t in range(n, len(ids) - 1):
                room = min(k, len(ids) - 2 - t)
                if room > 0:
                    t0 = gen.clock()
                    p = proposer.propose(ids[t], t, room, cache, set())
                    proposals.append((gen.clock() - t0, p.passes))
                    truth = ids[t + 1:t + 1 + len(p.tokens)]
                    seq.append([(d == truth[i], c) for i, (d, c) in enumerate(zip(p.tokens, p.confs))])
                    one = Proposal([], depth=p.depth, source=p.source, states=p.states[:1])
                else:
                    seq.append([])
                    one = Proposal([], depth=fit_model.num_layers, source="none")
                t0 = gen.clock()
                gen.score(one, ids[t], t, cache)
                if room > 0:  # from the proposal's depth, as the cost curve's one-position pass
                    scored.append(gen.clock() - t0)
                fit_model.crop(cache, t + 1)
                proposer.accepted(one, 0, ids[t + 1], t, gen.scored)
            chains.append(seq)
    draft_fixed, draft_pass = proposal_costs(proposals)
    context = round(sum(len(ids) for ids, _ in seqs) / len(seqs))
    costs = measure_costs(fit_model, None, context=context, max_q=k + 1)
    E = getattr(proposer, "exit_layer", fit_model.num_layers)
    L = fit_model.num_layers
    curve = {q: (L - E if E < L else L) * costs.layer_chunk[q] + costs.head[q] for q in costs.layer_chunk}
    # The cost curve gives verification's shape (its passes are timed together, interleaved); its level comes from
    # the one-position verifications timed along the walk, beside the proposals they are compared with. Timed apart,
    # a shared machine's speed can move between the two (memory bandwidth here flips between ~40 and ~75 GB/s): a
    # re-fit whose curve was timed in a slow spell predicted 1.14x for a setting the first fit put at 1.02x.
    scale = statistics.median(scored) / curve[1] if scored else 1.0
    step = costs.step() * scale
    verify = {q: v * scale for q, v in curve.items()}
    record.update(dtype=str(fit_model.dtype).removeprefix("torch."), device=str(fit_model.device), cost_context=context,
                  draft_pass_ms=round(1e3 * draft_pass, 3) if proposals else None,
                  draft_fixed_ms=round(1e3 * draft_fixed, 3) if proposals else None,
                  step_ms=round(1e3 * step, 3), curve_scale=round(scale, 3),
                  verify_ms={q: round(1e3 * v, 3) for q, v in verify.items()})
    return ChainFit(chains, draft_pass, verify,
                    E * costs.layer * scale if E < L else 0.0, step, record, draft_fixed=draft_fixed)


def proposal_costs(proposals: Sequence[tuple[float, int]]) -> tuple[float, float]:
    """(seconds per proposal, seconds per draft pass) from timed proposals of varying length: a line through the
    median time of each length (robust to a slow outlier). A proposal's cost is not all per pass: EAGLE's head first
    catches up on the verified positions, once per proposal; a fit that drafts chains of 8 and divides by 8 charged runs that draft 1-2 about half of what they pay
    (0.54 ms a pass in the fit, 0.95-1.14 ms in runs of k = 2 and 1 on the AMD EPYC). Where the lengths do not
    vary enough to separate the two, or the fit says a negative part, it is all per pass (the median)."""
    if not proposals:
        return 0.0, 0.0
    per_pass = statistics.median(t / max(n, 1) for t, n in proposals)
    by_length: dict = {}
    for t, n in proposals:
        by_length.setdefault(n, []).append(t)
    if len(by_length) < 2:
        return 0.0, per_pass
    lengths = sorted(by_length)
    slope, fixed_part = statistics.linear_regression([float(n) for n in lengths],
                                                     [statistics.median(by_length[n]) for n in lengths])
    if fixed_part < 0 or slope <= 0:
        return 0.0, per_pass
    return fixed_part, slope


def walk(chain_seq: list, k: int, threshold: float, stop: str, fit: ChainFit) -> tuple[float, int, int, int, int]:
    """One sequence decoded with drafts of at most k under the stop rule: (seconds, tokens, steps, drafted,
    accepted). chain_seq[t] is the full chain recorded at decode position t."""
    q_max = max(fit.verify)
    t, n = 0, len(chain_seq)
    seconds, tokens, steps, drafted, accepted = 0.0, 0, 0, 0, 0
    while t < n:
        chain = chain_seq[t][:min(k, n - 1 - t)]
        kept, passes, ran_last = [], 0, False
        for ok, conf in chain:
            passes += 1
            if conf < threshold and stop == "drop":
                ran_last = True  # its input went through the drafter's layers: the scorer reuses it
                break
            kept.append(ok)
            if conf < threshold:
                break
        a = 0
        while a < len(kept) and kept[a]:
            a += 1
        q = min(len(kept) + 1, q_max)
        seconds += (fit.draft_fixed if passes else 0.0) + passes * fit.draft_pass + fit.verify[q] \
            + (0.0 if ran_last else fit.extra_last)
        tokens, steps, drafted, accepted = tokens + a + 1, steps + 1, drafted + len(kept), accepted + a
        t += a + 1
    return seconds, tokens, steps, drafted, accepted


def per_sequence_speedup(fit: ChainFit, walked: tuple) -> float:
    """One sequence's predicted speedup: autoregressive steps for its tokens over the walk's seconds."""
    seconds, tokens = walked[0], walked[1]
    return fit.step * tokens / seconds if seconds else 0.0


def predict(fit: ChainFit, k: int, threshold: float, stop: str) -> dict:
    """Predicted tokens per verification and acceptance over the fit's sequences (pooled), and the speedup as
    reports state it: the median over sequences of each one's speedup, every prompt weighing the same (pooled
    seconds let one long, repetitive continuation outweigh a dozen short answers: the first fits did)."""
    walked = [walk(c, k, threshold, stop, fit) for c in fit.chains]
    seconds, tokens, steps, drafted, accepted = (sum(x[i] for x in walked) for i in range(5))
    per = [per_sequence_speedup(fit, w) for w in walked if w[0]]
    return {"num_speculations": k, "draft_threshold": threshold, "stop": stop,
            "tokens_per_step": tokens / steps if steps else 0.0, "acceptance": accepted / drafted if drafted else 0.0,
            "predicted_speedup": statistics.median(per) if per else 0.0,
            "pooled_speedup": fit.step * tokens / seconds if seconds else 0.0}


def interval(fit: ChainFit, k: int, threshold: float, stop: str, reps: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile bootstrap of the predicted (median) speedup over sequences (a prompt is the unit)."""
    per = [per_sequence_speedup(fit, w) for w in (walk(c, k, threshold, stop, fit) for c in fit.chains) if w[0]]
    rng = random.Random(seed)
    stats = sorted(statistics.median([per[rng.randrange(len(per))] for _ in per]) for _ in range(reps))
    return [round(stats[int(0.025 * (reps - 1))], 3), round(stats[int(0.975 * (reps - 1))], 3)]


def by_position(fit: ChainFit) -> list[dict]:
    """Held-out acceptance by draft position (full chains, no stop): P(draft i right | drafts before it right)."""
    out = []
    for i in range(max((len(c) for s in fit.chains for c in s), default=0)):
        reached = [c for s in fit.chains for c in s if len(c) > i and all(ok for ok, _ in c[:i])]
        right = sum(1 for c in reached if c[i][0])
        out.append({"position": i + 1, "reached": len(reached), "accepted": right,
                    "rate": round(right / len(reached), 4) if reached else None})
    return out


def recommend(fit: ChainFit, stop: str, ks: Sequence[int]) -> tuple[dict, list[dict]]:
    """The best (draft length, threshold) by predicted speedup under the stop rule; speculate only where its
    interval lies above 1.0x (speedup_model.worth_speculating)."""
    table = [predict(fit, k, th, stop) for k in ks for th in THRESHOLDS]
    best = max(table, key=lambda r: r["predicted_speedup"])
    ci = interval(fit, best["num_speculations"], best["draft_threshold"], stop)
    best = {**best, "interval": ci, "speculate": worth_speculating(ci)}
    return best, sorted(table, key=lambda r: -r["predicted_speedup"])[:10]


def fit_and_recommend(method: str, art: ExitArtifact, model, cfg: TrainConfig, opts: DrafterOptions,
                      training_data: dict, stops: dict) -> dict:
    """Fit chains, then recommend for each artifact key in `stops` (key -> stop rule); writes art.recommended and
    returns the provenance record (per key: best, top settings; acceptance by position; what was fitted on)."""
    t0 = time.perf_counter()
    fit = fit_chains(method, art, model, cfg, opts, training_data)
    ks = range(1, opts.drafter_fit_chain + 1)
    out = {"fitted_on": fit.record, "acceptance_by_position": by_position(fit), "seconds": round(
        time.perf_counter() - t0, 1)}
    draft_vocab = len(art.vocab) if opts.drafter_vocab else 0
    for key, stop in stops.items():
        best, top = recommend(fit, stop, ks)
        out[key] = {"best": best, "top": top}
        knobs = {"num_speculations": best["num_speculations"], "draft_threshold": best["draft_threshold"],
                 "draft_vocab": draft_vocab}
        art.recommended[key] = knobs if best["speculate"] else {"draft_vocab": draft_vocab}
    return out


# -- training data with the frozen trunk's states ------------------------------------------------------
@torch.no_grad()
def drafter_data(cfg: TrainConfig, opts: DrafterOptions, model, layer: Optional[int]) -> dict:
    """Training and held-out sequences (text rows of the training pools + greedy continuations of training-pool
    prompts) with the trunk's final-normed features and, if `layer`, its raw states after that many layers.

    Returns ids (N, T), mask (N, T; False on padding), loss_mask (N, T; the positions --drafter_loss_on trains:
    a target feature's / a drafted token's position), generated (N, T; the continuations' new tokens), final
    (N, T, d), states (N, T, d) or None, train / held
    (row indices: held = the last --eval_sequences text rows and the last eighth of the continuations), and
    training_data (documents read, per source)."""
    from .common import hidden_states, train_eval_split, training_documents

    if opts.drafter_loss_on not in ("responses", "all"):
        raise UsageError(f"--drafter_loss_on must be 'responses' or 'all', got {opts.drafter_loss_on!r}")
    text_train, text_held = train_eval_split(cfg, model.tokenizer)
    text_train = text_train[:opts.drafter_text_sequences]
    conts, cont_docs, prompt_lengths = training_continuations(run_model(model, cfg, opts), cfg, opts) \
        if opts.drafter_prompts else ([], {}, [])
    pad = model.tokenizer.eos_token_id or 0
    cont_ids, cont_mask = padded(conts, cfg.seq_len, pad) if conts else (torch.zeros(0, cfg.seq_len, dtype=torch.long),
                                                                       torch.zeros(0, cfg.seq_len, dtype=torch.bool))
    cont_new = generated_positions(conts, prompt_lengths, cfg.seq_len)
    cont_loss = cont_new if opts.drafter_loss_on == "responses" else cont_mask
    cut = len(conts) - len(conts) // 8  # the last eighth of the continuations is held out

    def rows(cont: torch.Tensor, text_flag: Optional[bool] = None) -> torch.Tensor:
        """Training text, training continuations, held text, held continuations; the text rows as themselves or,
        for a per-position flag, all `text_flag`."""
        def text(t):
            return t if text_flag is None else torch.full_like(t, text_flag, dtype=torch.bool)
        return torch.cat([text(text_train), cont[:cut], text(text_held), cont[cut:]])

    ids, mask, loss_mask = rows(cont_ids), rows(cont_mask, True), rows(cont_loss, True)
    generated = rows(cont_new, False)
    n_train = len(text_train) + cut
    final, states = [], []
    from tqdm.auto import tqdm

    for i in tqdm(range(0, len(ids), 8), desc=f"{cfg.recipe}: trunk states", dynamic_ncols=True):
        hs = hidden_states(model, ids[i:i + 8])
        final.append(hs[-1].float())
        if layer is not None:
            states.append(hs[layer].float())
    read = training_documents(cfg)
    training_data = {name: documents_record(name, v) for name, v in read.items() if v}
    for s, rec in cont_docs.items():  # the continuations' prompts: training-pool documents too
        prev = set(training_data.get(s, {}).get("records", []))
        training_data[s] = documents_record(s, sorted(prev | set(rec["records"])))
    return {"ids": ids, "mask": mask, "loss_mask": loss_mask, "generated": generated, "final": torch.cat(final),
            "states": torch.cat(states) if states else None,
            "train": torch.arange(n_train), "held": torch.arange(n_train, len(ids)), "training_data": training_data,
            "continuations": len(conts), "text_sequences": len(text_train)}


def head_rows_weight(model, rows: Optional[torch.Tensor]) -> torch.Tensor:
    """The shared head's weight on the draft rows (fp32, frozen)."""
    W = model.lm_head.weight.detach().float()
    return W if rows is None else W[rows]


def soft_ce(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum p_teacher log p_student (logits in, fp32)."""
    return -(torch.softmax(teacher.float(), -1) * torch.log_softmax(student.float(), -1)).sum(-1).mean()


@torch.no_grad()
def held_agreement(model, predict_logits, data: dict, rows: Optional[torch.Tensor], shift: int,
                   where: str = "mask") -> float:
    """Teacher-forced top-1 agreement of the draft (on its rows) with the full model's greedy token, on the held
    rows' real tokens (where="generated": only the continuations' new tokens, what runs draft on).
    predict_logits(index tensor) -> (B, T - shift, rows) logits for targets at positions shift..T-1."""
    W = model.lm_head.weight.detach().float()
    hits = total = 0
    for i in range(0, len(data["held"]), 8):
        idx = data["held"][i:i + 8]
        z = predict_logits(idx)
        draft = z.argmax(-1)
        if rows is not None:
            draft = rows[draft]
        target = (data["final"][idx][:, shift:] @ W.T).argmax(-1)
        m = data[where][idx][:, shift:]
        if shift:
            m = m & data["mask"][idx][:, :-shift]
        hits += int(((draft == target) & m).sum())
        total += int(m.sum())
    return hits / max(total, 1)


def save_module(art: ExitArtifact, prefix: str, module: torch.nn.Module) -> None:
    """The module's state in fp16 under `prefix` (what the file holds is what the fit then measures)."""
    for k in [k for k in art.tensors if k.startswith(prefix)]:
        del art.tensors[k]
    for k, v in module.state_dict().items():
        art.tensors[prefix + k] = v.detach().cpu().to(torch.float16)
    art.forget_built()


def verdict_line(best: dict) -> str:
    """One line for the console: the recommended setting and its prediction."""
    verdict = "speculate" if best["speculate"] else "don't speculate"
    return (f"k {best['num_speculations']} threshold {best['draft_threshold']} predicted "
            f"{best['predicted_speedup']:.2f}x {best['interval']}, {best['tokens_per_step']:.2f} tokens per "
            f"verification ({verdict})")


def finish(method: str, cfg: TrainConfig, opts: DrafterOptions, model, module: torch.nn.Module, prefix: str,
           data: dict, rows: Optional[torch.Tensor], metrics: dict, untrained: dict, seconds_from: float,
           extra: Optional[dict] = None) -> ExitArtifact:
    """What both recipes do once trained: the module (fp16) and `extra` tensors into the drafters artifact, the fit
    for the method (keep rule) and for LayerSkip's loop with it as drafter (drop rule), provenance, save, report."""
    from .common import provenance

    art = drafter_artifact(cfg, model)
    if rows is not None and art.vocab is None:
        art.vocab = rows.cpu()
    save_module(art, prefix, module)
    art.tensors.update(extra or {})
    loop_key = f"self_speculative:drafter={method}"
    fit = fit_and_recommend(method, art, model, cfg, opts, data["training_data"], {method: "keep", loop_key: "drop"}) \
        if opts.drafter_fit_prompts else None
    art.provenance[method] = provenance(
        cfg, time.perf_counter() - seconds_from, {**metrics, **{f"untrained_{k}": v for k, v in untrained.items()}},
        options=asdict(opts), training_data=data["training_data"],
        train_sequences=int(len(data["train"])), held_sequences=int(len(data["held"])),
        data_note=f"{data['text_sequences']} text sequences of the training pools of {cfg.data} and "
        f"{data['continuations']} greedy continuations of training-pool prompts (the last eighth held out with "
        f"--eval_sequences text rows for agreement); the fit = greedy continuations of held-out documents",
        fit=fit)
    _, out = cfg.paths()
    art.save(out)
    print(f"{method}: held-out teacher-forced agreement {untrained['agree_heldout']:.3f} -> "
          f"{metrics['agree_heldout']:.3f}; on the continuations' new tokens "
          f"{untrained.get('agree_heldout_generated', float('nan')):.3f} -> "
          f"{metrics.get('agree_heldout_generated', float('nan')):.3f}")
    if fit is not None:
        for key in (method, loop_key):
            print(f"{method}: {key}: {verdict_line(fit[key]['best'])}")
    return art

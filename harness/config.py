"""One flag vocabulary: dataclass configs that are also the CLIs' flags.

Every field's ``metadata["help"]`` becomes its ``--help`` line, so flags, defaults and docs cannot drift
apart. Names follow LayerSkip's where LayerSkip has one.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, get_type_hints


class UsageError(Exception):
    """Bad user input: the CLIs print it as one line and exit with code 2."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


CRITERIA = ("cosine_similarity", "token_repeat", "entropy_based", "max_probability", "convergence")
CONFIDENCES = ("softmax", "max_prob", "hidden_state", "contrastive", "jsd_contrastive", "classifier")
VOCAB_REDUCTIONS = ("none", "fixed", "decaying", "adaptive")
CONTRASTIVE = ("contrastive", "jsd_contrastive")

SS, CALM, FREE, DYN = ("self_speculative", "hybrid_speculative"), ("calm",), ("free",), ("dynamic",)
LOOKUP = ("hybrid_speculative", "prompt_lookup")
LAYERWISE = ("calm", "free", "dynamic")


def _m(default: Any, help: str, methods: tuple, **kw: Any) -> Any:
    """A method knob: only the strategies in `methods` accept a non-default value."""
    return _f(default, help, methods=methods, **kw)


@dataclass
class GenerationConfig:
    """How to decode: the strategy and all of its knobs."""

    generation_strategy: Optional[str] = _f(
        None, "decoding method (see the list below); omitted = autoregressive, or dynamic when --criteria is given")
    max_steps: Optional[int] = _f(None, "maximum new tokens; default: the task's own limit (128 for generate.py)")
    exit_layer: Optional[int] = _f(
        None,
        "number of layers used before the exit head, 1..L. With autoregressive: static exit "
        "(only the first E layers). With self_speculative: the draft depth E < L (LayerSkip, arXiv 2404.16710). "
        "With dynamic: the deepest exit (the fork's loop over layers[:exit_layer])",
    )
    num_speculations: Optional[int] = _m(
        None, "self_speculative: tokens drafted per step, >= 1; omitted = the attached exit artifact's recommendation, "
        "else 6 (LayerSkip's num_speculations). "
        "hf_prompt_lookup: transformers' prompt_lookup_num_tokens; omitted = 10", SS + ("hf_prompt_lookup",))
    draft_vocab: Optional[int] = _m(
        None, "self_speculative: draft with the exit head on this many candidate rows: 0 = the full vocabulary, N = "
        "the attached exit artifact's candidate vocabulary (its size N); omitted = the artifact's recommendation, "
        "else 0. Verification always uses the full head, so greedy output is unchanged", SS)
    draft_threshold: Optional[float] = _m(
        None, "self_speculative: stop drafting at the first draft whose top-1 probability is below this (adaptive "
        "draft length, Kangaroo arXiv 2404.18911); 0 = always draft num_speculations; omitted = the artifact's "
        "recommendation, else 0", SS)
    lookup_ngram: int = _m(
        3, "hybrid_speculative: longest n-gram matched against the prompt and the text so far (prompt lookup "
        "decoding); a match proposes the tokens that followed it, else the early exit drafts (prompt_lookup: else one "
        "plain step)", LOOKUP)
    lookup_tokens: int = _m(10, "hybrid_speculative: most tokens proposed by one prompt-lookup match (transformers' "
                                "prompt_lookup_num_tokens default)", LOOKUP)
    lookup_match: str = _m(
        "earliest", "hybrid_speculative: which earlier occurrence of the n-gram proposes the draft: earliest = the "
        "first, as transformers' prompt lookup (PromptLookupCandidateGenerator.get_candidates, "
        "transformers/generation/candidate_generator.py:1080-1102 in 5.24) and hf_prompt_lookup; latest = the most "
        "recent (ours before, kept to compare: the nearest context is often the one that repeats)",
        LOOKUP, choices=("earliest", "latest"))
    sample: bool = _f(False, "sample instead of greedy decoding (self_speculative: exact speculative sampling)")
    temperature: float = _f(1.0, "sampling temperature (with --sample)")
    top_p: float = _f(1.0, "nucleus sampling mass, 1.0 = off (with --sample)")
    top_k: int = _f(0, "top-k sampling, 0 = off (with --sample)")
    seed: int = _f(42, "random seed for sampling and few-shot selection")
    # -- per-token exit rules: calm / free / dynamic ------------------------------------------------
    criteria: Optional[str] = _m(
        None, "dynamic: exit criterion of the Dynamic Early Exit fork of LayerSkip (Amir-Voloshin/DynamicEarlyExit "
        "self_speculation/llama_early_exit_utils.py); alone it selects dynamic", DYN, choices=CRITERIA)
    confidence: Optional[str] = _m(
        None, "confidence measure: softmax = top-1 minus top-2 probability (calm's and free's default: FREE "
        "util/skip_conf.py 7-16, its scripts' --shallow2deep_conf_type softmax), max_prob = top-1 probability, "
        "hidden_state = cosine of consecutive layers' states (CALM's state saturation; calm only), contrastive | "
        "jsd_contrastive = top-1 minus top-2 of the contrastive distribution against the amateur layer i//2 | "
        "the layer of largest JSD/(i-l) in 2..i-1 (Confidently_Exiting util/skip_conf.py 124-135 | 159-170). With "
        "dynamic, contrastive* replaces the softmax that max_probability, entropy_based and convergence read. "
        "classifier = sigmoid of CALM's trained early-exit classifier on the layer's hidden state (calm only; needs "
        "an exit artifact from `python -m harness.train --recipe calm`; depths without a classifier never exit)",
        LAYERWISE, choices=CONFIDENCES,
        when=(lambda c: (c.confidence != "classifier" or c.generation_strategy == "calm") and (
            c.generation_strategy != "dynamic" or (c.confidence in CONTRASTIVE and c.criteria in (
                "max_probability", "entropy_based", "convergence"))),
            ("with dynamic only as contrastive or jsd_contrastive, and only for max_probability, entropy_based or "
             "convergence; as classifier only with calm")))
    threshold: Optional[float] = _m(
        None, "calm/free: exit when confidence > threshold (FREE util/skip_conf.py 76); omitted = 0.9 (our "
        "default; a value >= 1 never exits)", CALM + FREE)
    threshold_decay: Optional[float] = _m(
        None, "calm: decay the threshold over the generated position t with temperature tau (N = the generation's "
        "max_steps); omitted = constant threshold", CALM)
    threshold_decay_form: str = _m(
        "calm_paper", "calm --threshold_decay: calm_paper = clip(0.9*lambda + 0.1*exp(-tau*t/N)) (CALM paper, "
        "Schuster et al. 2022), free_code = lambda*exp(-tau*t/N)/10 + 9*lambda/10 (FREE's CALM code, "
        "util/skip_conf.py 58-63)", CALM, choices=("calm_paper", "free_code"),
        when=(lambda c: c.threshold_decay is not None, "with --threshold_decay"))
    policy_threshold: float = _m(
        0.5, "policy: exit at a layer that has a ConsistentEE policy network when its exit probability pi(h) > this "
        "(greedy policy; the reference code exits when pi > 0.5); 1.0 never exits, 0.0 exits at the first policy "
        "layer", ("policy",))
    min_exit_layer: Optional[int] = _m(
        None, "calm/dynamic: first layer whose exit may be taken, 1..L-1; omitted = 1 (FREE's CALM code checks "
        "from the first layer; contrastive needs >= 2, jsd_contrastive >= 3, dynamic cosine_similarity starts "
        "at 2 and convergence at 3, as the references do)", CALM + DYN)
    shallow_exit_layer: Optional[int] = _m(
        None, "free: depth of the shallow module, 1..L-1; omitted = L // 4 (our default)", FREE)
    adaptive_threshold: bool = _m(
        False, "free: refit the threshold at the start of every sequence (at most 300) on the (shallow "
        "confidence, shallow == deep) pairs of every deep-processed token so far in the run (FREE "
        "models/deploying_t5.py ~1049, ~1208-1214)", FREE)
    adaptive_estimator: str = _m(
        "beta_mixture", "free --adaptive_threshold: beta_mixture = FREE's per-class Beta fits by weighted moments, "
        "threshold where P(agree | confidence) > 0.4 on 10 points in [0.3, 0.9] (util/bmm.py 6-15, 49-84, "
        "110-116); posterior = our rule: smallest confidence with P(disagree | confidence) <= --adaptive_tolerance "
        "(clipped to [0.3, 0.9])", FREE, choices=("beta_mixture", "posterior"),
        when=(lambda c: c.adaptive_threshold, "with --adaptive_threshold"))
    adaptive_tolerance: float = _m(
        0.1, "free --adaptive_estimator posterior: exit when the estimated P(shallow != deep | confidence) <= this",
        FREE, when=(lambda c: c.adaptive_threshold and c.adaptive_estimator == "posterior",
                    "with --adaptive_threshold --adaptive_estimator posterior"))
    cosine_threshold: float = _m(
        0.95, "dynamic cosine_similarity: exit when cos(final_norm(h_l), h_l-1) > this (fork's conf, "
        "generator_base.py 48)", DYN, aliases=("--conf",),
        when=(lambda c: c.criteria == "cosine_similarity", "with --criteria cosine_similarity"))
    token_repeats: int = _m(
        4, "dynamic token_repeat: exit when the count of consecutive layers repeating the previous layer's argmax "
        "reaches this, i.e. this+1 equal layers (fork's repeats: generator_base.py 47, llama_early_exit_utils.py "
        "54-60)", DYN, when=(lambda c: c.criteria == "token_repeat", "with --criteria token_repeat"))
    convergence_delta: float = _m(
        0.01, "dynamic convergence: exit when |maxprob_l - maxprob_l-1| <= this (fork's delta_threshold, "
        "llama_early_exit_utils.py 136-179)", DYN, aliases=("--delta_threshold",),
        when=(lambda c: c.criteria == "convergence", "with --criteria convergence"))
    max_prob_start: float = _m(
        0.99, "dynamic max_probability: exit when maxprob > start*r^scale + end*(1-r^scale), r = (L-l)/L, l the "
        "0-based layer (llama_early_exit_utils.py 191-222)", DYN,
        when=(lambda c: c.criteria == "max_probability", "with --criteria max_probability"))
    max_prob_end: float = _m(0.75, "dynamic max_probability: end of that schedule", DYN,
                             when=(lambda c: c.criteria == "max_probability", "with --criteria max_probability"))
    max_prob_scale: float = _m(
        0.75, "dynamic max_probability: exponent of that schedule (fork: llama_model_utils.py ~275)", DYN,
        when=(lambda c: c.criteria == "max_probability", "with --criteria max_probability"))
    entropy_temperature: float = _m(
        3.0, "dynamic entropy_based: entropy of softmax((logits - max)/T) (llama_early_exit_utils.py 305-314)", DYN,
        when=(lambda c: c.criteria == "entropy_based" and c.confidence not in CONTRASTIVE,
              "with --criteria entropy_based and no contrastive confidence"))
    entropy_start: float = _m(
        11.0, "dynamic entropy_based: exit when entropy < start*sqrt(r) + end*(1-sqrt(r)), r = (L-l)/L "
        "(llama_early_exit_utils.py 293-317, defaults llama_model_utils.py ~270-272; ln V = 10.8 for a 49k "
        "vocabulary, so it fires unconditionally wherever r >= 0.36)", DYN,
        when=(lambda c: c.criteria == "entropy_based", "with --criteria entropy_based"))
    entropy_end: float = _m(10.5, "dynamic entropy_based: end of that schedule (nats)", DYN,
                            when=(lambda c: c.criteria == "entropy_based", "with --criteria entropy_based"))
    vocab_reduction: str = _m(
        "none", "calm/dynamic: score exits after the first one considered on rows of its full head, ranked by "
        "logit: fixed = its top k = max(vocab_k_min, vocab_k/(1 + (vocab_k-vocab_k_min)/vocab_k_min * i/L)) rows, "
        "decaying = the top k_i of them with that k at each layer i, adaptive = the top V*(1 - 0.9*confidence of "
        "the previous layer) (Confidently_Exiting models/deploying_t5.py ~751-752, ~1008-1066)", CALM + DYN,
        choices=VOCAB_REDUCTIONS,
        when=(lambda c: c.confidence not in ("hidden_state", "classifier") and c.criteria != "cosine_similarity",
              "where exits read the exit head (not with --confidence hidden_state or classifier, or --criteria "
              "cosine_similarity)"))
    vocab_k: int = _m(35000, "--vocab_reduction fixed/decaying: k_max of that schedule (fork's maximum_k_size)",
                      CALM + DYN, when=(lambda c: c.vocab_reduction in ("fixed", "decaying"),
                                        "with --vocab_reduction fixed or decaying"))
    vocab_k_min: int = _m(250, "--vocab_reduction fixed/decaying: k_min of that schedule (fork's minimum_k_size)",
                          CALM + DYN, when=(lambda c: c.vocab_reduction in ("fixed", "decaying"),
                                            "with --vocab_reduction fixed or decaying"))
    contrastive_alpha: float = _m(
        0.1, "contrastive confidence: plausibility mask keeps tokens with p >= alpha * max p of the expert layer "
        "(Confidently_Exiting: alpha = 0.1 at every call)", LAYERWISE,
        when=(lambda c: c.confidence in CONTRASTIVE, "with --confidence contrastive or jsd_contrastive"))

    explicit: tuple = field(default=(), compare=False, repr=False, metadata={
        "help": "knobs the user set explicitly (command line, strategy spec, model_args): these always win over an "
                "exit artifact's recommended or calibrated values", "internal": True})

    def __post_init__(self) -> None:
        self.explicit = tuple(sorted(set(self.explicit)))
        check_values(self, GENERATION_RANGES)
        if self.generation_strategy is None:
            self.generation_strategy = "dynamic" if self.criteria else "autoregressive"
        elif self.criteria and self.generation_strategy != "dynamic":
            raise UsageError(f"--criteria applies to the dynamic strategy, not {self.generation_strategy}")
        if self.generation_strategy == "dynamic" and not self.criteria:
            raise UsageError(f"dynamic needs --criteria, one of: {', '.join(CRITERIA)}")

    def set_by_user(self) -> set[str]:
        """Knobs the user chose: named explicitly, or (for configs built in code) set away from their default."""
        return set(self.explicit) | {f.name for f in dataclasses.fields(self) if not f.metadata.get("internal")
                                     and getattr(self, f.name) != f.default}

    def reduction_knobs(self) -> dict:
        """Vocabulary-reduction and contrastive knobs, only where they change behaviour (for run logs)."""
        out: dict[str, Any] = {}
        if self.vocab_reduction != "none":
            out["vocab_reduction"] = self.vocab_reduction
            if self.vocab_reduction != "adaptive":
                out.update(vocab_k=self.vocab_k, vocab_k_min=self.vocab_k_min)
        if self.confidence in CONTRASTIVE:
            out["contrastive_alpha"] = self.contrastive_alpha
        return out

    def ignored_knobs(self) -> list[str]:
        """Knobs set away from their default that this configuration's sub-mode would ignore."""
        return [f.name for f in dataclasses.fields(self) if "when" in f.metadata
                and getattr(self, f.name) != f.default and not f.metadata["when"][0](self)]

    def check_knobs(self, strategy: str) -> None:
        """Refuse knobs set away from their default for a strategy, or a sub-mode, that would silently ignore them."""
        for f in dataclasses.fields(self):
            methods = f.metadata.get("methods")
            if methods and strategy not in methods and getattr(self, f.name) != f.default:
                raise UsageError(f"--{f.name} applies to {', '.join(methods)}, not {strategy}")
        for name in self.ignored_knobs():
            f = next(f for f in dataclasses.fields(self) if f.name == name)
            raise UsageError(f"--{name} applies only {f.metadata['when'][1]} ({strategy} would ignore it)")


@dataclass
class RunConfig:
    """What to run it on: model, data, hardware, output."""

    model: Optional[str] = _f(
        None,
        "model: omitted = embedded SmolLM2-135M-Instruct; or a local transformers directory, a .gguf file, "
        "or a hub id (needs network)",
    )
    dataset: str = _f("cnn_dm_summarization", "task (see the list below); several as a comma-separated list, or all "
                      "(cnn_dm_summarization, xsum_summarization, human_eval, gsm8k): every configuration runs on "
                      "every task with one loaded model, each task with its own prompts, stops and metric")
    data_path: Optional[str] = _f(None, "evaluate on this JSONL(.gz) file (same field names as the task) instead of the bundled one")
    data_source: str = _f("bundled", "bundled = files shipped in harness/data; hf = load through `datasets` (needs network)",
                          choices=("bundled", "hf"))
    num_samples: Optional[int] = _f(10, "number of examples to evaluate (first N of the file); 0 = all")
    n_shot: int = _f(0, "few-shot exemplars prepended to each prompt, drawn from another split where one exists")
    output_dir: str = _f("results", "a new run directory is created under this folder for every invocation")
    device: str = _f("auto", "torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps")
    dtype: str = _f("auto", "float32 | bfloat16 | float16 | auto: bfloat16 on a GPU that computes it; on a CPU with "
                    "native bf16 (AVX512-BF16/AMX) bfloat16 only if a one-time measurement finds it >= 11%% faster "
                    "than float32 (cached per machine), else float32; run.json model.dtype_choice says which and why")
    core: str = _f("lean", "model core: lean = the harness's own layer forward (preallocated KV cache, packed "
                   "kernels; fp32 logits identical to transformers'), transformers = transformers' decoder layers "
                   "(the reference path, for A/B checks)", choices=("lean", "transformers"))
    warmup: int = _f(1, "untimed warm-up generations before measuring: each configuration once on the first prompt; "
                        "with several configurations, also this many full-model passes of a few decode steps on "
                        "every prompt before its timed runs")
    repeats: int = _f(1, "time every (example, configuration) this many times; every repeat is logged and speed is "
                         "the median over repeats")
    fixed_length: bool = _f(False, "generate exactly max_steps tokens in every configuration, ignoring EOS and stop "
                                   "strings while timing (pure speed comparisons); the prediction scored for quality "
                                   "is still cut at the first stop")
    chat_template: bool = _f(False, "wrap each prompt in the tokenizer's chat template (off: raw prompts, as LayerSkip)")
    protocol: str = _f(
        "harness", "harness = this harness's evaluation; layerskip = LayerSkip's benchmark.py defaults, to put numbers "
        "beside the paper's: seeded shuffle (--seed) of the evaluated file before taking the first N, no stop "
        "strings, max_steps 512, ROUGE lowercased without stemming (torchmetrics ROUGEScore with its "
        "LowercaseProcessingFunction), and with --sample LayerSkip's temperature 0.6 / top_p 0.9",
        choices=("harness", "layerskip"))
    shard_dir: Optional[str] = _f(
        None, "under torchrun: where each process keeps its shard file (crash safety, --resume), '{rank}' replaced by "
        "its rank, e.g. a node-local disk; rank 0 gets the records over the process group, so no shared "
        "filesystem is needed (default: <run dir>/shards)")
    device_map: Optional[str] = _f(
        None, "spread a model larger than one device over several: auto | balanced | balanced_low_0 | sequential "
        "(accelerate's device maps over the visible GPUs), or a JSON object / .json file mapping module names "
        "to devices ('cpu', 'cuda:1', 'disk'); omitted = the whole model on --device")
    max_prompt_tokens: Optional[int] = _f(
        None, "truncate prompts from the left to this many tokens (default: the model's context minus max_steps)"
    )
    exits: str = _f(
        "auto", "trained exits (adapters, candidate vocabulary, recommended and calibrated knobs from "
        "`python -m harness.train`): auto = the artifact shipped for this model if there is one, none = untrained "
        "exits, or the path of an exit artifact (refused if made for another model)")
    breakdown: bool = _f(
        True, "time each method's components (draft / verify / accept, shallow / deep / parallel, layers / confidence "
        "/ head / state_copy) with device-synchronized timers; the cost of one timed section is measured and reported "
        "beside them (on a GPU the synchronizations can slow a method slightly: --breakdown false for the cleanest "
        "speed figures)")

    def __post_init__(self) -> None:
        check_values(self, RUN_RANGES)


# Where each number may lie: (field, lowest, highest, lowest included; None = unbounded). A None value means
# "omitted" and is not checked here; every float must also be finite (NaN compares false with everything and would
# pass any range). Thresholds may lie beyond what their measure reaches: that is how a rule is told never to fire.
GENERATION_RANGES = (
    ("max_steps", 1, None, True), ("exit_layer", 1, None, True), ("num_speculations", 1, None, True),
    ("draft_vocab", 0, None, True), ("draft_threshold", 0.0, 1.0, True), ("lookup_ngram", 1, None, True),
    ("lookup_tokens", 1, None, True), ("temperature", 0.0, None, False), ("top_p", 0.0, 1.0, False),
    ("top_k", 0, None, True), ("threshold", 0.0, None, True), ("threshold_decay", 0.0, None, True),
    ("policy_threshold", 0.0, 1.0, True), ("min_exit_layer", 1, None, True), ("shallow_exit_layer", 1, None, True),
    ("adaptive_tolerance", 0.0, 1.0, True), ("cosine_threshold", None, None, True), ("token_repeats", 1, None, True),
    ("convergence_delta", None, None, True), ("max_prob_start", None, None, True), ("max_prob_end", None, None, True),
    ("max_prob_scale", 0.0, None, True), ("entropy_temperature", 0.0, None, False), ("entropy_start", None, None, True),
    ("entropy_end", None, None, True), ("vocab_k", 1, None, True), ("vocab_k_min", 1, None, True),
    ("contrastive_alpha", 0.0, 1.0, True),
)
RUN_RANGES = (("num_samples", 0, None, True), ("n_shot", 0, None, True), ("warmup", 0, None, True),
              ("repeats", 1, None, True), ("max_prompt_tokens", 1, None, True))


def check_values(obj: Any, ranges: tuple) -> None:
    """Refuse a non-finite or out-of-range number with one line naming its flag."""
    import math

    for name, lo, hi, closed in ranges:
        v = getattr(obj, name, None)
        if v is None or isinstance(v, bool):
            continue
        if not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
            raise UsageError(f"--{name} must be a finite number, got {v!r}")
        if (lo is not None and (v < lo or (v == lo and not closed))) or (hi is not None and v > hi):
            low = "" if lo is None else f"{'>=' if closed else '>'} {lo}"
            high = "" if hi is None else f"<= {hi}"
            raise UsageError(f"--{name} must be {' and '.join(x for x in (low, high) if x)}, got {v}")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, title: str, skip: tuple = ()) -> None:
    """Add one flag per dataclass field (but `skip`), typed and documented from the field itself."""
    group = parser.add_argument_group(title)
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("internal"):
            continue
        kw: dict[str, Any] = {"default": f.default, "help": f.metadata["help"] + " (default: %(default)s)"}
        typ = hints[f.name]
        if typ is bool:  # --flag, --flag true|false (LayerSkip's spelling), --no-flag
            kw.update(nargs="?", const=True, type=parse_bool, metavar="BOOL")
            group.add_argument(f"--no-{f.name}", dest=f.name, action="store_false", default=argparse.SUPPRESS,
                               help=argparse.SUPPRESS)
        else:
            base = typ.__args__[0] if getattr(typ, "__args__", None) else typ  # Optional[X] -> X
            kw["type"] = base
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        group.add_argument(f"--{f.name}", *f.metadata.get("aliases", ()), **kw)  # aliases: a reference's spellings


def parse_bool(text: str) -> bool:
    """'true'/'false' (any case), '1'/'0', 'yes'/'no' -> bool; anything else is a usage error."""
    low = str(text).lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def from_args(cls: type, args: argparse.Namespace) -> Any:
    """Build a dataclass from the parsed flags of the same names; `explicit` gets the flags the user typed
    (harness.cli.Parser records them)."""
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    if "explicit" in {f.name for f in dataclasses.fields(cls)}:
        kw["explicit"] = tuple(sorted(set(getattr(args, "_explicit", ())) & set(kw)))
    return cls(**kw)


GENERIC_KNOBS = ("max_steps", "sample", "temperature", "top_p", "top_k", "seed")


def parse_value(name: str, text: str) -> Any:
    """Convert `text` to the type of GenerationConfig field `name` (for --strategies / --sweep specs)."""
    hints = get_type_hints(GenerationConfig)
    if name not in hints or name == "explicit":
        raise UsageError(f"unknown knob {name!r} in a strategy or sweep spec")
    typ = hints[name]
    base = typ.__args__[0] if getattr(typ, "__args__", None) else typ
    if base is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise UsageError(f"knob {name} expects true/false, got {text!r}")
        return text.lower() in ("true", "1")
    try:
        return base(text)
    except ValueError:
        raise UsageError(f"knob {name} expects {base.__name__}, got {text!r}") from None


def for_strategy(base: GenerationConfig, strategy: str, **overrides: Any) -> GenerationConfig:
    """`base` narrowed to one strategy: generic knobs and that strategy's own knobs are kept, the rest reset.

    Used when one invocation runs several strategies: --threshold 0.8 reaches calm and free but is not an
    error for autoregressive. exit_layer is kept only for methods whose exit layer is a draft depth (the
    generator's `draft_depth`; static exit is asked for explicitly, e.g. autoregressive:exit_layer=15), so the
    baseline always runs full depth.
    """
    kw: dict[str, Any] = {}
    for f in dataclasses.fields(GenerationConfig):
        methods = f.metadata.get("methods")
        if f.name in GENERIC_KNOBS or (methods and strategy in methods):
            kw[f.name] = getattr(base, f.name)
    from .generators import load_all  # the registry says whose --exit_layer is a draft depth

    if getattr(load_all().get(strategy), "draft_depth", False):
        kw["exit_layer"] = base.exit_layer
    kw.update(overrides)
    kw["explicit"] = tuple((set(base.explicit) & set(kw)) | set(overrides))  # what the user named stays named
    kw["generation_strategy"] = strategy
    if strategy != "dynamic":
        kw.pop("criteria", None)
    config = GenerationConfig(**kw)
    for _ in range(2):  # shared knobs reach only the sub-modes they apply to (e.g. --vocab_k, not cosine)
        for name in config.ignored_knobs():
            if name not in overrides:
                setattr(config, name, next(f.default for f in dataclasses.fields(config) if f.name == name))
    return config

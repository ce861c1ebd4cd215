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
CONFIDENCES = ("softmax", "max_prob", "hidden_state", "contrastive", "jsd_contrastive")
VOCAB_REDUCTIONS = ("none", "fixed", "decaying", "adaptive")

SS, CALM, FREE, DYN = ("self_speculative",), ("calm",), ("free",), ("dynamic",)
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
        "(only the first E layers). With self_speculative: the draft depth E < L (LayerSkip, arXiv 2404.16710)",
    )
    num_speculations: Optional[int] = _m(
        None, "self_speculative: tokens drafted per step, >= 1; omitted = 6 (LayerSkip's num_speculations)", SS)
    sample: bool = _f(False, "sample instead of greedy decoding (self_speculative: exact speculative sampling)")
    temperature: float = _f(1.0, "sampling temperature (with --sample)")
    top_p: float = _f(1.0, "nucleus sampling mass, 1.0 = off (with --sample)")
    top_k: int = _f(0, "top-k sampling, 0 = off (with --sample)")
    seed: int = _f(42, "random seed for sampling and few-shot selection")
    # -- per-token exit rules: calm / free / dynamic ------------------------------------------------
    criteria: Optional[str] = _m(
        None, "dynamic: exit criterion (Dynamic Early Exit fork of LayerSkip); alone it selects dynamic", DYN,
        choices=CRITERIA)
    confidence: Optional[str] = _m(
        None, "confidence measure: softmax = top-1 minus top-2 probability (CALM, Schuster et al. 2022; calm's "
        "default), max_prob = top-1 probability (FREE, Bae et al. 2023; free's default), hidden_state = cosine of "
        "consecutive layers' states (CALM saturation), contrastive | jsd_contrastive = expert vs amateur layer "
        "(vocabulary-reduction fork of FREE). With dynamic, contrastive* replaces the softmax its criterion reads",
        LAYERWISE, choices=CONFIDENCES)
    threshold: Optional[float] = _m(
        None, "calm/free: exit when confidence >= threshold; omitted = 0.9 (a value > 1 never exits)", CALM + FREE)
    threshold_decay: Optional[float] = _m(
        None, "calm: decaying threshold temperature tau: lambda_t = clip(0.9*lambda + 0.1*exp(-tau*t/N)) "
        "(CALM eq. 4 as in FREE's CALM code); omitted = constant threshold", CALM)
    min_exit_layer: Optional[int] = _m(
        None, "calm/dynamic: first layer whose exit may be taken, 1..L-1; omitted = 1", CALM + DYN)
    shallow_exit_layer: Optional[int] = _m(
        None, "free: depth of the shallow module, 1..L-1; omitted = L // 4 (FREE's shallow-deep module)", FREE)
    adaptive_threshold: bool = _m(
        False, "free: re-estimate the threshold online from (shallow confidence, shallow==deep) pairs of the "
        "parallel passes with a Beta mixture (FREE, Sec. 4.3)", FREE)
    adaptive_tolerance: float = _m(
        0.1, "free --adaptive_threshold: exit when the estimated P(shallow != deep | confidence) <= this", FREE)
    cosine_threshold: float = _m(0.95, "dynamic cosine_similarity: exit when cos(norm h_l, norm h_l-1) > this", DYN)
    token_repeats: int = _m(3, "dynamic token_repeat: exit when the argmax is the same for this many consecutive layers",
                      DYN)
    convergence_delta: float = _m(
        0.01, "dynamic convergence: exit when |maxprob_l - maxprob_l-1| <= this", DYN)
    max_prob_start: float = _m(0.99, "dynamic max_probability: threshold at min_exit_layer ...", DYN)
    max_prob_end: float = _m(0.75, "... interpolated linearly to this at the last layer", DYN)
    entropy_temperature: float = _m(1.0, "dynamic entropy_based: entropy of softmax(logits / T)", DYN)
    entropy_start: float = _m(0.5, "dynamic entropy_based: entropy threshold (nats) at min_exit_layer ...", DYN)
    entropy_end: float = _m(2.0, "... interpolated linearly to this at the last layer (exit when entropy < it)",
                            DYN)
    vocab_reduction: str = _m(
        "none", "calm/free/dynamic: score exits on a reduced vocabulary kept from the first eligible exit's full "
        "head: fixed = top vocab_k rows, decaying = k shrinks linearly with depth to vocab_k/10, adaptive = "
        "k = V*(1 - 0.9*previous confidence) (vocabulary-reduction fork of FREE)", LAYERWISE,
        choices=VOCAB_REDUCTIONS)
    vocab_k: int = _m(1000, "rows kept by --vocab_reduction fixed (and the starting k of decaying)", LAYERWISE)
    contrastive_alpha: float = _m(
        0.1, "contrastive confidence: plausibility mask keeps tokens with p >= alpha * max p (expert layer)",
        LAYERWISE)

    def __post_init__(self) -> None:
        if self.generation_strategy is None:
            self.generation_strategy = "dynamic" if self.criteria else "autoregressive"
        elif self.criteria and self.generation_strategy != "dynamic":
            raise UsageError(f"--criteria applies to the dynamic strategy, not {self.generation_strategy}")
        if self.generation_strategy == "dynamic" and not self.criteria:
            raise UsageError(f"dynamic needs --criteria, one of: {', '.join(CRITERIA)}")

    def reduction_knobs(self) -> dict:
        """Vocabulary-reduction and contrastive knobs, only where they change behaviour (for run logs)."""
        out: dict[str, Any] = {}
        if self.vocab_reduction != "none":
            out.update(vocab_reduction=self.vocab_reduction, vocab_k=self.vocab_k)
        if self.confidence in ("contrastive", "jsd_contrastive"):
            out["contrastive_alpha"] = self.contrastive_alpha
        return out

    def check_knobs(self, strategy: str) -> None:
        """Refuse knobs set away from their default for a strategy that would silently ignore them."""
        for f in dataclasses.fields(self):
            methods = f.metadata.get("methods")
            if methods and strategy not in methods and getattr(self, f.name) != f.default:
                raise UsageError(f"--{f.name} applies to {', '.join(methods)}, not {strategy}")


@dataclass
class RunConfig:
    """What to run it on: model, data, hardware, output."""

    model: Optional[str] = _f(
        None,
        "model: omitted = embedded SmolLM2-135M-Instruct; or a local transformers directory, a .gguf file, "
        "or a hub id (needs network)",
    )
    dataset: str = _f("cnn_dm_summarization", "task (see the list below)")
    data_path: Optional[str] = _f(None, "evaluate on this JSONL(.gz) file (same field names as the task) instead of the bundled one")
    data_source: str = _f("bundled", "bundled = files shipped in harness/data; hf = load through `datasets` (needs network)",
                          choices=("bundled", "hf"))
    num_samples: Optional[int] = _f(10, "number of examples to evaluate (first N of the file); 0 = all")
    n_shot: int = _f(0, "few-shot exemplars prepended to each prompt, drawn from another split where one exists")
    output_dir: str = _f("results", "a new run directory is created under this folder for every invocation")
    device: str = _f("auto", "torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps")
    dtype: str = _f("auto", "float32 | bfloat16 | float16 | auto (float32 on cpu, bfloat16 on cuda)")
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


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, title: str, skip: tuple = ()) -> None:
    """Add one flag per dataclass field (but `skip`), typed and documented from the field itself."""
    group = parser.add_argument_group(title)
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
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
        group.add_argument(f"--{f.name}", **kw)


def parse_bool(text: str) -> bool:
    """'true'/'false' (any case), '1'/'0', 'yes'/'no' -> bool; anything else is a usage error."""
    low = str(text).lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def from_args(cls: type, args: argparse.Namespace) -> Any:
    """Build a dataclass from the parsed flags of the same names."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


GENERIC_KNOBS = ("max_steps", "sample", "temperature", "top_p", "top_k", "seed")


def parse_value(name: str, text: str) -> Any:
    """Convert `text` to the type of GenerationConfig field `name` (for --strategies / --sweep specs)."""
    hints = get_type_hints(GenerationConfig)
    if name not in hints:
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
    error for autoregressive. exit_layer is kept only for self_speculative (static exit is asked for
    explicitly, e.g. autoregressive:exit_layer=15), so the baseline always runs full depth.
    """
    kw: dict[str, Any] = {}
    for f in dataclasses.fields(GenerationConfig):
        methods = f.metadata.get("methods")
        if f.name in GENERIC_KNOBS or (methods and strategy in methods):
            kw[f.name] = getattr(base, f.name)
    if strategy == "self_speculative":
        kw["exit_layer"] = base.exit_layer
    kw.update(overrides)
    kw["generation_strategy"] = strategy
    if strategy != "dynamic":
        kw.pop("criteria", None)
    return GenerationConfig(**kw)

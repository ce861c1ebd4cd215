"""One flag vocabulary: dataclass configs that are also the CLIs' flags.

Every field's ``metadata["help"]`` becomes its ``--help`` line, so flags, defaults and docs cannot drift
apart. Names follow LayerSkip's where LayerSkip has one.

A method's own knobs are declared by the method: each generator class names an options dataclass
(``options = ...``, fields made with ``knob``), and ``GenerationConfig`` is assembled from the knobs every
method shares (``DecodingOptions``) plus every registered method's options. A knob declared in one options class
and inherited by several methods' classes is one flag that reaches all of them. From the assembly come the CLI
flags and their help groups, ``name:knob=value`` parsing, the refusal of a knob the chosen method would ignore,
lm-eval's ``model_args`` and the knobs calibration can set.
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


def knob(default: Any, help: str, **kw: Any) -> Any:
    """A knob of a method's options dataclass. Keywords: choices, aliases (a reference's spellings), range = (lowest,
    highest, lowest included; None = unbounded), when = (predicate on the config, "where it applies") for knobs of a
    sub-mode, selects = True for a knob that alone selects its method (which then requires it)."""
    return _f(default, help, **kw)


@dataclass
class DecodingOptions:
    """The knobs every method reads: strategy, length, depth, sampling."""

    generation_strategy: Optional[str] = _f(
        None, "decoding method (see the list below); omitted = autoregressive, or the method a knob of its own selects "
        "(dynamic when --criteria is given)")
    max_steps: Optional[int] = _f(
        None,
        "maximum new tokens; default: the task's own limit (128 for generate.py)",
        range=(1, None, True))
    exit_layer: Optional[int] = _f(
        None,
        "number of layers used before the exit head, 1..L. With autoregressive: static exit "
        "(only the first E layers). With self_speculative: the draft depth E < L (LayerSkip, arXiv 2404.16710). "
        "With dynamic: the deepest exit (the fork's loop over layers[:exit_layer])",
        range=(1, None, True))
    sample: bool = _f(
        False,
        "sample instead of greedy decoding (self_speculative: exact speculative sampling)")
    temperature: float = _f(
        1.0,
        "sampling temperature (with --sample)",
        range=(0.0, None, False))
    top_p: float = _f(
        1.0,
        "nucleus sampling mass, 1.0 = off (with --sample)",
        range=(0.0, 1.0, False))
    top_k: int = _f(
        0,
        "top-k sampling, 0 = off (with --sample)",
        range=(0, None, True))
    seed: int = _f(
        42,
        "random seed for sampling and few-shot selection")

    explicit: tuple = field(default=(), compare=False, repr=False, metadata={
        "help": "knobs the user set explicitly (command line, strategy spec, model_args): these always win over an "
                "exit artifact's recommended or calibrated values", "internal": True})


class _Generation:
    """What GenerationConfig does besides holding knobs (the fields come from the assembly below)."""

    def __post_init__(self) -> None:
        self.explicit = tuple(sorted(set(self.explicit)))
        check_values(self, ranges_of(type(self)))
        fields = dataclasses.fields(self)
        selecting = [f for f in fields if f.metadata.get("selects")]
        chosen = [f for f in selecting if getattr(self, f.name) is not None]
        if self.generation_strategy is None:
            from .generators import baseline_name

            self.generation_strategy = chosen[0].metadata["methods"][0] if chosen else baseline_name()
        for f in chosen:
            if self.generation_strategy not in f.metadata["methods"]:
                raise UsageError(f"--{f.name} applies to the {' / '.join(f.metadata['methods'])} strategy, not "
                                 f"{self.generation_strategy}")
        for f in selecting:
            if self.generation_strategy in f.metadata["methods"] and getattr(self, f.name) is None:
                raise UsageError(f"{self.generation_strategy} needs --{f.name}, one of: "
                                 f"{', '.join(f.metadata['choices'])}")

    def set_by_user(self) -> set[str]:
        """Knobs the user chose: named explicitly, or (for configs built in code) set away from their default."""
        return set(self.explicit) | {f.name for f in dataclasses.fields(self) if not f.metadata.get("internal")
                                     and getattr(self, f.name) != f.default}

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


def assemble(generators: dict) -> type:
    """GenerationConfig: DecodingOptions' fields, then every method's own knobs, each knob once with the methods
    that accept it (`methods`) and its help group (the methods' names)."""
    owners: dict[str, list[str]] = {}
    declared: dict[str, tuple] = {}
    opts_of: dict[str, type] = {}
    for name, cls in generators.items():
        opts = getattr(cls, "options", None)
        if opts is None:
            continue
        hints = get_type_hints(opts)
        for f in dataclasses.fields(opts):
            if f.name in {g.name for g in dataclasses.fields(DecodingOptions)}:
                raise TypeError(f"{cls.__name__}.options redeclares --{f.name}, which every method shares")
            if f.name in declared and declared[f.name][0] is not f:
                raise TypeError(f"--{f.name} is declared twice ({declared[f.name][2]} and {name}): declare it once in "
                                "an options class both inherit")
            declared.setdefault(f.name, (f, hints[f.name], name))
            opts_of.setdefault(f.name, opts)
            owners.setdefault(f.name, []).append(name)
    hints = get_type_hints(DecodingOptions)
    spec = [(f.name, hints[f.name], field(default=f.default, compare=f.compare, repr=f.repr,
                                          metadata=f.metadata)) for f in dataclasses.fields(DecodingOptions)]
    for knob_name, (f, typ, _) in declared.items():
        methods = tuple(owners[knob_name])
        group = f"{', '.join(methods)} ({_declared_by(opts_of[knob_name], knob_name)})"
        meta = {**f.metadata, "methods": methods, "group": group}
        spec.append((knob_name, typ, field(default=f.default, metadata=meta)))
    cls = dataclasses.make_dataclass("GenerationConfig", spec, bases=(_Generation,))
    cls.__module__, cls.__doc__ = __name__, "How to decode: the strategy and all of its knobs (assembled: see above)."
    return cls


def _declared_by(opts: type, name: str) -> str:
    """The first docstring line of the options class that declares knob `name` (its help group's title)."""
    klass = next(k for k in reversed(opts.__mro__) if name in k.__dict__.get("__annotations__", {}))
    return (klass.__doc__ or klass.__name__).strip().splitlines()[0].split(";")[0].rstrip(".")


_ASSEMBLING = False


def __getattr__(name: str) -> Any:
    """`from harness.config import GenerationConfig` assembles it on first use, after every generator module has
    registered itself (generator modules import this module, so it cannot be built at import time)."""
    if name != "GenerationConfig":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return generation_config()


def generation_config() -> type:
    """The assembled GenerationConfig class (built once)."""
    global _ASSEMBLING
    if "GenerationConfig" in globals():
        return globals()["GenerationConfig"]
    if _ASSEMBLING:
        raise ImportError("GenerationConfig was asked for while the generators were being imported: a generator "
                          "module must not use it at import time (annotate with a string, import it in functions)")
    _ASSEMBLING = True
    try:
        from .generators import load_all

        cls = assemble(load_all())
    finally:
        _ASSEMBLING = False
    globals()["GenerationConfig"] = cls
    return cls


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
    num_samples: Optional[int] = _f(10, "number of examples to evaluate (first N of the file); 0 = all. A task with "
                                    "categories (spec_bench) takes the first N of each category")
    categories: Optional[str] = _f(None, "spec_bench: comma-separated categories to run (mt_bench = its 8 two-turn "
                                   "ones; translation, summarization, qa, math_reasoning, rag), each with --num_samples "
                                   "questions; omitted = all 13")
    n_shot: int = _f(0, "few-shot exemplars prepended to each prompt, drawn from another split where one exists")
    output_dir: str = _f("results", "a new run directory is created under this folder for every invocation")
    device: str = _f("auto", "torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps")
    dtype: str = _f("auto", "float32 | bfloat16 | float16 | auto: bfloat16 on a GPU that computes it; on a CPU with "
                    "native bf16 (AVX512-BF16/AMX) bfloat16 only if a one-time measurement finds it >= 11%% faster "
                    "than float32 (cached per machine), else float32; run.json model.dtype_choice says which and why")
    core: str = _f("lean", "model core: lean = the harness's own layer forward (preallocated KV cache, packed "
                   "kernels; fp32 steps' logits identical to transformers', fp32 verification passes of 2-16 "
                   "positions on a native product; on a CPU in bf16, native batch-invariant kernels for passes of "
                   "<= 16 positions, so speculative bf16 output equals autoregressive bf16 output, where they "
                   "build: run.json model.core says), lean-library = the same forward on "
                   "oneDNN/MKL and SDPA only, lean-graphs = the lean forward with passes of <= 16 positions replayed "
                   "from CUDA graphs (CUDA only; K/V in a 4096-slot pool), transformers = transformers' decoder "
                   "layers (the reference path, for A/B checks)",
                   choices=("lean", "lean-library", "lean-graphs", "transformers"))
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
RUN_RANGES = (("num_samples", 0, None, True), ("n_shot", 0, None, True), ("warmup", 0, None, True),
              ("repeats", 1, None, True), ("max_prompt_tokens", 1, None, True))


def ranges_of(cls: type) -> tuple:
    """The (field, lowest, highest, lowest included) of every field that declares a `range`."""
    return tuple((f.name, *f.metadata["range"]) for f in dataclasses.fields(cls) if "range" in f.metadata)


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


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, title: str, skip: tuple = (),
                       only: Optional[tuple] = None, defaults: Optional[dict] = None) -> None:
    """Add one flag per dataclass field (but `skip`; only those in `only` if given), typed and documented from the
    field itself, its default replaced where `defaults` says; a field with a `group` (a method's own knob) goes in a
    help group of its own."""
    groups = {None: parser.add_argument_group(title)}
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("internal") or (only is not None and f.name not in only):
            continue
        name = f.metadata.get("group")
        if name not in groups:
            groups[name] = parser.add_argument_group(f"knobs of {name}")
        group = groups[name]
        default = (defaults or {}).get(f.name, f.default)
        kw: dict[str, Any] = {"default": default, "help": f.metadata["help"] + " (default: %(default)s)"}
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


# what every method reads and a narrowed config keeps (exit_layer only where it is a draft depth: for_strategy)
GENERIC_KNOBS = tuple(f.name for f in dataclasses.fields(DecodingOptions)
                      if f.name not in ("generation_strategy", "exit_layer", "explicit"))


def parse_value(name: str, text: str) -> Any:
    """Convert `text` to the type of GenerationConfig field `name` (for --strategies / --sweep specs)."""
    hints = get_type_hints(generation_config())
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


def for_strategy(base: Any, strategy: str, **overrides: Any) -> Any:
    """`base` narrowed to one strategy: generic knobs and that strategy's own knobs are kept, the rest reset.

    Used when one invocation runs several strategies: --threshold 0.8 reaches calm and free but is not an
    error for autoregressive. exit_layer is kept only for methods whose exit layer is a draft depth (the
    generator's `draft_depth`; static exit is asked for explicitly, e.g. autoregressive:exit_layer=15), so the
    baseline always runs full depth.
    """
    kw: dict[str, Any] = {}
    for f in dataclasses.fields(generation_config()):
        methods = f.metadata.get("methods")
        if f.name in GENERIC_KNOBS or (methods and strategy in methods):
            kw[f.name] = getattr(base, f.name)
    from .generators import load_all  # the registry says whose --exit_layer is a draft depth

    if getattr(load_all().get(strategy), "draft_depth", False):
        kw["exit_layer"] = base.exit_layer
    kw.update(overrides)
    kw["explicit"] = tuple((set(base.explicit) & set(kw)) | set(overrides))  # what the user named stays named
    kw["generation_strategy"] = strategy
    config = generation_config()(**kw)
    for _ in range(2):  # shared knobs reach only the sub-modes they apply to (e.g. --vocab_k, not cosine)
        for name in config.ignored_knobs():
            if name not in overrides:
                setattr(config, name, next(f.default for f in dataclasses.fields(config) if f.name == name))
    return config

"""The generator interface, its result record and the registry.

A generator turns prompt ids into new ids using a `LayeredModel`; what differs between methods is only
the decision of how deep each token goes. Register a new method with ``@register("name")``: the CLIs,
run logs and reports pick it up without edits.
"""
from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Optional, Sequence

import torch

from ..component_timer import ComponentTimer
from ..config import UsageError

if TYPE_CHECKING:  # assembled from the generators, so not importable while they load
    from ..config import GenerationConfig
from ..model import LayeredModel
from ..sampling import Sampler

TokenCallback = Callable[[Sequence[int]], None]


@dataclass
class GenerationResult:
    """What one generation produced and what it cost."""

    tokens: list[int]  # new token ids (EOS included if produced; nothing after a stop)
    exit_layers: list[int]  # per new token: number of layers run before the exit head that chose it (1..L)
    prefill_seconds: float  # prompt forward + first token, device synchronized
    decode_seconds: float  # every later token, device synchronized
    stop_reason: str  # "eos" | "stop_string" | "max_steps"
    layer_forwards: int  # decoder-layer applications to one token position during decode (not prefill)
    head_calls: int  # exit-head evaluations during decode (positions)
    head_rows: int  # vocabulary rows evaluated by those exit heads, summed
    exit_head_flops: float  # 2 * hidden * rows over all decode exit heads, plus trained exit adapters' FLOPs
    confidence_flops: float = 0.0  # FLOPs of exit heads evaluated only to decide whether to exit (part of the above)
    kv_fill_flops: float = 0.0  # FLOPs of state-copying K/V projections for skipped layers (CALM), decode only
    drafted: Optional[int] = None  # speculative methods: tokens drafted
    accepted: Optional[int] = None  # speculative methods: drafted tokens accepted by verification
    breakdown: Optional[dict] = None  # with the component timer on: decode seconds per component (ComponentTimer.report)
    verify_passes: Optional[int] = None  # full-depth model passes during decode (plain decoding: one per token)
    draft_passes: Optional[int] = None  # drafter forwards during decode (an early-exit draft each; lookup costs none)
    top2_gaps: Optional[list] = None  # greedy full-depth decoding: top-1 minus top-2 logit behind each emitted token
    accept_lengths: Optional[list] = None  # speculative methods: tokens emitted by each decode full-model pass
    step_drafts: Optional[list] = None  # drafting methods: tokens drafted before each of those passes
    turns: Optional[list] = None  # a conversation: per turn {text, new_tokens, prefill_seconds, ...} (see runner)
    graph_captures: int = 0  # --core lean-graphs: CUDA graphs captured during decode (first pass of a new shape)
    graph_capture_seconds: float = 0.0  # their one-time cost, left out of decode_seconds

    def to_dict(self) -> dict:
        return asdict(self)


class StopCondition:
    """End of generation: EOS ids, stop strings in the decoded continuation, or max_steps tokens.

    One rule for every method, applied token by token in generation order: a token ends generation if it
    is an EOS id, else if the text up to it contains a stop string, else if it is the max_steps-th token.
    With `fixed_length` only max_steps ends generation (pure speed comparisons); `first_stop` still says
    where the text used for quality ends.
    """

    def __init__(self, model: LayeredModel, max_steps: int, stop_strings: Sequence[str] = (),
                 eos_ids: Optional[set[int]] = None, fixed_length: bool = False):
        self.model = model
        self.max_steps = max_steps
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.eos_ids = model.eos_ids() if eos_ids is None else eos_ids
        self.fixed_length = fixed_length

    def _has_stop_string(self, tokens: Sequence[int]) -> bool:
        text = self.model.decode(tokens)
        return any(s in text for s in self.stop_strings)

    def first_stop(self, tokens: Sequence[int], start: int = 0) -> Optional[tuple[int, str]]:
        """The first token at or after `start` that ends generation: (tokens to keep, reason), or None."""
        has_string = bool(self.stop_strings) and self._has_stop_string(tokens)  # one decode in the common case
        for i in range(start, len(tokens)):
            if tokens[i] in self.eos_ids:
                return i + 1, "eos"
            if has_string and self._has_stop_string(tokens[:i + 1]):
                return i + 1, "stop_string"
            if i + 1 >= self.max_steps:
                return i + 1, "max_steps"
        return None

    def check(self, tokens: list[int], new: int = 1) -> Optional[tuple[int, str]]:
        """After appending `new` tokens: None to go on, else (tokens to keep, reason).

        When several tokens arrive at once (speculation), the cut is placed right after the first token
        that ended generation, so methods that emit chunks are not credited with tokens past a stop.
        """
        if self.fixed_length:
            return (self.max_steps, "max_steps") if len(tokens) >= self.max_steps else None
        return self.first_stop(tokens, len(tokens) - new)

    def remaining(self, emitted: int) -> int:
        """Tokens that may still be emitted after `emitted` (speculative methods size drafts with it)."""
        return max(self.max_steps - emitted, 0)


GENERATORS: dict[str, type["Generator"]] = {}


def register(name: str):
    """Class decorator: make a generator selectable as --generation_strategy NAME."""

    def wrap(cls):
        cls.name = name
        GENERATORS[name] = cls
        return cls

    return wrap


def baseline_name() -> str:
    """The registered method that is the speed and quality baseline (the class with `baseline = True`)."""
    from . import load_all

    names = [n for n, c in load_all().items() if c.baseline]
    assert len(names) == 1, f"exactly one generator must declare baseline = True, found {names}"
    return names[0]


def build_generator(model: LayeredModel, config: GenerationConfig) -> "Generator":
    from . import load_all

    load_all()
    cls = GENERATORS.get(config.generation_strategy)
    if cls is None:
        raise UsageError(f"unknown --generation_strategy {config.generation_strategy!r}; "
                         f"choose one of: {', '.join(sorted(GENERATORS))}")
    return cls(model, config)


class Generator(ABC):
    """Base class: validation of shared knobs, sampling, timers and the result record."""

    name: ClassVar[str] = "?"
    lossless: ClassVar[bool] = False  # greedy output must equal greedy autoregressive output (harness.exactness)
    reads_exits: ClassVar[bool] = True  # decodes through early exits (trained ones when attached); full depth aside
    draft_depth: ClassVar[bool] = False  # --exit_layer is its draft depth: a shared --exit_layer reaches it
    short: ClassVar[str] = ""  # its label in report tables and plots ("" = the registered name)
    family: ClassVar[str] = "other"  # its plot family (report.FAMILY_COLOURS gives each family a colour)
    in_all: ClassVar[Optional[int]] = None  # its place in `--strategies all` (None: not in it)
    all_note: ClassVar[str] = ""  # when `all` runs it other than once (for --help)
    label_knobs: ClassVar[tuple] = ()  # knobs its short report label shows beyond exit layer, criteria, confidence
    # what `--recipe calibrate` can certify: (criteria or None, knob names set together, never-exit value, most
    # aggressive value or None = ln(vocab size)); keyed in the artifact as NAME or NAME:criteria
    calibratable: ClassVar[tuple] = ()
    options: ClassVar[Optional[type]] = None  # its own knobs: a dataclass of harness.config.knob fields (or None)
    baseline: ClassVar[bool] = False  # the plain full-depth decoding every speedup is a ratio to (one method only)
    sweep_knobs: ClassVar[tuple] = ()  # two knobs whose grid the report draws as a heatmap (LayerSkip's sweep view)

    @classmethod
    def all_specs(cls, base: GenerationConfig, exits) -> list[dict]:
        """Its configurations in `--strategies all`, as knob overrides (one by default; none without what it needs:
        `exits` is the attached exit artifact or None)."""
        return [{}]

    @classmethod
    def spec_defaults(cls, base: GenerationConfig, over: dict, num_layers: int, exits) -> dict:
        """Knobs a `--strategies NAME` entry gets when neither it nor the shared flags set them, for a model of
        `num_layers` layers with the exit artifact `exits` (or None). A draft depth defaults to LayerSkip's typical
        E ~ L/4, unless the method reads exits and the artifact recommends a self-speculation exit layer."""
        recommended = exits is not None and "exit_layer" in exits.recommended.get("self_speculative", {})
        if cls.draft_depth and base.exit_layer is None and "exit_layer" not in over \
                and not (recommended and cls.reads_exits):
            return {"exit_layer": max(1, num_layers // 4)}
        return {}

    def __init__(self, model: LayeredModel, config: GenerationConfig):
        self.model = model
        self.config = config = dataclasses.replace(config)  # trained defaults below must not leak to the caller
        if config.exit_layer is not None and not 1 <= config.exit_layer <= model.num_layers:
            raise UsageError(f"--exit_layer {config.exit_layer} is outside 1..{model.num_layers} for this model")
        config.check_knobs(self.name)
        self.trained_knobs = self.apply_trained_defaults()
        self.sampler = Sampler(config, model.head_device)  # logits come from the head's device
        # per-component decode time; off unless the benchmark turns it on (--breakdown)
        self.timer = ComponentTimer(getattr(model, "synchronize", lambda: None))
        self.validate()

    def artifact_key(self) -> str:
        """Key of this method's entries in an exit artifact's `recommended` / `thresholds`."""
        return self.name

    def apply_trained_defaults(self) -> dict:
        """Knobs the user did not set take the attached exit artifact's recommended / calibrated values.

        Returns what was taken (logged with the run's knobs and shown in its label). A knob the user set (typed on
        the command line, named in a strategy spec or model_args, even at its default value; or set in code away
        from its default) always wins; `--exits none` turns all of this off.
        """
        art = getattr(self.model, "exits", None)  # test doubles of the model core may not have trained exits
        self.skipped_thresholds = {}
        if art is None:
            return {}
        key = self.artifact_key()
        calibrated = art.thresholds.get(key, {}).get("knobs", {})
        cal_dtype, dtype = art.calibrated_dtype(), str(self.model.dtype).removeprefix("torch.")
        self.skipped_thresholds = {}
        if calibrated and cal_dtype not in (None, dtype):  # a certificate holds for the arithmetic it was made in
            self.skipped_thresholds = {"knobs": dict(calibrated), "calibrated_dtype": cal_dtype, "run_dtype": dtype}
            calibrated = {}
        wanted = {**art.recommended.get(key, {}), **calibrated}
        known = {f.name for f in dataclasses.fields(self.config) if not f.metadata.get("internal")}
        user = self.config.set_by_user()
        taken = {}
        for k, v in wanted.items():
            if k in known and k not in user:
                setattr(self.config, k, v)
                taken[k] = v
        return taken

    def validate(self) -> None:
        """Reject knob combinations this method cannot honour (raise UsageError)."""

    def knobs(self) -> dict:
        """The knobs that define this method's behaviour, for the run log."""
        return {"exit_layer": self.config.exit_layer}

    def reset_state(self) -> None:
        """Forget what was learned across generations (the runner calls it after warm-up)."""

    def log_state(self) -> Optional[dict]:
        """State worth logging with each example's record (None for stateless methods)."""
        return None

    @abstractmethod
    def generate(self, prompt_ids: Sequence[int], stop: StopCondition,
                 on_tokens: Optional[TokenCallback] = None) -> GenerationResult:
        """Generate a continuation of `prompt_ids` until `stop` says so."""

    # -- helpers shared by generators -------------------------------------------------------
    def clock(self) -> float:
        self.model.synchronize()
        return time.perf_counter()

    def ids(self, tokens: Sequence[int]) -> torch.Tensor:
        return torch.tensor([list(tokens)], dtype=torch.long, device=self.model.device)

    def prefill(self, prompt_ids: Sequence[int], depth: Optional[int] = None, keep: Optional[int] = None):
        """Prompt through `depth` layers (all by default) and the first token: (cache, token, t0, t1).

        keep: also keep the prompt's hidden states after that many layers in `self.prefill_states` (a draft module
        reads them: Kangaroo's adapter at its exit, EAGLE's head at the last layer, pre-norm). Work counters restart
        afterwards, so every generator accounts for decode only.
        """
        m = self.model
        cache = m.new_cache()
        self.last_cache = cache  # kept for inspection (tests)
        self.timer.reset()  # before t0: its one-time cost measurement is not part of the generation
        t0 = self.clock()
        h = m.embed(self.ids(prompt_ids))
        depth = depth or m.num_layers
        if keep is not None:
            rope = m.rope(h, 0)
            h = m.run_layers(h, 0, keep, cache, 0, rope=rope)
            self.prefill_states = h
            h = m.run_layers(h, keep, depth, cache, 0, rope=rope)
        else:
            h = m.run_layers(h, 0, depth, cache, 0)
        logits = m.exit_logits(h[:, -1:], layer=depth)
        token = self.sampler.pick(logits)
        self.gaps = [top2_gap(logits)] if self.records_gaps(depth) else None
        t1 = self.clock()
        m.reset_counters()
        return cache, token, t0, t1

    def records_gaps(self, depth: Optional[int]) -> bool:
        """Whether this generation logs its top-2 logit gaps (only plain decoding does: autoregressive.py)."""
        return False

    def result(self, out: "Output", t_start: float, t_prefill: float, t_end: float, **extra) -> GenerationResult:
        c = self.model.counters
        keep, reason = out.done
        breakdown = self.timer.report()
        # A graph is captured once per shape and replayed ever after: its capture is set-up, like a compile, so
        # decode time leaves it out and the record keeps it (graph_capture_seconds).
        decode = t_end - t_prefill - c.graph_capture_seconds
        if breakdown is not None:
            breakdown["decode_seconds"] = decode
        return GenerationResult(
            tokens=out.tokens[:keep], exit_layers=out.exit_layers[:keep], prefill_seconds=t_prefill - t_start,
            decode_seconds=decode, stop_reason=reason, layer_forwards=c.layer_tokens,
            graph_captures=c.graph_captures, graph_capture_seconds=c.graph_capture_seconds,
            head_calls=c.head_calls, head_rows=c.head_rows,
            exit_head_flops=float(self.model.head_flops(1) * c.head_rows + c.adapter_flops),
            kv_fill_flops=float(self.model.kv_fill_flops(c.kv_fill_tokens)), breakdown=breakdown, **extra)


def top2_gap(logits: torch.Tensor) -> float:
    """Top-1 minus top-2 logit of the last position (how far greedy decoding was from a tie)."""
    top = logits.reshape(-1, logits.shape[-1])[-1].float().topk(2).values
    return float(top[0] - top[1])


class Output:
    """The tokens emitted so far with their exit depths; streams them and applies the stop condition."""

    def __init__(self, stop: StopCondition, on_tokens: Optional[TokenCallback] = None):
        self.stop, self.on_tokens = stop, on_tokens
        self.tokens: list[int] = []
        self.exit_layers: list[int] = []
        self.done: Optional[tuple[int, str]] = None  # (tokens to keep, stop reason) once finished

    def add(self, tokens: list[int], depths: list[int]) -> bool:
        """Append tokens chosen at the given depths; True once generation must stop."""
        self.tokens += tokens
        self.exit_layers += depths
        if self.on_tokens:
            self.on_tokens(tokens)
        self.done = self.stop.check(self.tokens, new=len(tokens))
        return self.done is not None

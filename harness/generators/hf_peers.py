"""transformers' own decoding paths as strategies: the peers a reader would otherwise use.

They run on the same loaded model, through the same runner, on the same prompts, with the same timers:
  hf_generate              `generate` (greedy, or sampling with --sample/--temperature/--top_p/--top_k)
  hf_assistant_early_exit  `generate(assistant_early_exit=E)`: transformers' self-speculation (LayerSkip)
  hf_prompt_lookup         `generate(prompt_lookup_num_tokens=N)`: n-gram drafts copied from the prompt
Timing: a streamer timestamps the first new token (end of prefill); every token after it is decode. The
stop rule is ours (a StoppingCriteria around `StopCondition`), so EOS, stop strings, max_steps and
--fixed_length mean the same as for every other strategy. Work is counted by forward hooks on the
decoder layers and the head (positions per call), so layer forwards and head FLOPs are comparable too.
transformers does not expose how many tokens its candidate generators drafted, so acceptance is not
reported; `accepted` counts the tokens that arrived beyond one per step (accepted drafts).
"""
from __future__ import annotations

import copy
import time
from typing import Optional, Sequence

import torch

from ..config import UsageError
from .base import GenerationResult, Generator, StopCondition, TokenCallback, register
from .self_speculative import DraftLength

DEFAULT_LOOKUP_TOKENS = 10  # transformers' documented example value for prompt_lookup_num_tokens


class StreamClock:
    """A transformers streamer: the (synchronized) time of the first new token, i.e. the end of prefill, and the
    size of every later chunk of tokens (also used by bench/autoregressive_vs_hf.py)."""

    def __init__(self, sync):
        self.sync, self.calls, self.first, self.chunks = sync, 0, None, []

    def put(self, value):  # called with the prompt first, then with each step's new tokens (on the host)
        self.calls += 1
        if self.calls == 2:
            self.sync()
            self.first = time.perf_counter()
        elif self.calls > 2:
            self.chunks.append(int(value.numel()))

    def end(self):
        pass


class _Stop:
    """transformers StoppingCriteria applying our StopCondition to the new tokens."""

    def __init__(self, stop: StopCondition, prompt_len: int):
        self.stop, self.prompt_len, self.seen, self.done = stop, prompt_len, 0, None

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        new = input_ids[0, self.prompt_len:].tolist()
        if self.done is None and len(new) > self.seen:
            self.done = self.stop.check(new, new=len(new) - self.seen)
            self.seen = len(new)
        return torch.full((input_ids.shape[0],), self.done is not None, dtype=torch.bool, device=input_ids.device)


class _Work:
    """Forward hooks counting decoder-layer positions and head rows, split into prefill and decode."""

    def __init__(self, model):
        self.model, self.layer_positions, self.head_positions, self.handles = model, 0, 0, []
        self.prefill_layer_positions = self.prefill_head_positions = None
        self.full_passes = 0  # calls of the last decoder layer: target passes (drafts of an early exit never reach it)
        self.head_calls = 0

    def __enter__(self):
        def on_layer(mod, args, kwargs, out):
            h = args[0] if args else kwargs.get("hidden_states")
            self.layer_positions += int(h.shape[0] * h.shape[1])

        def on_last(mod, args, kwargs, out):
            self.full_passes += 1

        def on_head(mod, args, out):
            self.head_calls += 1
            self.head_positions += int(out.shape[0] * out.shape[1])
            if self.prefill_head_positions is None:  # the first head call ends the prefill
                self.prefill_layer_positions, self.prefill_head_positions = self.layer_positions, self.head_positions

        self.handles = [layer.register_forward_hook(on_layer, with_kwargs=True) for layer in self.model.layers]
        self.handles.append(self.model.layers[-1].register_forward_hook(on_last, with_kwargs=True))
        self.handles.append(self.model.lm_head.register_forward_hook(on_head))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


class HFPeer(Generator):
    """Base class: one call of transformers' generate, timed and counted like our generators."""

    lossless = True  # greedy generate, with or without its candidate generators, is plain greedy decoding's output
    reads_exits = False  # transformers' own decoding (its early exit has no adapters)
    family = "transformers peers"

    def peer_kwargs(self) -> dict:
        return {}

    def knobs(self) -> dict:
        return {}

    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[int], stop: StopCondition,
                 on_tokens: Optional[TokenCallback] = None) -> GenerationResult:
        m, c = self.model, self.config
        x = self.ids(prompt_ids)
        gc = copy.deepcopy(m.hf.generation_config)
        gc.eos_token_id = []  # our StopCondition decides (also under --fixed_length); None would fall back to the model's
        gc.max_new_tokens, gc.min_new_tokens = stop.max_steps, None
        gc.pad_token_id = m.tokenizer.eos_token_id if m.tokenizer.eos_token_id is not None else 0
        gc.do_sample = c.sample
        if c.sample:
            gc.temperature, gc.top_p, gc.top_k = c.temperature, c.top_p, c.top_k or None
            torch.manual_seed(c.seed)
        for k, v in self.peer_kwargs().items():
            setattr(gc, k, v)
        clock, criteria = StreamClock(m.synchronize), _Stop(stop, len(prompt_ids))
        with _Work(m) as work:
            t0 = self.clock()
            out = m.hf.generate(x, attention_mask=torch.ones_like(x), generation_config=gc,
                                stopping_criteria=[criteria], streamer=clock)
            t2 = self.clock()
        tokens = out[0, len(prompt_ids):].tolist()
        keep, reason = criteria.done or (len(tokens), "max_steps")
        tokens = tokens[:keep]
        if on_tokens:
            on_tokens(tokens)
        t1 = clock.first if clock.first is not None else t2
        L, head_rows = m.num_layers, m.vocab_size
        decode_layers = work.layer_positions - (work.prefill_layer_positions or 0)
        decode_heads = work.head_positions - (work.prefill_head_positions or 0)
        return GenerationResult(
            tokens=tokens, exit_layers=[L] * len(tokens), prefill_seconds=t1 - t0, decode_seconds=t2 - t1,
            stop_reason=reason, layer_forwards=decode_layers, head_calls=decode_heads,
            head_rows=decode_heads * head_rows, exit_head_flops=float(m.head_flops(head_rows) * decode_heads),
            accepted=self.accepted(clock) if self.speculative else None, drafted=None,
            verify_passes=max(work.full_passes - 1, 0),  # the prefill is one full pass
            draft_passes=max(work.head_calls - work.full_passes, 0),
            accept_lengths=self.emitted(clock.chunks, len(tokens) - 1) if self.speculative else None)

    speculative = False

    @staticmethod
    def emitted(chunks: list[int], decoded: int) -> list[int]:
        """Tokens each decode pass emitted (the streamer's chunks), cut where the kept tokens end."""
        out, total = [], 0
        for c in chunks:
            if total >= decoded:
                break
            out.append(min(c, decoded - total))
            total += out[-1]
        return out

    @staticmethod
    def accepted(clock: StreamClock) -> int:
        return sum(k - 1 for k in clock.chunks)


@register("hf_generate")
class HFGenerate(HFPeer):
    """transformers' generate (greedy or sampling): the plain peer every reader knows."""

    short = "hf"
    in_all = 8

    def validate(self) -> None:
        if self.config.exit_layer is not None:
            raise UsageError("--exit_layer does not apply to hf_generate (it always runs the full model)")


@register("hf_assistant_early_exit")
class HFAssistantEarlyExit(HFPeer):
    """transformers' generate(assistant_early_exit=E): its own LayerSkip-style self-speculation."""

    short = "hf AEE"
    in_all = 10
    draft_depth = True

    speculative = True

    def validate(self) -> None:
        e, L = self.config.exit_layer, self.model.num_layers
        if e is None:
            raise UsageError("hf_assistant_early_exit needs --exit_layer E (the draft depth, 1..L-1)")
        if e >= L:
            raise UsageError(f"hf_assistant_early_exit needs --exit_layer below the model's {L} layers, got {e}")

    def knobs(self) -> dict:
        return {"exit_layer": self.config.exit_layer}

    def peer_kwargs(self) -> dict:
        return {"assistant_early_exit": self.config.exit_layer}


@register("hf_prompt_lookup")
class HFPromptLookup(HFPeer):
    """transformers' generate(prompt_lookup_num_tokens=N): drafts copied from matching n-grams of the prompt."""

    short = "hf lookup"
    in_all = 9
    options = DraftLength

    speculative = True

    def validate(self) -> None:
        k = self.config.num_speculations
        if k is not None and k < 1:
            raise UsageError(f"--num_speculations must be >= 1, got {k}")
        if self.config.exit_layer is not None:
            raise UsageError("--exit_layer does not apply to hf_prompt_lookup (drafts come from the prompt)")

    def knobs(self) -> dict:
        return {"num_speculations": self.config.num_speculations or DEFAULT_LOOKUP_TOKENS}

    def peer_kwargs(self) -> dict:
        return {"prompt_lookup_num_tokens": self.config.num_speculations or DEFAULT_LOOKUP_TOKENS}

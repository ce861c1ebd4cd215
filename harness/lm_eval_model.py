"""lm-evaluation-harness plug-in: the `early_exit` model, over any registered generator.

    import harness.lm_eval_model            # registers "early_exit" with lm-eval
    lm_eval.simple_evaluate(model="early_exit",
                            model_args="generation_strategy=self_speculative,exit_layer=8,num_speculations=6", ...)

`--model_args` take `model` (or lm-eval's usual `pretrained`), `device`, `dtype`, `loglikelihood_exit_layer`
and any generation knob of harness.config.GenerationConfig. `generate_until` runs through the chosen
generator and records speed statistics (`speed_summary()`); `loglikelihood` and `loglikelihood_rolling`
run the full model (or, with loglikelihood_exit_layer=E, the first E layers and the exit head): they
get no speedup from early-exit generation.

`baseline=true` also runs the autoregressive baseline and an A/A control (a second copy of it) on every
generate_until request, the three in an order rotated per request (first request: an untimed warm-up of each).
`speed_summary()` then holds the paired decode speedup (median of per-request ratios of decode time per token,
with IQR, and the control's), and `BaselineReplay(lm)` replays the baseline's outputs so lm-eval can score them
(eval.py --baseline writes the metric deltas).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import statistics
import sys
from typing import Any, Optional

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from .config import GenerationConfig, UsageError, parse_bool, parse_value
from .generators import StopCondition, build_generator
from .model import load_model
from .runner import cut_at_stop, rotation, warm_prompt


def _positive_int(name: str, value: Any) -> int:
    try:
        n = int(str(value))
    except ValueError:
        raise UsageError(f"--model_args {name} expects a whole number, got {value!r}") from None
    if n < 1:
        raise UsageError(f"--model_args {name} must be >= 1, got {n}")
    return n


def check_model_args(kwargs: dict) -> None:
    """Refuse unknown --model_args keys and values of the wrong type with one line, before any model loads."""
    own = [n for n in inspect.signature(EarlyExitLM.__init__).parameters if n not in ("self", "knobs")]
    knobs = {f.name for f in dataclasses.fields(GenerationConfig) if not f.metadata.get("internal")}
    unknown = sorted(set(kwargs) - set(own) - knobs)
    if unknown:
        raise UsageError(f"--model_args: unknown key(s) {', '.join(unknown)}; known: {', '.join(own)} and the "
                         "generation knobs of benchmark.py (python benchmark.py --help)")
    typed_knobs({k: v for k, v in kwargs.items() if k in knobs})
    for name in ("loglikelihood_exit_layer", "max_length"):
        if kwargs.get(name) is not None:
            _positive_int(name, kwargs[name])
    if "baseline" in kwargs:
        _flag("baseline", kwargs["baseline"])


def typed_knobs(knobs: dict) -> dict:
    """Generation knobs from --model_args (strings, or lm-eval's guesses at their type) as GenerationConfig's types:
    a knob's type is its field's, so exit_layer=8.5 or threshold=abc is one line, not a TypeError later."""
    return {k: parse_value(k, str(v)) for k, v in knobs.items()}


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    try:
        return parse_bool(str(value))
    except argparse.ArgumentTypeError:
        raise UsageError(f"--model_args {name} expects true or false, got {value!r}") from None


@register_model("early_exit")
class EarlyExitLM(TemplateLM):
    """An lm-eval LM whose generation is any harness generator (early exit, self-speculation, ...)."""

    def __init__(self, model: Optional[str] = None, pretrained: Optional[str] = None, device: str = "auto",
                 dtype: str = "auto", device_map: Optional[str] = None, exits: str = "auto", baseline: Any = False,
                 loglikelihood_exit_layer: Optional[int] = None,
                 max_length: Optional[int] = None, batch_size: Any = 1, max_batch_size: Any = None,
                 **knobs: Any):
        super().__init__()
        if model is not None and pretrained is not None:
            raise UsageError("give either model= or pretrained= in --model_args, not both")
        check_model_args({**knobs, "loglikelihood_exit_layer": loglikelihood_exit_layer, "max_length": max_length,
                          "baseline": baseline})  # the lm_eval CLI and simple_evaluate come here directly
        typed = typed_knobs(knobs)
        self.gen_config = GenerationConfig(**typed, explicit=tuple(typed))  # model_args are all the user's
        self.baseline = _flag("baseline", baseline)
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # the lm_eval CLI passes --device cuda:0 by default; fall back as lm-eval's hf model does
            print(f"early_exit: {device} unavailable, using cpu", file=sys.stderr)
            device = "cpu"
        self.lm = load_model(model or pretrained, device, dtype, device_map, exits)
        self.generator = build_generator(self.lm, self.gen_config)  # validates the knobs against the model now
        self.baseline_outputs: dict[str, str] = {}
        if self.baseline:
            from .config import for_strategy
            from .generators import baseline_name

            base_cfg = for_strategy(self.gen_config, baseline_name())
            self.reference = [build_generator(self.lm, base_cfg), build_generator(self.lm, base_cfg)]
        L = self.lm.num_layers
        if loglikelihood_exit_layer is not None and not 1 <= int(loglikelihood_exit_layer) <= L:
            raise UsageError(f"loglikelihood_exit_layer {loglikelihood_exit_layer} is outside 1..{L}")
        self.ll_depth = int(loglikelihood_exit_layer or L)
        self._max_length = int(max_length or getattr(self.lm.config, "max_position_embeddings", 2048))
        self.records: list[dict] = []  # one per generate_until request: speed and exits

    # -- what TemplateLM needs ------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.lm.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # what an empty context is conditioned on: BOS where the tokenizer has one (as lm-eval's hf model)
        bos = self.lm.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.lm.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return self.lm.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    @torch.inference_mode()
    def _logprobs(self, ids: list[int]) -> torch.Tensor:
        """Log-softmax of the next-token logits at every position of `ids` (positions, V)."""
        m = self.lm
        h = m.run_layers(m.embed(torch.tensor([ids], device=m.device)), 0, self.ll_depth, m.new_cache(), 0)
        return F.log_softmax(m.exit_logits(h)[0].float(), dim=-1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = []
        for _, context_enc, continuation_enc in tqdm(requests, disable=disable_tqdm, desc="loglikelihood"):
            ids = (context_enc + continuation_enc)[-(self._max_length + 1):]
            n = len(continuation_enc)
            logprobs = self._logprobs(ids[:-1])[-n:]
            target = torch.tensor(continuation_enc, device=logprobs.device)
            ll = float(logprobs.gather(-1, target[:, None]).sum())
            greedy = bool((logprobs.argmax(-1) == target).all())
            out.append((ll, greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="loglikelihood_rolling"):
            windows = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self._max_length, context_len=1))
            pieces = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)
            out.append(sum(ll for ll, _ in pieces))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="generate_until"):
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.get("max_gen_toks", 256))
            if self.gen_config.max_steps is not None:  # max_steps=N in --model_args caps every task's max_gen_toks
                max_new = min(max_new, self.gen_config.max_steps)
            ids = self.tok_encode(context)[-(self._max_length - max_new):]
            if not ids:  # a zero-length prompt has no position to predict from
                raise UsageError(f"{getattr(req, 'task_name', 'task')} document {getattr(req, 'doc_id', '?')}: empty "
                                 f"prompt ({context!r} encodes to no tokens)")
            stop = StopCondition(self.lm, max_new, until)
            timed = {}
            if self.baseline:  # method, baseline, control: the benchmark's schedule (harness.runner)
                gens = [("method", self.generator), ("baseline", self.reference[0]), ("control", self.reference[1])]
                if not self.records:  # each configuration's own warm-up, once
                    for _, g in gens:
                        g.generate(ids, StopCondition(self.lm, min(max_new, 16), (), eos_ids=set()))
                warm_prompt(self.reference[0], ids)  # this request's prompt, untimed, before any timed run
                for c in rotation(len(gens), len(self.records)):
                    timed[gens[c][0]] = gens[c][1].generate(ids, stop)
                res = timed["method"]
                self.baseline_outputs[replay_key(context, gen_kwargs)] = cut_at_stop(
                    self.lm.decode(timed["baseline"].tokens), tuple(until))
            else:
                res = self.generator.generate(ids, stop)
            text = cut_at_stop(self.lm.decode(res.tokens), tuple(until))
            out.append(text)
            total = res.prefill_seconds + res.decode_seconds
            self.records.append({"new_tokens": len(res.tokens), "seconds": total,
                                 "tokens_per_second": len(res.tokens) / total if total > 0 else None,
                                 "exit_layers": res.exit_layers, "drafted": res.drafted, "accepted": res.accepted,
                                 **{f"{k}_decode_time_per_token": per_token(v) for k, v in timed.items()}})
        return out

    # -- speed statistics ---------------------------------------------------------------------------
    def speed_summary(self) -> dict:
        """Aggregates over every generate_until request so far (written by eval.py beside the results)."""
        r = self.records
        tps = [x["tokens_per_second"] for x in r if x["tokens_per_second"]]
        exits = [e for x in r for e in x["exit_layers"][1:]]  # decoded tokens, as everywhere
        drafted = sum(x["drafted"] or 0 for x in r)
        return {"strategy": self.generator.name, "knobs": self.generator.knobs(), "model": self.lm.name,
                "requests": len(r), "new_tokens": sum(x["new_tokens"] for x in r),
                "tokens_per_second_median": statistics.median(tps) if tps else None,
                "avg_exit_layer": statistics.fmean(exits) if exits else None,
                "acceptance_rate": sum(x["accepted"] or 0 for x in r) / drafted if drafted else None,
                "loglikelihood_depth": self.ll_depth, **self.paired_speed()}

    def paired_speed(self) -> dict:
        """With baseline=true: the method's and the A/A control's decode speedup over the baseline, per request."""
        if not self.baseline:
            return {}
        import numpy as np

        out = {}
        for name in ("method", "control"):
            pairs = [(x["baseline_decode_time_per_token"], x[f"{name}_decode_time_per_token"]) for x in self.records
                     if x.get("baseline_decode_time_per_token") and x.get(f"{name}_decode_time_per_token")]
            ratio = np.array([b / m for b, m in pairs])
            key = "decode_speedup" if name == "method" else "control_decode_speedup"
            out[key] = float(np.median(ratio)) if len(ratio) else None
            out[f"{key}_iqr"] = [float(np.percentile(ratio, 25)), float(np.percentile(ratio, 75))] if len(ratio) \
                else None
        out["paired_requests"] = sum(1 for x in self.records if x.get("baseline_decode_time_per_token"))
        out["speedup_definition"] = ("median over generate_until requests of baseline decode s/token / method decode "
                                     "s/token, all three (method, baseline, control) run on every request in a "
                                     "rotated order")
        return out


def per_token(res) -> Optional[float]:
    """Decode seconds per decoded token (the first token belongs to prefill), as the harness reports."""
    n = len(res.tokens) - 1
    return res.decode_seconds / n if n > 0 else None


def replay_key(context: str, gen_kwargs) -> str:
    import json

    return json.dumps([context, gen_kwargs], sort_keys=True, default=str)


class BaselineReplay(TemplateLM):
    """The baseline's outputs recorded by an EarlyExitLM with baseline=true, replayed for lm-eval to score."""

    def __init__(self, lm: EarlyExitLM):
        super().__init__()
        self.inner = lm

    @property
    def eot_token_id(self) -> int:
        return self.inner.eot_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.inner.prefix_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.inner.tokenizer_name

    def tok_encode(self, string: str, **kwargs) -> list[int]:
        return self.inner.tok_encode(string, **kwargs)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        return self.inner._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, **kwargs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self.inner.loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in [r.args for r in requests]:
            key = replay_key(context, gen_kwargs)
            if key not in self.inner.baseline_outputs:
                raise UsageError("baseline replay: a request the method run did not see (same tasks and limit?)")
            out.append(self.inner.baseline_outputs[key])
        return out


def lm_eval_cli() -> None:
    """The `lm_eval` command with this plug-in registered (lm-eval has no discovery for third-party models)."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm_eval"
    cli_evaluate()

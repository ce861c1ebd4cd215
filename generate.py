"""Generate text with any decoding method, streaming tokens to the terminal as they are produced.

    python generate.py --prompt "Write a haiku about layers."          # one shot
    python generate.py --generation_strategy autoregressive --exit_layer 12   # interactive (empty line or Ctrl-D quits)
    echo "Write a haiku about layers." | python generate.py     # prompts from a pipe or file, one per line

Instruct models get their chat template unless --no-chat_template. Speed figures go to stderr. Prompts read from
a pipe or file (not a terminal) end at the first empty line or the end of input; that input must hold at least one.
"""
from __future__ import annotations

import dataclasses
import itertools
import sys
from typing import Iterator, Optional

from harness.cli import Parser, require_single_process, run_main, strategies_epilog
from harness.config import GenerationConfig, RunConfig, UsageError, add_dataclass_args, from_args

DEFAULT_MAX_STEPS = 128
# benchmark.py's model flags, the same RunConfig fields; an interactive prompt is a chat turn, so the chat template is
# on by default here (benchmark.py feeds raw prompts, as LayerSkip does)
MODEL_FLAGS = ("model", "device", "dtype", "core", "exits", "device_map", "chat_template")
MODEL_DEFAULTS = {"chat_template": True}


class _Parser(Parser):
    """The strategy list (--help's epilog) is built only when help is shown."""

    def format_help(self) -> str:
        self.epilog = strategies_epilog()
        return super().format_help()


def check_prompt(text: str, where: str) -> str:
    """One line for a prompt the model cannot take: empty, or not UTF-8 (Python keeps undecodable argv and stdin
    bytes as lone surrogates, which the tokenizer rejects with a TypeError)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{where} is not valid UTF-8 text") from None
    if not text.strip():
        raise UsageError(f"{where} is empty: nothing to generate from")
    return text


def _decoded(raw: bytes, n: int) -> str:
    try:
        return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise UsageError(f"stdin line {n} is not valid UTF-8 text") from None


def piped_prompts() -> Optional[Iterator[str]]:
    """Prompts from a non-terminal stdin, one per line up to the first empty line. The first is read now (before
    the model loads), so closed or empty input is one line at once; the rest as they come. None at a terminal."""
    if sys.stdin is None:  # started with stdin closed (`<&-`)
        raise UsageError("stdin is closed: give --prompt TEXT, or prompts on stdin")
    if sys.stdin.isatty():
        return None
    first = sys.stdin.buffer.readline()
    if not first.strip():
        raise UsageError("no prompt on stdin (it is empty or starts with an empty line): give --prompt TEXT, or "
                         "prompts on stdin, one per line")

    def lines() -> Iterator[str]:
        yield check_prompt(_decoded(first, 1), "stdin line 1")
        for n, raw in enumerate(iter(sys.stdin.buffer.readline, b""), 2):
            text = _decoded(raw, n)
            if not text.strip():
                return
            yield check_prompt(text, f"stdin line {n}")

    it = lines()
    return itertools.chain([next(it)], it)


def build_parser() -> Parser:
    import argparse

    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input")
    g.add_argument("--prompt", default=None, help="generate once for this text and exit; omitted = interactive mode (default: %(default)s)")
    add_dataclass_args(p, RunConfig, "model (as benchmark.py)", only=MODEL_FLAGS, defaults=MODEL_DEFAULTS)
    add_dataclass_args(p, GenerationConfig, "generation (strategy and its knobs)")
    return p


def main() -> int:
    args = build_parser().parse_args()
    require_single_process()
    gen_cfg = from_args(GenerationConfig, args)  # checks every number (--max_steps >= 1, ...)
    gen_cfg = dataclasses.replace(gen_cfg, max_steps=DEFAULT_MAX_STEPS if gen_cfg.max_steps is None
                                  else gen_cfg.max_steps)
    prompts = None if args.prompt is not None else piped_prompts()
    if args.prompt is not None:
        check_prompt(args.prompt, "--prompt")
    import torch
    from transformers import TextStreamer

    from harness.generators import StopCondition, build_generator
    from harness.model import load_model

    model = load_model(args.model, args.device, args.dtype, args.device_map, args.exits, args.core)
    generator = build_generator(model, gen_cfg)

    def once(text: str) -> None:
        ids = model.encode(text, chat=args.chat_template)
        if not ids:
            raise UsageError("the prompt encodes to no tokens: nothing to generate from")
        streamer = TextStreamer(model.tokenizer, skip_special_tokens=True)
        res = generator.generate(ids, StopCondition(model, gen_cfg.max_steps),
                                 on_tokens=lambda toks: streamer.put(torch.tensor(list(toks))))
        streamer.end()
        total = res.prefill_seconds + res.decode_seconds
        avg = sum(res.exit_layers) / max(len(res.exit_layers), 1)
        print(f"[{len(res.tokens)} tokens, {len(res.tokens) / total:.2f} tokens/s, prefill {res.prefill_seconds:.2f}s, "
              f"avg exit layer {avg:.1f}/{model.num_layers}, stop: {res.stop_reason}]", file=sys.stderr)

    if args.prompt is not None:
        once(args.prompt)
        return 0
    print(f"{model.name} with {generator.name}; empty line or Ctrl-D quits.", file=sys.stderr)
    while True:
        if prompts is not None:
            print("> ", end="", flush=True)
            text = next(prompts, "")
        else:
            try:
                text = input("> ")
            except EOFError:
                break
            except UnicodeDecodeError:
                raise UsageError("this line is not valid UTF-8 text") from None
        if not text.strip():
            break
        once(check_prompt(text, "this line"))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

"""Generate text with any decoding method, streaming tokens to the terminal as they are produced.

    python generate.py --prompt "Write a haiku about layers."          # one shot
    python generate.py --generation_strategy autoregressive --exit_layer 12   # interactive (empty line or Ctrl-D quits)

Instruct models get their chat template unless --no-chat_template. Speed figures go to stderr.
"""
from __future__ import annotations

import dataclasses
import sys

from harness.cli import Parser, require_single_process, run_main, strategies_epilog
from harness.config import GenerationConfig, add_dataclass_args, from_args

DEFAULT_MAX_STEPS = 128


def build_parser() -> Parser:
    import argparse

    p = Parser(description=__doc__, epilog=strategies_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("input and model")
    g.add_argument("--prompt", default=None, help="generate once for this text and exit; omitted = interactive mode (default: %(default)s)")
    g.add_argument("--model", default=None, help="as in benchmark.py; omitted = embedded SmolLM2-135M-Instruct (default: %(default)s)")
    g.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, cuda:1, mps (default: %(default)s)")
    g.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto (default: %(default)s)")
    g.add_argument("--exits", default="auto", help="trained exits: auto (shipped for this model), none, or an exit "
                   "artifact path (default: %(default)s)")
    g.add_argument("--chat_template", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap the prompt in the tokenizer's chat template when it has one (default: %(default)s)")
    add_dataclass_args(p, GenerationConfig, "generation (strategy and its knobs)")
    return p


def main() -> int:
    args = build_parser().parse_args()
    require_single_process()
    import torch
    from transformers import TextStreamer

    from harness.generators import StopCondition, build_generator
    from harness.model import load_model

    gen_cfg = from_args(GenerationConfig, args)
    gen_cfg = dataclasses.replace(gen_cfg, max_steps=gen_cfg.max_steps or DEFAULT_MAX_STEPS)
    model = load_model(args.model, args.device, args.dtype, getattr(args, "device_map", None), args.exits)
    generator = build_generator(model, gen_cfg)

    def once(text: str) -> None:
        ids = model.encode(text, chat=args.chat_template)
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
        try:
            text = input("> ")
        except EOFError:
            break
        if not text.strip():
            break
        once(text)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

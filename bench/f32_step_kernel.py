"""fp32 greedy tokens and decode time with one-position steps on MKL (the core before) and on the native fp32
product (the core now): docs/model_core.md "fp32 decode passes". Run it alone (it times).

    .venv/bin/python bench/f32_step_kernel.py --prompts 10     # 10 prompts each of 4 tasks, 64 tokens
"""
from __future__ import annotations

import argparse
import time

import torch

from harness import lean_layers
from harness.config import GenerationConfig
from harness.generators.base import StopCondition, build_generator
from harness.model import load_model
from harness.tasks import load_examples

TASKS = ("cnn_dm_summarization", "xsum_summarization", "gsm8k", "human_eval")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=10, help="prompts per task")
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    m = load_model(None, device="cpu", dtype="float32", exits="none")
    prompts = [(task, m.encode(e.prompt, chat=task != "human_eval")[-1000:])
               for task in TASKS for e in load_examples(task, args.prompts)]
    out, seconds = {}, {}
    with torch.inference_mode():
        for rows, name in ((2, "MKL steps"), (1, "native steps")):
            lean_layers.F32_MIN_ROWS = rows
            m.use_core("lean")  # rebuilt: the kernels are chosen per call, the packed weights kept
            g = build_generator(m, GenerationConfig())
            t = time.perf_counter()
            out[name] = [g.generate(ids, StopCondition(m, args.tokens, eos_ids=set())).tokens for _, ids in prompts]
            seconds[name] = time.perf_counter() - t
            print(f"{name}: {seconds[name]:.1f} s for {len(prompts)} prompts x {args.tokens} tokens", flush=True)
    a, b = out["MKL steps"], out["native steps"]
    print(f"identical greedy tokens: {sum(x == y for x, y in zip(a, b))}/{len(prompts)}")
    for (task, _), x, y in zip(prompts, a, b):
        if x != y:
            print(f"  {task}: first differs at token {next(i for i, (p, q) in enumerate(zip(x, y)) if p != q)}")


if __name__ == "__main__":
    main()

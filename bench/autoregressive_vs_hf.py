"""Is our autoregressive decode a fair baseline? Compare it with transformers' `generate`.

Same model, same prompts, same process, greedy, same number of new tokens (EOS and stop strings off),
after a warm-up of both; device synchronized around every timer. Prints per-prompt tokens/s, the
medians and the ratio ours / transformers (>= 1.0 means ours is at least as fast).

    .venv/bin/python bench/autoregressive_vs_hf.py [--num_samples 5] [--max_steps 64] [--model ...]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.config import GenerationConfig  # noqa: E402
from harness.generators import StopCondition, build_generator  # noqa: E402
from harness.model import load_model, synchronize  # noqa: E402
from harness.tasks import load_examples  # noqa: E402


def hf_generate(model, ids: list[int], n: int) -> tuple[list[int], float]:
    x = torch.tensor([ids], device=model.device)
    synchronize(model.device)
    t = time.perf_counter()
    out = model.hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=model.tokenizer.eos_token_id)
    synchronize(model.device)
    return out[0, len(ids):].tolist(), time.perf_counter() - t


def ours(model, gen, ids: list[int], n: int) -> tuple[list[int], float]:
    res = gen.generate(ids, StopCondition(model, n, eos_ids=set()))
    return res.tokens, res.prefill_seconds + res.decode_seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="as benchmark.py --model (default: embedded SmolLM2)")
    p.add_argument("--dataset", default="cnn_dm_summarization", help="prompts from this task (default: %(default)s)")
    p.add_argument("--num_samples", type=int, default=5, help="prompts (default: %(default)s)")
    p.add_argument("--max_steps", type=int, default=64, help="new tokens per prompt (default: %(default)s)")
    p.add_argument("--device", default="auto", help="(default: %(default)s)")
    p.add_argument("--dtype", default="auto", help="(default: %(default)s)")
    a = p.parse_args()
    model = load_model(a.model, a.device, a.dtype)
    gen = build_generator(model, GenerationConfig())
    prompts = [model.encode(ex.prompt) for ex in load_examples(a.dataset, num_samples=a.num_samples)]
    with torch.inference_mode():
        hf_generate(model, prompts[0], 8)  # warm-up both paths
        ours(model, gen, prompts[0], 8)
        rows = []
        for i, ids in enumerate(prompts):
            # Alternate the order so neither side always runs on a warmer cache.
            if i % 2:
                ht, hs = hf_generate(model, ids, a.max_steps)
                ot, os_ = ours(model, gen, ids, a.max_steps)
            else:
                ot, os_ = ours(model, gen, ids, a.max_steps)
                ht, hs = hf_generate(model, ids, a.max_steps)
            same = ot == ht
            rows.append((a.max_steps / hs, a.max_steps / os_, same))
            print(f"prompt {i}: {len(ids)} prompt tokens  transformers {rows[-1][0]:6.2f} tok/s  "
                  f"ours {rows[-1][1]:6.2f} tok/s  identical tokens: {same}")
    hf_med = statistics.median(r[0] for r in rows)
    our_med = statistics.median(r[1] for r in rows)
    print(f"median tokens/s: transformers.generate {hf_med:.2f}, harness autoregressive {our_med:.2f}")
    print(f"ratio ours/transformers = {our_med / hf_med:.3f}  ({sum(r[2] for r in rows)}/{len(rows)} outputs identical)")


if __name__ == "__main__":
    main()

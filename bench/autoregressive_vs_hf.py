"""Is our autoregressive decode a fair baseline? Compare it with transformers' `generate`.

Same model, same prompts, same process, greedy, exactly --max_steps new tokens on both sides (EOS and
stop strings off). Before each prompt's timed runs, an untimed warm-up runs that prompt through the
full model for a few decode steps (new prompt lengths cost one-time work on a GPU: allocator growth,
kernel selection; without the warm-up whoever runs a prompt first pays it). --order chooses who runs
first on every prompt (ours_first, hf_first) or alternates; run both fixed orders to see whether any
order effect is left (bench/measurement_check.py does). Timers synchronize the device. Speed is decode
time per token: prefill excluded on both sides (transformers' first token is timestamped by a
streamer). Prints per-prompt figures, and the median over prompts of the per-prompt ratio
transformers decode time/token / ours (>= 1.0 means ours is at least as fast).

    .venv/bin/python bench/autoregressive_vs_hf.py [--num_samples 6] [--max_steps 48] [--order alternate]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.config import GenerationConfig  # noqa: E402
from harness.generators import StopCondition, build_generator  # noqa: E402
from harness.generators.hf_peers import StreamClock  # noqa: E402
from harness.model import load_model, synchronize  # noqa: E402
from harness.runner import WARMUP_STEPS  # noqa: E402
from harness.tasks import load_examples  # noqa: E402


def hf_generate(model, ids: list[int], n: int) -> tuple[list[int], float, float]:
    """(tokens, prefill seconds, decode seconds) of transformers' greedy generate."""
    x = torch.tensor([ids], device=model.device)
    clock = StreamClock(lambda: synchronize(model.device))
    synchronize(model.device)
    t = time.perf_counter()
    out = model.hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=model.tokenizer.eos_token_id, streamer=clock)
    synchronize(model.device)
    end = time.perf_counter()
    return out[0, len(ids):].tolist(), clock.first - t, end - clock.first


def ours(model, gen, ids: list[int], n: int) -> tuple[list[int], float, float]:
    res = gen.generate(ids, StopCondition(model, n, eos_ids=set()))
    return res.tokens, res.prefill_seconds, res.decode_seconds


def compare(model, prompts: list[list[int]], max_steps: int, order: str, warmup: bool = True,
            log=print) -> dict:
    """Time both sides on every prompt in the given order; the per-prompt figures and their medians."""
    gen = build_generator(model, GenerationConfig())
    rows = []
    with torch.inference_mode():
        hf_generate(model, prompts[0], 8)  # each path's own kernels, once
        ours(model, gen, prompts[0], 8)
        for i, ids in enumerate(prompts):
            if warmup:  # untimed: this prompt through the full model, a few decode steps
                ours(model, gen, ids, WARMUP_STEPS + 1)
            first_ours = order == "ours_first" or (order == "alternate" and i % 2 == 0)
            sides = [("ours", lambda: ours(model, gen, ids, max_steps)),
                     ("transformers", lambda: hf_generate(model, ids, max_steps))]
            timed = dict((name, fn()) for name, fn in (sides if first_ours else sides[::-1]))
            (ot, op, od), (ht, hp, hd) = timed["ours"], timed["transformers"]
            d = max_steps - 1
            row = {"prompt": i, "prompt_tokens": len(ids), "first": "ours" if first_ours else "transformers",
                   "ours_decode_ms_per_token": 1e3 * od / d, "hf_decode_ms_per_token": 1e3 * hd / d,
                   "ours_prefill_s": op, "hf_prefill_s": hp, "ratio_hf_over_ours": hd / od, "identical": ot == ht}
            rows.append(row)
            log(f"prompt {i}: {len(ids)} tokens, {row['first']} first: decode ms/token ours "
                f"{row['ours_decode_ms_per_token']:.2f}, transformers {row['hf_decode_ms_per_token']:.2f} "
                f"(ratio {row['ratio_hf_over_ours']:.3f}); identical tokens: {row['identical']}")
    ratios = [r["ratio_hf_over_ours"] for r in rows]
    return {"order": order, "warmup": warmup, "max_steps": max_steps, "n": len(rows), "rows": rows,
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "ours_decode_ms_per_token_median": statistics.median(r["ours_decode_ms_per_token"] for r in rows),
            "hf_decode_ms_per_token_median": statistics.median(r["hf_decode_ms_per_token"] for r in rows),
            "identical": sum(r["identical"] for r in rows)}


def prompts_for(model, dataset: str, num_samples: int) -> list[list[int]]:
    return [model.encode(ex.prompt) for ex in load_examples(dataset, num_samples=num_samples)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="as benchmark.py --model (default: embedded SmolLM2)")
    p.add_argument("--dataset", default="cnn_dm_summarization", help="prompts from this task (default: %(default)s)")
    p.add_argument("--num_samples", type=int, default=6, help="prompts (default: %(default)s)")
    p.add_argument("--max_steps", type=int, default=48, help="new tokens per prompt (default: %(default)s)")
    p.add_argument("--order", choices=("alternate", "ours_first", "hf_first"), default="alternate",
                   help="who runs first on each prompt (default: %(default)s)")
    p.add_argument("--no_warmup", dest="warmup", action="store_false", help="skip the per-prompt warm-up")
    p.add_argument("--device", default="auto", help="(default: %(default)s)")
    p.add_argument("--dtype", default="auto", help="(default: %(default)s)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = p.parse_args()
    model = load_model(a.model, a.device, a.dtype)
    out = compare(model, prompts_for(model, a.dataset, a.num_samples), a.max_steps, a.order, a.warmup)
    print(f"median decode ms/token: transformers.generate {out['hf_decode_ms_per_token_median']:.2f}, "
          f"harness autoregressive {out['ours_decode_ms_per_token_median']:.2f}")
    print(f"ratio transformers/ours (median of per-prompt ratios) = {out['ratio_median']:.3f} "
          f"[min-max {out['ratio_min']:.3f}-{out['ratio_max']:.3f}], {out['identical']}/{out['n']} outputs identical")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    from harness.cli import run_main

    run_main(lambda: main() or 0)

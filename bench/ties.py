"""How far a verifier's logits can drift from plain decoding's: the tolerance that defines a near-tie per dtype.

A lossless method's verifier scores k positions in one pass; plain decoding scores one. With library kernels the
arithmetic differs (other kernel blockings at other M; the native kernels of harness/native_bf16.py do not), so the two can pick different argmax tokens where the top two logits are
closer than that drift. This probe measures the drift on real text, as a verifier would see it: greedy decoding
of `--tokens` tokens (one position per pass), then the same sequence re-scored `--width` positions per pass; for
every position it takes plain decoding's top-2 tokens (a, b) and compares the margin l[a] - l[b] between the two
computations. The tolerance in harness/exactness.py is set above the largest drift seen here, and a mismatch whose
plain-decoding margin lies below it is called a near-tie; anything else is a bug.

    .venv/bin/python bench/ties.py --dtype bfloat16     # ~2 min on the team's CPU; run it alone
    .venv/bin/python bench/ties.py --dtype bfloat16 --core lean-library   # the library kernels (oneDNN, SDPA)
    python bench/ties.py --device cuda --dtype bfloat16

Prompts come from XSum's validation split (never a reported test file).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.cli import run_main  # noqa: E402
from harness.model import load_model  # noqa: E402
from harness.tasks import _records_from_file, get_task, DATA_DIR  # noqa: E402


@torch.inference_mode()
def drift(model, prompt: list[int], tokens: int, width: int) -> list[dict]:
    """Per generated position: plain decoding's margin and its change under `width`-position re-scoring."""
    m, L = model, model.num_layers
    cache = m.new_cache()
    h = m.run_layers(m.embed(torch.tensor([prompt], device=m.device)), 0, L, cache, 0)
    logits = [m.exit_logits(h[:, -1:])[0, -1].float()]
    seq = [int(logits[0].argmax())]
    for i in range(tokens - 1):
        h = m.run_layers(m.embed(torch.tensor([[seq[-1]]], device=m.device)), 0, L, cache, len(prompt) + i)
        logits.append(m.exit_logits(h)[0, -1].float())
        seq.append(int(logits[-1].argmax()))
    # re-score: the verifier sees [token at p, drafts...] and predicts positions p+1..p+width
    m.crop(cache, len(prompt))
    wide, pos, inputs = [logits[0]], len(prompt), seq[:-1]
    for s in range(0, len(inputs), width):
        chunk = inputs[s:s + width]
        h = m.run_layers(m.embed(torch.tensor([chunk], device=m.device)), 0, L, cache, pos)
        wide.extend(m.exit_logits(h)[0].float())
        pos += len(chunk)
    out = []
    for one, many in zip(logits, wide):
        a, b = one.topk(2).indices.tolist()
        out.append({"margin": float(one[a] - one[b]), "drift": float((one[a] - one[b]) - (many[a] - many[b])),
                    "flip": int(many.argmax()) != int(one.argmax())})  # topk's order of an exact tie is not argmax's
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompts", type=int, default=10)
    p.add_argument("--prompt_tokens", type=int, default=400)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--core", default="lean", choices=["lean", "lean-library", "transformers"],
                   help="benchmark.py --core: lean runs the native batch-invariant kernels where they build")
    p.add_argument("--out", default=None, help="write the per-position figures as JSON")
    args = p.parse_args()
    model = load_model(None, args.device, args.dtype, exits="none", core=args.core)
    task = get_task("xsum_summarization")
    records = _records_from_file(task, DATA_DIR / "xsum_validation.jsonl.gz")[:args.prompts]
    rows = []
    for r in records:
        ids = model.encode(task.prompt(r), chat=True)[-args.prompt_tokens:]
        rows.extend(drift(model, ids, args.tokens, args.width))
    drifts = sorted(abs(r["drift"]) for r in rows)
    flips = [r for r in rows if r["flip"]]
    q = lambda f: drifts[min(len(drifts) - 1, int(f * len(drifts)))]  # noqa: E731
    print(f"{args.dtype} on {args.device}, {model.core_summary()['layer_kernel']}: {len(rows)} positions, {args.prompts} prompts, width {args.width}")
    print(f"|margin drift|: median {q(0.5):.4f}, p99 {q(0.99):.4f}, p99.9 {q(0.999):.4f}, max {drifts[-1]:.4f}")
    print(f"argmax flips: {len(flips)}; their plain-decoding margins: "
          f"{', '.join(format(r['margin'], '.4f') for r in flips) or '-'}")
    if args.out:
        Path(args.out).write_text(json.dumps({"dtype": args.dtype, "device": args.device, "rows": rows}) + "\n")
    return 0


if __name__ == "__main__":
    run_main(main)

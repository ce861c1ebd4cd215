"""Why a method wins or loses on a model: diagnostics of its exits, before any long run.

    python -m harness.diagnose --dataset cnn_dm_summarization --num_samples 8 [--model ...] [--exits auto]

Teacher-forced over real prompts and their references (the reference tokens after the prompt are the scored
positions), for every layer d = 1..L-1 (through its trained adapter when an exit artifact is attached):
- agreement.csv / agreement.png: top-1 agreement of the exit at d with the last layer;
- confidence.csv / confidence.png: the distribution of each confidence measure (max prob, softmax margin,
  entropy, hidden-state cosine) at d, split by whether the exit agrees with the last layer (the vocabulary-
  reduction fork's --plotting_logits view);
- calibration.csv / calibration.png: max-prob confidence (10 bins) vs agreement, per layer;
- static_exit.csv / static_exit.png: the task metric of greedy static exit at a grid of layers (generated);
- speculation.csv: for each exit layer E, predicted self-speculative acceptance and speedup from this machine's
  measured layer and head costs (harness/speedup_model.py); with --measure_exit_layer E, the measured decode
  speedup of self_speculative at E against autoregressive on the same prompts (interleaved, harness protocol).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .config import GenerationConfig, RunConfig, UsageError

# pandas, torch and the model code are imported where used: bad arguments are refused before those imports
if TYPE_CHECKING:
    import pandas as pd


def teacher_forced(model, examples, max_tokens: int) -> dict:
    """Per layer: exit logits' top-1 agreement with the last layer and confidences at the reference positions."""
    import pandas as pd
    import torch

    from .train.common import hidden_states

    L = model.num_layers
    rows = []
    for ex in examples:
        prompt = model.encode(ex.prompt)
        ref = model.tokenizer(" " + ex.reference.strip(), add_special_tokens=False)["input_ids"][:max_tokens]
        if not ref:
            continue
        ids = (prompt + ref)[-(max_tokens * 4):]
        start = len(ids) - len(ref)
        with torch.no_grad():
            hs = hidden_states(model, torch.tensor([ids]))
            final = model.lm_head(hs[L][:, start - 1:-1]).float()[0]
            target = final.argmax(-1)
            prev = hs[0][:, start - 1:-1]
            for d in range(1, L):
                h = hs[d][:, start - 1:-1]
                logits = model.exit_logits(h, layer=d).float()[0]
                p = torch.softmax(logits, -1)
                top2 = p.topk(2, dim=-1).values
                ent = -(p * torch.log(p.clamp_min(1e-12))).sum(-1)
                cos = torch.nn.functional.cosine_similarity(h[0].float(), prev[0].float(), dim=-1)
                agree = (logits.argmax(-1) == target)
                for i in range(len(target)):
                    rows.append((ex.id, d, bool(agree[i]), float(top2[i, 0]), float(top2[i, 0] - top2[i, 1]),
                                 float(ent[i]), float(cos[i])))
                prev = h
    return pd.DataFrame(rows, columns=["id", "layer", "agrees", "max_prob", "softmax_margin", "entropy",
                                       "hidden_cosine"])


def calibration(tf: pd.DataFrame, bins: int = 10) -> pd.DataFrame:
    import pandas as pd

    tf = tf.assign(bin=(tf["max_prob"] * bins).clip(upper=bins - 1e-9).astype(int))
    g = tf.groupby(["layer", "bin"])
    return pd.DataFrame({"confidence": g["max_prob"].mean(), "agreement": g["agrees"].mean(),
                         "n": g.size()}).reset_index()


def static_exit(model, examples, task, layers: list[int], max_steps: int) -> pd.DataFrame:
    """The task metric of greedy static exit at each layer in `layers` (L = the full model)."""
    import pandas as pd

    from .generators import StopCondition, build_generator
    from .metrics import METRICS
    from .runner import cut_at_stop

    rows = []
    for d in layers:
        gen = build_generator(model, GenerationConfig(exit_layer=d, max_steps=max_steps))
        scores = []
        for ex in examples:
            ids = model.encode(ex.prompt)[-(model.max_context - max_steps):]
            res = gen.generate(ids, StopCondition(model, max_steps, task.stop))
            text = cut_at_stop(model.decode(res.tokens), task.stop)
            scores.append(METRICS[task.metric](text, ex))
        df = pd.DataFrame(scores).mean(numeric_only=True)
        rows.append({"layer": d, **df.to_dict()})
    return pd.DataFrame(rows)


def speculation(model, tf: pd.DataFrame, layers: list[int]) -> pd.DataFrame:
    """Predicted self-speculative settings per exit layer from measured costs and teacher-forced agreement."""
    import pandas as pd

    from .speedup_model import best_setting, measure_costs, simulate

    vocab = model.exits.vocab.to(model.device) if model.exits is not None and model.exits.vocab is not None else None
    costs = measure_costs(model, vocab)
    rows = []
    for E in layers:
        t = tf[tf["layer"] == E]
        per = {E: (t["agrees"].tolist(), t["max_prob"].tolist())}
        best, _ = best_setting(per, costs)
        plain = simulate(per[E][0], per[E][1], E, 6, 0.0, costs)  # LayerSkip's k = 6, no early stop
        rows.append({"exit_layer": E, "agreement": float(t["agrees"].mean()),
                     "predicted_speedup_k6": plain["predicted_speedup"], "best_k": best["num_speculations"],
                     "best_draft_threshold": best["draft_threshold"], "best_acceptance": best["acceptance"],
                     "best_predicted_speedup": best["predicted_speedup"]})
    costs_row = {"layer_ms": costs.layer * 1e3, "head_ms_1": costs.head[1] * 1e3, "step_ms": costs.step() * 1e3}
    return pd.DataFrame(rows).assign(**costs_row)


def measured_speedup(run: RunConfig, model, E: int, out: Path, max_steps: int) -> dict:
    """Decode speedup of self_speculative at E vs autoregressive, interleaved on the same prompts (no control)."""
    from .config import for_strategy
    from .report import build_table, load_runs
    from .runner import run_many

    base = GenerationConfig(max_steps=max_steps, exit_layer=E)
    configs = [for_strategy(base, "autoregressive"), for_strategy(base, "self_speculative")]
    parent, _ = run_many(RunConfig(**{**asdict(run), "output_dir": str(out / "measured")}), configs, model=model,
                         control=False)
    df = build_table(load_runs([str(parent)]))
    row = df[df["strategy"] == "self_speculative"].iloc[0]
    return {"exit_layer": E, "measured_decode_speedup": row["decode_speedup"],
            "measured_q25": row["decode_speedup_q25"], "measured_q75": row["decode_speedup_q75"],
            "measured_acceptance": row["acceptance_rate"], "n": int(row["n_paired"])}


def plots(tf: pd.DataFrame, cal: pd.DataFrame, stat: Optional[pd.DataFrame], metric: Optional[str], out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    agree = tf.groupby("layer")["agrees"].mean()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(agree.index, agree.values, marker="o")
    ax.set(xlabel="exit layer", ylabel="top-1 agreement with last layer", ylim=(0, 1),
           title="Teacher-forced exit agreement")
    ax.grid(alpha=0.3)
    files.append(out / "agreement.png")
    fig.savefig(files[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)
    measures = ["max_prob", "softmax_margin", "entropy", "hidden_cosine"]
    fig, axes = plt.subplots(len(measures), 1, figsize=(10, 2.6 * len(measures)), sharex=True)
    layers = sorted(tf["layer"].unique())
    for ax, m in zip(axes, measures):
        for flag, colour, shift in ((True, "tab:green", -0.2), (False, "tab:red", 0.2)):
            data = [tf[(tf["layer"] == d) & (tf["agrees"] == flag)][m].to_numpy() for d in layers]
            pos = [d + shift for d, x in zip(layers, data) if len(x)]
            data = [x for x in data if len(x)]
            if data:
                bp = ax.boxplot(data, positions=pos, widths=0.35, showfliers=False, patch_artist=True)
                for b in bp["boxes"]:
                    b.set_facecolor(colour)
                    b.set_alpha(0.5)
        ax.set_ylabel(m)
        ax.grid(alpha=0.3)
    axes[0].set_title("Confidence by layer: green = exit agrees with the last layer, red = disagrees")
    axes[-1].set_xlabel("exit layer")
    axes[-1].set_xticks(layers)
    files.append(out / "confidence.png")
    fig.savefig(files[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 5))
    cmap = plt.get_cmap("viridis")
    shown = layers[::max(1, len(layers) // 6)]
    for i, d in enumerate(shown):
        c = cal[cal["layer"] == d]
        ax.plot(c["confidence"], c["agreement"], marker="o", color=cmap(i / max(1, len(shown) - 1)), label=f"L{d}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="max-prob confidence (bin mean)", ylabel="agreement with last layer", xlim=(0, 1), ylim=(0, 1),
           title="Calibration of exit confidence")
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    files.append(out / "calibration.png")
    fig.savefig(files[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)
    if stat is not None and metric and metric in stat:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(stat["layer"], stat[metric], marker="o")
        ax.set(xlabel="static exit layer", ylabel=metric, title=f"Static exit quality ({metric})")
        ax.grid(alpha=0.3)
        files.append(out / "static_exit.png")
        fig.savefig(files[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    return files


def static_layers_value(text: str):
    """--static_layers: auto, none, or a comma list of layers >= 1 (the upper bound, L, is checked once the model
    is loaded, before any work)."""
    if text in ("auto", "none"):
        return text
    try:
        layers = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, none or comma-separated layers, got {text!r}") from None
    if not layers:
        raise argparse.ArgumentTypeError(f"no layers in {text!r}")
    if layers[0] < 1:
        raise argparse.ArgumentTypeError(f"layers must be >= 1 (1..L), got {text!r}")
    return layers


def main(argv: Optional[list[str]] = None) -> int:
    from .cli import Parser, at_least, writable_folder
    from .tasks import get_task

    p = Parser(prog="python -m harness.diagnose", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="as in benchmark.py (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dataset", default="cnn_dm_summarization", help="task (default: %(default)s)")
    p.add_argument("--num_samples", type=at_least(1), default=8, help="examples, >= 1 (default: %(default)s)")
    p.add_argument("--exits", default="auto", help="trained exits: auto, none or a path (default: %(default)s)")
    p.add_argument("--device", default="auto", help="torch device (default: %(default)s)")
    p.add_argument("--dtype", default="auto", help="dtype (default: %(default)s)")
    p.add_argument("--max_tokens", type=at_least(1), default=128,
                   help="reference tokens scored per example (default: %(default)s)")
    p.add_argument("--static_layers", type=static_layers_value, default="auto",
                   help="layers for static-exit quality: comma list (1..L), auto = every 3rd and the last, none = skip "
                        "(default: %(default)s)")
    p.add_argument("--static_max_steps", type=at_least(1), default=48,
                   help="tokens generated per static exit (default: %(default)s)")
    p.add_argument("--measure_exit_layer", type=at_least(1), default=None,
                   help="also measure self_speculative at this exit layer (1..L-1) against autoregressive "
                        "(default: off)")
    p.add_argument("--out", default=None, help="output folder (default: results/diagnose/<dataset>)")
    a = p.parse_args(argv)
    task = get_task(a.dataset)
    out = writable_folder(a.out or f"results/diagnose/{a.dataset}", "--out")
    run = RunConfig(model=a.model, dataset=a.dataset, num_samples=a.num_samples, device=a.device, dtype=a.dtype,
                    exits=a.exits, fixed_length=True)
    import pandas as pd

    from .model import load_model
    from .runner import load_run_examples

    examples = load_run_examples(run, 42)  # data problems are one line before the model loads
    model = load_model(a.model, a.device, a.dtype, exits=a.exits)
    L = model.num_layers
    if a.measure_exit_layer is not None and not a.measure_exit_layer < L:
        raise UsageError(f"--measure_exit_layer must be in 1..{L - 1}")
    if isinstance(a.static_layers, list) and a.static_layers[-1] > L:
        raise UsageError(f"--static_layers {','.join(map(str, a.static_layers))}: each must be in 1..{L}")
    tf = teacher_forced(model, examples, a.max_tokens)
    if tf.empty:
        raise UsageError("no reference tokens to score in these examples")
    agree = tf.groupby("layer")["agrees"].agg(["mean", "size"]).rename(columns={"mean": "agreement", "size": "n"})
    agree.reset_index().to_csv(out / "agreement.csv", index=False)
    conf = tf.groupby(["layer", "agrees"])[["max_prob", "softmax_margin", "entropy", "hidden_cosine"]].describe()
    conf.to_csv(out / "confidence.csv")
    cal = calibration(tf)
    cal.to_csv(out / "calibration.csv", index=False)
    stat = None
    if a.static_layers != "none":
        grid = sorted({*range(3, L, 3), L}) if a.static_layers == "auto" else a.static_layers
        stat = static_exit(model, examples, task, grid, a.static_max_steps)
        stat.to_csv(out / "static_exit.csv", index=False)
    spec = speculation(model, tf, list(range(2, L - 1, 2)))
    if a.measure_exit_layer is not None:
        m = measured_speedup(run, model, a.measure_exit_layer, out, a.static_max_steps)
        spec = spec.merge(pd.DataFrame([m]), on="exit_layer", how="left")
    spec.to_csv(out / "speculation.csv", index=False)
    metric = {"rouge": "rougeL", "rouge_layerskip": "rougeL", "gsm8k_exact_match": "exact_match",
              "pass_at_1": "pass_at_1"}.get(task.metric)
    files = plots(tf, cal, stat, metric, out)
    print(agree.reset_index().to_markdown(index=False, floatfmt=".3f"))
    print(spec.to_markdown(index=False, floatfmt=".3f"))
    summary = {"dataset": a.dataset, "examples": len(examples), "scored_tokens": int(len(tf) / (L - 1)),
               "exits": model.exits.describe() if model.exits is not None else None}
    (out / "diagnose.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    print("wrote: " + ", ".join(str(f) for f in [out / "agreement.csv", out / "confidence.csv",
                                                  out / "calibration.csv", out / "speculation.csv", *files]))
    return 0


if __name__ == "__main__":
    from .cli import run_main

    sys.exit(run_main(main))

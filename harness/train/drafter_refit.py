"""--recipe drafter_refit: the trained drafters' recommendations fitted again where this runs, the modules unchanged.

A drafter's verdict is its fit: acceptance on held-out greedy continuations times the costs of a draft pass and a
verification pass, timed on the machine that trained it (train/drafters.fit_and_recommend). The costs belong to a
machine and a core: the shipped drafters were fitted on a CPU with AMX, before the draft path ran natively. This
recipe replays each drafter's fit with the options and data its provenance records (same held-out prompts, checked)
and times the costs here, then writes the new recommendation, keeping the previous fit's best settings under
`refitted_from`. Everything else in the artifact stays as it was.
"""
from __future__ import annotations

import dataclasses
import time

from ..config import UsageError
from . import recipe
from .common import TrainConfig, provenance
from .drafters import DrafterOptions, drafter_artifact, fit_and_recommend, verdict_line

METHODS = ("eagle", "kangaroo")


@recipe("drafter_refit")
def run(cfg: TrainConfig, _opts, model):
    """Re-fit the trained drafters' recommended settings with costs timed here (the modules are not retrained)."""
    t0 = time.perf_counter()
    art = drafter_artifact(cfg, model)
    done = []
    for method in METHODS:
        prov = art.provenance.get(method)
        if not prov or not isinstance(prov.get("fit"), dict):
            continue
        fields = {f.name for f in dataclasses.fields(DrafterOptions)}
        opts = DrafterOptions(**{k: v for k, v in (prov.get("options") or {}).items() if k in fields})
        made = prov.get("config") or {}
        fit_cfg = dataclasses.replace(cfg, **{k: made[k] for k in ("data", "holdout_docs", "max_docs", "seq_len")
                                              if k in made})
        old = prov["fit"]
        loop_key = f"self_speculative:drafter={method}"
        fit = fit_and_recommend(method, art, model, fit_cfg, opts, prov.get("training_data") or {},
                                {method: "keep", loop_key: "drop"})
        was, now = old.get("fitted_on") or {}, fit["fitted_on"]
        if was.get("documents") != now.get("documents"):
            raise UsageError(f"{method}: the replayed fit's held-out prompts differ from the recorded ones: retrain "
                             "with make drafters")
        fit["refitted_from"] = {"fitted_on": {k: was.get(k) for k in ("device", "dtype", "cost_context",
                                                                      "draft_pass_ms", "step_ms")},
                                **{key: (old.get(key) or {}).get("best") for key in (method, loop_key)}}
        prov["fit"] = fit
        prov["refit"] = provenance(cfg, time.perf_counter() - t0, {}, note="the fit replayed with the recorded "
                                   "options and held-out prompts, costs timed here; the module is unchanged")
        done.append(method)
        for key in (method, loop_key):
            print(f"{method}: {key}: {verdict_line(fit[key]['best'])}")
    if not done:
        raise UsageError("--output: this artifact holds no trained drafter with a fit to replay (eagle, kangaroo)")
    _, out = cfg.paths()
    art.save(out)
    print(f"drafter_refit: {', '.join(done)} re-fitted in {time.perf_counter() - t0:.0f} s into {out}")
    return art

"""Trained drafters (generators/kangaroo.py, generators/eagle.py; recipes train/kangaroo.py, train/eagle.py): lossless
on real prompts with the shipped modules and with untrained ones, their own K/V kept without holes, exact
speculative sampling, the recipes' artifact (a sibling file of the exit artifact), resume, and bad input."""
from __future__ import annotations

import collections
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.config import GenerationConfig, UsageError
from harness.generators import StopCondition, build_generator
from harness.trained_exits import SIBLING, ExitArtifact, shipped_artifacts

ROOT = Path(__file__).resolve().parents[1]
N = 32


@pytest.fixture(scope="module")
def shipped():
    from harness.model import load_model

    return load_model(None, "cpu", "float32", exits="auto")


@pytest.fixture(scope="module")
def untrained():
    """The model with an artifact holding untrained drafters (identity-initialised EAGLE head, Kangaroo adapter at
    layer 3): drafts are poor, verification must still keep every output equal to autoregressive's. In bf16 where
    the native batch-invariant kernels run (exact there too, and ~2.5x faster than fp32, which the shipped
    drafters' test covers), else fp32."""
    from harness import native_bf16
    from harness.generators.eagle import EagleHead
    from harness.generators.kangaroo import KangarooAdapter
    from harness.model import load_model

    m = load_model(None, "cpu", "bfloat16" if native_bf16.library() is not None else "float32", exits="none")
    art = ExitArtifact(model=ExitArtifact.identity(m))
    torch.manual_seed(0)
    for prefix, module in (("eagle.", EagleHead.like(m)), ("kangaroo.", KangarooAdapter.like(m, 3))):
        art.tensors.update({prefix + k: v.to(torch.float16) for k, v in module.state_dict().items()})
    art.tensors["kangaroo.exit_layer"] = torch.tensor(3)
    m.set_exits(art)
    return m


@pytest.fixture(scope="module")
def prompts(shipped):
    from harness.tasks import load_examples

    exs = load_examples("cnn_dm_summarization", 1) + load_examples("gsm8k", 1) + load_examples("xsum_summarization", 1)
    return [shipped.encode(e.prompt)[-300:] for e in exs]


SETTINGS = [("eagle", {}), ("kangaroo", {}), ("eagle", dict(num_speculations=3, draft_threshold=0.4)),
            ("self_speculative", dict(drafter="kangaroo")), ("hybrid_speculative", dict(drafter="eagle")),
            ("hybrid_speculative", dict(drafter="kangaroo"))]


def _run(m, name, kw, ids, n=N):
    return build_generator(m, GenerationConfig(generation_strategy=name, **kw)).generate(
        ids, StopCondition(m, n, eos_ids=set()))


@pytest.mark.parametrize("which", ["shipped", "untrained"])
def test_trained_drafters_are_lossless_on_real_prompts(request, prompts, which):
    m = request.getfixturevalue(which)
    if which == "shipped" and "eagle.fc.weight" not in (m.exits.tensors if m.exits else {}):
        pytest.skip("no shipped drafters")
    for ids in prompts:
        ref = build_generator(m, GenerationConfig()).generate(ids, StopCondition(m, N, eos_ids=set()))
        accepted = collections.Counter()
        for name, kw in SETTINGS:
            res = _run(m, name, kw, ids)
            assert res.tokens == ref.tokens, (which, name, kw)
            accepted[name] += res.accepted
        if which == "shipped":  # trained drafters' drafts are accepted: the crop and catch-up paths ran
            assert accepted["eagle"] > 0 and accepted["kangaroo"] > 0, accepted


def test_draft_caches_follow_the_trunk_and_refuse_holes(untrained, prompts):
    """After a generation each draft module's K/V covers exactly the verified positions before the last token (EAGLE:
    from position 1), and feeding a position after a hole raises."""
    m, ids = untrained, prompts[0]
    for name in ("eagle", "kangaroo"):
        g = build_generator(m, GenerationConfig(generation_strategy=name))
        res = g.generate(ids, StopCondition(m, N, eos_ids=set()))
        (proposer,) = g.proposers
        trunk = m.cache_length(g.last_cache, 0)
        assert trunk <= len(ids) + len(res.tokens)
        if name == "eagle":
            assert proposer.kv.length + sum(len(t) for _, t in proposer.pending) <= len(ids) + len(res.tokens) - 1
            with pytest.raises(RuntimeError, match="cache holds"):
                proposer.run_head(m.norm(torch.zeros(1, 1, m.hidden_size)), [1], proposer.kv.length + 5)
        else:
            assert proposer.kv.length <= len(ids) + len(res.tokens)
            with pytest.raises(RuntimeError, match="cache holds"):
                proposer.run_adapter(torch.zeros(1, 1, m.hidden_size), proposer.kv.length + 2)


@pytest.mark.parametrize("name", ["eagle", "kangaroo"])
def test_speculative_sampling_with_trained_drafters_keeps_the_model_distribution(shipped, name):
    """Chi-square over (first, second) token pairs with top-k 3 sampling: the second token is the first one a draft
    can give (three tokens are asked for, so the step after the prefill's token has room for one draft); its pairs
    must follow the full model's p(first) p(second | first), on the harness's own core (in bf16 its logits and
    transformers' differ by an ulp: p(28 | .. 7268) is 0.158 here and 0.129 there). The shipped drafters, so that
    drafts are both kept and rejected (the untrained EAGLE head's are always rejected)."""
    m = shipped
    ids = m.encode("The capital of France is Paris. The capital of Italy is")
    cfg = GenerationConfig(generation_strategy=name, sample=True, top_k=3, num_speculations=2, seed=7)
    g = build_generator(m, cfg)
    trials, pairs, drafted, accepted = 300, collections.Counter(), 0, 0
    for _ in range(trials):
        res = g.generate(ids, StopCondition(m, 3, eos_ids=set()))
        pairs[tuple(res.tokens[:2])] += 1
        drafted, accepted = drafted + res.drafted, accepted + res.accepted
    assert sum(1 for _ in pairs) >= 2
    assert drafted >= trials and 0 < accepted < drafted, (drafted, accepted)  # drafts made, some kept, some not

    def top3(seq):
        with torch.inference_mode():  # the full model through the harness's core, as autoregressive decoding reads it
            h = m.run_layers(m.embed(torch.tensor([seq])), 0, m.num_layers, m.new_cache(), 0)
            logits = m.exit_logits(h)[0, -1].float()
        v, i = logits.topk(3)
        return dict(zip(i.tolist(), torch.softmax(v, -1).tolist()))

    p1 = top3(ids)
    expected = {(a, b): trials * pa * pb for a, pa in p1.items() for b, pb in top3(ids + [a]).items()}
    assert set(pairs) <= set(expected)
    cells = [k for k, e in expected.items() if e >= 5]
    rest = trials - sum(expected[k] for k in cells)
    chi2 = sum((pairs[k] - expected[k]) ** 2 / expected[k] for k in cells)
    if rest >= 5:
        got = trials - sum(pairs[k] for k in cells)
        chi2 += (got - rest) ** 2 / rest
    dof = len(cells) - (0 if rest < 5 else -1) - 1
    critical = (10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12, 27.88, 29.59)  # p = 0.001, dof 1..10
    assert chi2 < critical[max(dof, 1) - 1], (chi2, dof, pairs, expected)


def test_bad_input_gets_one_line(untrained):
    from harness.model import load_model

    bare = load_model(None, "cpu", "float32", exits="none")
    with pytest.raises(UsageError, match="needs a trained EAGLE head"):
        build_generator(bare, GenerationConfig(generation_strategy="eagle"))
    with pytest.raises(UsageError, match="needs a trained Kangaroo adapter"):
        build_generator(bare, GenerationConfig(generation_strategy="self_speculative", drafter="kangaroo"))
    with pytest.raises(UsageError, match="trained at exit layer 3"):
        build_generator(untrained, GenerationConfig(generation_strategy="kangaroo", exit_layer=5))
    with pytest.raises(UsageError, match="--drafter 'nope'"):
        build_generator(untrained, GenerationConfig(generation_strategy="self_speculative", drafter="nope",
                                                    exit_layer=4))
    with pytest.raises(UsageError, match="does not apply to EAGLE"):
        build_generator(untrained, GenerationConfig(generation_strategy="eagle", exit_layer=4))
    out = subprocess.run([sys.executable, "benchmark.py", "--dataset", "gsm8k", "--num_samples", "1", "--max_steps",
                          "4", "--exits", "none", "--strategies", "eagle"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "EAGLE head" in out.stderr.strip().splitlines()[-1]


def test_sibling_drafters_file_is_read_with_its_artifact_and_saved_apart(tmp_path, untrained):
    main = ExitArtifact(model=ExitArtifact.identity(untrained), recommended={"calm": {"min_exit_layer": 6}})
    main.provenance["exit_adapters"] = {"seconds": 1}
    path = main.save(tmp_path / "m.safetensors")
    drafters = ExitArtifact(model=ExitArtifact.identity(untrained), tensors=dict(untrained.exits.tensors),
                            recommended={"eagle": {"num_speculations": 3}}, provenance={"eagle": {"seconds": 2}})
    drafters.save(tmp_path / ("m" + SIBLING))
    both = ExitArtifact.load(path)
    assert "eagle.fc.weight" in both.tensors and both.recommended["eagle"] == {"num_speculations": 3}
    assert both.describe()["drafters"]["path"].endswith("m" + SIBLING)
    both.recommended["calm"] = {"min_exit_layer": 8}
    both.save(path)  # a recipe writing the main artifact must not copy the drafters into it
    alone = ExitArtifact.load_file(path)
    assert "eagle.fc.weight" not in alone.tensors and "eagle" not in alone.recommended and "eagle" not in \
        alone.provenance and alone.recommended["calm"] == {"min_exit_layer": 8}
    assert [p.name for p in shipped_artifacts()] == [p.name for p in shipped_artifacts() if not p.name.endswith(SIBLING)]


def test_recipes_write_a_drafters_artifact_fit_it_and_resume(tmp_path):
    """eagle then kangaroo into one sibling-style file (tiny settings), the eagle run resumed from its checkpoint."""
    shutil.copy(next(iter(shipped_artifacts())), tmp_path / "exits.safetensors")
    out = tmp_path / ("exits" + SIBLING)
    common = ["--exits", str(tmp_path / "exits.safetensors"), "--output", str(out), "--seq_len", "64",
              "--batch_size", "2", "--max_docs", "40", "--eval_sequences", "2", "--log_every", "2", "--save_every", "2",
              "--drafter_text_sequences", "6", "--drafter_prompts", "2", "--drafter_tokens", "12",
              "--drafter_continuations", str(tmp_path / "cont.json"), "--drafter_fit_prompts", "2",
              "--drafter_fit_tokens", "8", "--drafter_fit_chain", "3", "--drafter_fit_dtype", "float32"]

    def train(*args):
        r = subprocess.run([sys.executable, "-m", "harness.train", *args, *common], cwd=ROOT, capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        return r

    train("--recipe", "eagle", "--steps", "2", "--work_dir", str(tmp_path / "eagle"))
    train("--recipe", "eagle", "--steps", "4", "--work_dir", str(tmp_path / "eagle"))
    steps = [json.loads(line)["step"] for line in (tmp_path / "eagle" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the second run resumed at step 2
    r = train("--recipe", "kangaroo", "--steps", "2", "--work_dir", str(tmp_path / "kangaroo"),
              "--kangaroo_exit_layer", "2")
    assert "greedy continuations from" in r.stdout  # reused, not regenerated
    art = ExitArtifact.load(tmp_path / "exits.safetensors")
    assert {"eagle", "kangaroo"} <= set(art.provenance) and art.sibling is not None
    assert int(art.tensors["kangaroo.exit_layer"]) == 2
    for recipe in ("eagle", "kangaroo"):
        prov = art.provenance[recipe]
        assert prov["seconds"] > 0 and prov["training_data"] and prov["fit"]["acceptance_by_position"]
        fitted = prov["fit"]["fitted_on"]["documents"]
        for source, rec in fitted.items():  # fit prompts are held-out documents, never trained on
            assert not set(rec["records"]) & set(prov["training_data"][source]["records"])
        assert set(art.recommended[recipe]) >= {"draft_vocab"}
    assert ExitArtifact.load_file(tmp_path / "exits.safetensors").provenance.keys().isdisjoint({"eagle", "kangaroo"})


def test_the_shipped_recommendations_are_what_their_fits_say():
    """The shipped drafters' recommendations: each key's best setting where its fit's interval lies above 1.0x,
    else only the draft vocabulary (don't speculate); a fit replayed by make drafter-refit keeps the earlier fit's
    best settings. The fit predicts the median prompt, as reports do, over at least 48 held-out prompts."""
    from harness.speedup_model import worth_speculating

    art = ExitArtifact.load(ROOT / "harness" / "data" / "exits" / ("SmolLM2-135M-Instruct" + SIBLING))
    for method in ("eagle", "kangaroo"):
        prov = art.provenance[method]
        fit = prov["fit"]
        if "refit" in prov:
            assert "drafter_refit" in prov["refit"]["command"]
            assert set(fit["refitted_from"]) >= {"fitted_on", method, f"self_speculative:drafter={method}"}
        assert fit["fitted_on"]["prompts"] >= 48
        for key in (method, f"self_speculative:drafter={method}"):
            best = fit[key]["best"]
            assert "pooled_speedup" in best  # the median rule (the pooled figure is kept beside it)
            rec = art.recommended[key]
            if worth_speculating(best["interval"]):
                assert rec["num_speculations"] == best["num_speculations"]
                assert rec["draft_threshold"] == best["draft_threshold"]
            else:
                assert set(rec) <= {"draft_vocab"}


def test_a_refit_needs_an_artifact_with_drafters(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "harness.train", "--recipe", "drafter_refit", "--exits", "none",
                           "--output", str(tmp_path / "none.safetensors"), "--work_dir", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 2 and "holds no trained drafter" in proc.stderr, proc.stderr[-500:]
    assert "Traceback" not in proc.stderr


def test_a_proposal_has_a_fixed_cost_and_a_cost_per_draft():
    """The fit's draft costs, hand-computed: proposals of 1..8 drafts at 0.5 + 0.6 n ms (one slow outlier among
    them) give 0.5 ms a proposal and 0.6 ms a draft; one length alone cannot separate them (all per draft)."""
    from harness.train.drafters import proposal_costs

    timed = [(0.5e-3 + 0.6e-3 * n, n) for n in range(1, 9) for _ in range(3)] + [(9e-3, 8)]
    fixed, per = proposal_costs(timed)
    assert fixed == pytest.approx(0.5e-3) and per == pytest.approx(0.6e-3)
    assert proposal_costs([(4.0e-3, 8), (4.4e-3, 8)]) == (0.0, pytest.approx(0.525e-3))
    assert proposal_costs([]) == (0.0, 0.0)


def test_the_fit_predicts_the_median_prompt_as_reports_do():
    """Hand-computed walk: unit costs (a step 1 s, a verification 1 s, drafting free), chains of 1 draft.
    One long continuation whose drafts are all right (speedup 2.0x) and two short ones whose drafts are all wrong
    (1.0x): pooled over positions the long one dominates (40 tokens in 24 s = 1.67x), but reports take the median
    of per-prompt ratios, and so does the prediction (1.0x), with its bootstrap over prompts."""
    from harness.train.drafters import ChainFit, interval, predict

    long = [[(True, 0.9)] for _ in range(32)]  # a right draft at every position: 2 tokens per verification
    short = [[(False, 0.9)] for _ in range(4)]
    fit = ChainFit(chains=[long, short, short], draft_pass=0.0, verify={1: 1.0, 2: 1.0}, extra_last=0.0, step=1.0,
                   record={})
    r = predict(fit, 1, 0.0, "keep")
    assert r["predicted_speedup"] == pytest.approx(1.0)
    assert r["pooled_speedup"] == pytest.approx(40 / 24)  # 32 + 4 + 4 tokens in 16 + 4 + 4 verifications
    lo, hi = interval(fit, 1, 0.0, "keep")
    assert lo == pytest.approx(1.0) and hi == pytest.approx(2.0)


def test_the_loss_leaves_out_the_prompts_as_eagles_loss_mask_does():
    """--drafter_loss_on responses trains on a continuation's new tokens only: positions after the prompt, in the
    padded layout (sequences cut to their last `length` tokens, from column 0), never on padding."""
    from harness.train.drafters import generated_positions, padded

    seqs, prompts = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6, 7, 8]], [3, 5]
    ids, real = padded(seqs, 6, 0)
    new = generated_positions(seqs, prompts, 6)
    assert new.tolist() == [[False, False, False, True, True, False],  # tokens 4, 5; column 5 is padding
                            [False, False, False, True, True, True]]  # cut by 2: tokens 6, 7, 8 at columns 3-5
    assert ids[1].tolist() == [3, 4, 5, 6, 7, 8] and bool((new & ~real).sum() == 0)

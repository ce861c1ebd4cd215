"""FREE (Bae et al., EMNLP 2023, arXiv 2310.05424), for decoder-only models.

Shallow-deep module: every token runs the first S = --shallow_exit_layer layers; if the shallow exit's
confidence (max softmax probability by default) reaches the threshold the token is emitted from there,
otherwise the remaining layers run.
Synchronized parallel decoding: tokens that exited shallow are queued with their layer-S hidden states;
the next token that goes deep carries them through layers S..L-1 in the same pass, which fills their
deep K/V exactly (no approximation, no holes: deep layers are only read by deep tokens, and every deep
pass starts at the oldest queued position).
Adaptive threshold (--adaptive_threshold): the parallel pass also yields the deep model's prediction
for each queued position, i.e. (shallow confidence, shallow == deep) pairs at no extra layer cost; a
Beta mixture fitted online on them sets the threshold (exits.BetaMixtureThreshold).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..config import UsageError
from ..exits import BetaMixtureThreshold
from .base import GenerationResult, Generator, Output, StopCondition, TokenCallback, register
from .probe import TokenProbe

DEFAULT_THRESHOLD = 0.9


@register("free")
class Free(Generator):
    """FREE: shallow-deep exit with synchronized parallel decoding and optional adaptive threshold."""

    def validate(self) -> None:
        L = self.model.num_layers
        s = self.config.shallow_exit_layer
        if s is not None and not 1 <= s < L:
            raise UsageError(f"--shallow_exit_layer {s} is outside 1..{L - 1} for this model")
        if self.config.exit_layer is not None:
            raise UsageError("--exit_layer does not apply to free; use --shallow_exit_layer")
        if self.config.confidence == "hidden_state":
            raise UsageError("free needs a distribution-based --confidence (max_prob, softmax, contrastive, jsd_contrastive)")
        if not 0 < self.config.adaptive_tolerance < 1:
            raise UsageError(f"--adaptive_tolerance must be in (0, 1), got {self.config.adaptive_tolerance}")
        self.S = s or max(1, L // 4)
        self.measure = self.config.confidence or "max_prob"
        self.threshold = DEFAULT_THRESHOLD if self.config.threshold is None else self.config.threshold

    def knobs(self) -> dict:
        c = self.config
        return {"shallow_exit_layer": self.S, "confidence": self.measure, "threshold": self.threshold,
                "adaptive_threshold": c.adaptive_threshold,
                **({"adaptive_tolerance": c.adaptive_tolerance} if c.adaptive_threshold else {}),
                **c.reduction_knobs()}

    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[int], stop: StopCondition,
                 on_tokens: Optional[TokenCallback] = None) -> GenerationResult:
        m, L, S = self.model, self.model.num_layers, self.S
        adaptive = BetaMixtureThreshold(self.threshold, self.config.adaptive_tolerance) \
            if self.config.adaptive_threshold else None
        cache, token, t0, t1 = self.prefill(prompt_ids)
        out, pos, conf_flops, prev_conf = Output(stop, on_tokens), len(prompt_ids), 0.0, None
        queue: list[tuple[torch.Tensor, float, int]] = []  # (layer-S state, confidence, shallow token)
        self.thresholds = []  # threshold in force at each decoded token (inspection)
        depth = L
        while not out.add([token], [depth]):
            probe = TokenProbe(m, self.config, S, prev_conf)
            h = m.embed(self.ids([token]))
            if self.measure in ("contrastive", "jsd_contrastive"):  # amateur layers need their states
                for layer in range(S):
                    h = probe.hidden[layer + 1] = m.run_layers(h, layer, layer + 1, cache, pos)
            else:
                h = probe.hidden[S] = m.run_layers(h, 0, S, cache, pos)
            conf = probe.confidence(S, self.measure)
            threshold = adaptive.value if adaptive else self.threshold
            self.thresholds.append(threshold)
            if conf >= threshold:
                token = probe.pick(S, self.sampler)
                queue.append((h, conf, token))
                depth = S
            else:  # deep token: carry every queued position through the deep layers in the same pass
                states = torch.cat([q[0] for q in queue] + [h], dim=1)
                deep = m.run_layers(states, S, L, cache, pos - len(queue))
                if adaptive and queue:
                    agree = m.exit_logits(deep[:, :-1]).argmax(-1)[0].tolist()
                    for (_, c, shallow_token), deep_token in zip(queue, agree):
                        adaptive.update(c, shallow_token == deep_token)
                token = self.sampler.pick(m.exit_logits(deep[:, -1:]))
                queue.clear()
                depth = L
            prev_conf = conf
            conf_flops += probe.confidence_flops
            pos += 1
        self.pending = len(queue)  # shallow positions whose deep K/V nobody needed before the end
        return self.result(out, t0, t1, self.clock(), confidence_flops=conf_flops)

"""What one model pass costs on this device: the cost curve over k new positions and the memory-bandwidth floor.

Speculative methods win when checking k drafted positions costs about as much as making one token. The curve
here is that cost, measured: one pass of k new positions after a cache of `context` positions, split into the
decoder layers and the head (final norm + lm_head), k = 1..16, medians of synchronized timings. The floor is what
reading the weights once costs at the copy bandwidth measured on the same machine: no decode step can be faster.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .model import synchronize
from .speedup_model import interleaved_medians, median_time


@dataclass
class CostPoint:
    """One k of the curve (seconds, medians)."""

    k: int  # new positions in the pass
    layers: float  # all decoder layers over the k positions, after `context` cached positions
    head: float  # final norm + full lm_head over the k positions
    total: float  # layers + head, timed together (one pass)


@dataclass
class CostCurve:
    """The cost curve of one model on one device and dtype."""

    device: str  # where it was measured
    dtype: str  # the weights' dtype
    context: int  # cached positions before the pass
    points: list[CostPoint] = field(default_factory=list)  # k = 1..max_k
    weight_bytes: int = 0  # bytes of every parameter (a decode step reads each once)
    bandwidth: float = 0.0  # bytes/s: the faster of a large copy (read + write counted) and a large reduction (read)
    floor: float = 0.0  # weight_bytes / bandwidth: seconds no decode step can beat
    copy_bandwidth: float = 0.0  # bytes/s of the copy alone
    read_bandwidth: float = 0.0  # bytes/s of the reduction alone (a decode step only reads weights)

    def ratio(self, k: int) -> float:
        """Cost of a k-position pass relative to a one-position pass (1.0 = verification is free)."""
        by_k = {p.k: p.total for p in self.points}
        return by_k[k] / by_k[1]

    def as_dict(self) -> dict:
        d = asdict(self)
        d["step_over_floor"] = self.points[0].total / self.floor if self.floor else None
        d["ratio"] = {p.k: self.ratio(p.k) for p in self.points}
        return d


def read_bandwidth(device: torch.device, megabytes: int = 256, reps: int = 5) -> float:
    """Bytes/s read by summing a large buffer on `device` (what streaming the weights through a kernel costs)."""
    src = torch.ones(megabytes * (1 << 20) // 4, dtype=torch.float32, device=device)
    return src.numel() * src.element_size() / median_time(lambda: src.sum(), lambda: synchronize(device), reps)


def copy_bandwidth(device: torch.device, megabytes: int = 256, reps: int = 5) -> float:
    """Bytes/s moved by copying a large buffer on `device` (read + write both counted, as a weight read is one)."""
    n = megabytes * (1 << 20) // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), lambda: synchronize(device), reps)
    return 2 * src.numel() * src.element_size() / seconds


@torch.inference_mode()
def measure(model, context: int = 400, max_k: int = 16, reps: int = 7, ks=None, quick: bool = False) -> CostCurve:
    """Time one pass over k new positions (layers, head, both) after `context` cached positions.

    Interleaved: each repetition times every k in turn (after one untimed warm-up of each), so that a machine
    whose speed drifts during the measurement moves all k alike and the ratios between them stay true.
    `quick` (the runner's per-invocation curve): the layers are not timed alone but taken as full pass - head."""
    m = model
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, m.vocab_size, (1, context), generator=gen).to(m.device)
    cache = m.new_cache()
    m.run_layers(m.embed(ids), 0, m.num_layers, cache, 0)
    ks = list(ks or range(1, max_k + 1))
    parts: dict[int, dict] = {}
    for k in ks:
        x = torch.randint(0, m.vocab_size, (1, k), generator=gen).to(m.device)
        h0 = m.embed(x)
        rope = m.rope(h0, context)
        out: dict = {}

        def layers(h0=h0, rope=rope, out=out):
            out["h"] = m.run_layers(h0, 0, m.num_layers, cache, context, rope=rope)
            m.crop(cache, context)

        def head(out=out):
            m.exit_logits(out["h"])

        def both(layers=layers, head=head):
            layers()
            head()

        parts[k] = {"total": both, "head": head} if quick else {"total": both, "head": head, "layers": layers}
    t = interleaved_medians({(k, name): fn for k in ks for name, fn in parts[k].items()}, m.synchronize, reps)
    points = []
    for k in ks:
        total, head = t[(k, "total")], t[(k, "head")]
        layers = total - head if quick else t[(k, "layers")]
        points.append(CostPoint(k=k, layers=layers, head=head, total=total))
    m.reset_counters()
    weight_bytes = sum(p.numel() * p.element_size() for p in m.hf.parameters())
    copy, read = copy_bandwidth(m.device), read_bandwidth(m.device)
    bw = max(copy, read)
    return CostCurve(device=str(m.device), dtype=str(m.dtype).removeprefix("torch."), context=context,
                     points=points, weight_bytes=weight_bytes, bandwidth=bw, floor=weight_bytes / bw,
                     copy_bandwidth=copy, read_bandwidth=read)

"""Decode passes replayed from CUDA graphs (`--core lean-graphs`): the lean forward without its launch overhead.

Why: on a GPU the embedded model's decode step is bound by the host issuing ~15 small kernels per layer, not by
the GPU (results/gpu_h200/speed.log: 18.9 ms per token on an H200, where streaming the weights takes 0.1 ms). A
graph replays a whole layer range's kernels in one launch. This is what the fast-core issue's `--compile` asked
for on a GPU; torch.compile itself measured little on the team's CPU (the issue's probe: 67 against 71 ms per
token in fp32), and CUDA graphs need no compiler.

A graph fixes every shape and address, so captured passes run on a K/V pool of fixed capacity: a pass writes its
new K/V at positions held in a device tensor, and each query attends over the pool's first `span` slots (a power
of two that holds the sequence) under a mask of the slots after its own position. The newest cache (`LayeredModel.new_cache`) borrows the pool; an older cache
still alive moves its K/V to private buffers first, and a cache that outgrows the pool runs eagerly. One graph per
(layer range, positions), captured on first use; prefill and passes over more than MAX_POSITIONS run eagerly.

The same static pass runs eagerly on a CPU (`GraphPool(capture=False)`): the tests check its arithmetic and its
bookkeeping there; only the capture itself needs a GPU (tests/test_gpu.py).
"""
from __future__ import annotations

import time
import weakref
from typing import Optional

import torch

MAX_POSITIONS = 16  # passes of up to this many new positions replay graphs: decode steps, drafts, verification
CAPACITY = 4096  # K/V slots in the pool (capped by the model's context); a longer sequence runs eagerly
MAX_GRAPHS = 512  # graphs kept per pool: a method calling many layer ranges (an exit per layer) runs eagerly past it


def span(length: int, capacity: int) -> int:
    """Slots a pass attends over: the power of two (256 at least) that holds `length` positions, within the pool.
    Attention costs what it reads, so a 700-token sequence reads 1024 slots, not the pool's 4096; each span is
    its own graph (at most 5 per layer range and pass size)."""
    return min(capacity, max(256, 1 << (length - 1).bit_length()))


class GraphPool:
    """A fixed-capacity K/V pool for every layer, and the graphs captured over it."""

    def __init__(self, lean, capacity: int, device: torch.device, capture: bool = True):
        first = lean.layers[0]
        kv_heads = first.kv_dim // first.head_dim
        self.capacity, self.device, self.capture = capacity, device, capture
        # zeros, not empty: a masked slot still multiplies its V by a zero weight, and 0 * NaN would be NaN
        self.k = [torch.zeros(1, kv_heads, capacity, first.head_dim, dtype=lean.dtype, device=device)
                  for _ in lean.layers]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.lean = lean
        self.owner: Optional[weakref.ref] = None  # the cache whose K/V live in the pool
        self.graphs: dict = {}  # (start, stop, positions) -> _Captured
        self.captures, self.capture_seconds, self.replays = 0, 0.0, 0

    # -- the pool's tenant ----------------------------------------------------------
    def adopt(self, cache) -> None:
        """Give the pool to a new, empty cache; the previous owner, if still alive, keeps private copies."""
        old = self.owner() if self.owner is not None else None
        if old is not None and old is not cache:
            for i, kv in enumerate(old.layers):
                if i < len(self.k) and kv.k is self.k[i]:
                    kv.k, kv.v = kv.k[:, :, :kv.length].clone(), kv.v[:, :, :kv.length].clone()
        for i in range(len(self.k)):
            kv = cache.layer(i)
            kv.k, kv.v, kv.length = self.k[i], self.v[i], 0
        self.owner = weakref.ref(cache)

    def serves(self, cache, start: int, stop: int, pos: int, q: int, batch: int) -> bool:
        """Whether a pass over layers [start, stop) at positions pos..pos+q-1 can run from the pool."""
        if batch != 1 or q > MAX_POSITIONS or pos + q > self.capacity or self.owner is None \
                or self.owner() is not cache:
            return False
        if len(self.graphs) >= MAX_GRAPHS and (start, stop, q, span(pos + q, self.capacity)) not in self.graphs:
            return False  # each graph holds its own memory: no more of them
        return all(i < len(cache.layers) and cache.layers[i].k is self.k[i] for i in range(start, stop))

    # -- passes ----------------------------------------------------------------------
    def run(self, h: torch.Tensor, start: int, stop: int, cos: torch.Tensor, sin: torch.Tensor,
            pos: int) -> torch.Tensor:
        """Layers [start, stop) over h's positions from `pos` (the caller moves the cache lengths)."""
        q = h.shape[1]
        key = (start, stop, q, span(pos + q, self.capacity))
        got = self.graphs.get(key)
        if got is None:
            t0 = time.perf_counter()
            got = _Captured(self, start, stop, key[3], h, cos, sin, pos)
            self.graphs[key] = got
            self.captures += 1
            self.capture_seconds += time.perf_counter() - t0
        self.replays += 1
        return got(h, cos, sin, pos)

    def describe(self) -> dict:
        return {"cuda_graphs": f"passes of <= {MAX_POSITIONS} positions replayed (at most {MAX_GRAPHS} graphs); "
                               f"{self.capacity} K/V slots, "
                               "attended over the power of two that holds the sequence; captures are counted per "
                               "generation (graph_captures, graph_capture_seconds) and left out of decode time"}


class _Captured:
    """One layer range at one pass size: static inputs, and the graph (or, uncaptured, the eager static pass)."""

    def __init__(self, pool: GraphPool, start: int, stop: int, slots: int, h, cos, sin, pos: int):
        self.pool, self.start, self.stop = pool, start, stop
        q = h.shape[1]
        self.h, self.cos, self.sin = h.clone(), cos.clone(), sin.clone()
        self.pos = torch.full((1,), pos, dtype=torch.long, device=pool.device)
        self.offsets = torch.arange(q, device=pool.device)
        self.every_slot = torch.arange(slots, device=pool.device)  # the first `slots` of the pool are attended
        self.groups = pool.lean.layers[0].groups
        self.graph = None
        if not pool.capture:
            return
        # Warm-up passes write K/V at pos..pos+q-1 only: slots the real pass overwrites next (the caller checked
        # that every layer in the range holds exactly the positions before pos). The model's GPU is made current:
        # a capture records on the current device (a torchrun rank's model may sit on another).
        with torch.cuda.device(pool.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._pass()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._pass()
            torch.cuda.synchronize()  # the warm-up's work is part of the capture's cost, not the next pass's

    def _pass(self) -> torch.Tensor:
        slots = self.pos + self.offsets
        # (1, 1, groups * q, slots): row g*q+i is query i of a K/V head's g-th query head (forward_static's grouping)
        masked = (self.every_slot.unsqueeze(0) > slots.unsqueeze(1)).repeat(self.groups, 1)[None, None]
        n = self.every_slot.shape[0]
        h = self.h
        for i in range(self.start, self.stop):
            h = self.pool.lean.layers[i].forward_static(h, self.pool.k[i][:, :, :n], self.pool.v[i][:, :, :n],
                                                        self.cos, self.sin, slots, masked)
        return h

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int) -> torch.Tensor:
        self.h.copy_(h)
        self.cos.copy_(cos)
        self.sin.copy_(sin)
        self.pos.fill_(pos)
        if self.graph is None:
            return self._pass()
        with torch.cuda.device(self.pool.device):  # replayed on the stream of the GPU it was captured on
            self.graph.replay()
            return self.out.clone()  # the graph's output buffer is rewritten by its next replay

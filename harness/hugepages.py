"""Memory for the weights a CPU decode step streams, backed by 2 MiB pages.

A one-position step reads every weight once, so it is bound by how fast memory streams them. On 4 KiB pages that
stream stalls at every page: a 212 MB read ran at 17 GB/s with 2 threads here and at 34 GB/s from memory advised
into 2 MiB pages (AMX tile loads: 14.5 against 25 GB/s). Linux gives 2 MiB pages to anonymous memory advised with
MADV_HUGEPAGE when transparent huge pages are "madvise" or "always" (/sys/kernel/mm/transparent_hugepage/enabled);
where they are "never", or off Linux, the memory is ordinary and nothing else changes.
"""
from __future__ import annotations

import mmap
from typing import Sequence

import torch

HUGE = 2 << 20  # bytes in one huge page (x86-64)
ALIGN = 64  # each tensor of an arena starts on a cache line


def empty(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of `nbytes` starting on a 2 MiB boundary, in a private anonymous mapping advised into huge
    pages before it is touched (so that each page is huge when first written). The mapping lives while any view
    of the tensor does."""
    size = -(-max(nbytes, 1) // HUGE) * HUGE
    mm = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            mm.madvise(advice)
        except OSError:  # a kernel without transparent huge pages: ordinary pages
            pass
    base = torch.frombuffer(mm, dtype=torch.uint8)
    start = -base.data_ptr() % HUGE
    return base[start:start + nbytes]


def _padded(t: torch.Tensor) -> int:
    """Bytes `t` takes in an arena: its own, rounded up to a cache line."""
    return -(-t.numel() * t.element_size() // ALIGN) * ALIGN


def _slots(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Uninitialised views shaped like `tensors`, one after another (each on a cache line) in one huge-page arena;
    its pages are only allocated as they are written."""
    sizes = [_padded(t) for t in tensors]
    arena, at, out = empty(sum(sizes)), 0, []
    for t, size in zip(tensors, sizes):
        out.append(arena[at:at + t.numel() * t.element_size()].view(t.dtype).view(t.shape))
        at += size
    return out


def copies(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Contiguous copies of CPU `tensors`, one after another in one huge-page arena (one mapping, so that only its
    last page can be partly used)."""
    out = _slots(tensors)
    for view, t in zip(out, tensors):
        view.copy_(t)
    return out


def rehome_parameters(module: torch.nn.Module, smallest: int = 1 << 16) -> int:
    """Moves the module's contiguous CPU parameters of at least `smallest` bytes into one huge-page arena, in place
    (p.data), so that every core and every product streams them from 2 MiB pages. Each Parameter moves once (tied
    ones stay tied), and each old buffer is freed as its copy lands, so memory does not double. Returns the bytes
    moved."""
    params = [p for p in module.parameters() if p.device.type == "cpu" and p.is_contiguous()
              and p.numel() * p.element_size() >= smallest]
    if not params:
        return 0
    with torch.no_grad():
        for p, view in zip(params, _slots(params)):
            view.copy_(p.data)
            p.data = view
    return sum(_padded(p) for p in params)


def backed(tensors: Sequence[torch.Tensor]) -> tuple[int, int]:
    """(bytes in huge pages of the mappings that hold `tensors`, at most their bytes; their bytes), from
    /proc/self/smaps; (0, bytes) where that cannot be read."""
    ptrs = {t.data_ptr() for t in tensors}
    total = sum(t.numel() * t.element_size() for t in tensors)
    huge = 0
    try:
        lines = open("/proc/self/smaps").read().splitlines()
    except OSError:
        return 0, total
    inside = False
    for line in lines:
        head = line.split()[0] if line else ""
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = any(lo <= p < hi for p in ptrs)
        elif inside and head == "AnonHugePages:":
            huge += int(line.split()[1]) * 1024
    return min(huge, total), total

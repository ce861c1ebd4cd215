"""harness.hugepages: the weight arenas a CPU decode step streams are exact copies, start on a 2 MiB boundary, and
are backed by huge pages where Linux offers them for advised memory."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from harness import hugepages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_mode() -> str:
    try:
        return re.search(r"\[(\w+)\]", THP.read_text()).group(1)
    except (OSError, AttributeError):
        return "absent"


def test_copies_are_exact_aligned_and_independent():
    g = torch.Generator().manual_seed(0)
    originals = [torch.randn(3072, 576, generator=g).bfloat16(), torch.randn(7, 5, generator=g),
                 torch.randint(0, 9, (1001,), generator=g)]
    got = hugepages.copies(originals)
    assert got[0].data_ptr() % hugepages.HUGE == 0
    for t, c in zip(originals, got):
        assert c.dtype == t.dtype and c.shape == t.shape and c.is_contiguous() and torch.equal(c, t)
        assert c.data_ptr() % hugepages.ALIGN == 0 and c.data_ptr() != t.data_ptr()
    got[1].zero_()  # views of one arena that do not overlap
    assert torch.equal(got[0], originals[0]) and torch.equal(got[2], originals[2])


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason=f"transparent huge pages: {_thp_mode()}")
def test_an_arena_is_backed_by_huge_pages_where_linux_offers_them():
    t = hugepages.copies([torch.ones(4 * hugepages.HUGE // 2, dtype=torch.bfloat16)])[0]
    huge, total = hugepages.backed([t])
    assert total == 4 * hugepages.HUGE
    assert huge >= hugepages.HUGE  # compaction may fail for some pages on a busy machine, not for all of them
    assert hugepages.backed([torch.ones(10)])[1] == 40


def test_rehome_parameters_moves_each_parameter_once_and_keeps_ties_and_values():
    emb = torch.nn.Embedding(4096, 64)
    head = torch.nn.Linear(64, 4096, bias=False)
    head.weight = emb.weight  # tied, as the embedded model's head is
    norm = torch.nn.LayerNorm(64)  # under the size floor: stays where it is
    model = torch.nn.ModuleDict({"emb": emb, "head": head, "norm": norm})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    norm_ptr = norm.weight.data_ptr()
    moved = hugepages.rehome_parameters(model)
    assert moved == 4096 * 64 * 4
    assert head.weight is emb.weight and emb.weight.data_ptr() % hugepages.HUGE == 0
    assert norm.weight.data_ptr() == norm_ptr
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    x = torch.randn(3, 64)
    assert torch.equal(head(x), x @ before["emb.weight"].T)

"""RegMean's Gram sums of recent clusters, kept so that a cluster one or two members away from a live one updates the
sum instead of forming it again (pure tensor code, no PEFT).

Where a cluster's members have more layer-input rows than the input width, RegMean forms the in x in sum
Σ_j F_j^T·F_j of its members' Grams (`regmean.RegMeanSystem`): M·in² multiply-adds for M rows. The D2C search
proposes clusters that differ from a current one by a member (the paper's move: c' + t), and scores the current ones
again and again; their sums differ by that member's Gram alone. So every live merge keeps its sums here, and a new
cluster starts from the live cluster it shares most rows with: one member's rows instead of every member's (about 8x
fewer products for clusters of eight). Only the off-diagonal entries come from the updated sum: `RegMeanSystem`
replaces the diagonal with the exact one of its members, and a sum is formed afresh after `max_updates` additions
and subtractions, so float32 rounding does not build up along a long search.

The sums are unweighted; `RegMeanSystem` scales them by the members' common weight (RegMean's merge weights are
equal unless tuned, and a tuned set of weights is never served from here). May import the merge module `regmean`.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass

import torch

from .regmean import LayerInput, gram


@dataclass
class _Sum:
    """Σ_j F_j^T·F_j over `factors` (id -> factor, kept alive so the ids stay theirs), after `updates` additions
    or subtractions since it was formed."""

    factors: dict[int, LayerInput]
    total: torch.Tensor
    updates: int
    owners: int = 0

    @property
    def nbytes(self) -> int:
        return self.total.numel() * self.total.element_size()


class GramSums:
    """The Gram sums Σ_j F_j^T·F_j of the layer inputs of live merges, each kept for the merge (its owner) that
    needed it until `retain` drops it.

    A sum is identified by its factors' identities (the layer-input tensors the merger holds), so it needs no layer
    names or folds: the sum of another cluster's inputs of the same layer input shares most of its factors, and the
    inputs of other layers share none.

    Args:
        max_bytes (`int`): The most bytes the kept sums may hold together; a sum that would exceed it is used but not
            kept.
        max_updates (`int`, defaults to 16): A sum reached through more member additions and subtractions than this
            is formed afresh instead.

    Attributes:
        num_formed (`int`), num_updated (`int`): How many sums were formed from all their members' rows, and how many
            from a kept sum and the changed members' (for tests and benchmarks).

    Example:
        ```python
        >>> sums = GramSums(max_bytes=2**30)
        >>> s1 = sums.total([f1, f2, f3], owner="a")  # formed: F1^T F1 + F2^T F2 + F3^T F3
        >>> s2 = sums.total([f1, f2, f4], owner="b")  # updated from owner "a"'s: - F3^T F3 + F4^T F4
        ```
    """

    def __init__(self, max_bytes: int, max_updates: int = 16) -> None:
        self.max_bytes = max_bytes
        self.max_updates = max_updates
        self._owned: dict[Hashable, list[_Sum]] = {}
        self._by_factor: dict[int, dict[int, _Sum]] = {}  # factor id -> the kept sums over it (by their id)
        self._bytes = 0
        self.num_formed = 0
        self.num_updated = 0

    def total(
        self,
        inputs: Sequence[LayerInput],
        owner: Hashable,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Σ_j F_j^T·F_j of `inputs` (in x in, on `device` in `dtype`: the inputs' by default), kept for `owner`
        (a live merge's key).

        Starts from the kept sum that needs the fewest rows added and removed, when those are fewer than half of
        `inputs`' rows; else forms it from all of them. Callers must not modify the returned tensor.
        """
        device = device if device is not None else inputs[0].device
        dtype = dtype if dtype is not None else inputs[0].dtype
        wanted = {id(f): f for f in inputs}
        rows = sum(f.shape[-2] for f in inputs)
        candidates: dict[int, _Sum] = {}  # the kept sums over any of these factors: the same layer input's
        for i in wanted:
            candidates.update(self._by_factor.get(i, {}))
        best, best_rows = None, rows // 2
        for kept in candidates.values():
            if kept.total.device != device or kept.total.dtype != dtype:
                continue
            if kept.factors.keys() == wanted.keys():
                self._keep(owner, kept)
                return kept.total
            changed = [f for i, f in wanted.items() if i not in kept.factors]
            changed += [f for i, f in kept.factors.items() if i not in wanted]
            changed_rows = sum(f.shape[-2] for f in changed)
            if changed_rows < best_rows and kept.updates + len(changed) <= self.max_updates:
                best, best_rows = kept, changed_rows
        if best is None:
            total = gram(torch.cat([f.to(device=device, dtype=dtype) for f in inputs], dim=-2))
            new = _Sum(wanted, total, 0)
            self.num_formed += 1
        else:
            total = best.total.clone()
            added = [f for i, f in wanted.items() if i not in best.factors]
            removed = [f for i, f in best.factors.items() if i not in wanted]
            for sign, factors in ((1.0, added), (-1.0, removed)):
                if factors:
                    stacked = torch.cat([f.to(device=device, dtype=dtype) for f in factors], dim=-2)
                    total.addmm_(stacked.mT, stacked, alpha=sign)
            new = _Sum(wanted, total, best.updates + len(added) + len(removed))
            self.num_updated += 1
        self._keep(owner, new)
        return total

    def _keep(self, owner: Hashable, kept: _Sum) -> None:
        sums = self._owned.setdefault(owner, [])
        if any(s is kept for s in sums):
            return
        if not kept.owners:  # new to the cache
            if self._bytes + kept.nbytes > self.max_bytes:
                return
            self._bytes += kept.nbytes
            for i in kept.factors:
                self._by_factor.setdefault(i, {})[id(kept)] = kept
        kept.owners += 1
        sums.append(kept)

    def retain(self, owners: Collection[Hashable]) -> None:
        """Drop the sums kept for any owner not in `owners` (the merges still live)."""
        for owner in [o for o in self._owned if o not in owners]:
            for kept in self._owned.pop(owner):
                kept.owners -= 1
                if not kept.owners:
                    self._bytes -= kept.nbytes
                    for i in kept.factors:
                        del self._by_factor[i][id(kept)]
                        if not self._by_factor[i]:
                            del self._by_factor[i]

    def clear(self) -> None:
        """Drop every kept sum."""
        self._owned.clear()
        self._by_factor.clear()
        self._bytes = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the kept sums (each counted once, whatever the number of owners keeping it)."""
        return self._bytes

"""RegMean in factored form: the data-aware merge of LoRA updates (pure tensor functions, no PEFT, no model).

RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023) merges the
members' weights of one linear layer into the single update that best reproduces every member's outputs on that
member's own inputs:

    ΔW* = argmin_W  Σ_i w_i·‖X_i·W^T − X_i·ΔW_i^T‖²   ⇒   ΔW* = (Σ_i w_i·ΔW_i·G_i)·(Σ_j w_j·G_j)^-1

with G_i = X_i^T·X_i the Gram matrix of member i's layer inputs (here: the mean over the tokens of its task's few-shot
examples, so every task counts alike whatever its length). A member that does not adapt the layer has ΔW_i = 0 there
and still counts in the sum of Grams: the merge keeps its outputs unchanged as well as it can. Ten examples give
a few hundred tokens, fewer than the layer's input width, so every G_i is singular; RegMean's regulariser shrinks
the off-diagonal entries, G̃_i = α·G_i + (1 − α)·diag(G_i), which makes the sum positive definite.

Factored form: with ΔW_i = B_i·A_i (scaling folded into A_i), ΔW* = Σ_i B_i·(w_i·A_i·G̃_i·S^-1) with S = Σ_j w_j·G̃_j,
i.e. [B_1 .. B_k]·[Â_1; ..; Â_k] with Â_i = w_i·A_i·G̃_i·S^-1 (r_i x in): one Cholesky solve of the in x in matrix S
per layer, no out x in matrix formed or decomposed. Its rank is at most Σ r_i; `merge_methods.low_rank_svd` and
`truncate` give the best rank-r LoRA factors of it. With identical members (any Grams) ΔW* is the member itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .merge_methods import Pair, low_rank_svd, truncate, widest_dtype


def shrink_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """RegMean's regularised Gram α·G + (1 − α)·diag(G) (the diagonal kept, the rest scaled by α); batched."""
    diagonal = torch.diagonal(gram, dim1=-2, dim2=-1)
    return alpha * gram + (1 - alpha) * torch.diag_embed(diagonal)


# A member's Gram: one (..., in, in) tensor, or per layer of a batch of layers its (in, in) Gram, read one at a time
# (a run keeps one Gram per layer input: stacking every member's Grams for each merge would copy them all again).
Gram = torch.Tensor | Sequence[torch.Tensor]


def regmean_merge(
    pairs: Sequence[Pair | None],
    grams: Sequence[Gram],
    weights: Sequence[float],
    *,
    rank: int,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-`rank` LoRA factors `(A, B)` of RegMean's merge of one layer (or a batch of layers of one shape).

    Args:
        pairs (`Sequence`): Per member, `(B_i, A_i)` (..., out, r_i) and (..., r_i, in) with the scaling folded into
            A_i, or `None` for a member that does not adapt this layer (a zero update).
        grams (`Sequence`): Per member (the same order), the Gram matrix of its layer inputs: a (..., in, in) tensor,
            or for a batch of layers (pairs of shape (L, ...)) a sequence of L (in, in) tensors.
        weights (`Sequence[float]`): Per member, the weight of its term in the least-squares objective.
        rank (`int`): Rank of the merged factors.
        alpha (`float`): The share of the off-diagonal Gram entries kept (`shrink_off_diagonal`), in (0, 1]; below 1
            the solve is well posed whenever no input feature is always zero.

    Returns:
        `tuple[Tensor, Tensor]`: `(A, B)`, (..., rank, in) and (..., out, rank), on the inputs' device and in the
            sources' (widest) dtype; computed in float32 (float64 for float64 inputs), as `merge_methods.merge_updates`.

    Raises:
        ValueError: If no member adapts the layer.
    """
    if all(pair is None for pair in pairs):
        raise ValueError("RegMean needs at least one member that adapts the layer.")
    source_dtype = widest_dtype([t.dtype for pair in pairs if pair is not None for t in pair])
    dtype = torch.promote_types(source_dtype, torch.float32)  # no bf16 / fp16 Cholesky, QR or SVD in torch
    pairs = [None if pair is None else (pair[0].to(dtype), pair[1].to(dtype)) for pair in pairs]
    # S = Σ_j w_j·G̃_j is the regularised Σ_j w_j·G_j (the regulariser is linear): one shrink instead of k, all in
    # the one in x in buffer per layer (no member's G̃_i, nor a copy of S, is ever materialised).
    shape = grams[0].shape if isinstance(grams[0], torch.Tensor) else (len(grams[0]), *grams[0][0].shape)
    device = next(pair[0].device for pair in pairs if pair is not None)  # where the merge runs: the factors'
    total = torch.zeros(shape, dtype=dtype, device=device)
    for weight, gram in zip(weights, grams, strict=True):
        _add_gram(total, gram, weight)
    diagonal = torch.diagonal(total, dim1=-2, dim2=-1)
    kept = diagonal.clone()
    total.mul_(alpha)
    # A feature no member ever sees has a zero row and column: give it a unit diagonal (its solution is 0 anyway).
    diagonal.copy_(kept + (kept <= 0).to(dtype))
    factor = torch.linalg.cholesky(total)
    present = [(pair, gram, w) for pair, gram, w in zip(pairs, grams, weights, strict=True) if pair is not None]
    b = torch.cat([pair[0] for pair, _, _ in present], dim=-1)
    # Â_i^T = S^-1·(w_i·G̃_i·A_i^T); all members in one solve.
    right = torch.cat([w * _regularised_product(gram, pair[1].mT, alpha) for pair, gram, w in present], dim=-1)
    a = torch.cholesky_solve(right, factor).mT
    new_a, new_b = truncate(*low_rank_svd(b, a), rank)
    return new_a.to(source_dtype), new_b.to(source_dtype)


def _add_gram(total: torch.Tensor, gram: Gram, weight: float) -> None:
    """total += weight·G, in place, for a Gram tensor or a per-layer sequence of them."""
    if isinstance(gram, torch.Tensor):
        total.add_(gram.to(device=total.device, dtype=total.dtype), alpha=weight)
        return
    for entry, layer_gram in zip(total, gram, strict=True):
        entry.add_(layer_gram.to(device=total.device, dtype=total.dtype), alpha=weight)


def _regularised_product(gram: Gram, right: torch.Tensor, alpha: float) -> torch.Tensor:
    """G̃·R = α·G·R + (1 − α)·diag(G)·R, without forming G̃ (R is (..., in, r)); per layer for a sequence of Grams."""
    if not isinstance(gram, torch.Tensor):
        return torch.stack([_regularised_product(g, r, alpha) for g, r in zip(gram, right, strict=True)])
    gram = gram.to(device=right.device, dtype=right.dtype)
    return alpha * (gram @ right) + (1 - alpha) * torch.diagonal(gram, dim1=-2, dim2=-1)[..., :, None] * right

"""Rank-r merges of LoRA updates in update space: small pure tensor functions (no PEFT modules, no model).

Every function takes one layer's members as pairs `(B_i, A_i)` whose product is the member's full update
ΔW_i = B_i·A_i (out x in) with its LoRA scaling already folded into A_i (alpha/r, alpha/sqrt(r) for rslora, the
module's `rank_pattern` / `alpha_pattern`), and returns ordinary rank-`rank` LoRA factors `(A, B)` (rank x in and
out x rank) for a merged adapter whose scaling is 1 (`lora_alpha = r`, `use_rslora = False`): the merged adapter has
the rank, and so the file size, of one source adapter. Every tensor may carry leading batch dimensions (the same
module of every transformer block is merged in one call: one batched QR / SVD instead of thirty small ones).

`merge_updates` returns every type's result in one canonical form (`canonical_factors`): A = V^T (orthonormal rows),
B = U·S (orthogonal columns), directions sorted by singular value, largest first, numerically-zero ones set to zero.
Whatever cuts the factors by position (`engine.merge.rank_budget`'s allocation, export at a lower rank) then keeps the
best approximation of the merged update at that rank, whichever type made it.

No d x d matrix is ever formed or decomposed. The sum of k rank-r updates is [B_1 .. B_k]·[A_1; ..; A_k]; a QR of
both stacked factors and an SVD of the (kr x kr) core give its exact SVD (`low_rank_svd`), and the best rank-r
approximation follows by truncation (Eckart-Young). Element-wise methods (TIES) work in the coordinates of a small
shared basis instead of on the d x d entries, as KnOTS (Stoica et al., ICLR 2025) and Core Space merging
(Panariello et al., NeurIPS 2025) do; each docstring says which space it prunes in.

The types (`peft_d2c.combination_types.UPDATE_TYPES`), with the weights `merging.merge_weights_for` gives them:

- `core_ta`: task arithmetic Σ w_i·ΔW_i (w_i = 1/k, the mean), truncated to rank r. The same update as PEFT's
  `svd`, computed exactly and without a dense SVD.
- `core_ties`: TIES (Yadav et al., NeurIPS 2023) on the members' core matrices U^T·ΔW_i·V (w_i = 1), truncated.
- `knots_ties`: KnOTS-TIES: SVD of the concatenated updates [ΔW_1 .. ΔW_k] = U·S·[V_1^T .. V_k^T], TIES on the
  aligned coefficients V_i, merged update U·S·V^T, truncated.
- `tsv_m`: TSV-M (Gargiulo et al., CVPR 2025): each member keeps its top r/k singular directions, the kept left
  and right singular vectors are orthogonalised (Procrustes) and summed with their singular values: rank r by
  construction, no truncation.

Example:
    ```python
    >>> import torch
    >>> b, a = torch.randn(6, 2, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    >>> new_a, new_b = merge_updates("core_ta", [(b, a), (b, a)], [0.5, 0.5], rank=2)
    >>> torch.allclose(new_b @ new_a, b @ a)
    True
    ```
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge

Pair = tuple[torch.Tensor, torch.Tensor]  # (B, A): the update is B @ A, scaling folded into A; optional batch dims


def _significant(s: torch.Tensor, pairs: Sequence[Pair]) -> torch.Tensor:
    """Which singular values `s` (decreasing, of a matrix built from `pairs`) are not numerical zeros."""
    size = max(pairs[0][0].shape[-2], pairs[0][1].shape[-1])
    return s > s[..., :1] * _relative_tolerance(s, size)


def _relative_tolerance(s: torch.Tensor, size: int) -> float:
    """Singular values below this fraction of the largest are numerical zeros (KnOTS coefficients there are set to
    0): `size`·eps of the dtype the decomposition ran in (the rule of `numpy.linalg.matrix_rank`). A fixed 1e-10
    would sit below float32 resolution (eps 1.2e-7), so rounding noise in a zero direction would be divided by a
    tiny singular value and outweigh every real coefficient in TIES' magnitude pruning."""
    return size * torch.finfo(s.dtype).eps


def prune_magnitude(
    stacked: torch.Tensor, density: float, ndim: int = 2, sizes: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep the top int(density·n) magnitudes of every tensor made of the last `ndim` dimensions (PEFT's
    `merge_utils.prune(..., method="magnitude")`, applied to each slice of a batch at once). The threshold is the
    k-th largest magnitude (`kthvalue`, linear time; PEFT's `topk` sorts): the two differ only for magnitudes that
    tie exactly at the threshold, which are all kept here.

    `sizes` (one integer per slice, broadcastable to the batch dimensions) is the n of each slice when only that many
    of its entries are meaningful and the others are structural zeros (coordinates of numerically-zero directions):
    the density is then a share of the meaningful entries, as if the zeros were not there.
    """
    if density >= 1:
        return stacked
    flat = stacked.flatten(-ndim)
    magnitude = flat.abs()
    if sizes is None:
        keep = int(density * flat.shape[-1])
        if keep == 0:
            return torch.zeros_like(stacked)
        threshold = magnitude.kthvalue(flat.shape[-1] - keep + 1, dim=-1, keepdim=True).values
    else:
        keep = torch.floor(density * sizes.to(torch.float64)).long().expand(flat.shape[:-1])[..., None]
        ordered = magnitude.sort(dim=-1, descending=True).values
        threshold = ordered.gather(-1, (keep - 1).clamp(min=0))
        threshold = torch.where(keep > 0, threshold, torch.full_like(threshold, torch.inf))
    return torch.where(magnitude >= threshold, flat, torch.zeros_like(flat)).view_as(stacked)


def ties(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float,
    majority_sign_method: str = "total",
    ndim: int = 2,
    sizes: torch.Tensor | None = None,
) -> torch.Tensor:
    """TIES (Yadav et al., NeurIPS 2023) as PEFT's `merge_utils.ties` computes it (trim to the top `density`
    magnitudes of each member, elect a sign per entry, weighted disjoint mean), for batches of `ndim`-dim tensors;
    `sizes` as for `prune_magnitude`."""
    stacked = prune_magnitude(torch.stack(list(tensors), dim=0), density, ndim, sizes)
    mask = calculate_majority_sign_mask(stacked, method=majority_sign_method)
    values = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device).view(
        -1, *[1] * (stacked.ndim - 1)
    )
    return disjoint_merge(stacked * values, mask)


def _block_diag(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Batched `torch.block_diag` of square blocks (..., r_i, r_i)."""
    size = sum(block.shape[-1] for block in blocks)
    out = blocks[0].new_zeros(*blocks[0].shape[:-2], size, size)
    start = 0
    for block in blocks:
        end = start + block.shape[-1]
        out[..., start:end, start:end] = block
        start = end
    return out


def low_rank_svd(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD `(U, S, Vh)` of the product `b @ a` (out x m times m x in) without forming it.

    With b = Q_b·R_b and a^T = Q_a·R_a (reduced QR), b·a = Q_b·(R_b·R_a^T)·Q_a^T; the SVD of the small core
    R_b·R_a^T = U_c·S·V_c^T gives b·a = (Q_b·U_c)·S·(Q_a·V_c)^T. Cost O((out + in)·m² + m³) instead of O(out·in·min).

    Args:
        b (`torch.Tensor`): (..., out, m).
        a (`torch.Tensor`): (..., m, in).

    Returns:
        `tuple`: U (..., out, p), S (..., p), Vh (..., p, in), p = min(out, in, m), singular values decreasing.
    """
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.mT)
    u_c, s, vh_c = torch.linalg.svd(r_b @ r_a.mT, full_matrices=False)
    return q_b @ u_c, s, vh_c @ q_a.mT


def truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors `(A, B)` of the best rank-`rank` approximation of U·diag(S)·Vh (A = Vh_r, B = U_r·S_r, as in PEFT's
    `svd` merge), zero-padded to exactly `rank` rows / columns when the update has a smaller rank."""
    kept = min(rank, s.shape[-1])
    new_a = vh.new_zeros(*vh.shape[:-2], rank, vh.shape[-1])
    new_b = u.new_zeros(*u.shape[:-1], rank)
    new_a[..., :kept, :] = vh[..., :kept, :]
    new_b[..., :kept] = u[..., :kept] * s[..., None, :kept]
    return new_a, new_b


def canonical_factors(new_a: torch.Tensor, new_b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The canonical rank-`rank` LoRA factors `(A, B)` of the update `new_b @ new_a`: A = V^T, B = U·S from its exact
    SVD (`low_rank_svd`, no out x in matrix), singular values decreasing, so the first j directions are its best
    rank-j approximation (Eckart-Young). Directions whose singular value is a numerical zero of the small core
    (below rank·eps of the largest: rounding noise, e.g. of zero-padded factors) are set to zero in A and B alike,
    rather than kept as arbitrary unit vectors of zero weight.

    Args:
        new_a (`torch.Tensor`): (..., m, in).
        new_b (`torch.Tensor`): (..., out, m).
        rank (`int`): Rank of the returned factors (zero-padded when the update has a smaller rank).

    Returns:
        `tuple`: `(A, B)`, (..., rank, in) and (..., out, rank).
    """
    u, s, vh = low_rank_svd(new_b, new_a)
    real = s > s[..., :1] * _relative_tolerance(s, new_a.shape[-2])
    s = torch.where(real, s, torch.zeros_like(s))
    return truncate(u, s, vh * real[..., :, None].to(vh.dtype), rank)


def concat_left_svd(pairs: Sequence[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors U and singular values S of the horizontal concatenation [ΔW_1 .. ΔW_k] (KnOTS' shared
    basis of the members' column spaces, at most kr directions).

    [ΔW_1 .. ΔW_k] = [B_1 .. B_k]·blockdiag(A_1 .. A_k); with [B_1 .. B_k] = Q·R and A_i^T = Q_i·R_i, the
    concatenation is Q·(R·blockdiag(R_i^T))·blockdiag(Q_i)^T, and blockdiag(Q_i) has orthonormal columns, so the SVD of
    the kr x kr core R·blockdiag(R_i^T) gives U = Q·U_c and S. The basis depends only on the updates (not on how
    each one is split into B and A) and, up to signs, not on the order of the members.
    """
    q, r = torch.linalg.qr(torch.cat([b for b, _ in pairs], dim=-1))
    blocks = _block_diag([torch.linalg.qr(a.mT)[1].mT for _, a in pairs])
    u_c, s, _ = torch.linalg.svd(r @ blocks, full_matrices=False)
    return q @ u_c, s


def stack_right_basis(pairs: Sequence[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right singular vectors V (..., in, m) and singular values S of the vertical stack [ΔW_1; ..; ΔW_k]: the
    row-space counterpart of `concat_left_svd`, computed from blockdiag(B_i)·[A_1; ..; A_k] the same way."""
    q, r = torch.linalg.qr(torch.cat([a for _, a in pairs], dim=-2).mT)
    blocks = _block_diag([torch.linalg.qr(b)[1] for b, _ in pairs])
    _, s, vh_c = torch.linalg.svd(blocks @ r.mT, full_matrices=False)
    return q @ vh_c.mT, s


def task_arithmetic_rank_r(pairs: Sequence[Pair], weights: Sequence[float], *, rank: int) -> tuple[torch.Tensor, ...]:
    """Task arithmetic (Ilharco et al., ICLR 2023) at rank r: the best rank-`rank` approximation of Σ w_i·ΔW_i.

    Exact: Σ w_i·B_i·A_i = [B_1 .. B_k]·[w_1·A_1; ..; w_k·A_k], decomposed by `low_rank_svd`. When the members' total
    rank is at most `rank`, the sum is recovered exactly; otherwise the error (Frobenius) is the norm of the discarded
    singular values.

    Returns:
        `tuple`: `(A, B)`, (..., rank, in) and (..., out, rank).
    """
    b = torch.cat([b for b, _ in pairs], dim=-1)
    a = torch.cat([w * a for (_, a), w in zip(pairs, weights, strict=True)], dim=-2)
    return truncate(*low_rank_svd(b, a), rank)


def ties_in_core(
    pairs: Sequence[Pair], weights: Sequence[float], *, rank: int, density: float, majority_sign_method: str = "total"
) -> tuple[torch.Tensor, ...]:
    """TIES (Yadav et al., NeurIPS 2023) on the members' core matrices, then the best rank-`rank` approximation.

    The space it prunes in: with U the left singular vectors of [ΔW_1 .. ΔW_k] and V the right singular vectors of
    [ΔW_1; ..; ΔW_k] (`concat_left_svd`, `stack_right_basis`: the column and row spaces of all members, at most kr
    directions each, as in Core Space merging), every update is exactly ΔW_i = U·M_i·V^T with the small core
    M_i = U^T·ΔW_i·V (at most kr x kr). TIES (trim each M_i to its top `density` magnitudes, elect a sign per entry,
    disjoint weighted mean) merges the M_i into M; the merged update U·M·V^T is then truncated through the SVD of M.
    Each core entry couples one column-space and one row-space direction of the cluster, so pruning drops the weakest
    (direction, direction) interactions rather than d x d weight entries. Directions of numerically zero singular
    value (members that share directions) hold no core entries, and `density` is a share of the entries of the
    others. With density 1, k identical copies give the adapter back.

    Returns:
        `tuple`: `(A, B)`, (..., rank, in) and (..., out, rank).
    """
    u, s_u = concat_left_svd(pairs)
    v, s_v = stack_right_basis(pairs)
    rows, columns = _significant(s_u, pairs), _significant(s_v, pairs)
    mask = (rows[..., :, None] & columns[..., None, :]).to(u.dtype)  # numerically-zero directions hold no core
    cores = [mask * ((u.mT @ b) @ (a @ v)) for b, a in pairs]
    sizes = rows.sum(-1) * columns.sum(-1)
    merged = ties(cores, weights, density, majority_sign_method, sizes=sizes)
    u_m, s, vh_m = torch.linalg.svd(merged, full_matrices=False)
    return truncate(u @ u_m, s, vh_m @ v.mT, rank)


def knots_ties(
    pairs: Sequence[Pair], weights: Sequence[float], *, rank: int, density: float, majority_sign_method: str = "total"
) -> tuple[torch.Tensor, ...]:
    """KnOTS-TIES (Stoica et al., "Model merging with SVD to tie the KnOTS", ICLR 2025), truncated to rank r.

    The space it prunes in: the SVD of the concatenated updates [ΔW_1 .. ΔW_k] = U·S·[V_1^T .. V_k^T] aligns the
    members in one shared basis U of their column spaces; member i is ΔW_i = U·S·V_i^T, and its coefficient matrix
    V_i^T = S^-1·U^T·ΔW_i (m x in, m <= kr, one row per shared direction, normalised by its singular value) is what
    TIES trims, sign-elects and averages, as KnOTS does; m counts only the directions whose singular value is not a
    numerical zero, and `density` is a share of their coefficients. The merged update U·S·V^T (rank <= m) is then
    truncated to `rank` through a QR of V and an SVD of an m x m core. With density 1, k identical copies give the
    adapter back; at density < 1 they give the copy pruned in its own singular basis.

    Returns:
        `tuple`: `(A, B)`, (..., rank, in) and (..., out, rank).
    """
    u, s = concat_left_svd(pairs)
    significant = _significant(s, pairs)
    inverse = torch.where(significant, 1 / torch.where(significant, s, torch.ones_like(s)), torch.zeros_like(s))
    coefficients = [inverse[..., :, None] * ((u.mT @ b) @ a) for b, a in pairs]
    sizes = significant.sum(-1) * pairs[0][1].shape[-1]  # the density is a share of the real directions' entries
    merged = ties(coefficients, weights, density, majority_sign_method, sizes=sizes)
    return truncate(*low_rank_svd(u * s[..., None, :], merged), rank)


def _orthogonalise(vectors: torch.Tensor) -> torch.Tensor:
    """The orthonormal matrix nearest to `vectors` (orthogonal Procrustes, P·Q^T from the SVD P·D·Q^T)."""
    p, _, qh = torch.linalg.svd(vectors, full_matrices=False)
    return p @ qh


def tsv_merge(pairs: Sequence[Pair], weights: Sequence[float], *, rank: int) -> tuple[torch.Tensor, ...]:
    """TSV-M (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025).

    Each member's update w_i·ΔW_i is decomposed (`low_rank_svd`) and keeps its top r_i singular directions, with
    Σ r_i = `rank`: r // k each, and the r mod k remaining slots to the largest remaining singular values (with more
    members than `rank`, some keep none: prefer another type then). The kept left singular vectors [U_1 .. U_k] and
    right ones [V_1 .. V_k] are replaced by the nearest orthonormal matrices (this removes the interference between
    members), and the merged update is U_⊥·diag(S_1 .. S_k)·V_⊥^T: rank `rank` by construction. Identical copies do
    not give the adapter back (each copy keeps only r/k directions, and their orthogonalised copies add up). The
    factors come grouped by member, not sorted by singular value: `merge_updates` puts them in canonical order.

    Returns:
        `tuple`: `(A, B)`, (..., rank, in) and (..., out, rank).
    """
    decompositions = [low_rank_svd(b, w * a) for (b, a), w in zip(pairs, weights, strict=True)]
    us = torch.cat([u for u, _, _ in decompositions], dim=-1)
    ss = torch.cat([s for _, s, _ in decompositions], dim=-1)
    vs = torch.cat([vh.mT for _, _, vh in decompositions], dim=-1)
    # Which singular directions are kept: each member's first r // k always, then the largest of the others (per
    # member the values decrease, so this equals giving each remaining slot to the largest next singular value).
    base = rank // len(pairs)
    always = torch.cat([torch.arange(s.shape[-1], device=s.device) < base for _, s, _ in decompositions])
    score = torch.where(always, torch.full_like(ss, torch.inf), ss)
    kept = min(rank, ss.shape[-1])
    index = score.topk(kept, dim=-1).indices.sort(dim=-1).values
    us = us.gather(-1, index[..., None, :].expand(*us.shape[:-1], kept))
    vs = vs.gather(-1, index[..., None, :].expand(*vs.shape[:-1], kept))
    ss = ss.gather(-1, index)
    new_a = vs.new_zeros(*vs.shape[:-2], rank, vs.shape[-2])
    new_b = us.new_zeros(*us.shape[:-1], rank)
    new_a[..., :kept, :] = _orthogonalise(vs).mT
    new_b[..., :kept] = _orthogonalise(us) * ss[..., None, :]
    return new_a, new_b


def merge_updates(
    combination_type: str,
    pairs: Sequence[Pair],
    weights: Sequence[float],
    *,
    rank: int,
    density: float = 1.0,
    majority_sign_method: str = "total",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-`rank` merge `(A, B)` of one layer's members (or a batch of layers) for a type of `UPDATE_TYPES`.

    Args:
        combination_type (`str`): `core_ta`, `core_ties`, `knots_ties` or `tsv_m`.
        pairs (`Sequence[tuple[Tensor, Tensor]]`): `(B_i, A_i)` per member, the LoRA scaling folded into A_i.
        weights (`Sequence[float]`): One merge weight per member (see `engine.merge.merging.merge_weights_for`).
        rank (`int`): Rank of the merged factors.
        density (`float`, defaults to 1.0), majority_sign_method (`str`, defaults to `"total"`): TIES settings.

    Returns:
        `tuple[Tensor, Tensor]`: `(A, B)`, (..., rank, in) and (..., out, rank), in the canonical form of
            `canonical_factors` (A = V^T, B = U·S, directions by decreasing singular value, so the first j are the best
            rank-j approximation of the merged update), on the inputs' device and in the dtype of the source factors
            (the widest of them): a bf16 source gives a bf16 merge of the same bytes.
            The decompositions run in float32 (float64 for float64 inputs): torch has no bf16 / fp16 QR or SVD, and
            their 8 / 11-bit mantissas could not hold the small singular values that TIES' pruning compares.

    Raises:
        ValueError: For another combination type.
    """
    source_dtype = widest_dtype([t.dtype for pair in pairs for t in pair])
    dtype = torch.promote_types(source_dtype, torch.float32)
    pairs = [(b.to(dtype), a.to(dtype)) for b, a in pairs]
    if combination_type == "core_ta" or len(pairs) == 1:  # one member: the adapter itself (weight 1), re-expressed
        merged = task_arithmetic_rank_r(pairs, weights, rank=rank)
    elif combination_type == "core_ties":
        merged = ties_in_core(pairs, weights, rank=rank, density=density, majority_sign_method=majority_sign_method)
    elif combination_type == "knots_ties":
        merged = knots_ties(pairs, weights, rank=rank, density=density, majority_sign_method=majority_sign_method)
    elif combination_type == "tsv_m":
        merged = tsv_merge(pairs, weights, rank=rank)
    else:
        raise ValueError(f"No update-space merge for combination_type={combination_type!r}.")
    # One canonical result for every type (one more QR-core SVD of rank x rank, cheap): `tsv_m` returns its directions
    # grouped by member, and anything that cuts the factors by position (rank allocation, export) must never depend
    # on the order a type happens to produce.
    new_a, new_b = canonical_factors(*merged, rank)
    return new_a.to(source_dtype), new_b.to(source_dtype)


def widest_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """The dtype every one of `dtypes` converts to without loss of range (`torch.promote_types` over them)."""
    widest = dtypes[0]
    for dtype in dtypes[1:]:
        widest = torch.promote_types(widest, dtype)
    return widest


def merge_biases(
    combination_type: str,
    biases: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    density: float = 1.0,
    majority_sign_method: str = "total",
) -> torch.Tensor:
    """The merged LoRA bias (`lora_bias=True`) of one layer (or a batch): each member's bias already times its scaling.

    `core_ta` and `tsv_m` sum w_i·b_i (their rule for the updates); `core_ties` and `knots_ties` run TIES on the
    bias vectors in their own coordinates (a bias has no rotation ambiguity). A member without a bias counts as zero.
    Computed in float32 (or float64) and returned in the biases' (widest) dtype, like `merge_updates`.
    """
    source_dtype = widest_dtype([bias.dtype for bias in biases])
    vectors = [bias.to(torch.promote_types(source_dtype, torch.float32)) for bias in biases]
    if combination_type in ("core_ties", "knots_ties") and len(vectors) > 1:
        merged = ties(vectors, weights, density, majority_sign_method, ndim=1)
    else:
        merged = sum(w * v for w, v in zip(weights, vectors, strict=True))
    return merged.to(source_dtype)

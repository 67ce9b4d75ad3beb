"""RegMean in factored form, solved in token space: the data-aware merge of LoRA updates (pure tensor functions, no
PEFT, no model).

RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023) merges the
members' weights of one linear layer into the single update that best reproduces every member's outputs on that
member's own inputs:

    ΔW* = argmin_W  Σ_i w_i·‖X_i·W^T − X_i·ΔW_i^T‖²   ⇒   ΔW* = (Σ_i w_i·ΔW_i·G_i)·(Σ_j w_j·G_j)^-1

with G_i = X_i^T·X_i the Gram matrix of member i's layer inputs (here: over the tokens of its task's few-shot
examples, scaled by 1/√m_i so that G_i is the token mean and every task weighs alike whatever its length). A member
that does not adapt the layer has ΔW_i = 0 there and still counts in the sum: the merge keeps its outputs unchanged
as well as it can. Ten examples give a few hundred tokens, fewer than the layer's input width, so every G_i is
singular; RegMean's regulariser shrinks the off-diagonal entries, G̃_i = α·G_i + (1 − α)·diag(G_i), which makes
the sum positive definite for α < 1.

Layer inputs are kept as token matrices, never as Grams: a member's `LayerInput` is a matrix F_i (rows x in) with
F_i^T·F_i = G_i: its scaled tokens X_i/√m_i when it has fewer tokens than the input width (a few hundred rows instead
of in x in: 12x smaller at width 4096), else the in x in triangular factor of the same Gram (the R of a QR of the
tokens, never larger than the Gram). With D = (1 − α)·Σ_j w_j·diag(G_j) and U = [√(α·w_1)·F_1; ..] (M x in, M the
members' rows), the regularised sum is

    S = Σ_j w_j·G̃_j = D + U^T·U,

and S^-1 is applied through the M x M system I + V·V^T (V = U·D^-1/2, Woodbury's identity: `RegMeanSystem`) whenever
M < in, so no in x in matrix is ever formed; with more rows than the width, S is formed and factored as before. Both
give the same update to float tolerance.

Factored form: with ΔW_i = B_i·A_i (scaling folded into A_i), ΔW* = Σ_i B_i·(w_i·A_i·G̃_i·S^-1), i.e.
[B_1 .. B_k]·[Â_1; ..; Â_k] with Â_i = w_i·A_i·G̃_i·S^-1 (r_i x in): no out x in matrix formed or decomposed. Its
rank is at most Σ r_i; `merge_methods.low_rank_svd` and `truncate` give the best rank-r LoRA factors of it. With
identical members (any inputs) ΔW* is the member itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .merge_methods import Pair, low_rank_svd, truncate, widest_dtype

# One member's inputs to one layer: F (rows x in) with F^T·F = its (token-mean) Gram (see the module docstring).
LayerInput = torch.Tensor


def layer_input_bytes(*layer_inputs: Mapping[str, Sequence[LayerInput]]) -> int:
    """Bytes the factors of `layer_inputs` (each adapter -> per layer, as `layer_inputs.input_factors` returns;
    several: all examples' and every cross-fitting fold's) hold, each shared tensor counted once: the memory a
    `regmean` run keeps for its whole length."""
    distinct = {id(factor): factor for inputs in layer_inputs for factors in inputs.values() for factor in factors}
    return sum(factor.numel() * factor.element_size() for factor in distinct.values())


def shrink_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """RegMean's regularised Gram α·G + (1 − α)·diag(G) (the diagonal kept, the rest scaled by α); batched."""
    diagonal = torch.diagonal(gram, dim1=-2, dim2=-1)
    return alpha * gram + (1 - alpha) * torch.diag_embed(diagonal)


def compress_rows(rows: torch.Tensor) -> torch.Tensor:
    """The smallest matrix F with F^T·F = rows^T·rows: `rows` itself when it has fewer rows than columns, else the
    (in x in) triangular R of its QR decomposition (exact, and better conditioned than forming the Gram)."""
    if rows.shape[-2] <= rows.shape[-1]:
        return rows
    return torch.linalg.qr(rows, mode="r").R


class RegMeanSystem:
    """S = Σ_j w_j·G̃_j of one layer input and its inverse, for the members' `LayerInput`s and merge weights.

    Built once per layer input and merge: the layers fed the same input (q, k and v of a block) solve with the same
    system. Holds, on `device` and in `dtype`, either the Cholesky factor of the M x M matrix I + V·V^T (M < in: the
    token-space form) or of the in x in S itself (M >= in), never both.

    Args:
        inputs (`Sequence[LayerInput]`): Per member, F_i (rows_i x in) with F_i^T·F_i = G_i.
        weights (`Sequence[float]`): Per member, its weight w_i >= 0 in the least-squares objective.
        alpha (`float`): The share of the off-diagonal Gram entries kept (`shrink_off_diagonal`): in (0, 1) for the
            token-space form; 1 is allowed only where S is formed and positive definite without the regulariser.
        device, dtype: Where and in which precision to solve (the merged factors').

    Example:
        ```python
        >>> system = RegMeanSystem([x1 / len(x1) ** 0.5, x2 / len(x2) ** 0.5], [1.0, 1.0], 0.9)
        >>> solution = system.member_solution([(0, a1), (1, a2)])  # S^-1 [w_1 G̃_1 A_1^T, w_2 G̃_2 A_2^T]
        ```
    """

    def __init__(
        self,
        inputs: Sequence[LayerInput],
        weights: Sequence[float],
        alpha: float,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if any(w < 0 for w in weights):
            raise ValueError(f"RegMean's merge weights must be non-negative, got {list(weights)}.")
        if not 0 < alpha <= 1:
            raise ValueError(f"RegMean's alpha must be in (0, 1], got {alpha}.")
        device = device if device is not None else inputs[0].device
        self.inputs = [f.to(device=device, dtype=dtype) for f in inputs]
        self.weights = [float(w) for w in weights]
        self.alpha = alpha
        width = self.inputs[0].shape[-1]
        # Every member's diag(G_i): the column sums of squares of F_i; their weighted sum is the diagonal of S / α.
        self.diagonals = [f.square().sum(dim=-2) for f in self.inputs]
        total_diagonal = sum(w * d for d, w in zip(self.diagonals, self.weights, strict=True))
        # A feature no member ever sees has a zero row and column in S: a unit diagonal keeps S invertible (its
        # solution is 0 anyway, as every right-hand side is zero there).
        unseen = (total_diagonal <= 0).to(dtype)
        rows = torch.cat([(alpha * w) ** 0.5 * f for f, w in zip(self.inputs, self.weights, strict=True)], dim=-2)
        self.token_space = rows.shape[-2] < width
        if self.token_space:
            if alpha >= 1:
                raise ValueError("RegMean's token-space solve needs alpha < 1 (the regulariser makes S invertible).")
            # S = D + U^T·U, D = (1 − α)·diag(Σ w_j G_j) (+ 1 where unseen) > 0: Woodbury through V = U·D^-1/2.
            self.inverse_sqrt_diagonal = ((1 - alpha) * total_diagonal + unseen).rsqrt()
            self.scaled_rows = rows * self.inverse_sqrt_diagonal  # V (M x in)
            core = _gram(self.scaled_rows.mT)
            core.diagonal(dim1=-2, dim2=-1).add_(1)  # I + V·V^T: eigenvalues >= 1, well conditioned
            self.factor = torch.linalg.cholesky(core)
        else:
            total = _gram(rows)  # α·Σ_j w_j·G_j
            total.diagonal(dim1=-2, dim2=-1).copy_(total_diagonal + unseen)  # the diagonal kept whole
            self.factor = torch.linalg.cholesky(total)

    def member_solution(self, factors: Sequence[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """S^-1·[w_i·G̃_i·A_i^T, ..] (in x Σ r_i): for each `(i, A_i)` of `factors` (member i's A, r_i x in), its
        columns in turn; the Â_i^T of RegMean's factored merge.

        In the token-space form the right-hand side is split as G̃_i·A_i^T = α·F_i^T·(F_i·A_i^T) + (1 − α)·diag(G_i)·
        A_i^T. The first term lies in the row space of U, where S^-1·U^T = D^-1/2·V^T·(I + V·V^T)^-1 (the push-through
        identity: no subtraction); only the diagonal term goes through Woodbury, and its large part D^-1·(..) is a
        per-feature weighted mean of the members' A_i, so nothing large cancels. (Woodbury on the whole right-hand
        side subtracts two terms of size D^-1·U^T·U·A where D is small: one step of iterative refinement was
        needed to keep float32 digits, three times the matrix products.)
        """
        columns = [
            (1 - self.alpha) * self.weights[i] * self.diagonals[i][..., :, None] * a.to(self.factor.dtype).mT
            for i, a in factors
        ]
        if not self.token_space:
            right = torch.cat(
                [
                    self.alpha * self.weights[i] * (self.inputs[i].mT @ (self.inputs[i] @ a.to(self.factor.dtype).mT))
                    + diagonal_part
                    for (i, a), diagonal_part in zip(factors, columns, strict=True)
                ],
                dim=-1,
            )
            return torch.cholesky_solve(right, self.factor)
        diagonal_part = torch.cat(columns, dim=-1)  # E (in x c)
        offsets = [0]
        for f in self.inputs:
            offsets.append(offsets[-1] + f.shape[-2])
        # Y (M x c): U^T·Y is the first term, √(α·w_i)·F_i·A_i^T in member i's rows and columns, zero elsewhere.
        token_part = diagonal_part.new_zeros(*diagonal_part.shape[:-2], offsets[-1], diagonal_part.shape[-1])
        column = 0
        for i, a in factors:
            a = a.to(self.factor.dtype)
            token_part[..., offsets[i] : offsets[i + 1], column : column + a.shape[-2]] = (
                self.alpha * self.weights[i]
            ) ** 0.5 * (self.inputs[i] @ a.mT)
            column += a.shape[-2]
        # S^-1·(U^T·Y + E) = D^-1·E + D^-1/2·V^T·(I + V·V^T)^-1·(Y − V·D^-1/2·E)
        scaled = diagonal_part * self.inverse_sqrt_diagonal[..., :, None]
        inner = torch.cholesky_solve(token_part - self.scaled_rows @ scaled, self.factor)
        return (scaled + self.scaled_rows.mT @ inner) * self.inverse_sqrt_diagonal[..., :, None]


def _gram(rows: torch.Tensor) -> torch.Tensor:
    """rows^T·rows from 3/4 of the products: the two diagonal blocks and one off-diagonal block, copied transposed
    into the other (a Gram is symmetric)."""
    width = rows.shape[-1]
    half = width // 2
    if half < 256:  # small: one product is faster than three
        return rows.mT @ rows
    low, high = rows[..., :half], rows[..., half:]
    gram = rows.new_empty(*rows.shape[:-2], width, width)
    gram[..., :half, :half] = low.mT @ low
    gram[..., half:, :half] = high.mT @ low
    gram[..., :half, half:] = gram[..., half:, :half].mT
    gram[..., half:, half:] = high.mT @ high
    return gram


def regmean_merge(
    pairs: Sequence[Pair | None],
    inputs: Sequence[LayerInput],
    weights: Sequence[float],
    *,
    rank: int,
    alpha: float,
    system: RegMeanSystem | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-`rank` LoRA factors `(A, B)` of RegMean's merge of one layer.

    Args:
        pairs (`Sequence`): Per member, `(B_i, A_i)` (out, r_i) and (r_i, in) with the scaling folded into A_i, or
            `None` for a member that does not adapt this layer (a zero update).
        inputs (`Sequence[LayerInput]`): Per member (the same order), its layer inputs F_i (rows_i x in) with
            F_i^T·F_i = G_i (`layer_inputs.input_factors`; any device: moved to the factors' for the merge).
        weights (`Sequence[float]`): Per member, the (non-negative) weight of its term in the least-squares objective.
        rank (`int`): Rank of the merged factors.
        alpha (`float`): The share of the off-diagonal Gram entries kept (`shrink_off_diagonal`), in (0, 1); the
            solve is then well posed whatever the inputs.
        system (`RegMeanSystem`, *optional*): The system of these `inputs` and `weights` already built (for the
            layers fed the same input); built here when not given.

    Returns:
        `tuple[Tensor, Tensor]`: `(A, B)`, (rank, in) and (out, rank), on the factors' device and in the sources'
            (widest) dtype; computed in float32 (float64 for float64 sources), as `merge_methods.merge_updates`.

    Raises:
        ValueError: If no member adapts the layer, or a weight is negative.

    Example:
        ```python
        >>> new_a, new_b = regmean_merge([(b1, a1), (b2, a2)], [x1 / 20**0.5, x2 / 30**0.5], [1.0, 1.0], rank=8, alpha=0.9)
        ```
    """
    if all(pair is None for pair in pairs):
        raise ValueError("RegMean needs at least one member that adapts the layer.")
    source_dtype = widest_dtype([t.dtype for pair in pairs if pair is not None for t in pair])
    dtype = torch.promote_types(source_dtype, torch.float32)  # no bf16 / fp16 Cholesky, QR or SVD in torch
    device = next(pair[0].device for pair in pairs if pair is not None)  # where the merge runs: the factors'
    if system is None:
        system = RegMeanSystem(inputs, weights, alpha, device=device, dtype=dtype)
    present = [(i, pair) for i, pair in enumerate(pairs) if pair is not None]
    b = torch.cat([pair[0].to(dtype) for _, pair in present], dim=-1)
    a = system.member_solution([(i, pair[1]) for i, pair in present]).mT  # Â_i = w_i·A_i·G̃_i·S^-1, stacked
    new_a, new_b = truncate(*low_rank_svd(b, a), rank)
    return new_a.to(source_dtype), new_b.to(source_dtype)

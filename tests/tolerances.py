"""Comparison tolerances derived from floating-point rounding, not measured on one CPU.

Two computations of one quantity that differ only in the order of their roundings
(XLA fusion, sharded vs whole, chunked vs plain, merged vs unmerged weights, scanned vs
looped layers, PyTorch vs JAX, float32 vs a float64 reference) disagree by an amount
that depends on the machine: its SIMD width and XLA's kernels decide how each sum is
split. A tolerance set just above the difference seen on one machine fails on another;
the bounds here follow from the size of the computation instead.
"""

import ml_dtypes
import numpy as np


def reordered_sum_bound(magnitude, terms, reductions=1, dtype=np.float32) -> float:
    """Largest |a - b| to expect between two roundings of one computation (an atol).

    = reductions * terms * eps(dtype) * magnitude.

    One sum: adding `terms` = n numbers in floating point, in any order (sequential,
    pairwise, split over SIMD lanes or threads), lands within
    gamma_n * sum|x_i| ~= n * u * sum|x_i| of the exact sum, u = eps / 2 being the unit
    roundoff; a dot product of length n obeys the same bound with x_i = a_i * b_i (Higham,
    Accuracy and Stability of Numerical Algorithms, sections 3.1 and 4.2). Two evaluations
    are each that close to the exact value, so they differ by at most
    2 * n * u * sum|x_i| = n * eps * magnitude, with `magnitude` standing for sum|x_i|:
    the scale of the result (its largest |value| is used when an array is given). Against
    a float64 reference only the float32 side rounds, and the bound is twice what is needed.

    A chain of `reductions` such sums (the matmuls, norms and softmaxes between a model's
    input and its logits): each adds a relative error of at most n * u to what it passes
    on, and to first order these relative errors add up along the chain while the steps
    between keep values at about the same scale (normalisation layers do). Give `terms`
    as the longest of the chain's reductions.

    This is a worst case: rounding errors mostly cancel, so differences typically grow like
    sqrt(n) * u and land one to three orders of magnitude below it, while a real bug (a
    wrong scale, mask or index) moves results by a large relative amount. Where it is
    used, check that such a bug would still exceed it.
    """
    eps = float(ml_dtypes.finfo(dtype).eps)
    return float(reductions * terms * eps * np.max(np.abs(magnitude)))


def decoder_bound(magnitude, *, layers, hidden, intermediate, positions, dtype=np.float32):
    """reordered_sum_bound for the logits (or last hidden states) of a Llama/Qwen decoder.

    Each layer chains 9 reductions: RMSNorm (mean of squares over `hidden`), the q/k/v
    projections (`hidden`), attention scores (head_dim <= `hidden`), the softmax
    normaliser and the weighted sum of values (`positions` each), the output projection
    (heads * head_dim), RMSNorm, the gate/up projections (`hidden`) and the down
    projection (`intermediate`); the final RMSNorm and the LM head add 2. None is longer
    than max(hidden, intermediate, positions) for the models tested here (heads *
    head_dim <= intermediate).
    """
    terms = max(hidden, intermediate, positions)
    return reordered_sum_bound(magnitude, terms, reductions=9 * layers + 2, dtype=dtype)

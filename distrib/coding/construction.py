"""Encoding matrices B for gradient codes (Tandon et al., ICML 2017).

Row ``i`` of the n×n matrix ``B`` says how worker ``i`` combines partition gradients:
``coded_i = Σ_j B[i, j] · g_j``, nonzero only on the s+1 partitions it holds. A set S of workers
can decode when ``1`` lies in the span of the rows ``B_S`` (the span condition); the code
tolerates s stragglers when that holds for every S of size n − s.

* Fractional repetition: workers form n/(s+1) groups of s+1; every member of group g holds the
  same s+1 partitions and sends their plain sum. Any n − s workers include one per group.
* Cyclic repetition: worker i holds partitions i, i+1, ..., i+s (mod n). The paper builds B
  from a random s×n matrix H with H·1 = 0 (each row is the null vector of H on its window).
  That works with probability 1 but its decoding coefficients blow up quickly: at n=12, s=4
  the worst straggler set magnifies rounding errors ~1e5-fold (~40-fold here), which ruins
  fp32 gradients. We use the same recipe with a structured H instead: the parity checks of a
  real MDS (consta)cyclic BCH code, as in Raviv, Tamo, Tandon and Dimakis, "Gradient coding
  from cyclic MDS codes and expander graphs" (ICML 2018). Its rows are cosines/sines of s
  consecutive, conjugate-closed frequencies, so every s columns of H are independent (BCH
  bound) and any n − s window vectors span the code (check_span verifies it). When n − s is
  odd the frequencies are centred on n/2 and the code contains 1. Otherwise they are centred
  on 0 (cyclic for odd s, negacyclic half-integer frequencies for even s); the code then holds
  a vector v with no zero entry (the projection of the alternating vector), and dividing
  column j of B by v_j turns "v is decodable" into "1 is decodable" without moving any
  support. The construction is deterministic, so every rank builds the same B with no seed to
  agree on.
"""

import itertools
import math

import numpy as np

from distrib.errors import DistribError

# Above this many straggler sets, check a sample instead of all of them (the BCH structure is
# what guarantees the rest; decoding re-checks every set it actually meets).
FULL_CHECK_LIMIT = 4096
SAMPLE_CHECKS = 1024


def fractional_matrix(n, s):
    """B for fractional repetition; requires (s+1) | n."""
    B = np.zeros((n, n))
    for w in range(n):
        g = w // (s + 1)
        B[w, g * (s + 1):(g + 1) * (s + 1)] = 1.0
    return B


def cyclic_matrix(n, s):
    """B for cyclic repetition: row i supported on partitions i..i+s (mod n)."""
    if s == 0:
        return np.eye(n)
    H = _parity_checks(n, s)
    v = _full_weight_codeword(H, n, s)
    windows = (np.arange(n)[:, None] + np.arange(s + 1)) % n     # row i: partitions i..i+s
    blocks = np.moveaxis(H[:, windows], 1, 0)                      # (n, s, s+1)
    # The code's only vector on each window: first entry 1, the rest solve the s×s system (the
    # paper's recipe; the BCH bound makes every s columns of H independent).
    rest = np.linalg.solve(blocks[:, :, 1:], -blocks[:, :, :1])[..., 0]
    rows = np.concatenate([np.ones((n, 1)), rest], axis=1) / v[windows]
    rows /= np.abs(rows).max(axis=1, keepdims=True) * np.sign(rows[:, :1])
    B = np.zeros((n, n))
    np.put_along_axis(B, windows, rows, axis=1)
    return B


def _parity_checks(n, s):
    """s×n real parity checks of an MDS (consta)cyclic code: length n, dimension n − s."""
    # Work with doubled frequencies F = 2f (integers): row angle π·F·k/n.
    centre2 = n if (n - s) % 2 else 0
    doubled = [centre2 + 2 * t - (s - 1) for t in range(s)]
    reps = sorted({min(F % (2 * n), 2 * n - F % (2 * n)) for F in doubled})
    k = np.arange(n)
    rows = []
    for F in reps:
        angle = np.pi * F * k / n
        rows.append(np.cos(angle))
        if F not in (0, n):  # 0 and n/2 are their own conjugates: the sine row is zero
            rows.append(np.sin(angle))
    H = np.array(rows)
    assert H.shape == (s, n), (H.shape, n, s)
    return H


def _full_weight_codeword(H, n, s):
    """A codeword (H·v = 0) with no zero entry: 1 when the code has it, else a projection."""
    q, _ = np.linalg.qr(H.T, mode="complete")
    null = q[:, s:]
    ones = np.ones(n)
    if np.abs(H @ ones).max() < 1e-9 * n:
        return ones
    alt = (-1.0) ** np.arange(n)
    v = null @ (null.T @ alt)
    if np.abs(v).min() < 1e-6 * np.abs(v).max():  # never seen for n <= 64; guard anyway
        raise DistribError(f"gradient code construction failed for n={n}, s={s}")
    return v


def solve_decoding(rows):
    """Minimum-norm a with aᵀ·rows = 1ᵀ (float64), or None when 1 is not in their span."""
    n = rows.shape[1]
    a, *_ = np.linalg.lstsq(rows.T, np.ones(n), rcond=None)
    scale = max(1.0, float(np.abs(a) @ np.abs(rows).sum(axis=1)))
    if np.abs(a @ rows - 1.0).max() > 1e-9 * scale:
        return None
    return a


def check_span(B, n, s):
    """Check that every set of n − s workers can decode (all sets, or a sample when many).

    Returns the worst error amplification seen, max over sets of Σ_i |a_i|·‖B_i‖₁: decoding
    float gradients loses about that many times their rounding error. Raises DistribError when
    some set cannot decode.
    """
    if s == 0:
        return float(n)  # B = I: every worker needed, a = 1
    count = math.comb(n, s)
    if count <= FULL_CHECK_LIMIT:
        missing = list(itertools.combinations(range(n), s))
    else:
        rng = np.random.RandomState(0)
        missing = [tuple((i + k) % n for k in range(s)) for i in range(n)]  # runs: worst case
        missing += [tuple(rng.choice(n, s, replace=False)) for _ in range(SAMPLE_CHECKS)]
    present = np.array([sorted(set(range(n)) - set(m)) for m in missing])
    # Rows of B span an (n − s)-dim space holding 1; in an orthonormal basis Q of it each set
    # is a square system C_Sᵀ·a = Qᵀ·1, solvable iff the set can decode.
    _, _, vt = np.linalg.svd(B)
    Q = vt[:n - s].T
    coords, target = B @ Q, Q.T @ np.ones(n)
    C = coords[present]                                 # (sets, n − s, n − s)
    try:
        rhs = np.broadcast_to(target[:, None], (len(C), n - s, 1))
        a = np.linalg.solve(np.swapaxes(C, 1, 2), rhs)[..., 0]
        ok = np.isfinite(a).all(axis=1)
    except np.linalg.LinAlgError:
        a, ok = np.zeros(C.shape[:2]), np.zeros(len(C), dtype=bool)
    A = B[present]
    amplification = np.einsum("ck,ck->c", np.abs(a), np.abs(A).sum(axis=2))
    residual = np.abs(np.einsum("ck,ckn->cn", a, A) - 1.0).max(axis=1)
    ok &= residual <= 1e-9 * np.maximum(1.0, amplification)
    if not ok.all():
        bad = missing[int(np.nonzero(~ok)[0][0])]
        raise DistribError(
            f"gradient code n={n}, s={s} cannot decode without workers {sorted(map(int, bad))}")
    return float(amplification.max())

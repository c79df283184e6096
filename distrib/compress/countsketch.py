"""CountSketch compression with FetchSGD's reduce (Rothchild et al., ICML 2020).

A count sketch of a vector ``g`` of ``n`` elements is a ``rows × cols`` table: row ``j`` adds
``s_j(i)·g_i`` into column ``h_j(i)``. The hashes ``h_j``, ``s_j`` are drawn from a seed (and
``n``, ``cols``), so every rank has the same ones and the sketch is linear:
``sketch(a) + sketch(b) = sketch(a + b)``. Reading coordinate ``i`` back is the median over rows
of ``s_j(i)·table[j, h_j(i)]``: exact for a vector's heavy hitters when collisions are light.

``reduce`` (FetchSGD, per key; all state is in sketch space and identical on every rank)::

    S   ← all-reduce(sketch(g)) / size                  round 1: rows·cols floats
    S_u ← ρ·S_u + S;  S_e ← S_e + S_u                    momentum and error accumulation
    C   ← the oversample·k coordinates of largest |estimate(S_e)|      (candidates)
    v_C ← all-reduce(g[C]) / size                        round 2: exact values at C
    w_C ← estimate(S_e − S)[C] + v_C                     carried part estimated, fresh part exact
    Δ   ← the k entries of w_C of largest magnitude
    S_e[cells of Δ] ← 0;  S_u[cells of Δ] ← 0            (as FetchSGD's code does)
    out ← Δ                                               (dense, k non-zeros)

Zeroing the cells Δ's coordinates hash to (rather than subtracting ``sketch(Δ)``, which would
keep exact books) follows the FetchSGD implementation: Δ's carried part is a sketch estimate,
and feeding its noise back into ``S_e`` made training diverge on the digits example at every
compression ratio tried, while zeroing trained to the uncompressed accuracy (the mass that
shared those cells is dropped). With ``momentum > 0`` the output already contains the momentum:
use it with a momentum-free optimizer. Tensors whose sketch plus the candidates would not be
smaller than the tensor are all-reduced uncompressed.

``cols`` and ``k`` are element counts (int), or fractions of the tensor's size (float < 1).
Oversampling the candidates (default 2) lets the exact second round reject coordinates whose
estimate was inflated by collisions with heavy ones.
The hashes of tensors up to ``CACHE_ENTRIES / rows`` elements are cached (5 bytes per entry);
larger ones are regenerated per call, chunk by chunk.
"""
from __future__ import annotations

import math
import time

import torch

from .base import Compressor, LocalComm, _check_op, _key, stable_seed
from .topk import topk_indices

CHUNK = 1 << 20
CACHE_ENTRIES = 1 << 26


def _size(value, n):
    return min(n, value if isinstance(value, int) else math.ceil(value * n))


def _check_size(name, value):
    ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 1) or \
        (isinstance(value, float) and 0 < value < 1)
    if not ok:
        raise ValueError(f"CountSketch {name} must be a positive integer or a fraction in (0, 1), "
                         f"got {value!r}")


class CountSketch(Compressor):
    """Count sketch with FetchSGD's two-round reduce; see the module docstring."""

    name = "countsketch"
    linear = True
    has_error_feedback = True

    def __init__(self, rows: int = 5, cols=0.02, k=0.01, momentum: float = 0.0,
                 oversample: float = 2.0, seed: int = 0):
        super().__init__()
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"CountSketch rows must be a positive integer, got {rows!r}")
        _check_size("cols", cols)
        _check_size("k", k)
        if not 0 <= momentum < 1:
            raise ValueError(f"CountSketch momentum must be in [0, 1), got {momentum!r}")
        if not oversample >= 1:
            raise ValueError(f"CountSketch oversample must be >= 1, got {oversample!r}")
        self.rows, self.cols, self.k, self.momentum = rows, cols, k, float(momentum)
        self.oversample = float(oversample)
        self.seed = int(seed)
        self._cache = {}
        self._cached = 0

    def compresses(self, shape):
        n = math.prod(shape)
        return n > 0 and self.rows * _size(self.cols, n) + _size(self.k, n) * self.oversample < n

    # -- hashes ---------------------------------------------------------------------------------
    def _chunk(self, n, cols, c):
        """Hashes of coordinates [c·CHUNK, (c+1)·CHUNK): flat table index (int32) and sign."""
        lo = c * CHUNK
        length = min(n, lo + CHUNK) - lo
        g = torch.Generator().manual_seed(stable_seed("countsketch", self.seed, n, cols, c))
        draw = torch.randint(0, 2 * cols, (self.rows, length), generator=g, dtype=torch.int32)
        sign = (draw & 1).to(torch.int8).mul_(2).sub_(1)  # the low bit: the sign
        idx = draw.bitwise_right_shift_(1)                 # the rest: the column
        idx += (torch.arange(self.rows, dtype=torch.int32) * cols)[:, None]
        return idx, sign

    def _chunks(self, n, cols):
        """Yields ``(lo, hi, idx, sign)`` over all coordinates, from the cache when it fits."""
        cached = self._cache.get((n, cols))
        if cached is None and self._cached + n * self.rows <= CACHE_ENTRIES:
            cached = self._cache[(n, cols)] = [self._chunk(n, cols, c)
                                               for c in range(-(-n // CHUNK))]
            self._cached += n * self.rows
        for c in range(-(-n // CHUNK)):
            idx, sign = cached[c] if cached is not None else self._chunk(n, cols, c)
            yield c * CHUNK, min(n, (c + 1) * CHUNK), idx, sign

    def _hashes_at(self, n, cols, coords):
        """(idx, sign), each ``rows × len(coords)``, for sorted int64 ``coords``."""
        idx = torch.empty(self.rows, coords.numel(), dtype=torch.int32)
        sign = torch.empty(self.rows, coords.numel(), dtype=torch.int8)
        bounds = torch.searchsorted(coords, torch.arange(0, n + CHUNK, CHUNK)).tolist()
        for c, (lo, _, cidx, csign) in enumerate(self._chunks(n, cols)):
            a, b = bounds[c], bounds[c + 1]
            if a < b:
                local = coords[a:b] - lo
                idx[:, a:b] = cidx[:, local]
                sign[:, a:b] = csign[:, local]
        return idx, sign

    # -- sketch operations --------------------------------------------------------------------
    def sketch(self, g: torch.Tensor, cols: int) -> torch.Tensor:
        """The ``rows × cols`` float32 count sketch of the flat ``g``."""
        table = torch.zeros(self.rows * cols, dtype=torch.float32)
        g = g.to(torch.float32)
        for lo, hi, idx, sign in self._chunks(g.numel(), cols):
            table.index_add_(0, idx.view(-1), (sign * g[lo:hi]).view(-1))
        return table.view(self.rows, cols)

    def estimate(self, table: torch.Tensor, n: int) -> torch.Tensor:
        """Every coordinate's estimate (median over rows) from a sketch."""
        flat = table.reshape(-1)
        est = torch.empty(n, dtype=torch.float32)
        for lo, hi, idx, sign in self._chunks(n, table.shape[1]):
            est[lo:hi] = _median_rows(flat[idx] * sign)
        return est

    def _estimate_at(self, table, idx, sign):
        return _median_rows(table.reshape(-1)[idx] * sign)

    # -- compressor interface -------------------------------------------------------------------
    def _compress(self, flat, key, payload):
        cols = _size(self.cols, max(flat.numel(), 1))
        payload.ctx["cols"] = cols
        return [self.sketch(flat, cols)]

    def _decompress(self, payload):
        table, n = payload.tensors[0], payload.numel
        est = self.estimate(table, n)
        out = torch.zeros(n, dtype=torch.float32)
        keep = topk_indices(est, _size(self.k, n))
        out[keep] = est[keep]
        return out

    def reduce(self, t, comm=None, key=None, op="mean"):
        comm = LocalComm() if comm is None else comm
        _check_op(op)
        self._check_tensor(t)
        key = _key(key)
        n = t.numel()
        cols, k = _size(self.cols, max(n, 1)), _size(self.k, max(n, 1))
        with self._op() as stats:
            stats["raw_bytes"] += n * t.element_size()
            if not self.compresses(t.shape):
                stats["wire_bytes"] += n * t.element_size()
                out = self._comm(comm.allreduce, t.detach(), "sum").to(torch.float32)
                if op == "mean":
                    out /= comm.size
                return out.view(t.shape).to(t.dtype)
            t0 = time.perf_counter()
            st = self.state(key, t.shape)
            if "e" not in st:
                st["e"] = torch.zeros(self.rows, cols)
                if self.momentum:
                    st["u"] = torch.zeros(self.rows, cols)
            g = t.detach().reshape(-1).to(torch.float32)
            local = self.sketch(g, cols)
            stats["compress_s"] += time.perf_counter() - t0
            S = self._comm(comm.allreduce, local, "sum") / comm.size
            t0 = time.perf_counter()
            if not bool(torch.isfinite(S).all()):
                # Overflow (loss scaling) on some rank: report it, keep the sketches clean.
                stats["wire_bytes"] += local.numel() * 4
                return torch.full(t.shape, float("inf"), dtype=t.dtype)
            e = st["e"]
            if self.momentum:
                u = st["u"]
                carried = e + self.momentum * u
                u.mul_(self.momentum).add_(S)
            else:
                carried = e.clone()
            e.copy_(carried).add_(S)
            wanted = min(n, math.ceil(k * self.oversample))
            cand = topk_indices(self.estimate(e, n), wanted).sort().values
            stats["compress_s"] += time.perf_counter() - t0
            fresh = self._comm(comm.allreduce, g[cand], "sum") / comm.size
            t0 = time.perf_counter()
            idx, sign = self._hashes_at(n, cols, cand)
            values = self._estimate_at(carried, idx, sign) + fresh
            keep = topk_indices(values, k).sort().values
            cand, values, idx, sign = cand[keep], values[keep], idx[:, keep], sign[:, keep]
            cells = idx.reshape(-1).long()
            e.view(-1)[cells] = 0
            if self.momentum:
                st["u"].view(-1)[cells] = 0
            out = torch.zeros(n, dtype=torch.float32)
            out[cand] = values if op == "mean" else values * comm.size
            stats["wire_bytes"] += local.numel() * 4 + fresh.numel() * 4
            stats["compress_s"] += time.perf_counter() - t0
        return out.view(t.shape).to(t.dtype)

    def __repr__(self):
        return (f"CountSketch(rows={self.rows}, cols={self.cols}, k={self.k}, "
                f"momentum={self.momentum}, oversample={self.oversample})")


def _median_rows(v):
    """Median over dim 0 (the lower one for an even count, as ``torch.median``). For the few
    rows a sketch has, an odd-even transposition network of element-wise min/max is many
    times faster than ``torch.median(dim=0)``."""
    r = v.shape[0]
    if r > 15:
        return v.median(dim=0).values
    rows = list(v.unbind(0))
    for p in range(r):
        for i in range(p % 2, r - 1, 2):
            lo, hi = rows[i], rows[i + 1]
            rows[i], rows[i + 1] = torch.minimum(lo, hi), torch.maximum(lo, hi)
    return rows[(r - 1) // 2]

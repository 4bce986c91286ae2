"""The k-NN's neighbour search: the ``k`` most similar train features per query, exact and device-independent.

See :mod:`ssl_distill.eval.knn` for the ranking rules (float64 similarities on a 2^-32 grid, ties to the lowest
train index) and why; this module makes them fast.

**Fast, and still exact: a float32 scan, a float64 re-rank, a proof, a fallback.** A float64 scan of the whole bank
costs ~4x a float32 one (and 2x its memory), so the bank is scanned in float32 (``queries @ chunk.T`` in IEEE float32
even when TF32 / bf16 matmuls are allowed globally) for the ``m = k + CANDIDATE_MARGIN`` largest similarities ``f``;
only these candidates get their float64 similarities ``s`` (gathered rows, snapped) and are ordered by (similarity
desc, index asc). The float32 error is bounded: ``|f_i - s_i| <= B = (D + 2) 2^-23 |q| max_i |x_i| scale_i + 2^-32``
(float32 rounding of ``q``, ``x_i`` and the scale, ``D``-term dot products, the float64 error and the snap, each at
most ``D 2^-24`` relative, with a factor 2 to spare). Every train item left out has ``f_j <= f_m`` (the smallest kept),
so ``s_j <= f_m + B``; when ``f_m + 2B < s_(k)`` (the k-th re-ranked value) no left-out item can reach or tie the
top ``k`` and the re-ranked candidates *are* the exact answer. The queries where this proof fails -- massive
near-ties such as the collinear random-ViT features above, whose similarities all lie within ``B`` of each other --
are answered by the exact float64 scan (``_topk_exact``), those queries only. Either way the result is the exact
search's, bit for bit (up to the 1e-6-per-tie grid splits above); which queries took which path may differ between
devices, the answer does not. Banks whose norms would overflow or underflow float32 (norms above 2^20) always go
exact. On the benchmark's random 384-D features (100k and 1M train rows, k = 200) the proof holds for every query:
the k-th and (k+32)-th similarities are >= 1.1e-3 apart, ``2B`` is 9.2e-5 (the float32 error measured: 1.6e-7).

Memory stays bounded: queries go in batches of ``query_batch`` and train features are scanned in chunks of
``train_chunk``, keeping a running top-``m`` (each chunk's own top ``m`` merged in); no ``N_query x N_train``
similarity matrix is ever built, one ``query_batch x train_chunk`` float32 block is the largest temporary. Train
features are never copied whole: a float32 train matrix is read in place, other dtypes are upcast one chunk at a time
(the exact search upcasts at most ``_EXACT_CHUNK_ELEMENTS`` values to float64 at a time). """

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor


def topk_neighbours(
    queries: Tensor, train: Tensor, k: int, train_chunk: int = 65536, train_scale: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The ``k`` largest similarities ``queries @ train.T`` per query, in float64, scanning ``train`` in chunks.

    Args: queries ``(Q, D)``, train ``(N, D)`` (both already normalised, or ``train_scale`` ``(N,)`` multiplies
    column ``i`` of the similarities, e.g. ``1 / |train_i|``, so no normalised copy of ``train`` is needed); any
    float dtype, computed on ``queries``' device; similarities snapped to ``SIMILARITY_GRID``. Returns ``(sims (Q, k)
    float64, index (Q, k) int64)`` in the order (similarity desc, train index asc): among equal similarities the
    lowest train index comes first, on every device and for every ``train_chunk``. ``k`` is clipped to ``N``.
    The result is the exact float64 search's (``_topk_exact``); how it is found fast is in the module docstring.
    """
    q = queries.to(torch.float64)
    scale = train_scale.to(device=q.device, dtype=torch.float64) if train_scale is not None else None
    return search(q, train, k, train_chunk, scale, bank_range(row_norms(train).to(q.device), scale))


SIMILARITY_GRID = 2.0**-32
CANDIDATE_MARGIN = 32  # float32 candidates kept per query beyond k, re-ranked in float64
_RERANK_ELEMENTS = 2**20  # candidate feature values gathered (in float64) per re-rank step: 8 MiB
_EXACT_CHUNK_ELEMENTS = 2**22  # train values upcast to float64 per chunk of the exact search: 32 MiB
_FAST_MAX_NORM = 2.0**20  # query / train norms and scales up to which the float32 scan's error bound holds
_FAST_MAX_SCALE = 2.0**40


def snap_similarities(sims: Tensor) -> Tensor:
    """float64 similarities rounded to the nearest multiple of ``SIMILARITY_GRID`` (exact float64 operations for
    ``|sims| <= 2^20``), so float64 matmul noise (~1e-16) does not decide exact ties; any shape."""
    return torch.round(sims * (1.0 / SIMILARITY_GRID)) * SIMILARITY_GRID


def bank_range(norms: Tensor, scale: Tensor | None) -> tuple[float, bool]:
    """``(reach, fast)`` of a train bank from its row norms ``(N,)`` float64 and column scale ``(N,)`` or None:
    ``reach = max_i |x_i| |scale_i|`` (the largest ``|similarity|`` per unit of query norm, 1 for a normalised bank)
    and whether the float32 scan's error bound holds (no float32 overflow or underflow that matters)."""
    if norms.numel() == 0:
        return 0.0, False
    if scale is None:
        reach, fast = norms.max(), norms.max() <= _FAST_MAX_NORM
    else:
        reach = (norms * scale.abs()).max()
        fast = (norms.max() <= _FAST_MAX_NORM) & (scale.abs().max() <= _FAST_MAX_SCALE)
    return float(reach), bool(fast & torch.isfinite(reach))


def search(q: Tensor, train: Tensor, k: int, train_chunk: int, scale: Tensor | None,
            bank: tuple[float, bool]) -> tuple[Tensor, Tensor]:
    """``topk_neighbours`` for float64 queries ``q (Q, D)``, ``scale (N,)`` float64 or None on ``q``'s device and
    ``bank = bank_range(...)``: a float32 scan for ``k + CANDIDATE_MARGIN`` candidates, re-ranked exactly in float64;
    the queries whose candidates cannot be proven to hold the exact top-``k`` go through ``_topk_exact``."""
    n, dim = train.shape
    k = min(k, n)
    reach, fast = bank
    if k == 0 or not fast:
        return _topk_exact(q, train, k, train_chunk, scale)
    m = min(n, k + CANDIDATE_MARGIN)
    scale32 = scale.to(torch.float32) if scale is not None else None
    with _ieee_float32_matmul():
        f, cand = _scan_float32(q.to(torch.float32), train, m, train_chunk, scale32)
    sims, idx = _rerank(q, train, cand, scale)
    sims, idx = sims[:, :k].contiguous(), idx[:, :k].contiguous()
    if m == n:  # every train item is a candidate: the re-ranked ones are the answer
        return sims, idx
    # an excluded train item j has f_j <= f[:, -1] and |f_j - s_j| <= bound, so it ranks below the k-th re-ranked
    # item, strictly (an excluded exact tie could have a lower index), when f[:, -1] + bound < sims[:, -1]
    qnorm = q.norm(dim=1)
    bound = (dim + 2) * 2.0**-23 * qnorm * reach + SIMILARITY_GRID
    ok = (f[:, -1].to(torch.float64) + 2 * bound < sims[:, -1]) & (qnorm <= _FAST_MAX_NORM)
    if not bool(ok.all()):  # NaN (a non-finite query) fails too
        rows = (~ok).nonzero().squeeze(1)
        sims[rows], idx[rows] = _topk_exact(q[rows], train, k, train_chunk, scale)
    return sims, idx


def _scan_float32(q: Tensor, train: Tensor, m: int, train_chunk: int,
                  scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """The ``m`` largest float32 similarities per query and their train indices, ``(Q, m)`` each, values sorted
    descending (equal values in no particular order); ``q (Q, D)`` and ``scale (N,)`` float32 on one device.
    One ``Q x train_chunk`` float32 block at a time; only each chunk's top ``m`` is merged into the running top."""
    best_f, best_i = q.new_empty((q.shape[0], 0)), torch.zeros((q.shape[0], 0), dtype=torch.long, device=q.device)
    in_place = train.dtype == q.dtype and train.device == q.device  # else: a float32 copy per chunk, one buffer
    buf = q.new_empty((0 if in_place else min(train_chunk, train.shape[0]), q.shape[1]))
    for start in range(0, train.shape[0], train_chunk):
        chunk = _upcast(train[start : start + train_chunk], buf)
        f = q @ chunk.T
        if scale is not None:
            f *= scale[start : start + chunk.shape[0]]
        f, pos = f.topk(min(m, f.shape[1]), dim=1)
        pos += start
        if best_f.shape[1]:
            f, pos = torch.cat([best_f, f], 1), torch.cat([best_i, pos], 1)
            f, sel = f.topk(min(m, f.shape[1]), dim=1)
            pos = pos.gather(1, sel)
        best_f, best_i = f, pos
    return best_f, best_i


def _rerank(q: Tensor, train: Tensor, cand: Tensor, scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """Exact float64 similarities of the candidates ``cand (Q, M)`` (train indices) to ``q (Q, D)`` float64, snapped
    to ``SIMILARITY_GRID``; returns ``(sims, index)`` ``(Q, M)`` in the order (similarity desc, index asc).
    Candidate features are gathered and upcast ``_RERANK_ELEMENTS`` values at a time."""
    nq, m = cand.shape
    dim = q.shape[1]
    sims = q.new_empty((nq, m))
    step = min(nq, max(1, _RERANK_ELEMENTS // max(1, m * dim)))
    gathered = train.new_empty((step * m, dim))  # buffers reused by every step: no heap fragmentation
    buf = q.new_empty((0, dim) if gathered.dtype == q.dtype and gathered.device == q.device else (step * m, dim))
    for s in range(0, nq, step):
        c = cand[s : s + step]
        rows = torch.index_select(train, 0, c.reshape(-1).to(train.device), out=gathered[: c.numel()])
        rows = _upcast(rows, buf).view(c.shape[0], m, dim)
        # a multiply and a sum, not bmm: a (m, D) @ (D, 1) float64 product is ~3x slower on the CPU
        torch.sum(rows.mul_(q[s : s + step, None, :]), dim=2, out=sims[s : s + step])
    if scale is not None:
        sims *= scale[cand]
    sims = snap_similarities(sims)
    cand, by_index = cand.sort(dim=1)
    sims = sims.gather(1, by_index)
    order = sims.sort(dim=1, descending=True, stable=True).indices  # stable: equal sims keep index order
    return sims.gather(1, order), cand.gather(1, order)


@contextmanager
def _ieee_float32_matmul() -> Iterator[None]:
    """float32 matmuls in full IEEE float32 inside (no TF32 on CUDA, no bf16 in oneDNN on the CPU, which
    ``torch.set_float32_matmul_precision("medium")`` enables); the caller's flags are restored on exit."""
    try:
        backends = [(b, b.fp32_precision) for b in (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)]
    except AttributeError:  # torch < 2.9: only the legacy flags
        backends = []
    if backends:
        try:
            for backend, _ in backends:
                backend.fp32_precision = "ieee"
            yield
        finally:
            for backend, old in backends:
                backend.fp32_precision = old
        return
    old_precision, old_tf32 = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = False
        yield
    finally:
        torch.set_float32_matmul_precision(old_precision)
        torch.backends.cuda.matmul.allow_tf32 = old_tf32


def _topk_exact(q: Tensor, train: Tensor, k: int, train_chunk: int, scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """The exact search: ``topk_neighbours`` computed in float64 over the whole bank, for ``q (Q, D)`` float64 and
    ``scale (N,)`` float64 or None on ``q``'s device. Train chunks of at most ``train_chunk`` rows and
    ``_EXACT_CHUNK_ELEMENTS`` values are upcast one at a time (the result does not depend on the chunk size)."""
    k = min(k, train.shape[0])
    train_chunk = max(1, min(train_chunk, _EXACT_CHUNK_ELEMENTS // max(1, train.shape[1])))
    best_sim = q.new_empty((q.shape[0], 0))
    best_idx = torch.zeros((q.shape[0], 0), dtype=torch.long, device=q.device)
    buf = q.new_empty((min(train_chunk, train.shape[0]), train.shape[1]))
    for start in range(0, train.shape[0], train_chunk):
        chunk = _upcast(train[start : start + train_chunk], buf)
        sims = q @ chunk.T
        if scale is not None:
            sims *= scale[start : start + chunk.shape[0]]
        sims = snap_similarities(sims)
        idx = torch.arange(start, start + chunk.shape[0], device=q.device).expand_as(sims)
        # best_idx is kept in increasing index order, so every row of the concatenation is sorted by index
        best_sim, best_idx = _top_k_lowest_index(torch.cat([best_sim, sims], 1), torch.cat([best_idx, idx], 1), k)
    order = best_sim.sort(dim=1, descending=True, stable=True).indices  # stable: equal sims keep index order
    return best_sim.gather(1, order), best_idx.gather(1, order)


def _top_k_lowest_index(sims: Tensor, idx: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` entries of each row that come first by (similarity desc, index asc), in their row order.

    ``sims`` and ``idx`` are ``(Q, M)`` with every row of ``idx`` increasing; returns ``(Q, min(k, M))`` each, still
    in increasing index order. ``topk`` alone would pick an arbitrary subset of the values equal to the k-th largest;
    here every value above it is kept and, of those equal to it, the ones with the lowest indices (a cumulative count
    along the index-sorted row).
    """
    k = min(k, sims.shape[1])
    if k == 0:
        return sims[:, :0], idx[:, :0]
    kth = sims.topk(k, dim=1).values[:, -1:]
    above = sims > kth
    tied = sims == kth
    keep = above | (tied & (tied.cumsum(1) <= k - above.sum(1, keepdim=True)))
    pos = keep.nonzero()[:, 1].view(sims.shape[0], k)  # row-major: each row's positions in increasing order
    return sims.gather(1, pos), idx.gather(1, pos)


def row_norms(x: Tensor, chunk: int = 4096) -> Tensor:
    """``|x_i|`` per row in float64, ``(N,)`` on ``x``'s device, upcasting ``chunk`` rows at a time into one reused
    buffer (a fresh ~10 MiB temporary per chunk fragments the CPU heap: measured +2.8 GiB RSS for 1M x 384)."""
    norms = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    buf = torch.empty((min(chunk, x.shape[0]), x.shape[1]), dtype=torch.float64, device=x.device)
    for i in range(0, x.shape[0], chunk):
        torch.linalg.vector_norm(_upcast(x[i : i + chunk], buf), dim=1, out=norms[i : i + chunk])
    return norms


def _upcast(x: Tensor, buf: Tensor) -> Tensor:
    """``x (c, D)`` in ``buf``'s dtype and device: ``x`` itself when it already is, else copied into ``buf[:c]``
    (``buf (>= c, D)``, reused from call to call, so no new temporary is allocated)."""
    if x.dtype == buf.dtype and x.device == buf.device:
        return x
    out = buf[: x.shape[0]]
    out.copy_(x)
    return out


def _inverse_row_norms(x: Tensor, eps: float = 1e-12) -> Tensor:
    """``1 / max(|x_i|, eps)`` per row in float64 (as ``F.normalize``); ``(N,)``."""
    return 1.0 / row_norms(x).clamp_min(eps)

"""TIES-Merging's steps: trim, elect sign, disjoint mean (Yadav et al. 2023), used by the core (:mod:`lib.merge.core`) and by DRM.

The three steps are small public functions over stacked task vectors ``(N, ...)`` so that other
methods (DARE-TIES, DRM) compose them:

>>> kept = trim_topk(taus, density=0.2, batch_dims=1)      # each expert's top 20 % magnitudes
>>> merged_tau = disjoint_mean(kept, elect_sign(kept))

Conventions, stated once because they decide edge cases:

* "top-density magnitudes" keeps every entry whose magnitude is at least the k-th largest;
  entries tied with the k-th largest are all kept. Magnitudes are compared in float32 (float64
  task vectors are ranked by their float32 rounding), which is what makes the model-wide
  threshold exact and cheap to stream (see :func:`kth_largest_magnitude`).
* ``k`` over the whole model (``scope="model"``, the paper's TIES) is ``ceil(density * n)``
  (:func:`kept_count`); the official TIES code keeps the entries at least as large as the
  ``(n - int(density * n))``-th smallest, ``int(density * n) + 1`` of them, and MergeLM those at
  least as large as the ``int((1 - density) * n)``-th smallest -- an entry more in a hundred
  million. Per tensor (``scope="tensor"``, how PEFT and mergekit apply TIES)
  ``k`` is ``int(density * n)`` (:func:`floor_kept_count`), PEFT's and mergekit's count, so that
  a merge compared with PEFT's ``ties`` gets the same tensors: on an 11-entry tensor at density 0.2
  that is 2 entries, where ``ceil`` would keep 3. (PEFT keeps exactly ``k``, breaking ties at the
  threshold arbitrarily; for real task vectors there are none.)
* An entry whose summed mass is exactly zero gets no elected sign and merges to 0. The reference
  implementation instead gives such entries the model-wide majority sign, PEFT and mergekit the
  sign +; the first needs a look across the whole model for a measure-zero event, so we do not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor

from . import check_range

#: radix select works on 16-bit digits of the float32 bit pattern: two passes, 65536 bins each
_DIGIT_BITS = 16
_BINS = 1 << _DIGIT_BITS
#: one entry in this many goes into the sample that brackets a k-th largest (:func:`kth_largest`);
#: a prime, so that the sample walks through every column of a matrix whatever its width
_SAMPLE_STRIDE = 61
#: rows shorter than this are ranked whole: the bracket would save nothing
_SMALL_ROW = 1 << 16
#: entries of one stream's sample (and of its bracket) kept by the model-wide selection: 16 MiB
_SAMPLE_CAP = 1 << 22
#: the float32 bit pattern of +inf, read as int32
_INF_BITS = 0x7F800000


def kept_count(n: int, density: float) -> int:
    """How many of ``n`` entries a trim at ``density`` keeps: ``ceil(density * n)``, robust to
    float rounding (``0.2 * 10`` is 2.0000000000000004, which must still give 2)."""
    return min(n, max(0, math.ceil(density * n * (1 - 1e-12))))


def floor_kept_count(n: int, density: float) -> int:
    """How many of ``n`` entries PEFT's and mergekit's per-tensor magnitude trim keeps:
    ``int(density * n)``, the float product truncated exactly as they compute it (so 0.29 of 100
    keeps 28 there and here)."""
    return min(n, max(0, int(density * n)))


def _magnitude_bits(t: Tensor) -> Tensor:
    """|t| as float32 bit patterns read as int32: for non-negative floats the integer order is
    the value order, so selecting on bits selects on magnitudes."""
    return t.detach().abs().to(torch.float32).reshape(-1).view(torch.int32)


def trim_topk(
    tau: Tensor,
    density: float,
    *,
    batch_dims: int = 0,
    count: Callable[[int, float], int] = kept_count,
    inplace: bool = False,
) -> Tensor:
    """Zero all but the top-``density`` fraction of magnitudes of ``tau``: the ``count(n, density)``
    largest of each ranked group of ``n`` (:func:`kept_count` or :func:`floor_kept_count`).

    ``batch_dims=0`` ranks the whole tensor; ``batch_dims=1`` ranks each ``tau[i]`` separately
    (one task vector per row of a stack ``(N, ...)``). ``inplace=True`` (for a contiguous tensor
    the caller owns) zeroes the trimmed entries inside ``tau``: the same values, except that a
    trimmed negative entry becomes ``+0.0`` rather than ``-0.0``.
    """
    check_range("density", density, 0.0, 1.0)
    if batch_dims not in (0, 1):
        raise ValueError(f"batch_dims must be 0 (whole tensor) or 1 (each tau[i] separately), got {batch_dims}")
    rows = tau.reshape(1, -1) if batch_dims == 0 else tau.reshape(tau.shape[0], -1)
    k = count(rows.shape[1], density)
    if k == 0:
        return tau.zero_() if inplace else torch.zeros_like(tau)
    magnitude = rows.abs().to(torch.float32)
    if inplace and rows.data_ptr() == tau.data_ptr() and tau.is_contiguous():
        thresholds = kth_largest(magnitude, k)
        del magnitude  # one stack of temporaries fewer while the rows are trimmed
        _trim_rows_below(rows, thresholds)
        return tau
    return (rows * (magnitude >= kth_largest(magnitude, k))).reshape(tau.shape)


def kth_largest(rows: Tensor, k: int) -> Tensor:
    """The exact k-th largest entry of each row of ``rows (R, n)`` (``1 <= k <= n``), as ``(R, 1)``.

    A full top-k of a large row costs about 16 times what this does: a strided sample of the row
    brackets the k-th largest between two of its order statistics (:func:`_bracket`), one pass
    counts the entries above the bracket and gathers those inside it (a few per cent of the row),
    and the k-th largest is selected among those. The count proves the bracket right; where it is
    not (a sample far off, which the margin makes rare) the row is ranked whole. Same value as
    ``topk(rows, k).values.min()``, ties included."""
    n = rows.shape[1]
    if n < _SMALL_ROW:
        return torch.topk(rows, k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    out = []
    for row in rows:
        lo, hi = _bracket(row[::_SAMPLE_STRIDE], k, n)
        band, hi = _band(row, lo, hi)
        above = _count_above(row, hi)
        need = k - above
        if 1 <= need <= band.numel():
            out.append(torch.kthvalue(band, band.numel() - need + 1).values)
        else:  # the bracket missed: rank the whole row
            out.append(torch.topk(row, k, sorted=False).values.amin())
    return torch.stack(out).reshape(-1, 1)


def _band(row: Tensor, lo: float, hi: float) -> tuple[Tensor, float]:
    """The entries of ``row`` (non-negative, no NaN) in ``[lo, hi]``, and that ``hi``, in one
    integer pass: for non-negative floats the order of the float32 bit patterns is the order of
    the values, so ``lo <= x <= hi`` is ``|bits(x) - c| <= h`` for the bit patterns' midpoint
    ``c`` and half-width ``h``. An odd width is made even by taking one float more at ``hi`` (or
    one less at ``lo``): the caller counts the entries above the ``hi`` returned."""
    if row.dtype != torch.float32:
        return row[(row >= lo) & (row <= hi)], hi
    lo_b, hi_b = (_float_bits(max(lo, 0.0)), _float_bits(hi))
    if (hi_b - lo_b) % 2:
        if hi_b < _INF_BITS:
            hi_b += 1
        else:
            lo_b -= 1
    mask = (row.view(torch.int32) - (lo_b + hi_b) // 2).abs_() <= (hi_b - lo_b) // 2
    return row[mask], _bits_float(hi_b)


def _count_above(row: Tensor, hi: float) -> int:
    """How many entries of ``row`` exceed ``hi``. For a float32 row of at most 2**24 entries in
    float passes (a comparison to a bool mask and its sum cost about twice as much): threshold
    keeps ``x > hi`` and zeroes the rest, sign_ makes those 1, and a float32 sum of at most 2**24
    ones is exact."""
    if row.dtype != torch.float32 or row.numel() > 1 << 24:
        return int((row > hi).sum())
    return int(torch.nn.functional.threshold(row, hi, 0.0).sign_().sum())


def _float_bits(x: float) -> int:
    return int(torch.tensor(x, dtype=torch.float32).view(torch.int32))


def _bits_float(b: int) -> float:
    return float(torch.tensor(b, dtype=torch.int32).view(torch.float32))


def _bracket(sample: Tensor, k: int, n: int) -> tuple[float, float]:
    """Two values ``lo <= hi`` between which the k-th largest of ``n`` entries very probably lies,
    from ``sample``, a strided subset of them: the sample's order statistics six binomial standard
    deviations (plus a few entries) either side of the rank the k-th largest should have there;
    ``-inf``/``inf`` where that rank falls off the sample."""
    s = sample.numel()
    rank = k * s / n
    margin = 6.0 * math.sqrt(rank * max(0.0, 1.0 - k / n)) + 8.0
    top, bottom = math.floor(rank - margin), math.ceil(rank + margin)
    hi = math.inf if top < 1 else float(torch.kthvalue(sample, s - top + 1).values)
    lo = -math.inf if bottom > s else float(torch.kthvalue(sample, s - bottom + 1).values)
    return lo, hi


def trim_below(tau: Tensor, threshold: float | Tensor, *, inplace: bool = False) -> Tensor:
    """Zero the entries of ``tau`` whose float32 magnitude is below ``threshold`` (a scalar, or
    one threshold per row of a stack ``(N, ...)``); ``inplace`` zeroes them inside ``tau``."""
    threshold = torch.as_tensor(threshold, dtype=torch.float32, device=tau.device)
    if inplace and threshold.ndim == 1 and len(threshold) == len(tau) and tau.is_contiguous():
        _trim_rows_below(tau.reshape(len(tau), -1), threshold)
        return tau
    threshold = threshold.reshape(-1, *([1] * (tau.ndim - 1))) if threshold.ndim else threshold
    below = tau.abs().to(torch.float32) < threshold
    return tau.masked_fill_(below, 0) if inplace else tau * ~below


def _trim_rows_below(rows: Tensor, thresholds: Tensor) -> None:
    """Zero, inside ``rows (R, n)`` (contiguous), the entries whose float32 magnitude is below the
    row's threshold: ``masked_fill_(|rows| < threshold, 0)``, same values (trimmed entries become
    ``+0.0``), in one pass per row instead of a comparison, a mask and a masked fill.

    For float32 rows ``hardshrink`` with the float32 number just below the threshold does it:
    ``|x| <= nextafter(t, 0)`` exactly when ``|x| < t``, and hardshrink writes ``+0.0``. Other
    dtypes (whose magnitudes are ranked by their float32 rounding) take the mask."""
    thresholds = thresholds.reshape(-1).to(device="cpu", dtype=torch.float32)
    below = torch.nextafter(thresholds, torch.zeros_like(thresholds)).tolist()
    for row, t, b in zip(rows, thresholds.tolist(), below):
        if t == 0:  # every magnitude is >= 0: nothing is trimmed
            continue
        if math.isinf(t):  # k = 0 (or nothing finite at or above): all trimmed
            row.zero_()
        elif row.dtype == torch.float32:
            torch.ops.aten.hardshrink.out(row, b, out=row)
        else:
            row.masked_fill_(row.abs().to(torch.float32) < t, 0)


def elect_sign(taus: Tensor) -> Tensor:
    """Sign of the summed mass over experts (dim 0): +1, -1, or 0 where the sum is exactly 0."""
    return torch.sign(taus.sum(dim=0))


def disjoint_mean(taus: Tensor, signs: Tensor, *, inplace: bool = False) -> Tensor:
    """Mean over experts (dim 0) of the non-zero entries that agree with the elected sign; 0
    where none does.

    ``inplace=True`` (for a stack the caller owns) zeroes the disagreeing entries inside ``taus``,
    which leaves the agreeing ones as its only non-zeros: about two stacks of temporaries instead
    of four, which is what bounds the streaming merge's memory (``benchmarks/stream_merge.py``).
    Same result either way.
    """
    if inplace:
        # an entry agrees when its product with the elected sign is positive: non-zero and of
        # that sign (exact: the sign is -1, 0 or 1). clamp(min=0) of that product keeps |tau| of
        # the agreeing entries and zeroes the rest; their sum times the sign is the sum of the
        # agreeing entries exactly (rounding is symmetric in the sign, and adding zeros changes
        # no non-zero sum), and sign_ of what is left counts them. Four in-place passes over the
        # stack, no mask. A zero result may come out as -0.0 there; + 0.0 makes it +0.0, as the
        # sum of the zeroed entries gives.
        magnitude = taus.mul_(signs).clamp_(min=0)
        total = magnitude.sum(dim=0).mul_(signs)
        count = magnitude.sign_().sum(dim=0).clamp_(min=1)
        return total.div_(count).add_(0.0)
    agree = (torch.sign(taus) == signs) & (taus != 0)
    total = (taus * agree).sum(dim=0)
    # counted in the task vectors' dtype rather than int64: half the memory, and small integer
    # counts are exact in any float type, so the quotient is unchanged
    count = agree.sum(dim=0, dtype=taus.dtype).clamp_(min=1)
    return total / count


def kth_largest_magnitude(items: Iterable[Sequence[Tensor]], rank: Sequence[int] | Callable[[int], int]) -> list[float]:
    """Exact k-th largest float32 magnitude of each of N streams of tensors, reading them twice.

    ``items`` yields, once per tensor position, a sequence of N tensors (one per stream, e.g. the
    task vectors of N experts for one key); it must be re-iterable (a list, or an object whose
    ``__iter__`` starts over, such as a reader that reopens the checkpoint files). ``rank`` is the
    k wanted in each stream (1 = the largest), or a function from a stream's number of entries to
    its k (counted during the first pass, so the sizes cost no extra read). Returns ``inf`` for a
    stream whose k is 0.

    Pass 1 counts the entries and keeps a strided sample of each stream's magnitudes; the sample
    brackets the k-th largest (:func:`_bracket`); pass 2 counts the entries above the bracket and
    gathers those inside it, among which the k-th largest is selected. A few fast passes over
    memory instead of histograms of every tensor. Memory: at most :data:`_SAMPLE_CAP` entries of
    sample and of bracket per stream (the sample is thinned as it grows), never the whole model.
    A stream whose bracket missed, or held too much, is ranked by :func:`_radix_select` (two more
    passes); the result is the same either way.
    """
    samples, sizes = _strided_samples(items)
    ks = [rank(n) for n in sizes] if callable(rank) else list(rank)
    if len(ks) != len(sizes):
        raise ValueError(f"got {len(ks)} ranks for {len(sizes)} streams")
    bad = [(k, n) for k, n in zip(ks, sizes) if not 0 <= k <= n]
    if bad:
        raise ValueError(f"cannot take the {bad[0][0]}-th largest of {bad[0][1]} entries")
    brackets = [_bracket(sample, k, n) if k > 0 else (math.inf, math.inf) for sample, k, n in zip(samples, ks, sizes)]
    above = [0] * len(ks)
    bands: list[list[Tensor] | None] = [[] for _ in ks]
    for tensors in items:
        for i, t in enumerate(tensors):
            if ks[i] == 0 or bands[i] is None:
                continue
            lo, hi = brackets[i]
            magnitude = t.detach().abs().to(torch.float32).reshape(-1)
            above[i] += int((magnitude > hi).sum())
            bands[i].append(magnitude[(magnitude >= lo) & (magnitude <= hi)])
            if sum(b.numel() for b in bands[i]) > _SAMPLE_CAP:
                bands[i] = None  # too wide a bracket to hold: radix select instead
        del tensors
    out: list[float | None] = []
    for k, up, band in zip(ks, above, bands):
        band = None if band is None or k == 0 else torch.cat(band)
        need = k - up
        if k == 0:
            out.append(math.inf)
        elif band is not None and 1 <= need <= band.numel():
            out.append(float(torch.kthvalue(band.cpu(), band.numel() - need + 1).values))
        else:
            out.append(None)
    missed = [i for i, x in enumerate(out) if x is None]
    if missed:
        exact = _radix_select(items, ks)
        out = [exact[i] if x is None else x for i, x in enumerate(out)]
    return out


def _strided_samples(items) -> tuple[list[Tensor], list[int]]:
    """Pass 1 of :func:`kth_largest_magnitude`: each stream's number of entries and a sample of
    its magnitudes (every ``stride``-th entry of each tensor, thinned to at most
    :data:`_SAMPLE_CAP` entries by doubling the stride)."""
    samples: list[list[Tensor]] | None = None
    for tensors in items:
        if samples is None:
            samples, sizes, strides = [[] for _ in tensors], [0] * len(tensors), [_SAMPLE_STRIDE] * len(tensors)
        if len(tensors) != len(samples):
            raise ValueError(f"expected {len(samples)} tensors per item (one per stream), got {len(tensors)}")
        for i, t in enumerate(tensors):
            sizes[i] += t.numel()
            samples[i].append(t.detach().reshape(-1)[:: strides[i]].abs().to(torch.float32).cpu())
            if sum(x.numel() for x in samples[i]) > _SAMPLE_CAP:
                samples[i], strides[i] = [torch.cat(samples[i])[::2]], 2 * strides[i]
        del tensors
    if samples is None:
        raise ValueError("no tensors to rank: the selection of keys is empty")
    return [torch.cat(x) for x in samples], sizes


def _radix_select(items, ks: Sequence[int]) -> list[float]:
    """The k-th largest float32 magnitude of each stream by radix select on the bit patterns:
    one pass histograms the top 16 bits of every magnitude and finds the bin holding the k-th
    largest, a second the low 16 bits of the entries in that bin. Memory: one ``(N, 65536)``
    int64 histogram plus one tensor's bit patterns at a time."""
    remaining, prefix = list(ks), [0] * len(ks)
    for shift in (_DIGIT_BITS, 0):
        counts = _digit_histogram(items, shift, prefix if shift == 0 else [])
        # from the largest bin down: the first bin where the running count reaches k
        from_top = counts.flip(1).cumsum(1).cpu()
        for i, k in enumerate(remaining):
            if k > 0:
                top_bin = int(torch.searchsorted(from_top[i], k))
                remaining[i] -= int(from_top[i, top_bin - 1]) if top_bin > 0 else 0
                prefix[i] = (prefix[i] << _DIGIT_BITS) | (_BINS - 1 - top_bin)
    return [
        math.inf if k == 0 else float(torch.tensor([p], dtype=torch.int32).view(torch.float32))
        for k, p in zip(ks, prefix)
    ]


def _digit_histogram(items, shift: int, prefix: Sequence[int]) -> Tensor:
    """``(N, 65536)`` counts of the 16-bit digit at ``shift`` of every magnitude of each stream;
    with ``prefix`` (second pass) only of the entries whose high digit equals ``prefix[i]``."""
    counts = None
    for tensors in items:
        if counts is None:
            counts = torch.zeros(len(tensors), _BINS, dtype=torch.int64, device=tensors[0].device)
        if len(tensors) != len(counts):
            raise ValueError(f"expected {len(counts)} tensors per item (one per stream), got {len(tensors)}")
        for i in range(len(tensors)):
            _count_digits(counts[i], tensors[i], shift, prefix[i] if prefix else None)
        del tensors  # the loop variable would keep this item alive while the next one is read
    if counts is None:
        raise ValueError("no tensors to rank: the selection of keys is empty")
    return counts


def _count_digits(counts: Tensor, t: Tensor, shift: int, prefix: int | None) -> None:
    """Add to ``counts`` (65536,) the digits at ``shift`` of the magnitudes of ``t`` (only of those
    whose high digit is ``prefix``, when given). A function of its own so that its temporaries,
    each the size of ``t``, are freed before the next tensor's are made."""
    bits = _magnitude_bits(t)
    if prefix is not None:
        bits = bits[(bits >> _DIGIT_BITS) == prefix]
    digits = (bits >> shift) & (_BINS - 1)
    if digits.numel() >= _BINS:  # bincount's 65536-bin output is small next to the tensor
        counts += torch.bincount(digits, minlength=_BINS)
    else:  # a small tensor: touch only the bins it hits
        counts.index_add_(0, digits.long(), torch.ones(digits.shape, dtype=torch.int64, device=digits.device))


def model_thresholds(items, *, density, lam=1.0, scope="model"):
    """Prepass of ``ties`` (:mod:`lib.merge.core`): each expert's model-wide magnitude threshold
    (the k-th largest |tau| over every selected tensor of that expert), or None for
    ``scope="tensor"``."""
    from . import METHODS

    return METHODS["ties"].prepass(items, density=density, lam=lam, scope=scope)


class TaskVectorItems:
    """Re-iterable view of prepass items ``(key, base, [experts])`` as lists of task vectors, each
    passed through ``transform(key, expert_index, tau)`` when one is given (DARE's drop)."""

    def __init__(self, items, transform: Callable[[str, int, Tensor], Tensor] | None = None, *, method: str = "ties"):
        if isinstance(items, Iterator):  # a generator would be empty on the second pass
            raise TypeError(
                f"{method} with a model-wide threshold reads the tensors twice (exact radix select of the magnitude "
                "threshold); pass a re-iterable -- a list, or an object whose __iter__ starts over -- not an iterator"
            )
        self.items, self.transform, self.method = items, transform, method

    def __iter__(self):
        # map, unlike a for loop, holds no reference to an item once its task vectors are made,
        # so a lazy reader's tensors are freed before it reads the next ones
        return map(self._task_vectors, self.items)

    def _task_vectors(self, item) -> list[Tensor]:
        key, base, experts = item
        if base is None:
            raise ValueError(
                f"{self.method} works on task vectors (expert - base) and needs the base model; {key!r} has none"
            )
        if self.transform is None:
            return [e - base for e in experts]
        return [self.transform(key, i, e - base) for i, e in enumerate(experts)]


def ties_merge_taus(taus: Tensor, density: float, *, thresholds=None, inplace: bool = False) -> Tensor:
    """TIES on one stack of task vectors ``(N, ...)``: trim (per tensor to PEFT's count
    :func:`floor_kept_count`, or below the given per-expert ``thresholds``), elect signs, disjoint
    mean. ``inplace=True`` (for a stack the caller owns) trims and merges inside ``taus`` (see
    :func:`disjoint_mean`)."""
    if thresholds is None:
        kept, owned = (
            trim_topk(taus, density, batch_dims=1, count=floor_kept_count),
            True,
        )  # a new tensor: free to reuse
    else:
        kept, owned = trim_below(taus, thresholds, inplace=inplace), inplace
    return disjoint_mean(kept, elect_sign(kept), inplace=owned)

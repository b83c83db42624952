"""How well will two experts merge? Interpretable pairwise properties, and a sparse linear model
that predicts the merged model's normalized accuracy from them (seed 003, "Demystifying
Mergeability", which finds gradient alignment the most telling property).

>>> metrics = pairwise_metrics(base_sd, expert_a_sd, expert_b_sd, exclude="classifier")
>>> metrics["cosine"], metrics["sign_conflict"], metrics["subspace_overlap"]

Every property is computed on the *task vectors* ``tau = expert - base`` of the selected
floating-point tensors (``include``/``exclude`` as in :func:`lib.statedict.matches`; leave out
heads whose shapes differ between tasks). An expert equal to the base has no task vector and is
an error. The properties (the keys of :func:`pairwise_metrics` and :func:`compare`, all symmetric
in the two experts):

``cosine``
    ``<tau_a, tau_b> / (|tau_a| |tau_b|)`` over the whole model: 1 for the same direction, 0 for
    orthogonal updates, -1 for opposite ones.
``layer_cosine``
    the mean over tensors of the same cosine taken tensor by tensor (every tensor counts once,
    whatever its size; the whole-model cosine is dominated by the largest tensors, e.g. word
    embeddings). Per tensor values: :func:`layer_table`.
``subspace_overlap``
    per weight matrix, how much the top-``k`` singular subspaces of the two task vectors
    coincide: ``(|U_aᵀ U_b|_F² + |V_aᵀ V_b|_F²) / (2 min(r_a, r_b))`` with ``U``, ``V`` the top
    left and right singular vectors and ``r`` the number of non-zero singular values among the
    top ``k`` (so a rank-1 update is compared on its one direction). 1 when the smaller subspace
    lies inside the larger, 0 when they are orthogonal, about ``k / dim`` for random subspaces.
    Averaged over matrices.
``magnitude_ratio``
    ``min(|tau_a|, |tau_b|) / max(...)``: 1 for updates of equal size; small when one expert's
    update would dominate a sum.
``sign_conflict``
    among the coordinates changed by both experts, the fraction changed in opposite directions
    (TIES' "sign conflicts"): 0 for identical updates, 1 for opposite ones, about 1/2 for
    unrelated ones.
``snr_rank_corr``, ``snr_agreement``
    the Marchenko-Pastur SNR of every weight matrix of each *expert* (:mod:`lib.spectral`, the
    quantity the SNR-routed merges rank layers by): the Spearman rank correlation of the two
    experts' per-matrix SNRs, and the fraction of matrices both experts put on the same side of
    the high/low split at ``top`` (:func:`lib.merge.snr.decide_layers`' rule).
``tv_snr_rank_corr``
    the same rank correlation for the SNRs of the task vectors' matrices (where each fine-tuning
    wrote signal above the noise bulk).
``gradient_cosine_<name>``, ``gradient_l2_<name>``
    for each named set of loss gradients both profiles carry (:func:`loss_gradient` on a small
    batch of each expert's task): their cosine and the Euclidean distance between them. The
    notebook uses ``base`` (each task's gradient at the common starting point: do the first
    steps of the two fine-tunings pull the shared weights the same way?) and ``expert`` (each
    expert's gradient on its own task at its own weights, seed 003's "encoder gradient").

Spectra and singular vectors are computed once per expert (:func:`profile`), batched by shape on
:func:`lib.device.get_device`, so comparing ``n`` experts pairwise costs ``n`` decompositions.

The second half fits the sparse linear model: :func:`leave_one_pair_out` standardises the
properties, fits an L1-regularised linear model (scikit-learn's Lasso, its penalty chosen by
cross-validation inside each training set), and predicts every pair from a model that never saw
it. :func:`r2_interval` (bootstrap over pairs) and :func:`permutation_pvalue` (the same pipeline
on shuffled targets) say how much a handful of pairs can support.

The merges themselves are :mod:`lib.pool`'s (the runner of notebooks 04-05): each pair is a
subset of size two of the text pool, its bodies merged and scored under each task's own head,
and :func:`lib.pool.subset_scores` gives the target. The notebook runs its pairs through
:func:`lib.runner.run_grid`, whose record store holds the pairs those notebooks already merged,
so only the rest are merged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from . import batching, cache, data, linalg, spectral, train
from .device import get_device
from .merge.snr import decide_layers
from .pool import subset_name
from .statedict import StateDict, as_matrix, check_finite, compute_dtype, is_matrix, matches

#: singular directions per matrix compared by ``subspace_overlap``
DEFAULT_K = 8
#: fraction of matrices counted as high-SNR by ``snr_agreement`` (the SNR merges' ``top``)
DEFAULT_TOP = 0.5
#: entries of one stack of same-shape matrices decomposed at once (float64: 256 MiB)
SVD_BATCH_ELEMENTS = 1 << 25


# ---------------------------------------------------------------------------------------------
# task vectors and the properties of a pair


def task_vector(base: Mapping[str, Tensor], expert: Mapping[str, Tensor], *, include=None, exclude=None) -> StateDict:
    """``expert - base`` for every floating-point tensor of ``base`` passing ``include``/``exclude``,
    in float32 (float64 stays float64) on the CPU. The expert must have those keys with the same
    shapes and finite values; tensors outside the selection may differ (task-specific heads)."""
    keys = [k for k, t in base.items() if torch.is_floating_point(t) and matches(k, include, exclude)]
    if not keys:
        raise ValueError("no floating-point tensor of the base passes include/exclude; nothing to compare")
    out = {}
    for k in keys:
        if k not in expert:
            raise ValueError(
                f"the expert is missing {k!r} present in the base; check that both are the same architecture"
            )
        if expert[k].shape != base[k].shape:
            raise ValueError(
                f"{k!r} has shape {tuple(expert[k].shape)} in the expert and {tuple(base[k].shape)} in the base; "
                "exclude it (e.g. a head with another number of classes) or pass the expert's own base"
            )
        check_finite(expert[k], f"expert: {k!r}")
        dtype = compute_dtype(base[k])
        out[k] = expert[k].detach().cpu().to(dtype) - base[k].detach().cpu().to(dtype)
    if all(not bool(t.any()) for t in out.values()):
        raise ValueError(
            "the expert equals the base on every selected tensor: its task vector is zero, so no "
            "pairwise property is defined; check that the right base and expert were passed"
        )
    return out


def _same_keys(a: Mapping[str, Tensor], b: Mapping[str, Tensor], what: str) -> list[str]:
    if list(a) != list(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        detail = (
            f"{only_a[:1]} only in the first, {only_b[:1]} only in the second"
            if only_a or only_b
            else "in another order"
        )
        raise ValueError(
            f"the two {what} must cover the same tensors: {detail}; build both with the same include/exclude"
        )
    return list(a)


#: per key, ``(<a, b>, |a|², |b|²)`` in float64: every inner-product property comes from these
InnerProducts = dict[str, tuple[float, float, float]]


def inner_products(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> InnerProducts:
    """``(<a[k], b[k]>, |a[k]|², |b[k]|²)`` for every key, in float64, one pass over each pair
    of tensors (the cosines, norms and distances of a pair all derive from these)."""
    out = {}
    for k in _same_keys(a, b, "vectors"):
        x, y = a[k].double().reshape(-1), b[k].double().reshape(-1)
        out[k] = (float(x @ y), float(x @ x), float(y @ y))
    return out


def _totals(stats: InnerProducts) -> tuple[float, float, float]:
    return tuple(math.fsum(s[i] for s in stats.values()) for i in range(3))


def _cosine(dot: float, norm2_a: float, norm2_b: float) -> float:
    return dot / math.sqrt(norm2_a * norm2_b) if norm2_a > 0 and norm2_b > 0 else math.nan


def _ratio(norm2_a: float, norm2_b: float) -> float:
    return math.sqrt(min(norm2_a, norm2_b) / max(norm2_a, norm2_b)) if max(norm2_a, norm2_b) > 0 else math.nan


def cosine(a: Mapping[str, Tensor], b: Mapping[str, Tensor], *, stats: InnerProducts | None = None) -> float:
    """Cosine of two state-dict-shaped vectors (task vectors, gradients) flattened over all keys.
    ``stats``: their :func:`inner_products`, if already computed."""
    dot, norm2_a, norm2_b = _totals(inner_products(a, b) if stats is None else stats)
    if norm2_a == 0 or norm2_b == 0:
        raise ValueError(
            "one of the two vectors is zero over every tensor: its direction, and so the cosine, is undefined"
        )
    return _cosine(dot, norm2_a, norm2_b)


def distance(a: Mapping[str, Tensor], b: Mapping[str, Tensor], *, stats: InnerProducts | None = None) -> float:
    """Euclidean distance between two state-dict-shaped vectors, ``sqrt(|a|² + |b|² - 2<a, b>)``
    (float64; exact to about 1e-8 of the norms, far below any distance between two experts)."""
    dot, norm2_a, norm2_b = _totals(inner_products(a, b) if stats is None else stats)
    return math.sqrt(max(0.0, norm2_a + norm2_b - 2.0 * dot))


def magnitude_ratio(a: Mapping[str, Tensor], b: Mapping[str, Tensor], *, stats: InnerProducts | None = None) -> float:
    """``min(|a|, |b|) / max(|a|, |b|)`` of two task vectors, in [0, 1]."""
    _, norm2_a, norm2_b = _totals(inner_products(a, b) if stats is None else stats)
    if max(norm2_a, norm2_b) == 0:
        raise ValueError("both task vectors are zero: their magnitude ratio is undefined")
    return _ratio(norm2_a, norm2_b)


def sign_conflict(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """Among the coordinates both task vectors change, the fraction they change in opposite
    directions (signs are compared, not products, which can underflow to zero)."""
    both = opposite = 0
    for k in _same_keys(a, b, "task vectors"):
        sign = torch.sign(a[k]) * torch.sign(b[k])
        both += int((sign != 0).sum())
        opposite += int((sign < 0).sum())
    if both == 0:
        raise ValueError("no coordinate is changed by both task vectors: the sign-conflict rate is undefined")
    return opposite / both


# ---------------------------------------------------------------------------------------------
# spectral properties, computed once per expert


@dataclass(frozen=True, eq=False)
class Subspace:
    """The top singular directions of one task-vector matrix: ``left (rows, k)``, ``right (cols, k)``
    and ``rank``, how many of the ``k`` singular values are non-zero (the other columns are 0)."""

    left: Tensor
    right: Tensor
    rank: int


def _top_singular(stack: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(left (B, m, k), right (B, n, k), sigma (B, k))``: the top-``k`` singular triplets of every
    matrix of ``stack (B, m, n)``, float64. The smaller side's vectors come from the Gram
    eigendecomposition (:func:`lib.linalg.gram_eigh`); only ``k`` vectors of the larger side are
    formed (``A v / sigma``), which for a word-embedding table (30522 x 384) is a 48th of the
    work of a thin SVD's full ``U``. Directions of zero singular values are returned as zeros."""
    sigma, vectors, right = linalg.gram_eigh(stack)
    sigma, small = sigma[..., :k], vectors[..., :k]
    nonzero = sigma > 0
    small = small * nonzero.unsqueeze(-2)
    x = stack.to(device=small.device, dtype=small.dtype)
    other = (x if right else x.mT) @ small
    other = other * (nonzero / torch.where(nonzero, sigma, torch.ones_like(sigma))).unsqueeze(-2)
    return (other, small, sigma) if right else (small, other, sigma)


def top_subspaces(tv: Mapping[str, Tensor], k: int = DEFAULT_K, *, device=None) -> dict[str, Subspace]:
    """The top-``k`` singular subspaces of every matrix of ``tv`` (conv kernels read as
    ``(out, in*kh*kw)``), in float64, computed on stacks of equal shape on the device."""
    if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
        raise ValueError(
            f"k is the number of singular directions compared per matrix and must be a positive integer, got {k!r}"
        )
    shapes = {key: tuple(as_matrix(t, key).shape) for key, t in tv.items() if is_matrix(t)}
    dev = get_device(device)
    out = {}
    for keys in linalg.shape_batches(shapes, SVD_BATCH_ELEMENTS):
        stack = torch.stack([as_matrix(tv[key], key) for key in keys]).to(dev)
        left, right, sigma = _top_singular(stack, k)
        for i, key in enumerate(keys):
            out[key] = Subspace(left[i].cpu(), right[i].cpu(), int((sigma[i] > 0).sum()))
    return out


def subspace_overlap(a: Subspace, b: Subspace) -> float:
    """``(|U_aᵀ U_b|_F² + |V_aᵀ V_b|_F²) / (2 min(r_a, r_b))`` in [0, 1]; NaN when either matrix
    is zero (no direction to compare)."""
    rank = min(a.rank, b.rank)
    if rank == 0:
        return math.nan
    left = float((a.left.mT @ b.left).pow(2).sum())
    right = float((a.right.mT @ b.right).pow(2).sum())
    return (left + right) / (2 * rank)


def layer_snrs(sd: Mapping[str, Tensor], *, device=None) -> dict[str, float]:
    """The Marchenko-Pastur SNR (:func:`lib.spectral.snr_batch`, ``"mp"``) of every matrix of ``sd``."""
    keys = [k for k, t in sd.items() if is_matrix(t)]
    values = spectral.snr_batch([as_matrix(sd[k], k) for k in keys], "mp", device=device)
    return dict(zip(keys, values.tolist()))


def rank_correlation(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Spearman correlation of two per-matrix scores over the same matrices; NaN when either is
    constant (no ranking to compare)."""
    from scipy.stats import spearmanr

    keys = _same_keys(a, b, "per-matrix scores")
    x, y = np.array([a[k] for k in keys]), np.array([b[k] for k in keys])
    if len(keys) < 2 or np.unique(x).size < 2 or np.unique(y).size < 2:
        return math.nan
    return float(spearmanr(x, y).statistic)


def decision_agreement(a: Mapping[str, float], b: Mapping[str, float], top: float = DEFAULT_TOP) -> float:
    """Fraction of matrices that the two experts' SNRs both put among the ``top`` fraction of
    highest-SNR matrices, or both outside it (the ranking rule of the SNR merges)."""
    keys = _same_keys(a, b, "per-matrix scores")
    high_a = decide_layers({k: torch.tensor([a[k]]) for k in keys}, keys, top=top).high
    high_b = decide_layers({k: torch.tensor([b[k]]) for k in keys}, keys, top=top).high
    return sum(high_a[k] == high_b[k] for k in keys) / len(keys)


# ---------------------------------------------------------------------------------------------
# gradients


def task_batch(task: str, n: int, *, seed: int = 0, split: str = "train", data_dir=None):
    """``(inputs, labels)``: ``n`` fixed examples of ``task`` drawn by ``seed`` (text: tokenised and
    padded as for training; images: ``(n, 1, 28, 28)`` floats)."""
    spec = data.get_task(task)
    size = len(data.load(spec.name, spec.check_split(split), data_dir))
    idx = data.fixed_subset(size, n, seed)
    if spec.kind == "text":
        enc = batching.encode(spec.name, split, max_length=cache.RECIPES[spec.name].max_length, data_dir=data_dir)
        return batching.collate(enc, idx), torch.from_numpy(enc.labels[idx])
    ds = data.load_vision(spec.name, split, data_dir)
    chosen = torch.from_numpy(idx)
    return data.to_float(ds.images[chosen]), ds.labels[chosen]


def loss_gradient(model: nn.Module, inputs, labels: Tensor, *, include=None, exclude=None, device=None) -> StateDict:
    """The gradient of the mean cross-entropy of ``model`` on one batch with respect to every
    parameter passing ``include``/``exclude`` (float32, CPU). The model is evaluated in eval mode
    (no dropout, BatchNorm's stored statistics), so the gradient is that of a fixed function;
    ``model`` is returned to its device and mode afterwards and its ``.grad`` fields are untouched."""
    named = [(k, p) for k, p in model.named_parameters() if matches(k, include, exclude)]
    if not named:
        raise ValueError("no parameter of the model passes include/exclude; nothing to differentiate")
    frozen = [k for k, p in named if not p.requires_grad]
    if frozen:
        raise ValueError(f"{frozen[0]!r} does not require a gradient; unfreeze it or exclude it")
    dev = get_device(device)
    was_training, old_device = model.training, next(model.parameters()).device
    model.to(dev).eval()
    try:
        with torch.enable_grad():
            loss = nn.functional.cross_entropy(
                batching.logits_of(model, batching.to_device(inputs, dev)), labels.to(dev)
            )
            grads = torch.autograd.grad(loss, [p for _, p in named])
    finally:
        model.to(old_device).train(was_training)
    return {k: g.detach().float().cpu() for (k, _), g in zip(named, grads)}


# ---------------------------------------------------------------------------------------------
# profiles and the pairwise comparison


@dataclass(frozen=True, eq=False)
class Profile:
    """What the pairwise properties need from one expert, computed once: its task vector, the
    top singular subspaces of its matrices, the per-matrix SNRs of its weights and of its task
    vector, and named loss gradients (e.g. ``{"base": ..., "expert": ...}``)."""

    task_vector: StateDict
    subspaces: dict[str, Subspace]
    snr: dict[str, float]
    task_vector_snr: dict[str, float]
    gradients: dict[str, StateDict] = field(default_factory=dict)


def profile(
    base: Mapping[str, Tensor],
    expert: Mapping[str, Tensor],
    *,
    k: int = DEFAULT_K,
    gradients: Mapping[str, Mapping[str, Tensor]] | None = None,
    include=None,
    exclude=None,
    device=None,
) -> Profile:
    """The :class:`Profile` of ``expert`` fine-tuned from ``base`` over the selected tensors."""
    tv = task_vector(base, expert, include=include, exclude=exclude)
    weights = {key: expert[key] for key in tv}
    return Profile(
        tv,
        top_subspaces(tv, k, device=device),
        layer_snrs(weights, device=device),
        layer_snrs(tv, device=device),
        {name: dict(g) for name, g in (gradients or {}).items()},
    )


def layer_table(a: Profile, b: Profile, *, stats: InnerProducts | None = None) -> list[dict]:
    """One row per tensor: ``key``, ``cosine`` of the two task vectors there, ``subspace_overlap``
    (matrices only, else NaN) and ``magnitude_ratio`` of the tensor's two updates (NaN where both
    are zero). ``stats``: the task vectors' :func:`inner_products`, if already computed."""
    stats = inner_products(a.task_vector, b.task_vector) if stats is None else stats
    return [
        {
            "key": key,
            "cosine": _cosine(*s),
            "subspace_overlap": subspace_overlap(a.subspaces[key], b.subspaces[key])
            if key in a.subspaces
            else math.nan,
            "magnitude_ratio": _ratio(s[1], s[2]),
        }
        for key, s in stats.items()
    ]


def compare(a: Profile, b: Profile, *, top: float = DEFAULT_TOP) -> tuple[dict[str, float], list[dict]]:
    """``(properties, layers)``: every pairwise property of two profiles as ``{name: value}`` (see
    the module docstring for definitions) and their :func:`layer_table`."""
    stats = inner_products(a.task_vector, b.task_vector)
    layers = layer_table(a, b, stats=stats)
    out = {
        "cosine": cosine(a.task_vector, b.task_vector, stats=stats),
        "layer_cosine": float(np.nanmean([r["cosine"] for r in layers])),
        "subspace_overlap": float(np.nanmean([r["subspace_overlap"] for r in layers if r["key"] in a.subspaces])),
        "magnitude_ratio": magnitude_ratio(a.task_vector, b.task_vector, stats=stats),
        "sign_conflict": sign_conflict(a.task_vector, b.task_vector),
        "snr_rank_corr": rank_correlation(a.snr, b.snr),
        "snr_agreement": decision_agreement(a.snr, b.snr, top),
        "tv_snr_rank_corr": rank_correlation(a.task_vector_snr, b.task_vector_snr),
    }
    for name in [g for g in a.gradients if g in b.gradients]:
        grad_stats = inner_products(a.gradients[name], b.gradients[name])
        out[f"gradient_cosine_{name}"] = cosine(a.gradients[name], b.gradients[name], stats=grad_stats)
        out[f"gradient_l2_{name}"] = distance(a.gradients[name], b.gradients[name], stats=grad_stats)
    return out, layers


def pairwise_metrics(
    base: Mapping[str, Tensor],
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    *,
    k: int = DEFAULT_K,
    top: float = DEFAULT_TOP,
    gradients: Mapping[str, tuple[Mapping[str, Tensor], Mapping[str, Tensor]]] | None = None,
    include=None,
    exclude=None,
    device=None,
) -> dict[str, float]:
    """Every pairwise property of experts ``a`` and ``b`` fine-tuned from ``base`` (state dicts).
    ``gradients``: ``{name: (gradient of a, gradient of b)}`` from :func:`loss_gradient`.
    To compare many experts, build one :func:`profile` each and call :func:`compare` per pair."""
    grads = gradients or {}
    pa = profile(
        base, a, k=k, gradients={n: g[0] for n, g in grads.items()}, include=include, exclude=exclude, device=device
    )
    pb = profile(
        base, b, k=k, gradients={n: g[1] for n, g in grads.items()}, include=include, exclude=exclude, device=device
    )
    return compare(pa, pb, top=top)[0]


# ---------------------------------------------------------------------------------------------
# predicting the merge's outcome


def _check_design(X, y) -> tuple[np.ndarray, np.ndarray]:
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if X.ndim != 2 or y.shape != (X.shape[0],):
        raise ValueError(f"X must be (pairs, properties) and y (pairs,), got {X.shape} and {y.shape}")
    if X.shape[0] < 4:
        raise ValueError(
            f"leave-one-pair-out with an inner choice of the penalty needs at least 4 pairs, got {X.shape[0]}"
        )
    if not (np.isfinite(X).all() and np.isfinite(y).all()):
        bad = sorted(set(np.argwhere(~np.isfinite(X))[:, 1].tolist()))
        raise ValueError(f"X (columns {bad}) or y holds NaN/Inf; drop the property or the pair before fitting")
    return X, y


#: ``alpha=None``: the penalties tried, from the smallest that selects nothing down to this
#: fraction of it (below 1 % the fit is close to least squares on a dozen properties, which
#: twenty pairs cannot support), on a log grid of :data:`LASSO_GRID` values
LASSO_EPS = 1e-2
LASSO_GRID = 30

#: shuffled-target refits per method, at most: with 100 the smallest possible p is 1/101 = 0.0099,
#: which most methods reached, so the test could not say how small p is; 500 resolves p to 0.002
PERMUTATIONS = 500
#: ... stopping once this many shuffles have done as well as the fit (Besag and Clifford 1991)
STOP_AFTER = 10
#: the central share of the bootstrap distribution :func:`r2_interval` reports
INTERVAL_LEVEL = 0.9


def _lasso(X: np.ndarray, y: np.ndarray, alpha: float | None, seed: int):
    """Standardised properties -> Lasso; ``alpha=None`` chooses the penalty by (at most) 5-fold
    cross-validation on these rows over the grid of :data:`LASSO_EPS` and :data:`LASSO_GRID`."""
    from sklearn.linear_model import Lasso, LassoCV
    from sklearn.model_selection import KFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if alpha is None:
        folds = KFold(n_splits=min(5, len(y)), shuffle=True, random_state=seed)
        regressor = LassoCV(eps=LASSO_EPS, alphas=LASSO_GRID, cv=folds, max_iter=100_000)
    else:
        regressor = Lasso(alpha=alpha, max_iter=100_000)
    return make_pipeline(StandardScaler(), regressor).fit(X, y)


def _fitted(model) -> tuple[float, np.ndarray, float]:
    reg = model[-1]
    alpha = reg.alpha_ if hasattr(reg, "alpha_") else reg.alpha  # LassoCV's choice, or the fixed one
    return float(alpha), reg.coef_.copy(), float(reg.intercept_)


def _r2(y: np.ndarray, predicted: np.ndarray) -> float:
    spread = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - predicted) ** 2).sum()) / spread if spread > 0 else math.nan


def _loo_predictions(X: np.ndarray, y: np.ndarray, alpha: float | None, seed: int):
    predicted, folds = np.empty_like(y), []
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        model = _lasso(X[keep], y[keep], alpha, seed)
        predicted[i] = model.predict(X[i : i + 1])[0]
        folds.append(model)
    return predicted, folds


def leave_one_pair_out(X, y, *, alpha: float | None = None, seed: int = 0) -> dict:
    """Fit the L1-regularised linear model of ``y`` (one normalized accuracy per pair) on the
    standardised properties ``X`` (pairs x properties), and predict every pair from a model fitted
    without it.

    ``alpha=None`` chooses the penalty by cross-validation inside each training set (nested, so
    the left-out pair never influences it); a number fixes it. Returns ``alpha``,
    ``coefficients`` and ``intercept`` of the fit on all pairs (coefficients per standard
    deviation of each property, so they are comparable), ``fold_alphas`` and
    ``fold_coefficients`` (one per left-out pair: how stable the selection is), ``predicted``
    (the left-out predictions), ``r2`` (their R², which is negative when they do worse than
    predicting the mean) and ``spearman`` (their rank correlation with ``y``)."""
    from scipy.stats import spearmanr

    X, y = _check_design(X, y)
    predicted, folds = _loo_predictions(X, y, alpha, seed)
    alpha_all, coef, intercept = _fitted(_lasso(X, y, alpha, seed))
    fold_fits = [_fitted(m) for m in folds]
    constant = np.unique(predicted).size < 2 or np.unique(y).size < 2
    return {
        "alpha": alpha_all,
        "coefficients": coef.tolist(),
        "intercept": intercept,
        "fold_alphas": [f[0] for f in fold_fits],
        "fold_coefficients": [f[1].tolist() for f in fold_fits],
        "predicted": predicted.tolist(),
        "r2": _r2(y, predicted),
        "spearman": math.nan if constant else float(spearmanr(y, predicted).statistic),
    }


def r2_interval(
    y, predicted, *, n_boot: int = 2000, level: float = INTERVAL_LEVEL, seed: int = 0
) -> tuple[float, float]:
    """A bootstrap interval of the leave-one-pair-out R²: pairs resampled with replacement,
    ``level`` central quantiles. With 20 pairs it is wide, and that is the point."""
    y, predicted = np.asarray(y, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(y), size=(n_boot, len(y)))
    values = np.array([_r2(y[d], predicted[d]) for d in draws])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan
    tail = (1.0 - level) / 2.0
    return float(np.quantile(values, tail)), float(np.quantile(values, 1.0 - tail))


def permutation_pvalue(
    X,
    y,
    r2: float,
    *,
    n_perm: int = PERMUTATIONS,
    stop_after: int | None = STOP_AFTER,
    alpha: float | None = None,
    seed: int = 0,
) -> dict:
    """How often the whole pipeline (:func:`leave_one_pair_out`, penalty choice included) reaches
    an R² of at least ``r2`` when the targets are shuffled across pairs, i.e. when no property
    can predict anything. Returns ``p``, the null R²s and ``permutations`` (how many were run).

    Up to ``n_perm`` shuffles; with ``stop_after`` the test stops once that many shuffles have
    done as well (Besag and Clifford's sequential p-value, 1991: ``p = stop_after / shuffles
    run``, exact for the shuffles drawn), so a clearly null fit costs a few dozen refits and
    the budget goes where p is small. Run to the end, ``p = (exceedances + 1) / (n_perm + 1)``,
    whose floor ``1 / (n_perm + 1)`` means "at most this"."""
    X, y = _check_design(X, y)
    rng = np.random.default_rng(seed)
    null, exceed = [], 0
    for _ in range(n_perm):
        value = _r2(yp := rng.permutation(y), _loo_predictions(X, yp, alpha, seed)[0])
        null.append(value)
        exceed += bool(np.isfinite(value) and value >= r2)
        if stop_after is not None and exceed >= stop_after:
            return {"p": exceed / len(null), "null_r2": null, "permutations": len(null), "stopped": True}
    return {"p": (exceed + 1) / (n_perm + 1), "null_r2": null, "permutations": n_perm, "stopped": False}


def design(properties: Sequence[Mapping], fit: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` of a :func:`fit_methods` entry, rebuilt from the pairs' ``properties``: what
    the fit saw, in its order."""
    by_pair = {p["pair"]: p for p in properties}
    X = np.array([[by_pair[s][f] for f in fit["features"]] for s in fit["pairs"]], dtype=np.float64)
    return X, np.asarray(fit["measured"], dtype=np.float64)


def more_permutations(
    properties: Sequence[Mapping],
    fits: Mapping[str, Mapping],
    *,
    n_perm: int = PERMUTATIONS,
    stop_after: int | None = STOP_AFTER,
    alpha: float | None = None,
    seed: int = 0,
) -> dict[str, dict]:
    """The :func:`fit_methods` entries ``fits`` with the permutation test rerun at up to ``n_perm``
    shuffles (the same generator, so the first shuffles are those of the shorter run): for
    results written with fewer permutations than p needs. Nothing else of a fit changes."""
    out = {}
    for method, fit in fits.items():
        X, y = design(properties, fit)
        null = permutation_pvalue(X, y, fit["r2"], n_perm=n_perm, stop_after=stop_after, alpha=alpha, seed=seed)
        out[method] = {
            **fit,
            "permutation_p": null["p"],
            "null_r2": null["null_r2"],
            "permutations": null["permutations"],
            "permutations_stopped": null["stopped"],
            "stop_after": stop_after,
        }
    return out


#: a property whose values across the pairs span less than this cannot rank them
FLAT_SPREAD = 0.01


def flat_properties(properties: Sequence[Mapping], features: Sequence[str], *, spread: float = FLAT_SPREAD) -> dict:
    """property -> ``(min, max)`` over the pairs, for the ``features`` whose range is below
    ``spread``: properties that are (nearly) the same for every pair and so can predict nothing.
    The experts' own SNRs are: fine-tuning moves each weight matrix little against its
    pre-trained value, so every expert inherits the base's per-matrix SNR ranking (rank
    correlation about 1) and the same high/low split (agreement 1); the task vectors' SNRs
    (``tv_snr_rank_corr``) are where the fine-tunings differ."""
    frame = pd.DataFrame(list(properties))
    out = {}
    for f in features:
        low, high = float(frame[f].min()), float(frame[f].max())
        if high - low < spread:
            out[f] = (low, high)
    return out


def univariate(X, y, names: Sequence[str]) -> dict[str, float]:
    """Spearman correlation of each property with the target on its own (NaN for a constant
    property): the plain reading a sparse model should be compared with."""
    from scipy.stats import spearmanr

    X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
    out = {}
    for j, name in enumerate(names):
        column = X[:, j]
        usable = np.unique(column).size > 1 and np.unique(y).size > 1
        out[name] = float(spearmanr(column, y).statistic) if usable else math.nan
    return out


# ---------------------------------------------------------------------------------------------
# the notebook's survey: trained experts, every pair, every method


def expert_profile(
    expert: cache.Expert, *, k: int = DEFAULT_K, examples: int = 32, seed: int = 0, exclude=None, device=None
) -> Profile:
    """The :class:`Profile` of a trained expert (:func:`lib.train.fit_expert`) against the model its
    training started from, with two gradient sets on ``examples`` fixed training examples of its
    task: ``base`` (at that starting model) and ``expert`` (at the expert). ``exclude`` should
    name the head (``lib.models.HEAD_PATTERNS``) when experts of different tasks are compared."""
    start = train.initial_model(expert.config, progress=False)
    inputs, labels = task_batch(expert.task, examples, seed=seed)
    gradients = {
        name: loss_gradient(model, inputs, labels, exclude=exclude, device=device)
        for name, model in (("base", start), ("expert", expert.model()))
    }
    return profile(start.state_dict(), expert.state_dict, k=k, gradients=gradients, exclude=exclude, device=device)


def measure_pairs(
    profiles: Mapping[str, Profile], pairs: Sequence[tuple[str, str]], *, top: float = DEFAULT_TOP
) -> tuple[list[dict], list[dict]]:
    """``(properties, layers)``: one row of :func:`compare` per pair (with ``pair``, named as
    :func:`lib.pool.subset_name` names the merged subset, ``task_a`` and ``task_b``), and the
    :func:`layer_table` rows of every pair."""
    properties, layers = [], []
    for a, b in pairs:
        values, rows = compare(profiles[a], profiles[b], top=top)
        tag = {"pair": subset_name((a, b)), "task_a": a, "task_b": b}
        properties.append({**tag, **values})
        layers += [{**tag, **r} for r in rows]
    return properties, layers


def fit_methods(
    properties: Sequence[Mapping],
    scores,
    features: Sequence[str],
    *,
    alpha: float | None = None,
    n_perm: int = PERMUTATIONS,
    stop_after: int | None = STOP_AFTER,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, dict]:
    """Per merge method: :func:`leave_one_pair_out` of the normalized accuracy on ``features``, its
    :func:`r2_interval` and :func:`permutation_pvalue`, and the :func:`univariate` correlations.
    ``scores``: rows (or a DataFrame) with ``subset``, ``method`` and ``normalized``, one per pair
    and method (:func:`lib.pool.subset_scores` of the pairs, one run per method). Each entry also
    keeps ``pairs``, ``measured`` and ``features`` so a figure needs nothing else."""
    scores = pd.DataFrame(scores)
    by_pair = {p["pair"]: p for p in properties}
    out = {}
    for method, rows in scores.groupby("method", sort=False):
        repeated = rows.subset[rows.subset.duplicated()]
        if not repeated.empty:
            raise ValueError(f"{method} has several scores for {repeated.iloc[0]!r}: keep one run per method")
        unknown = sorted(set(rows.subset) - set(by_pair))
        if unknown:
            raise ValueError(f"no properties of pair {unknown[0]!r}; measure every merged pair first")
        X = np.array([[by_pair[s][f] for f in features] for s in rows.subset], dtype=np.float64)
        y = rows.normalized.to_numpy(dtype=np.float64)
        fit = leave_one_pair_out(X, y, alpha=alpha, seed=seed)
        low, high = r2_interval(y, fit["predicted"], n_boot=n_boot, seed=seed)
        null = permutation_pvalue(X, y, fit["r2"], n_perm=n_perm, stop_after=stop_after, alpha=alpha, seed=seed)
        out[method] = {
            "features": list(features),
            "pairs": rows.subset.tolist(),
            "measured": y.tolist(),
            **fit,
            "r2_interval": [low, high],
            "interval_level": INTERVAL_LEVEL,
            "permutation_p": null["p"],
            "null_r2": null["null_r2"],
            "permutations": null["permutations"],
            "permutations_stopped": null["stopped"],
            "stop_after": stop_after,
            "univariate": univariate(X, y, features),
        }
    return out


#: a property is called stable when this share of the leave-one-pair-out fits selects it with
#: the sign it has in the fit on all pairs
STABLE_SHARE = 0.8


def stable_properties(fit: Mapping) -> dict[str, float]:
    """Property -> its coefficient on all pairs, for the properties that at least
    :data:`STABLE_SHARE` of the leave-one-pair-out fits select with the same sign."""
    coef, folds = np.asarray(fit["coefficients"]), np.asarray(fit["fold_coefficients"])
    same_sign = (np.sign(folds) == np.sign(coef)) & (folds != 0)
    return {
        f: float(c)
        for f, c, share in zip(fit["features"], coef, same_sign.mean(axis=0))
        if c != 0 and share >= STABLE_SHARE
    }


def p_text(fit: Mapping, digits: int = 3) -> str:
    """A fit's permutation p as text: "≤ 0.002" where no shuffle did as well, so that p is the
    smallest the number of shuffles can show (``1 / (permutations + 1)``), not a measurement."""
    n_perm = fit.get("permutations")
    floor = (
        n_perm is not None and not fit.get("permutations_stopped") and fit["permutation_p"] <= 1 / (n_perm + 1) + 1e-12
    )
    return f"{'≤ ' if floor else ''}{fit['permutation_p']:.{digits}f}"


def describe_fit(method: str, fit: Mapping, *, level: float = 0.05) -> str:
    """One sentence on what a :func:`fit_methods` entry allows us to say, computed from it: the
    left-out R² with its interval, whether shuffled targets do as well, and which properties
    carry weight stably."""
    low, high = fit["r2_interval"]
    n, p = len(fit["pairs"]), len(fit["features"])
    text = (
        f"{method}: predicting each of {n} pairs from a model fitted on the others gives R² = {fit['r2']:.2f} "
        f"({fit.get('interval_level', INTERVAL_LEVEL):.0%} bootstrap interval {low:.2f} to {high:.2f}; Spearman {fit['spearman']:.2f}). "
    )
    if fit["r2"] > 0 and fit["permutation_p"] < level:
        text += f"Shuffled targets rarely do as well (permutation p {'' if p_text(fit).startswith('≤') else '= '}{p_text(fit)}): the properties carry signal. "
    else:
        text += (
            f"Shuffled targets do as well {fit['permutation_p']:.0%} of the time: no evidence that these {p} properties "
            "predict this method's outcome on these pairs. "
        )
    stable = stable_properties(fit)
    if stable:
        parts = ", ".join(
            f"{f} ({'+' if c > 0 else '-'}{abs(c):.3f})" for f, c in sorted(stable.items(), key=lambda x: -abs(x[1]))
        )
        text += f"Selected with a consistent sign in at least {STABLE_SHARE:.0%} of the left-out fits: {parts}."
    else:
        text += f"No property is selected with a consistent sign in {STABLE_SHARE:.0%} of the left-out fits."
    return text

"""The SNR-routed strategies of the Sapienza report (seed 000): layers ranked by Marchenko-Pastur SNR decide how each is merged.

Every selected weight matrix is a *layer*. Its score is the largest (``score="max"``, as the
report's code does) or the mean (``score="mean"``) over experts of
``lib.spectral.snr(W_t, method=snr_method)``, computed on the experts' weights (not the task
vectors), batched by shape. The ``top`` fraction of layers with the highest score is *high*, the
rest *low*; with ``threshold`` set, a layer is high when its score exceeds that absolute value
instead (the report's ResNet notebook: 3, 5, 15, 25 with ``snr_method="max_median"``). Each
strategy then merges a layer by one rule when high and another when low (Table 1 of the report,
generalised to N experts):

==================  =====================  ======================
method              high SNR               low SNR
==================  =====================  ======================
``snr_base_reset``  mean of experts        base
``snr_winner``      winner                 mean of experts
``snr_low_expert``  mean of experts        expert ``index``
``snr_low_a/b``     mean of experts        expert 0 / expert 1
``snr_max``         mean of experts        winner
``snr_weighted``    alpha-mix              mean of experts
==================  =====================  ======================

*winner*: the expert with the highest SNR on that layer (the lowest index among equal ones);
*alpha-mix*: ``sum_t alpha_t W_t`` with ``alpha_t = SNR_t / sum_s SNR_s`` (see :func:`alpha_weights`
for all-zero and infinite SNRs).

A layer's decision (high/low, and its per-expert SNRs for winner and alpha) also applies to the
1-D tensors that belong to it: the biases and other 1-D tensors of its own module, and the norm
layers (BatchNorm/LayerNorm affine parameters and running statistics) that follow it in the
state dict's order, which are modules of their own in PyTorch (``conv1`` -> ``bn1``,
``attention.output.dense`` -> ``attention.output.LayerNorm``). See :func:`assign_layers`.
Integer buffers (``num_batches_tracked``) are copied from the base by :func:`lib.merge.merge`.

Where the seed's code differs from its report (``maste473/Spectrum-Guided-Model-Merging---
Focused-Fusion-on-Informative-Layers``, notebooks 01-03), and what we do:

* Which parameters get a decision. The BERT notebooks score every parameter whose name
  contains ``"layer"`` and ``"weight"``: the encoder matrices *and* the encoder LayerNorm
  weights, which get SNR 0, count in the percentile and are always low (so ``spectrum_reset``
  resets them to the base); embeddings, pooler, classifier and every bias are always averaged.
  The ResNet notebook scores every ``weight`` with two or more dimensions; BatchNorm parameters,
  running statistics and even ``num_batches_tracked`` are always averaged. We score every
  selected matrix (use ``exclude`` to leave e.g. the classifier out) and route 1-D tensors with
  their layer, as the issue asks.
* ``top``. The seed marks high the layers whose max-SNR is strictly above
  ``np.percentile(max_snrs, 100 - top%)`` (linear interpolation); we mark exactly the
  ``ceil(top * L)`` highest-scored of the ``L`` layers (equal scores ranked by key order), so
  ``top=0`` is all low and ``top=1`` all high.
* Winner ties go to model B in the seed (``A if s1 > s2 else B``); to the lowest index here.
* ``snr_weighted_dynamic`` (ResNet notebook, commit a2724b2): a lost newline puts both the
  ``snr_sum`` line and the high-branch ``copy_`` inside comments, so its high-SNR layers kept
  the freshly built model's weights (ImageNet ResNet-18 with a random head) rather than an
  alpha-mix. We implement the report's description (alpha-mix when high, mean when low).
* The BERT notebooks compute SNR with their own Marchenko-Pastur edge (``snr_method="report_text"``
  in :mod:`lib.spectral`, formerly ``"seed"``, which still works); ``"mp"`` is the project's fitted
  version.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..statedict import as_matrix, is_matrix, module_of
from . import check_finite_number, check_range, register
from .ties import kept_count

#: matrices buffered before one batched SNR call; bounds the prepass's memory when streaming
SCORE_BATCH_BYTES = 256 * 2**20


@dataclass(frozen=True)
class LayerDecisions:
    """The prepass result of every SNR strategy (small: a few numbers per layer)."""

    scores: dict[str, Tensor]  # layer key -> (N,) float64 SNR of each expert
    high: dict[str, bool]  # layer key -> whether the layer is high-SNR
    layer_of: dict[str, str]  # every selected key -> the layer key whose decision it follows

    def decision(self, key: str) -> tuple[bool, Tensor]:
        try:
            layer = self.layer_of[key]
        except KeyError:
            raise KeyError(
                f"{key!r} was not in the prepass of this SNR merge; run the prepass over every selected key"
            ) from None
        return self.high[layer], self.scores[layer]


def assign_layers(keys: Sequence[str], matrix_keys: Sequence[str]) -> dict[str, str]:
    """Map every key to the layer (matrix key) whose decision it follows: a matrix to itself; a
    1-D tensor to the first matrix of its own module, else to the nearest matrix before it in
    ``keys`` (a norm follows the layer it normalises), else to the first matrix."""
    if not matrix_keys:
        raise ValueError("the SNR strategies need at least one weight matrix among the selected tensors")
    matrices = set(matrix_keys)
    module_matrix: dict[str, str] = {}
    for k in matrix_keys:
        module_matrix.setdefault(module_of(k), k)
    layer_of, previous = {}, None
    for k in keys:
        previous = k if k in matrices else previous
        layer_of[k] = k if k in matrices else module_matrix.get(module_of(k), previous) or matrix_keys[0]
    return layer_of


def decide_layers(
    scores: Mapping[str, Tensor],
    keys: Sequence[str],
    *,
    top: float = 0.25,
    threshold: float | None = None,
    score: str = "max",
) -> LayerDecisions:
    """High/low decision of every layer from the per-expert SNRs ``scores`` (layer key -> (N,)).

    ``threshold`` set: high when the layer's score is above it; otherwise the ``ceil(top * L)``
    highest-scored layers are high, equal scores ranked by key name.
    """
    layers = list(scores)
    per_expert = {k: torch.as_tensor(v, dtype=torch.float64).reshape(-1).cpu() for k, v in scores.items()}
    undefined = [k for k, v in per_expert.items() if torch.isnan(v).any()]
    if undefined:
        raise ValueError(
            f"SNR of {undefined[0]!r} is NaN ({per_expert[undefined[0]].tolist()}); exclude that layer or use another snr_method"
        )
    combined = {k: float(v.max() if score == "max" else v.mean()) for k, v in per_expert.items()}
    if threshold is not None:
        high = {k: combined[k] > threshold for k in layers}
    else:
        # equal scores are ranked by name, not by the order the keys arrive in: a checkpoint on
        # disk lists them alphabetically, a model's state dict in module order, and the merge of
        # one model must not depend on which (layers of pure noise all score 0)
        ranked = sorted(layers, key=lambda k: (-combined[k], k))
        chosen = set(ranked[: kept_count(len(layers), top)])
        high = {k: k in chosen for k in layers}
    return LayerDecisions(per_expert, high, assign_layers(keys, layers))


def expert_snrs(items, *, snr_method: str = "mp") -> tuple[list[str], dict[str, Tensor]]:
    """Read ``items`` (``(key, base, [experts])``) once; return every key in order and, for every
    matrix, the SNR of each expert's weight (key -> (N,) float64), computed on the tensors'
    device in batched calls to :func:`lib.spectral.snr_batch` of at most
    :data:`SCORE_BATCH_BYTES` of matrices."""
    from ..spectral import snr_batch  # imported here: spectral is only needed once a merge runs

    keys: list[str] = []
    scores: dict[str, Tensor] = {}
    pending_keys: list[str] = []
    pending: list[Tensor] = []

    def flush():
        if pending_keys:
            values = snr_batch(pending, method=snr_method, device=pending[0].device)
            scores.update(
                zip(pending_keys, values.to(device="cpu", dtype=torch.float64).reshape(len(pending_keys), -1))
            )
        pending_keys.clear()
        pending.clear()

    for key, _base, experts in items:
        keys.append(key)
        if not is_matrix(experts[0]):
            continue
        pending_keys.append(key)
        pending.extend(as_matrix(e, key) for e in experts)
        if sum(m.numel() * m.element_size() for m in pending) >= SCORE_BATCH_BYTES:
            flush()
    flush()
    return keys, scores


def _check(*, top, threshold, snr_method, score, index=0):
    check_range("top", top, 0.0, 1.0)
    if threshold is not None:
        check_finite_number("threshold", threshold)
    if score not in ("max", "mean"):
        raise ValueError(f"score must be 'max' (largest SNR over experts, as the report) or 'mean', got {score!r}")
    from ..spectral import SNR_ALIASES, SNR_METHODS

    if snr_method not in SNR_METHODS:  # the old names of SNR_ALIASES are in it too
        old = ", ".join(f"{a!r} for {b!r}" for a, b in SNR_ALIASES.items())
        raise ValueError(
            f"snr_method must be one of {sorted(SNR_METHODS)} or the old name {old} (see lib.spectral), got {snr_method!r}"
        )
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ValueError(f"index must be a non-negative expert index, got {index!r}")


def snr_prepass(items, *, top=0.25, threshold=None, snr_method="mp", score="max", index=0):
    """Prepass of every SNR strategy: each layer's per-expert SNR and its high/low decision."""
    _check(top=top, threshold=threshold, snr_method=snr_method, score=score, index=index)
    keys, scores = expert_snrs(items, snr_method=snr_method)
    return decide_layers(scores, keys, top=top, threshold=threshold, score=score)


# The per-layer rules of Table 1: (base tensor, [expert tensors], per-expert SNR, index) -> tensor
def _mean(base, experts, snrs, index):
    return torch.stack(experts).mean(dim=0)


def _base(base, experts, snrs, index):
    return base


def _expert(base, experts, snrs, index):
    return experts[index]


def _winner(base, experts, snrs, index):
    return experts[int(torch.argmax(snrs))]  # argmax returns the first of equal maxima


def alpha_weights(snrs: Tensor) -> Tensor:
    """``SNR_t / sum_s SNR_s``; uniform when all are 0, shared by the infinite ones when some are
    infinite (a matrix with no noise bulk has SNR inf under ``snr_method="mp"``)."""
    if (snrs < 0).any():
        raise ValueError(f"alpha-mix needs non-negative SNRs, got {snrs.tolist()}")
    if torch.isinf(snrs).any():
        snrs = torch.isinf(snrs).to(snrs.dtype)
    total = snrs.sum()
    return snrs / total if total > 0 else torch.full_like(snrs, 1.0 / len(snrs))


def _alpha_mix(base, experts, snrs, index):
    return sum(a * e for a, e in zip(alpha_weights(snrs).tolist(), experts))


_REFERENCE = (
    "La Rocca and Rodot, Comparative Analysis of Transformer Model Merging Techniques: Standard vs Spectrum "
    "Hybrid, Sapienza 2026 (paper 000); "
    "https://github.com/maste473/Spectrum-Guided-Model-Merging---Focused-Fusion-on-Informative-Layers"
)


def _strategy(name: str, high_rule, low_rule, *, fixed_index: int | None = None, description: str):
    """Register one strategy of Table 1: ``high_rule`` for high-SNR layers, ``low_rule`` for the others."""
    needs_base = _base in (high_rule, low_rule)
    defaults = dict(top=0.25, threshold=None, snr_method="mp", score="max")
    if fixed_index is None and _expert in (high_rule, low_rule):
        defaults["index"] = 0

    def fn(base, experts, *, key, context, **hp):  # the other hyperparameters were the prepass's
        index = hp.get("index", fixed_index)
        if index is not None and not index < len(experts):
            raise ValueError(
                f"{name} takes low-SNR layers from expert {index} but only {len(experts)} expert(s) were given"
            )
        is_high, snrs = context.decision(key)
        return (high_rule if is_high else low_rule)(base, experts, snrs, index)

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = description
    # every rule acts entry by entry once the prepass has decided each layer (scores need whole
    # matrices, so the prepass itself is not elementwise)
    register(
        name,
        family="snr",
        description=description,
        reference=_REFERENCE,
        needs_base=needs_base,
        prepass=snr_prepass,
        check=_check,
        elementwise=True,
        **defaults,
    )(fn)
    return fn


snr_base_reset = _strategy(
    "snr_base_reset",
    _mean,
    _base,
    description="high-SNR layers: mean of experts; low-SNR layers reset to the base (report: Spectrum Base Reset)",
)
snr_winner = _strategy(
    "snr_winner",
    _winner,
    _mean,
    description="high-SNR layers: the expert with the highest SNR; low: mean (report: SNR Winner)",
)
snr_low_expert = _strategy(
    "snr_low_expert",
    _mean,
    _expert,
    description="high-SNR layers: mean of experts; low: expert `index` (report: snr_lowA/B)",
)
snr_low_a = _strategy(
    "snr_low_a",
    _mean,
    _expert,
    fixed_index=0,
    description="snr_low_expert with index=0: low-SNR layers forced to expert A (report: snr_lowA)",
)
snr_low_b = _strategy(
    "snr_low_b",
    _mean,
    _expert,
    fixed_index=1,
    description="snr_low_expert with index=1: low-SNR layers forced to expert B (report: snr_lowB)",
)
snr_max = _strategy(
    "snr_max",
    _mean,
    _winner,
    description="high-SNR layers: mean of experts; low: the expert with the highest SNR (report: snr_max)",
)
snr_weighted = _strategy(
    "snr_weighted",
    _alpha_mix,
    _mean,
    description="high-SNR layers: SNR-weighted alpha-mix of experts; low: mean (report: SNR Weighted Dynamic)",
)

"""Pools of LoRA experts (issue 17): the seven text tasks' experts trained with
``lib.train.fit_expert(..., lora=True)`` (rank 16, alpha 32, query and value projections, each
task's head trained in full), as :class:`lib.pool.Pool` s that the grid runner merges like the full
fine-tunes' pools.

A LoRA expert's cached weights are the merged ones (base + s B A, its trained head), so every
merge method takes it as it takes a full fine-tune: STAR's and DRM's SVDs then see task vectors of
rank at most 16 on the adapted matrices and exact zeros elsewhere (:mod:`lib.lora` merges the same
experts from their factors, equal to 1e-6; the pool merges the dense weights so that every method,
TIES and DARE included, goes through one path).

:func:`lora_pool_spec` is :func:`lib.runner.pool_spec` with ``expert_kw={"lora": True}`` (or other
settings of :data:`lib.cache.LORA`); the runner carries ``expert_kw`` into every expert's key and
into the record key, so LoRA and full fine-tune records never mix. :func:`lib.pool.build_pool`
takes the extra :func:`lib.train.fit_expert` keywords.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

#: the LoRA experts' fit_expert keywords (the papers' setting: lib.cache.LORA's defaults)
LORA_KW = {"lora": True}


def lora_pool_spec(
    tasks: Sequence[str], *, seed: int, smoke: bool, name: str = "text-lora", expert_kw: Mapping | None = None
) -> dict:
    """The grid runner's pool of the LoRA experts of ``tasks`` (:func:`lib.runner.pool_spec`)."""
    from . import runner

    return runner.pool_spec(tasks, seed=seed, smoke=smoke, name=name, expert_kw=dict(expert_kw or LORA_KW))


# --- notebook 07's grid ---------------------------------------------------------------------------

NOTEBOOK = "07_lora"
TEXT_TASKS = ["sst2", "cola", "emotion", "trec", "mrpc", "rte", "rotten_tomatoes"]
#: the methods STAR and DRM are compared with on the LoRA experts: (method, hyperparameters);
#: task arithmetic and TA+DARE also at the STAR paper's settings (alpha = 0.125; DARE's p = 0.7: keep
#: 0.3), DRM-H and DRM-V with and without renormalisation
REFERENCES = [
    ("average", {}),
    ("task_arithmetic", {}),
    ("task_arithmetic", {"lam": 0.125}),
    ("ties", {}),
    ("dare", {}),
    ("dare", {"lam": 0.125, "keep": 0.3}),
    ("drm_h", {}),
    ("drm_v", {}),
    ("drm_h", {"renorm": False}),
    ("drm_v", {"renorm": False}),
]
FULL = {
    "SEEDS": [0, 1, 2],  # 21 LoRA experts: the seven text tasks x three seeds
    "TASKS": TEXT_TASKS,
    "SIZES": [2, 3, 5, 7],  # the STAR paper's eta sweep sizes
    "MAX_SUBSETS": 1,  # subsets per size and seed, as notebook 04
    "ETAS": [10, 20, 40, 70, 100],
    "NO_RESCALE_ETAS": [10, 20, 40],
    "RANK_ETAS": [10, 20, 30, 40, 50, 60, 70, 80, 90, 100],
}
# SMOKE: one seed, three tasks, pairs only (a size-3 subset doubled the SMOKE grid's time on a loaded
# machine; its runtime table says what a run took)
SMOKE = {
    **FULL,
    "SEEDS": [0],
    "TASKS": ["sst2", "cola", "trec"],
    "SIZES": [2],
    "ETAS": [20, 40, 100],
    "NO_RESCALE_ETAS": [20],
    "RANK_ETAS": [20, 40, 70, 100],
}


def grid_values(names: str, *, smoke: bool) -> list:
    """Notebook 07's parameters (:data:`FULL`, or :data:`SMOKE`), copies, in the order ``names``
    gives them (space-separated)."""
    import copy

    source = SMOKE if smoke else FULL
    return [copy.deepcopy(source[n]) for n in names.split()]


def lora_runs(etas, no_rescale_etas, references=REFERENCES) -> list:
    """STAR at each eta (rescaled), its default, without rescaling at ``no_rescale_etas``, then each
    of :data:`REFERENCES`; each label once (:func:`lib.grids.star_runs`, as notebook 04)."""
    from . import grids

    return grids.star_runs(etas, no_rescale_etas, references)


def task_vector_ranks(base, bodies, *, rtol: float = 1e-2) -> list[dict]:
    """How low-rank each expert's task vectors are: per expert and weight matrix whose task vector
    is not zero, the numerical rank (singular values above ``rtol`` x the largest), the stable rank
    ``sum s^2 / s_max^2`` and the fraction of the squared Frobenius norm in the top 16 directions
    (LoRA's rank). Float64 singular values."""
    import torch

    rows = []
    for expert, body in bodies.items():
        for order, (k, w) in enumerate(base.items()):
            if w.ndim != 2 or k not in body:
                continue
            tau = body[k].double() - w.double()
            if not bool(tau.any()):
                continue
            s = torch.linalg.svdvals(tau)
            energy = (s**2) / (s**2).sum()
            rows.append(
                {
                    "expert": expert,
                    "key": k,
                    "order": order,
                    "rows": int(w.shape[0]),
                    "cols": int(w.shape[1]),
                    "rank": int((s > rtol * s[0]).sum()),
                    "stable_rank": float((s**2).sum() / s[0] ** 2),
                    "top16_energy": float(energy[:16].sum()),
                }
            )
    return rows

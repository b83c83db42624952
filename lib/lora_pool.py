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
settings of :data:`lib.train.LORA`); the runner carries ``expert_kw`` into every expert's key and
into the record key, so LoRA and full fine-tune records never mix. :func:`build_pool` is
:func:`lib.pool.build_pool` with extra :func:`lib.train.fit_expert` keywords.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from . import pool, train

#: the LoRA experts' fit_expert keywords (the papers' setting: lib.train.LORA's defaults)
LORA_KW = {"lora": True}


def build_pool(tasks: Sequence[str], *, seed: int, smoke: bool, variant: str | None = None, name: str | None = None,
               expert_kw: Mapping | None = None, progress: bool = False) -> pool.Pool:
    """:func:`lib.pool.build_pool` of experts trained (or loaded) by
    ``train.fit_expert(task, ..., **expert_kw)``: bodies and heads split the same way, the base is
    the same pre-trained body, and each expert's record names its cache key."""
    expert_kw = dict(expert_kw or {})
    if not expert_kw:
        return pool.build_pool(tasks, seed=seed, smoke=smoke, variant=variant, name=name, progress=progress)
    if len(tasks) < 2:
        raise ValueError(f"a pool needs at least two experts to merge, got {list(tasks)}")
    kind = pool.kind_of(tasks)
    variant = variant or train.VARIANTS[kind][0]
    name = name or f"{kind}-{'lora' if expert_kw.get('lora') else 'custom'}"
    experts = {t: train.fit_expert(t, seed=seed, variant=variant, smoke=smoke, progress=progress, **expert_kw)
               for t in tasks}
    base, _ = train.split_head(train.base_state_dict(tasks[0], seed=seed, variant=variant, smoke=smoke), kind)
    return pool.Pool(
        name=name, kind=kind, seed=seed, smoke=smoke, base=base,
        bodies={t: train.split_head(e.state_dict, kind)[0] for t, e in experts.items()},
        heads={t: e.state_dict for t, e in experts.items()},
        experts=[{"pool": name, "seed": seed, "task": t, "variant": e.variant, "key": e.key, "from_cache": e.from_cache,
                  **{k: v for k, v in e.metrics.items() if k != "n"}, "n_eval": e.metrics.get("n"),
                  "train_s": e.runtime.get("train_s"), "lora": bool(e.config.get("lora"))}
                 for t, e in experts.items()],
    )


def lora_pool_spec(tasks: Sequence[str], *, seed: int, smoke: bool, name: str = "text-lora",
                   expert_kw: Mapping | None = None) -> dict:
    """The grid runner's pool of the LoRA experts of ``tasks`` (:func:`lib.runner.pool_spec`)."""
    from . import runner

    return runner.pool_spec(tasks, seed=seed, smoke=smoke, name=name, expert_kw=dict(expert_kw or LORA_KW))

"""Fit the experts every notebook merges: their starting points, the training loop, and heads
over merged bodies (re-drawn, probed; BatchNorm re-estimation). What an expert is and the cache
it is kept in: :mod:`lib.cache`; tokenising and batches: :mod:`lib.batching`; scoring:
:mod:`lib.evaluate`.

>>> expert = fit_expert("sst2", seed=0)                 # trained once, then loaded from the cache
>>> expert.metrics                                      # {'accuracy': 0.88..., 'n': 872, ...}
>>> lib.evaluate.evaluate(expert.state_dict, "sst2")    # any model or state dict of the task
>>> base = base_state_dict("sst2", seed=0)              # the explicit starting point of a merge

Starting points (``variant``)
-----------------------------
* text (``"pretrained"``): the pre-trained MiniLM body with a linear head drawn from the seed
  alone, so the SST-2 and CoLA experts of a seed (both binary) start from the same head and
  their heads can be merged like the rest; Emotion's 6-way head has its own shape.
* vision ``"mnist_base"``: a ResNet-18 pre-trained here on MNIST (the ``shared_init`` MNIST
  expert of the seed) is the base; the Fashion-MNIST and KMNIST experts are fine-tuned from it,
  each with a fresh random head, as the report fine-tunes ImageNet ResNet-18s (which cannot be
  loaded offline).
* vision ``"shared_init"``: the Fashion-MNIST, KMNIST and MNIST experts are trained from the same
  random initialisation (drawn from the seed).

Weights are comparable coordinate by coordinate only when the experts share a starting point;
that is what makes averaging or task arithmetic meaningful. Experts trained from different
random initialisations differ by permutations of their hidden units, and their average is
usually no better than chance.

LoRA experts
------------
``fit_expert(task, seed=..., lora=True)`` trains a text expert as a LoRA adapter of the body
(:data:`lib.cache.LORA`: rank 16, alpha 32, query and value, the setting of STAR's paper) with
its head trained in full, at :data:`lib.cache.LORA_LR`; same cache, seeds, progress and SMOKE
mode. Its ``state_dict`` holds the merged weights, so every merge and evaluation takes it as it
takes a full fine-tune; :meth:`lib.cache.Expert.adapter` gives its factors (:mod:`lib.lora`) for
the factored paths.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import time
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import data, models, paths
from .batching import collate, encode, length_bucketed_batches, logits_of, shift_images, sorted_batches, to_device
from .cache import (
    EVAL_BATCH,
    RECIPES,
    Expert,
    Recipe,
    config_key,
    derive_seed,
    expert_config,
    expert_path,
    load_expert,
    model_name_of,
    save_expert,
)
from .device import get_device
from .statedict import StateDict, matches, to_state_dict

# ---------------------------------------------------------------------------------------------
# the run's environment, recorded beside every expert


def _load_average() -> float | None:
    # recorded beside timings: a busy machine explains a slow expert (None where unsupported)
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def versions() -> dict:
    import torchvision
    import transformers

    import lib

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "transformers": transformers.__version__,
        "lib": lib.__version__,
        "device": str(get_device()),
        "torch_threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------
# models and starting points


def _architecture(task: str, model_name: str | None = None, head_seed: int | None = None) -> nn.Module:
    """A model of the right shape for ``task``: the pre-trained text body with a new head, or a
    randomly initialised ResNet."""
    spec = data.get_task(task)
    if spec.kind == "vision":
        return models.resnet18_28(spec.num_labels)
    model, _ = models.text_classifier(spec.num_labels, model_name, label_names=spec.label_names, head_seed=head_seed)
    return model


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed the global random stream (dropout) and use deterministic kernels where PyTorch has
    them, restoring the previous settings afterwards."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def initial_model(config: Mapping, *, data_dir=None, progress: bool = True) -> nn.Module:
    """The model an expert's training starts from (trains the MNIST base first if needed)."""
    task, init = config["task"], config["init"]
    if data.get_task(task).kind == "text":
        return _architecture(task, model_name_of(config), head_seed=init["head_seed"])
    if "random_init_seed" in init:
        with _seeded(init["random_init_seed"]):
            return _architecture(task)
    base = fit_expert("mnist", seed=config["seed"], smoke=config["smoke"], data_dir=data_dir, progress=progress)
    if base.key != init["base"]:
        raise RuntimeError(f"the MNIST base has key {base.key}, the configuration expects {init['base']}")
    model = base.model()
    return models.init_head(model, init["head_seed"])


def base_state_dict(
    task: str, *, seed: int, variant: str | None = None, smoke: bool | None = None, model_name: str | None = None
) -> StateDict:
    """The explicit base of a merge of ``task``'s experts (every expert of the same kind, seed
    and variant shares it): for text, the pre-trained MiniLM body with the seed's head (the
    common starting point of the binary experts' heads); for ``shared_init``, the shared random
    initialisation; for ``mnist_base``, the MNIST-trained ResNet-18 (its ``fc`` is MNIST's head,
    which no expert shares: merge heads with ``exclude=HEAD_PATTERNS['vision']``)."""
    config = expert_config(task, seed=seed, variant=variant, smoke=smoke, model_name=model_name)
    if config["variant"] == "mnist_base":
        return fit_expert("mnist", seed=seed, smoke=config["smoke"]).state_dict
    return to_state_dict(initial_model(config))


# ---------------------------------------------------------------------------------------------
# training


def _train_batches(config: Mapping, recipe: Recipe, data_dir=None) -> tuple[Iterator, int, int]:
    """An iterator of ``(inputs, labels)`` training batches over all epochs, the number of steps
    and the number of training examples used."""
    spec = data.get_task(config["task"])
    rng = np.random.default_rng(derive_seed(config["seed"], spec.name, "batches"))
    if spec.kind == "text":
        enc = encode(
            spec.name, "train", max_length=recipe.max_length, model_name=model_name_of(config), data_dir=data_dir
        )
        subset = data.fixed_subset(len(enc.labels), recipe.max_train_examples)
        lengths = enc.lengths[subset]

        def epoch():
            for b in length_bucketed_batches(lengths, recipe.batch_size, rng):
                idx = subset[b]
                yield collate(enc, idx), torch.from_numpy(enc.labels[idx])
    else:
        ds = data.load_vision(spec.name, "train", data_dir)
        subset = torch.from_numpy(data.fixed_subset(len(ds), recipe.max_train_examples))
        gen = torch.Generator().manual_seed(derive_seed(config["seed"], spec.name, "augment"))

        def epoch():
            order = subset[torch.from_numpy(rng.permutation(len(subset)))]
            for start in range(0, len(order), recipe.batch_size):
                idx = order[start : start + recipe.batch_size]
                x = data.to_float(ds.images[idx])
                yield (shift_images(x, 2, gen) if recipe.augment else x), ds.labels[idx]

    n = len(subset)
    steps_per_epoch = math.ceil(n / recipe.batch_size)
    steps = max(1, round(recipe.epochs * steps_per_epoch))

    def stream():
        while True:
            yield from epoch()

    return (b for _, b in zip(range(steps), stream())), steps, n


def warmup_cosine(step: int, total: int, warmup: float) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` of the steps, then cosine to zero."""
    warm = max(1, round(warmup * total))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def train(
    model: nn.Module, batches, *, steps: int, recipe: Recipe, device=None, progress: bool = True, desc: str = "train"
) -> list[float]:
    """Minimise cross-entropy over ``batches`` for ``steps`` AdamW steps (warm-up + cosine,
    gradients clipped at norm 1). Returns the loss of every step. Works for any classifier whose
    forward takes a tensor or a dict of tensors (see :func:`logits_of`)."""
    device = get_device(device)
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]  # biases and norms: no decay
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, steps, recipe.warmup))
    losses = []
    bar = tqdm(batches, total=steps, desc=desc, disable=not progress, mininterval=2.0, leave=False)
    for inputs, labels in bar:
        loss = nn.functional.cross_entropy(logits_of(model, to_device(inputs, device)), labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if len(losses) % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    model.eval()
    return losses


def fit_expert(
    task: str,
    *,
    seed: int,
    variant: str | None = None,
    smoke: bool | None = None,
    model_name: str | None = None,
    data_dir=None,
    progress: bool = True,
    lora: Mapping | bool | None = None,
    **overrides,
) -> Expert:
    """Train the expert of ``task`` for ``seed`` and ``variant`` (see the module docstring), or
    load it if this exact configuration was trained before. ``smoke=None`` follows ``SMOKE``;
    ``overrides`` change fields of the task's :class:`Recipe` (and so the cache key). ``lora``
    (True, or settings of :data:`lib.cache.LORA`) trains a LoRA adapter of the body and a full head instead
    of fine-tuning every weight: the expert's ``state_dict`` holds the merged weights (base + B A,
    the trained head), :meth:`Expert.adapter` the factors."""
    config = expert_config(
        task, seed=seed, variant=variant, smoke=smoke, model_name=model_name, data_dir=data_dir, lora=lora, **overrides
    )
    cached = load_expert(config)
    if cached is not None:
        return cached
    key = config_key(config)
    recipe = Recipe(**config["recipe"])
    desc = f"{task} seed {seed} {config['variant']}"
    model = initial_model(config, data_dir=data_dir, progress=progress)
    adapted, lora = None, config.get("lora")
    start, cpu_start = time.perf_counter(), time.process_time()
    # a LoRA expert has a stream of its own (not the full fine-tune's), from which the adapter's
    # initial A is drawn as well as the dropout
    with _seeded(derive_seed(seed, task, "train", *(["lora"] if lora else []))):
        if lora:
            adapted = model = models.with_lora(model, **lora)
            desc += " LoRA"
        batches, steps, n_train = _train_batches(config, recipe, data_dir)
        losses = train(model, batches, steps=steps, recipe=recipe, progress=progress, desc=desc)
    train_s, train_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    if adapted is not None:
        model = models.merged_lora(adapted)
    from .evaluate import evaluate

    start = time.perf_counter()
    metrics = evaluate(model, task, smoke=config["smoke"], data_dir=data_dir, model_name=model_name, progress=progress)
    eval_s = time.perf_counter() - start
    examples_seen = min(steps * recipe.batch_size, round(recipe.epochs * n_train))
    expert = Expert(
        key,
        config,
        to_state_dict(model.cpu()),
        metrics,
        {
            "train_s": round(train_s, 2),
            "eval_s": round(eval_s, 2),
            "train_examples": n_train,
            "steps": steps,
            # CPU seconds of all threads: unlike the wall time, hardly affected by other work on the machine
            "train_cpu_s": round(train_cpu_s, 2),
            "load_average": _load_average(),
            "train_examples_per_s": round(examples_seen / train_s, 1),
            "eval_examples_per_s": round(metrics["n"] / eval_s, 1),
        },
        versions(),
        expert_path(key),
        history={"loss_first10": float(np.mean(losses[:10])), "loss_last10": float(np.mean(losses[-10:]))},
    )
    expert.path = save_expert(expert, adapted)
    return expert


# ---------------------------------------------------------------------------------------------
# heads over merged bodies, BatchNorm re-estimation


def split_head(state_dict: Mapping, kind: str) -> tuple[StateDict, StateDict]:
    """``(body, head)`` of a state dict of ``kind`` (``"text"`` or ``"vision"``)."""
    pattern = models.HEAD_PATTERNS[kind]
    body = {k: v for k, v in state_dict.items() if not matches(k, pattern)}
    head = {k: v for k, v in state_dict.items() if matches(k, pattern)}
    return body, head


def with_head(body: Mapping, head_from: Mapping | Expert, kind: str) -> StateDict:
    """``body``'s tensors with the head of ``head_from`` (a state dict or an expert): how a merged
    body is scored on a task whose head was not merged (SST-2 + Emotion, the vision experts)."""
    source = head_from.state_dict if isinstance(head_from, Expert) else head_from
    merged_body, _ = split_head(body, kind)
    _, head = split_head(source, kind)
    return {**merged_body, **head}


def fresh_head(
    body: Mapping,
    task: str,
    *,
    seed: int,
    probe_examples: int = 0,
    smoke: bool | None = None,
    probe_steps: int = 300,
    data_dir=None,
    device=None,
) -> StateDict:
    """The report's re-initialised-head variant: ``body`` with a head redrawn from ``seed``.

    With ``probe_examples > 0`` the new head is then fitted as a linear probe on the frozen body:
    the body's features of a fixed subset of that many training examples are computed once, and
    the head alone is trained on them (``probe_steps`` full-batch AdamW steps). With 0 the head
    stays random, which shows what merging a body without a matching head costs."""
    spec = data.get_task(task)
    smoke = paths.is_smoke() if smoke is None else smoke
    from .evaluate import _skeleton

    body, _ = split_head(body, spec.kind)
    model = _skeleton(spec.name)
    missing, unexpected = model.load_state_dict(body, strict=False)
    not_head = [k for k in list(missing) + list(unexpected) if not matches(k, models.HEAD_PATTERNS[spec.kind])]
    if not_head:
        raise ValueError(f"the body does not fit a {spec.title} model: {not_head[0]!r} is missing or unexpected")
    models.init_head(model, seed)
    if probe_examples > 0:
        features, labels = _head_inputs(
            model, task, probe_examples if not smoke else min(probe_examples, 64), data_dir=data_dir, device=device
        )
        head = models.head_of(model)
        features, labels = features.to(head.weight.device), labels.to(head.weight.device)
        with _seeded(derive_seed(seed, task, "probe")), torch.enable_grad():
            optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=0.0)
            for _ in range(probe_steps):
                loss = nn.functional.cross_entropy(head(features), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    _, head_sd = split_head(to_state_dict(model), spec.kind)
    return {**body, **{k: v.detach().clone().cpu() for k, v in head_sd.items()}}


@torch.no_grad()  # not inference_mode: the features are then used to train the head
def _head_inputs(model: nn.Module, task: str, n: int, *, data_dir=None, device=None):
    """The inputs of the head (the body's features) for a fixed subset of ``n`` training
    examples, and their labels."""
    spec = data.get_task(task)
    device = get_device(device)
    captured = []
    hook = models.head_of(model).register_forward_pre_hook(lambda _m, args: captured.append(args[0].float().cpu()))
    subset = data.fixed_subset(len(data.load(spec.name, "train", data_dir)), n)
    model.to(device).eval()
    try:
        if spec.kind == "text":
            enc = encode(spec.name, "train", max_length=RECIPES[spec.name].max_length, data_dir=data_dir)
            batches = [subset[b] for b in sorted_batches(enc.lengths[subset], EVAL_BATCH["text"])]
            for idx in batches:
                logits_of(model, to_device(collate(enc, idx), device))
            labels = enc.labels[np.concatenate(batches)]
        else:
            ds = data.load_vision(spec.name, "train", data_dir)
            idx = torch.from_numpy(subset)
            model(data.to_float(ds.images[idx]).to(device))
            labels = ds.labels[idx].numpy()
    finally:
        hook.remove()
    return torch.cat(captured), torch.from_numpy(labels)


@torch.no_grad()
def reestimate_batchnorm(
    model: nn.Module, task: str, *, batches: int = 20, batch_size: int = 256, seed: int = 0, data_dir=None, device=None
) -> nn.Module:
    """Recompute every BatchNorm's running mean and variance from ``batches`` training batches of
    ``task`` (a cumulative average, not the momentum average of training). Merging averages the
    running statistics along with the weights, but the merged weights produce different
    activations, so the stored statistics no longer match them; re-estimating fixes that without
    any gradient step. Off by default in the notebooks and flagged in their results when used.
    Returns ``model`` (modified in place, in eval mode)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layers to re-estimate")
    ds = data.load_vision(task, "train", data_dir)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(ds))[: batches * batch_size])
    device = get_device(device)
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches seen
    model.to(device).train()
    try:
        for start in range(0, len(order), batch_size):
            model(data.to_float(ds.images[order[start : start + batch_size]]).to(device))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    return model

"""Score models and state dicts on a task's evaluation split.

>>> evaluate(expert.state_dict, "sst2")                 # {'accuracy': 0.88..., 'n': 872}
>>> logits, idx = predict(merged, "emotion")            # logits in the split's order

Evaluation
----------
:func:`evaluate` scores a model or state dict on a whole split (SMOKE: a fixed slice) with
accuracy and the task's own metric (CoLA: ``mcc``; MRPC: ``f1``; Emotion, TREC: ``macro_f1``),
batched with dynamic padding over length-sorted examples, under ``torch.inference_mode`` on
:func:`lib.device.get_device`. Tokenised splits are kept in memory, so scoring hundreds of
merged models costs only the forward passes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import data, paths
from .batching import collate, encode, logits_of, sorted_batches, to_device
from .cache import EVAL_BATCH, RECIPES, SMOKE_EVAL, Expert
from .device import get_device
from .statedict import to_state_dict
from .train import _architecture


def compute_metrics(task: str, y_true, y_pred) -> dict:
    """Accuracy and the task's own metric (``mcc``, ``f1`` of class 1, or ``macro_f1``)."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    spec = data.get_task(task)
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    out = {"accuracy": float(accuracy_score(y_true, y_pred))}
    if spec.metric == "mcc":
        out["mcc"] = float(matthews_corrcoef(y_true, y_pred))
    elif spec.metric == "f1":
        out["f1"] = float(f1_score(y_true, y_pred, pos_label=1, zero_division=0))
    elif spec.metric == "macro_f1":
        out["macro_f1"] = float(
            f1_score(y_true, y_pred, average="macro", labels=range(spec.num_labels), zero_division=0)
        )
    return out


def eval_indices(task: str, split: str, *, smoke: bool, data_dir=None) -> np.ndarray:
    """The examples scored: the whole split, or in SMOKE mode a fixed seed-0 slice."""
    spec = data.get_task(task)
    n = len(data.load(spec.name, split, data_dir))
    return data.fixed_subset(n, SMOKE_EVAL[spec.kind] if smoke else None)


_EVAL_BATCHES: dict[tuple, list] = {}


def _eval_batches(task: str, split: str, *, smoke: bool, max_length: int, model_name, data_dir) -> list:
    """``(inputs, idx)`` per batch, built once per split and kept in memory."""
    spec = data.get_task(task)
    source = data.find_source(spec, split, data_dir)
    key = (spec.name, split, smoke, max_length, model_name, str(source.root))
    if key not in _EVAL_BATCHES:
        subset = eval_indices(spec.name, split, smoke=smoke, data_dir=data_dir)
        if spec.kind == "text":
            enc = encode(spec.name, split, max_length=max_length, model_name=model_name, data_dir=data_dir)
            batches = sorted_batches(enc.lengths[subset], EVAL_BATCH["text"])
            _EVAL_BATCHES[key] = [(collate(enc, subset[b]), subset[b]) for b in batches]
        else:
            ds = data.load_vision(spec.name, split, data_dir)
            size = EVAL_BATCH["vision"]
            chunks = [subset[i : i + size] for i in range(0, len(subset), size)]
            _EVAL_BATCHES[key] = [(data.to_float(ds.images[torch.from_numpy(c)]), c) for c in chunks]
    return _EVAL_BATCHES[key]


_SKELETONS: dict[tuple, nn.Module] = {}


def _skeleton(task: str, model_name: str | None = None) -> nn.Module:
    # one module per architecture, reused by every call that loads a state dict into it
    spec = data.get_task(task)
    key = (spec.kind, spec.num_labels, model_name)
    if key not in _SKELETONS:
        _SKELETONS[key] = _architecture(spec.name, model_name).to(get_device()).eval()
    return _SKELETONS[key]


def as_model(model_or_state_dict, task: str, model_name: str | None = None) -> nn.Module:
    """A module for ``task``: the module itself, or the state dict loaded into a cached
    architecture of the task's shape (so scoring many state dicts builds the model once)."""
    if isinstance(model_or_state_dict, nn.Module):
        return model_or_state_dict
    if isinstance(model_or_state_dict, Expert):
        model_or_state_dict = model_or_state_dict.state_dict
    spec = data.get_task(task)
    skeleton = _skeleton(spec.name, model_name)
    try:
        skeleton.load_state_dict(to_state_dict(model_or_state_dict))
    except RuntimeError as err:
        raise ValueError(f"the state dict does not fit a {spec.title} model ({spec.num_labels} labels): {err}") from err
    return skeleton


def predict(
    model_or_state_dict,
    task: str,
    split: str | None = None,
    *,
    smoke: bool | None = None,
    max_length: int | None = None,
    model_name: str | None = None,
    data_dir=None,
    device=None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``(logits, indices)``: the model's logits on the scored examples of ``split`` and their
    indices in the split, in the split's order."""
    spec = data.get_task(task)
    split = spec.check_split(split or spec.eval_split)
    smoke = paths.is_smoke() if smoke is None else smoke
    max_length = max_length or RECIPES[spec.name].max_length
    model = as_model(model_or_state_dict, spec.name, model_name)
    device = get_device(device)
    batches = _eval_batches(
        spec.name, split, smoke=smoke, max_length=max_length, model_name=model_name, data_dir=data_dir
    )
    # a caller's module goes back where it was, in the mode it was in; it is moved outside
    # inference mode so that its parameters stay usable for training
    was_training, old_device = model.training, next(model.parameters()).device
    model.to(device).eval()
    logits, order = [], []
    try:
        with torch.inference_mode():
            for inputs, idx in tqdm(batches, desc=f"eval {task}", disable=not progress, leave=False):
                logits.append(logits_of(model, to_device(inputs, device)).detach().float().cpu())
                order.append(idx)
    finally:
        model.to(old_device).train(was_training)
    order = np.concatenate(order)
    back = np.argsort(order, kind="stable")
    return torch.cat(logits).numpy()[back], order[back]


def evaluate(
    model_or_state_dict,
    task: str,
    split: str | None = None,
    *,
    smoke: bool | None = None,
    max_length: int | None = None,
    model_name: str | None = None,
    data_dir=None,
    device=None,
    progress: bool = False,
) -> dict:
    """Score a model (module, state dict or :class:`Expert`) on ``split`` (default: the task's
    evaluation split) over every example (SMOKE: a fixed slice). Returns accuracy, the task's own
    metric, and ``n``, the number of examples scored."""
    spec = data.get_task(task)
    logits, idx = predict(
        model_or_state_dict,
        task,
        split,
        smoke=smoke,
        max_length=max_length,
        model_name=model_name,
        data_dir=data_dir,
        device=device,
        progress=progress,
    )
    labels = data.labels_of(spec.name, split or spec.eval_split, data_dir)[idx]
    return {**compute_metrics(spec.name, labels, logits.argmax(1)), "n": int(len(idx))}

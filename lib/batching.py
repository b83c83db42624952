"""The inputs the models are fed: text splits tokenised once per process and padded per batch,
length-bucketed training batches and length-sorted evaluation batches, randomly shifted images,
and running a model on a batch. :mod:`lib.train` trains on these, :mod:`lib.evaluate` scores on
them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import data, models


@dataclass(frozen=True)
class Encoded:
    """A tokenised text split: token ids per example (unpadded), labels, lengths."""

    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray]
    labels: np.ndarray
    pad_id: int

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self.input_ids))


_ENCODED: dict[tuple, Encoded] = {}
_TOKENIZERS: dict[str | None, object] = {}


def _tokenizer(model_name: str | None):
    if model_name not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[model_name] = AutoTokenizer.from_pretrained(
            str(models.default_text_model_path()) if model_name is None else model_name
        )
    return _TOKENIZERS[model_name]


def encode(task: str, split: str, *, max_length: int = 128, model_name: str | None = None, data_dir=None) -> Encoded:
    """``split`` tokenised for the model (pairs as ``[CLS] a [SEP] b [SEP]``), once per process."""
    spec = data.get_task(task)
    key = (spec.name, split, max_length, model_name, str(data.find_source(spec, split, data_dir).root))
    if key not in _ENCODED:
        ds = data.load_text(spec.name, split, data_dir)
        tok = _tokenizer(model_name)
        columns = [list(ds[c]) for c in spec.text_columns]
        enc = tok(*columns, truncation=True, max_length=max_length)
        type_ids = enc.get("token_type_ids") or [[0] * len(x) for x in enc["input_ids"]]
        _ENCODED[key] = Encoded(
            [np.asarray(x, dtype=np.int64) for x in enc["input_ids"]],
            [np.asarray(x, dtype=np.int64) for x in type_ids],
            np.asarray(ds[spec.label_column], dtype=np.int64),
            tok.pad_token_id,
        )
    return _ENCODED[key]


def collate(enc: Encoded, idx: np.ndarray) -> dict[str, torch.Tensor]:
    """The examples ``idx`` padded to the longest of them (dynamic padding)."""
    width = max(len(enc.input_ids[i]) for i in idx)
    ids = np.full((len(idx), width), enc.pad_id, dtype=np.int64)
    types = np.zeros((len(idx), width), dtype=np.int64)
    mask = np.zeros((len(idx), width), dtype=np.int64)
    for row, i in enumerate(idx):
        n = len(enc.input_ids[i])
        ids[row, :n], types[row, :n], mask[row, :n] = enc.input_ids[i], enc.token_type_ids[i], 1
    return {
        "input_ids": torch.from_numpy(ids),
        "token_type_ids": torch.from_numpy(types),
        "attention_mask": torch.from_numpy(mask),
    }


def length_bucketed_batches(
    lengths: np.ndarray, batch_size: int, rng: np.random.Generator, pool_batches: int = 50
) -> list[np.ndarray]:
    """One epoch of shuffled batches of similar lengths: the examples are shuffled, cut into
    pools of ``pool_batches`` batches, sorted by length inside each pool, batched, and the
    batches shuffled, so padding stays small while every epoch sees a different order."""
    order = rng.permutation(len(lengths))
    pool = batch_size * pool_batches
    batches = []
    for start in range(0, len(order), pool):
        chunk = order[start : start + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def sorted_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Evaluation batches: examples sorted by length (longest first, so memory peaks at once)."""
    order = np.argsort(-lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def shift_images(images: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Each image of ``(n, 1, h, w)`` moved by its own random offset of up to ``max_shift``
    pixels in each direction, filling with zeros (the background of these datasets)."""
    n, _, h, w = images.shape
    padded = nn.functional.pad(images, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


def logits_of(model: nn.Module, inputs) -> torch.Tensor:
    return model(**inputs).logits if isinstance(inputs, Mapping) else model(inputs)


def to_device(inputs, device):
    if isinstance(inputs, Mapping):
        return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    return inputs.to(device, non_blocking=True)

"""lib.evaluate: the tokenised evaluation batches are built once per process and reused, and the
cached path scores exactly what a fresh tokenisation scores. Tiny stand-in models whose logits
depend on every token, so a stale or reordered batch would show."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from lib import batching, cache, paths
from lib import evaluate as evaluation

needs_shared = pytest.mark.skipif(
    not (paths.SHARED_DATA / "MD5SUMS").is_file(),
    reason=f"the project's offline data is not at {paths.SHARED_DATA} (clone the project with ../shared beside it)",
)


class TokenSum(nn.Module):
    """Logits from the token ids themselves: (sum of ids, length, first non-CLS id)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, input_ids, attention_mask, token_type_ids):
        ids = (input_ids * attention_mask).float()
        return SimpleNamespace(logits=self.scale * torch.stack([ids.sum(1), attention_mask.sum(1).float()], 1))


@needs_shared
@pytest.mark.parametrize("task", ["sst2", "mrpc"])  # single sentences and pairs
def test_cached_batches_give_the_predictions_of_a_fresh_tokenisation(task):
    model = TokenSum()
    fresh_logits, fresh_idx = _fresh_predict(model, task)
    key_count = len(evaluation._EVAL_BATCHES)
    cached_logits, cached_idx = evaluation.predict(model, task, smoke=True)  # from the in-memory batches
    assert len(evaluation._EVAL_BATCHES) == key_count  # nothing tokenised again
    assert np.array_equal(cached_logits, fresh_logits) and np.array_equal(cached_idx, fresh_idx)
    # and a metric over them is the same dict
    assert evaluation.evaluate(model, task, smoke=True) == evaluation.evaluate(model, task, smoke=True)


@needs_shared
def test_evaluation_batches_are_built_once_per_split_and_reused():
    kwargs = {"smoke": True, "max_length": cache.RECIPES["sst2"].max_length, "model_name": None, "data_dir": None}
    first = evaluation._eval_batches("sst2", "validation", **kwargs)
    assert evaluation._eval_batches("sst2", "validation", **kwargs) is first
    # a different length cap is a different tokenisation, cached under its own key
    other = evaluation._eval_batches("sst2", "validation", **{**kwargs, "max_length": 16})
    assert other is not first and max(b["input_ids"].shape[1] for b, _ in other) <= 16


def _fresh_predict(model, task):
    """``predict`` with every tokenisation cache emptied first (then restored as it was)."""
    saved_batches, saved_encoded = dict(evaluation._EVAL_BATCHES), dict(batching._ENCODED)
    evaluation._EVAL_BATCHES.clear()
    batching._ENCODED.clear()
    try:
        return evaluation.predict(model, task, smoke=True)
    finally:
        evaluation._EVAL_BATCHES.update(saved_batches)
        batching._ENCODED.update(saved_encoded)

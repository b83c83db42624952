"""lib.models and lib.train: model builders, the training loop, the expert cache, evaluation
metrics, heads over merged bodies and BatchNorm re-estimation. Everything is tiny: SMOKE slices
of a few dozen examples, and the cache in a temporary folder."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from lib import batching, data, models, paths, train
from lib import cache as expert_cache
from lib import evaluate as evaluation

needs_shared = pytest.mark.skipif(
    not (paths.SHARED_DATA / "MD5SUMS").is_file(),
    reason=f"the project's offline data is not at {paths.SHARED_DATA} (clone the project with ../shared beside it)",
)

# a vision expert trained in a few seconds: two steps on a 64-image slice, scored on 500 images
TINY = {"smoke": True, "progress": False, "max_train_examples": 64, "batch_size": 32}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECTRAL_MERGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- models ---------------------------------------------------------------------------------------


def test_resnet18_28_takes_one_channel_28x28():
    model = models.resnet18_28(10)
    assert model.conv1.in_channels == 1
    with torch.no_grad():
        assert model.eval()(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert models.model_kind(model) == "vision"


def test_init_head_is_seeded_and_leaves_the_global_stream_alone():
    a, b = models.resnet18_28(4), models.resnet18_28(4)
    state = torch.random.get_rng_state()
    models.init_head(a, 7)
    assert torch.equal(torch.random.get_rng_state(), state)
    models.init_head(b, 7)
    assert torch.equal(a.fc.weight, b.fc.weight) and torch.equal(a.fc.bias, b.fc.bias)
    models.init_head(b, 8)
    assert not torch.equal(a.fc.weight, b.fc.weight)
    assert float(a.fc.weight.detach().abs().max()) <= 1 / 512**0.5  # nn.Linear's default range


# --- training loop and batching ---------------------------------------------------------------------


def test_train_fits_a_tiny_slice():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=gen)
    y = (x[:, 0] + x[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    batches = ((x, y) for _ in range(150))
    recipe = expert_cache.Recipe(epochs=1, batch_size=32, lr=1e-2, weight_decay=0.0)
    losses = train.train(model, batches, steps=150, recipe=recipe, device="cpu", progress=False)
    assert len(losses) == 150 and losses[-1] < 0.1 * losses[0]
    assert (model(x).argmax(1) == y).all()


def test_warmup_cosine_schedule():
    factors = [train.warmup_cosine(s, 100, 0.1) for s in range(100)]
    assert factors[9] == pytest.approx(1.0) and factors[0] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:])) and factors[-1] < 0.01


def test_length_bucketed_batches_cover_each_example_once_with_little_padding():
    lengths = np.random.default_rng(0).integers(1, 100, size=1000)
    batches = batching.length_bucketed_batches(lengths, 16, np.random.default_rng(1), pool_batches=8)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    again = batching.length_bucketed_batches(lengths, 16, np.random.default_rng(1), pool_batches=8)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    padded = sum(len(b) * lengths[b].max() for b in batches)
    assert padded < 1.3 * lengths.sum()  # random batches would pad to ~1.9x


def test_shift_images_moves_content_without_losing_it():
    images = torch.zeros(5, 1, 28, 28)
    images[:, :, 10:14, 10:14] = 1.0
    shifted = batching.shift_images(images, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape
    assert torch.equal(shifted.sum((1, 2, 3)), images.sum((1, 2, 3)))
    assert torch.equal(batching.shift_images(images, 0, torch.Generator()), images)


# --- metrics ----------------------------------------------------------------------------------------


def test_metrics_of_a_constant_predictor():
    y = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    cola = evaluation.compute_metrics("cola", y, np.ones_like(y))
    assert cola == {"accuracy": 5 / 8, "mcc": 0.0}
    mrpc = evaluation.compute_metrics("mrpc", y, np.ones_like(y))
    assert mrpc["f1"] == pytest.approx(2 * (5 / 8) / (1 + 5 / 8))  # precision 5/8, recall 1
    emotion = evaluation.compute_metrics("emotion", y, np.zeros_like(y))
    assert emotion["macro_f1"] == pytest.approx((2 * (3 / 8) / (1 + 3 / 8)) / 6)  # one class of six


class ConstantText(nn.Module):
    """Always predicts ``label``, whatever the tokens."""

    def __init__(self, label, num_labels):
        super().__init__()
        self.logits = nn.Parameter(torch.nn.functional.one_hot(torch.tensor(label), num_labels).float())

    def forward(self, input_ids, attention_mask, token_type_ids):
        return SimpleNamespace(logits=self.logits.expand(input_ids.shape[0], -1))


class ConstantImage(ConstantText):
    def forward(self, images):
        return self.logits.expand(images.shape[0], -1)


@needs_shared
def test_evaluate_constant_predictor_on_the_full_split():
    scores = evaluation.evaluate(ConstantText(1, 2), "cola", smoke=False)
    assert scores == {"accuracy": pytest.approx(721 / 1043), "mcc": 0.0, "n": 1043}  # CoLA validation
    scores = evaluation.evaluate(ConstantImage(3, 10), "mnist", split="test", smoke=True)
    labels = data.labels_of("mnist", "test")[evaluation.eval_indices("mnist", "test", smoke=True)]
    assert scores == {"accuracy": pytest.approx(np.mean(labels == 3)), "n": 500}


@needs_shared
def test_predict_returns_the_split_order():
    class FirstToken(ConstantText):  # logits depend on the example, so a wrong reordering shows
        def forward(self, input_ids, attention_mask, token_type_ids):
            return SimpleNamespace(logits=attention_mask.sum(1, keepdim=True).float() * self.logits)

    logits, idx = evaluation.predict(FirstToken(0, 2), "trec", smoke=False)
    enc = batching.encode("trec", "test")
    assert np.array_equal(idx, np.arange(500))
    assert np.array_equal(logits[:, 0], enc.lengths.astype(np.float32))


# --- experts and their cache -----------------------------------------------------------------------


@needs_shared
def test_fit_expert_caches_and_a_second_call_skips_training(cache, monkeypatch):
    first = train.fit_expert("kmnist", seed=0, variant="shared_init", **TINY)
    assert not first.from_cache and first.metrics["n"] == 500
    assert {p.name for p in first.path.iterdir()} == {"model.safetensors", "meta.json"}
    assert first.path.parent == cache / "experts"
    meta = json.loads((first.path / "meta.json").read_text())
    assert meta["config"]["task"] == "kmnist" and meta["runtime"]["steps"] == 2 and "torch" in meta["versions"]

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although the expert is cached")

    monkeypatch.setattr(train, "train", no_training)
    second = train.fit_expert("kmnist", seed=0, variant="shared_init", **TINY)
    assert second.from_cache and second.key == first.key and second.metrics == first.metrics
    assert all(torch.equal(second.state_dict[k], first.state_dict[k]) for k in first.state_dict)
    with pytest.raises(AssertionError, match="trained again"):
        train.fit_expert("kmnist", seed=1, variant="shared_init", **TINY)  # another seed is another expert


@needs_shared
def test_training_is_deterministic_given_the_seed(cache, monkeypatch):
    first = train.fit_expert("fashion_mnist", seed=3, variant="shared_init", **TINY)
    monkeypatch.setenv("SPECTRAL_MERGE_CACHE", str(cache.parent / "other"))
    again = train.fit_expert("fashion_mnist", seed=3, variant="shared_init", **TINY)
    assert not again.from_cache
    assert all(torch.equal(again.state_dict[k], first.state_dict[k]) for k in first.state_dict)


@needs_shared
def test_fine_tuned_expert_is_keyed_by_its_base_and_starts_from_it():
    base_config = expert_cache.expert_config(
        "mnist", seed=0, smoke=True, **{k: TINY[k] for k in ("max_train_examples",)}
    )
    config = expert_cache.expert_config("kmnist", seed=0, variant="mnist_base", smoke=True)
    assert config["init"]["base"] == expert_cache.config_key(expert_cache.expert_config("mnist", seed=0, smoke=True))
    assert expert_cache.config_key(base_config) != config["init"]["base"]  # another MNIST recipe is another base
    assert expert_cache.expert_config("mnist", seed=0, variant="mnist_base") == expert_cache.expert_config(
        "mnist", seed=0
    )
    with pytest.raises(ValueError, match="variants"):
        expert_cache.expert_config("sst2", seed=0, variant="mnist_base")


@needs_shared
def test_a_cache_entry_with_another_configuration_is_refused():
    expert = train.fit_expert("kmnist", seed=0, variant="shared_init", **TINY)
    meta_file = expert.path / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["config"]["recipe"]["lr"] = 1.0
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(RuntimeError, match="different configuration"):
        train.fit_expert("kmnist", seed=0, variant="shared_init", **TINY)


# --- heads over merged bodies, BatchNorm ----------------------------------------------------------------


def test_with_head_swaps_only_the_head():
    body = models.resnet18_28(10).state_dict()
    other = models.resnet18_28(10).state_dict()
    combined = train.with_head(body, other, "vision")
    assert combined.keys() == body.keys()
    assert torch.equal(combined["fc.weight"], other["fc.weight"])
    assert torch.equal(combined["conv1.weight"], body["conv1.weight"])


@needs_shared
def test_fresh_head_probe_fits_the_new_head_on_the_frozen_body():
    body = models.resnet18_28(10).state_dict()
    random_head = train.fresh_head(body, "mnist", seed=0, smoke=True)
    probed = train.fresh_head(body, "mnist", seed=0, probe_examples=64, probe_steps=20, smoke=True)
    assert probed.keys() == body.keys()
    assert all(torch.equal(probed[k], body[k]) for k in body if not k.startswith("fc."))
    assert not torch.equal(probed["fc.weight"], random_head["fc.weight"])


@needs_shared
def test_reestimate_batchnorm_recomputes_statistics():
    model = models.resnet18_28(10)
    model.bn1.running_mean.fill_(100.0)
    train.reestimate_batchnorm(model, "mnist", batches=1, batch_size=16)
    assert float(model.bn1.running_mean.abs().max()) < 100.0
    assert model.bn1.momentum == 0.1 and not model.training
    with pytest.raises(ValueError, match="no BatchNorm"):
        train.reestimate_batchnorm(nn.Linear(2, 2), "mnist")


# --- text (loads the real MiniLM: a few seconds) ------------------------------------------------------


@pytest.mark.slow
@needs_shared
def test_text_expert_smoke_and_shared_binary_head():
    expert = train.fit_expert("cola", seed=0, max_train_examples=16, batch_size=8, smoke=True, progress=False)
    assert set(expert.metrics) == {"accuracy", "mcc", "n"} and expert.metrics["n"] == expert_cache.SMOKE_EVAL["text"]
    base_sst2 = train.base_state_dict("sst2", seed=0)
    base_cola = train.base_state_dict("cola", seed=0)
    # SST-2 and CoLA experts of a seed start from one head, so their heads can be merged too
    assert torch.equal(base_sst2["classifier.weight"], base_cola["classifier.weight"])
    assert not torch.equal(expert.state_dict["classifier.weight"], base_cola["classifier.weight"])
    body_key = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(expert.state_dict[body_key], base_cola[body_key])
    emotion = train.fresh_head(expert.state_dict, "emotion", seed=0)
    assert emotion["classifier.weight"].shape == (6, 384)
    assert evaluation.evaluate(emotion, "emotion", smoke=True)["n"] == expert_cache.SMOKE_EVAL["text"]

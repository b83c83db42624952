"""Each notebook's grid in one place: the full run (:data:`FULL`) and what ``SMOKE=1`` replaces
(:data:`SMOKE`: tiny slices and a coarse grid, checks that every cell runs).

A notebook's parameters cell keeps the switches a user sets (``SMOKE``, ``FROM_RESULTS``,
``EXECUTOR``) and takes its grid from here, every name spelled out (:func:`values` checks them)::

    SEEDS, POOLS, SIZES, ... = configs.values("04_star", "SEEDS POOLS SIZES ...", smoke=SMOKE)

``grid(notebook, smoke=False)`` is the full grid whatever the mode, which the notebooks' full-mode
runtime estimates price. Every call returns fresh copies. Named presets of a grid (the course
book's ``PRESET=lab``) are in :mod:`lib.presets`.
"""

from __future__ import annotations

import copy
from typing import Any

STRATEGIES = ["snr_base_reset", "snr_winner", "snr_low_a", "snr_low_b", "snr_max", "snr_weighted"]
REFERENCES = ["average", "task_arithmetic", "ties", "dare", "star", "drm_h"]  # each at its registered defaults
TEXT_TASKS = ["sst2", "cola", "emotion", "trec", "mrpc", "rte", "rotten_tomatoes"]
VISION_POOLS = {
    "vision/mnist_base": ["fashion_mnist", "kmnist"],
    "vision/shared_init": ["mnist", "fashion_mnist", "kmnist"],
}
# SMOKE merges and scans MiniLM's first transformer block only: the spectrum of the 30522 x 384 word
# embeddings alone would take most of a SMOKE run
SMOKE_LAYERS = r"encoder\.layer\.0\."
SMOKE_POOLS = {"text": ["sst2", "cola", "trec"], "vision/mnist_base": VISION_POOLS["vision/mnist_base"]}

#: notebooks 02 and 03: the report's two text sweeps
TEXT_SWEEP = {
    "SEEDS": [0, 1, 2],  # experts are retrained for each seed
    "SNR_METHODS": ["mp", "report_text"],  # ours first, then the report's text code (old name: seed)
    "STRATEGIES": STRATEGIES,
    "TOPS": [
        0.0,
        0.1,
        0.25,
        0.4,
        0.5,
        0.7,
        0.9,
        1.0,
    ],  # the report's 0.25, 0.5, 0.7 and a coarse rest: 2/3 of the 0.1 grid's time
    "REFERENCES": REFERENCES,
    "MERGE_KW": {},  # which tensors are merged and scanned: all
}

FULL: dict[str, dict[str, Any]] = {
    "01_resnet_fashion_kmnist": {
        "SEEDS": [0, 1, 2],  # experts (and the MNIST base) are retrained for each seed
        "SNR_METHODS": ["mp", "max_median"],  # ours first, then the report's ResNet SNR
        "STRATEGIES": STRATEGIES,
        "TOPS": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0],  # a 0.2 step: the full 0.1 grid costs 1.6x the time
        "THRESHOLDS": [3.0, 5.0, 15.0, 25.0],  # the report's absolute thresholds on the max_median SNR
        "REFERENCES": REFERENCES,
        "MERGE_KW": {},  # every tensor is merged and scanned, in SMOKE mode too (a ResNet-18 is quick to scan)
    },
    "02_text_sst2_emotion": TEXT_SWEEP,
    "03_text_sst2_cola": TEXT_SWEEP,
    "04_star": {
        "SEEDS": [0, 1, 2],  # experts are retrained for each seed; subsets are drawn anew for each seed
        "POOLS": {"text": TEXT_TASKS, **VISION_POOLS},
        "SIZES": {"text": [2, 3, 5, 7], "vision": [2, 3]},  # every text size 2..7 costs 1.6x the evaluations
        # subsets per size and seed (STAR: 5 per size for Flan-T5, 3 for Mistral); all when there are fewer
        "MAX_SUBSETS": 1,
        "ETAS": [10, 20, 40, 70, 100],  # eta with rescaling; 40 is the paper's default
        "NO_RESCALE_ETAS": [10, 20, 40],  # the rescale ablation (at eta=100 nothing is cut and both coincide)
        # each at its registered defaults, then the STAR paper's own baselines (Table 2: TA at alpha=0.125
        # and TA+DARE at alpha=0.125, drop rate 0.7): a win against a lam=1 sum at chance says nothing
        "REFERENCES": [
            "average",
            "task_arithmetic",
            "ties",
            "dare",
            "drm_h",
            ("task_arithmetic", {"lam": 0.125}),
            ("dare", {"keep": 0.3, "lam": 0.125}),
        ],
        "RANK_ETAS": [10, 20, 30, 40, 50, 60, 70, 80, 90, 100],  # the kept-rank diagnostic needs spectra only
    },
    "05_drm": {
        "SEEDS": [0, 1, 2],
        "POOLS": {"text": TEXT_TASKS, **VISION_POOLS},
        # notebook 04's whole grid: the record store holds 04's merges of the same subsets
        "SIZES": {"text": [2, 3, 5, 7], "vision": [2, 3]},
        "MAX_SUBSETS": 1,  # subsets per size and seed (the paper: up to 10); all combinations when there are fewer
        "REFERENCES": [
            ("average", {}),
            ("task_arithmetic", {}),
            ("ties", {}),
            ("dare", {"then": "ties"}),
            ("star", {}),
            # the STAR paper's baselines, as in notebook 04: ours only, not rows of DRM's tables
            ("task_arithmetic", {"lam": 0.125}),
            ("dare", {"keep": 0.3, "lam": 0.125}),
        ],
        "DENSITIES": [0.05, 0.1, 0.2, 0.5, 1.0],  # fraction of entries kept, swept for DRM-H and TIES
        # sizes the density sweep covers (the paper's Figure 7 merges all its tasks: text 7 is ours)
        "DENSITY_SIZES": {"text": [2, 7], "vision": [2]},
        "PROFILE_KEYS": {
            "text": "bert.encoder.layer.3.attention.output.dense.weight",
            "vision": "layer3.0.conv1.weight",
        },
        "TOP_COMPONENTS": 10,  # per task and matrix: how many of its largest components the pruning census follows
    },
    "06_mergeability": {
        "SEED": 0,  # one seed of experts (`make experts` trains seeds 0, 1, 2); here the pairs, not the seeds, are the samples
        "TASKS": ["sst2", "cola", "mrpc", "rte", "emotion", "trec", "rotten_tomatoes"],  # every text task: 21 pairs
        "METHODS": ["average", "task_arithmetic", "ties", "dare", "star", "drm_h"],  # each at its registered defaults
        "K": 8,  # top singular directions per matrix compared by subspace_overlap
        "TOP": 0.5,  # fraction of matrices counted as high-SNR by snr_agreement
        "GRADIENT_EXAMPLES": 64,  # fixed training examples per task for the gradient properties
        "ALPHA": None,  # Lasso penalty: None = chosen by 5-fold cross-validation inside each training set
        "PERMUTATIONS": 500,  # at most this many shuffled-target refits of the whole pipeline per method: p down to 1/501
        "PERMUTATION_STOP": 10,  # ... stopping once this many shuffles do as well (sequential p; 100 fixed ones floored at 0.0099)
        "BOOTSTRAP": 2000,  # resamples of the pairs for the R² interval
    },
}

SMOKE: dict[str, dict[str, Any]] = {
    "01_resnet_fashion_kmnist": {
        "SEEDS": [0],
        "STRATEGIES": ["snr_low_b"],
        "TOPS": [0.0, 0.5, 1.0],
        "THRESHOLDS": [5.0, 25.0],
        "REFERENCES": ["average"],
    },
    "02_text_sst2_emotion": {
        "SEEDS": [0],
        "STRATEGIES": ["snr_winner"],
        "TOPS": [0.0, 0.25, 0.7],
        "REFERENCES": ["average"],
        "MERGE_KW": {"include": SMOKE_LAYERS},
    },
    "03_text_sst2_cola": {
        "SEEDS": [0],
        "STRATEGIES": ["snr_winner"],
        "TOPS": [0.0, 0.5, 1.0],
        "REFERENCES": ["average"],
        "MERGE_KW": {"include": SMOKE_LAYERS},
    },
    "04_star": {
        "SEEDS": [0],
        "POOLS": SMOKE_POOLS,
        "SIZES": {"text": [2, 3], "vision": [2, 3]},
        "ETAS": [20, 40, 100],
        "NO_RESCALE_ETAS": [20],
        "RANK_ETAS": [20, 40, 100],
    },
    "05_drm": {
        "SEEDS": [0],
        "POOLS": SMOKE_POOLS,
        "SIZES": {"text": [2, 3], "vision": [2, 3]},
        "DENSITIES": [0.05, 0.2, 1.0],
        "DENSITY_SIZES": {"text": [3], "vision": [2]},
    },
    "06_mergeability": {
        "TASKS": ["sst2", "cola", "rotten_tomatoes", "emotion"],
        "METHODS": ["task_arithmetic", "ties"],
        "GRADIENT_EXAMPLES": 8,
        "PERMUTATIONS": 10,
        "PERMUTATION_STOP": 3,
        "BOOTSTRAP": 200,
    },
}


def grid(notebook: str, *, smoke: bool) -> dict[str, Any]:
    """``notebook``'s grid (its parameters by name): :data:`FULL`, with :data:`SMOKE`'s
    replacements when ``smoke``; fresh copies."""
    if notebook not in FULL:
        raise ValueError(f"no grid for notebook {notebook!r}; lib.configs has {sorted(FULL)}")
    return copy.deepcopy({**FULL[notebook], **(SMOKE[notebook] if smoke else {})})


def values(notebook: str, names: str, *, smoke: bool) -> tuple:
    """The values of :func:`grid` in the order of ``names`` (space-separated), which must be
    exactly the grid's parameters: a notebook that unpacks them cannot miss or swap one."""
    g, wanted = grid(notebook, smoke=smoke), names.split()
    if sorted(wanted) != sorted(g):
        raise ValueError(f"{notebook}'s grid has {sorted(g)}; the notebook asks for {sorted(wanted)}")
    return tuple(g[name] for name in wanted)

"""The papers' numbers the notebooks compare with, each beside where the paper prints it.

The papers this project reproduces are in ``../shared/seeds/``: paper 000 is the Sapienza report (SNR-routed
merging, notebooks 01-03), paper 002 STAR (Lee et al. 2025, notebook 04), paper 004 DRM
(Decom-Renorm-Merge, notebook 05). A number here is read off the paper, never measured by us;
each is a :class:`lib.claims.Claim`: a value of the report beside our mean (notebooks 01-03), or
a difference "better minus worse" in points beside ours (04-05, built by the functions below),
so a table of claims is built in one place and a notebook only says which runs it has.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from . import pool, sweep
from .claims import Claim

# --- paper 000, the report: section 4.2 (ResNet-18), section 4.1 (text) ------------------------

#: notebook 01: Fashion-MNIST + KMNIST ResNet-18 experts over an MNIST base (report section 4.2)
RESNET_CLAIMS = [
    Claim("Fashion-MNIST expert alone", 0.91, runs=("expert:fashion_mnist",), task="fashion_mnist"),
    Claim(
        "Fashion-MNIST, snr_lowB at threshold 25 (the crash)",
        0.15,
        runs=("snr_low_b(snr_method=max_median, threshold=25.0)",),
        task="fashion_mnist",
        note="report: accuracy falls towards the non-expert level as the threshold grows",
    ),
    Claim("KMNIST, Standard merge", 0.31, runs=("average()",), task="kmnist"),
    Claim(
        "KMNIST expert alone",
        0.98,
        runs=("expert:kmnist",),
        task="kmnist",
        note="ours: trained on 7,011 of the 60,000 training images",
    ),
]

#: notebook 02: SST-2 + Emotion MiniLM experts (report section 4.1), against our evaluation and its own
SST2_EMOTION_CLAIMS = [
    Claim(
        "SST-2 accuracy, SNR Winner top 25% (own heads)",
        0.885,
        runs=("snr_winner(snr_method=report_text, top=0.25)",),
        task="sst2",
        note="ours: SST-2 head over the merged body, whole validation set",
    ),
    Claim(
        "SST-2 accuracy, SNR Winner top 25% (report's shared head)",
        0.885,
        runs=("snr_winner(snr_method=report_text, top=0.25)",),
        task=sweep.REPORT_SST2,
        note="SNR Winner keeps the higher-SNR head whole, the trained SST-2 one, so this equals the own-heads row; only average() mixes it with the random head (figure head_variants)",
    ),
    Claim(
        "Emotion accuracy, SNR Winner top 70% (own heads, 6 classes)",
        0.705,
        runs=("snr_winner(snr_method=report_text, top=0.7)",),
        task="emotion",
        note="ours: six classes, whole test set",
    ),
    Claim(
        "Emotion accuracy, SNR Winner top 70% (report's collapsed labels)",
        0.705,
        runs=("snr_winner(snr_method=report_text, top=0.7)",),
        task=sweep.COLLAPSED_EMOTION,
        note="sadness vs rest: compare with the majority-class rate",
    ),
]

#: the report's grid of ``top`` fractions (section 4.1)
REPORT_TOPS = (0.25, 0.5, 0.7)

#: notebook 03: SST-2 + CoLA MiniLM experts, merged whole (report section 4.1)
SST2_COLA_CLAIMS = [
    Claim(
        "SST-2 accuracy, Standard merge",
        0.695,
        runs=("average()",),
        task="sst2",
        note="report: first 200 validation sentences",
    ),
    Claim(
        "CoLA accuracy, SNR Winner (best of top 25/50/70%)",
        0.685,
        runs=tuple(f"snr_winner(snr_method=report_text, top={t})" for t in REPORT_TOPS),
        task="cola",
        note="report: accuracy on 200 examples; compare with the majority-class accuracy",
    ),
]

# --- paper 002, STAR ------------------------------------------------------------------------------

#: Table 2: normalized accuracy of 8 merged Flan-T5-large LoRA experts, per method
STAR_TABLE2 = {"star": 95.30, "ties": 93.83, "task_arithmetic": 91.67, "dare": 91.78}
STAR_TABLE2_SOURCE = "Table 2: 8 Flan-T5-large LoRA experts (STAR 95.30, TIES 93.83, TA 91.67, TA+DARE 91.78)"
STAR_TABLE1_SOURCE = (
    "Table 1: 4 Flan-T5-large LoRA experts at a fixed rank: +1.84 (r=2), +0.70 (r=4), +0.10 (r=8), +0.28 (r=12)"
)
#: the paper's own hyperparameters for Table 2's baselines where they are not our registered defaults:
#: TA at alpha = 0.125 and TA+DARE at alpha = 0.125 with p = 0.7 (keep 0.3), summed
STAR_SETTINGS = {"task_arithmetic": {"lam": 0.125}, "dare": {"lam": 0.125, "keep": 0.3, "then": "sum"}}
#: a Table 2 method at other hyperparameters than the paper's, by its short name (lib.pool.short_name)
STAR_NOTES = {
    "task_arithmetic": "ours only: lam=1 (a sum); the paper's TA is alpha=0.125 (its own row)",
    "dare": "ours only: drop 0.9 then sum at lam=1; the paper's TA+DARE is alpha=0.125, p=0.7 (its own row)",
}


def star_paper_setting(run: sweep.Run) -> bool:
    """Whether ``run`` is one of Table 2's methods at the paper's hyperparameters
    (:data:`STAR_SETTINGS`); only such a run's comparison counts as the paper's."""
    hp = run.hparams()
    return run.method in STAR_TABLE2 and all(hp.get(k) == v for k, v in STAR_SETTINGS.get(run.method, {}).items())


def star_claim(star: sweep.Run, run: sweep.Run, name: str, size: int, pools: tuple[str, ...]) -> Claim:
    """STAR beats ``run`` (legend ``name``) at ``size`` tasks: Table 2's difference where ``run``
    is the paper's method at the paper's setting, ours only otherwise (with the reason)."""
    in_paper = star_paper_setting(run)
    if in_paper:
        paper, source, note = round(STAR_TABLE2["star"] - STAR_TABLE2[run.method], 2), STAR_TABLE2_SOURCE, ""
    elif run.method in STAR_TABLE2:
        paper, source, note = (
            None,
            "ours only (not the paper's hyperparameters)",
            STAR_NOTES.get(pool.short_name(run), ""),
        )
    else:
        paper, source, note = None, "not compared in the paper", ""
    return Claim(
        f"STAR beats {name} ({size} tasks)",
        paper,
        source,
        note,
        better=star.label(),
        worse=run.label(),
        pools=pools,
        sizes=(size,),
        in_paper=in_paper,
    )


def star_effects(
    largest: Mapping[str, int], references: Sequence[str | tuple[str, Mapping]], no_rescale_etas: Iterable[float]
) -> list[Claim]:
    """Notebook 04's claims of STAR: it beats each reference (a method name or a ``(method,
    hyperparameters)`` pair) at each pool's largest size (Table 2 where the paper has the method
    at the paper's setting, :func:`star_claim`), beats the pre-trained body, and rescaling helps
    at each ``eta`` of the ablation (Table 1)."""
    star = pool.canonical_run("star")
    runs = [pool.reference_run(x) for x in references]
    effects = []
    for name, size in largest.items():
        effects += [star_claim(star, r, pool.short_name(r), size, (name,)) for r in runs]
        effects.append(
            Claim(
                "STAR beats the pre-trained body (all sizes)",
                None,
                "Figures 1 and 4: STAR stays above the pretrained model up to 20 models",
                better=star.label(),
                worse="base",
                pools=(name,),
            )
        )
    return effects + rescale_claims(no_rescale_etas)


def rescale_claims(etas: Iterable[float], pools: tuple[str, ...] | None = None) -> list[Claim]:
    """STAR's rescale ablation (Table 1): STAR with minus without rescaling helps at each of
    ``etas``, over every size of ``pools`` (None: all)."""
    return [
        Claim(
            f"rescaling helps at eta={e} (all sizes)",
            None,
            STAR_TABLE1_SOURCE,
            better=pool.canonical_run("star", eta=e).label(),
            worse=pool.canonical_run("star", eta=e, rescale=False).label(),
            pools=pools,
        )
        for e in etas
    ]


# --- paper 004, DRM -------------------------------------------------------------------------------

#: Table 1 (without validation): accuracy of merged fully fine-tuned models, from the setting
#: closest to each of our pools: DeBERTa-Base on six NLU tasks (text), ViT-B/32 on eight image tasks
DRM_TABLE1 = {
    "text": {"drm_h": 66.9, "drm_v": 54.1, "average": 57.6, "task_arithmetic": 55.4, "ties": 48.7, "dare": 47.3},
    "vision": {"drm_h": 77.5, "drm_v": 72.8, "average": 66.1, "task_arithmetic": 60.6, "ties": 72.5, "dare": 71.1},
}
#: Table 3: DRM-H with and without renormalisation, same settings
DRM_TABLE3 = {"text": (66.9, 58.1), "vision": (77.5, 73.5)}
DRM_SETTING = {"text": "DeBERTa-Base, 6 tasks", "vision": "ViT-B/32, 8 tasks"}
#: Table 8: joint vs individual pruning, (joint, individual), from the same settings as Table 1
DRM_TABLE8 = {
    "text": {"drm_h": (66.9, 66.0), "drm_v": (54.1, 53.2)},
    "vision": {"drm_h": (77.5, 77.4), "drm_v": (72.8, 72.8)},
}
#: where notebook 05's setting is not the paper's, by short name (lib.pool.short_name); the STAR
#: paper's settings (STAR_SETTINGS) are not rows of DRM's tables
DRM_NOTES = {
    "task_arithmetic": "ours: lam=1 (a sum); the paper's TA without validation: its default coefficient",
    "task_arithmetic(lam=0.125)": "ours only: the STAR paper's alpha=0.125, not a row of this paper",
    "dare": "ours: drop 0.9 then sum (TA+DARE); the paper's is DARE-TIES",
    "dare(then=ties)": "DARE-TIES: ours drops 90% (p=0.9); the paper's default rate is not ours",
    "dare(keep=0.3, lam=0.125)": "ours only: the STAR paper's TA+DARE (alpha=0.125, p=0.7), not a row of this paper",
    "star": "STAR is not in the paper",
}


def drm_table_row(run: sweep.Run, table: Mapping[str, float]) -> bool:
    """Whether ``run`` stands for one of ``table``'s methods: its method is there and it is not
    at one of the STAR paper's settings (:data:`STAR_SETTINGS`, rows of that paper only)."""
    return run.method in table and not (run.method in STAR_SETTINGS and star_paper_setting(run))


def drm_effects(
    largest: Mapping[str, int],
    kinds: Mapping[str, str],
    compare: Sequence[sweep.Run],
    names: Mapping[str, str],
    drm: Mapping[str, sweep.Run],
    no_renorm: Mapping[str, sweep.Run],
    per_task: Mapping[str, sweep.Run] | None = None,
) -> list[Claim]:
    """Notebook 05's claims of DRM per pool (``kinds``: pool -> text/vision): DRM-H beats each
    run of ``compare[1:]`` at the pool's largest size (Table 1, where the run stands for one of its
    methods: :func:`drm_table_row`), beats the pre-trained body, renormalisation helps DRM-H (Table
    3) and DRM-V (ours only), and with ``per_task`` (DRM-H and DRM-V pruned task by task) joint
    pruning helps both (Table 8)."""
    effects = []
    for name, size in largest.items():
        kind = kinds[name]
        table = DRM_TABLE1[kind]
        for run in compare[1:]:
            paper = round(table["drm_h"] - table[run.method], 2) if drm_table_row(run, table) else None
            effects.append(
                Claim(
                    f"DRM-H beats {names[run.label()]} ({size} tasks)",
                    paper,
                    f"Table 1 ({DRM_SETTING[kind]})" if paper is not None else "not compared in the paper",
                    DRM_NOTES.get(pool.short_name(run), ""),
                    better=drm["h"].label(),
                    worse=run.label(),
                    pools=(name,),
                    sizes=(size,),
                    in_paper=paper is not None,
                )
            )
        effects.append(
            Claim(
                "DRM-H beats the pre-trained body (all sizes)",
                None,
                "Figure 2: every merge stays above the pretrained model",
                better=drm["h"].label(),
                worse="base",
                pools=(name,),
            )
        )
        with_renorm, without = DRM_TABLE3[kind]
        effects.append(
            Claim(
                "renormalisation helps DRM-H (all sizes)",
                round(with_renorm - without, 2),
                f"Table 3 ({DRM_SETTING[kind]})",
                better=drm["h"].label(),
                worse=no_renorm["h"].label(),
                pools=(name,),
            )
        )
        effects.append(
            Claim(
                "renormalisation helps DRM-V (all sizes)",
                None,
                "not in the paper (section 3 applies it to both variants)",
                better=drm["v"].label(),
                worse=no_renorm["v"].label(),
                pools=(name,),
                in_paper=False,
            )
        )
        for v in per_task or {}:
            joint, individual = DRM_TABLE8[kind][f"drm_{v}"]
            # where the paper measured no difference (DRM-V on ViT: 72.8 both ways) there is no
            # direction to agree with: the claim is ours only, and its source says why
            tied = joint == individual
            effects.append(
                Claim(
                    f"joint pruning helps DRM-{v.upper()} (all sizes)",
                    None if tied else round(joint - individual, 2),
                    f"Table 8 ({DRM_SETTING[kind]})"
                    + (f": {joint} both ways, no difference to agree with" if tied else ""),
                    better=drm[v].label(),
                    worse=per_task[v].label(),
                    pools=(name,),
                    in_paper=not tied,
                )
            )
    return effects


# --- notebook 07: both papers' claims on LoRA experts ----------------------------------------------

#: DRM's Table 2 (without validation): accuracy of five merged LoRA-adapted (r=16) Llama-3.1-8B experts
DRM_LORA_TABLE2 = {"average": 61.5, "task_arithmetic": 45.9, "ties": 67.1, "dare": 67.6, "drm_h": 69.5, "drm_v": 69.1}
DRM_LORA_SOURCE = "Table 2 (Llama-3.1-8B, LoRA r=16, 5 GLUE tasks)"
#: DRM's Table 3, Llama-3.1-8B column: DRM-H with and without renormalisation
DRM_LORA_TABLE3 = (69.5, 62.7)
#: where notebook 07's LoRA setting is not DRM's: notebook 05's notes, but the LoRA table's TA is
#: scored without the full fine-tunes' "without validation" qualifier
DRM_LORA_NOTES = {**DRM_NOTES, "task_arithmetic": "ours: lam=1 (a sum); the paper's TA: its default coefficient"}


def lora_effects(
    size: int,
    compare: Sequence[sweep.Run],
    names: Mapping[str, str],
    no_rescale_etas: Iterable[float],
    *,
    pool_name: str = "text-lora",
) -> dict[str, list[Claim]]:
    """Notebook 07's claims on the LoRA experts, per paper (``"STAR"``: paper 002, ``"DRM"``:
    paper 004). ``compare[0]`` is STAR; the rest are the references, DRM-H and DRM-V among them
    (with and without renormalisation). STAR's: it beats each reference at ``size`` tasks (the
    paper's Table 2 where it has the method at the paper's setting, :func:`star_claim`: TA and
    TA+DARE at alpha = 0.125 are the paper's, lam = 1 is ours only), beats the pre-trained body, and
    rescaling helps at each ``no_rescale_etas`` (Table 1). DRM's, from its own LoRA setting (Table
    2, Llama-3.1-8B): DRM-H beats each method the table has, DRM-V included (the STAR paper's
    settings are ours only), and renormalisation helps DRM-H (Table 3) and DRM-V (ours only)."""
    star, refs = compare[0], list(compare[1:])
    pools, sizes = (pool_name,), (size,)

    def find(method: str, **hp) -> sweep.Run:
        for r in refs:
            if r.method == method and all(r.hparams().get(k) == v for k, v in hp.items()):
                return r
        raise ValueError(f"notebook 07's references have no {method} with {hp}: {sorted(r.label() for r in refs)}")

    out = {"STAR": [], "DRM": []}
    for r in refs:
        if r.method in ("drm_h", "drm_v") and not r.hparams().get("renorm", True):
            continue  # the ablation rows, below
        out["STAR"].append(star_claim(star, r, names[r.label()], size, pools))
    out["STAR"].append(
        Claim(
            "STAR beats the pre-trained body (all sizes)",
            None,
            "Figures 1 and 4: STAR stays above the pretrained model up to 20 models",
            better=star.label(),
            worse="base",
            pools=pools,
        )
    )
    out["STAR"] += rescale_claims(no_rescale_etas, pools)
    drm_h, drm_v = find("drm_h", renorm=True), find("drm_v", renorm=True)
    for r in [star] + refs:
        if r.method == "drm_h" or (r.method == "drm_v" and not r.hparams().get("renorm", True)):
            continue
        in_paper = drm_table_row(r, DRM_LORA_TABLE2)
        out["DRM"].append(
            Claim(
                f"DRM-H beats {names[r.label()]} ({size} tasks)",
                round(DRM_LORA_TABLE2["drm_h"] - DRM_LORA_TABLE2[r.method], 2) if in_paper else None,
                DRM_LORA_SOURCE if in_paper else "not compared in the paper",
                DRM_LORA_NOTES.get(pool.short_name(r), ""),
                better=drm_h.label(),
                worse=r.label(),
                pools=pools,
                sizes=sizes,
                in_paper=in_paper,
            )
        )
    with_renorm, without = DRM_LORA_TABLE3
    out["DRM"] += [
        Claim(
            "DRM-H beats the pre-trained body (all sizes)",
            None,
            "Figure 2: every merge stays above the pretrained model",
            better=drm_h.label(),
            worse="base",
            pools=pools,
        ),
        Claim(
            "renormalisation helps DRM-H (all sizes)",
            round(with_renorm - without, 2),
            "Table 3 (Llama-3.1-8B, LoRA)",
            better=drm_h.label(),
            worse=find("drm_h", renorm=False).label(),
            pools=pools,
        ),
        Claim(
            "renormalisation helps DRM-V (all sizes)",
            None,
            "not in the paper (section 3 applies it to both variants)",
            better=drm_v.label(),
            worse=find("drm_v", renorm=False).label(),
            pools=pools,
            in_paper=False,
        ),
    ]
    return out

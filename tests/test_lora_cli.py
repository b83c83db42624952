"""``python -m lib merge`` with PEFT LoRA adapters as experts: the streamed merge equals the
in-memory one (:func:`lib.lora.merge_lowrank` on the factored path, :func:`lib.merge.merge` on the
densified experts otherwise), ``--out-format adapter`` writes an adapter that ``PeftModel`` loads
with the same logits as the full-model output, and bad adapters end with one line naming the
first mismatch."""

from __future__ import annotations

import pytest
import torch

from lib.__main__ import main
from lib.checkpoint import Checkpoint
from lib.lora import FACTORED, densify, merge_lowrank, read_adapter
from lib.merge import merge
from lib.merge.stream import MERGE_RECORD, merge_checkpoints

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["query", "value"]


def tiny_classifier(seed: int = 0, hidden: int = 32):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=60,
        max_position_embeddings=32,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config).eval()


def save_adapter_of(base_model, folder, seed: int, *, rank: int = 4, targets=TARGETS, head: bool = True):
    torch.manual_seed(seed)
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=targets,
        init_lora_weights=False,
        modules_to_save=["classifier"] if head else None,
    )
    model = peft.get_peft_model(base_model, config)
    if head:  # a trained head: not the base's copy
        with torch.no_grad():
            for p in model.base_model.model.classifier.modules_to_save.default.parameters():
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """A tiny BERT classifier base and three adapters (ranks 4, 4, 8 on query/value, each with its
    own trained classifier head saved whole)."""
    root = tmp_path_factory.mktemp("lora_cli")
    tiny_classifier().save_pretrained(root / "base")
    adapters = []
    for i, rank in enumerate((4, 4, 8)):
        save_adapter_of(tiny_classifier(), root / f"adapter{i}", 10 + i, rank=rank)
        adapters.append(root / f"adapter{i}")
    return {"root": root, "base": root / "base", "adapters": adapters}


def state(folder) -> dict:
    ckpt = Checkpoint(folder)
    return {k: ckpt.read(k) for k in ckpt.keys()}


def assert_states_close(got: dict, expected: dict, tol: float = 1e-5):
    assert got.keys() == expected.keys()
    for k, t in expected.items():
        assert got[k].dtype == t.dtype, k
        assert torch.allclose(got[k].double(), t.double(), atol=tol, rtol=tol), k


def logits(model, seed: int = 3) -> torch.Tensor:
    ids = torch.randint(0, 60, (4, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method", sorted(FACTORED))
def test_adapter_merge_on_the_factored_path_equals_merge_lowrank(method, lora, tmp_path):
    base = state(lora["base"])
    adapters = [read_adapter(p, base) for p in lora["adapters"]]
    expected = merge_lowrank(method, base, adapters).state_dict(base)
    # a tiny block size cuts the factored matrices and the copied ones into rows
    out = merge_checkpoints(
        method, lora["base"], lora["adapters"], tmp_path / "out", block_bytes=1000, progress=False
    ).out
    assert_states_close(state(out), expected)
    assert (out / MERGE_RECORD).is_file() and (out / "config.json").is_file()


@pytest.mark.parametrize("method", ["ties", "dare", "snr_weighted"])
def test_adapter_merge_by_other_methods_equals_merge_of_densified_experts(method, lora, tmp_path):
    from lib.merge import METHODS

    if method not in METHODS:
        pytest.skip(f"{method} is not registered")
    base = state(lora["base"])
    expected = merge(method, base, [densify(base, read_adapter(p, base)) for p in lora["adapters"]])
    out = merge_checkpoints(method, lora["base"], lora["adapters"], tmp_path / "out", progress=False).out
    assert_states_close(state(out), expected)


def test_adapters_and_full_models_merge_together(lora, tmp_path):
    base = state(lora["base"])
    dense = densify(base, read_adapter(lora["adapters"][0], base))
    full = tmp_path / "full"
    model = tiny_classifier()
    model.load_state_dict(dense)
    model.save_pretrained(full)
    expected = merge("task_arithmetic", base, [dense, densify(base, read_adapter(lora["adapters"][1], base))])
    out = merge_checkpoints(
        "task_arithmetic", lora["base"], [full, lora["adapters"][1]], tmp_path / "out", progress=False
    ).out
    assert_states_close(state(out), expected)


@pytest.mark.parametrize(
    "method, hp",
    [("star", {"eta": 40}), ("task_arithmetic", {"lam": 0.5}), ("drm_h", {"density": 0.3}), ("average", {})],
)
def test_adapter_output_loads_in_peft_with_the_full_models_logits(method, hp, lora, tmp_path, capsys):
    sets = [f"--set={k}={v}" for k, v in hp.items()]
    common = ["merge", "--method", method, "--base", lora["base"], "--experts", *lora["adapters"], "--quiet", *sets]
    assert main([str(a) for a in [*common, "--out", tmp_path / "model"]]) == 0
    assert main([str(a) for a in [*common, "--out", tmp_path / "adapter", "--out-format", "adapter"]]) == 0
    assert "a PEFT adapter of the base" in capsys.readouterr().out
    full = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "model").eval()
    adapted = peft.PeftModel.from_pretrained(tiny_classifier(), tmp_path / "adapter").eval()
    expected = logits(full)
    assert not torch.allclose(expected, logits(tiny_classifier()), atol=1e-3)  # the merge changed the model
    assert torch.allclose(logits(adapted), expected, atol=1e-5, rtol=1e-5)
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    assert (tmp_path / "adapter" / MERGE_RECORD).is_file()
    # the record repeats the merge, output format included
    assert (
        main(
            [
                str(a)
                for a in [
                    "merge",
                    "--config",
                    tmp_path / "adapter" / MERGE_RECORD,
                    "--out",
                    tmp_path / "again",
                    "--quiet",
                ]
            ]
        )
        == 0
    )
    assert (tmp_path / "again" / "adapter_config.json").is_file()


# ---------------------------------------------------------------- bad input: one line, exit 1


def error_of(capsys, *argv) -> str:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "Traceback" not in err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1].startswith("error: "), err
    return lines[-1]


def test_an_adapter_of_another_base_names_the_first_mismatch(lora, tmp_path, capsys):
    save_adapter_of(tiny_classifier(hidden=16), tmp_path / "other", 0, head=False)
    line = error_of(
        capsys,
        "merge",
        "--method",
        "star",
        "--base",
        lora["base"],
        "--experts",
        lora["adapters"][0],
        tmp_path / "other",
        "--out",
        tmp_path / "out",
    )
    assert "expert 1" in line and "bert.encoder.layer.0.attention.self.query.weight" in line and "shape" in line
    assert not (tmp_path / "out").exists()


def test_adapters_need_a_base_and_a_base_is_no_adapter(lora, tmp_path, capsys):
    line = error_of(capsys, "merge", "--method", "average", "--experts", *lora["adapters"], "--out", tmp_path / "out")
    assert "expert 0" in line and "PEFT adapter" in line and "--base" in line
    line = error_of(
        capsys,
        "merge",
        "--method",
        "star",
        "--base",
        lora["adapters"][0],
        "--experts",
        lora["adapters"][1],
        "--out",
        tmp_path / "out",
    )
    assert "--base" in line and "is a PEFT adapter" in line
    assert not (tmp_path / "out").exists()


def test_adapter_output_only_where_the_merge_stays_low_rank(lora, tmp_path, capsys):
    line = error_of(
        capsys,
        "merge",
        "--method",
        "ties",
        "--base",
        lora["base"],
        "--experts",
        *lora["adapters"],
        "--out",
        tmp_path / "out",
        "--out-format",
        "adapter",
    )
    assert "'ties'" in line and "low-rank" in line and "--out-format model" in line
    line = error_of(
        capsys,
        "merge",
        "--method",
        "star",
        "--base",
        lora["base"],
        "--experts",
        lora["adapters"][0],
        lora["base"],
        "--out",
        tmp_path / "out",
        "--out-format",
        "adapter",
    )
    assert "expert 1" in line and "full model" in line
    line = error_of(
        capsys,
        "merge",
        "--method",
        "star",
        "--base",
        lora["base"],
        "--experts",
        *lora["adapters"],
        "--exclude",
        "query|value",
        "--out",
        tmp_path / "out",
        "--out-format",
        "adapter",
    )
    assert "no low-rank delta" in line
    assert not (tmp_path / "out").exists()


def test_a_broken_adapter_is_one_line(lora, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    line = error_of(
        capsys, "merge", "--method", "star", "--base", lora["base"], "--experts", broken, "--out", tmp_path / "out"
    )
    assert "expert 0" in line and "adapter_model.safetensors" in line

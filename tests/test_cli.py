"""``python -m lib scan|merge`` on tiny checkpoints made here: the streamed merge equals
``lib.merge.merge`` for every registered method, the output is a model ``transformers`` loads,
nothing is lost on failure, and bad input gives one line and a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from lib import spectral
from lib.__main__ import main
from lib.checkpoint import Checkpoint, ShardedWriter, atomic_output_dir
from lib.cli import load_config, parse_value
from lib.merge import METHODS, is_elementwise, merge, resolve_hparams
from lib.merge.stream import (
    MERGE_RECORD,
    merge_checkpoints,
    row_blocks,
)

transformers = pytest.importorskip("transformers")

N_EXPERTS = 2


def tiny_bert(seed: int):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=60,
        max_position_embeddings=32,
    )
    return transformers.BertModel(config)


def fine_tuned(base: dict, seed: int) -> dict:
    """The base plus a small dense update and, in every matrix, a rank-one spike: a task vector
    with some signal above the Marchenko-Pastur bulk, so the SNR methods have something to rank."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, w in base.items():
        delta = 0.01 * torch.randn(w.shape, generator=g)
        if w.ndim == 2:
            u, v = torch.randn(w.shape[0], 1, generator=g), torch.randn(1, w.shape[1], generator=g)
            delta += (seed % 3 + 1) * 0.05 * u @ v / (w.shape[0] * w.shape[1]) ** 0.25
        out[k] = w + delta
    return out


def state_dict(model_dir: Path) -> dict:
    ckpt = Checkpoint(model_dir)
    return {k: ckpt.read(k) for k in ckpt.keys()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("models"))


def make_models(root: Path) -> dict:
    """A base folder (single file + config + tokenizer), a sharded expert folder and an expert
    saved as one bare .safetensors file, under ``root``."""
    base_model = tiny_bert(0)
    base_model.save_pretrained(root / "base")
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(root / "base")
    base = {k: v.contiguous() for k, v in base_model.state_dict().items()}
    experts = [fine_tuned(base, seed) for seed in range(1, N_EXPERTS + 1)]
    sharded = tiny_bert(0)
    sharded.load_state_dict(experts[0])
    sharded.save_pretrained(root / "expert_a", max_shard_size="20KB")
    save_file(experts[1], root / "expert_b.safetensors")
    assert len(list((root / "expert_a").glob("model-*.safetensors"))) > 1, "expert_a should be sharded"
    return {"root": root, "base": root / "base", "experts": [root / "expert_a", root / "expert_b.safetensors"]}


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def error_line(err: str) -> str:
    """The command's error: the last line on stderr, after any progress bar."""
    assert "Traceback" not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err
    return lines[-1]


# ---------------------------------------------------------------- the merge itself


@pytest.mark.parametrize("method", sorted(METHODS))
def test_streamed_merge_equals_in_memory_merge(method, models, tmp_path):
    base = state_dict(models["base"])
    experts = [state_dict(p) for p in models["experts"]]
    expected = merge(method, base, experts)
    out = merge_checkpoints(
        method, models["base"], models["experts"], tmp_path / "out", max_shard_bytes=30_000, progress=False
    ).out
    got = state_dict(out)
    assert list(got) == list(expected)
    assert len(list(out.glob("model-*.safetensors"))) > 1
    for k in expected:
        assert got[k].dtype == expected[k].dtype and got[k].shape == expected[k].shape, k
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-7, msg=f"{method}: {k}")


ELEMENTWISE = sorted(n for n, m in METHODS.items() if is_elementwise(m, resolve_hparams(m, {})))
#: (method, hyperparameters, include/exclude): runs whose selected tensors must be merged whole
#: (TIES' per-tensor top-k, DARE's per-tensor mask) while the excluded embeddings are copied in blocks
WHOLE_TENSOR_RUNS = [("ties", {"scope": "tensor"}, {"exclude": "embeddings"}), ("dare", {}, {"exclude": "embeddings"})]


def test_elementwise_methods_are_the_expected_ones():
    """The registry's claim that the blocked-merge test below relies on; a method added as
    elementwise is covered by that test automatically."""
    assert {"average", "task_arithmetic", "ties", "snr_base_reset", "snr_weighted"} <= set(ELEMENTWISE)
    assert not {"dare", "star", "drm_h", "drm_v"} & set(ELEMENTWISE)


@pytest.mark.parametrize("method, hp, select", [(m, {}, {}) for m in ELEMENTWISE] + WHOLE_TENSOR_RUNS)
def test_merge_in_tiny_row_blocks_is_bit_identical(method, hp, select, models, tmp_path, monkeypatch):
    """With a block size of a few rows, the elementwise methods merge every large tensor (and
    every method copies every unselected one) in blocks of rows, read and written in place;
    the result is exactly the in-memory merge. Selected tensors of the other runs stay whole."""
    blocks: dict[str, list[int]] = {}
    write = ShardedWriter.write

    def record(self, key, t, *, row=0):
        blocks.setdefault(key, []).append(row)
        write(self, key, t, row=row)

    monkeypatch.setattr(ShardedWriter, "write", record)
    base = state_dict(models["base"])
    experts = [state_dict(p) for p in models["experts"]]
    expected = merge(method, base, experts, **select, **hp)
    out = merge_checkpoints(
        method,
        models["base"],
        models["experts"],
        tmp_path / "out",
        parameters=hp,
        block_bytes=600,
        max_shard_bytes=30_000,
        progress=False,
        **select,
    ).out
    got = state_dict(out)
    for k in expected:
        assert torch.equal(got[k], expected[k]), f"{method}: {k}"
    embeddings = "embeddings.word_embeddings.weight"  # 60 x 32 float32: 128-byte rows, 4 to a block
    assert blocks[embeddings] == list(range(0, 60, 4))
    assert blocks["encoder.layer.0.attention.self.query.bias"] == [0], "a tensor that fits is written whole"
    if method not in ELEMENTWISE:
        assert blocks["encoder.layer.0.intermediate.dense.weight"] == [0], "a selected tensor was cut"


def test_row_blocks_cover_the_rows_within_the_budget():
    assert row_blocks((10, 3), 4, 120) == [None]  # fits: the whole tensor
    assert row_blocks((10, 3), 4, 119) == [slice(0, 9), slice(9, 10)]
    assert row_blocks((10, 3), 4, 5) == [slice(i, i + 1) for i in range(10)]  # never less than one row
    assert row_blocks((), 8, 1) == [None] and row_blocks((0, 5), 4, 1) == [None]
    with pytest.raises(ValueError, match="block size must be positive"):
        row_blocks((10, 3), 4, 0)


def test_reader_and_writer_work_on_blocks_of_rows(models, tmp_path):
    ckpt = Checkpoint(models["experts"][1])
    key = "encoder.layer.0.intermediate.dense.weight"
    whole = ckpt.read(key)
    assert torch.equal(ckpt.read(key, slice(5, 17)), whole[5:17])
    assert ckpt.read(key, slice(60, 99)).shape == (4, 32) and ckpt.read(key, slice(3, 3)).shape == (0, 32)
    with pytest.raises(ValueError, match="contiguous"):
        ckpt.read(key, slice(0, 10, 2))

    writer = ShardedWriter(tmp_path, {key: (whole.dtype, tuple(whole.shape)), "scalar": (torch.int64, ())}, 10**6)
    writer.write(key, whole[:20])
    with pytest.raises(ValueError, match="in order; the next starts at row 20, got 30"):
        writer.write(key, whole[30:], row=30)
    with pytest.raises(ValueError, match="or a block of its rows"):
        writer.write(key, whole[20:].T, row=20)
    writer.write("scalar", torch.tensor(7))
    with pytest.raises(RuntimeError, match="written in part.*intermediate"):
        writer.close()
    writer.write(key, whole[20:], row=20)
    writer.close()
    written = Checkpoint(tmp_path)
    assert torch.equal(written.read(key), whole) and written.read("scalar").item() == 7


def test_output_is_a_loadable_model(models, tmp_path, capsys):
    out = tmp_path / "merged"
    rc, stdout, _ = run_cli(
        capsys,
        "merge",
        "--method",
        "ties",
        "--base",
        models["base"],
        "--experts",
        *models["experts"],
        "--out",
        out,
        "--set",
        "density=0.5",
        "--max-shard-size",
        "20KB",
        "--quiet",
    )
    assert rc == 0 and "merged 2 expert(s) with ties" in stdout
    for name in (
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors.index.json",
        "merge_config.yaml",
    ):
        assert (out / name).is_file(), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("model-*.safetensors")}

    loaded = transformers.AutoModel.from_pretrained(out).state_dict()
    expected = merge("ties", state_dict(models["base"]), [state_dict(p) for p in models["experts"]], density=0.5)
    assert set(expected) <= set(loaded)
    for k, v in expected.items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0, msg=k)
    assert transformers.AutoTokenizer.from_pretrained(out)("a b")["input_ids"][0] == 2  # [CLS]


def test_half_precision_and_integer_tensors_keep_their_dtype(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {
        "w": torch.randn(6, 4, generator=g).to(torch.bfloat16),
        "h": torch.randn(5, generator=g).half(),
        "steps": torch.tensor(7),
        "flags": torch.tensor([True, False]),
    }
    expert = {**base, "w": base["w"] + 0.1, "h": base["h"] - 0.1, "steps": torch.tensor(9)}
    save_file(base, tmp_path / "base.safetensors")
    save_file(expert, tmp_path / "expert.safetensors")
    out = merge_checkpoints(
        "task_arithmetic",
        tmp_path / "base.safetensors",
        [tmp_path / "expert.safetensors"],
        tmp_path / "out",
        progress=False,
    ).out
    got = state_dict(out)
    expected = merge("task_arithmetic", base, [expert])
    for k in base:
        assert got[k].dtype == base[k].dtype
        assert torch.equal(got[k], expected[k]), k
    assert got["steps"].item() == 7  # integer buffers come from the base, never averaged


def test_config_file_gives_the_same_model_as_flags(models, tmp_path, capsys):
    experts = models["experts"]
    flags = [
        "merge",
        "--method",
        "average",
        "--base",
        models["base"],
        "--experts",
        *experts,
        "--set",
        "weights=[0.7, 0.3]",
        "--out",
        tmp_path / "from_flags",
        "--quiet",
    ]
    config = {
        "merge_method": "average",
        "base_model": str(models["base"]),
        "models": [
            {"model": str(experts[0]), "parameters": {"weight": 0.7}},
            {"model": str(experts[1]), "parameters": {"weight": 0.3}},
        ],
    }
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    assert run_cli(capsys, *flags)[0] == 0
    assert (
        run_cli(capsys, "merge", "--config", tmp_path / "merge.yaml", "--out", tmp_path / "from_config", "--quiet")[0]
        == 0
    )
    a, b = state_dict(tmp_path / "from_flags"), state_dict(tmp_path / "from_config")
    assert all(torch.equal(a[k], b[k]) for k in a)
    even = merge("average", None, [state_dict(p) for p in experts])
    assert not all(torch.equal(a[k], even[k]) for k in a), "the weights were ignored"
    # the record written with the model is itself a config that repeats the merge
    record = tmp_path / "from_flags" / "merge_config.yaml"
    assert run_cli(capsys, "merge", "--config", record, "--out", tmp_path / "again", "--quiet")[0] == 0
    again = state_dict(tmp_path / "again")
    assert all(torch.equal(a[k], again[k]) for k in a)


def test_config_file_is_read_in_mergekit_shape(tmp_path):
    (tmp_path / "m.yaml").write_text("merge_method: ties\nbase_model: b\nmodels: [x, y]\nparameters: {density: 0.3}\n")
    spec = load_config(tmp_path / "m.yaml")
    assert spec == {"method": "ties", "base": "b", "experts": ["x", "y"], "parameters": {"density": 0.3}}


@pytest.mark.parametrize(
    "text, value",
    [
        ("0.3", 0.3),
        ("3", 3),
        ("1e-3", 1e-3),
        ("true", True),
        ("False", False),
        ("None", None),
        ("null", None),
        ("[0.7, 0.3]", [0.7, 0.3]),
        ("0.5,0.5", [0.5, 0.5]),
        ("[]", []),
        ("model", "model"),
        ("[a, 2]", ["a", 2]),
    ],
)
def test_set_values_are_parsed(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


# ---------------------------------------------------------------- nothing lost


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_existing_output_is_kept_without_force(models, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    argv = ["merge", "--method", "average", "--experts", *models["experts"], "--out", out, "--quiet"]
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 1 and "--force" in error_line(err)
    assert (out / "precious.txt").read_text() == "keep me"
    # --force replaces only a previous merge output; this folder is not one
    rc, _, err = run_cli(capsys, *argv, "--force")
    assert rc == 1 and "--force-any" in error_line(err) and "not a merge output" in error_line(err)
    assert (out / "precious.txt").read_text() == "keep me"
    assert run_cli(capsys, *argv, "--force-any")[0] == 0
    assert not (out / "precious.txt").exists() and (out / "model.safetensors.index.json").exists()
    # now it is a merge output, which --force alone replaces
    (out / "stale.txt").write_text("from an earlier merge")
    assert run_cli(capsys, *argv, "--force")[0] == 0
    assert not (out / "stale.txt").exists() and (out / MERGE_RECORD).is_file()
    assert leftovers(tmp_path) == []


def test_interrupted_merge_leaves_no_output(models, tmp_path, capsys, monkeypatch):
    writes = []

    def interrupt_after_three(self, key, t, **block):
        writes.append(key)
        if len(writes) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(ShardedWriter, "write", interrupt_after_three)
    rc, _, err = run_cli(
        capsys, "merge", "--method", "average", "--experts", *models["experts"], "--out", tmp_path / "out", "--quiet"
    )
    assert rc == 130 and "interrupted" in error_line(err)
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_the_previous_output_with_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(out, force=True) as tmp:
            (tmp / "half.safetensors").write_bytes(b"x")
            raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "old.txt").read_text() == "old"


# ---------------------------------------------------------------- bad input: one line, non-zero exit


def corrupt(models, tmp_path, how: str) -> Path:
    """A copy of expert_b broken in one way."""
    data = models["experts"][1].read_bytes()
    path = tmp_path / f"{how}.safetensors"
    if how == "truncated":
        path.write_bytes(data[: len(data) - 100])
    elif how == "garbage":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + data[24:])
    elif how == "tiny":
        path.write_bytes(b"abc")
    elif how == "nan":
        sd = load_file(models["experts"][1])
        sd["encoder.layer.1.output.dense.weight"][3, 5] = float("nan")
        save_file(sd, path)
    elif how == "reshaped":
        sd = load_file(models["experts"][1])
        sd["encoder.layer.0.intermediate.dense.weight"] = torch.zeros(48, 32)
        save_file(sd, path)
    elif how == "missing_key":
        sd = load_file(models["experts"][1])
        del sd["pooler.dense.bias"]
        save_file(sd, path)
    return path


@pytest.mark.parametrize(
    "how, expected",
    [
        ("absent", ["does not exist"]),
        ("tiny", ["not a safetensors file"]),
        ("truncated", ["truncated", "re-download"]),
        ("garbage", ["not a valid safetensors file"]),
        ("nan", ["NaN/Inf", "'encoder.layer.1.output.dense.weight'", "expert 1"]),
        ("reshaped", ["architectures differ", "'encoder.layer.0.intermediate.dense.weight'", "[48, 32]", "[64, 32]"]),
        ("missing_key", ["architectures differ", "'pooler.dense.bias'"]),
    ],
)
def test_bad_checkpoint_gives_one_line_and_no_output(how, expected, models, tmp_path, capsys):
    bad = tmp_path / "absent.safetensors" if how == "absent" else corrupt(models, tmp_path, how)
    out = tmp_path / "out"
    rc, _, err = run_cli(
        capsys,
        "merge",
        "--method",
        "task_arithmetic",
        "--base",
        models["base"],
        "--experts",
        models["experts"][0],
        bad,
        "--out",
        out,
        "--quiet",
    )
    line = error_line(err)
    assert rc == 1
    for fragment in expected:
        assert fragment in line, line
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--method", "nonsense"], ["unknown merge method 'nonsense'", "task_arithmetic", "ties"]),
        (["--method", "ties", "--set", "densty=0.3"], ["unknown hyperparameter(s) ['densty']", "density=0.2"]),
        (["--method", "ties", "--set", "density=3"], ["density"]),
        (["--method", "ties", "--set", "oops"], ["key=value"]),
        (["--method", "ties", "--max-shard-size", "lots"], ["cannot read size"]),
        ([], ["missing --method"]),
    ],
)
def test_bad_method_or_hyperparameter_lists_valid_ones(extra, expected, models, tmp_path, capsys):
    rc, _, err = run_cli(
        capsys,
        "merge",
        "--base",
        models["base"],
        "--experts",
        *models["experts"],
        "--out",
        tmp_path / "out",
        "--quiet",
        *extra,
    )
    line = error_line(err)
    assert rc == 1
    for fragment in expected:
        assert fragment in line, line
    assert not (tmp_path / "out").exists()


def test_command_line_exits_non_zero_without_traceback(models, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lib",
            "merge",
            "--method",
            "nonsense",
            "--experts",
            str(models["experts"][0]),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "unknown merge method" in proc.stderr


def test_command_line_process_writes_everything_before_its_fast_exit(models, tmp_path):
    """``python -m lib merge`` and ``scan`` end with os._exit (no interpreter teardown): the
    model folder, the CSV, the plot and the final message must all be complete by then."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lib",
            "merge",
            "--method",
            "ties",
            "--base",
            str(models["base"]),
            "--experts",
            *map(str, models["experts"]),
            "--out",
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"-> {out}" in proc.stdout
    expected = merge("ties", state_dict(models["base"]), [state_dict(p) for p in models["experts"]])
    got = state_dict(out)
    assert list(got) == list(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert (out / MERGE_RECORD).read_text().startswith("merge_method: ties")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lib",
            "scan",
            str(out),
            "--out",
            str(tmp_path / "scan.csv"),
            "--plot",
            str(tmp_path / "scan.png"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(tmp_path / "scan.csv")
    assert len(table) > 0 and (tmp_path / "scan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- reading and scanning


def test_lazy_reader_matches_safetensors(models):
    sharded = Checkpoint(models["experts"][0])
    reference = {}
    for shard in models["experts"][0].glob("model-*.safetensors"):
        reference.update(load_file(shard))
    assert set(sharded.keys()) == set(reference)
    assert all(torch.equal(sharded.read(k), reference[k]) for k in reference)
    assert sharded.nbytes == sum(v.numel() * v.element_size() for v in reference.values())


def test_scan_writes_one_row_per_matrix_and_a_plot(models, tmp_path, capsys):
    out, plot = tmp_path / "scan.csv", tmp_path / "scan.png"
    rc, stdout, _ = run_cli(capsys, "scan", models["experts"][0], "--out", out, "--plot", plot, "--quiet")
    assert rc == 0 and "scanned" in stdout
    table = pd.read_csv(out)
    expected = spectral.scan(state_dict(models["experts"][0]))
    assert list(table.columns) == list(expected.columns)
    assert sorted(table["name"]) == sorted(expected["name"])
    merged = table.merge(expected, on="name", suffixes=("", "_ref"))
    for col in ("rows", "cols", "n_signal", "sigma2", "snr"):
        torch.testing.assert_close(
            torch.tensor(merged[col].to_numpy(float)),
            torch.tensor(merged[f"{col}_ref"].to_numpy(float)),
            rtol=1e-6,
            atol=1e-9,
            msg=col,
        )
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc, _, err = run_cli(capsys, "scan", models["experts"][0], "--out", out, "--quiet")
    assert rc == 1 and "--force" in error_line(err)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["missing_folder"], ["does not exist"]),
        (["EXPERT", "--snr-method", "nonsense"], ["nonsense", "mp"]),
        (["EXPERT", "--include", "no_such_key"], ["no floating-point matrix"]),
    ],
)
def test_bad_scan_input_gives_one_line(argv, expected, models, tmp_path, capsys):
    argv = [
        str(models["experts"][0]) if a == "EXPERT" else str(tmp_path / a) if a == "missing_folder" else a for a in argv
    ]
    rc, _, err = run_cli(capsys, "scan", *argv, "--out", tmp_path / "scan.csv", "--quiet")
    line = error_line(err)
    assert rc == 1 and all(f in line for f in expected), line
    assert not (tmp_path / "scan.csv").exists()


def test_savefig_writes_at_a_path_in_the_format_of_its_suffix(tmp_path):
    """What ``scan --plot`` relies on: ``lib.plotting.savefig(fig, path=...)``, one file, atomically."""
    import matplotlib.pyplot as plt

    from lib.plotting import savefig

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    assert savefig(fig, path=tmp_path / "plot.svg", close=False) == [tmp_path / "plot.svg"]
    assert b"<svg" in (tmp_path / "plot.svg").read_bytes()[:500]
    with pytest.raises(ValueError, match="a figure name .* or a path, not both"):
        savefig(fig, "name", path=tmp_path / "plot.png")
    plt.close(fig)
    assert [p.name for p in tmp_path.iterdir()] == ["plot.svg"]


def test_allocator_setting_applies_on_glibc():
    import platform

    from lib.merge.stream import return_freed_blocks_to_the_system

    assert return_freed_blocks_to_the_system() is (platform.libc_ver()[0] == "glibc")


@pytest.mark.parametrize("method", sorted(n for n in METHODS if n.startswith(("snr", "spectrum"))))
def test_streamed_merge_does_not_depend_on_the_key_order(method, tmp_path):
    """A checkpoint lists its keys alphabetically, the model's state dict in module order; with
    pure-noise deltas every layer's SNR ties at 0, so only a canonical tie-break gives the
    streamed merge the in-memory result."""
    base = {k: v.contiguous() for k, v in tiny_bert(0).state_dict().items()}
    g = torch.Generator().manual_seed(3)
    experts = [
        {k: w + 0.01 * torch.randn(w.shape, generator=g) if w.is_floating_point() else w for k, w in base.items()}
        for _ in range(2)
    ]
    save_file(base, tmp_path / "base.safetensors")
    for i, e in enumerate(experts):
        save_file(e, tmp_path / f"e{i}.safetensors")
    out = merge_checkpoints(
        method,
        tmp_path / "base.safetensors",
        [tmp_path / "e0.safetensors", tmp_path / "e1.safetensors"],
        tmp_path / "out",
        progress=False,
    ).out
    got, expected = state_dict(out), merge(method, base, experts)  # module order
    assert list(expected) != sorted(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-7, msg=f"{method}: {k}")


def test_elementwise_merges_run_on_one_thread_and_the_count_is_restored(models, tmp_path, monkeypatch):
    from lib.merge import get_method
    from lib.merge import stream as cli

    def params(name):
        return resolve_hparams(get_method(name), {})

    assert cli.merge_threads(get_method("task_arithmetic"), params("task_arithmetic"), None) == cli.ELEMENTWISE_THREADS
    assert cli.merge_threads(get_method("star"), params("star"), None) == torch.get_num_threads()
    assert cli.merge_threads(get_method("star"), params("star"), 3) == 3
    with pytest.raises(ValueError, match="--threads"):
        cli.merge_threads(get_method("star"), params("star"), 0)
    seen = []
    real = cli._merge_checkpoints
    monkeypatch.setattr(
        cli, "_merge_checkpoints", lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k))[1]
    )
    before = torch.get_num_threads()
    merge_checkpoints("average", models["base"], models["experts"], tmp_path / "out", progress=False, threads=2)
    merge_checkpoints("task_arithmetic", models["base"], models["experts"], tmp_path / "out2", progress=False)
    assert seen == [2, cli.ELEMENTWISE_THREADS] and torch.get_num_threads() == before

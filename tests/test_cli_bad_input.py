"""``python -m lib merge|scan`` as a demanding user meets it: one test per case of bad input that
once lost data, printed a traceback or was silently wrong, and property-based fuzzing of the
argument space and of corrupted safetensors headers. Every failure must be one line on stderr
and a non-zero exit, with no output folder, no temporary files and the inputs untouched."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_cli import error_line, fine_tuned, leftovers, make_models, run_cli, state_dict

from lib import cli, spectral
from lib.__main__ import main
from lib.checkpoint import ShardedWriter
from lib.merge import METHODS, merge

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("models"))


def checksums(*paths: Path, skip: Path | None = None) -> dict[str, str]:
    """Path -> MD5 of every file under ``paths`` (except ``skip`` itself and what lies under it:
    the merge's own output, which ``--force``/``--force-any`` may replace)."""
    out = {}
    for root in paths:
        for p in [root] if root.is_file() else sorted(root.rglob("*")):
            if p.is_file() and not (skip is not None and (p == skip or skip in p.parents)):
                out[str(p)] = hashlib.md5(p.read_bytes()).hexdigest()
    return out


def merge_argv(models, out, *extra):
    return [
        "merge",
        "--method",
        "task_arithmetic",
        "--base",
        models["base"],
        "--experts",
        *models["experts"],
        "--out",
        out,
        "--quiet",
        *extra,
    ]


def assert_fails(capsys, argv, *fragments) -> str:
    rc, _, err = run_cli(capsys, *argv)
    line = error_line(err)
    assert rc == 1, err
    for f in fragments:
        assert f in line, line
    assert ".partial" not in line and ".tmp" not in line, line
    return line


# ---------------------------------------------------------------- data loss


def test_out_holding_the_inputs_is_refused_and_nothing_is_deleted(models, tmp_path, capsys):
    d = tmp_path / "d"
    shutil.copytree(models["base"], d / "base")
    shutil.copytree(models["experts"][0], d / "e0")
    shutil.copy(models["experts"][1], d / "e1.safetensors")
    (d / "notes.txt").write_text("unrelated")
    before = checksums(d)
    argv = [
        "merge",
        "--method",
        "average",
        "--base",
        d / "base",
        "--experts",
        d / "e0",
        d / "e1.safetensors",
        "--out",
        d,
        "--quiet",
    ]
    for flags in ([], ["--force"], ["--force-any"]):
        assert_fails(capsys, [*argv, *flags], f"--out {d} contains the input")
    assert checksums(d) == before


def test_expert_file_inside_out_is_refused(models, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(models["experts"][1], out / "e.safetensors")
    before = checksums(out)
    argv = [
        "merge",
        "--method",
        "average",
        "--experts",
        models["experts"][0],
        out / "e.safetensors",
        "--out",
        out,
        "--quiet",
        "--force-any",
    ]
    assert_fails(capsys, argv, "contains the input", "e.safetensors")
    assert checksums(out) == before


def test_out_inside_an_input_folder_or_equal_to_it_is_refused(models, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(models["base"], base)
    before = checksums(base)
    assert_fails(capsys, merge_argv({**models, "base": base}, base / "merged"), "inside the input model folder")
    assert_fails(capsys, merge_argv({**models, "base": base}, base, "--force-any"), f"--out {base} is the input")
    assert checksums(base) == before


# ---------------------------------------------------------------- one line, never a traceback


@pytest.mark.parametrize("value", ["abc", "[a,b]", "[0.5]", "[1,nan]", "[-1, 2]"])
def test_bad_weights_are_one_line(value, models, tmp_path, capsys):
    argv = [
        "merge",
        "--method",
        "average",
        "--experts",
        *models["experts"],
        "--out",
        tmp_path / "out",
        "--quiet",
        "--set",
        f"weights={value}",
    ]
    assert_fails(capsys, argv, "weights")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--include", "--exclude"])
def test_bad_regular_expression_is_one_line(flag, models, tmp_path, capsys):
    assert_fails(
        capsys,
        merge_argv(models, tmp_path / "out", flag, "(encoder"),
        flag,
        "'(encoder'",
        "not a valid regular expression",
    )
    assert_fails(capsys, ["scan", models["experts"][0], "--out", tmp_path / "s.csv", flag, "[a-", "--quiet"], flag)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("device, fragment", [("foo", "unknown device 'foo'"), ("mps", "MPS"), ("cuda:99", "cuda")])
def test_unusable_device_is_one_line(device, fragment, models, tmp_path, capsys):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    assert_fails(capsys, merge_argv(models, tmp_path / "out", "--device", device), fragment, "available")
    assert_fails(capsys, ["scan", models["experts"][0], "--out", tmp_path / "s.csv", "--device", device], fragment)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(models, tmp_path, capsys):
    assert_fails(capsys, merge_argv(models, tmp_path / "out", "--device", "cuda"), "no CUDA GPU", "available: cpu")


def test_empty_matrix_is_the_intended_error(tmp_path, capsys):
    for call in (
        lambda: spectral.spectrum(torch.zeros(0, 16)),
        lambda: spectral.snr(torch.zeros(16, 0)),
        lambda: spectral.scan({"w": torch.zeros(0, 16)}),
    ):
        with pytest.raises(ValueError, match="empty matrix has no spectrum"):
            call()
    save_file({"w": torch.zeros(0, 16), "v": torch.randn(8, 8)}, tmp_path / "m.safetensors")
    assert_fails(capsys, ["scan", tmp_path / "m.safetensors", "--out", tmp_path / "s.csv"], "'w'", "empty matrix")


def test_huge_finite_entry_gives_the_float64_spectrum():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 16, generator=g)
    w[3, 4] = 1e20
    got = spectral.spectrum(w)
    ref = torch.linalg.eigvalsh(w.double().T @ w.double() / 16).flip(0)
    assert got.eigenvalues[0] == pytest.approx(float(ref[0]), rel=1e-6)
    assert got.n_signal == 1 and 0.0 <= got.signal_fraction <= 1.0
    # a tiny matrix (entries 1e-30: float32 squares underflow) reads like the same matrix at scale 1
    small, unit = spectral.spectrum(w.clone().fill_(0).add_(torch.randn(16, 16, generator=g)) * 1e-30), None
    assert small.sigma2 > 0
    # and rescaling by a power of two changes nothing else: ordinary matrices are bit-identical
    plain = torch.randn(32, 16, generator=g)
    unit = spectral.spectrum(plain)
    assert torch.equal(spectral.spectrum(plain * 2.0**-60).eigenvalues * 2.0**120, unit.eigenvalues)


def test_rank_one_matrix_has_one_spike_and_fractions_stay_in_range():
    sp = spectral.spectrum(torch.ones(16, 16))
    assert sp.n_signal == 1 and sp.signal_fraction == 1.0 and sp.snr == float("inf")
    g = torch.Generator().manual_seed(1)
    for rank in (1, 2, 5):
        w = torch.randn(40, rank, generator=g) @ torch.randn(rank, 24, generator=g)
        sp = spectral.spectrum(w)
        assert sp.n_signal == rank, rank
        assert 0.0 <= sp.signal_fraction <= 1.0
        assert (sp.eigenvalues >= 0).all()


# ---------------------------------------------------------------- silently wrong or incomplete


@pytest.fixture(scope="module")
def sentence_transformer(models, tmp_path_factory):
    """The tiny base laid out as a sentence-transformers model: modules.json, a 1_Pooling/ module,
    a README card, and an onnx/ export of the base that no module uses."""
    root = tmp_path_factory.mktemp("st") / "base"
    shutil.copytree(models["base"], root)
    (root / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ]
        )
    )
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True})
    )
    (root / "README.md").write_text("---\nlicense: apache-2.0\n---\n# the base model\n")
    (root / "onnx").mkdir()
    (root / "onnx" / "model.onnx").write_bytes(b"base weights in another format")
    return root


def test_sentence_transformers_modules_are_copied_and_the_card_describes_the_merge(
    sentence_transformer, models, tmp_path, capsys
):
    out = tmp_path / "merged"
    rc, stdout, err = run_cli(
        capsys,
        "merge",
        "--method",
        "ties",
        "--base",
        sentence_transformer,
        "--experts",
        *models["experts"],
        "--out",
        out,
        "--set",
        "density=0.5",
        "--quiet",
    )
    assert rc == 0, err
    for entry in json.loads((out / "modules.json").read_text()):
        assert (out / entry["path"]).is_dir(), entry  # every module the pipeline loads is there
    pooling = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pooling == json.loads((sentence_transformer / "1_Pooling" / "config.json").read_text())
    assert not (out / "onnx").exists() and "onnx/ left out" in stdout
    card = (out / "README.md").read_text()
    assert "the base model" not in card
    for fragment in (
        "A merge of 2 model(s) with `ties`",
        "density=0.5",
        str(models["experts"][0].resolve()),
        "merge_config.yaml",
        "`onnx/`",
    ):
        assert fragment in card, fragment
    assert yaml.safe_load(card.split("---")[1])["tags"][:2] == ["merge", "spectral-merge"]
    assert transformers.AutoModel.from_pretrained(out) is not None


def test_filters_that_select_nothing_are_an_error_and_counts_are_printed(models, tmp_path, capsys):
    assert_fails(capsys, merge_argv(models, tmp_path / "out", "--include", "nosuchkey"), "nothing would be merged")
    assert not (tmp_path / "out").exists()
    rc, stdout, _ = run_cli(capsys, *merge_argv(models, tmp_path / "out", "--exclude", "embeddings"))
    n = len(state_dict(models["base"]))
    n_emb = sum("embeddings" in k for k in state_dict(models["base"]))
    assert rc == 0 and f"{n - n_emb} tensor(s) merged, {n_emb} copied from the base" in stdout


def test_experts_without_the_position_ids_buffer_merge(models, tmp_path, capsys):
    """transformers 5 does not save the non-persistent position ids; the shipped MiniLM has them."""
    base = state_dict(models["base"])
    base["embeddings.position_ids"] = torch.arange(32).unsqueeze(0)
    save_file(base, tmp_path / "base.safetensors")
    experts = [{k: v for k, v in fine_tuned(state_dict(models["base"]), s).items()} for s in (1, 2)]
    for i, e in enumerate(experts):
        save_file(e, tmp_path / f"e{i}.safetensors")
    rc, _, err = run_cli(
        capsys,
        "merge",
        "--method",
        "task_arithmetic",
        "--base",
        tmp_path / "base.safetensors",
        "--experts",
        tmp_path / "e0.safetensors",
        tmp_path / "e1.safetensors",
        "--out",
        tmp_path / "out",
        "--quiet",
    )
    assert rc == 0, err
    got = state_dict(tmp_path / "out")
    assert torch.equal(got["embeddings.position_ids"], base["embeddings.position_ids"])
    expected = merge("task_arithmetic", base, experts)  # the API accepts the same inputs
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert "`embeddings.position_ids`: missing from expert 0" in (tmp_path / "out" / "README.md").read_text()
    # a floating-point tensor missing is still an architecture mismatch
    del experts[1]["pooler.dense.bias"]
    save_file(experts[1], tmp_path / "e1.safetensors")
    assert_fails(
        capsys,
        [
            "merge",
            "--method",
            "average",
            "--experts",
            tmp_path / "e0.safetensors",
            tmp_path / "e1.safetensors",
            "--out",
            tmp_path / "out2",
            "--quiet",
        ],
        "'pooler.dense.bias'",
    )


def test_scan_orders_a_resnet_from_input_to_output(tmp_path, capsys):
    torchvision = pytest.importorskip("torchvision")
    net = torchvision.models.resnet18(num_classes=10)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "resnet.safetensors")
    rc, _, err = run_cli(capsys, "scan", tmp_path / "resnet.safetensors", "--out", tmp_path / "s.csv", "--quiet")
    assert rc == 0, err
    import pandas as pd

    names = list(pd.read_csv(tmp_path / "s.csv")["name"])
    module_order = [k for k, v in net.state_dict().items() if v.ndim >= 2]
    assert names == module_order


# ---------------------------------------------------------------- unclear or late


def test_yaml_errors_name_the_file_and_the_shape(models, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: ties\nmodels: [a, b\n")
    assert_fails(capsys, ["merge", "--config", bad, "--out", tmp_path / "o"], str(bad), "line", "not valid YAML")
    bad.write_text("merge_method: ties\nmodels: [a, b]\nparameters: [density, 0.3]\n")
    assert_fails(
        capsys, ["merge", "--config", bad, "--out", tmp_path / "o"], "'parameters' must be a mapping", "{density: 0.3}"
    )
    bad.write_text("merge_method: ties\nmodels: [{model: a, parameters: [1]}]\n")
    assert_fails(capsys, ["merge", "--config", bad, "--out", tmp_path / "o"], "parameters of model 'a'")


def test_mergekit_per_model_weights(models, tmp_path, capsys):
    experts = [str(p) for p in models["experts"]]
    config = {
        "merge_method": "ties",
        "base_model": str(models["base"]),
        "models": [
            {"model": experts[0], "parameters": {"weight": 0.7}},
            {"model": experts[1], "parameters": {"weight": 0.3}},
        ],
    }
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(config))
    line = assert_fails(
        capsys,
        ["merge", "--config", tmp_path / "m.yaml", "--out", tmp_path / "o"],
        "'ties' takes no per-model weights",
        "average",
        "task_arithmetic",
    )
    assert "weights'" not in line.split("methods that do")[0]  # no hyperparameter the user never wrote
    config["merge_method"] = "task_arithmetic"
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(config))
    assert run_cli(capsys, "merge", "--config", tmp_path / "m.yaml", "--out", tmp_path / "cfg", "--quiet")[0] == 0
    assert run_cli(capsys, *merge_argv(models, tmp_path / "flags", "--set", "weights=[0.7,0.3]"))[0] == 0
    a, b = state_dict(tmp_path / "cfg"), state_dict(tmp_path / "flags")
    assert all(torch.equal(a[k], b[k]) for k in a)
    base, ex = state_dict(models["base"]), [state_dict(p) for p in models["experts"]]
    k = "encoder.layer.0.attention.self.query.weight"
    expected = base[k] + 0.7 * (ex[0][k] - base[k]) + 0.3 * (ex[1][k] - base[k])
    torch.testing.assert_close(a[k], expected, rtol=1e-6, atol=1e-7)


def test_errors_name_the_users_paths_not_temporary_ones(models, tmp_path, capsys, monkeypatch):
    def disk_full(self, key, t, **block):
        raise OSError(28, "No space left on device", str(self.folder / "model-00001-of-00001.safetensors"))

    monkeypatch.setattr(ShardedWriter, "write", disk_full)
    line = assert_fails(capsys, merge_argv(models, tmp_path / "merged"), "No space left on device")
    assert str(tmp_path / "merged") in line
    assert list(tmp_path.iterdir()) == []


def test_expert_labels_are_the_same_in_every_message(models, tmp_path, capsys):
    sd = load_file(models["experts"][1])
    sd["encoder.layer.1.output.dense.weight"][3, 5] = float("nan")
    save_file(sd, tmp_path / "nan.safetensors")
    lines = [
        assert_fails(
            capsys,
            [
                "merge",
                "--method",
                method,
                "--base",
                models["base"],
                "--experts",
                models["experts"][0],
                tmp_path / "nan.safetensors",
                "--out",
                tmp_path / "o",
                "--quiet",
            ],
            "NaN/Inf",
        )
        for method in ("average", "ties")
    ]
    label = f"expert 1 ({tmp_path / 'nan.safetensors'})"
    assert all(label in line for line in lines), lines


def test_outputs_follow_the_umask(models, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        assert run_cli(capsys, *merge_argv(models, tmp_path / "out"))[0] == 0
        assert run_cli(capsys, "scan", models["experts"][0], "--out", tmp_path / "s.csv", "--quiet")[0] == 0
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in (tmp_path / "out").glob("*.safetensors"))
    assert (tmp_path / "s.csv").stat().st_mode & 0o777 == 0o644


def test_bad_outputs_are_found_before_the_work(models, tmp_path, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the work started before the output was checked")

    monkeypatch.setattr(cli, "scan_checkpoint", no_work)
    monkeypatch.setattr(cli.merging, "run_prepass", no_work)
    (tmp_path / "file.txt").write_text("x")
    scan = ["scan", models["experts"][0], "--quiet"]
    assert_fails(capsys, [*scan, "--out", tmp_path / "s.csv", "--plot", tmp_path / "p.xyz"], "p.xyz", "png")
    assert_fails(capsys, [*scan, "--out", tmp_path / "file.txt" / "s.csv"], "not a writable folder")
    assert_fails(capsys, [*scan, "--out", tmp_path], "is a folder")
    assert_fails(capsys, [*scan, "--out", models["experts"][0] / "config.json", "--force"], "a file of the model")
    assert_fails(capsys, merge_argv(models, tmp_path / "file.txt" / "merged"), "not a writable folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_scan_help_speaks_of_scanning_only(capsys):
    with pytest.raises(SystemExit):
        main(["scan", "--help"])
    text = capsys.readouterr().out
    assert "--include" in text and "merge" not in text and "base" not in text


# ---------------------------------------------------------------- fuzzing


@pytest.fixture(scope="module")
def fuzz_models(models, tmp_path_factory):
    """Copies of the tiny models that the fuzz tests check for changes after every example."""
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(models["base"], root / "base")
    shutil.copytree(models["base"], root.parent / f"{root.name}_pristine_base")
    shutil.copytree(models["experts"][0], root / "expert_a")
    shutil.copy(models["experts"][1], root / "expert_b.safetensors")
    (root / "previous").mkdir()
    (root / "previous" / cli.MERGE_RECORD).write_text("merge_method: average\n")
    (root / "foreign").mkdir()
    (root / "foreign" / "keep.txt").write_text("not ours")
    return root


def run_quietly(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def assert_clean_outcome(rc, err, out: Path, existed: bool, before: dict, root: Path, inputs: list[Path]):
    """Success leaves a complete model; failure one line, no output, nothing temporary, inputs as they were."""
    if rc == 0:
        assert (out / "model.safetensors.index.json").is_file() and (out / cli.MERGE_RECORD).is_file()
        assert set(state_dict(out)) == set(state_dict(root / "base"))
    else:
        assert rc == 1 and "Traceback" not in err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert out.exists() == existed
    assert checksums(*inputs, skip=out) == before
    assert [p for p in root.rglob(".*") if ".partial" in p.name or p.name.endswith((".tmp", ".old"))] == []


SET_VALUES = [
    "density=0.5",
    "density=3",
    "density=abc",
    "lam=0.3",
    "lam=nan",
    "weights=[0.5,0.5]",
    "weights=abc",
    "weights=[a,b]",
    "weights=[1]",
    "p=0.9",
    "p=1",
    "eta=40",
    "top=0.5",
    "seed=1",
    "seed=x",
    "scope=model",
    "scope=nope",
    "nonsense=1",
    "=1",
    "density",
    "rtol=0",
]
PATTERNS = ["encoder", "layer\\.0", "(", "[a-", "nosuchkey", ".*", "*", "weight$"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.sampled_from(sorted(METHODS) * 2 + ["nonsense"]),
    with_base=st.sampled_from([True, True, True, False]),
    experts=st.one_of(
        st.just(["expert_a", "expert_b.safetensors"]),
        st.lists(st.sampled_from(["expert_a", "expert_b.safetensors", "missing", "base"]), max_size=3),
    ),
    sets=st.lists(st.sampled_from(SET_VALUES), max_size=2),
    include=st.lists(st.sampled_from(PATTERNS), max_size=1),
    exclude=st.lists(st.sampled_from(PATTERNS), max_size=1),
    device=st.sampled_from([None, None, "cpu", "foo", "cuda:7"]),
    out=st.sampled_from(
        ["new", "new", "new", "previous", "foreign", "base", "base/inner", "expert_b.safetensors", "."]
    ),
    force=st.sampled_from([[], [], ["--force"], ["--force-any"]]),
)
def test_fuzz_merge_arguments(fuzz_models, method, with_base, experts, sets, include, exclude, device, out, force):
    root = fuzz_models
    inputs = [root / "base", root / "expert_a", root / "expert_b.safetensors"]
    out_path = root / "merged" if out == "new" else root / out if out != "." else root
    before = checksums(*inputs, skip=out_path)
    existed = out_path.exists()
    argv = ["merge", "--method", method, "--out", out_path, "--quiet", *force]
    if with_base:
        argv += ["--base", root / "base"]
    if experts:
        argv += ["--experts", *(root / e for e in experts)]
    for s in sets:
        argv += ["--set", s]
    for p in include:
        argv += ["--include", p]
    for p in exclude:
        argv += ["--exclude", p]
    if device:
        argv += ["--device", device]
    rc, _, err = run_quietly(argv)
    event("merged" if rc == 0 else "refused")
    try:
        assert_clean_outcome(rc, err, out_path, existed, before, root, inputs)
    finally:  # the next example starts from the same folders
        shutil.rmtree(root / "merged", ignore_errors=True)
        shutil.rmtree(root / "base" / "inner", ignore_errors=True)  # allowed when base is not an input
        if out == "base" and rc == 0:  # replaced with --force-any while not an input: put it back
            shutil.rmtree(root / "base")
            shutil.copytree(root.parent / f"{root.name}_pristine_base", root / "base")
        if out == "previous" and rc == 0:
            shutil.rmtree(out_path)
            out_path.mkdir()
            (out_path / cli.MERGE_RECORD).write_text("merge_method: average\n")
        if out == "foreign" and rc == 0:
            shutil.rmtree(out_path)
            out_path.mkdir()
            (out_path / "keep.txt").write_text("not ours")
    if out == "foreign" and rc != 0:
        assert (out_path / "keep.txt").read_text() == "not ours"


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_corrupted_safetensors_headers(fuzz_models, data):
    """Bytes of the header (its length field, its JSON) flipped, cut or replaced: every merge and
    scan of the result either succeeds completely or says what is wrong in one line."""
    root = fuzz_models
    good = (root / "expert_b.safetensors").read_bytes()
    header_end = 8 + int.from_bytes(good[:8], "little")
    how = data.draw(st.sampled_from(["flip", "truncate", "replace_text", "length", "pad"]))
    blob = bytearray(good)
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, header_end - 1))
            blob[i] = data.draw(st.integers(0, 255))
    elif how == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif how == "replace_text":
        text = good[8:header_end].decode()
        old = data.draw(st.sampled_from(['"F32"', '"shape":[', '"data_offsets":[', "32", "64", '":{', "0,"]))
        new = data.draw(st.sampled_from(['"F16"', '"I64"', '"X"', "-1", "1e400", '"shape":[0,', "", "null", '"x":[']))
        patched = text.replace(old, new, 1).encode()
        blob = bytearray(len(patched).to_bytes(8, "little") + patched + good[header_end:])
    elif how == "pad":  # the header may end in spaces (safetensors pads it to 8 bytes): harmless
        text = good[8:header_end] + b" " * data.draw(st.integers(0, 64))
        blob = bytearray(len(text).to_bytes(8, "little") + text + good[header_end:])
    else:
        blob[:8] = data.draw(st.sampled_from([0, 1, 2**63, 2**64 - 1, header_end + 10**6, len(good)])).to_bytes(
            8, "little"
        )
    with tempfile.TemporaryDirectory(dir=root) as work:
        work = Path(work)
        bad = work / "bad.safetensors"
        bad.write_bytes(bytes(blob))
        inputs = [root / "base", root / "expert_a", bad]
        before = checksums(*inputs)
        rc, _, err = run_quietly(
            [
                "merge",
                "--method",
                "average",
                "--base",
                root / "base",
                "--experts",
                root / "expert_a",
                bad,
                "--out",
                work / "merged",
                "--quiet",
            ]
        )
        event(f"{how}: {'merged' if rc == 0 else 'refused'}")
        if rc == 0:  # a harmless change (whitespace, an equal rewrite): the output is complete
            assert (work / "merged" / cli.MERGE_RECORD).is_file()
        else:
            assert rc == 1 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
            assert not (work / "merged").exists()
        rc, _, err = run_quietly(["scan", bad, "--out", work / "s.csv", "--quiet"])
        assert rc in (0, 1) and "Traceback" not in err
        assert rc == 0 or (len(err.strip().splitlines()) == 1 and not (work / "s.csv").exists()), err
        assert checksums(*inputs) == before
        assert leftovers(work) == []

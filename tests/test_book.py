"""The course book: its checker (book/check.py) in headless Chromium on a tiny built fixture, and
the staging of book/build.py (no execution, no Sphinx) on the real sources.

The browser tests skip with the reason when Debian's Chromium or playwright is absent."""

from __future__ import annotations

import base64
import importlib.util
import sys
from pathlib import Path

import pytest

BOOK = Path(__file__).resolve().parent.parent / "book"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"book_{name}", BOOK / f"{name}.py")
    module = sys.modules[f"book_{name}"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = load("check")
needs_chromium = pytest.mark.skipif(
    check.chromium_missing() is not None, reason=f"book-check needs a browser: {check.chromium_missing()}"
)

# a 1x1 PNG
PIXEL = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def page(body: str) -> str:
    return f"<!doctype html><html><head><meta charset='utf-8'><title>t</title></head><body>{body}</body></html>"


@pytest.fixture
def good_site(tmp_path):
    site = tmp_path / "site"
    (site / "chapters").mkdir(parents=True)
    (site / "_images").mkdir()
    (site / "_images" / "dot.png").write_bytes(PIXEL)
    (site / "index.html").write_text(
        page(
            "<h1 id='top'>Book</h1><a href='chapters/one.html#idea'>one</a>"
            "<a href='#top'>top</a><a href='https://example.org/'>outside</a>"
        )
    )
    (site / "chapters" / "one.html").write_text(
        page("<h2 id='idea'>Idea</h2><img src='../_images/dot.png'><a href='../index.html'>home</a>")
    )
    (site / "search.html").write_text(page("<p>search</p>"))
    return site


@needs_chromium
def test_a_sound_site_passes_with_a_screenshot_per_chapter(good_site, tmp_path):
    reports = check.check_site(good_site, tmp_path / "shots")
    assert {r.page for r in reports} == {"index.html", "chapters/one.html", "search.html"}
    assert all(not r.problems for r in reports), [r.problems for r in reports]
    assert next(r for r in reports if r.page == "chapters/one.html").images == 1
    shots = sorted(p.name for p in (tmp_path / "shots").glob("*.png"))
    assert shots == ["chapters__one.png", "index.png"]  # search.html is Sphinx's, not a chapter
    assert all((tmp_path / "shots" / s).stat().st_size > 100 for s in shots)


@needs_chromium
def test_each_kind_of_breakage_is_reported(good_site, tmp_path):
    (good_site / "chapters" / "two.html").write_text(
        page(
            "<img src='../_images/missing.png'>"
            "<a href='three.html'>gone</a><a href='../index.html#nowhere'>bad anchor</a>"
            "<script>console.error('boom')</script><script>undefinedFunction()</script>"
            "<script src='https://cdn.example.org/x.js'></script>"
        )
    )
    reports = {r.page: r for r in check.check_site(good_site, None, timeout_ms=10_000)}
    problems = "\n".join(reports["chapters/two.html"].problems)
    assert "image did not load" in problems and "missing.png" in problems
    assert "broken link" in problems and "three.html" in problems
    assert "broken anchor" in problems and "nowhere" in problems
    assert "console error: boom" in problems
    assert "script error" in problems and "undefinedFunction" in problems
    assert "leaves the site: https://cdn.example.org/x.js" in problems
    assert not reports["index.html"].problems


def test_no_pages_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="make book"):
        check.check_site(tmp_path, None)


def test_staging_without_execution(tmp_path):
    build = load("build")
    log = build.stage(tmp_path / "src", execute=False)
    src = tmp_path / "src"
    assert len(log) == len(build.CHAPTERS) == 8 and all("unexecuted" in line or "NOT EXECUTED" in line for line in log)
    toc = (src / "_toc.yml").read_text()
    for chapter in build.CHAPTERS:
        assert (src / "chapters" / chapter.name).is_file()
        assert f"chapters/{chapter.stem}" in toc
    results = (src / "results.md").read_text()
    from lib import report

    assert report.results_markdown(report.load()) in results  # the README's tables, not a copy
    linked = [line.split("](")[1].rstrip(")\n") for line in results.splitlines() if line.startswith("![")]
    assert linked and all((src / target).is_file() for target in linked)
    for name in build.PAGES:
        assert (src / name).is_file()


# ------------------------------------------------------------------------------------------ lab


def test_presets_are_a_no_op_without_PRESET(monkeypatch):
    from lib import presets

    monkeypatch.delenv("PRESET", raising=False)
    assert presets.parameters("03_text_sst2_cola") == {} and presets.expert_kw("sst2") == {}
    monkeypatch.setenv("PRESET", "lab")
    assert presets.parameters("03_text_sst2_cola")["SEEDS"] == [0]
    with pytest.raises(ValueError, match="not for '01_resnet_fashion_kmnist'"):
        presets.parameters("01_resnet_fashion_kmnist")
    with pytest.raises(ValueError, match="PRESET must be one of"):
        presets.parameters("03_text_sst2_cola", "nope")


def test_notebook_03_takes_the_lab_preset_per_task_and_never_writes_into_results(monkeypatch):
    """Notebook 03 under PRESET=lab (``make lab-03``): each task's recipe overrides reach its own
    expert's key only, the published spec is unchanged without a preset, and a preset run aimed at
    the published results/ or figures/ is refused."""
    from lib import cache as expert_cache
    from lib import paths, presets, runner

    monkeypatch.delenv("PRESET", raising=False)
    assert presets.task_kw(["sst2", "cola"]) == {}
    presets.check_outputs()  # no preset: nothing to refuse
    published = runner.sweep_spec(["sst2", "cola"], seed=0, smoke=False)
    assert "task_kw" not in published
    assert runner.sweep_spec(["sst2", "cola"], seed=0, smoke=False, task_kw={}) == published
    monkeypatch.setenv("PRESET", "lab")
    kw = presets.task_kw(["sst2", "cola"])
    assert kw == {t: presets.expert_kw(t) for t in ("sst2", "cola")} and kw["sst2"] != kw["cola"]
    lab = runner.sweep_spec(["sst2", "cola"], seed=0, smoke=False, task_kw=kw)
    for task in ("sst2", "cola"):
        own = expert_cache.config_key(expert_cache.expert_config(task, seed=0, smoke=False, **kw[task]))
        assert lab["experts"][task] == own != published["experts"][task]
    assert runner.expert_kw(lab, "sst2") == kw["sst2"] and runner.expert_kw(lab) == {}
    if paths.results_dir(False).resolve() == (paths.ROOT / "results").resolve():
        with pytest.raises(RuntimeError, match="SPECTRAL_MERGE_RESULTS"):
            presets.check_outputs()
    notebook = (paths.ROOT / "notebooks" / "03_text_sst2_cola.ipynb").read_text()
    assert "presets.check_outputs()" in notebook and "task_kw=TASK_KW" in notebook


def test_lab_preset_sets_only_parameters_notebook_03_has():

    from lib import cache as expert_cache
    from lib import configs, presets

    full = configs.grid("03_text_sst2_cola", smoke=False)
    lab = presets.parameters("03_text_sst2_cola", "lab")
    assert set(lab) <= set(full)
    for key, value in lab.items():  # a smaller grid of the same kind: a subset of the full one
        assert set(value) <= set(full[key]), key
    for task in ("sst2", "cola"):
        fields = set(expert_cache.Recipe.__dataclass_fields__)
        assert set(presets.expert_kw(task, "lab")) <= fields


def test_lab_estimate_prices_every_record_from_the_published_run():
    from lib import paths, presets

    if not (paths.results_dir(False) / "03_text_sst2_cola.json").exists():
        pytest.skip("results/03_text_sst2_cola.json is not there")
    est = presets.estimate_seconds("03_text_sst2_cola")
    assert est["total_s"] == pytest.approx(est["train_sst2_s"] + est["train_cola_s"] + est["sweep_s"])
    assert all(v > 0 for v in est.values())
    published = paths.read_json(paths.results_dir(False) / "03_text_sst2_cola.json")
    published["records"] = [r for r in published["records"] if r["run"] != "average()"]
    with pytest.raises(ValueError, match="average"):
        presets.estimate_seconds("03_text_sst2_cola", published=published)


def test_a_preset_never_writes_published_results(monkeypatch):
    from lib import paths, presets

    monkeypatch.delenv("PRESET", raising=False)
    assert presets.results_dir(False) == paths.results_dir(False)
    monkeypatch.setenv("PRESET", "lab")
    for where in (presets.results_dir(False), presets.figures_dir(False)):
        assert where.is_relative_to(paths.ROOT / "build" / "lab")

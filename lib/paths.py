"""Every path of the project comes from here.

Each location can be overridden by an environment variable, so that a user can keep data,
caches or results elsewhere without editing code:

===================  ==========================  ===========================================
name                 variable                    default
===================  ==========================  ===========================================
ROOT                 (none)                      the checkout (folder above ``lib/``)
DATA                 ``SPECTRAL_MERGE_DATA``     see :func:`data_candidates`
CACHE                ``SPECTRAL_MERGE_CACHE``    ``ROOT/.cache`` (trained experts, tokenised data)
RESULTS              ``SPECTRAL_MERGE_RESULTS``  ``ROOT/results``
FIGURES              ``SPECTRAL_MERGE_FIGURES``  ``ROOT/figures``
===================  ==========================  ===========================================

SMOKE runs (``SMOKE=1``) write their results and figures to ``results/smoke`` and
``figures/smoke`` (git-ignored), so a quick check never overwrites a published number.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _env_path(var: str, default: Path) -> Path:
    value = os.environ.get(var)
    return Path(value).expanduser().resolve() if value else default


CACHE = _env_path("SPECTRAL_MERGE_CACHE", ROOT / ".cache")
RESULTS = _env_path("SPECTRAL_MERGE_RESULTS", ROOT / "results")
FIGURES = _env_path("SPECTRAL_MERGE_FIGURES", ROOT / "figures")
#: the folder beside the checkout that holds the project's shared, read-only data
SHARED_DATA = ROOT.parent / "shared" / "data"


def data_candidates(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Local data folders in the order they are searched.

    An explicit ``data_dir`` wins; otherwise ``$SPECTRAL_MERGE_DATA``; then ``../shared/data``
    beside the checkout; then ``ROOT/data`` (git-ignored copies). The public hub comes after
    all of these and is handled by :mod:`lib.data`.
    """
    if data_dir is not None:
        return [Path(data_dir).expanduser().resolve()]
    out = []
    if os.environ.get("SPECTRAL_MERGE_DATA"):
        out.append(Path(os.environ["SPECTRAL_MERGE_DATA"]).expanduser().resolve())
    out += [SHARED_DATA, ROOT / "data"]
    return out


DATA = data_candidates()[0]


def is_smoke() -> bool:
    return os.environ.get("SMOKE", "0") == "1"


def results_dir(smoke: bool | None = None) -> Path:
    smoke = is_smoke() if smoke is None else smoke
    return RESULTS / "smoke" if smoke else RESULTS


def figures_dir(smoke: bool | None = None) -> Path:
    smoke = is_smoke() if smoke is None else smoke
    return FIGURES / "smoke" if smoke else FIGURES


def current_umask() -> int:
    """The process's file-creation mask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename,
    so that a reader never sees a half-written file and a crash leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes it 0600; the file follows the umask
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, obj, *, overwrite: bool = True) -> Path:
    """Atomically write ``obj`` as indented JSON. With ``overwrite=False`` an existing file is
    an error rather than silently replaced."""
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    return atomic_write_bytes(path, text.encode())


def _json_default(obj):
    # numpy scalars and arrays, Paths and tensors appear in results; store them as plain JSON
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in JSON")


def read_json(path: str | os.PathLike):
    with open(path) as fh:
        return json.load(fh)

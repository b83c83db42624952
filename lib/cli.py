"""``python -m lib scan`` and ``python -m lib merge``: spectra and merges of the user's own
Hugging Face checkpoints, streamed tensor by tensor from disk.

    python -m lib scan MODEL --out scan.csv [--plot scan.png]
    python -m lib merge --method ties --base BASE --experts A B --out merged [--set density=0.3]
    python -m lib merge --config merge.yaml --out merged

MODEL is a model folder (``config.json`` + safetensors, sharded or not) or one ``.safetensors``
file. The merge config follows mergekit's shape::

    merge_method: ties
    base_model: path/to/base
    models:
      - model: path/to/expert_a
        parameters: {weight: 0.7}      # per-model weights, for methods that take ``weights``
      - path/to/expert_b
    parameters: {density: 0.3}
    exclude: [classifier]              # regexes of keys kept from the base, as in lib.merge.merge

Flags override the config; ``--set`` overrides its parameters. This module only parses the
command line and the config and reports errors; the streamed merge and scan themselves are
:func:`lib.merge.stream.merge_checkpoints` and :func:`lib.merge.stream.scan_checkpoint` (how
memory stays bounded, adapters, what is checked before any work: that module's docstring), and
the scan's figure is :func:`lib.plotting.plot_scan`.

Nothing is lost: ``--out`` may not be an input, hold one or lie inside one, ``--force`` replaces
only a previous merge output (a folder holding ``merge_config.yaml``) and ``--force-any``
anything else; the output appears only when complete. Bad input ends the command with one line
on stderr and exit status 1 (:func:`run`), checked before the first tensor is read wherever the
headers suffice.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from . import merge as merging
from .merge.stream import (
    DEFAULT_BLOCK_BYTES,
    MERGE_RECORD,
    OUT_FORMATS,
    check_creatable,
    merge_checkpoints,
    return_freed_blocks_to_the_system,
    scan_checkpoint,
)
from .paths import atomic_write_bytes

CONFIG_KEYS = ("merge_method", "method", "base_model", "models", "parameters", "include", "exclude", "out_format")
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
EXIT_BAD_INPUT = 1
EXIT_INTERRUPTED = 130


# ---------------------------------------------------------------- parsing values and configs


def parse_value(text: str) -> Any:
    """``--set`` values: ``none``/``null`` -> None, ``true``/``false`` -> bool, numbers (``1e-3``
    too), ``[a, b]`` or ``a,b`` -> list, anything else stays a string."""
    s = text.strip()
    if s.lower() in ("none", "null", "~"):
        return None
    if s.lower() in ("true", "false"):
        return s.lower() == "true"
    for number in (int, float):
        try:
            return number(s)
        except ValueError:
            pass
    if s.startswith("[") and s.endswith("]"):
        s = s[1:-1]
        return [parse_value(x) for x in s.split(",")] if s.strip() else []
    if "," in s:
        return [parse_value(x) for x in s.split(",")]
    return s


def parse_assignments(pairs: Sequence[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = parse_value(value)
    return out


def parse_size(text: str) -> int:
    """``"2GB"``, ``"500MiB"``, ``"1000"`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else None
    if m is None or unit not in SIZE_UNITS:
        raise ValueError(f"cannot read size {text!r}; write e.g. 2GB, 500MB, 512MiB or a number of bytes")
    return int(float(m.group(1)) * SIZE_UNITS[unit])


def _read_yaml(path: Path):
    """The YAML document at ``path``; a syntax error names the file, line and column."""
    try:
        with open(path, encoding="utf-8") as fh:  # a stream, so yaml's error marks carry the file name
            return yaml.safe_load(fh)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{path}:{where} is not valid YAML: {problem}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text (UTF-8) file; a merge config is YAML") from None


def _mapping(value, what: str, example: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a mapping such as {example}, got {value!r}")
    return dict(value)


def load_config(path: str | Path) -> dict[str, Any]:
    """A mergekit-style YAML file as ``{method, base, experts, parameters, include, exclude}``
    (absent entries are left out, so command-line flags can fill them). Per-model ``weight``
    entries become the ``weights`` hyperparameter (methods that take it: :data:`WEIGHTED_HELP`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    raw = _read_yaml(path)
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a merge config is a mapping with keys {', '.join(CONFIG_KEYS)}")
    unknown = sorted(str(k) for k in set(raw) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; valid: {', '.join(CONFIG_KEYS)}")
    spec: dict[str, Any] = {}
    method = raw.get("merge_method", raw.get("method"))
    if method is not None:
        spec["method"] = str(method)
    if raw.get("base_model") is not None:
        spec["base"] = str(raw["base_model"])
    if raw.get("out_format") is not None:
        spec["out_format"] = str(raw["out_format"])
    parameters = _mapping(raw.get("parameters"), f"{path}: 'parameters'", "{density: 0.3}")
    if "models" in raw:
        spec["experts"], weights = _config_models(path, raw["models"])
        if any(w is not None for w in weights):
            if None in weights:
                raise ValueError(f"{path}: give a weight to every model or to none")
            spec["model_weights"] = weights
    spec["parameters"] = parameters
    for key in ("include", "exclude"):
        value = raw.get(key)
        if value is not None:
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{path}: '{key}' must be a regular expression or a list of them, got {value!r}")
            spec[key] = value
    return spec


def _config_models(path: Path, models) -> tuple[list[str], list[float | None]]:
    if not isinstance(models, list) or not models:
        raise ValueError(f"{path}: 'models' must be a non-empty list of paths or {{model: path}} entries")
    experts, weights = [], []
    for entry in models:
        entry = {"model": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "model" not in entry:
            raise ValueError(
                f"{path}: each entry of 'models' is a path or {{model: path, parameters: ...}}, got {entry!r}"
            )
        params = _mapping(
            entry.get("parameters"), f"{path}: the parameters of model {entry['model']!r}", "{weight: 0.7}"
        )
        other = sorted(set(params) - {"weight"})
        if other:
            raise ValueError(
                f"{path}: per-model parameters {other} are not supported (only 'weight'); "
                "put method hyperparameters under the top-level 'parameters'"
            )
        weight = params.get("weight")
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))):
            raise ValueError(f"{path}: the weight of model {entry['model']!r} must be a number, got {weight!r}")
        experts.append(str(entry["model"]))
        weights.append(weight)
    return experts, weights


def weighted_methods() -> list[str]:
    """The registered methods that take per-expert ``weights`` (mergekit's per-model ``weight``)."""
    return sorted(name for name, m in merging.METHODS.items() if "weights" in m.defaults)


def merge_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The merge to run: the config file (if any), overridden by the flags that were given."""
    spec = load_config(args.config) if args.config else {"parameters": {}}
    for name, value in (
        ("method", args.method),
        ("base", args.base),
        ("experts", args.experts),
        ("include", args.include),
        ("exclude", args.exclude),
        ("out_format", args.out_format),
    ):
        if value:
            spec[name] = value
    spec["parameters"] = {**spec["parameters"], **parse_assignments(args.set or [])}
    snr_method = spec["parameters"].get("snr_method")
    if isinstance(snr_method, str):  # an old name (seed) -> the one in use; the merge checks the rest
        from .spectral import SNR_ALIASES

        spec["parameters"]["snr_method"] = SNR_ALIASES.get(snr_method, snr_method)
    missing = [flag for field, flag in (("method", "--method"), ("experts", "--experts")) if not spec.get(field)]
    if missing:
        raise ValueError(f"missing {' and '.join(missing)} (give the flag or put it in --config)")
    weights = spec.pop("model_weights", None)
    if weights is not None and "weights" not in spec["parameters"]:
        method = merging.get_method(spec["method"])
        if "weights" not in method.defaults:
            raise ValueError(
                f"{args.config}: the models have per-model 'weight' entries, but {method.name!r} takes no "
                f"per-model weights; methods that do: {', '.join(weighted_methods())} "
                "(remove the weights, or choose one of those methods)"
            )
        if args.experts and len(args.experts) != len(weights):
            raise ValueError(
                f"{args.config} gives {len(weights)} per-model weight(s) but --experts names "
                f"{len(args.experts)} model(s); drop the weights or pass --set weights=[...]"
            )
        spec["parameters"]["weights"] = weights
    return spec


# ---------------------------------------------------------------- commands


def _model_files(model: Path) -> list[Path]:
    """The files a model consists of (for a folder: everything in it), which no output may replace."""
    if model.is_dir():
        return [p for p in model.rglob("*") if p.is_file()]
    return [model] if model.exists() else []


def check_file_output(path: Path, model: Path, *, force: bool, flag: str) -> None:
    """Refuse, before the scan, an output file that cannot or should not be written: one of the
    model's own files, a folder, an existing file without ``force``, or a place where no file
    can be created."""
    target = path.resolve()
    if any(target == f.resolve() for f in _model_files(model)) or target == model.resolve():
        raise ValueError(f"{flag} {path} is a file of the model {model}; write it somewhere else")
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name such as {path / 'scan.csv'}")
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; pass --force to replace it, or choose another {flag}")
    check_creatable(path, flag)


def check_plot_format(path: Path) -> None:
    """The plot's suffix names an image format matplotlib writes (png, svg, pdf, ...)."""
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    suffix = path.suffix.lstrip(".").lower()
    if suffix not in formats:
        raise ValueError(
            f"--plot {path}: cannot draw a {suffix or 'suffix-less'} file; use one of {', '.join(sorted(formats))}"
        )


def _scan(args: argparse.Namespace) -> int:
    out, plot, model = Path(args.out), Path(args.plot) if args.plot else None, Path(args.model)
    check_file_output(out, model, force=args.force, flag="--out")
    if plot is not None:
        if plot.resolve() == out.resolve():
            raise ValueError(f"--plot and --out are the same file {out}")
        check_plot_format(plot)
        check_file_output(plot, model, force=args.force, flag="--plot")
    table = scan_checkpoint(
        model,
        include=args.include,
        exclude=args.exclude,
        snr_method=args.snr_method,
        device=args.device,
        progress=not args.quiet,
    )
    atomic_write_bytes(out, table.to_csv(index=False).encode())
    print(f"scanned {len(table)} matrices of {args.model} -> {out}")
    if plot is not None:
        from .plotting import plot_scan, savefig

        savefig(plot_scan(table, title=f"SNR per matrix of {args.model}"), path=plot)
        print(f"plot -> {plot}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    return_freed_blocks_to_the_system()
    spec = merge_spec(args)
    with _sigterm_as_interrupt():
        result = merge_checkpoints(
            spec["method"],
            spec.get("base"),
            spec["experts"],
            args.out,
            parameters=spec["parameters"],
            include=spec.get("include"),
            exclude=spec.get("exclude"),
            device=args.device,
            force=args.force or args.force_any,
            force_any=args.force_any,
            max_shard_bytes=parse_size(args.max_shard_size),
            block_bytes=parse_size(args.block_size),
            progress=not args.quiet,
            out_format=spec.get("out_format", "model"),
            threads=args.threads,
        )
    source = "the base" if spec.get("base") else "expert 0"
    what = " (a PEFT adapter of the base)" if spec.get("out_format") == "adapter" else ""
    print(
        f"merged {len(spec['experts'])} expert(s) with {spec['method']}: {result.merged} tensor(s) merged, "
        f"{result.copied} copied from {source} -> {result.out}{what}"
    )
    for folder in result.side.unmerged_weights:
        print(f"note: {folder} holds weights of its own, copied unmerged from {source} (see README.md)")
    for folder in result.side.skipped:
        print(f"note: {folder} left out: weights of {source} in another format, not the merge")
    return 0


@contextmanager
def _sigterm_as_interrupt():
    """A batch scheduler stops jobs with SIGTERM; turn it into KeyboardInterrupt so the
    temporary output folder is cleaned up as for Ctrl-C."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


#: the temporary names of atomic writes (``.merged.w5av0o3u.partial``, ``.scan.csv.x1y2z3.tmp``)
TEMP_NAME = re.compile(r"\.([^/\s'\"]+?)\.[A-Za-z0-9_]{8}\.(?:partial|tmp|old)(?=[/'\"\s]|$)")


def _one_line(err: BaseException) -> str:
    """The message of ``err`` on one line, naming the user's paths, not our temporary ones."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return TEMP_NAME.sub(r"\1", text) or type(err).__name__


def run(command, args: argparse.Namespace) -> int:
    """Run a command; bad input becomes one line on stderr and a non-zero exit status. Other
    exceptions are bugs and keep their traceback."""
    try:
        return command(args)
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError, yaml.YAMLError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _factored_names() -> list[str]:
    from .lora import FACTORED

    return list(FACTORED)


def add_commands(sub) -> None:
    """Add ``scan`` and ``merge`` to the subparsers of ``python -m lib``."""
    p = sub.add_parser("scan", help="per-matrix Marchenko-Pastur spectra and SNR of a checkpoint -> CSV (+ plot)")
    p.add_argument("model", help="model folder (config.json + safetensors, sharded or not) or a .safetensors file")
    p.add_argument("--out", required=True, help="CSV to write: one row per matrix")
    p.add_argument("--plot", help="also draw the per-matrix SNR as an image (e.g. scan.png, scan.svg)")
    p.add_argument(
        "--snr-method",
        default="mp",
        help="SNR variant of lib.spectral.scan: mp (default), max_median or report_text (old name: seed)",
    )
    p.add_argument("--include", action="append", metavar="REGEX", help="only matrices whose name matches (repeatable)")
    p.add_argument("--exclude", action="append", metavar="REGEX", help="skip matrices whose name matches (repeatable)")
    p.add_argument("--force", action="store_true", help="replace an existing --out/--plot file")
    _add_common(p)
    p.set_defaults(func=lambda args: run(_scan, args))

    p = sub.add_parser("merge", help="merge checkpoints on disk, streaming, into a loadable model folder")
    p.add_argument("--method", help=f"merge method: {', '.join(sorted(merging.METHODS))}")
    p.add_argument("--base", help="the pre-trained model the experts were fine-tuned from")
    p.add_argument(
        "--experts",
        nargs="+",
        metavar="MODEL",
        help="the fine-tuned models, or PEFT LoRA adapter folders of --base (adapter_config.json + "
        "adapter_model.safetensors)",
    )
    p.add_argument(
        "--out", required=True, help="output model folder (written atomically); not an input, nor inside one"
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="method hyperparameter, repeatable (e.g. --set density=0.3 --set weights=[0.7,0.3])",
    )
    p.add_argument("--config", help="mergekit-style YAML: merge_method, base_model, models, parameters")
    p.add_argument(
        "--include",
        action="append",
        metavar="REGEX",
        help="merge only tensors whose name matches (repeatable); the others are copied from the base",
    )
    p.add_argument(
        "--exclude",
        action="append",
        metavar="REGEX",
        help="do not merge tensors whose name matches (repeatable); they are copied from the base",
    )
    p.add_argument(
        "--out-format",
        choices=OUT_FORMATS,
        help="model (default): a full model folder; adapter: a PEFT adapter of --base, for merges of "
        f"adapters that stay exactly low-rank ({', '.join(sorted(_factored_names()))})",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads during the merge (default: 1 for methods that merge entry by entry, whose "
        "small operations lose more to a busy core than a second thread gains; torch's default "
        "for STAR, DRM and the SNR strategies)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    p.add_argument(
        "--block-size",
        default=f"{DEFAULT_BLOCK_BYTES // 2**20}MiB",
        help="tensors larger than this are merged in blocks of rows where the method allows it, "
        f"which bounds the memory used (default {DEFAULT_BLOCK_BYTES // 2**20}MiB)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help=f"replace an existing --out that is a previous merge output (holds {MERGE_RECORD})",
    )
    p.add_argument(
        "--force-any",
        action="store_true",
        help="replace an existing --out even if it is not a merge output (never one holding an input)",
    )
    _add_common(p)
    p.set_defaults(func=lambda args: run(_merge, args))


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

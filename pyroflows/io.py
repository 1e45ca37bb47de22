r"""Saving and loading fitted models and training checkpoints, safely.

A pyroflows file is a ``torch.save`` zip archive that holds **only tensors,
numbers, strings, lists, dicts and** ``None``.  It is read with
``torch.load(..., weights_only=True)``: nothing in the file is imported or
executed, so a model file from a stranger is as safe to load as a CSV.  A
file that would need full unpickling (a crafted file, or an object pickled by
another program) is refused with a message saying so, before any of it is
used.

A **model file** (``pyroflows fit``, :func:`save_model`) is a dict::

    format             "pyroflows-model"
    format_version     2
    pyroflows_version  the library version that wrote it, e.g. "0.1.0"
    flow               {"name": registry name, "input_dim": int or list of ints,
                        "kwargs": the builder's keyword arguments}
    state_dict         every parameter and buffer of the flow (tensors)
    standardization    {"mean": (D,) tensor, "std": (D,) tensor} or None
    columns            the CSV header (list of D strings) or None
    train_log_prob     (N,) tensor: log densities of the training rows, or None
    history            {"train_nll": [...], "val_nll": [...]} or None

The flow is rebuilt by calling the builder named in ``flow`` from
:data:`pyroflows.flows.REGISTRY` with the recorded arguments, and its
parameters are restored with a strict ``load_state_dict`` (every key, every
shape).  Model files of format version 1 (the first release; same contents,
flat keys) are read and migrated; a newer format version is refused with a
message naming the version that wrote it.

A **training checkpoint** (:func:`pyroflows.train.fit` with ``checkpoint=``)
is a dict with ``format`` ``"pyroflows-checkpoint"``, ``format_version``,
``pyroflows_version``, and the training state: ``flow`` (state dict),
``optimizer`` (Adam's state dict), ``history`` (a dict of lists), ``best``,
``best_state``, ``since_best`` and ``generator`` (the shuffling RNG state).

The command line's data files are numeric CSV tables (:func:`read_csv`,
:func:`write_csv`).

Every problem with a file (missing, a directory, empty, truncated, not a
torch file, needs unpickling, wrong format tag, missing key, wrong type,
parameters of another architecture) raises :class:`FileFormatError`, a
``ValueError`` whose message is one line, ``"PATH: problem"``; the command
line prints it as ``pyroflows: error: PATH: problem``.
"""

from __future__ import annotations

import csv
import errno
import io
import math
import os
import re
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "MODEL_FORMAT",
    "FileFormatError",
    "LoadedModel",
    "load_checkpoint",
    "load_model",
    "read_csv",
    "read_file",
    "save_checkpoint",
    "save_model",
    "write_csv",
    "write_file",
]

MODEL_FORMAT = "pyroflows-model"
MODEL_VERSION = 2
CHECKPOINT_FORMAT = "pyroflows-checkpoint"
CHECKPOINT_VERSION = 1
_FORMATS = {MODEL_FORMAT: ("model file", MODEL_VERSION),
            CHECKPOINT_FORMAT: ("training checkpoint", CHECKPOINT_VERSION)}
_PLAIN = (str, int, float, bool, type(None))


class FileFormatError(ValueError):
    """A file that cannot be read as a pyroflows model or checkpoint.

    ``str(error)`` is one line, ``"PATH: problem"``; ``error.path`` and
    ``error.problem`` hold the parts.
    """

    def __init__(self, path, problem: str):
        self.path, self.problem = str(path), " ".join(str(problem).split())
        super().__init__(f"{self.path}: {self.problem}")


def _version() -> str:
    from . import __version__

    return __version__


# ----------------------------------------------------------------------
# the container: a torch zip archive of plain data
def _check_plain(value, where: str) -> None:
    """Raise ``ValueError`` unless ``value`` is tensors/numbers/strings/lists/dicts only."""
    if isinstance(value, (torch.Tensor, *_PLAIN)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise ValueError(f"{where} has a key of type {type(k).__name__}; only str/int keys are saved")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise ValueError(f"{where} is a {type(value).__name__}; a pyroflows file holds only tensors, numbers, "
                     f"strings, lists and dicts")


def write_file(path, payload: dict) -> None:
    """Write ``payload`` (plain data only, checked first) atomically: to ``PATH.tmp``, then renamed.

    Raises ``ValueError`` for a value that is not plain data (nothing is
    written) and ``OSError`` when the file cannot be written.
    """
    _check_plain(payload, "the saved data")
    tmp = f"{os.fspath(path)}.tmp"
    try:
        parent = Path(path).resolve().parent
        if not parent.is_dir():
            raise FileNotFoundError(errno.ENOENT, f"no such directory {parent}", os.fspath(path))
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except RuntimeError as e:  # torch reports some I/O failures as RuntimeError
        raise OSError(errno.EIO, (str(e).splitlines() or [""])[0], os.fspath(path)) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _refusal(path, error: Exception) -> FileFormatError:
    """Turn the safe unpickler's refusal into a one-line reason."""
    found = re.search(r"GLOBAL (\S+)", str(error))
    what = f"imports {found.group(1)!r}" if found else "uses pickle instructions beyond plain data"
    return FileFormatError(path, f"refused: the file {what}: loading it would unpickle Python objects, which "
                                 f"can run code; a pyroflows file holds only tensors, numbers, strings, lists "
                                 f"and dicts (written by another program, or an old pyroflows checkpoint?)")


def _existing_file(path, expected: str) -> Path:
    """``path`` as a ``Path``; a one-line error if it is missing or a directory."""
    p = Path(path)
    if not p.exists():
        raise FileFormatError(path, "no such file")
    if p.is_dir():
        raise FileFormatError(path, f"is a directory, expected {expected}")
    return p


def _open_archive(path) -> dict:
    """``torch.load(weights_only=True)`` of ``path``, with every failure as a one-line error."""
    p = _existing_file(path, "a pyroflows file")
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise FileFormatError(path, f"cannot read ({e.strerror})") from None
    if not head:
        raise FileFormatError(path, "empty file, not a pyroflows file")
    if not zipfile.is_zipfile(p):
        if head.startswith(b"PK"):
            raise FileFormatError(path, "truncated or corrupted (an incomplete zip archive)")
        if head[:1] == b"\x80":
            raise FileFormatError(path, "a raw Python pickle, not a pyroflows file; refused without "
                                        "unpickling it (unpickling can run code)")
        raise FileFormatError(path, "not a pyroflows file (not a torch.save archive)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure is reported as a property of the file
        if "Weights only load failed" in str(e):
            raise _refusal(path, e) from None
        raise FileFormatError(path, f"truncated, corrupted or not a torch.save archive ({type(e).__name__})") from None


def read_file(path, kind: str) -> dict:
    """Read a pyroflows file of format ``kind`` (:data:`MODEL_FORMAT` or
    :data:`CHECKPOINT_FORMAT`) safely and check its tag and version."""
    data = _open_archive(path)
    what, newest = _FORMATS[kind]
    if kind == MODEL_FORMAT and isinstance(data, dict) and data.get("format") == "pyroflows-model-1":
        data = _migrate_model_v1(path, data)
    tag = data.get("format") if isinstance(data, dict) else None
    if tag != kind:
        if isinstance(tag, str) and tag in _FORMATS:
            raise FileFormatError(path, f"is a pyroflows {_FORMATS[tag][0]}, not a {what}")
        shown = f"format tag {tag!r}" if tag is not None else "no pyroflows format tag"
        raise FileFormatError(path, f"not a pyroflows {what} ({shown}; a file from another program?)")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise FileFormatError(path, f"'format_version' must be an int, got {type(version).__name__}")
    if version > newest:
        raise FileFormatError(path, f"written by pyroflows {data.get('pyroflows_version', '?')} in {what} "
                                    f"format {version}; this pyroflows ({_version()}) reads formats up to "
                                    f"{newest}: upgrade pyroflows")
    return data


def _field(path, data: dict, key: str, types, optional: bool = False):
    """``data[key]``, checked to be one of ``types`` (a one-line error otherwise)."""
    if key not in data:
        raise FileFormatError(path, f"missing key {key!r}")
    value = data[key]
    if value is None and optional:
        return None
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        names = " or ".join(t.__name__ for t in types)
        raise FileFormatError(path, f"{key!r} must be a {names}, got {type(value).__name__}")
    return value


def _check_state_dict(path, key: str, state, module: torch.nn.Module, arch: str) -> dict:
    """``state`` must hold exactly ``module``'s keys with the same shapes."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FileFormatError(path, f"{key!r} must be a dict of tensors")
    own = module.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or extra or shapes:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra else
                  f"{shapes[0]!r} has shape {tuple(state[shapes[0]].shape)}, expected {tuple(own[shapes[0]].shape)}")
        raise FileFormatError(path, f"{key!r} holds the parameters of a different flow architecture "
                                    f"than {arch} ({detail})")
    return state


# ----------------------------------------------------------------------
# model files
@dataclass
class LoadedModel:
    """A flow fitted to standardised data ``z = (x - mean) / std``, and the standardisation.

    ``log_prob`` and ``sample`` work in the data's original units.
    """

    flow: torch.nn.Module
    mean: torch.Tensor
    std: torch.Tensor
    columns: list[str] | None
    train_log_prob: torch.Tensor | None
    flow_name: str
    flow_kwargs: dict
    pyroflows_version: str

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log density in the original units: :math:`\\log p_z((x-m)/s) - \\sum \\log s`."""
        with torch.no_grad():
            return self.flow.log_prob((x - self.mean) / self.std) - self.std.log().sum()

    def sample(self, n: int) -> torch.Tensor:
        """``n`` rows in the original units."""
        return self.flow.sample((n,)) * self.std + self.mean


def save_model(path, flow, *, flow_name: str, flow_kwargs: dict | None = None, input_dim=None,
               mean=None, std=None, columns=None, train_log_prob=None, history=None) -> None:
    """Write ``flow`` (built as ``make_flow(flow_name, input_dim, **flow_kwargs)``) to ``path``.

    ``mean``/``std`` are the standardisation the flow was fitted under
    (default: none); ``history`` a :class:`~pyroflows.train.History` or
    ``None``.  Raises ``ValueError`` before writing anything if an argument
    is not plain data (e.g. a transformer object in ``flow_kwargs``: record
    its name instead), and ``OSError`` if the file cannot be written.
    """
    d = int(flow.event_shape[0]) if input_dim is None and len(flow.event_shape) == 1 else input_dim
    if d is None:
        raise ValueError("pass input_dim= for a flow whose event shape is not (D,)")
    dim = list(d) if isinstance(d, (tuple, list, torch.Size)) else int(d)
    standardization = None
    if mean is not None or std is not None:
        mean = torch.zeros(flow.event_shape) if mean is None else torch.as_tensor(mean).detach().cpu()
        std = torch.ones(flow.event_shape) if std is None else torch.as_tensor(std).detach().cpu()
        standardization = {"mean": mean, "std": std}
    write_file(path, {
        "format": MODEL_FORMAT, "format_version": MODEL_VERSION, "pyroflows_version": _version(),
        "flow": {"name": str(flow_name), "input_dim": dim, "kwargs": dict(flow_kwargs or {})},
        "state_dict": {k: v.detach().cpu() for k, v in flow.state_dict().items()},
        "standardization": standardization,
        "columns": None if columns is None else [str(c) for c in columns],
        "train_log_prob": None if train_log_prob is None else train_log_prob.detach().cpu(),
        "history": None if history is None else {"train_nll": list(history.train_nll),
                                                 "val_nll": list(history.val_nll)},
    })


def _migrate_model_v1(path, data: dict) -> dict:
    """Format 1 (flat keys, no version) -> format 2."""
    for key in ("flow_name", "flow_kwargs", "input_dim", "state_dict", "mean", "std"):
        _field(path, data, key, object)
    return {"format": MODEL_FORMAT, "format_version": 1, "pyroflows_version": "0.1.0 (format 1)",
            "flow": {"name": data["flow_name"], "input_dim": data["input_dim"], "kwargs": data["flow_kwargs"]},
            "state_dict": data["state_dict"], "standardization": {"mean": data["mean"], "std": data["std"]},
            "columns": data.get("columns"), "train_log_prob": data.get("train_log_prob"),
            "history": data.get("history")}


def _rebuild_flow(path, spec: dict):
    """Call the registered builder named in ``spec`` with its recorded arguments."""
    from .flows import REGISTRY

    name = _field(path, spec, "name", str)
    dim = _field(path, spec, "input_dim", (int, list))
    kwargs = _field(path, spec, "kwargs", dict)
    if isinstance(dim, list) and not all(isinstance(v, int) for v in dim):
        raise FileFormatError(path, "'input_dim' must be an int or a list of ints")
    if name not in REGISTRY:
        raise FileFormatError(path, f"names the architecture {name!r}, which this pyroflows ({_version()}) "
                                    f"does not have; known: {', '.join(sorted(REGISTRY))}")
    try:
        _check_plain(kwargs, "kwargs")
        return REGISTRY[name](tuple(dim) if isinstance(dim, list) else dim, **kwargs)
    except Exception as e:  # noqa: BLE001 - the recorded arguments are data from the file
        first = (str(e).splitlines() or [""])[0]
        raise FileFormatError(path, f"cannot rebuild {name!r} from its recorded arguments "
                                    f"({type(e).__name__}: {first})") from None


def _standardization(path, data: dict, d: int):
    std_spec = _field(path, data, "standardization", dict, optional=True)
    if std_spec is None:
        return torch.zeros(d), torch.ones(d)
    mean, std = _field(path, std_spec, "mean", torch.Tensor), _field(path, std_spec, "std", torch.Tensor)
    if mean.shape != (d,) or std.shape != (d,):
        raise FileFormatError(path, f"the standardization must have shape ({d},), got {tuple(mean.shape)} "
                                    f"and {tuple(std.shape)}")
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
        raise FileFormatError(path, "the standardization has non-finite values or a std <= 0")
    return mean.float(), std.float()


def load_model(path) -> LoadedModel:
    """Read a model file written by :func:`save_model` / ``pyroflows fit``, safely.

    Raises :class:`FileFormatError` (one line, naming the file and the
    problem) for anything that is not a complete, genuine model file.
    """
    data = read_file(path, MODEL_FORMAT)
    flow = _rebuild_flow(path, _field(path, data, "flow", dict))
    name = data["flow"]["name"]
    state = _check_state_dict(path, "state_dict", _field(path, data, "state_dict", dict), flow, repr(name))
    try:
        flow.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise FileFormatError(path, f"'state_dict' does not fit {name!r}: {' '.join(str(e).split())[:300]}") from None
    flow.eval()
    d = int(flow.event_shape[0]) if len(flow.event_shape) == 1 else int(torch.Size(flow.event_shape).numel())
    mean, std = _standardization(path, data, d)
    columns = _field(path, data, "columns", list, optional=True)
    if columns is not None and (len(columns) != d or not all(isinstance(c, str) for c in columns)):
        raise FileFormatError(path, f"'columns' must be {d} strings")
    train_lp = _field(path, data, "train_log_prob", torch.Tensor, optional=True)
    if train_lp is not None and train_lp.dim() != 1:
        raise FileFormatError(path, f"'train_log_prob' must be 1-D, got shape {tuple(train_lp.shape)}")
    return LoadedModel(flow, mean, std, columns, train_lp, name, dict(data["flow"]["kwargs"]),
                       str(data.get("pyroflows_version")))


# ----------------------------------------------------------------------
# training checkpoints
_CHECKPOINT_FIELDS = {"flow": dict, "optimizer": dict, "history": dict, "best": (float, int),
                      "since_best": int, "generator": torch.Tensor}


def save_checkpoint(path, state: dict) -> None:
    """Write a training state (plain data: see the module docstring) atomically."""
    write_file(path, {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
                      "pyroflows_version": _version(), **state})


def _check_optimizer(path, opt: dict, flow: torch.nn.Module) -> None:
    groups = opt.get("param_groups")
    if not (isinstance(opt.get("state"), dict) and isinstance(groups, list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)):
        raise FileFormatError(path, "'optimizer' is not an optimizer state dict")
    if sum(len(g["params"]) for g in groups) != sum(1 for p in flow.parameters() if p.requires_grad):
        raise FileFormatError(path, "'optimizer' was saved for a different number of parameters")


def load_checkpoint(path, flow: torch.nn.Module) -> dict:
    """Read a checkpoint safely and check it against ``flow`` (same keys and shapes)
    before anything is changed; raises :class:`FileFormatError` otherwise."""
    data = read_file(path, CHECKPOINT_FORMAT)
    for key, types in _CHECKPOINT_FIELDS.items():
        _field(path, data, key, types)
    _check_state_dict(path, "flow", data["flow"], flow, "the one being fitted")
    if _field(path, data, "best_state", dict, optional=True) is not None:
        _check_state_dict(path, "best_state", data["best_state"], flow, "the one being fitted")
    _check_optimizer(path, data["optimizer"], flow)
    history = data["history"]
    if not all(isinstance(history.get(k), list) and all(isinstance(v, (int, float)) for v in history[k])
               for k in ("train_nll", "val_nll")):
        raise FileFormatError(path, "'history' must hold the lists of numbers 'train_nll' and 'val_nll'")
    if data["generator"].dtype != torch.uint8:
        raise FileFormatError(path, "'generator' must be a uint8 tensor (a torch.Generator state)")
    return data


# ----------------------------------------------------------------------
# CSV tables (the command line's data files)
def _open_text(path: str):
    if path == "-":
        return io.StringIO(sys.stdin.read())
    p = _existing_file(path, "a CSV file")
    try:
        return open(p, newline="", encoding="utf-8")
    except OSError as e:
        raise FileFormatError(path, f"cannot read ({e.strerror})") from None


def _parse_row(path: str, lineno: int, row: list[str]) -> list[float]:
    values = []
    for v in row:
        try:
            values.append(float(v))
        except ValueError:
            raise FileFormatError(f"{path}:{lineno}", f"{v.strip()!r} is not a number") from None
    if not all(math.isfinite(v) for v in values):
        raise FileFormatError(f"{path}:{lineno}", "NaN or infinite value")
    return values


def read_csv(path: str) -> tuple[torch.Tensor, list[str] | None]:
    """Read a numeric CSV (optional header row; ``"-"`` is standard input) into an
    ``(N, D)`` float32 tensor and the header.

    Blank lines are skipped.  Raises :class:`FileFormatError` naming
    ``file:line`` for a row of the wrong length, a value that is not a number,
    or NaN/inf.
    """
    header, rows = None, []
    with _open_text(path) as f:
        try:
            for lineno, row in enumerate(csv.reader(f), start=1):
                if not row or all(not v.strip() for v in row):
                    continue
                width = len(header) if header is not None else len(rows[0]) if rows else None
                if width is not None and len(row) != width:
                    raise FileFormatError(f"{path}:{lineno}", f"expected {width} values, got {len(row)}")
                if header is None and not rows and not all(_is_float(v) for v in row):
                    header = [v.strip() for v in row]
                    continue
                rows.append(_parse_row(path, lineno, row))
        except UnicodeDecodeError:
            raise FileFormatError(path, "not a text CSV file (cannot decode as UTF-8)") from None
        except csv.Error as e:
            raise FileFormatError(path, f"malformed CSV ({e})") from None
    if not rows:
        raise FileFormatError(path, "no data rows")
    return torch.tensor(rows, dtype=torch.float32), header


def _is_float(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def write_csv(rows, header: list[str] | None, out: str | None, fmt: str = "{:.6g}") -> None:
    """Write ``rows`` (floats formatted with ``fmt``) with an optional header to the
    file ``out`` or, for ``None``/``"-"``, standard output.  Raises ``OSError``."""
    def write(f):
        w = csv.writer(f, lineterminator="\n")
        if header:
            w.writerow(header)
        for r in rows:
            w.writerow([fmt.format(v) if isinstance(v, float) else v for v in r])

    if out in (None, "-"):
        write(sys.stdout)
        sys.stdout.flush()
        return
    with open(out, "w", newline="", encoding="utf-8") as f:
        write(f)

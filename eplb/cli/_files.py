"""Files of the command line: expert loads in, placements out and back in.

Loads: ``.npy``, ``.npz``, ``.json``, ``.csv``, ``.pt``/``.pth``, shaped
``[layers, experts]`` or a history ``[steps, layers, experts]`` (summed over the
last ``window`` steps). Placements: ``.json`` or ``.npz`` with ``phy2log``,
``log2phy``, ``logcnt`` and the config that made them; a bare ``.npy`` is read
as ``phy2log``. Every problem with a file raises :class:`FileError`, whose
message names the file.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["LOAD_SUFFIXES", "FileError", "host", "read_load", "read_placement", "write_placement"]

LOAD_SUFFIXES = (".npy", ".npz", ".json", ".csv", ".pt", ".pth")
# Keys tried, in order, when a file holds several arrays (SGLang's dumps use "logical_count").
LOAD_KEYS = ("load", "weight", "logical_count", "counts", "expert_load")
FORMAT = "eplb.placement/1"


class FileError(ValueError):
    """A file that cannot be read as asked; the message says which file and why."""


def _pick(path: Path, items: dict[str, Any], key: str | None, what: str) -> Any:
    """The entry ``key`` of a multi-array file, or the only one, or the first of LOAD_KEYS present."""
    if key is not None:
        if key not in items:
            raise FileError(f"{path}: no {what} named {key!r} (it has: {', '.join(items) or 'nothing'})")
        return items[key]
    if len(items) == 1:
        return next(iter(items.values()))
    for name in LOAD_KEYS:
        if name in items:
            return items[name]
    raise FileError(f"{path}: holds several {what}s ({', '.join(items)}); choose one with --key")


def _read_raw(path: Path, key: str | None) -> Any:
    suffix = path.suffix.lower()
    if key is not None and suffix in (".npy", ".csv"):
        raise FileError(f"{path}: --key picks an array of a .npz, .json or .pt file; a {suffix} file holds one")
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix == ".npz":
        if not zipfile.is_zipfile(path):
            raise FileError(f"{path}: not a .npz file (npz files are zip archives)")
        with np.load(path, allow_pickle=False) as data:
            return _pick(path, {name: data[name] for name in data.files}, key, "array")
    if suffix == ".json":
        with path.open() as f:
            data = json.load(f)
        return _pick(path, data, key, "entry") if isinstance(data, dict) else data
    if suffix == ".csv":
        text = path.read_text().strip().splitlines()
        rows = [line for line in text if line.strip() and not line.lstrip().startswith("#")]
        if rows and not _numeric_row(rows[0]):
            rows = rows[1:]  # a header
        return np.loadtxt(rows, delimiter=",", ndmin=2)
    if suffix in (".pt", ".pth"):
        try:
            import torch
        except ImportError:
            raise FileError(f"{path}: reading {suffix} files needs torch (pip install torch)") from None
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            raise FileError(f"{path}: not a file of tensors saved with torch.save (torch.load refuses it)") from None
        if isinstance(data, dict):
            data = _pick(path, data, key, "tensor")
        if isinstance(data, torch.Tensor):
            data = data.detach().float().numpy() if data.dtype.is_floating_point else data.numpy()
        return data
    raise FileError(f"{path}: unknown file type {suffix or '(none)'!r}; use one of {', '.join(LOAD_SUFFIXES)}")


def _detail(err: Exception) -> str:
    """The first line of a parser's complaint, short."""
    text = str(err).strip()
    if "inhomogeneous" in text:
        return "its rows have different lengths"
    line = text.splitlines()[0] if text else type(err).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def _numeric_row(line: str) -> bool:
    try:
        [float(cell) for cell in line.split(",")]
    except ValueError:
        return False
    return True


def read_load(path: str | Path, *, key: str | None = None, window: int | None = None) -> np.ndarray:
    """Expert loads ``[L, E]`` from ``path``; a history ``[steps, L, E]`` is summed over its last ``window`` steps.

    Parameters
    ----------
    path : str or Path
        ``.npy``, ``.npz``, ``.json``, ``.csv``, ``.pt`` or ``.pth``.
    key : str, optional
        Array to take from a file that holds several (``.npz``, a JSON object,
        a dict saved with torch); default: the only one, else the first of
        ``load``, ``weight``, ``logical_count``, ``counts``, ``expert_load``.
    window : int, optional
        Steps of a history to sum (the last ones); default: all.

    Returns
    -------
    numpy.ndarray [L, E]
        Integer loads as int64, floating loads as stored (float64 for JSON/CSV).
    """
    path = Path(path)
    if not path.is_file():
        raise FileError(f"{path}: no such file")
    try:
        raw = _read_raw(path, key)
        array = np.asarray(raw)
    except FileError:
        raise
    except Exception as err:  # whatever the parser says about a user's file, as one line
        raise FileError(f"{path}: cannot read it as {path.suffix.lower()} numbers: {_detail(err)}") from None
    if array.dtype == object or array.dtype.kind not in "iuf":
        raise FileError(f"{path}: expected numbers, found {array.dtype} data")
    if array.ndim == 3:
        steps = array.shape[0]
        if window is not None:
            if not 1 <= window <= steps:
                raise FileError(f"{path}: --window={window} must be between 1 and the {steps} steps of the history")
            array = array[steps - window :]
        array = array.sum(axis=0, dtype=np.int64 if array.dtype.kind in "iu" else np.float64)
    elif array.ndim == 2:
        if window is not None:
            raise FileError(
                f"{path}: --window needs a history [steps, layers, experts]; this holds {list(array.shape)}"
            )
    else:
        raise FileError(
            f"{path}: expected [layers, experts] or [steps, layers, experts], found shape {list(array.shape)}"
        )
    if 0 in array.shape:
        raise FileError(f"{path}: empty load, shape {list(array.shape)}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise FileError(f"{path}: the load holds NaN or infinity")
    if (array < 0).any():
        raise FileError(f"{path}: the load holds negative values")
    return array.astype(np.int64) if array.dtype.kind in "iu" else array


def write_placement(path: str | Path, placement: Any, config: dict[str, Any], extra: dict[str, Any]) -> Path:
    """Write ``placement`` (``phy2log``, ``log2phy``, ``logcnt``) with its config as ``.json`` or ``.npz``.

    Parameters
    ----------
    path : str or Path
        Output file, ``.json`` or ``.npz``.
    placement : Placement
        Arrays of any backend.
    config : dict
        ``num_replicas``, ``num_groups``, ``num_nodes``, ``num_gpus`` and the options used.
    extra : dict
        JSON-serialisable facts to keep beside it (metrics, the load's file).

    Returns
    -------
    Path
        The file written.
    """
    path = Path(path)
    arrays = {name: host(getattr(placement, name)) for name in ("phy2log", "log2phy", "logcnt")}
    suffix = path.suffix.lower()
    if suffix not in (".json", ".npz"):
        raise FileError(f"{path}: placements are written as .json or .npz, not {suffix or '(none)'!r}")
    from eplb import __version__

    header = {"format": FORMAT, "eplb_version": __version__, "config": config, **extra}
    try:
        if suffix == ".json":
            with path.open("w") as f:
                json.dump({**header, **{k: v.tolist() for k, v in arrays.items()}}, f, separators=(",", ":"))
                f.write("\n")
        else:
            np.savez_compressed(path, **arrays, header=np.array(json.dumps(header)))
    except OSError as err:
        raise FileError(f"{path}: cannot write: {err.strerror or err}") from None
    return path


def host(x: Any) -> np.ndarray:
    """An integer array of any backend as an int64 numpy array."""
    if hasattr(x, "detach"):  # torch
        x = x.detach().cpu()
    return np.asarray(x).astype(np.int64)


def read_placement(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """``(phy2log [L, R] int64, config)`` from a file :func:`write_placement` wrote, or a bare ``phy2log`` ``.npy``.

    Parameters
    ----------
    path : str or Path
        ``.json``, ``.npz`` or ``.npy``.

    Returns
    -------
    phy2log : numpy.ndarray [L, R], int64
        Logical expert of each slot.
    config : dict
        The config stored with it (empty for a bare array).
    """
    path = Path(path)
    if not path.is_file():
        raise FileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            with path.open() as f:
                data = json.load(f)
            if not isinstance(data, dict) or "phy2log" not in data:
                raise FileError(f"{path}: not a placement file (no 'phy2log' entry)")
            phy2log, config = np.asarray(data["phy2log"]), data.get("config") or {}
        elif suffix == ".npz":
            if not zipfile.is_zipfile(path):
                raise FileError(f"{path}: not a .npz file (npz files are zip archives)")
            with np.load(path, allow_pickle=False) as data:
                if "phy2log" not in data.files:
                    raise FileError(f"{path}: not a placement file (no 'phy2log' array)")
                phy2log = data["phy2log"]
                config = json.loads(str(data["header"])).get("config", {}) if "header" in data.files else {}
        elif suffix == ".npy":
            phy2log, config = np.load(path, allow_pickle=False), {}
        else:
            raise FileError(f"{path}: placements are read from .json, .npz or .npy, not {suffix or '(none)'!r}")
    except FileError:
        raise
    except Exception as err:  # whatever the parser says about a user's file, as one line
        raise FileError(f"{path}: cannot read the placement: {_detail(err)}") from None
    if phy2log.dtype == object or phy2log.dtype.kind not in "iu" or phy2log.ndim != 2 or 0 in phy2log.shape:
        raise FileError(
            f"{path}: phy2log must be a non-empty integer [layers, slots] array, "
            f"got {phy2log.dtype} {list(phy2log.shape)}"
        )
    if not isinstance(config, dict):
        raise FileError(f"{path}: 'config' must be an object")
    return phy2log.astype(np.int64), config

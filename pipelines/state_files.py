"""Training state that loads without running code: tensors in safetensors, everything else in JSON.

A run directory may sit on a shared volume, so whoever can write it must not be able to act as
whoever resumes it. A pickle can call anything while it loads; these files cannot:

- ``save_tree(tree, directory, stem)`` writes ``stem.json`` (the structure: dicts, lists, tuples,
  numbers, strings, small numpy arrays as lists) and ``stem.safetensors`` (every tensor, named by
  its place in the tree).
- ``load_tree(directory, stem)`` reads them back; a file that is not what ``save_tree`` wrote is
  refused with its name.
- ``weights_only_loads()``: while it is open, every ``torch.load`` in the process reads tensors
  and an allow-list of plain types only (``FORCE_WEIGHTS_ONLY``) — DeepSpeed's own checkpoint
  files, and training states written before this module, load that way or not at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.errors import DataError
from storage import files

FORMAT = "forgetless-state-1"
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_MARK = "$"  # a dict key starting with it is this format's own


def save_tree(tree: Any, directory: str | Path, stem: str) -> None:
    """Write ``tree`` as ``directory/stem.json`` and ``directory/stem.safetensors``."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def encode(value: Any, where: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().to("cpu").contiguous()
            if tensor.data_ptr() in seen or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
                tensor = tensor.clone()  # safetensors stores no views and no storage twice
            seen.add(tensor.data_ptr())
            tensors[where] = tensor
            return {f"{_MARK}tensor": where}
        if isinstance(value, np.ndarray):
            return {f"{_MARK}ndarray": value.tolist(), "dtype": value.dtype.str, "shape": list(value.shape)}
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, tuple):
            return {f"{_MARK}tuple": [encode(v, f"{where}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [encode(v, f"{where}.{i}") for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) and not k.startswith(_MARK) for k in value):
                return {k: encode(v, f"{where}.{k}") for k, v in value.items()}
            return {f"{_MARK}items": [[encode(k, f"{where}.k{i}"), encode(v, f"{where}.{i}")]
                                      for i, (k, v) in enumerate(value.items())]}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"training state at {where or 'the top'}: {type(value).__name__} cannot be saved "
                        "without pickling (tensors, arrays, numbers, strings, lists, tuples and dicts can)")

    directory = Path(directory)
    structure = {"format": FORMAT, "tree": encode(tree, "")}
    for suffix in (".safetensors", ".json"):  # durable once the state's files are fsynced (fsync_tree)
        files.observe("write", directory / f"{stem}{suffix}")
    save_file(tensors, str(directory / f"{stem}.safetensors"))
    (directory / f"{stem}.json").write_text(json.dumps(structure), encoding="utf-8")


def load_tree(directory: str | Path, stem: str, *, device: torch.device | str = "cpu") -> Any:
    """What ``save_tree`` wrote, its tensors on ``device``.

    Raises:
        DataError: either file is missing, unreadable or not in this format (named).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    structure_file, tensor_file = directory / f"{stem}.json", directory / f"{stem}.safetensors"
    try:
        structure = json.loads(structure_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{structure_file}: unreadable training state ({exc}); the run cannot resume from it") from None
    if not isinstance(structure, dict) or structure.get("format") != FORMAT:
        raise DataError(f"{structure_file}: not a Forgetless training state (format {FORMAT} expected)")
    try:
        tensors = load_file(str(tensor_file), device=str(device))
    except (OSError, SafetensorError) as exc:
        raise DataError(f"{tensor_file}: unreadable training state ({exc}); the run cannot resume from it") from None

    def decode(value: Any) -> Any:
        if isinstance(value, list):
            return [decode(v) for v in value]
        if not isinstance(value, dict):
            return value
        if f"{_MARK}tensor" in value:
            if value[f"{_MARK}tensor"] not in tensors:
                raise DataError(f"{tensor_file}: has no tensor {value[f'{_MARK}tensor']!r} that {structure_file} names")
            return tensors[value[f"{_MARK}tensor"]]
        if f"{_MARK}ndarray" in value:
            return np.asarray(value[f"{_MARK}ndarray"], dtype=np.dtype(str(value["dtype"]))).reshape(value["shape"])
        if f"{_MARK}tuple" in value:
            return tuple(decode(v) for v in value[f"{_MARK}tuple"])
        if f"{_MARK}items" in value:
            return {_hashable(decode(k)): decode(v) for k, v in value[f"{_MARK}items"]}
        return {k: decode(v) for k, v in value.items()}

    try:
        return decode(structure["tree"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{structure_file}: not a Forgetless training state ({type(exc).__name__}: {exc})") from None


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def _allowed_globals() -> list[Any]:
    """The plain types DeepSpeed's checkpoint files (ZeRO 1-3) and earlier training states hold."""
    allowed: list[Any] = [np.ndarray, np.dtype, np.dtypes.UInt32DType, np.dtypes.Float64DType]
    reconstruct = getattr(getattr(np, "_core", np.core), "multiarray")._reconstruct
    allowed.append(reconstruct)
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    except ImportError:  # an older or newer DeepSpeed: its types are refused, by name
        pass
    return allowed


def refuse_unsafe_pickles(directory: str | Path) -> None:
    """Look inside every ``*.pt`` file under ``directory`` (without loading it) and refuse one that
    names any type beyond tensors and the allow-list: such a file could run code when loaded.

    Raises:
        DataError: naming the file and what it holds.
    """
    allowed = {f"{g.__module__}.{g.__name__}" for g in _allowed_globals()}
    for path in sorted(Path(directory).rglob("*.pt")):
        if path.is_symlink() or not path.is_file():
            raise DataError(f"{path}: refused: a training state file must be a plain file, not a link")
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as exc:  # noqa: BLE001 - a file torch cannot even scan is refused the same way
            raise DataError(f"{path}: unreadable training state file ({type(exc).__name__}: {exc})") from None
        unsafe = sorted(set(found) - allowed)
        if unsafe:
            raise DataError(f"{path}: refused: it holds {', '.join(unsafe[:5])}, which loading would call (it may "
                            "have been tampered with). Resume from a copy you trust, or start over")


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside reads weights and the allow-listed types only, whatever its
    caller asked for (DeepSpeed passes ``weights_only=False``); anything else fails to load
    instead of running. A refused file raises ``DataError`` naming what it held."""
    before = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            yield
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"training state refused: a file in it holds more than tensors ({first[:300]}); it may "
                        "have been tampered with, and loading it could run code. Resume from a copy you trust, "
                        "or start over") from None
    finally:
        if before is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = before

"""Reading checkpoints that may come from strangers: tensors and plain containers only.

Unpickling can run any code a file asks for. Torch files are read with
``torch.load(weights_only=True)``, safetensors files with safetensors, and a
``torch.distributed.checkpoint`` folder's metadata with an unpickler that
admits DCP's own metadata classes only (DCP itself unpickles everything);
``weights_only=False`` opts in to full unpickling for a trusted source."""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["DCPFolder", "load_safetensors", "load_torch_file", "refused"]


def refused(where: str, why: str) -> pickle.UnpicklingError:
    """The error for a checkpoint that safe loading does not read."""
    return pickle.UnpicklingError(
        f"{where} needs more than loading tensors and plain containers allows ({why}); unpickling it could run "
        "any code the file holds, so it is not done by default. For a checkpoint from a source you trust, pass "
        "weights_only=False (python -m triton_ema.export: --no-weights-only)")


def _why(error: Exception) -> str:
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    if found:
        return f"it holds {found.group(1)}"
    lines = [line.strip() for line in str(error).splitlines() if "WeightsUnpickler error" in line]
    return lines[0].removeprefix("WeightsUnpickler error: ") if lines else str(error).splitlines()[0]


def load_torch_file(path: Path, weights_only: bool) -> Any:
    """A ``torch.save`` file, on the CPU; tensors memory-mapped where the format allows (read as they are used)."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
        except RuntimeError as error:  # a file of the legacy (not zip) format cannot be mapped
            if "mmap" not in str(error):
                raise
            return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as error:
        if not weights_only:
            raise
        raise refused(str(path), _why(error)) from error


def load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as error:
        raise ImportError(f"reading {path} needs safetensors: the export extra (in a clone, "
                          "pip install -c constraints.txt -e '.[export]')") from error
    return load_file(path, device="cpu")


# --- torch.distributed.checkpoint folders, read whole in one process -----------------------------

_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata``: its dataclasses, sizes, dtypes and paths, nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it holds {module}.{name}")


class DCPFolder:
    """The keys of a DCP checkpoint (each a path of nested keys, as it was saved), and their values on demand."""

    def __init__(self, path: Path, weights_only: bool) -> None:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path, self.weights_only = path, weights_only
        self._reader = (FileSystemReader if not weights_only else _safe_reader_type())(path)
        metadata = self._reader.read_metadata()
        self.metadata = metadata.state_dict_metadata
        mappings = metadata.planner_data or {}
        self.paths: dict[tuple[str, ...], str] = {tuple(mappings.get(key, (key,))): key for key in self.metadata}
        self.is_tensor = {key: isinstance(m, TensorStorageMetadata) for key, m in self.metadata.items()}

    def read(self, paths: Iterable[tuple[str, ...]]) -> dict[tuple[str, ...], Any]:
        """The values at ``paths``: tensors whole (from the shards of any world size), other values as saved."""
        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

        keys = {path: self.paths[path] for path in paths}
        state: dict[str, Any] = {}
        for key in keys.values():
            m = self.metadata[key]
            state[key] = torch.empty(m.size, dtype=m.properties.dtype) if self.is_tensor[key] else None
        planner = (DefaultLoadPlanner if not self.weights_only else _safe_planner_type())(
            flatten_state_dict=False, flatten_sharded_tensors=False)  # values land in `state` itself
        with warnings.catch_warnings():  # one process on purpose: DCP says so each time
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            try:
                load(state, storage_reader=self._reader, planner=planner, no_dist=True)
            except CheckpointException as error:  # a BaseException, holding the reading's own errors
                causes = [e for e, _ in error.failures.values()]
                refusals = [e for e in causes if isinstance(e, pickle.UnpicklingError)]
                if refusals:
                    raise refusals[0] from error
                raise ValueError(f"{self.path} is not a readable DCP checkpoint: "
                                 + "; ".join(f"{type(e).__name__}: {e}" for e in causes)) from error
        return {path: state[key] for path, key in keys.items()}


def _safe_reader_type() -> type:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """``FileSystemReader`` whose metadata is read by the metadata unpickler."""

        def read_metadata(self, *args: Any, **kwargs: Any):
            file = Path(self.path) / ".metadata"
            try:
                with file.open("rb") as stream:
                    metadata = _MetadataUnpickler(stream).load()
            except pickle.UnpicklingError as error:
                raise refused(str(file), str(error)) from error
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader


def _safe_planner_type() -> type:
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafePlanner(DefaultLoadPlanner):
        """Values that are not tensors (step counts, names) read with ``weights_only=True``."""

        def load_bytes(self, read_item, value) -> None:
            try:
                self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as error:
                raise refused(f"the DCP entry {read_item.dest_index.fqn}", _why(error)) from error

    return SafePlanner

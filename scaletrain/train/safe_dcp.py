"""Reading DCP checkpoints without running code from them.

A DCP checkpoint folder holds `.metadata` (a pickle of DCP's `Metadata`) and `*.distcp` data
files. torch's `FileSystemReader` reads `.metadata` with plain `pickle.load`, and its default
planner reads every non-tensor value ("bytes" items: the optimizer's hyperparameters, any
Python object in the state dict) with `torch.load(weights_only=False)`; either runs whatever a
crafted file asks for. Here:

- `.metadata` goes through `MetadataUnpickler`, which builds only the classes a DCP metadata
  file really contains (listed in `_ALLOWED`, read from the pickle opcodes of real saves) plus
  plain containers, numbers, strings and torch dtypes; any other global (a function,
  `os.system`, a class of another module) is refused before it is looked up;
- "bytes" items are read with `torch.load(weights_only=True)` (tensors, plain containers and
  numbers only);
- tensors were already read with `torch.load(weights_only=True)` by DCP itself.

An object the checkpoint may not hold raises CheckpointError naming the file and the global.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from scaletrain.errors import CheckpointError

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
# (module, name) of every global the `.metadata` of scaletrain checkpoints holds (read from the
# pickle opcodes of single-process and FSDP saves, torch 2.13): DCP's own records, torch.Size,
# a layout by name, the folder path the save was written to. Dtypes are admitted separately.
_ALLOWED = {
    *((_DCP_METADATA, n) for n in ("Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata",
                                   "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                                   "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
}
_REFUSAL = "refusing to load it (loading a checkpoint runs no code)"


def _refused(what: str) -> str:
    return f"{what}, which a checkpoint written by scaletrain never holds; {_REFUSAL}."


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata: only the globals in `_ALLOWED` and torch dtypes are built."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it names the global {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("it holds a persistent reference")


def read_metadata(path: str | Path) -> Metadata:
    """The DCP metadata of the checkpoint folder `path` (or of a `.metadata` file), read with
    `MetadataUnpickler`. CheckpointError if it is missing, damaged or holds other objects."""
    path = Path(path)
    file = path / ".metadata" if path.is_dir() else path
    try:
        with open(file, "rb") as f:
            metadata = MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no DCP metadata file ({file.name}).") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{file}: {_refused(str(e))}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise CheckpointError(f"{file} is damaged ({type(e).__name__}: {e}).") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{file}: {_refused(f'it holds a {type(metadata).__name__}, not DCP metadata')}")
    return metadata


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata comes from `read_metadata` (read once, then reused)."""

    def __init__(self, path: str | Path):
        super().__init__(str(path))
        self._metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # rank-local metadata: scaletrain never writes it
            raise CheckpointError(f"checkpoint {self.path} has no global .metadata file.")
        if self._metadata is None:
            self._metadata = read_metadata(Path(self.path))
        if self._metadata.storage_meta is None:
            self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


class SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that reads non-tensor ("bytes") values with weights_only=True."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(_refused(f"the stored value {fqn} is not plain data ({first})")) from None
        if self.flatten_state_dict:  # placed as DefaultLoadPlanner.load_bytes does
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj

"""Tensor files without torch: read ``torch.save`` zips and safetensors lazily, write safetensors streaming.

The checkpoint tools (consolidate, merge) only move bytes and do a little fp32 math, so they use numpy
and never import torch (whose import alone costs about half a gigabyte of RSS here). Inputs are
memory-mapped; each tensor is read on demand and the mapped pages are released again
(:meth:`MappedFile.release`), so memory does not grow with the number or size of input files.

Dtypes are safetensors names (``F32``, ``BF16``, ...). numpy has no bfloat16: such tensors are held as
their raw uint16 bits (:class:`Array`), which is exact for slicing, concatenation and permutation;
:func:`to_f32` / :func:`from_f32` convert for math (round to nearest even, as torch does).
"""

from __future__ import annotations

import errno
import io
import json
import mmap
import os
import pickle
import struct
import sys
import uuid
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import TrnftError

# safetensors dtype -> numpy storage dtype (BF16 kept as raw 16-bit words)
STORAGE = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
# torch.save storage classes and torch dtype names -> safetensors dtype
TORCH_STORAGES = {
    "DoubleStorage": "F64",
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
}
TORCH_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}
ITEMSIZE = {name: np.dtype(np_type).itemsize for name, np_type in STORAGE.items()}


@dataclass
class Array:
    """A tensor as numpy storage plus its dtype name (BF16 as uint16 bits)."""

    data: np.ndarray
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def nbytes(self) -> int:
        return int(self.data.size) * ITEMSIZE[self.dtype]

    def with_data(self, data: np.ndarray) -> Array:
        return Array(data, self.dtype)


# Index of a float32's high 16 bits when it is viewed as two uint16 (the bf16 bits).
_HIGH = 1 if sys.byteorder == "little" else 0


def to_f32(a: Array) -> np.ndarray:
    """float32 values of ``a`` (exact for F16, BF16 and F32); always a new array."""
    if a.dtype == "BF16":
        # bf16 is the high half of a float32: write the halves side by side (one pass, no shifts)
        halves = np.zeros((*a.data.shape, 2), dtype=np.uint16)
        halves[..., _HIGH] = a.data
        return halves.view(np.float32).reshape(a.data.shape)
    return a.data.astype(np.float32)


def from_f32(x: np.ndarray, dtype: str) -> Array:
    """Cast float32 values to ``dtype`` with round-to-nearest-even (NaN stays NaN)."""
    x = np.asarray(x, dtype=np.float32, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
    if dtype == "BF16":
        flat = x.reshape(-1)
        bits = flat.view(np.uint32)
        rounded = bits >> 16
        rounded &= 1  # the lowest kept bit breaks ties to even
        rounded += bits
        rounded += 0x7FFF
        out = np.ascontiguousarray(rounded.view(np.uint16)[_HIGH::2])
        with np.errstate(invalid="ignore", over="ignore"):
            screen = np.isfinite(flat.sum())
        if not screen:  # cheap screen; rounding could turn a NaN into an infinity
            nan = np.isnan(flat)
            out[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
        return Array(out.reshape(x.shape), "BF16")
    return Array(x.astype(STORAGE[dtype]), dtype)


# --------------------------------------------------------------------------------------------------
# Memory-mapped files


class MappedFile:
    """A read-only mapping of a whole file, made on first use; :meth:`release` gives its memory back.

    The mapping (and the file descriptor it holds) exists only while the file is being read, so a
    checkpoint of many thousand files (xser writes one per tensor) never has them all open at once.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.size = os.stat(self.path).st_size
        self._mm: mmap.mmap | None = None

    def _mapping(self) -> mmap.mmap | None:
        if self._mm is None and self.size:
            with open(self.path, "rb") as fh:
                self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def view(self, offset: int, count: int, np_dtype: Any) -> np.ndarray:
        mm = self._mapping()
        if mm is None or offset + count * np.dtype(np_dtype).itemsize > self.size:
            raise TrnftError(
                f"{self.path}: truncated (needs {offset + count * np.dtype(np_dtype).itemsize} bytes)"
            )
        return np.frombuffer(mm, dtype=np_dtype, count=count, offset=offset)

    def read(self, offset: int, length: int) -> bytes:
        mm = self._mapping()
        assert mm is not None
        return mm[offset : offset + length]

    def release(self) -> None:
        """Drop this process's resident pages of the file (they stay in the page cache) and unmap it
        unless an array still points into it (then it is unmapped at a later release)."""
        if self._mm is None:
            return
        if hasattr(self._mm, "madvise"):
            self._mm.madvise(mmap.MADV_DONTNEED)
        try:
            self._mm.close()
            self._mm = None
        except BufferError:
            pass


# --------------------------------------------------------------------------------------------------
# torch.save zip files


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class _StorageType:
    dtype: str


class TensorRef:
    """Stands in for torch_xla's ``TensorReference`` (xser shards); only ``tid`` matters."""

    def __init__(self, tid: int | None = None) -> None:
        self.tid = tid

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.tid = state.get("tid")


@dataclass
class LazyTensor:
    """A tensor inside a torch.save zip, read on demand."""

    file: TorchFile
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> str:
        return self.storage.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * ITEMSIZE[self.dtype]

    def _contiguous(self) -> bool:
        expected, acc = [], 1
        for dim in reversed(self.shape):
            expected.append(acc)
            acc *= dim
        return tuple(reversed(expected)) == tuple(self.stride) or int(np.prod(self.shape)) <= 1

    def read(self) -> Array:
        """The whole tensor (a view of the mapped file when contiguous)."""
        storage = self.file.storage_array(self.storage)
        if self._contiguous():
            n = int(np.prod(self.shape, dtype=np.int64))
            return Array(storage[self.offset : self.offset + n].reshape(self.shape), self.dtype)
        item = storage.itemsize
        view = np.lib.stride_tricks.as_strided(
            storage[self.offset :], shape=self.shape, strides=[s * item for s in self.stride], writeable=False
        )
        return Array(np.ascontiguousarray(view), self.dtype)

    def read_rows(self, start: int, stop: int) -> Array:
        """Rows ``start:stop`` of the first dimension, reading only those bytes when contiguous."""
        if not self._contiguous():
            return self.read().with_data(self.read().data[start:stop])
        row = int(np.prod(self.shape[1:], dtype=np.int64))
        storage = self.file.storage_array(self.storage)
        begin = self.offset + start * row
        return Array(
            storage[begin : begin + (stop - start) * row].reshape((stop - start, *self.shape[1:])), self.dtype
        )


class _TorchUnpickler(pickle.Unpickler):
    """Unpickles torch.save data without torch: only the globals torch state dicts use are allowed."""

    def __init__(self, data: bytes, file: TorchFile | None, source: Path) -> None:
        super().__init__(io.BytesIO(data))
        self._file = file
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, requires_grad, hooks: data
        if module == "torch._utils" and name == "_rebuild_parameter_with_state":
            return lambda data, requires_grad, hooks, state: data
        if module == "torch" and name in TORCH_STORAGES:
            return _StorageType(TORCH_STORAGES[name])
        if module == "torch" and name in TORCH_DTYPES:
            return TORCH_DTYPES[name]
        if module == "torch" and name == "Size":
            return tuple
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch_xla.utils.serialization", "TensorReference"):
            return TensorRef
        if (module, name) == ("copyreg", "_reconstructor"):
            return _reconstruct
        if module in ("builtins", "__builtin__") and name in _BUILTINS:
            return _BUILTINS[name]
        raise pickle.UnpicklingError(
            f"{self._source}: unexpected global {module}.{name} in a checkpoint file"
        )

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"{self._source}: unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else storage_type
        return _StorageRef(str(key), dtype, int(numel))

    def _rebuild_tensor(
        self, storage: _StorageRef, offset: int, size: tuple, stride: tuple, *rest: Any
    ) -> LazyTensor:
        assert self._file is not None, "tensor data in a pickle without storages"
        return LazyTensor(
            self._file, storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride)
        )


# Protocol-2 pickles name the builtins module "__builtin__".
_BUILTINS = {"object": object, "set": set, "frozenset": frozenset, "slice": slice}


def _reconstruct(cls: type, base: type, state: Any) -> Any:
    return cls.__new__(cls)


class TorchFile:
    """A ``torch.save`` zip file: its pickled object with lazy tensors, storages read from the mapping."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with zipfile.ZipFile(self.path) as zf:
                infos = zf.infolist()
                pkl = next(
                    (i for i in infos if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"), None
                )
                if pkl is None:
                    raise TrnftError(f"{self.path}: not a torch.save file (no data.pkl)")
                self._prefix = pkl.filename[: -len("data.pkl")]
                self._pickle = zf.read(pkl)
                self._entries = {i.filename: i for i in infos}
        except zipfile.BadZipFile as exc:
            raise TrnftError(
                f"{self.path}: not a zip file; a truncated or legacy-format torch.save file"
            ) from exc
        self._mapped = MappedFile(self.path)
        self._offsets: dict[str, int] = {}
        self._checked: set[str] = set()

    def load(self) -> Any:
        return _TorchUnpickler(self._pickle, self, self.path).load()

    def _data_offset(self, name: str) -> int:
        if name not in self._offsets:
            info = self._entries.get(name)
            if info is None:
                raise TrnftError(f"{self.path}: missing storage {name}")
            if info.compress_type != zipfile.ZIP_STORED:
                raise TrnftError(f"{self.path}: storage {name} is compressed; torch.save never does that")
            header = self._mapped.read(info.header_offset, 30)
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            self._offsets[name] = info.header_offset + 30 + name_len + extra_len
        return self._offsets[name]

    def storage_array(self, storage: _StorageRef) -> np.ndarray:
        name = f"{self._prefix}data/{storage.key}"
        offset = self._data_offset(name)
        self._check_crc(name, offset)
        return self._mapped.view(offset, storage.numel, STORAGE[storage.dtype])

    def _check_crc(self, name: str, offset: int) -> None:
        """The zip member's CRC32 against its bytes, once per storage: a flipped bit is refused, naming
        the file, instead of becoming a wrong weight (torch.load itself never checks it)."""
        if name in self._checked:
            return
        info = self._entries[name]
        data = self._mapped.view(offset, info.file_size, np.uint8)
        actual = zlib.crc32(data) & 0xFFFFFFFF
        if actual != info.CRC:
            raise TrnftError(
                f"{self.path}: storage {name.rsplit('/', 1)[-1]} fails its CRC32 check (recorded {info.CRC:08x}, "
                f"read {actual:08x}); the file is corrupt: use another checkpoint or rewrite this one"
            )
        self._checked.add(name)

    def release(self) -> None:
        self._mapped.release()


def load_pickle_only(path: str | Path) -> Any:
    """A ``torch.save`` file that holds no tensors (metadata, xser references), read without torch."""
    tf = TorchFile(path)
    return tf.load()


# --------------------------------------------------------------------------------------------------
# safetensors

INDEX = "model.safetensors.index.json"


class SafetensorsFile:
    """Lazy reader: header parsed once, tensors are views of the mapped file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._mapped = MappedFile(self.path)
        if self._mapped.size < 8:
            raise TrnftError(f"{self.path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", self._mapped.read(0, 8))
        try:
            header = json.loads(self._mapped.read(8, n))
        except (ValueError, UnicodeDecodeError) as exc:
            raise TrnftError(f"{self.path}: not a safetensors file (bad header)") from exc
        if not isinstance(header, dict):
            raise TrnftError(f"{self.path}: not a safetensors file (the header is not a JSON object)")
        self.metadata = header.pop("__metadata__", {}) or {}
        self.header = header
        self._data_start = 8 + n
        self._check_layout()

    def _check_layout(self) -> None:
        """The header must index the data region exactly: each tensor's bytes match its dtype and shape,
        tensors neither overlap nor leave holes, and the file ends where the last one does (the format's
        own rules), so a truncated or mis-written file is refused before anything is read from it."""
        end = 0
        entries = []
        for name, entry in self.header.items():
            try:
                dtype, shape, (begin, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
                count = int(np.prod(shape, dtype=np.int64))
            except (KeyError, TypeError, ValueError) as exc:
                raise TrnftError(f"{self.path}: header entry {name} is malformed ({exc})") from exc
            if dtype in ITEMSIZE and stop - begin != count * ITEMSIZE[dtype]:
                raise TrnftError(
                    f"{self.path}: tensor {name} takes {stop - begin} bytes but {dtype} {list(shape)} needs "
                    f"{count * ITEMSIZE[dtype]}; the file is corrupt"
                )
            entries.append((begin, stop, name))
        for begin, stop, name in sorted(entries):
            if begin != end:
                raise TrnftError(
                    f"{self.path}: tensor {name} starts at byte {begin}, expected {end}; the file is corrupt"
                )
            end = stop
        if self._data_start + end != self._mapped.size:
            raise TrnftError(
                f"{self.path}: {self._mapped.size} bytes, the header describes {self._data_start + end}; "
                "the file is truncated or corrupt"
            )

    def names(self) -> list[str]:
        """Tensor names in file order."""
        return list(self.header)

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        entry = self.header[name]
        return entry["dtype"], tuple(entry["shape"])

    def tensor(self, name: str) -> Array:
        entry = self.header[name]
        dtype = entry["dtype"]
        if dtype not in STORAGE:
            raise TrnftError(f"{self.path}: tensor {name} has unsupported dtype {dtype}")
        begin, end = entry["data_offsets"]
        count = (end - begin) // ITEMSIZE[dtype]
        data = self._mapped.view(self._data_start + begin, count, STORAGE[dtype]).reshape(entry["shape"])
        return Array(data, dtype)

    def release(self) -> None:
        self._mapped.release()


@dataclass
class SafetensorsModel:
    """A Hugging Face model folder's safetensors files, memory-mapped, and which file holds each tensor."""

    folder: Path
    files: list[SafetensorsFile]
    where: dict[str, SafetensorsFile]  # tensor name -> file

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        return self.where[name].info(name)

    def tensor(self, name: str) -> Array | None:
        """The tensor as a view of its mapped file, or None when the folder has no such tensor."""
        f = self.where.get(name)
        return None if f is None else f.tensor(name)

    def release(self) -> None:
        for f in self.files:
            f.release()


def open_safetensors_model(folder: Path) -> SafetensorsModel:
    """The safetensors of ``folder`` (one ``model.safetensors`` or the shards its index lists)."""
    if (folder / INDEX).is_file():
        index = json.loads((folder / INDEX).read_text())
        names = sorted(set(index["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        names = ["model.safetensors"]
    elif list(folder.glob("*.bin")):
        raise TrnftError(
            f"{folder}: the model has only .bin weights; trnft streams safetensors (save it with safe_serialization)"
        )
    else:
        raise TrnftError(f"{folder}: no model.safetensors or {INDEX}")
    files = []
    where: dict[str, SafetensorsFile] = {}
    for name in names:
        if not (folder / name).is_file():
            raise TrnftError(f"{folder / name}: listed in the index but missing")
        f = SafetensorsFile(folder / name)
        files.append(f)
        for key in f.names():
            where[key] = f
    return SafetensorsModel(folder, files, where)


@dataclass(frozen=True)
class PlannedTensor:
    """An output tensor whose bytes a producer yields in row-major order."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    produce: Callable[[], Iterable[Array]]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * ITEMSIZE[self.dtype]


def write_safetensors(
    path: Path, tensors: list[PlannedTensor], metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` in order, streaming each producer's blocks; atomic (temporary file, then rename).

    The header is computed from the planned shapes first, so no tensor is ever held whole unless its
    producer yields it whole. A producer that yields the wrong number of bytes is a bug and fails.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-(8 + len(blob)) % 8)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(blob)))
            fh.write(blob)
            for t in tensors:
                written = 0
                for block in t.produce():
                    if block.dtype != t.dtype:
                        raise AssertionError(f"{t.name}: producer gave {block.dtype}, planned {t.dtype}")
                    data = np.ascontiguousarray(block.data)
                    _write_fault(path)
                    fh.write(memoryview(data).cast("B"))
                    written += data.nbytes
                if written != t.nbytes:
                    raise AssertionError(f"{t.name}: producer wrote {written} bytes, planned {t.nbytes}")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename is None:  # a failed write(2) or fsync(2) names no file: say which one
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_fault(path: Path) -> None:
    """Fault injection for tests: ``TRNFT_FAULT=oserror-writing:<ERRNO>:<file name>`` fails that file's
    first data write as the OS would (``ENOSPC`` for a full volume, ``EROFS``, ...; ``*`` is any file)."""
    fault = os.environ.get("TRNFT_FAULT", "")
    if fault.startswith("oserror-writing:"):
        _, name, target = fault.split(":", 2)
        if target in (path.name, "*"):
            code = getattr(errno, name)
            raise OSError(code, os.strerror(code))


def row_blocks(a: Array, max_bytes: int = 64 << 20) -> Iterator[Array]:
    """``a`` in blocks of whole rows of at most about ``max_bytes`` (one block for small tensors)."""
    if a.data.ndim == 0 or a.nbytes <= max_bytes:
        yield a
        return
    row_bytes = max(1, a.nbytes // a.data.shape[0])
    step = max(1, max_bytes // row_bytes)
    for start in range(0, a.data.shape[0], step):
        yield a.with_data(a.data[start : start + step])


# Largest output safetensors file unless --max-shard-size says otherwise (the Hugging Face default).
DEFAULT_MAX_SHARD_SIZE = "5GB"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


def parse_size(text: str, key: str) -> int:
    """``5GB``, ``500MB``, ``2GiB`` or a byte count -> bytes; a TrnftError naming ``key`` otherwise."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise TrnftError(f"{key}: cannot read {text!r}; use e.g. 5GB, 500MB or a byte count")
    base = 1024 if m.group(3) else 1000
    size = int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))
    if size <= 0:
        raise TrnftError(f"{key}: must be positive, got {text!r}")
    return size


def write_sharded_model(out: Path, tensors: list[PlannedTensor], max_shard_size: int) -> dict[str, Any]:
    """``model-XXXXX-of-YYYYY.safetensors`` files of at most ``max_shard_size`` bytes (a single larger
    tensor gets a file of its own) and ``model.safetensors.index.json``; returns the index."""
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(out / name, group)
        weight_map.update({t.name: name for t in group})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return index

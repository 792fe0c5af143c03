"""Lazy readers for weights files: names and shapes first, one array at a time on request.

Why not np.load / safetensors.load_file / mindspore.load_checkpoint: each materialises the whole
file, and the loader then needs a second full copy for the model (bit_m_r101x3 at 21843 classes
is 2 GB, bit_m_r152x4 3.7 GB). A reader here hands out one array, the loader converts it straight
into its parameter and drops it.

    npz          a zip of .npy members; shapes from each member's header
    safetensors  its JSON header gives names, shapes and offsets
    ckpt         MindSpore's protobuf checkpoint, parsed in place over a memory map (its layout:
                 repeated Value{tag, TensorProto{dims, tensor_type, tensor_content}}; a tensor
                 over 512 MB is written as consecutive Values with the same tag)
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

__all__ = ["MMAP_ENV", "ArrayReader", "open_reader", "empty_array"]

_HUGE_PAGE_MIN = 4 << 20


def empty_array(shape: tuple[int, ...], dtype) -> np.ndarray:
    """np.empty, backed by transparent huge pages when the array is big.

    Why: faulting in fresh memory is most of the cost of reading a weights file from the page
    cache. Measured on the shared 2-core test machine for 2 GB: np.empty + fill 8.8 s with 4 KiB
    pages, 3.9 s on an anonymous map advised MADV_HUGEPAGE. The map lives as long as the array.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if nbytes < _HUGE_PAGE_MIN or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.empty(shape, dtype)
    buf = mmap.mmap(-1, nbytes)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # THP disabled: ordinary pages
        pass
    return np.ndarray(shape, dtype, buffer=buf)


_CKPT_DTYPES = {
    "Int8": np.int8,
    "UInt8": np.uint8,
    "Int16": np.int16,
    "UInt16": np.uint16,
    "Int32": np.int32,
    "UInt32": np.uint32,
    "Int64": np.int64,
    "UInt64": np.uint64,
    "Float16": np.float16,
    "Float32": np.float32,
    "Float64": np.float64,
    "Bool": np.bool_,
}


class ArrayReader(Mapping):
    """name -> array, read on access; `shape(name)` without reading. Close it (or use `with`)."""

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> ArrayReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _NpzReader(ArrayReader):
    def __init__(self, path: Path) -> None:
        self._z = np.load(path, allow_pickle=False)
        self._names = list(self._z.files)
        self._shapes: dict[str, tuple[int, ...]] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        return self._z[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._shapes:
            with self._z.zip.open(f"{name}.npy") as f:
                version = np.lib.format.read_magic(f)
                shape, _, _ = np.lib.format._read_array_header(f, version)
            self._shapes[name] = tuple(shape)
        return self._shapes[name]

    def close(self) -> None:
        self._z.close()


_SAFETENSORS_DTYPES = {
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "I32": np.int32,
    "I64": np.int64,
    "U8": np.uint8,
    "I8": np.int8,
}


MMAP_ENV = "BIT_ZOO_LOAD_MMAP"
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14+; Python < 3.13 lacks the name


def _private_map(file) -> mmap.mmap | None:
    """A copy-on-write map of the whole file, or None where there is none (Windows, $BIT_ZOO_LOAD_MMAP=0)."""
    if os.environ.get(MMAP_ENV, "1") == "0" or not hasattr(mmap, "MAP_PRIVATE"):
        return None
    try:
        return mmap.mmap(file.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError):  # an empty file, or a file system without mmap
        return None


class _SafetensorsReader(ArrayReader):
    """The safetensors layout (8-byte little-endian header length, JSON header, raw data).

    An array is a view of a copy-on-write (MAP_PRIVATE) map of the file: no copy, its pages are the
    page cache's until something writes to them (an optimizer step copies the pages it touches; the
    file never changes). Measured on the shared 2-core machine for bit_m_r101x3's 2 GB: 0.5 s to map
    and populate against 4.8-10 s to read into fresh memory. Only the tensors asked for are faulted
    in (MADV_POPULATE_READ on their range), so a skipped head costs no RSS. The map lives as long as
    any array of it. The price of sharing the file's pages: a file truncated in place while its model
    lives (a `cp` over it; bit_zoo's own writers rename a new file instead) makes the next access
    fault (SIGBUS). $BIT_ZOO_LOAD_MMAP=0 reads into private memory instead, as on systems without
    mmap.
    """

    def __init__(self, path: Path) -> None:
        self._file = open(path, "rb")
        self._mm = None
        try:
            (n,) = struct.unpack("<Q", self._file.read(8))
            header = json.loads(self._file.read(n))
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            self._file.close()
            raise ValueError(f"not a safetensors file ({e})") from e
        header.pop("__metadata__", None)
        self._base = 8 + n
        end = max((info["data_offsets"][1] for info in header.values()), default=0)
        if self._base + end > os.fstat(self._file.fileno()).st_size:
            self._file.close()
            raise ValueError(f"truncated: the header describes {self._base + end} bytes, the file has fewer")
        self._entries = {}
        for name, info in header.items():
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                self._file.close()
                raise ValueError(f"tensor {name!r} has dtype {info['dtype']}, not a weights dtype")
            self._entries[name] = (
                np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<"),
                tuple(info["shape"]),
                info["data_offsets"],
            )
        self._mm = _private_map(self._file)
        self._populate = self._mm is not None

    def __getitem__(self, name: str) -> np.ndarray:
        dtype, shape, (begin, end) = self._entries[name]
        count = int(np.prod(shape))
        if count * dtype.itemsize != end - begin:
            raise ValueError(f"tensor {name!r}: {end - begin} bytes do not fill its shape {shape}")
        start = self._base + begin
        if self._mm is not None and start % dtype.itemsize == 0:  # aligned: a view (safetensors writers align)
            out = np.frombuffer(self._mm, dtype=dtype, count=count, offset=start).reshape(shape)
            self._fault_in(start, end - begin)
            return out
        out = empty_array(shape, dtype)
        self._file.seek(start)
        if self._file.readinto(memoryview(out).cast("B")) != out.nbytes:
            raise ValueError(f"tensor {name!r} is truncated")
        return out

    def _fault_in(self, start: int, length: int) -> None:
        """Map the range's pages now, in one call: loading, not the first forward, pays for reading them."""
        if not self._populate or length == 0:
            return
        aligned = start - start % mmap.PAGESIZE
        try:
            self._mm.madvise(_MADV_POPULATE_READ, aligned, length + start - aligned)
        except (OSError, ValueError):  # kernel before 5.14: the pages fault in on first use instead
            self._populate = False

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def close(self) -> None:
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # arrays handed out still view it: it is unmapped when the last one goes
                pass
        self._file.close()


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value or payload start, payload end) of a protobuf message."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value, pos
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise ValueError("truncated protobuf field")
            yield number, wire, pos, pos + length
            pos += length
        elif wire == 1:
            yield number, wire, pos, pos + 8
            pos += 8
        elif wire == 5:
            yield number, wire, pos, pos + 4
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


class _CkptReader(ArrayReader):
    """A MindSpore .ckpt parsed in place: only offsets are kept until an array is asked for."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "rb")
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], list[tuple[int, int]]]] = {}
        try:
            self._parse()
        except Exception:
            self.close()
            raise

    def _parse(self) -> None:
        mm, size = self._mm, len(self._mm)
        pos = 0
        while pos < size:
            if mm[pos : pos + 7] == b"crc_num":  # save_checkpoint(crc_check=True) appends it after the messages
                break
            key, body = _varint(mm, pos)
            if key != (1 << 3 | 2):
                raise ValueError(f"not a MindSpore checkpoint (field key {key} at byte {pos})")
            length, body = _varint(mm, body)
            end = body + length
            if end > size:
                raise ValueError("the checkpoint is truncated")
            tag, tensor = None, None
            for number, wire, a, b in _fields(mm, body, end):
                if number == 1 and wire == 2:
                    tag = bytes(mm[a:b]).decode("utf-8")
                elif number == 2 and wire == 2:
                    tensor = (a, b)
                elif number == 3:
                    raise ValueError("map tensors (MapParameter) are not weights")
            if tag is None or tensor is None:
                raise ValueError(f"a checkpoint entry at byte {pos} has no name or no tensor")
            dims: list[int] = []
            dtype_name, content = None, None
            for number, wire, a, b in _fields(mm, *tensor):
                if number == 1 and wire == 0:
                    dims.append(a)
                elif number == 1 and wire == 2:  # packed dims
                    p = a
                    while p < b:
                        d, p = _varint(mm, p)
                        dims.append(d)
                elif number == 2:
                    dtype_name = bytes(mm[a:b]).decode("utf-8")
                elif number == 3:
                    content = (a, b)
            if dtype_name not in _CKPT_DTYPES or content is None:
                raise ValueError(f"checkpoint entry {tag!r} has type {dtype_name!r}, not a numeric array")
            if tag in self._entries and self._entries[tag][1] == tuple(dims):
                self._entries[tag][2].append(content)  # the next slice of a tensor over 512 MB
            else:
                self._entries[tag] = (np.dtype(_CKPT_DTYPES[dtype_name]), tuple(dims), [content])
            pos = end

    def __getitem__(self, name: str) -> np.ndarray:
        dtype, dims, parts = self._entries[name]
        count = sum(b - a for a, b in parts) // dtype.itemsize
        # Read with the file, not through the map: mapped pages would stay in this process's RSS.
        out = empty_array((count,), dtype)
        view = memoryview(out).cast("B")
        i = 0
        for a, b in parts:
            self._file.seek(a)
            if self._file.readinto(view[i : i + b - a]) != b - a:
                raise ValueError(f"checkpoint entry {name!r} is truncated")
            i += b - a
        if int(np.prod(dims)) == count:
            return out.reshape(dims)
        if count == 1:  # a scalar is saved with dims [0] or []
            return out.reshape(())
        raise ValueError(f"checkpoint entry {name!r}: {count} values do not fill its shape {dims}")

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        dtype, dims, parts = self._entries[name]
        count = sum(b - a for a, b in parts) // dtype.itemsize
        return dims if int(np.prod(dims)) == count else ()

    def close(self) -> None:
        mm, self._mm = getattr(self, "_mm", None), None
        if mm is not None:
            mm.close()
        self._file.close()


def open_reader(path: str | os.PathLike, fmt: str) -> ArrayReader:
    """A lazy reader for `path` in container format fmt ('npz', 'safetensors' or 'ckpt')."""
    path = Path(path)
    if fmt == "npz":
        if not zipfile.is_zipfile(path):
            raise ValueError("not a zip archive")
        return _NpzReader(path)
    if fmt == "safetensors":
        return _SafetensorsReader(path)
    if fmt == "ckpt":
        return _CkptReader(path)
    raise ValueError(f"unknown container format {fmt!r}")

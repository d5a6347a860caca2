"""Checkpoint files: memory-mapped reading, validation messages, sharding and atomic writes.

This module knows about *files* (safetensors, torch ``.pt``/``.pth``/``.bin`` pickles, sharded
indexes); :mod:`moe_lab.checkpoints.layouts` knows about *key names*; :mod:`moe_lab.checkpoints.loading` puts the two
together.

Memory. Tensors are read through memory maps: ``safetensors.safe_open`` (its ``get_tensor``
returns a view of the mapped file, nothing is read yet) and ``torch.load(mmap=True,
weights_only=True)``. The loader copies each tensor once into memory the model owns and then
calls :func:`release_pages` on the part of the mapping it came from (``madvise(MADV_DONTNEED)``
on Linux), so the pages it touched leave the process' resident set straight away instead of
piling up until the file is closed. Peak resident memory while loading a checkpoint of S bytes
is therefore about S + the largest tensor, not 2 S. (The bytes stay in the kernel's page cache,
which is not counted in RSS and is given back under memory pressure.)
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import pickle
import re
import shutil
import struct
import sys
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import Tensor

__all__ = [
    "CheckpointError",
    "MissingFileError",
    "TensorInfo",
    "SafetensorsFile",
    "TorchFile",
    "TensorStore",
    "open_tensor_file",
    "read_index",
    "release_pages",
    "parse_size",
    "plan_shards",
    "write_safetensors",
    "save_aligned_safetensors",
    "ALIGN",
    "atomic_directory",
    "fmt_keys",
]


class CheckpointError(ValueError):
    """A checkpoint could not be loaded (or saved): the message names the file and the keys."""


class MissingFileError(CheckpointError, FileNotFoundError):
    """A file the checkpoint needs (a shard, a config) does not exist."""


def fmt_keys(keys: Iterable[str], limit: int = 12) -> str:
    """``['a', 'b', ...]`` capped at ``limit`` names, with a count of the rest."""
    keys = sorted(keys, key=natural_key)
    shown = ", ".join(repr(k) for k in keys[:limit])
    more = f", ... ({len(keys) - limit} more; {len(keys)} in all)" if len(keys) > limit else ""
    return f"[{shown}{more}]"


def natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


# --------------------------------------------------------------------------------------------
# Releasing mapped pages

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4  # Linux value
_madvise = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _madvise = _libc.madvise
        _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _madvise.restype = ctypes.c_int
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        _madvise = None


def _span(t: Tensor) -> tuple[int, int]:
    """Byte range [start, end) of memory a (possibly strided) tensor view covers."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    extent = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


def release_pages(t: Tensor, touching: bool = False) -> None:
    """Drop the pages under a *file-backed, memory-mapped* tensor from the resident set.

    Only ever called on views of files this module mapped itself (never on ordinary memory,
    where MADV_DONTNEED would zero the data). By default only the pages wholly inside the
    tensor; ``touching=True`` also drops the pages it shares with its neighbours in the file.
    Pages are refetched from the file if touched again, so this is always safe for data that
    was only read. The mappings are private (copy-on-write), so anything *written* into them
    was never in the file: dropping those pages undoes the writes (which is what a streamed
    layer wants when it is freed). No-op off Linux.
    """
    if _madvise is None or t.device.type != "cpu":
        return
    a, b = _span(t)
    if touching:  # round outward: every page the tensor touches
        start, end = a // _PAGE * _PAGE, -(-b // _PAGE) * _PAGE
    else:  # round inward: only pages wholly inside the tensor
        start, end = -(-a // _PAGE) * _PAGE, b // _PAGE * _PAGE
    if end > start:
        _madvise(start, end - start, _MADV_DONTNEED)


# --------------------------------------------------------------------------------------------
# Reading tensor files

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


def diagnose_safetensors(path: Path) -> str:
    """A human explanation of what is wrong with a safetensors file (best effort)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"the file is {size} bytes, too short to hold the 8-byte header length (empty or truncated)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return (f"the header claims {n} bytes but the file holds only {size} bytes "
                        f"(truncated, or not a safetensors file)")
            raw = f.read(n)
        try:
            header = json.loads(raw)
        except ValueError as e:
            return f"the JSON header is corrupt ({e})"
        if not isinstance(header, dict):
            return "the JSON header is not an object"
        bad, ends = [], {}
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
                bad.append(key)
                continue
            ends[key] = int(entry["data_offsets"][1])
        if bad:
            return f"header entries without dtype/shape/data_offsets (corrupt header): {fmt_keys(bad)}"
        data = size - 8 - n
        cut = [k for k, e in ends.items() if e > data]
        if cut:
            need = max(ends.values()) + 8 + n
            return (f"the file is truncated: {size} bytes on disk, the header needs {need}; "
                    f"tensors cut off: {fmt_keys(cut)}")
        if ends and max(ends.values()) < data:
            return f"the file holds {data - max(ends.values())} bytes after the last tensor (corrupt or overwritten)"
        return "the header does not describe the data consistently (corrupt file)"
    except OSError as e:  # pragma: no cover
        return f"it could not be read ({e})"


class SafetensorsFile:
    """One ``.safetensors`` file opened with ``safe_open`` (memory-mapped; nothing read up front)."""

    mapped = True

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise MissingFileError(f"checkpoint file {self.path} does not exist")
        try:
            self._f = safe_open(str(self.path), framework="pt", device="cpu")
            keys = list(self._f.keys())
            self.metadata = self._f.metadata() or {}
            self._info = {}
            for k in keys:
                sl = self._f.get_slice(k)
                dt = sl.get_dtype()
                if dt not in _ST_DTYPES:
                    raise CheckpointError(f"{self.path}: tensor {k!r} has dtype {dt}, which moe_lab cannot read")
                self._info[k] = TensorInfo(k, tuple(sl.get_shape()), _ST_DTYPES[dt], self.path)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.path} is not a readable safetensors file: {diagnose_safetensors(self.path)} "
                                  f"[{type(e).__name__}: {e}]") from None

    def keys(self) -> list[str]:
        return list(self._info)

    def info(self, key: str) -> TensorInfo:
        return self._info[key]

    def get(self, key: str) -> Tensor:
        """A view of the mapped file (zero-copy until the data is touched)."""
        try:
            return self._f.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{self.path}: reading tensor {key!r} failed: {e}") from None

    def close(self):
        f, self._f = getattr(self, "_f", None), None
        if f is not None and hasattr(f, "__exit__"):
            try:
                f.__exit__(None, None, None)
            except Exception:  # pragma: no cover
                pass


@contextmanager
def _private_maps():
    """``torch.load(mmap=True)`` maps privately (``MAP_PRIVATE``) inside this block."""
    set_opts = getattr(torch.serialization, "set_default_mmap_options", None)
    if set_opts is None or not hasattr(mmap, "MAP_PRIVATE"):  # old torch (always private) or Windows
        yield
        return
    with set_opts(mmap.MAP_PRIVATE):
        yield


class TorchFile:
    """A ``torch.save`` file (``.pt``, ``.pth``, ``.bin``), loaded with ``weights_only=True`` and,
    for zip-format files, ``mmap=True`` (tensors are views of the mapped file)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise MissingFileError(f"checkpoint file {self.path} does not exist")
        self.mapped = True
        try:
            # private (copy-on-write) maps whatever the process default: writing into a tensor
            # (a zero-copy streamed weight edited in place) must never reach the file
            with _private_maps():
                sd = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"refusing to load {self.path}: its pickle holds objects other than tensors (possibly code). "
                f"torch.load(weights_only=True) rejected it: {_first_line(e)}. Only open such a file with "
                f"weights_only=False if you trust its source, and convert it to safetensors.") from None
        except RuntimeError as e:
            if "mmap" in str(e) and "zipfile" in str(e).lower():  # legacy (non-zip) torch.save format
                sd, self.mapped = self._load_unmapped()
            else:
                raise CheckpointError(f"{self.path} is not a readable torch checkpoint (truncated or corrupt?): "
                                      f"{_first_line(e)}") from None
        except Exception as e:
            raise CheckpointError(f"{self.path} is not a readable torch checkpoint: {type(e).__name__}: "
                                  f"{_first_line(e)}") from None
        if not isinstance(sd, dict):
            raise CheckpointError(f"{self.path} holds a {type(sd).__name__}, not a state dict (dict of tensors)")
        bad = [str(k) for k, v in sd.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
        if bad:
            raise CheckpointError(f"{self.path} is not a flat state dict: entries that are not tensors: {fmt_keys(bad)}")
        self._sd = sd
        self._info = {k: TensorInfo(k, tuple(v.shape), v.dtype, self.path) for k, v in sd.items()}

    def _load_unmapped(self):
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True), False
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"refusing to load {self.path}: torch.load(weights_only=True) rejected it: "
                                  f"{_first_line(e)}") from None
        except Exception as e:
            raise CheckpointError(f"{self.path} is not a readable torch checkpoint: {_first_line(e)}") from None

    def keys(self) -> list[str]:
        return list(self._info)

    def info(self, key: str) -> TensorInfo:
        return self._info[key]

    def get(self, key: str) -> Tensor:
        return self._sd[key]

    def close(self):
        self._sd = {}


def _first_line(e: BaseException) -> str:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    # torch's weights_only message puts the useful line ("Unsupported global ...") in the middle
    useful = [l for l in lines if "GLOBAL" in l or "Unsupported" in l or "unsupported" in l]
    return (useful or lines or [type(e).__name__])[0]


SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def open_tensor_file(path: str | os.PathLike):
    path = Path(path)
    if path.suffix in SAFETENSORS_SUFFIXES:
        return SafetensorsFile(path)
    if path.suffix in TORCH_SUFFIXES:
        return TorchFile(path)
    raise CheckpointError(f"{path}: unknown tensor file type {path.suffix!r} (expected .safetensors, .pt, .pth or .bin)")


class TensorStore:
    """Several tensor files seen as one mapping key -> tensor; duplicated keys are an error."""

    def __init__(self, files: list, expected: dict[str, str] | None = None, index_file: Path | None = None):
        self.files = files
        self._where: dict[str, object] = {}
        dups: dict[str, list[str]] = {}
        for f in files:
            for k in f.keys():
                if k in self._where:
                    dups.setdefault(k, [self._where[k].path.name]).append(f.path.name)
                else:
                    self._where[k] = f
        if dups:
            detail = "; ".join(f"{k!r} in {', '.join(v)}" for k, v in sorted(dups.items(), key=lambda kv: natural_key(kv[0]))[:12])
            raise CheckpointError(f"duplicated keys in the checkpoint files under {files[0].path.parent}: "
                                  f"{len(dups)} key(s) appear in more than one file: {detail}")
        if expected is not None:  # the index's weight_map: key -> file name
            wrong = {k: fn for k, fn in expected.items() if k not in self._where or self._where[k].path.name != fn}
            if wrong:
                detail = "; ".join(
                    f"{k!r}: index says {fn}, " + (f"found in {self._where[k].path.name}" if k in self._where else "not in any shard")
                    for k, fn in sorted(wrong.items(), key=lambda kv: natural_key(kv[0]))[:12])
                raise CheckpointError(f"{index_file} does not match the shard files: {len(wrong)} key(s): {detail}")
            extra = set(self._where) - set(expected)
            if extra:
                raise CheckpointError(f"shard files hold keys that {index_file} does not list (unexpected keys): "
                                      + "; ".join(f"{k!r} in {self._where[k].path.name}" for k in sorted(extra, key=natural_key)[:12]))

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def info(self, key: str) -> TensorInfo:
        return self._where[key].info(key)

    def file_of(self, key: str) -> Path:
        return self._where[key].path

    def get(self, key: str) -> Tensor:
        return self._where[key].get(key)

    def mapped(self, key: str) -> bool:
        return self._where[key].mapped

    def close(self):
        for f in self.files:
            f.close()


def read_index(index_path: Path) -> dict[str, str]:
    """``weight_map`` of a ``*.index.json`` file, with clear errors."""
    try:
        data = json.loads(index_path.read_text())
    except FileNotFoundError:
        raise MissingFileError(f"index file {index_path} does not exist") from None
    except ValueError as e:
        raise CheckpointError(f"index file {index_path} is not valid JSON: {e}") from None
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise CheckpointError(f"index file {index_path} has no 'weight_map' object mapping keys to file names")
    for fn in set(wm.values()):
        if Path(fn).name != fn:
            raise CheckpointError(f"index file {index_path} refers to {fn!r}, which is not a plain file name")
    return wm


# --------------------------------------------------------------------------------------------
# Writing

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str | None) -> int | None:
    """``10_000_000``, ``"10MB"``, ``"1.5GB"``, ``"512KiB"`` -> bytes (None stays None)."""
    if size is None:
        return None
    if isinstance(size, bool):
        raise ValueError(f"max_shard_size must be a number of bytes or a string like '10MB', got {size!r}")
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
        if not m or m.group(2).upper() not in _UNITS:
            raise ValueError(f"max_shard_size {size!r} is not a size like 10000000, '10MB', '2GB' or '512KiB'")
        n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return n


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int | None) -> list[list[str]]:
    """Greedy split of (key, nbytes) in order into shards of at most ``max_bytes`` (a tensor
    larger than the limit gets a shard of its own)."""
    if max_bytes is None:
        return [[k for k, _ in sizes]]
    shards, cur, cur_size = [], [], 0
    for k, n in sizes:
        if cur and cur_size + n > max_bytes:
            shards.append(cur)
            cur, cur_size = [], 0
        cur.append(k)
        cur_size += n
    if cur or not shards:
        shards.append(cur)
    return shards


def _own_storage(t: Tensor) -> Tensor:
    """A contiguous CPU tensor that owns its whole storage (safetensors refuses shared ones)."""
    if t.device.type == "meta":
        raise CheckpointError("cannot save a tensor on the meta device (the model has no weights loaded)")
    t = t.detach().cpu()
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset():
        t = t.contiguous().clone()
    return t


ALIGN = 64  # bytes: torch's CPU allocator aligns to 64; so do the tensors of the files we write


def save_aligned_safetensors(tensors: dict[str, Tensor], path: str | os.PathLike,
                             metadata: dict[str, str] | None = None) -> None:
    """Write a ``.safetensors`` file whose tensor data starts on a 64-byte boundary.

    Same format as ``safetensors.torch.save_file`` (8-byte header length, JSON header, the
    tensors back to back), but the header is padded with spaces (the format allows it) so
    that the data section, and every tensor whose predecessors' sizes are multiples of 64
    bytes (all of Mixtral's), is 64-byte aligned in the file and so in its memory map. A
    streamed forward can then use those mapped tensors as they are (zero-copy) with the
    alignment a copy would have, hence bit for bit the same matmuls. One tensor in memory
    at a time; ``tensors`` in their order.
    """
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for k, t in tensors.items():
        if t.dtype not in _ST_NAMES:
            raise CheckpointError(f"cannot save tensor {k!r}: dtype {t.dtype} has no safetensors name")
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for t in tensors.values():
            t = _own_storage(t)
            if t.numel():
                f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))


def write_safetensors(tensors: dict[str, Tensor], directory: Path, stem: str, max_shard_size=None,
                      metadata: dict[str, str] | None = None, index_name: str | None = None) -> list[str]:
    """Write ``tensors`` as ``{stem}.safetensors`` or as shards ``{stem}-0000i-of-0000n.safetensors``
    plus ``{index_name or stem + '.safetensors.index.json'}``. Returns the file names written."""
    max_bytes = parse_size(max_shard_size)
    sizes = [(k, t.numel() * t.element_size()) for k, t in tensors.items()]
    shards = plan_shards(sizes, max_bytes)
    written = []
    if len(shards) == 1:
        names = [f"{stem}.safetensors"]
    else:
        names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, keys in zip(names, shards):
        save_aligned_safetensors({k: tensors[k] for k in keys}, directory / name, metadata=metadata)
        written.append(name)
        weight_map.update({k: name for k in keys})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(n for _, n in sizes)}, "weight_map": weight_map}
        index_name = index_name or f"{stem}.safetensors.index.json"
        (directory / index_name).write_text(json.dumps(index, indent=2) + "\n")
        written.append(index_name)
    return written


_CHECKPOINT_SUFFIXES = (".json", ".safetensors", ".pt", ".pth", ".bin", ".model", ".txt", ".md")


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``path``; on success it replaces ``path``.

    On any exception the temporary directory is deleted and ``path`` is left as it was, so a
    failed save never leaves a half-written checkpoint that looks valid. An existing ``path``
    is only replaced when it is empty or holds nothing but checkpoint-like files.
    """
    path = Path(path).absolute()
    if path.exists():
        if not path.is_dir():
            raise FileExistsError(f"{path} exists and is not a directory")
        foreign = [p.name for p in path.iterdir() if not (p.is_file() and p.suffix in _CHECKPOINT_SUFFIXES)]
        if foreign:
            raise FileExistsError(f"{path} exists and holds things that are not checkpoint files "
                                  f"({', '.join(sorted(foreign)[:8])}); refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        for p in tmp.iterdir():  # flush file contents before the rename makes them visible
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

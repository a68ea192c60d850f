"""Read a file written by `torch.save(tensor)` as data: the per-id feature files' fast path.

A feature file is a zip archive holding a tiny pickle (data.pkl) that names one storage
record and the tensor's size and stride. torch.load(weights_only=True) runs that pickle
through a pure-Python restricted unpickler and opens the archive through a general reader:
378 us per file against 66 us here (`scripts/benchmark.py --sections load`, docs/performance.md),
for the 8,000 files a 2,000-video test split reads. How:

  * the file is read once; the zip's central directory and local headers are parsed here,
    and only STORED (uncompressed) records are accepted. CRC-32s are not checked, as
    torch.load does not check them (a flipped byte in the data loads as it does there);
  * data.pkl is never unpickled. Its opcodes (pickletools.genops, a parser) are interpreted
    by a stack machine that knows only what `torch.save` writes for one plain tensor:
    strings, ints, tuples, False, memo puts/gets, the storage reference (BINPERSID) and two
    names, `torch._utils._rebuild_tensor_v2` and `collections.OrderedDict`, which it treats
    as tags, never calls. Anything else -- another opcode, another global, requires_grad,
    backward hooks, a non-contiguous or offset view, big-endian data, a dtype without a
    numpy twin -- is not an error here: read_tensor returns None and the caller falls back to
    torch.load(weights_only=True), which decides (and refuses any code, as before).

So a file either gives exactly the tensor torch.load gives (tests/test_tensorfile.py
compares them over dtypes and shapes), or goes through torch.load.
"""
from __future__ import annotations

import functools
import math
import os
import pickletools
import struct
from typing import Any

import numpy as np
import torch

# Storage classes torch.save names -> numpy dtype (bfloat16 has no numpy twin: torch.load reads those).
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_REBUILD = ("torch._utils", "_rebuild_tensor_v2")
_ORDERED_DICT = ("collections", "OrderedDict")
_EMPTY_HOOKS = object()          # the OrderedDict() torch.save writes for "no backward hooks"
_MAX_FILE = 64 << 20             # a feature file is ~100-300 KB; anything this big goes to torch.load
_EOCD = b"PK\x05\x06"
_CENTRAL_SIG = 0x02014B50        # b"PK\x01\x02" as a little-endian int
_LOCAL_SIG = 0x04034B50          # b"PK\x03\x04"


class _Unsupported(Exception):
    """Not the plain layout this reader knows: the caller uses torch.load."""


class _Global:
    __slots__ = ("name",)

    def __init__(self, name: tuple[str, str]):
        self.name = name


class _StorageType:
    __slots__ = ("dtype",)

    def __init__(self, dtype: Any):
        self.dtype = dtype


class _Storage:
    __slots__ = ("dtype", "key", "numel")

    def __init__(self, dtype: Any, key: str, numel: int):
        self.dtype, self.key, self.numel = dtype, key, numel


def _zip_records(buf: memoryview) -> dict[str, memoryview]:
    """{name: bytes} of a zip archive's STORED records (zip64 and compression: unsupported)."""
    n = len(buf)
    # The end-of-central-directory record: its 22 bytes end the file unless a comment follows
    # (torch writes none; an archive with one is searched for).
    eocd = n - 22
    if eocd < 0 or buf[eocd:eocd + 4] != _EOCD:
        eocd = bytes(buf[max(0, n - 22 - 1024):]).rfind(_EOCD)
        if eocd < 0:
            raise _Unsupported
        eocd += max(0, n - 22 - 1024)
    count, cd_size, cd_offset = struct.unpack_from("<10xHII", buf, eocd)
    if cd_offset + cd_size > eocd:
        raise _Unsupported
    records: dict[str, memoryview] = {}
    pos = cd_offset
    for _ in range(count):
        (sig, method, csize, usize, name_len, extra_len, comment_len,
         local) = struct.unpack_from("<I6xH8xIIHHH8xI", buf, pos)
        if sig != _CENTRAL_SIG or method != 0 or csize != usize:
            raise _Unsupported
        name = str(buf[pos + 46:pos + 46 + name_len], "utf-8")
        pos += 46 + name_len + extra_len + comment_len
        l_sig, l_name, l_extra = struct.unpack_from("<I22xHH", buf, local)
        start = local + 30 + l_name + l_extra
        if l_sig != _LOCAL_SIG or start + usize > cd_offset:
            raise _Unsupported
        records[name] = buf[start:start + usize]
    return records


def _interpret(pickle_bytes: bytes) -> tuple[_Storage, int, tuple, tuple]:
    """(storage, offset, size, stride) from torch.save's pickle of one tensor, by data alone."""
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}
    result = None
    for op, arg, _ in pickletools.genops(pickle_bytes):
        name = op.name
        if name == "PROTO":
            continue
        if name in ("BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
        elif name in ("BINGET", "LONG_BINGET"):
            stack.append(memo[arg])
        elif name == "MARK":
            marks.append(len(stack))
        elif name in ("BINUNICODE", "SHORT_BINUNICODE", "BININT", "BININT1", "BININT2", "LONG1"):
            stack.append(arg)
        elif name == "NEWFALSE":
            stack.append(False)
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            k = int(name[-1])
            items = tuple(stack[-k:])
            del stack[-k:]
            stack.append(items)
        elif name == "TUPLE":
            start = marks.pop()
            items = tuple(stack[start:])
            del stack[start:]
            stack.append(items)
        elif name == "GLOBAL":
            module, _, qual = arg.partition(" ")
            if (module, qual) in (_REBUILD, _ORDERED_DICT):
                stack.append(_Global((module, qual)))
            elif module == "torch" and qual in _STORAGE_DTYPES:
                stack.append(_StorageType(_STORAGE_DTYPES[qual]))
            else:
                raise _Unsupported
        elif name == "BINPERSID":
            pid = stack.pop()
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[2], str)
                    and pid[3] == "cpu" and isinstance(pid[4], int) and isinstance(pid[1], _StorageType)):
                raise _Unsupported
            stack.append(_Storage(pid[1].dtype, pid[2], pid[4]))
        elif name == "REDUCE":
            args, fn = stack.pop(), stack.pop()
            if not isinstance(fn, _Global) or not isinstance(args, tuple):
                raise _Unsupported
            if fn.name == _ORDERED_DICT and args == ():
                stack.append(_EMPTY_HOOKS)
            elif fn.name == _REBUILD and len(args) == 6 and args[4] is False and args[5] is _EMPTY_HOOKS:
                stack.append(("tensor", args[:4]))
            else:
                raise _Unsupported
        elif name == "STOP":
            result = stack.pop() if len(stack) == 1 and not marks else None
            break
        else:
            raise _Unsupported
    if not (isinstance(result, tuple) and result[0] == "tensor"):
        raise _Unsupported
    storage, offset, size, stride = result[1]
    if not (isinstance(storage, _Storage) and isinstance(offset, int) and isinstance(size, tuple)
            and isinstance(stride, tuple) and len(size) == len(stride)
            and all(isinstance(x, int) and x >= 0 for x in size + stride)):
        raise _Unsupported
    return storage, offset, size, stride


@functools.lru_cache(maxsize=256)
def _layout(pickle_bytes: bytes) -> tuple[str, np.dtype, tuple[int, ...], int]:
    """(storage record key, dtype, shape, bytes) of a whole, contiguous tensor, or _Unsupported.

    A pure function of the pickle's bytes, memoised: the files of one folder share one shape and
    dtype, hence one pickle, and walking its opcodes costs more than the rest of reading a file."""
    storage, offset, shape, stride = _interpret(pickle_bytes)
    dtype = np.dtype(storage.dtype)
    numel = math.prod(shape)
    contiguous = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    if offset != 0 or numel != storage.numel or (numel > 1 and stride != contiguous):
        raise _Unsupported
    return storage.key, dtype, shape, numel * dtype.itemsize


def read_tensor(path: str | os.PathLike) -> torch.Tensor | None:
    """The tensor in a file written by torch.save(tensor), or None when the file is not in the
    plain layout this reader knows (then use torch.load). Raises OSError when it cannot be read."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > _MAX_FILE:
            return None
        buf = bytearray(size)
        if f.readinto(buf) != size:
            return None
    try:
        records = _zip_records(memoryview(buf))
        pkl = [k for k in records if k.endswith("/data.pkl") and k.count("/") == 1]
        if len(pkl) != 1 or not np.little_endian:
            raise _Unsupported
        prefix = pkl[0][:-len("data.pkl")]
        if records.get(prefix + "byteorder", b"little") != b"little":
            raise _Unsupported
        key, dtype, shape, nbytes = _layout(bytes(records[pkl[0]]))
        data = records.get(f"{prefix}data/{key}")
        if data is None or len(data) != nbytes:
            raise _Unsupported
    except (_Unsupported, struct.error, UnicodeDecodeError, ValueError, IndexError, KeyError, TypeError):
        return None
    # `data` is a view of `buf` (a bytearray): the tensor owns writable memory, no copy.
    return torch.from_numpy(np.frombuffer(data, dtype=dtype).reshape(shape))

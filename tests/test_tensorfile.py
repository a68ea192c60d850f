"""utils/data/tensorfile.read_tensor: exactly torch.load's tensor for plain torch.save files, None for anything else."""
from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from utils.data.tensorfile import read_tensor


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.int64, torch.int32,
                                   torch.int16, torch.int8, torch.uint8, torch.bool])
@pytest.mark.parametrize("shape", [(50, 512), (96,), (1,), (), (3, 1, 4), (0, 768)])
def test_equals_torch_load(tmp_path: Path, dtype: torch.dtype, shape: tuple) -> None:
    t = (torch.randn(shape) * 100).to(dtype)
    path = tmp_path / "x.pt"
    torch.save(t, path)
    got = read_tensor(path)
    want = torch.load(path, weights_only=True)
    assert got is not None and got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want)
    got.logical_not_() if dtype == torch.bool else got.add_(1)  # writable, without a warning


def test_many_records_and_long_memo(tmp_path: Path) -> None:
    """A big tensor (4-byte ints in the pickle) reads like torch.load."""
    t = torch.randn(70000, 3)
    torch.save(t, tmp_path / "big.pt")
    assert torch.equal(read_tensor(tmp_path / "big.pt"), t)


@pytest.mark.parametrize("make", [
    lambda: torch.randn(4, 6)[:, ::2],                     # not contiguous
    lambda: torch.randn(10)[3:],                           # offset into its storage
    lambda: torch.randn(5, requires_grad=True),            # requires_grad
    lambda: torch.randn(5).to(torch.bfloat16),             # no numpy dtype
    lambda: {"feat": torch.randn(5)},                      # not a bare tensor
    lambda: [torch.randn(5)],
    lambda: torch.nn.Parameter(torch.randn(5)),
    lambda: OrderedDict(a=1),
    lambda: 3,
])
def test_anything_else_goes_to_torch_load(tmp_path: Path, make) -> None:
    path = tmp_path / "x.pt"
    torch.save(make(), path)
    assert read_tensor(path) is None


def test_other_pickle_protocol_goes_to_torch_load(tmp_path: Path) -> None:
    torch.save(torch.randn(5), tmp_path / "p4.pt", pickle_protocol=4)
    assert read_tensor(tmp_path / "p4.pt") is None


def test_legacy_and_garbage_files(tmp_path: Path) -> None:
    torch.save(torch.randn(5), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "text.pt").write_text("not a tensor")
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("legacy.pt", "text.pt", "empty.pt"):
        assert read_tensor(tmp_path / name) is None
    with pytest.raises(FileNotFoundError):
        read_tensor(tmp_path / "missing.pt")


def test_damaged_files_read_as_torch_load_reads_them(tmp_path: Path) -> None:
    """A flipped byte in the tensor data: torch.load checks no CRC, and neither does this reader
    (same tensor). A truncated file has no central directory: torch.load's turn (and its error)."""
    path = tmp_path / "x.pt"
    torch.save(torch.zeros(1000), path)
    data = bytearray(path.read_bytes())
    data[data.find(b"\x00" * 64) + 10] ^= 0xFF
    path.write_bytes(bytes(data))
    assert torch.equal(read_tensor(path), torch.load(path, weights_only=True))
    torch.save(torch.zeros(1000), path)
    path.write_bytes(path.read_bytes()[:-40])
    assert read_tensor(path) is None


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _with_pickle(src: Path, dst: Path, payload: bytes) -> None:
    """A copy of the torch.save archive `src` whose data.pkl is `payload` (records stored, CRCs valid)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = payload if info.filename.endswith("/data.pkl") else zin.read(info)
            zout.writestr(info.filename, data)


def test_a_payload_is_never_run(tmp_path: Path) -> None:
    """The pickle is read as data: a payload in a well-formed archive is not called, only refused."""
    marker = tmp_path / "ran"
    torch.save(_Payload(marker), tmp_path / "payload.pt")
    torch.save(torch.randn(3), tmp_path / "plain.pt")
    _with_pickle(tmp_path / "plain.pt", tmp_path / "crafted.pt", pickle.dumps(_Payload(marker), protocol=2))
    with zipfile.ZipFile(tmp_path / "plain.pt") as z:   # the round trip through _with_pickle itself reads fine
        original = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    _with_pickle(tmp_path / "plain.pt", tmp_path / "same.pt", original)
    assert torch.equal(read_tensor(tmp_path / "same.pt"), torch.load(tmp_path / "plain.pt", weights_only=True))
    assert read_tensor(tmp_path / "payload.pt") is None
    assert read_tensor(tmp_path / "crafted.pt") is None
    assert not marker.exists()

"""LogitsFile: chunked reads of an N×V logits matrix from .npy, .safetensors and HDF5 files.

Data is copied bit for bit (fp16/bf16 widen exactly), so reads are compared with exact
equality. The peak-memory test checks, in a fresh process, that reading a 256 MiB file in
chunks never holds it whole.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
import subprocess
import sys
import textwrap
import zlib

import h5py
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from rankest.errors import UserError
from rankest.sources.logits_file import LogitsFile

NP_DTYPES = {"fp16": np.float16, "fp32": np.float32, "fp64": np.float64}


def _random(rng: np.random.Generator, n: int, v: int, np_dtype) -> np.ndarray:
    """(n, v) logits-like values, rounded to ``np_dtype``."""
    return (rng.standard_normal((n, v)) * 4.0).astype(np_dtype)


def _expected(arr: np.ndarray) -> torch.Tensor:
    """What LogitsFile returns for stored ``arr``: float64 for fp64, float32 otherwise."""
    return torch.from_numpy(arr.astype(np.float64 if arr.dtype == np.float64 else np.float32))


def _check_reads(lf: LogitsFile, want: torch.Tensor, rng: np.random.Generator) -> None:
    """Random ranges, the whole matrix and a permutation with repeats equal ``want`` exactly."""
    n = want.shape[0]
    assert torch.equal(lf.read(0, n), want)
    for _ in range(6):
        start = int(rng.integers(0, n))
        stop = int(rng.integers(start, n + 1))
        got = lf.read(start, stop)
        assert got.shape == (stop - start, want.shape[1]) and got.dtype == want.dtype
        assert torch.equal(got, want[start:stop])
    idx = np.concatenate([rng.permutation(n), rng.integers(0, n, size=n // 2)])
    rng.shuffle(idx)
    got = lf.read_rows(idx)
    assert got.dtype == want.dtype and got.is_contiguous()
    assert torch.equal(got, want[torch.from_numpy(idx)])
    assert torch.equal(lf.read_rows(np.arange(3, n - 2)), want[3:n - 2])  # one coalesced run
    assert torch.equal(lf.read_rows(np.array([n - 1, 0])), want[[n - 1, 0]])  # distinct but unsorted
    assert lf.read_rows(np.array([], dtype=np.int64)).shape == (0, want.shape[1])
    assert lf.read(5, 5).shape == (0, want.shape[1])


# --- round trips per format and stored dtype ----------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp16", "fp32", "fp64"])
def test_npy_reads_equal_the_array(tmp_path, dtype):
    rng = np.random.default_rng(zlib.crc32(f"npy-{dtype}".encode()))
    arr = _random(rng, 37, 53, NP_DTYPES[dtype])
    np.save(tmp_path / "logits.npy", arr)
    with LogitsFile.open(str(tmp_path / "logits.npy")) as lf:
        assert (lf.format, lf.key, lf.n_rows, lf.n_cols, lf.dtype) == ("npy", None, 37, 53, dtype)
        assert lf.path == tmp_path / "logits.npy"
        assert lf.nbytes_per_row() == 53 * arr.itemsize
        _check_reads(lf, _expected(arr), rng)


@pytest.mark.parametrize("st_dtype", ["F16", "BF16", "F32", "F64"])
def test_safetensors_reads_equal_the_tensor(tmp_path, st_dtype):
    rng = np.random.default_rng(zlib.crc32(f"st-{st_dtype}".encode()))
    path = tmp_path / "logits.safetensors"
    if st_dtype == "BF16":
        tensor = torch.from_numpy(_random(rng, 41, 29, np.float32)).to(torch.bfloat16)
        safetensors.torch.save_file({"logits": tensor}, str(path), metadata={"source": "test"})
        want = tensor.float()
        itemsize = 2
    else:
        np_dtype = {"F16": np.float16, "F32": np.float32, "F64": np.float64}[st_dtype]
        arr = _random(rng, 41, 29, np_dtype)
        safetensors.numpy.save_file({"logits": arr}, str(path), metadata={"source": "test"})
        want = _expected(arr)
        itemsize = arr.itemsize
    name = {"F16": "fp16", "BF16": "bf16", "F32": "fp32", "F64": "fp64"}[st_dtype]
    with LogitsFile.open(path) as lf:
        assert (lf.format, lf.key, lf.n_rows, lf.n_cols, lf.dtype) == ("safetensors", "logits", 41, 29, name)
        assert lf.nbytes_per_row() == 29 * itemsize
        _check_reads(lf, want, rng)


@pytest.mark.parametrize("dtype", ["fp32", "fp64"])
def test_hdf5_reads_equal_the_dataset(tmp_path, dtype):
    rng = np.random.default_rng(zlib.crc32(f"h5-{dtype}".encode()))
    arr = _random(rng, 45, 31, NP_DTYPES[dtype])
    with h5py.File(tmp_path / "logits.h5", "w") as f:
        f.create_dataset("run/logits", data=arr, chunks=(8, 31))
    with LogitsFile.open(tmp_path / "logits.h5") as lf:
        assert (lf.format, lf.key, lf.n_rows, lf.n_cols, lf.dtype) == ("hdf5", "run/logits", 45, 31, dtype)
        _check_reads(lf, _expected(arr), rng)


def test_hdf5_read_rows_in_bounded_groups(tmp_path, monkeypatch):
    """Several fancy-indexed groups (and single-run groups) reassemble in the requested order."""
    import rankest.sources.logits_file as module

    monkeypatch.setattr(module, "_H5_GROUP_ROWS", 4)
    rng = np.random.default_rng(7)
    arr = _random(rng, 30, 6, np.float32)
    with h5py.File(tmp_path / "logits.hdf5", "w") as f:
        f["x"] = arr
    with LogitsFile.open(tmp_path / "logits.hdf5") as lf:
        idx = np.concatenate([rng.integers(0, 30, size=40), np.arange(10, 18)])
        assert torch.equal(lf.read_rows(idx), torch.from_numpy(arr[idx]))


def test_big_endian_npy_is_converted(tmp_path):
    arr = _random(np.random.default_rng(3), 9, 5, np.float32)
    np.save(tmp_path / "be.npy", arr.astype(">f4"))
    with LogitsFile.open(tmp_path / "be.npy") as lf:
        assert lf.dtype == "fp32"
        assert torch.equal(lf.read(0, 9), torch.from_numpy(arr))
        assert torch.equal(lf.read_rows(np.array([8, 1, 1])), torch.from_numpy(arr[[8, 1, 1]]))


def test_returned_tensors_are_fresh_and_writable(tmp_path):
    arr = _random(np.random.default_rng(4), 10, 4, np.float32)
    np.save(tmp_path / "x.npy", arr)
    with LogitsFile.open(tmp_path / "x.npy") as lf:
        a = lf.read(0, 4)
        b = lf.read(0, 4)
        assert a.device.type == "cpu" and a.is_contiguous()
        a.zero_()  # writable, and shared with neither b nor a later read
        assert torch.equal(b, torch.from_numpy(arr[:4]))
        assert torch.equal(lf.read(0, 4), torch.from_numpy(arr[:4]))


def test_key_selects_one_of_two_tensors(tmp_path):
    rng = np.random.default_rng(5)
    a, b = _random(rng, 12, 7, np.float32), _random(rng, 15, 7, np.float64)
    st = tmp_path / "two.safetensors"
    safetensors.numpy.save_file({"a": a, "b": b}, str(st))
    h5 = tmp_path / "two.h5"
    with h5py.File(h5, "w") as f:
        f["a"] = a
        f["grp/b"] = b
    for path, key_b in ((st, "b"), (h5, "grp/b")):
        with LogitsFile.open(f"{path}::a") as lf:
            assert (lf.key, lf.n_rows, lf.dtype) == ("a", 12, "fp32")
            assert torch.equal(lf.read(0, 12), torch.from_numpy(a))
        with LogitsFile.open(f"{path}::{key_b}") as lf:
            assert (lf.key, lf.n_rows, lf.dtype) == (key_b, 15, "fp64")
            assert torch.equal(lf.read_rows(np.array([14, 0, 14])), torch.from_numpy(b[[14, 0, 14]]))
        with pytest.raises(UserError, match=r"several 2-D .*\(a, " + key_b):
            LogitsFile.open(path)
    with LogitsFile.open(f"{h5}::/grp/b") as lf:  # a leading slash names the same dataset
        assert lf.key == "grp/b"


def test_only_2d_float_candidate_is_chosen_without_key(tmp_path):
    rng = np.random.default_rng(6)
    arr = _random(rng, 8, 3, np.float32)
    path = tmp_path / "mixed.safetensors"
    safetensors.numpy.save_file({"ids": np.arange(8, dtype=np.int64), "logits": arr,
                                 "mask": np.ones((8, 3), dtype=np.int32)}, str(path))
    with LogitsFile.open(path) as lf:
        assert lf.key == "logits"
        assert torch.equal(lf.read(0, 8), torch.from_numpy(arr))


# --- fingerprint -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["npy", "safetensors", "hdf5"])
def test_fingerprint_stable_and_sensitive_to_the_last_row(tmp_path, fmt):
    arr = _random(np.random.default_rng(8), 20, 6, np.float32)
    path = tmp_path / {"npy": "x.npy", "safetensors": "x.safetensors", "hdf5": "x.h5"}[fmt]

    def write(values):
        if fmt == "npy":
            np.save(path, values)
        elif fmt == "safetensors":
            safetensors.numpy.save_file({"x": values}, str(path))
        else:
            with h5py.File(path, "w") as f:
                f["x"] = values

    write(arr)
    with LogitsFile.open(path) as one, LogitsFile.open(path) as two:
        first = one.fingerprint()
        assert len(first) == 64 and first == two.fingerprint() == one.fingerprint()
    changed = arr.copy()
    changed[-1, 3] += 1.0
    write(changed)
    with LogitsFile.open(path) as lf:
        assert lf.fingerprint() != first


# --- refusals ----------------------------------------------------------------------------------


def _refused(spec, word: str) -> None:
    with pytest.raises(UserError, match=word) as info:
        LogitsFile.open(spec)
    message = str(info.value)
    assert "\n" not in message and message.count(". ") == 0, message  # one sentence


def test_refuses_missing_file_folder_and_unknown_suffix(tmp_path):
    _refused(tmp_path / "nope.npy", "does not exist")
    (tmp_path / "dir.npy").mkdir()
    _refused(tmp_path / "dir.npy", "folder")
    (tmp_path / "x.pt").write_bytes(b"\0" * 16)
    _refused(tmp_path / "x.pt", r"not a logits format.*\.npy, \.safetensors or HDF5")
    (tmp_path / "noext").write_bytes(b"\0" * 16)
    _refused(tmp_path / "noext", "no suffix")
    _refused(f"{tmp_path / 'x.pt'}::", "empty name")


def test_refuses_truncated_files(tmp_path):
    arr = _random(np.random.default_rng(9), 50, 40, np.float32)
    np.save(tmp_path / "full.npy", arr)
    safetensors.numpy.save_file({"x": arr}, str(tmp_path / "full.safetensors"))
    with h5py.File(tmp_path / "full.h5", "w") as f:
        f["x"] = arr
    for suffix in (".npy", ".safetensors", ".h5"):
        data = (tmp_path / f"full{suffix}").read_bytes()
        (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) - 100])
        _refused(tmp_path / f"cut{suffix}", "truncated")
    # A safetensors header longer than the file.
    (tmp_path / "head.safetensors").write_bytes(struct.pack("<Q", 5000) + b"{}")
    _refused(tmp_path / "head.safetensors", "truncated")


def test_refuses_garbage_headers(tmp_path):
    (tmp_path / "g.npy").write_bytes(b"hello, this is not numpy" * 4)
    _refused(tmp_path / "g.npy", "magic")
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4 }"
    (tmp_path / "h.npy").write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + b"\0" * 64)
    _refused(tmp_path / "h.npy", "garbled")
    body = b"not json at all"
    (tmp_path / "g.safetensors").write_bytes(struct.pack("<Q", len(body)) + body)
    _refused(tmp_path / "g.safetensors", "not JSON")
    (tmp_path / "r.safetensors").write_bytes(os.urandom(64) + b"\xff" * 8)
    _refused(tmp_path / "r.safetensors", "unreadable safetensors header")
    bad = json.dumps({"x": {"dtype": "F32", "shape": [2, 3]}}).encode()
    (tmp_path / "e.safetensors").write_bytes(struct.pack("<Q", len(bad)) + bad + b"\0" * 24)
    _refused(tmp_path / "e.safetensors", "data_offsets")
    wrong = json.dumps({"x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}).encode()
    (tmp_path / "w.safetensors").write_bytes(struct.pack("<Q", len(wrong)) + wrong + b"\0" * 24)
    _refused(tmp_path / "w.safetensors", "need 24 bytes")
    (tmp_path / "g.h5").write_bytes(b"not an hdf5 file" * 8)
    _refused(tmp_path / "g.h5", "not a readable HDF5")


def test_refuses_wrong_shapes(tmp_path):
    np.save(tmp_path / "v.npy", np.zeros(10, dtype=np.float32))
    _refused(tmp_path / "v.npy", "not 2-D")
    np.save(tmp_path / "t.npy", np.zeros((2, 3, 4), dtype=np.float32))
    _refused(tmp_path / "t.npy", "not 2-D")
    np.save(tmp_path / "one.npy", np.zeros((1, 5), dtype=np.float32))
    _refused(tmp_path / "one.npy", "at least 2 rows")
    np.save(tmp_path / "zero.npy", np.zeros((4, 0), dtype=np.float32))
    _refused(tmp_path / "zero.npy", "0 columns")
    safetensors.numpy.save_file({"x": np.zeros((2, 3, 4), dtype=np.float32)}, str(tmp_path / "t.safetensors"))
    _refused(tmp_path / "t.safetensors", "not 2-D")
    with h5py.File(tmp_path / "one.h5", "w") as f:
        f["x"] = np.zeros((1, 5), dtype=np.float32)
    _refused(tmp_path / "one.h5", "at least 2 rows")


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.complex64, object, np.uint8])
def test_refuses_non_floating_npy(tmp_path, dtype):
    arr = np.zeros((3, 4), dtype=dtype)
    np.save(tmp_path / "x.npy", arr, allow_pickle=True)
    _refused(tmp_path / "x.npy", "must be floating point")


def test_refuses_non_floating_safetensors_and_hdf5(tmp_path):
    safetensors.numpy.save_file({"x": np.zeros((3, 4), dtype=np.int64)}, str(tmp_path / "i.safetensors"))
    _refused(tmp_path / "i.safetensors", "must be floating point")
    with h5py.File(tmp_path / "i.h5", "w") as f:
        f["x"] = np.zeros((3, 4), dtype=np.int16)
    _refused(tmp_path / "i.h5", "must be floating point")


def test_refuses_fortran_order(tmp_path):
    np.save(tmp_path / "f.npy", np.asfortranarray(np.zeros((3, 4), dtype=np.float32)))
    _refused(tmp_path / "f.npy", "Fortran")


def test_refuses_unknown_key_listing_names(tmp_path):
    arr = np.zeros((3, 4), dtype=np.float32)
    safetensors.numpy.save_file({"alpha": arr, "beta": arr}, str(tmp_path / "k.safetensors"))
    _refused(f"{tmp_path / 'k.safetensors'}::gamma", r"no tensor named 'gamma' \(it has: alpha, beta\)")
    with h5py.File(tmp_path / "k.h5", "w") as f:
        f["grp/alpha"] = arr
    _refused(f"{tmp_path / 'k.h5'}::beta", r"no dataset named 'beta' \(it has: grp/alpha\)")
    np.save(tmp_path / "k.npy", arr)
    _refused(f"{tmp_path / 'k.npy'}::alpha", "single array")


def test_refuses_files_without_a_candidate(tmp_path):
    safetensors.numpy.save_file({"a": np.zeros(3, np.float32), "b": np.zeros((3, 2), np.int8)},
                                str(tmp_path / "n.safetensors"))
    _refused(tmp_path / "n.safetensors", "no 2-D floating tensor")
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f.create_group("nothing")
    _refused(tmp_path / "empty.h5", "no datasets")


def test_bad_reads_are_value_errors(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((6, 2), dtype=np.float32))
    lf = LogitsFile.open(tmp_path / "x.npy")
    for start, stop in ((-1, 2), (3, 2), (0, 7)):
        with pytest.raises(ValueError):
            lf.read(start, stop)
    for idx in (np.array([0, 6]), np.array([-1]), np.array([[0, 1]]), np.array([0.5])):
        with pytest.raises(ValueError):
            lf.read_rows(idx)
    lf.close()
    lf.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        lf.read(0, 1)


# --- memory --------------------------------------------------------------------------------------


_CHILD = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    from rankest.sources.logits_file import LogitsFile
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    total = 0.0
    with LogitsFile.open(sys.argv[1]) as lf:
        for start in range(0, lf.n_rows, 256):
            chunk = lf.read(start, min(start + 256, lf.n_rows))
            # Summed by numpy: torch's own fp64 reduction adds 10-45 MiB of allocator noise
            # to the peak, with no reader involved, which would drown what is measured here.
            total += float(chunk.numpy().sum(dtype=np.float64))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(before, after, repr(total))
    """
)


@pytest.mark.slow
def test_reading_in_chunks_never_holds_the_file(tmp_path):
    n, v, block = 16384, 4096, 1024
    path = tmp_path / "big.npy"
    rng = np.random.default_rng(10)
    expected = 0.0
    with open(path, "wb") as fh:  # header + rows in blocks: the parent never holds 256 MiB either
        np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": (n, v)})
        for _ in range(n // block):
            rows = rng.standard_normal((block, v), dtype=np.float32) + 1.0
            expected += float(rows.sum(dtype=np.float64))
            rows.tofile(fh)
    assert path.stat().st_size > n * v * 4
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True,
                            env=env, timeout=120, cwd=pathlib.Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    before, after, total = result.stdout.split()
    increase_mib = (int(after) - int(before)) / 1024  # ru_maxrss is in KiB on Linux
    print(f"peak RSS increase while reading 256 MiB in 256-row chunks: {increase_mib:.1f} MiB")
    assert increase_mib < 64, f"RSS grew by {increase_mib:.1f} MiB"
    assert abs(float(total) - expected) <= 1e-9 * abs(expected)

"""Fault injection: damaged files, a full disk at each write, NaN / overflow at each stage, two
writers on one run folder. Every fault must end in exit 2 with one sentence (or the correct
result), never a traceback, a segfault or a silently different number, and must leave the
previous good state byte for byte as it was.

The oracle of a resumed run is the uninterrupted run of the same command line (fp64 teacher,
fp64 exact Gram: a resume adds the same chunks in the same order, so σ agrees to round-off).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rankest import cli
from rankest.diagnostics.head_spectrum import head_spectrum_metrics
from rankest.errors import UserError
from rankest.io import checkpoint as ckpt_mod
from rankest.io import h5 as h5_mod
from rankest.io.checkpoint import CHECKPOINT_NAME, read_checkpoint, write_checkpoint
from rankest.io.h5 import DIGEST_ATTR, digest, read_all
from rankest.io.results import read_spectrum_h5
from rankest.runtime import run as run_mod
from rankest.runtime.run import LOCK_NAME, lock_run_folder, prepare_run_folder, release_run_folder
from rankest.testing import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
TOKENS, SEQ = 256, 32  # 8 chunks of one 32-token window: a checkpoint after every 2

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- fixtures: a teacher folder, a corpus, a finished run, a checkpoint -------------------------
@pytest.fixture(scope="module")
def corpus(make_word_corpus):
    return make_word_corpus("integrity-corpus", seed=11)


@pytest.fixture(scope="module")
def neox(make_tiny_neox):
    return make_tiny_neox("integrity-neox", context_length=128, seed=5)


def estimate_args(neox, corpus, out, *extra):
    return ["estimate", "--teacher", str(neox), "--corpus", str(corpus), "--tokens", str(TOKENS), "--seq-len",
            str(SEQ), "--batch-size", "1", "--dtype", "fp64", "--device", "cpu", "--route", "gram", "--space",
            "prob", "--quiet", "--out", str(out), *extra]


def run_cli(argv, capsys) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


def assert_sentence(code: int, err: str, *needles: str) -> None:
    """Exit 2 and one line "rankest: error: …" containing every needle; no traceback."""
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("rankest: resuming")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("rankest: error:"), err
    assert "Traceback" not in err and "Exception ignored" not in err
    for n in needles:
        assert n in lines[0], err


@pytest.fixture(scope="module")
def reference(neox, corpus, tmp_path_factory):
    """The uninterrupted run: its folder (results.h5, results.json, report.md)."""
    out = tmp_path_factory.mktemp("integrity-ref") / "run"
    assert cli.main(estimate_args(neox, corpus, out)) == 0
    return out


@pytest.fixture(scope="module")
def a_checkpoint(neox, corpus, tmp_path_factory):
    """The checkpoint the same run leaves after 6 of its 8 chunks (its removal at the end skipped)."""
    out = tmp_path_factory.mktemp("integrity-ckpt") / "run"
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(run_mod, "remove_checkpoint", lambda path: None)
        assert cli.main(estimate_args(neox, corpus, out, "--checkpoint-every", "2")) == 0
    finally:
        mp.undo()
    ck = read_checkpoint(out / CHECKPOINT_NAME)
    assert ck.position["next_batch"] == 6 and ck.position["rows_done"] == 6 * SEQ
    return out / CHECKPOINT_NAME


def resume_folder(tmp_path, ckpt_bytes: bytes) -> Path:
    out = tmp_path / "run"
    out.mkdir()
    (out / CHECKPOINT_NAME).write_bytes(ckpt_bytes)
    return out


def raw_parts(path) -> dict:
    """A checkpoint's parts read without any check (to forge a correctly sealed variant)."""
    with h5py.File(path, "r") as f:
        attrs, arrays = read_all(f)
    states: dict = {}
    rng = {}
    for key, a in arrays.items():
        top, *rest = key.split("/")
        if top == "state":
            states.setdefault(rest[0], {})[rest[1]] = a
        else:
            rng[rest[0]] = a
    return {"config": json.loads(attrs["config"]), "derived": json.loads(attrs["derived"]),
            "position": json.loads(attrs["position"]),
            "convergence": {int(k): v for k, v in json.loads(attrs["convergence"]).items()},
            "states": states, "rng": rng}


def forge(src, dst, edit) -> None:
    """``dst`` = ``src`` with ``edit(parts)`` applied and a valid checksum: what only a deliberate
    forger (or a bug in rankest) could produce; the semantic checks must still refuse it."""
    parts = raw_parts(src)
    edit(parts)
    write_checkpoint(dst, **parts)


def flip_byte(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


# ---- 1. a checkpoint edited or damaged --------------------------------------------------------
ATTR_EDITS = {
    "next_batch": ("position", lambda p: p.replace('"next_batch": 6', '"next_batch": 4')),
    "rows_done": ("position", lambda p: p.replace('"rows_done": 192', '"rows_done": 128')),
    "config": ("config", lambda c: c.replace('"seed": 0', '"seed": 1')),
    "derived": ("derived", lambda d: d.replace('"n_cols": 320', '"n_cols": 321')),
    "convergence": ("convergence", lambda c: c.replace("1", "2", 1)),
}


@pytest.mark.parametrize("edit", sorted(ATTR_EDITS))
def test_edited_checkpoint_attribute_refused(edit, a_checkpoint, neox, corpus, tmp_path, capsys):
    out = resume_folder(tmp_path, a_checkpoint.read_bytes())
    attr, change = ATTR_EDITS[edit]
    with h5py.File(out / CHECKPOINT_NAME, "a") as f:
        before = f.attrs[attr]
        f.attrs[attr] = change(before)
        assert f.attrs[attr] != before, "the edit must change something"
    saved = (out / CHECKPOINT_NAME).read_bytes()
    assert_sentence(*run_cli(estimate_args(neox, corpus, out, "--resume"), capsys), "checksum does not match")
    assert (out / CHECKPOINT_NAME).read_bytes() == saved, "the refused checkpoint is left as it was"
    assert not (out / "results.h5").exists()


@pytest.mark.parametrize("dataset", ["state/gram/n_rows", "state/row_stats/n_rows", "rng/python_rest",
                                     "rng/numpy_keys", "state/gram/gram"])
def test_flipped_bit_in_a_dataset_refused(dataset, a_checkpoint, neox, corpus, tmp_path, capsys):
    """Scalars are stored plain (no Fletcher-32): the file's sha256 must catch a flip there."""
    out = resume_folder(tmp_path, a_checkpoint.read_bytes())
    with h5py.File(out / CHECKPOINT_NAME, "r") as f:
        ds = f[dataset]
        offset = ds.id.get_offset() if ds.chunks is None else ds.id.get_chunk_info(0).byte_offset
    flip_byte(out / CHECKPOINT_NAME, offset + 1)
    assert_sentence(*run_cli(estimate_args(neox, corpus, out, "--resume"), capsys), "damaged")


FORGERIES = {
    "next_batch beyond rows": (lambda p: p["position"].update(next_batch=4), "inconsistent"),
    "state rows": (lambda p: p["states"]["gram"].update(n_rows=np.asarray(100)), "inconsistent"),
    "NaN in state": (lambda p: p["states"]["gram"]["gram"].__setitem__((3, 3), np.nan), "non-finite"),
    "Inf in stats": (lambda p: p["states"]["row_stats"]["sums"].__setitem__(0, np.inf), "non-finite"),
    "wrong-shape state": (lambda p: p["states"]["gram"].update(gram=np.zeros((7, 7))), "cannot continue"),
    "bad RNG": (lambda p: p["rng"].update(torch=np.zeros(3, np.uint8)), "RNG"),
    "other command": (lambda p: p["position"].update(command="heads"), "not a estimate checkpoint"),
}


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_sealed_but_inconsistent_checkpoint_refused(forgery, a_checkpoint, neox, corpus, tmp_path, capsys):
    edit, needle = FORGERIES[forgery]
    out = tmp_path / "run"
    out.mkdir()
    forge(a_checkpoint, out / CHECKPOINT_NAME, edit)
    assert_sentence(*run_cli(estimate_args(neox, corpus, out, "--resume"), capsys), needle)


def test_checkpoint_layout_and_declared_size_refused(a_checkpoint, tmp_path):
    """A dataset where a group belongs, and a state that declares 10¹² entries (chunked, fill
    value: an 18 KB file) — refused before anything is allocated."""
    bad = tmp_path / "group.h5"
    shutil.copy(a_checkpoint, bad)
    with h5py.File(bad, "a") as f:
        del f["state/gram"]
        f["state/gram"] = np.zeros(3)
    with pytest.raises(UserError, match="not laid out"):
        read_checkpoint(bad)
    huge = tmp_path / "huge.h5"
    shutil.copy(a_checkpoint, huge)
    with h5py.File(huge, "a") as f:
        del f["state/gram/gram"]
        f["state/gram"].create_dataset("gram", shape=(10**6, 10**6), dtype="f8", chunks=(64, 64))
    assert huge.stat().st_size < 10**6
    with pytest.raises(UserError, match="declares shape"):
        read_checkpoint(huge)


@pytest.mark.parametrize("content", ["json", "foreign-h5", "results"])
def test_foreign_file_given_to_resume(content, reference, neox, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    target = out / CHECKPOINT_NAME
    if content == "json":
        target.write_text(json.dumps({"next_batch": 3, "format": "rankest.checkpoint"}))
    elif content == "foreign-h5":
        with h5py.File(target, "w") as f:
            f["x"] = np.arange(4.0)
    else:
        shutil.copy(reference / "results.h5", target)
    needle = {"json": "not a readable HDF5", "foreign-h5": "not a rankest checkpoint",
              "results": "results file, not a rankest checkpoint"}[content]
    assert_sentence(*run_cli(estimate_args(neox, corpus, out, "--resume"), capsys), needle)


def test_good_checkpoint_resumes_to_the_uninterrupted_result(a_checkpoint, reference, neox, corpus, tmp_path,
                                                              capsys):
    out = resume_folder(tmp_path, a_checkpoint.read_bytes())
    code, err = run_cli(estimate_args(neox, corpus, out, "--resume"), capsys)
    assert code == 0, err
    assert "resuming from" in err and "192 rows done (batch 6 of 8)" in err  # says where it resumed
    got, want = read_spectrum_h5(out / "results.h5"), read_spectrum_h5(reference / "results.h5")
    np.testing.assert_allclose(got.sigma, want.sigma, rtol=1e-10, atol=1e-12 * want.sigma[0])
    assert got.n_rows == want.n_rows == TOKENS
    assert not (out / CHECKPOINT_NAME).exists() and not (out / LOCK_NAME).exists()


# ---- 2. results.h5 damaged, forged or declaring 10¹² entries ---------------------------------------
def reseal(path: Path) -> None:
    """Recompute a results file's sha256 after an edit (a forger's, or a bug's, file)."""
    with h5py.File(path, "a") as f:
        f.attrs[DIGEST_ATTR] = h5_mod.file_digest(f)


def _results_variant(kind: str, src: Path, dst: Path) -> str:
    shutil.copy(src, dst)
    with h5py.File(dst, "a") as f:
        info = json.loads(f.attrs["spectrum"])
        if kind == "route emptied":
            f.attrs["spectrum"] = json.dumps({**info, "route": ""})
            return "checksum does not match"
        if kind == "summary edited":
            f.attrs["summary"] = f.attrs["summary"].replace("1", "2", 1)
            return "checksum does not match"
        if kind == "sigma declares 1e12":
            del f["sigma"]
            f.create_dataset("sigma", shape=(10**12,), dtype="f8", chunks=(4096,))
            return "declares shape"
        if kind == "huge n_rows, sigma 2.5e8":  # the record allows it; the file's size does not
            f.attrs["spectrum"] = json.dumps({**info, "n_rows": 10**12, "n_cols": 10**12})
            del f["sigma"]
            f.create_dataset("sigma", shape=(250_000_000,), dtype="f8", chunks=(4096,))
            return "declares shape"
        if kind == "no checksum":
            del f.attrs[DIGEST_ATTR]
            return "no sha256"
    # the rest are sealed again: the schema checks must refuse them on their own
    with h5py.File(dst, "a") as f:
        info = json.loads(f.attrs["spectrum"])
        if kind == "2-D sigma":
            s = f["sigma"][...]
            del f["sigma"]
            f["sigma"] = np.stack([s, s])
            needle = "in one dimension"
        elif kind == "bogus space":
            f.attrs["spectrum"] = json.dumps({**info, "space": "banana"})
            needle = "its space is 'banana'"
        elif kind == "bogus route":
            f.attrs["spectrum"] = json.dumps({**info, "route": "magic"})
            needle = "its route is 'magic'"
        elif kind == "sigma longer than V'":
            f.attrs["spectrum"] = json.dumps({**info, "n_cols": 5})
            needle = "at most 5"
        else:
            raise ValueError(kind)
    reseal(dst)
    return needle


RESULT_FAULTS = ["route emptied", "summary edited", "sigma declares 1e12", "huge n_rows, sigma 2.5e8", "no checksum",
                 "2-D sigma", "bogus space", "bogus route", "sigma longer than V'"]


@pytest.mark.parametrize("kind", RESULT_FAULTS)
def test_damaged_results_refused_by_report(kind, reference, tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    needle = _results_variant(kind, reference / "results.h5", folder / "results.h5")
    t0 = time.perf_counter()
    assert_sentence(*run_cli(["report", folder], capsys), needle)
    assert time.perf_counter() - t0 < 20, "refused from the header, not after reading what it declares"


def test_foreign_json_given_to_report(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "results.h5").write_text('{"sigma": [1, 2, 3]}')
    assert_sentence(*run_cli(["report", folder], capsys), "not a readable HDF5")


# ---- 3. a full disk at each write ---------------------------------------------------------------
class FullDisk:
    """Make the n-th write of the error-recording HDF5 writer (and of text files written
    atomically) fail with ENOSPC, as a full disk does."""

    def __init__(self, monkeypatch, fail_at: int) -> None:
        self.n, self.fail_at = 0, fail_at
        real_write = h5_mod._Sink.write

        def write(sink, b):
            self.n += 1
            if self.n == self.fail_at:
                sink.error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(sink, b)

        monkeypatch.setattr(h5_mod._Sink, "write", write)


def _checkpoint_parts(rng) -> dict:
    return {"config": {"seed": 1}, "derived": {"n_cols": 9}, "position": {"next_batch": 2, "rows_done": 8},
            "convergence": {4: {"stable_rank": 1.5}},
            "states": {"gram": {"gram": rng.standard_normal((40, 40)), "n_rows": np.asarray(8)}},
            "rng": {"numpy_keys": np.arange(624, dtype=np.uint32)}}


def test_full_disk_at_each_checkpoint_write_keeps_the_previous(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    path = tmp_path / CHECKPOINT_NAME
    write_checkpoint(path, **_checkpoint_parts(rng))
    good = path.read_bytes()
    counter = FullDisk(monkeypatch, fail_at=0)
    write_checkpoint(tmp_path / "count.h5", **_checkpoint_parts(rng))
    n_writes = counter.n
    assert n_writes >= 5
    for k in range(1, n_writes + 1):
        with monkeypatch.context() as m:
            FullDisk(m, fail_at=k)
            with pytest.raises(ckpt_mod.CheckpointWriteError) as info:
                write_checkpoint(path, **_checkpoint_parts(rng))
        msg = str(info.value)
        assert "No space left on device (ENOSPC)" in msg and "intact" in msg and "\n" not in msg
        assert path.read_bytes() == good, f"write {k}: the previous checkpoint changed"
        assert not list(tmp_path.glob(".*.tmp")), f"write {k}: a temporary file was left"
    assert read_checkpoint(path).position["next_batch"] == 2


def test_full_disk_at_each_results_write(reference, tmp_path, monkeypatch):
    spec = read_spectrum_h5(reference / "results.h5")
    path = tmp_path / "results.h5"
    spec.save(path)
    good = path.read_bytes()
    counter = FullDisk(monkeypatch, fail_at=0)
    spec.save(tmp_path / "count.h5")
    for k in range(1, counter.n + 1):
        with monkeypatch.context() as m:
            FullDisk(m, fail_at=k)
            with pytest.raises(OSError):
                spec.save(path)
        assert path.read_bytes() == good and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_full_disk_while_writing_the_run_folder(checkpointing, neox, corpus, tmp_path, monkeypatch, capsys):
    """The report fails after results.h5 / results.json were written: exit 2, one sentence, those
    files removed (no folder with results but no report); the checkpoint, if any, intact."""
    import rankest.estimator.pipeline as pipeline

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pipeline, "write_report", full)
    out = tmp_path / "run"
    extra = ["--checkpoint-every", "2"] if checkpointing else []
    code, err = run_cli(estimate_args(neox, corpus, out, *extra), capsys)
    assert_sentence(code, err, "could not write the results", "No space left on device (ENOSPC)")
    if checkpointing:
        assert sorted(p.name for p in out.iterdir()) == [CHECKPOINT_NAME] and "--resume" in err
        assert read_checkpoint(out / CHECKPOINT_NAME).position["next_batch"] == 6
    else:
        assert not out.exists(), "a failed run leaves no empty folder"


def _can_mount_tmpfs(where: Path) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    where.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(where)],
                        capture_output=True).returncode == 0
    return ok


@pytest.mark.slow  # a real process on a real full disk
def test_real_full_disk_no_segfault(neox, corpus, tmp_path):
    """On a 1.2 MB tmpfs the second checkpoint (0.8 MB of Gram) does not fit: one sentence, exit 2
    (it used to print 8 h5py dealloc tracebacks and segfault), the first checkpoint intact."""
    mnt = tmp_path / "mnt"
    if not _can_mount_tmpfs(mnt):
        pytest.skip("cannot mount a tmpfs here (needs root); the monkeypatched full-disk tests cover the logic")
    try:
        args = estimate_args(neox, corpus, mnt / "run", "--checkpoint-every", "1")
        args[args.index("--tokens") + 1] = "2048"
        proc = subprocess.run([sys.executable, "-m", "rankest", *args], env=subprocess_env(ROOT),
                              capture_output=True, text=True, timeout=300)
        assert_sentence(proc.returncode, proc.stderr.strip(), "No space left on device (ENOSPC)", "intact")
        ck = read_checkpoint(mnt / "run" / CHECKPOINT_NAME)
        assert ck.position["next_batch"] >= 1
        assert (os.stat(mnt / "run" / CHECKPOINT_NAME).st_mode & 0o777) == 0o666 & ~_umask()
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# ---- 4. NaN and overflow at each stage -------------------------------------------------------------
@pytest.fixture(scope="module")
def damaged_teachers(neox, tmp_path_factory):
    """Copies of the teacher with one NaN embedding row, one NaN head row, a NaN in the final
    norm, an Inf in a layer, and a head scaled by 1e37 (finite, but its logits overflow)."""
    edits = {"nan-embedding": ("gpt_neox.embed_in.weight", lambda w: w.index_fill_(0, torch.tensor([7]), float("nan"))),
             "nan-head-row": ("embed_out.weight", lambda w: w.index_fill_(0, torch.tensor([3]), float("nan"))),
             "nan-final-norm": ("gpt_neox.final_layer_norm.weight", lambda w: w.index_fill_(0, torch.tensor([0]),
                                                                                             float("nan"))),
             "inf-layer": ("gpt_neox.layers.0.mlp.dense_h_to_4h.weight",
                           lambda w: w.index_fill_(0, torch.tensor([1]), float("inf"))),
             "head-1e37": ("embed_out.weight", lambda w: w.mul_(1e37))}
    out = {}
    for name, (key, edit) in edits.items():
        folder = tmp_path_factory.mktemp(name)
        for p in Path(neox).iterdir():
            shutil.copy(p, folder / p.name)
        sd = load_file(folder / "model.safetensors")
        assert key in sd, sorted(sd)
        edit(sd[key])
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
        out[name] = (folder, NAMED[name])
    return out


#: What each damage's sentence must name (the loaded module's parameter: the saved embed_out is lm_head).
NAMED = {"nan-embedding": "embed_in.weight of teacher", "nan-head-row": "head.weight of teacher",
         "nan-final-norm": "final_layer_norm.weight of teacher", "inf-layer": "layers.0.mlp.dense_h_to_4h.weight of teacher",
         "head-1e37": "head"}


def _command(cmd: str, teacher: Path, corpus, out: Path) -> list:
    common = ["--teacher", teacher, "--corpus", corpus, "--seq-len", SEQ, "--device", "cpu", "--quiet"]
    return {"estimate": ["estimate", *common, "--tokens", TOKENS, "--route", "factor", "--out", out],
            "heads": ["heads", *common, "--tokens", 512, "--val-tokens", 256, "--ranks", "4", "--steps", 2,
                      "--out", out],
            "anisotropy": ["anisotropy", *common, "--tokens", TOKENS, "--out", out],
            "head-spectrum": ["head-spectrum", "--teacher", teacher, "--device", "cpu", "--out", out]}[cmd]


@pytest.mark.parametrize("cmd", ["estimate", "heads", "anisotropy", "head-spectrum"])
@pytest.mark.parametrize("damage", ["nan-embedding", "nan-head-row", "nan-final-norm", "inf-layer"])
def test_nan_weights_named_by_every_command(cmd, damage, damaged_teachers, corpus, tmp_path, capsys):
    teacher, key = damaged_teachers[damage]
    out = tmp_path / "run"
    assert_sentence(*run_cli(_command(cmd, teacher, corpus, out), capsys), key, "NaN or infinite")
    assert not out.exists(), "a failed run leaves no empty folder"


def test_head_scaled_1e37_overflow_is_a_sentence(damaged_teachers, corpus, tmp_path, capsys):
    teacher, _ = damaged_teachers["head-1e37"]
    for route in ("factor", "gram"):
        argv = _command("estimate", teacher, corpus, tmp_path / route)
        argv[argv.index("factor")] = route
        assert_sentence(*run_cli(argv, capsys), "overflow")
    # head-spectrum's fp64 SVD of 1e37-sized entries is exact: that is a correct result, not a fault
    code, err = run_cli(_command("head-spectrum", teacher, corpus, tmp_path / "hs"), capsys)
    assert code == 0, err


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_head_spectrum_of_non_finite_head(bad):
    w = torch.randn(50, 8, dtype=torch.float64)
    w[4, 2] = bad
    with pytest.raises(UserError, match="row 4"):
        head_spectrum_metrics(w, 50)


@pytest.mark.parametrize("cmd", ["estimate", "heads", "anisotropy"])
def test_nan_features_midway(cmd, neox, corpus, tmp_path, monkeypatch, capsys):
    """Finite weights, but the forward pass goes NaN from the 2nd call on (a kernel bug, an fp16
    overflow; estimate's batch 0 comes from the forward that checks the head, not these methods):
    the command stops with a sentence, never a NaN result."""
    from rankest.sources import teachers

    calls = {"n": 0}
    features, hidden = teachers.Teacher.features, teachers.Teacher.hidden_states

    def poison(t):
        calls["n"] += 1
        return t if calls["n"] < 2 else torch.full_like(t, float("nan"))

    full = teachers.Teacher.full_logits
    monkeypatch.setattr(teachers.Teacher, "features", lambda self, ids: poison(features(self, ids)))
    monkeypatch.setattr(teachers.Teacher, "full_logits", lambda self, ids: poison(full(self, ids)))
    monkeypatch.setattr(teachers.Teacher, "hidden_states",
                        lambda self, ids: (lambda h, ls: (h, tuple(poison(x) for x in ls)))(*hidden(self, ids)))
    argv = _command(cmd, neox, corpus, tmp_path / "run")
    if cmd == "estimate":
        argv[argv.index("factor")] = "gram"
        argv += ["--batch-size", "2"]  # 4 batches: batch 0 comes from the head check's own forward
    assert_sentence(*run_cli(argv, capsys), "NaN")


# ---- 5. two writers ---------------------------------------------------------------------------------
HOLDER = """
import sys, time
from pathlib import Path
from rankest.runtime.run import lock_run_folder
lock_run_folder(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(120)
"""


def test_second_writer_refused_and_dead_holder_leaves_no_stale_lock(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], env=subprocess_env(ROOT),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for overwrite in (False, True):
            with pytest.raises(UserError, match=f"another rankest process \\(pid {holder.pid}\\) is writing"):
                prepare_run_folder(folder, overwrite=overwrite)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (folder / LOCK_NAME).exists(), "kill -9 leaves the lock file behind ..."
    prepare_run_folder(folder, overwrite=True)  # ... but not the lock: the kernel dropped it
    assert (folder / LOCK_NAME).read_text().strip() == str(os.getpid())
    release_run_folder(folder)
    assert not (folder / LOCK_NAME).exists()


@pytest.mark.slow  # two real processes on one --out
def test_two_runs_on_one_fresh_folder(neox, corpus, tmp_path):
    out = tmp_path / "run"
    args = estimate_args(neox, corpus, out, "--checkpoint-every", "1")
    args[args.index("--tokens") + 1] = "2048"  # 64 chunks, a checkpoint after each: the first outlives the second's start
    first = subprocess.Popen([sys.executable, "-m", "rankest", *map(str, args)], env=subprocess_env(ROOT),
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / LOCK_NAME).exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "-m", "rankest", *map(str, args[:-2]), "--overwrite"],
                            env=subprocess_env(ROOT), capture_output=True, text=True, timeout=300)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    if second.returncode == 0:  # the first had finished before the second started: nothing to prove
        pytest.skip("the first run finished before the second began")
    assert_sentence(second.returncode, second.stderr.strip(), "another rankest process", "is writing")
    got = read_spectrum_h5(out / "results.h5")  # the first run's, complete and untouched by the second
    assert got.n_rows == 2048 and (out / "report.md").exists() and not (out / CHECKPOINT_NAME).exists()
    assert not list(out.glob(".*.tmp")) and not (out / LOCK_NAME).exists()


def test_in_process_relock_and_release(tmp_path):
    folder = tmp_path / "new"
    prepare_run_folder(folder)
    lock_run_folder(folder)  # the same process again: a no-op
    release_run_folder(folder)
    assert not folder.exists(), "an empty folder this run created is removed on release"


# ---- 6. smaller: permissions, --out "", the datasets cache -----------------------------------------
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_output_files_get_umask_permissions(reference):
    want = 0o666 & ~_umask()
    for p in reference.iterdir():
        assert (p.stat().st_mode & 0o777) == want, p.name
    assert not (reference / LOCK_NAME).exists()


@pytest.mark.parametrize("cmd", ["estimate", "heads", "anisotropy", "head-spectrum"])
def test_empty_out_refused(cmd, neox, corpus, capsys):
    argv = _command(cmd, neox, corpus, "")
    assert_sentence(*run_cli(argv, capsys), "--out is empty")


def test_jsonl_corpus_leaves_nothing_in_the_datasets_cache(neox, corpus, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "hf-datasets"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    docs = [p for p in Path(corpus).read_text().split("\n\n") if p.strip()]
    jl = tmp_path / "docs.jsonl"
    jl.write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    argv = estimate_args(neox, jl, tmp_path / "run")
    code, err = run_cli(argv, capsys)
    assert code == 0, err
    assert not cache.exists() or not any(cache.rglob("*")), sorted(map(str, cache.rglob("*")))[:5]
    s_txt = read_spectrum_h5(tmp_path / "run" / "results.h5")
    assert s_txt.n_rows == TOKENS


def test_digest_is_one_definition():
    """The writer's digest (from what it writes) equals the reader's (from the file)."""
    rng = np.random.default_rng(3)
    arrays = {"a/x": rng.standard_normal((5, 3)), "b": np.asarray(7), "c": np.zeros(0)}
    attrs = {"format": "t", "version": 2, "flag": True, "json": json.dumps({"k": [1, 2.5, None]})}
    assert digest(attrs, arrays) == digest(dict(attrs), {k: v.copy() for k, v in arrays.items()})
    assert digest(attrs, arrays) != digest({**attrs, "version": 3}, arrays)
    flipped = {**arrays, "a/x": arrays["a/x"].copy()}
    flipped["a/x"].reshape(-1).view(np.uint8)[5] ^= 1
    assert digest(attrs, arrays) != digest(attrs, flipped)


# ---- 7. heads: an edited step, a forged history, a damaged feature cache -----------------------------
def heads_args(neox, corpus, out, *extra):
    return ["heads", "--teacher", neox, "--corpus", corpus, "--seq-len", SEQ, "--device", "cpu", "--dtype", "fp64",
            "--tokens", 512, "--val-tokens", 256, "--ranks", "4,8", "--steps", 4, "--quiet", "--out", out, *extra]


@pytest.fixture(scope="module")
def heads_checkpoint(neox, corpus, tmp_path_factory):
    """A heads sweep's checkpoint after 3 of its 4 steps (its removal at the end skipped), and
    the sweep's feature cache."""
    base = tmp_path_factory.mktemp("integrity-heads")
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(run_mod, "remove_checkpoint", lambda path: None)
        assert cli.main([str(a) for a in heads_args(neox, corpus, base / "run", "--checkpoint-every", 1,
                                                    "--cache-features", base / "feats.h5")]) == 0
    finally:
        mp.undo()
    ck = read_checkpoint(base / "run" / CHECKPOINT_NAME)
    assert ck.position["step"] == 3
    return base / "run" / CHECKPOINT_NAME, base / "feats.h5"


def test_heads_edited_step_refused(heads_checkpoint, neox, corpus, tmp_path, capsys):
    out = resume_folder(tmp_path, heads_checkpoint[0].read_bytes())
    with h5py.File(out / CHECKPOINT_NAME, "a") as f:
        f.attrs["position"] = f.attrs["position"].replace('"step": 3', '"step": 2')
    assert_sentence(*run_cli(heads_args(neox, corpus, out, "--resume"), capsys), "checksum does not match")


@pytest.mark.parametrize("forgery", ["step", "history"])
def test_heads_forged_position_refused(forgery, heads_checkpoint, neox, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()

    def edit(p):
        if forgery == "step":
            p["position"]["step"] = 2
        else:
            p["states"]["history"]["train_loss"] = p["states"]["history"]["train_loss"][:1]

    forge(heads_checkpoint[0], out / CHECKPOINT_NAME, edit)
    argv = heads_args(neox, corpus, out, "--resume", "--cache-features", heads_checkpoint[1])
    assert_sentence(*run_cli(argv, capsys), "inconsistent")


@pytest.mark.parametrize("damage", ["attr", "declared", "no checksum", "older format"])
def test_damaged_feature_cache_refused(damage, heads_checkpoint, neox, corpus, tmp_path, capsys):
    cache = tmp_path / "feats.h5"
    shutil.copy(heads_checkpoint[1], cache)
    with h5py.File(cache, "a") as f:
        if damage == "attr":
            f.attrs["linear_head_rel_err"] = 0.5
            needle = "checksum does not match"
        elif damage == "declared":
            del f["val_features"]
            f.create_dataset("val_features", shape=(10**9, 32), dtype="f4", chunks=(1024, 32))
            needle = "declares shape"
        elif damage == "no checksum":
            del f.attrs[DIGEST_ATTR]
            needle = "no sha256"
        else:  # what a cache of format 1 (before checksums) looks like
            del f.attrs[DIGEST_ATTR]
            f.attrs["version"] = 1
            needle = "older rankest"
    argv = heads_args(neox, corpus, tmp_path / "run", "--cache-features", cache)
    assert_sentence(*run_cli(argv, capsys), needle)


# ---- 8. the row cache of --passes ------------------------------------------------------------------
def test_row_cache_full_disk_and_forged_header(tmp_path):
    from rankest.io.rowcache import RowCache

    cache = RowCache(tmp_path / "rows.h5", n_cols=16, n_rows=64)
    cache.append(torch.ones(8, 16))
    cache.sync()

    class Full:
        shape = (64, 16)

        def __setitem__(self, key, value):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    cache._rows = Full()
    with pytest.raises(UserError, match=r"could not write the row cache .*No space left on device \(ENOSPC\)"):
        cache.append(torch.ones(8, 16))
    assert not cache._file.id.valid, "the file is closed at once, not at garbage collection"
    with h5py.File(tmp_path / "forged.h5", "w") as f:
        ds = f.create_dataset("rows", shape=(10**7, 16), dtype="f4", chunks=(1024, 16))
        ds.attrs["dtype"] = "fp32"
    with pytest.raises(UserError, match="declares shape"):
        RowCache(tmp_path / "forged.h5", n_cols=16, n_rows=10**7, resume_rows=8)


@pytest.mark.parametrize("cmd", ["anisotropy", "head-spectrum"])
def test_full_disk_in_a_diagnostics_sweep(cmd, neox, corpus, tmp_path, monkeypatch, capsys):
    """The result file's append fails: one sentence, no partial file, no empty folder left."""
    FullDisk(monkeypatch, fail_at=2)
    out = tmp_path / "run"
    assert_sentence(*run_cli(_command(cmd, neox, corpus, out), capsys), "No space left on device (ENOSPC)")
    assert not out.exists() or not [p for p in out.iterdir() if p.suffix == ".h5"]


def test_full_disk_while_writing_the_feature_cache(neox, corpus, tmp_path, monkeypatch, capsys):
    FullDisk(monkeypatch, fail_at=3)
    cache = tmp_path / "feats.h5"
    argv = heads_args(neox, corpus, tmp_path / "run", "--cache-features", cache)
    assert_sentence(*run_cli(argv, capsys), "could not write the feature cache", "ENOSPC")
    assert not cache.exists() and not list(tmp_path.glob(".feats.h5.*"))


def test_row_cache_damaged_between_kill_and_resume(tmp_path):
    """A byte of the checkpointed rows changes on disk: the reopen's sha256 refuses it."""
    from rankest.io.rowcache import RowCache

    g = torch.Generator().manual_seed(0)
    cache = RowCache(tmp_path / "rows.h5", n_cols=16, n_rows=64)
    cache.append(torch.randn(24, 16, generator=g))
    cache.sync()  # what a checkpoint at 24 rows does first
    cache.append(torch.randn(8, 16, generator=g))
    cache.sync()  # and at 32
    cache.close()
    for rows in (24, 32):  # both checkpointed counts reopen
        RowCache(tmp_path / "rows.h5", n_cols=16, n_rows=64, resume_rows=rows).close()
    with h5py.File(tmp_path / "rows.h5", "r") as f:
        offset = f["rows"].id.get_offset()
    flip_byte(tmp_path / "rows.h5", offset + 16 * 4 * 5 + 2)
    with pytest.raises(UserError, match="sha256 differs"):
        RowCache(tmp_path / "rows.h5", n_cols=16, n_rows=64, resume_rows=24)

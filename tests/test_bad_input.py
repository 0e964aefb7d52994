"""Every bad input gets a CheckpointError with context, and loses nothing."""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from h5ckpt import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointInfo,
    CheckpointManager,
    CheckpointNotFoundError,
    CheckpointValueError,
    CheckpointVersionError,
    LoadLimits,
    _native,
)


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name != ".h5ckpt.lock")


@pytest.mark.parametrize("batch_idx", [-1, 1.5, "3", None, True, np.float64(2.0), 2**63])
def test_bad_batch_idx(ckpt_dir: Path, batch_idx):
    m = CheckpointManager(ckpt_dir)
    with pytest.raises(CheckpointValueError) as info:
        m.save_checkpoint(batch_idx, np.ones(2), {}, 0.0)
    assert "batch_idx" in str(info.value)
    assert isinstance(info.value.error_context, dict)
    assert _files(ckpt_dir) == []


def test_numpy_integer_batch_idx_is_fine(ckpt_dir: Path):
    m = CheckpointManager(ckpt_dir)
    assert m.save_checkpoint(np.int32(4), np.ones(2), {}, 0.0).name == "checkpoint_batch_0004.h5"


@pytest.mark.parametrize(
    "params",
    [np.array([object(), 1], dtype=object), np.array(["a", "b"]), {"a": 1}, "text"],
)
def test_bad_parameters(ckpt_dir: Path, params):
    m = CheckpointManager(ckpt_dir)
    m.save_checkpoint(1, np.ones(2), {}, 0.0)
    with pytest.raises(CheckpointValueError) as info:
        m.save_checkpoint(2, params, {}, 0.0)
    assert "parameters" in str(info.value)
    assert _files(ckpt_dir) == ["checkpoint_batch_0001.h5"]


@pytest.mark.parametrize(
    ("state", "where"),
    [
        ({"a": {"b": object()}}, "['a']['b']"),
        ({1: 2}, "optimizer_state"),
        ({"x": [1, {2, 3}]}, "['x'][1]"),
        ({"arr": np.array([None, 1], dtype=object)}, "['arr']"),
    ],
)
def test_unsupported_state_names_key_path(ckpt_dir: Path, state, where):
    m = CheckpointManager(ckpt_dir)
    with pytest.raises(CheckpointValueError) as info:
        m.save_checkpoint(1, np.ones(2), state, 0.0)
    assert where in str(info.value)
    assert _files(ckpt_dir) == []


def test_bad_loss(ckpt_dir: Path):
    m = CheckpointManager(ckpt_dir)
    with pytest.raises(CheckpointValueError):
        m.save_checkpoint(1, np.ones(2), {}, "low")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"checkpoint_frequency": 0},
        {"keep_last_n": 0},
        {"keep_last_n": -2},
        {"keep_every": 0},
        {"keep_best_n": -1},
        {"best_mode": "median"},
        {"prefix": ""},
        {"prefix": "a/b"},
        {"compression": "brotli"},
        {"hmac_key": b""},
        {"hmac_key": 5},
    ],
)
def test_bad_manager_arguments(ckpt_dir: Path, kwargs):
    with pytest.raises(CheckpointValueError):
        CheckpointManager(ckpt_dir, **kwargs)


def test_directory_that_cannot_be_created(tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError) as info:
        CheckpointManager(blocker / "sub")
    assert "sub" in str(info.value)
    with pytest.raises(CheckpointError):
        CheckpointManager(blocker)


def test_directory_that_cannot_be_written(tmp_path: Path):
    d = tmp_path / "ro"
    d.mkdir()
    m = CheckpointManager(d)
    m.save_checkpoint(1, np.ones(2), {}, 0.0)
    # A read-only file system refuses even root; a bind-free way to get one is a
    # directory that is replaced by a file under the manager.
    os.rename(d, tmp_path / "moved")
    d.write_text("now a file")
    with pytest.raises(CheckpointError):
        m.save_checkpoint(2, np.ones(2), {}, 0.0)
    assert (tmp_path / "moved" / "checkpoint_batch_0001.h5").exists()


def test_missing_file(ckpt_dir: Path):
    m = CheckpointManager(ckpt_dir)
    with pytest.raises(CheckpointNotFoundError) as info:
        m.load_checkpoint(ckpt_dir / "nope.h5")
    assert isinstance(info.value, FileNotFoundError)
    assert info.value.error_context["path"].endswith("nope.h5")
    assert m.validate_checkpoint(ckpt_dir / "nope.h5") is False


@pytest.mark.parametrize(
    "content", [b"", b"hello world", b"\x00" * 4096, b"PK\x03\x04" + bytes(600)]
)
def test_foreign_file(ckpt_dir: Path, content):
    m = CheckpointManager(ckpt_dir)
    p = ckpt_dir / "checkpoint_batch_0001.h5"
    p.write_bytes(content)
    with pytest.raises(CheckpointCorruptError):
        m.load_checkpoint(p)
    assert m.validate_checkpoint(p) is False


def test_path_of_wrong_type_and_directory(ckpt_dir: Path):
    m = CheckpointManager(ckpt_dir)
    with pytest.raises(CheckpointValueError):
        m.load_checkpoint(12)
    with pytest.raises(CheckpointError):
        m.load_checkpoint(ckpt_dir)
    assert m.validate_checkpoint(12) is False
    assert m.validate_checkpoint(ckpt_dir) is False


def test_newer_major_format_version(ckpt_dir: Path):
    m = CheckpointManager(ckpt_dir)
    p = m.save_checkpoint(1, np.ones(2), {}, 0.0)
    raw = bytearray(p.read_bytes())
    raw[8:10] = (2).to_bytes(2, "little")
    p.write_bytes(bytes(raw))
    with pytest.raises(CheckpointVersionError) as info:
        m.load_checkpoint(p)
    assert "version" in str(info.value).lower()
    assert m.validate_checkpoint(p) is False


# ------------------------------------------ every bad argument is a CheckpointError


@pytest.mark.parametrize(
    "loss",
    [
        10**400,
        -(10**400),
        Fraction(10**400),
        np.longdouble(10) ** 400,
        "1.5",
        b"nan",
        "nan",
        True,
        np.bool_(False),
        None,
        [1.0],
        np.array([1.0]),
        np.array([1.0, 2.0]),
        np.array("1.5"),
        np.array(True),
        complex(1, 0),
        np.complex128(1),
        Decimal("1.5"),
        object(),
    ],
    ids=lambda v: repr(v)[:40],
)
def test_loss_must_be_a_real_number(ckpt_dir: Path, loss):
    m = CheckpointManager(ckpt_dir)
    with pytest.raises(CheckpointValueError) as info:
        m.save_checkpoint(1, np.ones(2), {}, loss)
    assert "loss" in str(info.value)
    with pytest.raises(CheckpointValueError):
        m.save_checkpoint_async(1, np.ones(2), {}, loss)
    assert _files(ckpt_dir) == []


@pytest.mark.parametrize(
    ("loss", "stored"),
    [
        (3, 3.0),
        (1.5, 1.5),
        (Fraction(1, 4), 0.25),
        (np.float32(0.5), 0.5),
        (np.float16(2), 2.0),
        (np.int64(-7), -7.0),
        (np.uint64(2**64 - 1), float(2**64 - 1)),
        (np.array(2.5), 2.5),  # a 0-d array, as reductions of JAX or torch arrays give
        (np.array(4, dtype=np.int8), 4.0),
        (float("inf"), float("inf")),
        (np.longdouble("inf"), float("inf")),
        (float("-inf"), float("-inf")),
    ],
    ids=lambda v: repr(v)[:40],
)
def test_real_losses_are_stored_as_float(ckpt_dir: Path, loss, stored):
    m = CheckpointManager(ckpt_dir)
    path = m.save_checkpoint(1, np.ones(2), {}, loss)
    got = m.load_checkpoint(path)["loss"]
    assert type(got) is float and got == stored


def test_nan_loss_is_kept(ckpt_dir: Path):
    m = CheckpointManager(ckpt_dir)
    for loss in (float("nan"), np.float32("nan"), np.array(np.nan)):
        assert math.isnan(m.load_checkpoint(m.save_checkpoint(1, np.ones(2), {}, loss))["loss"])


@pytest.mark.parametrize(
    "bad", ["a\x00b", "\ud800x", "x\udfff", ""], ids=["nul", "surrogate", "surrogate2", "empty"]
)
def test_unusable_paths(tmp_path: Path, bad: str):
    with pytest.raises(CheckpointValueError) as info:
        CheckpointManager(str(tmp_path / "d") + bad if bad else bad)
    assert "checkpoint_dir" in str(info.value)
    m = CheckpointManager(tmp_path / "ok")
    for path in (str(tmp_path / "ok" / "x") + bad if bad else bad, Path(str(tmp_path) + bad)):
        if not bad and isinstance(path, Path):
            continue  # Path("") is ".", a directory: refused as one elsewhere
        with pytest.raises(CheckpointValueError) as info:
            m.load_checkpoint(path)
        assert "path" in str(info.value)
        assert m.validate_checkpoint(path) is False
    assert [p.name for p in tmp_path.iterdir()] == ["ok"]


def test_paths_with_undecodable_bytes_work(tmp_path: Path):
    """A lone surrogate from surrogateescape stands for a byte of a real file name."""
    name = os.fsdecode(b"run-\xff")
    m = CheckpointManager(tmp_path / name)
    path = m.save_checkpoint(1, np.ones(2), {}, 0.0)
    assert os.listdir(os.fsencode(tmp_path)) == [b"run-\xff"]
    assert m.load_checkpoint(str(path))["batch_idx"] == 1


@pytest.mark.parametrize("prefix", ["a\udc80", "\ud800", "x\x00", 5, None, b"ckpt"], ids=ascii)
def test_unusable_prefix(ckpt_dir: Path, prefix):
    with pytest.raises(CheckpointValueError) as info:
        CheckpointManager(ckpt_dir, prefix=prefix)
    assert "prefix" in str(info.value)


def test_prefix_too_long_for_a_file_name(ckpt_dir: Path):
    with pytest.raises(CheckpointValueError) as info:
        CheckpointManager(ckpt_dir, prefix="p" * 250)
    assert "prefix" in str(info.value) and "255" in str(info.value)
    m = CheckpointManager(ckpt_dir, prefix="é" * 100)  # 200 bytes: the longest that fits
    m.save_checkpoint(2**63 - 1, np.ones(2), {}, 0.0)
    assert m.load_latest()["batch_idx"] == 2**63 - 1


@pytest.mark.parametrize("key", ["k\udc80ey", "\ud800"], ids=ascii)
def test_hmac_key_with_a_lone_surrogate(ckpt_dir: Path, key):
    with pytest.raises(CheckpointValueError) as info:
        CheckpointManager(ckpt_dir, hmac_key=key)
    assert "hmac_key" in str(info.value) and "bytes" in str(info.value)


def test_text_key_is_its_utf8_bytes(ckpt_dir: Path):
    signed = CheckpointManager(ckpt_dir, hmac_key="clé").save_checkpoint(1, np.ones(2), {}, 0.0)
    assert CheckpointManager(ckpt_dir, hmac_key="clé".encode()).validate_checkpoint(signed)
    assert not CheckpointManager(ckpt_dir, hmac_key="cle").validate_checkpoint(signed)


def test_non_utf8_key_in_the_environment_is_used_as_bytes(
    ckpt_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setitem(os.environb, b"H5CKPT_HMAC_KEY", b"\xffsecret\xfe")
    signed = CheckpointManager(ckpt_dir).save_checkpoint(1, np.ones(2), {}, 0.0)
    monkeypatch.delitem(os.environb, b"H5CKPT_HMAC_KEY")
    assert CheckpointManager(ckpt_dir, hmac_key=b"\xffsecret\xfe").validate_checkpoint(signed)
    assert not CheckpointManager(ckpt_dir, hmac_key=b"secret").validate_checkpoint(signed)


@pytest.mark.parametrize("batch_idx", [-1, 2**63, 10**30, "7", 1.0, None, True])
def test_checkpoint_path_checks_the_batch_index(ckpt_dir: Path, batch_idx):
    with pytest.raises(CheckpointValueError) as info:
        CheckpointManager(ckpt_dir).checkpoint_path(batch_idx)
    assert "batch_idx" in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"checkpoint_frequency": 2**63},
        {"keep_last_n": 2**64},
        {"keep_every": 2**64},
        {"keep_best_n": 10**30},
        {"checkpoint_frequency": "10"},
        {"keep_last_n": 2.0},
        {"load_limits": 5},
        {"load_limits": {"max_depth": 3}},
        {"allow_pickle": "no"},
        {"durable": "false"},
        {"enable_compression": np.array([1, 2])},
        {"delete_invalid": None},
        {"auto_cleanup": 2},
        {"best_mode": ["min"]},
        {"compression": 5},
    ],
    ids=lambda v: repr(v)[:40],
)
def test_bad_manager_keywords_are_refused_at_once(ckpt_dir: Path, kwargs):
    [name] = kwargs
    with pytest.raises(CheckpointValueError) as info:
        CheckpointManager(ckpt_dir, **kwargs)
    assert name in str(info.value)


def test_flags_take_numpy_bools_and_zero_or_one(ckpt_dir: Path):
    m = CheckpointManager(ckpt_dir, allow_pickle=np.bool_(True), durable=0, auto_cleanup=1)
    assert (m.allow_pickle, m.durable, m.auto_cleanup) == (True, False, True)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_depth": 2**63}, {"max_nodes": 10**30}, {"max_array_bytes": 2**64}, {"max_depth": "3"}],
    ids=lambda v: repr(v)[:40],
)
def test_load_limits_out_of_range(kwargs):
    [name] = kwargs
    with pytest.raises(CheckpointValueError) as info:
        LoadLimits(**kwargs)
    assert name in str(info.value)


# The private native functions get the same treatment: their argument conversion
# names the argument and its range instead of leaking OverflowError or TypeError.
NATIVE_CALLS = {
    "chunk_size": lambda d: _native.tree_digest(b"x", 10**50),
    "fd": lambda d: _native.finalize(2**40, [], 1, 0.0, 0.0),
    "batch_idx": lambda d: _native.finalize(0, [], 10**50, 0.0, 0.0),
    "loss": lambda d: _native.finalize(0, [], 1, 10**400, 0.0),
    "timestamp": lambda d: _native.finalize(0, [], 1, 0.0, "now"),
    "segment offset": lambda d: _native.finalize(0, [(-1, b"")], 1, 0.0, 0.0),
    "offset": lambda d: _native.start_writeback(0, -1),
    "length": lambda d: _native.start_writeback(0, 0, 2**64),
    "chunk_bytes": lambda d: _native.blosc_max_frame_len(-1),
    "typesize": lambda d: _native.blosc_ratio(b"xx", 2**70),
    "keep_last_n": lambda d: _native.plan_retention([(1, True, 0.0)], 10**50),
    "keep_best_n": lambda d: _native.plan_retention([(1, True, 0.0)], 1, None, -1),
    "candidate loss": lambda d: _native.plan_retention([(1, True, 10**400)], 1),
    "candidate batch_idx": lambda d: _native.plan_retention([(2**64, True, 0.0)], 1),
    "size_bytes": lambda d: CheckpointInfo("x", 1, 0.0, 0.0, 2**64, "valid"),
    "info batch_idx": lambda d: CheckpointInfo("x", -1, 0.0, 0.0, 0, "valid"),
    "info loss": lambda d: CheckpointInfo("x", 1, "low", 0.0, 0, "valid"),
    "status": lambda d: CheckpointInfo("x", 1, 0.0, 0.0, 0, "val\udc80id"),
    "error": lambda d: CheckpointInfo("x", 1, 0.0, 0.0, 0, "valid", False, "\ud800"),
    "info path": lambda d: CheckpointInfo("x\x00", 1, 0.0, 0.0, 0, "valid"),
    "prefix": lambda d: _native.Catalog(d, b"checkpoint", False),
    "catalog prefix": lambda d: _native.Catalog(d, "\ud800", False),
    "directory": lambda d: _native.Catalog(str(d) + "\x00", "checkpoint", False),
    "path": lambda d: _native.verify_files([str(d) + "\ud800"]),
    "name": lambda d: _native.Catalog(d, "checkpoint", False).remember("\ud800", "valid"),
}


@pytest.mark.parametrize("what", sorted(NATIVE_CALLS))
def test_native_arguments_out_of_range_are_value_errors(ckpt_dir: Path, what: str):
    with pytest.raises(CheckpointValueError) as info:
        NATIVE_CALLS[what](ckpt_dir)
    assert what.split()[-1] in str(info.value)


# ------------------------------------- the whole public surface, with odd values

ODD = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**62, max_value=2**80),
    st.integers(min_value=-(2**80), max_value=-1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.fractions(),
    st.decimals(allow_nan=True),
    st.complex_numbers(),
    st.text(st.characters(codec=None, exclude_categories=()), max_size=8),
    st.binary(max_size=8),
    st.sampled_from(["", ".", "..", "/", "a/b", "a\x00b", "\udc80", "\ud800", "min", "lz4"]),
    st.lists(st.integers(), max_size=2),
    st.just(np.array([1, 2])),
    st.just(np.float64("nan")),
    st.just(object()),
)


def _works_or_checkpoint_error(call) -> None:
    with contextlib.suppress(CheckpointError):
        call()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    keyword=st.sampled_from(
        [
            "checkpoint_frequency",
            "keep_last_n",
            "enable_compression",
            "prefix",
            "allow_pickle",
            "hmac_key",
            "durable",
            "keep_every",
            "keep_best_n",
            "best_mode",
            "delete_invalid",
            "auto_cleanup",
            "compression",
            "load_limits",
        ]
    ),
    value=ODD,
    limit=st.sampled_from(["max_depth", "max_nodes", "max_attributes", "max_array_bytes"]),
    other=ODD,
)
def test_public_api_either_works_or_raises_checkpoint_error(keyword, value, limit, other):
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        _works_or_checkpoint_error(lambda: CheckpointManager(base / "m", **{keyword: value}))
        _works_or_checkpoint_error(lambda: LoadLimits(**{limit: value}))
        # Text becomes a name inside the temporary directory; anything else is passed on.
        path = base / ("f" + value.replace("/", "_")) if isinstance(value, str) else value
        _works_or_checkpoint_error(lambda: CheckpointManager(path))
        m = CheckpointManager(base / "ok", keep_last_n=1)
        _works_or_checkpoint_error(lambda: m.checkpoint_path(value))
        _works_or_checkpoint_error(lambda: m.should_save(value))
        _works_or_checkpoint_error(lambda: m.save_checkpoint(value, np.ones(2), {}, 0.0))
        _works_or_checkpoint_error(lambda: m.save_checkpoint(1, np.ones(2), {}, value))
        _works_or_checkpoint_error(lambda: m.save_checkpoint(2, value, {"v": other}, 0.5))
        _works_or_checkpoint_error(lambda: m.save_checkpoint(3, np.ones(2), {}, 1.0, other))
        _works_or_checkpoint_error(lambda: m.load_checkpoint(path))
        assert m.validate_checkpoint(path) in (True, False)
        _works_or_checkpoint_error(lambda: CheckpointInfo("x", value, other, 0.0, 1, "valid"))
        m.close()

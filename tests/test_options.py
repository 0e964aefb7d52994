"""``CheckpointManagerOptions``: every setting checked once, and a manager made from
it is the manager the keywords make."""

from __future__ import annotations

import dataclasses
import inspect
import os
from pathlib import Path

import numpy as np
import pytest

from h5ckpt import (
    CheckpointAuthenticationError,
    CheckpointError,
    CheckpointManager,
    CheckpointManagerOptions,
    CheckpointValueError,
    LoadLimits,
)

SETTINGS = {
    "checkpoint_frequency": 5,
    "keep_last_n": None,
    "enable_compression": False,
    "prefix": "fit",
    "allow_pickle": True,
    "hmac_key": "clé",
    "durable": False,
    "keep_every": 100,
    "keep_best_n": 2,
    "best_mode": "max",
    "delete_invalid": True,
    "auto_cleanup": False,
    "compression": "zstd",
    "load_limits": LoadLimits(max_depth=40),
    "on_older_batch": "set_aside",
    "read_only": False,
    "file_mode": 0o640,
    "key_from_environment": False,
}
ATTRIBUTES = [
    "checkpoint_dir",
    "checkpoint_frequency",
    "keep_last_n",
    "keep_every",
    "keep_best_n",
    "best_mode",
    "on_older_batch",
    "prefix",
    "enable_compression",
    "compression",
    "allow_pickle",
    "durable",
    "delete_invalid",
    "auto_cleanup",
    "load_limits",
    "_hmac_key",
    "read_only",
    "file_mode",
]


def test_every_setting_is_a_keyword_with_the_same_default():
    params = inspect.signature(CheckpointManager).parameters
    fields = dataclasses.fields(CheckpointManagerOptions)
    assert SETTINGS.keys() == {f.name for f in fields}
    for f in fields:
        default = None if f.default is dataclasses.MISSING else f.default
        assert params[f.name].default == default, f.name
    assert CheckpointManagerOptions().load_limits == LoadLimits()
    assert set(params) == {"checkpoint_dir", "options", *SETTINGS}


def test_options_make_the_manager_the_keywords_make(tmp_path: Path):
    by_keywords = CheckpointManager(tmp_path / "a", **SETTINGS)
    options = CheckpointManagerOptions(**SETTINGS)
    by_options = CheckpointManager(tmp_path / "b", options=options)
    assert by_options.options is options
    for name in ATTRIBUTES[1:]:
        assert getattr(by_options, name) == getattr(by_keywords, name), name
    assert by_options._hmac_key == "clé".encode()
    assert (by_options.compression, by_options.options.compression) == ("zstd", "zstd")
    path = by_options.save_checkpoint(10, np.arange(3.0), {"tags": {1, 2}}, 0.5)
    assert path.name == "fit_batch_0010.h5" and path.stat().st_mode & 0o777 == 0o640
    assert by_keywords.load_checkpoint(path)["optimizer_state"] == {"tags": {1, 2}}
    # One options object serves several managers.
    other = CheckpointManager(tmp_path / "c", options=options)
    assert other.options is options and other.prefix == "fit"


def test_options_are_checked_and_converted_once():
    options = CheckpointManagerOptions(
        checkpoint_frequency=np.int64(4), allow_pickle=np.bool_(True), durable=0, hmac_key="k"
    )
    assert type(options.checkpoint_frequency) is int and options.checkpoint_frequency == 4
    assert options.allow_pickle is True and options.durable is False
    assert options.hmac_key == b"k"
    assert "hmac_key" not in repr(options) and "b'k'" not in repr(options)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.keep_last_n = 1  # type: ignore[misc]
    variant = dataclasses.replace(options, keep_last_n=9)
    assert (variant.keep_last_n, variant.checkpoint_frequency) == (9, 4)
    with pytest.raises(CheckpointValueError, match="keep_last_n"):
        dataclasses.replace(options, keep_last_n=0)
    assert CheckpointManagerOptions(enable_compression=False).resolved_compression is None
    assert CheckpointManagerOptions().resolved_compression == "auto"
    assert CheckpointManagerOptions(compression=None).resolved_compression is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"checkpoint_frequency": 0},
        {"keep_last_n": 2.0},
        {"keep_best_n": -1},
        {"best_mode": "median"},
        {"on_older_batch": "ignore"},
        {"prefix": "a/b"},
        {"compression": "brotli"},
        {"allow_pickle": "no"},
        {"load_limits": {"max_depth": 3}},
        {"hmac_key": b""},
        {"read_only": None},
        {"file_mode": 0o1777},
        {"key_from_environment": "yes"},
    ],
    ids=lambda v: repr(v)[:40],
)
def test_a_bad_option_is_refused_by_name(tmp_path: Path, kwargs):
    [name] = kwargs
    with pytest.raises(CheckpointValueError) as info:
        CheckpointManagerOptions(**kwargs)
    assert name in str(info.value)
    with pytest.raises(CheckpointValueError) as by_keyword:
        CheckpointManager(tmp_path / "m", **kwargs)
    assert str(by_keyword.value) == str(info.value)
    assert not (tmp_path / "m").exists()


def test_options_and_a_keyword_that_differs_from_its_default_are_refused(tmp_path: Path):
    options = CheckpointManagerOptions(keep_last_n=5)
    with pytest.raises(CheckpointValueError) as info:
        CheckpointManager(tmp_path / "m", 10, 2, options=options)
    assert "keep_last_n" in str(info.value) and "dataclasses.replace" in str(info.value)
    with pytest.raises(CheckpointValueError, match="read_only"):
        CheckpointManager(tmp_path / "m", read_only=True, options=options)
    with pytest.raises(CheckpointValueError, match="CheckpointManagerOptions"):
        CheckpointManager(tmp_path / "m", options={"keep_last_n": 5})  # type: ignore[arg-type]
    assert not (tmp_path / "m").exists()
    # Keywords left at their defaults are no conflict.
    assert CheckpointManager(tmp_path / "m", 10, 3, options=options).keep_last_n == 5


def test_a_read_only_manager_from_options_creates_nothing(tmp_path: Path):
    d = tmp_path / "run"
    CheckpointManager(d).save_checkpoint(3, np.ones(2), {}, 0.5)
    (d / ".h5ckpt.lock").unlink()
    before = sorted(os.listdir(d))
    reader = CheckpointManager(d, options=CheckpointManagerOptions(read_only=True))
    assert reader.load_latest()["batch_idx"] == 3
    assert reader.plan_cleanup() == []
    with pytest.raises(CheckpointError, match="read_only"):
        reader.save_checkpoint(4, np.ones(2), {}, 0.5)
    assert sorted(os.listdir(d)) == before  # no lock file, no temp file


def test_without_the_environment_key_a_reader_takes_unsigned_files(
    tmp_path: Path, monkeypatch, seed_writer
):
    seed = seed_writer(tmp_path, 10, np.ones(3), {"step": 1}, 0.5)
    monkeypatch.setenv("H5CKPT_HMAC_KEY", "secret")
    keyed = CheckpointManager(tmp_path, prefix="homodyne_state", allow_pickle=True)
    with pytest.raises(CheckpointAuthenticationError):
        keyed.load_checkpoint(seed)
    options = CheckpointManagerOptions(
        prefix="homodyne_state", allow_pickle=True, read_only=True, key_from_environment=False
    )
    keyless = CheckpointManager(tmp_path, options=options)
    assert keyless.load_checkpoint(seed)["optimizer_state"] == {"step": 1}
    assert os.environ["H5CKPT_HMAC_KEY"] == "secret"
    # A key given explicitly is used whatever key_from_environment says.
    signed = CheckpointManager(tmp_path / "k", hmac_key="mine", key_from_environment=False)
    path = signed.save_checkpoint(1, np.ones(2), {}, 0.5)
    assert CheckpointManager(tmp_path / "k", hmac_key="mine").validate_checkpoint(path)
    assert not CheckpointManager(tmp_path / "k").validate_checkpoint(path)  # env key: "secret"

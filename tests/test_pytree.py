"""States of JAX, optax and other array libraries, stored without pickle: real optax
optimizers after real update steps, resumed training loops, bfloat16 leaves,
templates (``like=``), NamedTuples whose module is gone, hostile files."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import ml_dtypes
import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="jax is not installed (pip install 'h5ckpt[jax]')")
optax = pytest.importorskip("optax", reason="optax is not installed (pip install 'h5ckpt[jax]')")
jnp = jax.numpy

from h5ckpt import (  # noqa: E402
    CheckpointCorruptError,
    CheckpointError,
    CheckpointManager,
    CheckpointValueError,
    LoadLimits,
    _native,
)
from h5ckpt.interop import HostArray, Node, snapshot_value  # noqa: E402
from h5ckpt.tree import TYPE_ATTR, check_value, read_value, values_equal, write_value  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Run after every other test (conftest.py): once JAX has started its threads in this
# process, a test that forks could deadlock. Nothing here starts them at import.
pytestmark = pytest.mark.jax


# ------------------------------------------------------------------------ helpers


def tags_of(path: Path) -> set[str]:
    """Every type tag in a checkpoint file."""
    found: set[str] = set()

    def visit(_name: str, obj: Any) -> None:
        tag = obj.attrs.get(TYPE_ATTR)
        if tag is not None:
            found.add(tag.decode() if isinstance(tag, bytes) else str(tag))

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return found


def assert_same_pytree(got: Any, want: Any) -> None:
    """Identical structure, leaf types, shardings and bit-identical values."""
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    got_leaves, want_leaves = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for g, w in zip(got_leaves, want_leaves, strict=True):
        assert type(g) is type(w), (type(g), type(w))
        if isinstance(w, jax.Array):
            assert g.dtype == w.dtype and g.shape == w.shape
            assert g.sharding == w.sharding
            assert g.weak_type == w.weak_type
            assert np.asarray(g).tobytes() == np.asarray(w).tobytes()
        else:
            assert values_equal(g, w), (g, w)


def loss_fn(params: dict[str, Any], x: jax.Array, y: jax.Array) -> jax.Array:
    pred = jnp.tanh(x @ params["w"] + params["b"])
    return jnp.mean((pred - y) ** 2)


def make_data(seed: int = 0) -> tuple[jax.Array, jax.Array]:
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (32, 4)), jax.random.normal(ky, (32, 2))


def init_params(dtype: Any = jnp.float32) -> dict[str, Any]:
    kw = jax.random.key(42)
    return {"w": jax.random.normal(kw, (4, 2), dtype), "b": jnp.zeros(2, dtype)}


def make_step(opt: Any):
    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


OPTIMIZERS = {
    "adam": lambda: optax.adam(1e-2),
    "chain(clip_by_global_norm, adamw)": lambda: optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=1e-3)
    ),
}


def trained(opt: Any, steps: int, dtype: Any = jnp.float32) -> tuple[Any, Any]:
    params = init_params(dtype)
    state = opt.init(params)
    step = make_step(opt)
    x, y = make_data()
    for _ in range(steps):
        params, state = step(params, state, x.astype(dtype), y.astype(dtype))
    return params, state


# ------------------------------------------------------------- optax round trips


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optax_state_after_real_steps_round_trips_without_pickle(ckpt_dir: Path, name: str):
    opt = OPTIMIZERS[name]()
    params, state = trained(opt, steps=5)
    assert [int(c) for c in jax.tree_util.tree_leaves(state) if c.shape == ()] == [5]  # count
    manager = CheckpointManager(ckpt_dir)  # allow_pickle=False
    path = manager.save_checkpoint(5, params["w"], state, 0.1, {"params": params})
    assert "pickle" not in tags_of(path)
    assert {"namedtuple", "ndarray"} <= tags_of(path)

    template = {"parameters": params["w"], "optimizer_state": state, "metadata": {"params": params}}
    for loaded in (
        manager.load_checkpoint(path, like=template),
        manager.load_latest(like=template),
    ):
        assert_same_pytree(loaded["optimizer_state"], state)
        assert_same_pytree(loaded["metadata"], {"params": params})
        assert_same_pytree(loaded["parameters"], params["w"])
        assert type(jax.tree_util.tree_leaves(loaded["optimizer_state"])[0]) is type(params["w"])


def test_without_a_template_state_comes_back_as_numpy_and_named_tuples(ckpt_dir: Path):
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
    _, state = trained(opt, steps=3)
    manager = CheckpointManager(ckpt_dir)
    manager.save_checkpoint(3, np.zeros(1), state, 0.1)
    loaded = manager.load_latest()["optimizer_state"]
    # (EmptyState(), (ScaleByAdamState(count, mu, nu), EmptyState(), EmptyState()))
    assert type(loaded) is tuple and type(loaded[1]) is tuple
    adam = loaded[1][0]
    assert type(adam).__name__ == "ScaleByAdamState"
    assert type(adam).__module__ == "h5ckpt.restored"
    assert adam._fields == ("count", "mu", "nu")
    assert isinstance(adam, tuple) and type(adam) is not type(state[1][0])
    assert type(adam.mu["w"]) is np.ndarray and adam.mu["w"].dtype == np.float32
    np.testing.assert_array_equal(adam.mu["w"], np.asarray(state[1][0].mu["w"]))
    assert adam.count == np.asarray(state[1][0].count) and adam.count.shape == ()
    assert loaded[0] == () and type(loaded[0]).__name__ == "EmptyState"
    # The same class for every node of the same name and fields.
    assert type(loaded[0]) is type(loaded[1][1])
    # Saving what came back writes the original class name again.
    path = manager.save_checkpoint(4, np.zeros(1), loaded, 0.1)
    with h5py.File(path, "r") as f:
        assert (
            f["optimizer_state/1/0"].attrs["h5ckpt_class"]
            == b"optax._src.transform.ScaleByAdamState"
        )
    again = manager.load_checkpoint(path)["optimizer_state"]
    assert values_equal(again, loaded)
    # And a template still takes it.
    assert_same_pytree(
        manager.load_checkpoint(path, like={"optimizer_state": state})["optimizer_state"], state
    )


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("save", ["sync", "async"])
def test_resumed_training_continues_exactly_as_an_uninterrupted_one(
    ckpt_dir: Path, name: str, save: str
):
    opt = OPTIMIZERS[name]()
    step = make_step(opt)
    x, y = make_data()

    reference_params, _ = trained(opt, steps=12)

    params = init_params()
    state = opt.init(params)
    manager = CheckpointManager(ckpt_dir)
    for _ in range(7):
        params, state = step(params, state, x, y)
    if save == "sync":
        manager.save_checkpoint(6, params["w"], state, 0.0, {"params": params})
    else:
        manager.save_checkpoint_async(6, params["w"], state, 0.0, {"params": params})
        manager.wait_until_finished()
    del params, state

    # A new process would build the templates from a fresh init, as here.
    fresh = init_params()
    template = {"optimizer_state": opt.init(fresh), "metadata": {"params": fresh}}
    loaded = CheckpointManager(ckpt_dir).load_latest(like=template)
    assert loaded["batch_idx"] == 6
    params, state = loaded["metadata"]["params"], loaded["optimizer_state"]
    for _ in range(loaded["batch_idx"] + 1, 12):
        params, state = step(params, state, x, y)
    for key in ("w", "b"):
        assert np.asarray(params[key]).tobytes() == np.asarray(reference_params[key]).tobytes()


def test_bfloat16_leaves(ckpt_dir: Path):
    opt = optax.adam(1e-2)
    params, state = trained(opt, steps=3, dtype=jnp.bfloat16)
    assert state[0].mu["w"].dtype == jnp.bfloat16
    manager = CheckpointManager(ckpt_dir)
    path = manager.save_checkpoint(3, params["w"], state, 0.5, {"params": params})
    assert "ml_ndarray" in tags_of(path)
    with h5py.File(path, "r") as f:
        node = f["optimizer_state/0/1/w"]
        assert node.dtype == np.uint16 and node.shape == (4, 2)
        assert node.attrs["h5ckpt_dtype"] == b"bfloat16"
        assert node.attrs["h5ckpt_array"] == b"jax"
        bits = node[()]
        assert f["parameters"].attrs[TYPE_ATTR] == b"ml_ndarray"
    assert bits.view(ml_dtypes.bfloat16).tobytes() == np.asarray(state[0].mu["w"]).tobytes()

    template = {"parameters": params["w"], "optimizer_state": state, "metadata": {"params": params}}
    loaded = manager.load_latest(like=template)
    assert_same_pytree(loaded["optimizer_state"], state)
    assert_same_pytree(loaded["metadata"]["params"], params)
    assert loaded["parameters"].dtype == jnp.bfloat16

    plain = manager.load_latest()
    assert plain["parameters"].dtype == np.dtype(ml_dtypes.bfloat16)
    mu = plain["optimizer_state"][0].mu["w"]
    assert type(mu) is np.ndarray and mu.dtype == np.dtype(ml_dtypes.bfloat16)
    assert mu.tobytes() == np.asarray(state[0].mu["w"]).tobytes()


def test_every_ml_dtype_and_scalars_round_trip(tmp_path: Path):
    names = [
        "bfloat16",
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e4m3b11fnuz",
        "int4",
        "uint4",
        "complex32",
    ]
    value = {}
    for name in names:
        dtype = np.dtype(getattr(ml_dtypes, name))
        arr = np.arange(6).astype(np.float32).astype(dtype).reshape(2, 3)
        value[name] = [arr, arr[:, ::2], arr[0, 0], np.empty((0, 2), dtype)]
    value["nan_bits"] = np.array([0x7FC1, 0xFFFF, 0x8000], np.uint16).view(ml_dtypes.bfloat16)
    check_value(value, allow_pickle=False)
    with h5py.File(tmp_path / "v.h5", "w") as f:
        write_value(f, "v", value, allow_pickle=False)
    with h5py.File(tmp_path / "v.h5", "r") as f:
        back = read_value(f["v"], allow_pickle=False, limits=LoadLimits())
        assert f["v/bfloat16/2"].attrs[TYPE_ATTR] == b"ml_scalar"
    assert values_equal(back, value)
    assert type(back["bfloat16"][2]) is ml_dtypes.bfloat16
    assert back["nan_bits"].view(np.uint16).tolist() == [0x7FC1, 0xFFFF, 0x8000]


# ------------------------------------------------------------------- templates


def _saved_adam(ckpt_dir: Path) -> tuple[CheckpointManager, Path, Any, Any]:
    opt = optax.adam(1e-2)
    params, state = trained(opt, steps=2)
    manager = CheckpointManager(ckpt_dir)
    path = manager.save_checkpoint(2, params["w"], state, 0.1, {"params": params, "lr": 0.01})
    return manager, path, params, state


@pytest.mark.parametrize(
    ("edit", "where", "words"),
    [
        (
            lambda p, s: {"optimizer_state": optax.adam(1e-2).init({**p, "w": jnp.zeros((4, 3))})},
            "optimizer_state[0].mu['w']",
            "another shape",
        ),
        (
            lambda p, s: {
                "optimizer_state": optax.adam(1e-2).init({**p, "b": p["b"].astype(jnp.float16)})
            },
            "optimizer_state[0].mu['b']",
            "another dtype",
        ),
        (
            lambda p, s: {"optimizer_state": optax.adam(1e-2).init({**p, "extra": p["b"]})},
            "optimizer_state[0].mu",
            "the checkpoint lacks ['extra']",
        ),
        (
            lambda p, s: {"optimizer_state": optax.sgd(0.1, momentum=0.9).init(p)},
            "optimizer_state[0]",
            "NamedTuple",
        ),
        (
            lambda p, s: {"optimizer_state": list(s)},
            "optimizer_state",
            "a list of 2 items",
        ),
        (
            lambda p, s: {"metadata": {"params": p, "lr": 1}},
            "metadata['lr']",
            "a value of type builtins.int",
        ),
        (
            lambda p, s: {"parameters": p["w"].T},
            "parameters",
            "another shape",
        ),
        (
            lambda p, s: {
                "metadata": {"params": {"w": np.zeros((4, 2), np.float64), "b": p["b"]}, "lr": 0.1}
            },
            "metadata['params']['w']",
            "another dtype",
        ),
    ],
)
def test_a_mismatched_template_is_refused_with_the_key_path(
    ckpt_dir: Path, edit, where: str, words: str
):
    manager, path, params, state = _saved_adam(ckpt_dir)
    like = edit(params, state)
    for load in (
        lambda: manager.load_checkpoint(path, like=like),
        lambda: manager.load_latest(like=like),
    ):
        with pytest.raises(CheckpointValueError) as info:
            load()
        assert str(info.value).startswith(f"{where}: "), str(info.value)
        assert words in str(info.value)
        assert info.value.error_context["path"] == where
    # A template that does not match says nothing about the file.
    assert [c.status for c in manager.list_checkpoints()] == ["valid"]
    assert manager.load_latest(like={"optimizer_state": state}) is not None


def test_like_takes_only_the_three_parts(ckpt_dir: Path):
    manager, path, params, state = _saved_adam(ckpt_dir)
    with pytest.raises(CheckpointValueError, match=r"unknown key.*'params'"):
        manager.load_checkpoint(path, like={"params": params})
    with pytest.raises(CheckpointValueError, match="like must be a dict"):
        manager.load_latest(like=[state])  # type: ignore[arg-type]
    # Refused before the file is even looked at.
    with pytest.raises(CheckpointValueError, match="unknown key"):
        manager.load_checkpoint(ckpt_dir / "missing.h5", like={"opt": 1})
    # Parts without a template come back as without like.
    only = manager.load_checkpoint(path, like={"metadata": {"params": params, "lr": 0.01}})
    plain = manager.load_checkpoint(path)
    assert values_equal(only["optimizer_state"], plain["optimizer_state"])
    assert type(only["parameters"]) is np.ndarray
    assert_same_pytree(only["metadata"]["params"], params)


def test_shape_dtype_struct_templates_and_shardings(ckpt_dir: Path):
    manager, path, _, state = _saved_adam(ckpt_dir)
    abstract = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state
    )
    loaded = manager.load_checkpoint(path, like={"optimizer_state": abstract})
    assert_same_pytree(loaded["optimizer_state"], state)
    unplaced = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    loaded = manager.load_checkpoint(path, like={"optimizer_state": unplaced})
    assert_same_pytree(loaded["optimizer_state"], state)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """A registered JAX pytree node, as flax's struct.dataclass makes them."""

    step: jax.Array
    params: dict
    opt_state: Any
    lr: float = dataclasses.field(default=0.01, metadata={"static": True})


class Pair:
    """A pytree node whose children have no attribute names."""

    def __init__(self, a: Any, b: Any) -> None:
        self.a, self.b = a, b


jax.tree_util.register_pytree_node(Pair, lambda p: ((p.a, p.b), None), lambda _, c: Pair(*c))


def test_registered_pytree_nodes(ckpt_dir: Path):
    opt = optax.adam(1e-2)
    params, state = trained(opt, steps=2)
    ts = TrainState(step=jnp.int32(2), params=params, opt_state=state, lr=0.5)
    value = {"ts": ts, "pair": Pair(jnp.ones(2), [1, "x"])}
    manager = CheckpointManager(ckpt_dir)
    path = manager.save_checkpoint(2, np.zeros(1), value, 0.1)
    assert "pytree" in tags_of(path)
    with h5py.File(path, "r") as f:
        assert f["optimizer_state/ts"].attrs["h5ckpt_fields"] == b"step,params,opt_state"
        assert f["optimizer_state/ts"].attrs["h5ckpt_class"].decode().endswith("TrainState")
        assert "h5ckpt_fields" not in f["optimizer_state/pair"].attrs

    plain = manager.load_latest()["optimizer_state"]
    assert list(plain["ts"]) == ["step", "params", "opt_state"]  # a dict, field by field
    assert type(plain["pair"]) is tuple and plain["pair"][1] == [1, "x"]

    template = {"ts": TrainState(jnp.int32(0), init_params(), opt.init(init_params()), lr=0.5)}
    template["pair"] = Pair(jnp.zeros(2), [0, ""])
    loaded = manager.load_latest(like={"optimizer_state": template})["optimizer_state"]
    assert type(loaded["ts"]) is TrainState and loaded["ts"].lr == 0.5  # static: the template's
    assert_same_pytree(loaded["ts"], ts)
    assert type(loaded["pair"]) is Pair and loaded["pair"].b == [1, "x"]
    with pytest.raises(CheckpointValueError, match=r"optimizer_state\['ts'\]\.params\['w'\]"):
        bad = TrainState(jnp.int32(0), {"w": jnp.zeros(3), "b": jnp.zeros(2)}, state)
        manager.load_latest(like={"optimizer_state": {"ts": bad, "pair": template["pair"]}})


def test_async_save_snapshots_jax_arrays_on_host(ckpt_dir: Path):
    opt = optax.adam(1e-2)
    params, state = trained(opt, steps=2)
    ts = TrainState(step=jnp.int32(2), params=params, opt_state=state)
    snap = snapshot_value({"ts": ts, "state": state})
    leaves: list[Any] = []
    stack = [snap]
    while stack:  # the snapshot holds nothing of jax: the background write needs none
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, Node):
            stack.extend(v.children)
        else:
            leaves.append(v)
    assert leaves and all(type(v) is HostArray for v in leaves), {type(v) for v in leaves}
    assert all(not np.shares_memory(v.array, np.asarray(params["w"])) for v in leaves)
    assert type(snap["state"][0]) is type(state[0])  # NamedTuples keep their class

    manager = CheckpointManager(ckpt_dir)
    futures = [
        manager.save_checkpoint_async(i, params["w"], {"ts": ts, "state": state}, 0.1)
        for i in range(3)
    ]
    assert [f.result().name for f in futures] == [f"checkpoint_batch_{i:04d}.h5" for i in range(3)]
    loaded = manager.load_latest(like={"optimizer_state": {"ts": ts, "state": state}})
    assert_same_pytree(loaded["optimizer_state"], {"ts": ts, "state": state})
    with h5py.File(futures[-1].result(), "r") as f:  # the hint survives the snapshot
        assert f["optimizer_state/state/0/1/w"].attrs["h5ckpt_array"] == b"jax"


# -------------------------------------------------------- other array-likes, refusals


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_numpy_subclasses_are_stored_as_arrays(ckpt_dir: Path, tmp_path: Path):
    mm = np.memmap(tmp_path / "m.dat", dtype=np.float32, mode="w+", shape=(3, 2))
    mm[:] = np.arange(6).reshape(3, 2)
    value = {"mm": mm, "matrix": np.matrix([[1, 2], [3, 4]])}
    manager = CheckpointManager(ckpt_dir)
    path = manager.save_checkpoint(1, mm, value, 0.1)
    with h5py.File(path, "r") as f:
        assert f["optimizer_state/mm"].attrs["h5ckpt_array"] == b"numpy.memmap"
        assert f["optimizer_state/matrix"].attrs["h5ckpt_array"] == b"numpy.matrix"
    loaded = manager.load_latest()
    assert type(loaded["optimizer_state"]["mm"]) is np.ndarray
    np.testing.assert_array_equal(loaded["optimizer_state"]["mm"], np.arange(6).reshape(3, 2))
    assert type(loaded["parameters"]) is np.ndarray and loaded["parameters"].dtype == np.float32
    assert type(loaded["optimizer_state"]["matrix"]) is np.ndarray


class ObjectArrayLike:
    """An array-like whose array is of object dtype."""

    def __array__(self, dtype=None, copy=None):
        return np.array([1, None], dtype=object)


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: jax.random.key(0), "dtype key<fry>"),
        (ObjectArrayLike, "dtype object"),
        (lambda: np.ma.masked_array([1, 2], mask=[0, 1]), "MaskedArray"),
    ],
)
def test_array_likes_without_a_native_form_are_refused(ckpt_dir: Path, make, words: str):
    state = {"layers": [{"rng": make()}]}
    with pytest.raises(CheckpointValueError) as info:
        CheckpointManager(ckpt_dir).save_checkpoint(1, np.zeros(1), state, 0.1)
    assert str(info.value).startswith("optimizer_state['layers'][0]['rng']: ")
    assert words in str(info.value) and "allow_pickle" in str(info.value)
    assert not list(ckpt_dir.glob("*.h5"))


def test_named_tuple_field_paths_in_refusals():
    class State(NamedTuple):
        count: int
        mu: dict

    with pytest.raises(CheckpointValueError) as info:
        check_value((State(1, {"w": {1, 2}}),), allow_pickle=False, path="optimizer_state")
    assert info.value.error_context["path"] == "optimizer_state[0].mu['w']"


def test_plain_tuples_and_other_tuple_subclasses_keep_their_rules(tmp_path: Path):
    class Tagged(tuple):
        __slots__ = ()

    with pytest.raises(CheckpointValueError, match="Tagged"):
        check_value(Tagged((1, 2)), allow_pickle=False)
    point = collections.namedtuple("Point", "x y")
    value = {"plain": (1, 2), "named": point(1, (2, 3)), "empty": ()}
    with h5py.File(tmp_path / "t.h5", "w") as f:
        write_value(f, "v", value, allow_pickle=False)
    with h5py.File(tmp_path / "t.h5", "r") as f:
        assert f["v/plain"].attrs[TYPE_ATTR] == b"tuple"
        assert f["v/named"].attrs[TYPE_ATTR] == b"namedtuple"
        assert f["v/named/1"].attrs[TYPE_ATTR] == b"tuple"
        back = read_value(f["v"], allow_pickle=False, limits=LoadLimits())
    assert type(back["plain"]) is tuple and back["plain"] == (1, 2)
    assert back["named"]._fields == ("x", "y") and back["named"] == (1, (2, 3))
    assert type(back["named"].y) is tuple


def test_torch_tensors(ckpt_dir: Path):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    params = {
        "w": torch.randn(3, 2, requires_grad=True),
        "h": torch.randn(4).to(torch.bfloat16),
        "i": torch.arange(5, dtype=torch.int64),
    }
    state = {"params": params, "momentum": [p.detach().clone() * 0 for p in params.values()]}
    manager = CheckpointManager(ckpt_dir)
    path = manager.save_checkpoint(1, params["w"], state, 0.1)
    with h5py.File(path, "r") as f:
        assert f["optimizer_state/params/w"].attrs["h5ckpt_array"] == b"torch"
        assert f["optimizer_state/params/h"].attrs["h5ckpt_dtype"] == b"bfloat16"
    plain = manager.load_latest()["optimizer_state"]
    assert type(plain["params"]["w"]) is np.ndarray
    loaded = manager.load_latest(like={"optimizer_state": state, "parameters": params["w"]})
    for key, tensor in params.items():
        got = loaded["optimizer_state"]["params"][key]
        assert type(got) is type(tensor) and got.dtype == tensor.dtype
        assert got.device == tensor.device and got.requires_grad == tensor.requires_grad
        assert torch.equal(got.detach(), tensor.detach())
    assert torch.equal(loaded["parameters"].detach(), params["w"].detach())
    with pytest.raises(CheckpointValueError, match="another dtype"):
        manager.load_latest(like={"parameters": params["w"].double()})


# ------------------------------------------------------- files and other processes


def test_import_h5ckpt_imports_no_array_library(tmp_path: Path):
    code = textwrap.dedent(
        """
        import sys, numpy as np
        import h5ckpt, h5ckpt.cli, h5ckpt.templates, h5ckpt.interop
        m = h5ckpt.CheckpointManager(sys.argv[1])
        m.save_checkpoint(1, np.zeros(3), {"t": (1, 2), "a": np.ones(2)}, 0.1)
        m.load_latest(like={"optimizer_state": {"t": (0, 0), "a": np.zeros(2)}})
        names = ("jax", "jaxlib", "optax", "torch", "ml_dtypes", "cupy")
        print(sorted(n for n in names if n in sys.modules))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "c")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


MODULE = '''
from typing import NamedTuple
import numpy as np

class FitState(NamedTuple):
    """A state class of a module that the loading process does not have."""
    step: int
    moments: dict
    history: list
'''

SAVE = """
import sys, numpy as np
from fitstates import FitState
from h5ckpt import CheckpointManager
state = FitState(7, {"m": np.arange(3.0)}, [FitState(1, {}, [])])
CheckpointManager(sys.argv[1]).save_checkpoint(7, np.zeros(2), state, 0.5)
"""

LOAD = """
import json, sys
from h5ckpt import CheckpointManager
state = CheckpointManager(sys.argv[1]).load_latest()["optimizer_state"]
print(json.dumps({
    "type": type(state).__name__, "module": type(state).__module__, "fields": state._fields,
    "step": state.step, "m": state.moments["m"].tolist(), "inner": type(state.history[0]).__name__,
    "same_class": type(state.history[0]) is type(state),
    "imported": "fitstates" in sys.modules,
}))
"""


def test_named_tuple_loads_where_its_module_does_not_exist(tmp_path: Path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "fitstates.py").write_text(MODULE)
    ckpt = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "lib"), *sys.path])}
    saved = subprocess.run(
        [sys.executable, "-c", SAVE, str(ckpt)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert saved.returncode == 0, saved.stderr
    (tmp_path / "lib" / "fitstates.py").unlink()  # the module is gone everywhere
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", LOAD, str(ckpt)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "type": "FitState",
        "module": "h5ckpt.restored",
        "fields": ["step", "moments", "history"],
        "step": 7,
        "m": [0.0, 1.0, 2.0],
        "inner": "FitState",
        "same_class": True,
        "imported": False,
    }


def test_show_displays_named_tuples_and_array_hints(ckpt_dir: Path):
    opt = optax.adam(1e-2)
    params, state = trained(opt, steps=1, dtype=jnp.bfloat16)
    path = CheckpointManager(ckpt_dir).save_checkpoint(1, params["w"], state, 0.5)
    proc = subprocess.run(
        [sys.executable, "-m", "h5ckpt", "show", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    tree = json.loads(proc.stdout)["tree"]
    adam = tree["optimizer_state"]["children"]["0"]
    assert adam["type"] == "namedtuple"
    assert adam["class"] == "optax._src.transform.ScaleByAdamState"
    assert adam["fields"] == ["count", "mu", "nu"]
    assert list(adam["children"]) == ["count", "mu", "nu"]
    mu_w = adam["children"]["mu"]["children"]["w"]
    assert mu_w["type"] == "ml_ndarray" and mu_w["dtype"] == "bfloat16" and mu_w["array"] == "jax"
    assert mu_w["shape"] == [4, 2] and mu_w["bits"] == "uint16"
    assert tree["parameters"]["dtype"] == "bfloat16"
    np.testing.assert_allclose(
        mu_w["values"], np.asarray(state[0].mu["w"]).astype(np.float32).reshape(-1)
    )
    text = subprocess.run(
        [sys.executable, "-m", "h5ckpt", "show", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "optax._src.transform.ScaleByAdamState(count, mu, nu)" in text
    assert "from jax" in text and "bfloat16" in text


# ------------------------------------------------------------------ hostile files


def _tag(obj: Any, tag: str) -> None:
    obj.attrs[TYPE_ATTR] = np.bytes_(tag.encode())


def _namedtuple(f: h5py.File, fields: Any = b"a,b", class_name: Any = b"m.T", n: int = 2):
    g = f.create_group("v", track_order=True)
    _tag(g, "namedtuple")
    # bytes as fixed-length strings, as h5ckpt writes them (h5py makes plain bytes and
    # str variable-length).
    if class_name is not None:
        g.attrs["h5ckpt_class"] = np.bytes_(class_name) if type(class_name) is bytes else class_name
    if fields is not None:
        g.attrs["h5ckpt_fields"] = np.bytes_(fields) if type(fields) is bytes else fields
    for i in range(n):
        _tag(g.create_dataset(str(i), data=np.int64(i)), "int")
    return g


def _ml(f: h5py.File, data: Any = None, name: Any = b"bfloat16"):
    ds = f.create_dataset("v", data=np.zeros(3, np.uint16) if data is None else data)
    _tag(ds, "ml_ndarray")
    if name is not None:
        ds.attrs["h5ckpt_dtype"] = np.bytes_(name)
    return ds


HOSTILE = {
    "a field name that is no identifier": lambda f: _namedtuple(f, b"a,1b"),
    "a keyword as a field name": lambda f: _namedtuple(f, b"a,class"),
    "a field name with an underscore": lambda f: _namedtuple(f, b"a,_b"),
    "a field named twice": lambda f: _namedtuple(f, b"a,a"),
    "code as a field name": lambda f: _namedtuple(f, b"a,b=__import__('os')"),
    "fewer fields than items": lambda f: _namedtuple(f, b"a"),
    "more fields than items": lambda f: _namedtuple(f, b"a,b,c"),
    "no fields attribute": lambda f: _namedtuple(f, None),
    "no class attribute": lambda f: _namedtuple(f, class_name=None),
    "an empty class name": lambda f: _namedtuple(f, class_name=b""),
    "a class name of 5000 bytes": lambda f: _namedtuple(f, class_name=b"x" * 5000),
    "fields that are not UTF-8": lambda f: _namedtuple(f, b"a,\xff"),
    "fields as a number": lambda f: _namedtuple(f, np.int64(3)),
    "fields as a variable-length string": lambda f: _namedtuple(f, "a,b"),
    "a namedtuple tag on a dataset": lambda f: _tag(f.create_dataset("v", data=1), "namedtuple"),
    "a pytree with a bad field name": lambda f: _tag(_namedtuple(f, b"a,b c"), "pytree"),
    "ml_ndarray of floats": lambda f: _ml(f, np.zeros(3, np.float16)),
    "ml_ndarray of signed integers": lambda f: _ml(f, np.zeros(3, np.int16)),
    "ml_ndarray without a dtype name": lambda f: _ml(f, name=None),
    "ml_ndarray with a dtype name that is no name": lambda f: _ml(f, name=b"../os.system"),
    "ml_ndarray of the wrong element size": lambda f: _ml(f, np.zeros(3, np.uint8)),
    "ml_scalar holding an array": lambda f: _tag(_ml(f, name=b"bfloat16"), "ml_scalar"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_nodes_are_corrupt(tmp_path: Path, case: str):
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        HOSTILE[case](f)
    with h5py.File(path, "r") as f, pytest.raises(CheckpointCorruptError) as info:
        read_value(f["v"], allow_pickle=False, limits=LoadLimits(), path="optimizer_state")
    assert str(info.value).startswith("optimizer_state"), str(info.value)


def test_an_ml_dtype_ml_dtypes_does_not_define_is_no_corruption(tmp_path: Path):
    path = tmp_path / "v.h5"
    with h5py.File(path, "w") as f:
        _ml(f, name=b"float3_e1m1")
    with h5py.File(path, "r") as f:
        with pytest.raises(CheckpointError, match="does not define") as info:
            read_value(f["v"], allow_pickle=False, limits=LoadLimits(), path="state")
        assert not isinstance(info.value, CheckpointCorruptError)
        assert info.value.error_context == {"path": "state", "dtype": "float3_e1m1"}
        # Checking the file (what validation does) needs no ml_dtypes and passes.
        read_value(f["v"], allow_pickle=False, limits=LoadLimits(), structure_only=True)


def _sealed(path: Path, build) -> Path:
    """A checkpoint whose payload ``build`` makes, with correct digests."""
    ts = 1.7e9
    with h5py.File(path, "w", userblock_size=512, libver=("v110", "latest")) as f:
        f.attrs["h5ckpt_format"] = np.bytes_(b"1.1")
        f.attrs["h5ckpt_version"] = np.bytes_(b"crafted")
        f.attrs["batch_idx"] = np.int64(5)
        f.attrs["loss"] = np.float64(0.5)
        f.attrs["timestamp"] = np.float64(ts)
        _tag(f.create_dataset("parameters", data=np.zeros(3)), "ndarray")
        _tag(f.create_group("metadata"), "dict")
        g = _namedtuple(f)
        f.move("v", "optimizer_state")
        build(g)
    fd = os.open(path, os.O_RDWR)
    try:
        _native.finalize(fd, [], 5, 0.5, ts, None, True)
    finally:
        os.close(fd)
    return path


def test_a_file_with_hostile_fields_is_invalid_and_skipped(ckpt_dir: Path):
    manager = CheckpointManager(ckpt_dir, keep_last_n=None)
    good = manager.save_checkpoint(3, np.ones(3), {"ok": True}, 0.5)

    def hostile(g: h5py.Group) -> None:
        g.attrs["h5ckpt_fields"] = np.bytes_(b"a,__class__")

    bad = _sealed(ckpt_dir / "checkpoint_batch_0005.h5", hostile)
    (header,) = _native.verify_files([bad], None)
    assert header.batch_idx == 5  # the digests pass
    assert not manager.validate_checkpoint(bad)
    with pytest.raises(CheckpointCorruptError, match="invalid field name '__class__'"):
        manager.load_checkpoint(bad)
    fresh = CheckpointManager(ckpt_dir, keep_last_n=None)
    assert fresh.load_latest()["batch_idx"] == 3
    assert fresh.find_latest_checkpoint() == good


def _ml_state(data: np.ndarray, name: bytes):
    def build(g: h5py.Group) -> None:
        f = g.file
        del f["optimizer_state"]
        _ml(f, data, name)
        f.move("v", "optimizer_state")

    return build


def test_an_ml_array_of_the_wrong_element_size_does_not_validate(ckpt_dir: Path):
    """Intact digests, bfloat16 named over one-byte elements: loading refuses it, so
    validation must too (what validates loads), and load_latest skips it."""
    manager = CheckpointManager(ckpt_dir, keep_last_n=None)
    good = manager.save_checkpoint(3, np.ones(3), {"ok": True}, 0.5)
    bad = _sealed(
        ckpt_dir / "checkpoint_batch_0005.h5", _ml_state(np.zeros(3, np.uint8), b"bfloat16")
    )
    (header,) = _native.verify_files([bad], None)
    assert header.batch_idx == 5  # the digests pass
    with pytest.raises(CheckpointCorruptError, match="1-byte elements for the dtype bfloat16"):
        manager.load_checkpoint(bad)
    assert not CheckpointManager(ckpt_dir).validate_checkpoint(bad)
    fresh = CheckpointManager(ckpt_dir, keep_last_n=None)
    assert fresh.find_latest_checkpoint() == good
    assert fresh.load_latest()["batch_idx"] == 3
    # The right size validates and loads as bfloat16.
    other = ckpt_dir.parent / "other"
    other.mkdir()
    state = _ml_state(np.zeros(3, np.uint16), b"bfloat16")
    ok = _sealed(other / "checkpoint_batch_0005.h5", state)
    assert CheckpointManager(other).validate_checkpoint(ok)
    assert manager.load_checkpoint(ok)["optimizer_state"].dtype == ml_dtypes.bfloat16


def test_a_namedtuple_file_is_valid_when_sealed_right(ckpt_dir: Path):
    ok = _sealed(ckpt_dir / "checkpoint_batch_0005.h5", lambda g: None)
    loaded = CheckpointManager(ckpt_dir).load_checkpoint(ok)["optimizer_state"]
    assert type(loaded).__name__ == "T" and loaded._fields == ("a", "b") and loaded == (0, 1)


def test_weakly_typed_scalars_stay_weak(ckpt_dir: Path):
    """A scalar made from a Python number promotes like one; so does the restored one."""
    state = {"lr": jnp.asarray(0.1), "step": jnp.asarray(3), "strong": jnp.float32(0.5)}
    assert state["lr"].weak_type and not state["strong"].weak_type
    manager = CheckpointManager(ckpt_dir)
    manager.save_checkpoint(1, np.zeros(1), state, 0.1)
    loaded = manager.load_latest(like={"optimizer_state": state})["optimizer_state"]
    assert_same_pytree(loaded, state)
    half = jnp.ones(2, jnp.bfloat16)
    assert (loaded["lr"] * half).dtype == (state["lr"] * half).dtype == jnp.bfloat16
    assert (loaded["strong"] * half).dtype == jnp.float32


def test_new_nodes_stay_within_the_attributes_the_writer_declares(ckpt_dir: Path):
    from h5ckpt.payload import MAX_ATTRIBUTES_WRITTEN

    params, state = trained(optax.adam(1e-2), steps=1, dtype=jnp.bfloat16)
    value = {"s": state, "ts": TrainState(jnp.int32(1), params, state), "x": ml_dtypes.int4(3)}
    path = CheckpointManager(ckpt_dir).save_checkpoint(1, params["w"], value, 0.5)
    counts: dict[str, int] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: counts.__setitem__(name, len(obj.attrs)))
    assert max(counts.values()) == 3 < MAX_ATTRIBUTES_WRITTEN
    assert counts["optimizer_state/s/0"] == 3  # tag, class, fields
    assert counts["optimizer_state/s/0/1/w"] == 3  # tag, ml_dtypes name, hint


class SeedState(NamedTuple):
    """A NamedTuple in a predecessor's pickled optimizer state."""

    step: int
    moment: Any


def test_migration_stores_named_tuples_and_jax_arrays_of_pickled_states_natively(
    tmp_path: Path, seed_writer
):
    from h5ckpt.migrate import migrate_directory

    _, opt_state = trained(optax.adam(1e-2), steps=2)
    state = {"seed": SeedState(3, jnp.arange(3.0)), "optax": opt_state, "lr": 0.01}
    (tmp_path / "old").mkdir()
    seed_writer(tmp_path / "old", 10, np.ones(4), state, 0.5)
    source = CheckpointManager(tmp_path / "old", prefix="homodyne_state", allow_pickle=True)
    destination = CheckpointManager(tmp_path / "new", prefix="homodyne_state", auto_cleanup=False)
    [result] = list(migrate_directory(source, destination))
    assert result.outcome == "converted" and result.pickled is None, result
    assert "pickle" not in tags_of(result.destination)
    back = destination.load_checkpoint(result.destination, like={"optimizer_state": state})
    assert type(back["optimizer_state"]["seed"]) is SeedState
    assert_same_pytree(back["optimizer_state"], state)
    plain = destination.load_checkpoint(result.destination)["optimizer_state"]
    assert type(plain["seed"]).__name__ == "SeedState" and plain["seed"].step == 3


def test_values_equal_compares_array_likes_and_pytree_nodes_exactly():
    a = jnp.array([0.0, 1.0])
    assert values_equal(a, jnp.array([0.0, 1.0]))
    assert not values_equal(a, jnp.array([-0.0, 1.0]))  # signed zero
    assert not values_equal(a, a.astype(jnp.bfloat16))
    assert not values_equal(a, np.asarray(a))  # types differ
    ts = TrainState(jnp.int32(1), {"w": a}, ())
    assert values_equal(ts, TrainState(jnp.int32(1), {"w": jnp.array([0.0, 1.0])}, ()))
    assert not values_equal(ts, TrainState(jnp.int32(2), {"w": a}, ()))

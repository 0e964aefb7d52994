"""The payload tree: exact round trips of Python values through real HDF5 files,
refusals with key paths, load limits and malformed trees."""

from __future__ import annotations

import collections
import copy
import fractions
import io
import itertools
import random
import time
from pathlib import Path
from typing import Any

import h5py
import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from h5ckpt.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointLimitError,
    CheckpointPickleError,
    CheckpointValueError,
)
from h5ckpt.limits import LoadLimits, default_max_array_bytes
from h5ckpt.tree import (
    TAGS,
    TYPE_ATTR,
    check_value,
    escape_key,
    hdf5_type,
    ordered_links,
    read_value,
    unescape_key,
    values_equal,
    write_value,
)

LIMITS = LoadLimits()
_counter = itertools.count()


def roundtrip(directory: Path, value: Any, *, allow_pickle: bool = False, **write_kw: Any) -> Any:
    """check_value, then write to a fresh file, close it, open it again and read."""
    check_value(value, allow_pickle=allow_pickle)
    path = directory / f"rt{next(_counter)}.h5"
    with h5py.File(path, "w") as f:
        write_value(f, "v", value, allow_pickle=allow_pickle, **write_kw)
    with h5py.File(path, "r") as f:
        return read_value(f["v"], allow_pickle=allow_pickle, limits=LIMITS)


def assert_roundtrip(directory: Path, value: Any, *, allow_pickle: bool = False) -> Any:
    back = roundtrip(directory, value, allow_pickle=allow_pickle)
    assert values_equal(value, back), (value, back)
    return back


def read_file(path: Path, name: str = "v", *, allow_pickle: bool = False, limits=LIMITS) -> Any:
    with h5py.File(path, "r") as f:
        return read_value(f[name], allow_pickle=allow_pickle, limits=limits)


def tag(obj: h5py.HLObject, name: str) -> None:
    """Write a type tag the way h5ckpt does (fixed-length ASCII string)."""
    obj.attrs.create(TYPE_ATTR, np.array(name.encode(), dtype=f"S{len(name)}"))


# --------------------------------------------------------------------- strategies

NUMERIC_CODES = "?bBhHiIlLqQefdgFDG"
ALL_DTYPES = [
    np.dtype(c).newbyteorder(order) for c in NUMERIC_CODES for order in "<>" if c != "?"
] + [np.dtype("?")]


def _natively_storable(dt: np.dtype) -> bool:
    try:
        check_value(np.zeros(1, dtype=dt), allow_pickle=False)
    except CheckpointValueError:
        return False
    return True


STORABLE_DTYPES = [dt for dt in ALL_DTYPES if _natively_storable(dt)]
SCALAR_TYPES = [
    np.bool_,
    np.int8,
    np.uint8,
    np.int16,
    np.uint16,
    np.int32,
    np.uint32,
    np.int64,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
    np.longdouble,
    np.complex64,
    np.complex128,
    np.clongdouble,
]

any_text = st.text(st.characters(exclude_categories=()), max_size=12)


def _layout(arr: np.ndarray, how: int) -> np.ndarray:
    if how == 1:
        return np.asfortranarray(arr)
    if how == 2 and arr.ndim:
        return arr.T
    if how == 3 and arr.ndim:
        return np.concatenate([arr, arr], axis=0)[::2]
    return arr


np_arrays = st.builds(
    _layout,
    hnp.arrays(
        dtype=st.sampled_from(STORABLE_DTYPES),
        shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
    ),
    st.integers(0, 3),
)
np_scalars = st.sampled_from(SCALAR_TYPES).flatmap(
    lambda t: hnp.arrays(dtype=np.dtype(t), shape=()).map(lambda a: a[()])
)
ints = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, -1, 0]),
)
floats = st.one_of(st.floats(), st.sampled_from([0.0, -0.0, float("nan"), float("inf")]))

leaves = st.one_of(
    st.none(),
    st.booleans(),
    ints,
    floats,
    any_text,
    st.binary(max_size=16),
    st.binary(max_size=16).map(bytearray),
    np_scalars,
    np_arrays,
)


def _containers(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(any_text, children, max_size=4),
    )


trees = st.recursive(leaves, _containers, max_leaves=24)


class Point:
    """A plain class: stored only by pickling."""

    def __init__(self, x: int, y: float) -> None:
        self.x, self.y = x, y

    def __eq__(self, other: object) -> bool:
        return type(other) is Point and (self.x, self.y) == (other.x, other.y)

    __hash__ = None  # type: ignore[assignment]


class Pair(tuple):
    """A tuple subclass that is no NamedTuple (no ``_fields``): stored only by pickling.
    (NamedTuples are stored natively: tests/test_pytree.py.)"""

    __slots__ = ()


pickled_only = st.one_of(
    st.frozensets(st.integers(), max_size=4),
    st.sets(st.integers(), max_size=4),
    st.complex_numbers(allow_nan=False),
    st.fractions(),
    st.builds(Point, st.integers(), st.floats(allow_nan=False)),
    st.builds(lambda a, b: Pair((a, b)), st.integers(), any_text),
    st.dictionaries(st.integers(), st.integers(), min_size=1, max_size=3),
    st.lists(st.integers(), max_size=3).map(lambda xs: np.array([*xs, None], dtype=object)),
    st.lists(any_text, max_size=3).map(lambda xs: np.array(xs, dtype="U8")),
    st.dictionaries(any_text, st.integers(), max_size=3).map(collections.OrderedDict),
)
trees_with_pickles = st.recursive(st.one_of(leaves, pickled_only), _containers, max_leaves=16)

HYPOTHESIS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# ----------------------------------------------------------------- property tests


@HYPOTHESIS
@given(value=trees)
def test_random_trees_round_trip(tmp_path: Path, value: Any) -> None:
    assert_roundtrip(tmp_path, value)


@HYPOTHESIS
@given(value=trees_with_pickles)
def test_random_trees_with_pickled_nodes_round_trip(tmp_path: Path, value: Any) -> None:
    assert_roundtrip(tmp_path, value, allow_pickle=True)


@settings(max_examples=300, deadline=None)
@given(key=any_text)
def test_key_escape_is_reversible_and_valid(key: str) -> None:
    name = escape_key(key)
    assert name and "/" not in name and "\x00" not in name and not name.startswith(".")
    name.encode("utf-8")  # no lone surrogates left
    assert unescape_key(name) == key


@settings(max_examples=200, deadline=None)
@given(a=trees)
def test_values_equal_is_reflexive_on_copies(a: Any) -> None:
    assert values_equal(a, copy.deepcopy(a))


# ------------------------------------------------------------------- explicit cases

HARD_KEYS = [
    "",
    "/",
    "a/b/c",
    ".",
    "..",
    ".hidden",
    "a.b",
    "\x00",
    "a\x00b",
    "%",
    "%25",
    "%2F",
    "%2E",
    "\ud800",
    "\udfff",
    "\ud83d\ude00",
    "😀",
    "é",
    " ",
    "\n\t",
    "0",
    "x" * 5000,
]


def test_hard_keys_round_trip_in_order(tmp_path: Path) -> None:
    value = {k: i for i, k in enumerate(reversed(HARD_KEYS))}
    back = assert_roundtrip(tmp_path, value)
    assert list(back) == list(value)


def test_dict_order_is_insertion_order_not_name_order(tmp_path: Path) -> None:
    value = {"zeta": 1, "alpha": 2, "10": 3, "9": 4, "Beta": 5}
    back = assert_roundtrip(tmp_path, value)
    assert list(back) == ["zeta", "alpha", "10", "9", "Beta"]


def test_a_dict_group_without_creation_order_is_read_in_name_order(tmp_path: Path) -> None:
    """Groups written by another program may not track creation order: loading and
    ``h5ckpt show`` (which shares the link walk) then list the links by name."""
    path = tmp_path / "untracked.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("v", track_order=False)
        tag(g, "dict")
        for name in ["zeta", "alpha", "10", "9", "Beta"]:
            tag(g.create_dataset(name, data=np.int64(1)), "int")
    with h5py.File(path, "r") as f:
        gid = f["v"].id
        with pytest.raises(RuntimeError):  # the walk falls back, not just succeeds
            gid.links.iterate(lambda n: None, idx_type=h5py.h5.INDEX_CRT_ORDER)
        assert [n for n, _ in ordered_links(gid)] == [b"10", b"9", b"Beta", b"alpha", b"zeta"]
    assert list(read_file(path)) == ["10", "9", "Beta", "alpha", "zeta"]


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("plain", "plain"),
        ("", "%"),
        ("%", "%25"),
        ("a/b", "a%2Fb"),
        ("a\x00", "a%00"),
        (".", "%2E"),
        ("..", "%2E."),
        ("a.", "a."),
        ("\ud800", "%ED%A0%80"),
        ("é", "é"),
    ],
)
def test_escape_key_table(key: str, name: str) -> None:
    assert escape_key(key) == name
    assert unescape_key(name) == key


@pytest.mark.parametrize("name", ["%41", "%2f", ".a", "%G0", "a%", "%C3%A9", "%ED", "%C0%80"])
def test_unescape_rejects_non_canonical_names(name: str) -> None:
    with pytest.raises(ValueError):
        unescape_key(name)


@pytest.mark.parametrize(
    "text",
    ["", "plain", "é😀", "a\x00b", "\x00", "\ud800", "x\udfffy", "\ud83d\ude00", "z" * 100_000],
)
def test_strings(tmp_path: Path, text: str) -> None:
    assert assert_roundtrip(tmp_path, text) == text


def test_plain_strings_are_hdf5_utf8_strings(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        write_value(f, "v", {"plain": "héllo", "nul": "a\x00b"}, allow_pickle=False)
    with h5py.File(path, "r") as f:
        plain = f["v/plain"]
        # A fixed-length UTF-8 string: no global heap.
        assert h5py.check_string_dtype(plain.dtype) == ("utf-8", len("héllo".encode()))
        assert plain.shape == ()
        assert plain.asstr()[()] == "héllo"
        assert plain.attrs[TYPE_ATTR] == b"str"
        assert f["v/nul"].attrs[TYPE_ATTR] == b"str_bytes"
        assert f["v/nul"][()].tobytes() == b"a\x00b"


@pytest.mark.parametrize(
    "number",
    [0, 1, -1, 2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 2**64, 10**5000, -(10**5000) + 7],
    ids=lambda n: f"{'-' if n < 0 else '+'}{n.bit_length()}bits",
)
def test_ints(tmp_path: Path, number: int) -> None:
    back = assert_roundtrip(tmp_path, number)
    assert type(back) is int and back == number


def test_int_storage(tmp_path: Path) -> None:
    path = tmp_path / "i.h5"
    with h5py.File(path, "w") as f:
        write_value(f, "v", [5, 2**70, -(2**70)], allow_pickle=False)
    with h5py.File(path, "r") as f:
        assert f["v/0"].dtype == np.dtype("<i8") and f["v/0"].attrs[TYPE_ATTR] == b"int"
        assert f["v/1"].attrs[TYPE_ATTR] == b"bigint"
        assert f["v/1"].asstr()[()] == "0x400000000000000000"
        assert f["v/2"].asstr()[()] == "-0x400000000000000000"


@pytest.mark.parametrize(
    "number", [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 5e-324, 1.7976931348623157e308]
)
def test_floats(tmp_path: Path, number: float) -> None:
    back = assert_roundtrip(tmp_path, number)
    assert type(back) is float
    assert np.signbit(back) == np.signbit(number)


def test_bool_none_and_ints_keep_their_types(tmp_path: Path) -> None:
    value = [True, 1, False, 0, None, 1.0, np.bool_(True), np.int64(1)]
    back = assert_roundtrip(tmp_path, value)
    assert [type(x) for x in back] == [type(x) for x in value]


@pytest.mark.parametrize("blob", [b"", b"\x00", b"abc\xff" * 1000])
def test_bytes_and_bytearray(tmp_path: Path, blob: bytes) -> None:
    back = assert_roundtrip(tmp_path, [blob, bytearray(blob)])
    assert type(back[0]) is bytes and type(back[1]) is bytearray


@pytest.mark.parametrize("scalar_type", SCALAR_TYPES)
def test_numpy_scalars(tmp_path: Path, scalar_type: type) -> None:
    values = [scalar_type(0), scalar_type(1)]
    if np.dtype(scalar_type).kind in "fc":
        values += [scalar_type(-0.0), scalar_type(np.nan), scalar_type(np.inf)]
    if np.dtype(scalar_type).kind == "c":
        values.append(scalar_type(complex(-0.0, np.nan)))
    if np.dtype(scalar_type).kind in "iu":
        info = np.iinfo(scalar_type)
        values += [scalar_type(info.min), scalar_type(info.max)]
    back = assert_roundtrip(tmp_path, values)
    assert all(type(x) is scalar_type for x in back)


def test_every_standard_dtype_is_stored_natively() -> None:
    for dt in ALL_DTYPES:
        if dt.kind != "c" or dt.char != "G":
            assert dt in STORABLE_DTYPES, dt
    # clongdouble may only be stored in native byte order (h5py drops a swapped one).
    assert np.dtype("G").newbyteorder("=") in STORABLE_DTYPES


@pytest.mark.parametrize("dtype", STORABLE_DTYPES, ids=lambda d: d.str)
def test_arrays_of_every_dtype_and_layout(tmp_path: Path, dtype: np.dtype) -> None:
    base = np.arange(24).reshape(2, 3, 4).astype(dtype)
    if dtype.kind in "fc":
        base.flat[0] = np.nan
        base.flat[1] = -0.0
        base.flat[2] = np.inf
    value = {
        "c": base,
        "fortran": np.asfortranarray(base),
        "transposed": base.T,
        "strided": base[:, ::2, 1::2],
        "zero_d": base[0, 1, 1, ...],
        "empty": np.zeros((0, 3), dtype=dtype),
        "empty_middle": np.zeros((3, 0, 2), dtype=dtype),
    }
    back = assert_roundtrip(tmp_path, value)
    for arr in back.values():
        assert type(arr) is np.ndarray
        assert arr.dtype == dtype and arr.dtype.isnative == dtype.isnative
        assert arr.flags.c_contiguous
    assert back["zero_d"].shape == ()


def test_array_with_32_dimensions(tmp_path: Path) -> None:
    assert_roundtrip(tmp_path, np.zeros((1,) * 32, dtype=np.int8))
    with pytest.raises(CheckpointValueError, match="33 dimensions"):
        check_value(np.zeros((1,) * 33), allow_pickle=False)


def test_empty_and_nested_containers(tmp_path: Path) -> None:
    value = {
        "d": {},
        "l": [],
        "t": (),
        "nested": ((), ((),), [()], {"x": ((1, 2), [3, (4,)])}),
        "lists": [[[[]]]],
    }
    assert_roundtrip(tmp_path, value)
    for empty in ({}, [], ()):
        assert type(assert_roundtrip(tmp_path, empty)) is type(empty)


def test_long_list_keeps_order(tmp_path: Path) -> None:
    value = list(range(1500))
    assert assert_roundtrip(tmp_path, value) == value


def test_tree_is_readable_with_plain_h5py(tmp_path: Path) -> None:
    path = tmp_path / "plain.h5"
    value = {"w": np.arange(3.0), "meta": {"name": "run", "items": [1, 2.5]}, "none": None}
    with h5py.File(path, "w") as f:
        write_value(f, "v", value, allow_pickle=False)
    with h5py.File(path, "r") as f:
        root = f["v"]
        assert isinstance(root, h5py.Group) and root.attrs[TYPE_ATTR] == b"dict"
        assert list(root) == ["w", "meta", "none"]
        np.testing.assert_array_equal(root["w"][()], np.arange(3.0))
        assert root["meta/items/0"][()] == 1 and root["meta/items/1"][()] == 2.5
        assert root["meta/items"].attrs[TYPE_ATTR] == b"list"
        assert root["none"].shape is None
        for obj in [root, root["w"], root["meta"], root["meta/items/0"], root["none"]]:
            assert len(obj.attrs) == 1


def test_put_array_creates_every_array(tmp_path: Path) -> None:
    calls: list[tuple[str, np.dtype, tuple[int, ...]]] = []

    def put_array(group: h5py.Group, name: str, arr: np.ndarray) -> h5py.Dataset:
        calls.append((name, arr.dtype, arr.shape))
        assert arr.flags.c_contiguous
        if arr.ndim == 0 or arr.size == 0:
            return group.create_dataset(name, data=arr, dtype=hdf5_type(arr.dtype))
        return group.create_dataset(
            name, data=arr, dtype=hdf5_type(arr.dtype), chunks=True, compression="gzip"
        )

    value = {
        "a": np.arange(100.0).reshape(10, 10).T,
        "be": np.arange(4, dtype=">f4"),
        "z": np.array(3),
        "e": np.zeros((0,)),
        "b": b"xyz",
        "s": "nul\x00",
        "p": {1, 2},
        "n": [1, 2.0, "x"],
    }
    back = roundtrip(tmp_path, value, allow_pickle=True, put_array=put_array)
    assert values_equal(back, value)
    assert sorted(name for name, _, _ in calls) == ["a", "b", "be", "e", "p", "s", "z"]


def _native_order(group: h5py.Group, name: str, arr: np.ndarray) -> h5py.Dataset:
    return group.create_dataset(name, data=arr.astype(arr.dtype.newbyteorder("=")))


def _at_least_1d(group: h5py.Group, name: str, arr: np.ndarray) -> h5py.Dataset:
    return group.create_dataset(name, data=np.ascontiguousarray(arr))  # 0-d becomes (1,)


@pytest.mark.parametrize(
    ("put_array", "value"),
    [(_native_order, np.arange(3, dtype=">f8")), (_at_least_1d, np.array(2.5))],
)
def test_put_array_that_changes_the_array_is_refused(tmp_path: Path, put_array, value) -> None:
    with h5py.File(tmp_path / "x.h5", "w") as f, pytest.raises(CheckpointValueError, match="dtype"):
        write_value(f, "v", value, allow_pickle=False, put_array=put_array)


def test_a_dict_of_1000_floats_round_trips(tmp_path: Path) -> None:
    value = {f"k{i}": float(i) for i in range(1000)}
    with h5py.File(tmp_path / "wide.h5", "w") as f:
        write_value(f, "v", value, allow_pickle=False)
    assert values_equal(read_file(tmp_path / "wide.h5"), value)


def test_tag_written_as_vlen_string_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "vlen.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("v", data=np.arange(3))
        ds.attrs[TYPE_ATTR] = "ndarray"  # h5py writes a variable-length UTF-8 string
    np.testing.assert_array_equal(read_file(path), np.arange(3))


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ({1, 2}, "set"),
        (frozenset(), "frozenset"),
        (1 + 2j, "complex"),
        (np.array([1, None], dtype=object), "dtype object"),
        (np.zeros(2, dtype=[("a", "f8")]), "dtype"),
        (np.array(["a"]), "dtype <U1"),
        (np.array([b"a"]), "dtype |S1"),
        (np.array(["2020-01-01"], dtype="M8[D]"), "datetime64"),
        (np.str_("x"), "numpy scalar"),
        (np.datetime64("2020-01-01"), "numpy scalar"),
        (np.ma.masked_array([1, 2]), "MaskedArray"),
        (collections.OrderedDict(a=1), "OrderedDict"),
        (Pair((1, 2)), "Pair"),
        (Point(1, 2.0), "Point"),
        (fractions.Fraction(1, 3), "Fraction"),
        (np.longlong(3) if np.longlong is not np.int64 else {1}, ""),
        (range(3), "range"),
    ],
)
def test_unsupported_values_are_refused_with_their_path(value: Any, words: str) -> None:
    state = {"layers": [{"w": 1}, {"b": 2, "w": value}]}
    with pytest.raises(CheckpointValueError, match="allow_pickle") as info:
        check_value(state, allow_pickle=False, path="optimizer_state")
    assert str(info.value).startswith("optimizer_state['layers'][1]['w']: ")
    assert words in str(info.value)
    assert info.value.error_context["path"] == "optimizer_state['layers'][1]['w']"
    check_value(state, allow_pickle=True)


def test_non_str_keys_are_refused() -> None:
    for key in (1, b"a", None, (1,), True, np.str_("a")):
        with pytest.raises(CheckpointValueError, match="key") as info:
            check_value({"outer": {"ok": 1, key: 2}}, allow_pickle=False)
        assert info.value.error_context["path"] == "value['outer']"


def test_pickled_value_keeps_its_parents_native(tmp_path: Path) -> None:
    value = {"a": [1, {3, 4}], "b": {1: "int key"}}
    path = tmp_path / "p.h5"
    check_value(value, allow_pickle=True)
    with h5py.File(path, "w") as f:
        write_value(f, "v", value, allow_pickle=True)
    with h5py.File(path, "r") as f:
        assert f["v"].attrs[TYPE_ATTR] == b"dict"
        assert f["v/a"].attrs[TYPE_ATTR] == b"list"
        assert f["v/a/0"].attrs[TYPE_ATTR] == b"int"
        assert f["v/a/1"].attrs[TYPE_ATTR] == b"pickle"
        assert f["v/b"].attrs[TYPE_ATTR] == b"pickle"
        assert f["v/b"].dtype == np.uint8
    assert values_equal(read_file(path, allow_pickle=True), value)


def test_unpicklable_value_is_refused_before_writing() -> None:
    with pytest.raises(CheckpointValueError, match=r"value\['f'\]: cannot pickle"):
        check_value({"f": lambda: 1}, allow_pickle=True)


def test_reference_cycle_is_refused() -> None:
    loop: list[Any] = [1]
    loop.append({"again": loop})
    with pytest.raises(CheckpointValueError, match="contains itself") as info:
        check_value(loop, allow_pickle=True)
    assert info.value.error_context["path"] == "value[1]['again']"


def test_shared_subtrees_are_not_cycles(tmp_path: Path) -> None:
    shared = {"x": [1, 2]}
    assert_roundtrip(tmp_path, [shared, shared, (shared,)])


def test_nothing_is_written_when_check_fails(tmp_path: Path) -> None:
    path = tmp_path / "never.h5"

    def save(value: Any) -> None:  # how the manager uses the module
        check_value(value, allow_pickle=False, path="optimizer_state")
        with h5py.File(path, "w") as f:
            write_value(f, "optimizer_state", value, allow_pickle=False)

    with pytest.raises(CheckpointValueError):
        save({"fine": np.zeros(3), "bad": [1, 2, {3}]})
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_write_value_also_refuses(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "w.h5", "w") as f, pytest.raises(CheckpointValueError) as info:
        write_value(f, "state", {"a": [object()]}, allow_pickle=False)
    assert info.value.error_context["path"] == "state['a'][0]"


def _nest(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = {"a": value}
    return value


def test_check_value_depth_and_node_limits() -> None:
    check_value(_nest(256), allow_pickle=False)
    with pytest.raises(CheckpointValueError, match="max_depth=256"):
        check_value(_nest(257), allow_pickle=False)
    with pytest.raises(CheckpointValueError, match="max_depth"):
        check_value(_nest(100_000), allow_pickle=False)  # no RecursionError
    check_value(_nest(100_000), allow_pickle=False, limits=LoadLimits(max_depth=100_000))
    with pytest.raises(CheckpointValueError, match="max_nodes=10"):
        check_value(list(range(10)), allow_pickle=False, limits=LoadLimits(max_nodes=10))
    check_value(list(range(9)), allow_pickle=False, limits=LoadLimits(max_nodes=10))


def test_deep_tree_round_trips_without_recursion(tmp_path: Path) -> None:
    depth = 3000
    limits = LoadLimits(max_depth=depth)
    value = _nest(depth)
    check_value(value, allow_pickle=False, limits=limits)
    path = tmp_path / "deep_ok.h5"
    with h5py.File(path, "w") as f:
        write_value(f, "v", value, allow_pickle=False)
    back = read_file(path, limits=limits)
    assert values_equal(back, value)
    with pytest.raises(CheckpointLimitError, match="max_depth=2999"):
        read_file(path, limits=LoadLimits(max_depth=depth - 1))


# ------------------------------------------------------------------------- limits


def test_hostile_deep_nesting_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "deep.h5"
    with h5py.File(path, "w") as f:
        group = f.create_group("v")
        tag(group, "dict")
        gid = group.id
        for _ in range(10_000):  # raw h5py, not write_value
            gid = h5py.h5g.create(gid, b"a")
            tag(h5py.Group(gid), "dict")
    with pytest.raises(CheckpointLimitError, match="max_depth=256") as info:
        read_file(path)
    assert info.value.error_context["max_depth"] == 256
    with pytest.raises(CheckpointLimitError):
        read_file(path, limits=LoadLimits(max_depth=5_000))


@pytest.fixture(scope="module")
def many_attributes_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tagged dict group carrying 100,000 tiny attributes (written with raw h5py)."""
    path = tmp_path_factory.mktemp("attrs") / "attrs.h5"
    with h5py.File(path, "w", libver="latest") as f:
        group = f.create_group("v")
        tag(group, "dict")
        space = h5py.h5s.create(h5py.h5s.SCALAR)
        one = np.zeros((), dtype=np.uint8)
        for i in range(100_000):
            h5py.h5a.create(group.id, b"a%d" % i, h5py.h5t.STD_U8LE, space).write(one)
    return path


def test_object_with_100k_attributes_is_refused(many_attributes_file: Path) -> None:
    # The count comes from the object header; no attribute is read to find it.
    with pytest.raises(CheckpointLimitError, match="max_attributes=64"):
        read_file(many_attributes_file)
    with pytest.raises(CheckpointLimitError, match="max_attributes=1000"):
        read_file(many_attributes_file, limits=LoadLimits(max_attributes=1000))
    # With a limit above the count the (empty) dict loads.
    assert read_file(many_attributes_file, limits=LoadLimits(max_attributes=200_000)) == {}


def test_attribute_limit_boundary(tmp_path: Path) -> None:
    path = tmp_path / "a.h5"
    with h5py.File(path, "w") as f:
        for name, count in (("ok", 64), ("over", 65)):
            ds = f.create_dataset(name, data=np.int64(1))
            tag(ds, "int")
            for i in range(count - 1):
                ds.attrs[f"x{i}"] = 0
    assert read_file(path, "ok") == 1
    with pytest.raises(CheckpointLimitError):
        read_file(path, "over")


def test_dataset_declaring_terabytes_is_refused_before_allocation(tmp_path: Path) -> None:
    path = tmp_path / "huge.h5"
    with h5py.File(path, "w") as f:
        # 2**40 float64 = 8 TiB declared, chunked, never written: the file stays tiny.
        ds = f.create_dataset("v", shape=(2**40,), dtype="f8", chunks=(1024,))
        tag(ds, "ndarray")
        blob = f.create_dataset("blob", shape=(2**41,), dtype="u1", chunks=(4096,))
        tag(blob, "bytes")
    assert path.stat().st_size < 100_000
    for name in ("v", "blob"):
        with pytest.raises(CheckpointLimitError, match="max_array_bytes") as info:
            read_file(path, name)
        assert info.value.error_context["declared_bytes"] >= 2**41
        assert info.value.error_context["max_array_bytes"] == default_max_array_bytes(
            path.stat().st_size
        )


def test_declared_size_overflowing_int64_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "overflow.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("v", shape=(2**40, 2**40), dtype="c16", chunks=(1, 1))
        tag(ds, "ndarray")
    with pytest.raises(CheckpointLimitError):
        read_file(path)


def test_array_budget_counts_all_arrays_of_a_tree(tmp_path: Path) -> None:
    path = tmp_path / "budget.h5"
    value = {"a": np.zeros(100, dtype=np.uint8), "b": b"x" * 100, "c": np.zeros(10), "s": "é" * 5}
    with h5py.File(path, "w") as f:
        write_value(f, "v", value, allow_pickle=False)
    assert values_equal(read_file(path, limits=LoadLimits(max_array_bytes=290)), value)
    with pytest.raises(CheckpointLimitError, match="max_array_bytes=289"):
        read_file(path, limits=LoadLimits(max_array_bytes=289))


def test_string_declaring_gigabytes_is_refused_before_allocation(tmp_path: Path) -> None:
    path = tmp_path / "long_string.h5"
    with h5py.File(path, "w") as f:
        tid = h5py.h5t.C_S1.copy()
        tid.set_size(2**32 - 1)  # declared in the datatype, never written
        space = h5py.h5s.create(h5py.h5s.SCALAR)
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_LATE)
        h5py.h5d.create(f.id, b"v", tid, space, dcpl=dcpl)
        tag(f["v"], "str")
    assert path.stat().st_size < 100_000
    with pytest.raises(CheckpointLimitError, match="max_array_bytes"):
        read_file(path, limits=LoadLimits(max_array_bytes=2**31))


def test_node_limit_is_checked_before_listing_links(tmp_path: Path) -> None:
    path = tmp_path / "wide.h5"
    with h5py.File(path, "w") as f:
        write_value(f, "v", list(range(1000)), allow_pickle=False)
    assert read_file(path, limits=LoadLimits(max_nodes=1001)) == list(range(1000))
    with pytest.raises(CheckpointLimitError, match="max_nodes=1000"):
        read_file(path, limits=LoadLimits(max_nodes=1000))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_depth": -1},
        {"max_nodes": 0},
        {"max_attributes": 0},
        {"max_array_bytes": -1},
        {"max_depth": 1.5},
        {"max_nodes": "10"},
        {"max_attributes": True},
        {"max_array_bytes": 2.0},
    ],
)
def test_load_limits_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(CheckpointValueError):
        LoadLimits(**kwargs)


def test_load_limits_defaults_and_budget() -> None:
    limits = LoadLimits()
    assert (limits.max_depth, limits.max_nodes, limits.max_attributes) == (256, 1_000_000, 64)
    assert limits.max_array_bytes is None
    assert limits.resolved_max_bytes(0) == 8 * 2**30
    assert limits.resolved_max_bytes(2**30) == 64 * 2**30
    assert LoadLimits(max_array_bytes=5).resolved_max_bytes(2**40) == 5
    assert LoadLimits(max_depth=np.int64(3)).max_depth == 3
    with pytest.raises(CheckpointValueError):
        limits.resolved_max_bytes(-1)
    with pytest.raises(AttributeError):
        limits.max_depth = 3  # type: ignore[misc]


# ------------------------------------------------------------------ malformed trees


def _group(f: h5py.File, type_tag: str | None = "dict") -> h5py.Group:
    g = f.create_group("v", track_order=True)
    if type_tag is not None:
        tag(g, type_tag)
    return g


def _scalar(parent: h5py.Group, name: str, data: Any, type_tag: str | None) -> h5py.Dataset:
    ds = parent.create_dataset(name, data=data)
    if type_tag is not None:
        tag(ds, type_tag)
    return ds


def _missing_tag(f):
    _group(f, None)


def _unknown_tag(f):
    _group(f, "frobnicate")


def _int_tag_attribute(f):
    f.create_group("v").attrs[TYPE_ATTR] = 7


def _array_tag_attribute(f):
    f.create_group("v").attrs[TYPE_ATTR] = np.array([b"dict", b"dict"])


def _long_tag_attribute(f):
    f.create_group("v").attrs.create(TYPE_ATTR, np.array(b"dict" * 50))


def _leaf_tag_on_group(f):
    _group(f, "int")


def _container_tag_on_dataset(f):
    _scalar(f, "v", 1, "dict")


def _int_tag_on_float(f):
    _scalar(f, "v", 1.5, "int")


def _int_tag_on_array(f):
    _scalar(f, "v", np.arange(3), "int")


def _float_tag_on_string(f):
    _scalar(f, "v", "1.5", "float")


def _bool_tag_on_int(f):
    _scalar(f, "v", 1, "bool")


def _str_tag_on_vlen_string(f):
    _scalar(f, "v", "abc", "str")  # h5py writes a variable-length string


def _str_tag_on_string_array(f):
    _scalar(f, "v", np.array([b"a", b"b"]), "str")


def _str_tag_on_bad_utf8(f):
    _scalar(f, "v", np.bytes_(b"\xff\xfe"), "str")


def _bigint_not_hex(f):
    _scalar(f, "v", np.bytes_(b"12345"), "bigint")


def _bigint_tag_on_int(f):
    _scalar(f, "v", 12345, "bigint")


def _bytes_tag_on_int32(f):
    _scalar(f, "v", np.arange(3, dtype=np.int32), "bytes")


def _bytes_tag_on_2d(f):
    _scalar(f, "v", np.zeros((2, 2), dtype=np.uint8), "bytes")


def _str_bytes_not_utf8(f):
    _scalar(f, "v", np.frombuffer(b"\xff", dtype=np.uint8), "str_bytes")


def _none_tag_on_value(f):
    _scalar(f, "v", 1, "none")


def _ndarray_tag_on_compound(f):
    _scalar(f, "v", np.zeros(2, dtype=[("a", "f8"), ("b", "i4")]), "ndarray")


def _ndarray_tag_on_strings(f):
    ds = f.create_dataset("v", data=["a", "b"], dtype=h5py.string_dtype())
    tag(ds, "ndarray")


def _ndarray_tag_on_enum(f):
    dt = h5py.enum_dtype({"A": 0, "B": 1}, basetype="i1")
    _scalar(f, "v", np.zeros(2, dtype=np.int8).astype(dt), "ndarray")


def _ndarray_tag_on_null(f):
    _scalar(f, "v", h5py.Empty("f8"), "ndarray")


def _np_scalar_on_array(f):
    _scalar(f, "v", np.arange(2), "np_scalar")


def _list_missing_item(f):
    g = _group(f, "list")
    _scalar(g, "0", 1, "int")
    _scalar(g, "2", 1, "int")


def _list_with_named_item(f):
    g = _group(f, "tuple")
    _scalar(g, "first", 1, "int")


def _dict_with_noncanonical_name(f):
    g = _group(f)
    _scalar(g, "%41", 1, "int")


def _dict_with_dot_name(f):
    g = _group(f)
    _scalar(g, ".x", 1, "int")


def _dict_with_soft_link(f):
    g = _group(f)
    _scalar(f, "target", 1, "int")
    g["link"] = h5py.SoftLink("/target")


def _dict_with_external_link(f):
    g = _group(f)
    g["link"] = h5py.ExternalLink(f.filename, "/target")
    _scalar(f, "target", 1, "int")


def _list_with_soft_link(f):
    g = _group(f, "list")
    _scalar(f, "target", 1, "int")
    g["0"] = h5py.SoftLink("/target")


def _dict_with_committed_type(f):
    g = _group(f)
    g["t"] = np.dtype("f8")
    tag(g["t"], "int")


def _child_without_tag(f):
    g = _group(f)
    _scalar(g, "x", 1, None)


def _corrupt_pickle(f):
    _scalar(f, "v", np.frombuffer(b"\x80\x05not a pickle", dtype=np.uint8), "pickle")


MALFORMED = [
    _missing_tag,
    _unknown_tag,
    _int_tag_attribute,
    _array_tag_attribute,
    _long_tag_attribute,
    _leaf_tag_on_group,
    _container_tag_on_dataset,
    _int_tag_on_float,
    _int_tag_on_array,
    _float_tag_on_string,
    _bool_tag_on_int,
    _str_tag_on_vlen_string,
    _str_tag_on_string_array,
    _str_tag_on_bad_utf8,
    _bigint_not_hex,
    _bigint_tag_on_int,
    _bytes_tag_on_int32,
    _bytes_tag_on_2d,
    _str_bytes_not_utf8,
    _none_tag_on_value,
    _ndarray_tag_on_compound,
    _ndarray_tag_on_strings,
    _ndarray_tag_on_enum,
    _ndarray_tag_on_null,
    _np_scalar_on_array,
    _list_missing_item,
    _list_with_named_item,
    _dict_with_noncanonical_name,
    _dict_with_dot_name,
    _dict_with_soft_link,
    _dict_with_external_link,
    _list_with_soft_link,
    _dict_with_committed_type,
    _child_without_tag,
    _corrupt_pickle,
]


@pytest.mark.parametrize("build", MALFORMED, ids=lambda fn: fn.__name__.strip("_"))
def test_malformed_trees_are_corrupt(tmp_path: Path, build) -> None:
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        build(f)
    with pytest.raises(CheckpointCorruptError) as info:
        read_file(path, allow_pickle=True)
    assert type(info.value) is CheckpointCorruptError
    assert "path" in info.value.error_context


def test_same_value_gives_the_same_bytes(tmp_path: Path) -> None:
    value = {"a": [1, "x", None, (2.5,)], "b": np.arange(3)}
    images = []
    for i in range(2):
        path = tmp_path / f"same{i}.h5"
        with h5py.File(path, "w") as f:
            write_value(f, "v", value, allow_pickle=False)
        images.append(path.read_bytes())
        time.sleep(1.1 if i == 0 else 0)  # HDF5 object times have 1 s resolution
    assert images[0] == images[1]


def test_damaged_files_raise_only_checkpoint_errors() -> None:
    value = {
        "a": [1, 2.5, "x", None, True, (1, 2)],
        "arr": np.arange(20.0),
        "s": {"k/": b"zz", "": 2**80},
        "t": "a\x00b",
    }
    image = io.BytesIO()
    with h5py.File(image, "w") as f:
        write_value(f, "v", value, allow_pickle=False)
    good = image.getvalue()
    rng = random.Random(1234)
    outcomes: collections.Counter[str] = collections.Counter()
    for _ in range(300):
        damaged = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        try:
            f = h5py.File(io.BytesIO(bytes(damaged)), "r")
            node = f["v"]
        except Exception:
            outcomes["not opened"] += 1  # h5py's business, not the tree's
            continue
        with f:
            try:
                read_value(node, allow_pickle=False, limits=LIMITS)
                outcomes["read"] += 1
            except CheckpointError as exc:
                outcomes[type(exc).__name__] += 1
    assert outcomes["CheckpointCorruptError"] > 50, outcomes


def test_corrupt_error_names_the_key_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        write_value(f, "v", {"layers": [{"w": 1}, {"w": 2}]}, allow_pickle=False)
        del f["v/layers/1/w"].attrs[TYPE_ATTR]
    with pytest.raises(CheckpointCorruptError) as info:
        read_file(path)
    assert info.value.error_context["path"] == "value['layers'][1]['w']"
    assert info.value.error_context["hdf5_path"] == "/v/layers/1/w"


def test_every_tag_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "format.md").read_text()
    section = doc.split("## Payload tree", 1)[1]
    for name in TAGS:
        assert f"`{name}`" in section, name


# ----------------------------------------------------------------------- pickles

MARKER_NAME = "h5ckpt-pickle-ran"


def _touch(path: str) -> None:
    Path(path).write_text("the pickle ran")


class Booby:
    """Unpickling this object creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


def test_pickled_node_needs_allow_pickle_and_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / MARKER_NAME
    path = tmp_path / "pickled.h5"
    check_value({"ok": 1, "trap": Booby(marker)}, allow_pickle=True)
    with h5py.File(path, "w") as f:
        write_value(f, "v", {"ok": 1, "trap": Booby(marker)}, allow_pickle=True)
    assert not marker.exists()
    with pytest.raises(CheckpointPickleError) as info:
        read_file(path, allow_pickle=False)
    message = str(info.value)
    assert "value['trap'] was saved with allow_pickle=True" in message
    assert "pass allow_pickle=True to load it" in message
    assert "only do it for files you trust" in message
    assert not marker.exists()
    # The payload is live: allowing pickles runs it.
    read_file(path, allow_pickle=True)
    assert marker.exists()


def test_read_value_path_prefix(tmp_path: Path) -> None:
    path = tmp_path / "pickled.h5"
    with h5py.File(path, "w") as f:
        write_value(f, "metadata", {"s": {1}}, allow_pickle=True)
    with h5py.File(path, "r") as f, pytest.raises(CheckpointPickleError, match=r"^metadata\['s'\]"):
        read_value(f["metadata"], allow_pickle=False, limits=LIMITS, path="metadata")


# ------------------------------------------------------------------- values_equal


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (0.0, -0.0),
        (1, True),
        (1, 1.0),
        ([1], (1,)),
        ({"a": 1, "b": 2}, {"b": 2, "a": 1}),
        (np.float32(1), 1.0),
        (np.float32(1), np.float64(1)),
        (np.zeros(2, "<f8"), np.zeros(2, ">f8")),
        (np.zeros(2), np.zeros((2, 1))),
        (np.array([0.0]), np.array([-0.0])),
        (np.array([1 + 0j]), np.array([complex(1, -0.0)])),
        (np.array([np.nan]), np.array([1.0])),
        (b"a", bytearray(b"a")),
        ("a", b"a"),
        ({"a": [1, {"b": 2}]}, {"a": [1, {"b": 3}]}),
        (None, 0),
    ],
)
def test_values_equal_distinguishes(a: Any, b: Any) -> None:
    assert not values_equal(a, b)
    assert not values_equal(b, a)


@pytest.mark.parametrize(
    "a",
    [
        float("nan"),
        np.float16("nan"),
        np.array([np.nan, -0.0, 1.0]),
        np.array([complex(np.nan, -0.0)]),
        {"x": [float("nan"), (np.nan,)]},
        np.array([{"a": float("nan")}], dtype=object),
    ],
)
def test_values_equal_treats_nan_as_equal(a: Any) -> None:
    assert values_equal(a, copy.deepcopy(a))

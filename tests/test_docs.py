"""The documentation runs: README examples, the format's reference reader, docstrings."""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import h5ckpt
from h5ckpt import CheckpointManager
from h5ckpt.tree import values_equal
from test_format import small_state

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
FORMAT = (ROOT / "docs" / "format.md").read_text(encoding="utf-8")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)


def blocks(text: str, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang == language]


def section(text: str, heading: str) -> str:
    start = text.index(heading + "\n")
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end != -1 else len(text)]


def run_python(code: str, cwd: Path) -> str:
    script = cwd / "example.py"
    script.write_text(code, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{code}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc.stdout


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def seed_files(directory: Path, seed_writer) -> None:
    directory.mkdir(exist_ok=True)
    for batch in (0, 10, 20):
        state = {"step": batch, "lr": 0.01, "moment": np.arange(3.0) * batch}
        seed_writer(directory, batch, np.full(3, batch / 10), state, 1.0 / (batch + 1))


# ------------------------------------------------------------------------ README


def test_ci_runs_the_readme_test_command_and_the_demo_command_is_the_cli():
    """CI runs exactly the README's test command, and its demo line runs the demo."""
    install, test = (b.strip() for b in blocks(section(README, "## Quickstart"), "bash")[:2])
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert test in (line.strip() for line in ci), ".ci/run does not run the README's test command"
    assert test.endswith("python -m pytest") and "cargo test" in test
    demo = install.split("&&")[-1].strip()
    proc = subprocess.run(
        [sys.executable, *shlex.split(demo)[1:], "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert demo == "python -m h5ckpt demo"


def test_readme_python_examples_run_and_the_loop_resumes(tmp_path: Path, seed_writer):
    seed_files(tmp_path / "checkpoints", seed_writer)  # for the migration example
    examples = blocks(README, "python")
    assert len(examples) >= 2
    loop = [code for code in examples if "starting at batch" in code]
    assert len(loop) == 1
    loop_code = loop[0]
    assert len(loop_code.strip().splitlines()) <= 20

    outputs = [run_python(code, tmp_path) for code in examples]
    first = outputs[examples.index(loop_code)]
    assert first.splitlines()[0] == "starting at batch 0"
    done = first.splitlines()[-1]
    assert done.startswith("done: step 100")

    # Run again: it resumes after the newest checkpoint and ends in the same state.
    again = run_python(loop_code, tmp_path).splitlines()
    assert again == ["starting at batch 91", done]

    # Lose the newest checkpoint and damage the one before: it resumes from batch 70,
    # still to exactly the same result.
    ckpt = tmp_path / "checkpoints"
    (ckpt / "checkpoint_batch_0090.h5").unlink()
    flip_byte(ckpt / "checkpoint_batch_0080.h5", 1000)
    again = run_python(loop_code, tmp_path).splitlines()
    assert again == ["starting at batch 71", done]

    # The JAX example resumes from its newest checkpoint to exactly the same parameters.
    [jax_index] = [i for i, code in enumerate(examples) if "jax_checkpoints" in code]
    first = outputs[jax_index].splitlines()
    assert first[0] == "resuming at step 0" and first[-1].startswith("w = [")
    again = run_python(examples[jax_index], tmp_path).splitlines()
    assert again == ["resuming at step 251", first[-1]]

    migration = outputs[next(i for i, code in enumerate(examples) if "homodyne_state" in code)]
    assert "(0, 'legacy'), (10, 'legacy'), (20, 'legacy')" in migration
    assert migration.splitlines()[-1] == "20 ['lr', 'moment', 'step']"


def test_readme_command_lines_run(tmp_path: Path, seed_writer):
    """Every ``h5ckpt`` line of the README's bash blocks, on the directories they name."""
    seed_files(tmp_path / "old_run", seed_writer)
    loop = next(code for code in blocks(README, "python") if "starting at batch" in code)
    run_python(loop, tmp_path)  # fills ./checkpoints
    commands = [
        line
        for code in blocks(README, "bash")
        for line in code.splitlines()
        if line.startswith("h5ckpt ") and not line.startswith("h5ckpt demo")
    ]
    assert any(c.startswith("h5ckpt migrate") for c in commands)
    assert {c.split()[1] for c in commands} >= {"ls", "verify", "show", "prune", "migrate"}
    for command in commands:
        argv = shlex.split(command, comments=True)
        proc = subprocess.run(
            [sys.executable, "-m", "h5ckpt", *argv[1:]],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"
        assert proc.stderr == "", command
    assert sorted(p.name for p in (tmp_path / "new_run").iterdir() if p.suffix == ".h5") == [
        "homodyne_state_batch_0000.h5",
        "homodyne_state_batch_0010.h5",
        "homodyne_state_batch_0020.h5",
    ]


def test_readme_ls_sample_is_what_ls_prints(tmp_path: Path):
    [sample] = [
        b for b in blocks(section(README, "## Command line"), "text") if b.startswith("$ h5ckpt ls")
    ]
    command, *expected = sample.rstrip("\n").splitlines()
    loop = next(code for code in blocks(README, "python") if "starting at batch" in code)
    run_python(loop, tmp_path)
    argv = shlex.split(command.removeprefix("$ "))
    proc = subprocess.run(
        [sys.executable, "-m", "h5ckpt", *argv[1:]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    # Only the save times differ from one run to the next.
    when = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
    assert [when.sub("<date>", line) for line in proc.stdout.splitlines()] == [
        when.sub("<date>", line) for line in expected
    ]


# -------------------------------------------------------------- the format's reader


@pytest.fixture(scope="module")
def read_checkpoint():
    [code] = blocks(section(FORMAT, "## A reader in 20 lines"), "python")
    assert len(code.rstrip("\n").splitlines()) <= 20
    namespace: dict = {}
    exec(compile(code, "docs/format.md", "exec"), namespace)
    return namespace["read_checkpoint"]


def saved(directory: Path, **kwargs) -> tuple[Path, CheckpointManager]:
    manager = CheckpointManager(directory, **kwargs)
    params = np.linspace(0.0, 1.0, 300_000).reshape(1000, 300)  # compresses: chunked, Blosc
    state = {"step": 3, "noise": np.random.default_rng(1).standard_normal(200_000)}
    return manager.save_checkpoint(12, params, state, 0.25, {"run": "a"}), manager


def test_reader_reads_what_h5ckpt_writes(tmp_path: Path, read_checkpoint):
    for name, kwargs in {
        "auto": {},
        "raw": {"compression": None},
        "gzip": {"compression": "gzip"},
        "keyed": {"hmac_key": b"key"},  # a reader without the key ignores the tag
    }.items():
        path, manager = saved(tmp_path / name, **kwargs)
        got = read_checkpoint(path)
        want = manager.load_checkpoint(path)
        assert got["batch_idx"] == 12 and got["loss"] == 0.25
        assert got["timestamp"] == want["timestamp"]
        assert values_equal(got["parameters"], want["parameters"])


READER_ALONE = """
import hashlib, json, sys
namespace = {}
exec(compile(open(sys.argv[1], encoding="utf-8").read(), "docs/format.md", "exec"), namespace)
out = {}
for path in sys.argv[2:]:
    got = namespace["read_checkpoint"](path)
    params = got["parameters"]
    out[path] = [got["batch_idx"], got["loss"], got["timestamp"], str(params.dtype),
                 list(params.shape), hashlib.sha256(params.tobytes()).hexdigest()]
assert not [m for m in sys.modules if m.startswith("h5ckpt")]  # nothing of h5ckpt's help
print(json.dumps(out))
"""


def test_reader_alone_reads_raw_and_compressed_files(tmp_path: Path):
    """The reader as a user runs it: in a fresh interpreter that never imported h5ckpt
    (which registers the Blosc filter as a side effect)."""
    [code] = blocks(section(FORMAT, "## A reader in 20 lines"), "python")
    reader = tmp_path / "reader.py"
    reader.write_text(code, encoding="utf-8")
    loaded = {}
    for name, kwargs in {
        "raw": {"compression": None},
        "default": {},
        "lz4": {"compression": "lz4"},
        "zstd": {"compression": "zstd"},
        "gzip": {"compression": "gzip"},
        "keyed": {"hmac_key": b"key"},
    }.items():
        path, manager = saved(tmp_path / name, **kwargs)
        with h5py.File(path, "r") as f:
            plist = f["parameters"].id.get_create_plist()
            filters = {plist.get_filter(i)[0] for i in range(plist.get_nfilters())}
        expected_filter = {"raw": None, "gzip": h5py.h5z.FILTER_DEFLATE}.get(name, 32001)
        assert (expected_filter in filters) if expected_filter else not filters, name
        loaded[str(path)] = manager.load_checkpoint(path)
    # A small checkpoint, built in memory and written whole.
    small = CheckpointManager(tmp_path / "small")
    path = small.save_checkpoint(4, *small_state(4))
    loaded[str(path)] = small.load_checkpoint(path)
    script = tmp_path / "read_alone.py"
    script.write_text(READER_ALONE, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(script), str(reader), *loaded],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    for path, want in loaded.items():
        params = want["parameters"]
        assert got[path] == [
            want["batch_idx"],
            want["loss"],
            want["timestamp"],
            str(params.dtype),
            list(params.shape),
            hashlib.sha256(params.tobytes()).hexdigest(),
        ], path


def test_format_doc_describes_the_root_attributes_as_written(tmp_path: Path):
    path, _ = saved(tmp_path / "d")
    table = section(FORMAT, "## Layout of the HDF5 payload")
    with h5py.File(path, "r") as f:
        for name in ("h5ckpt_format", "h5ckpt_version"):
            kind = f.attrs.get_id(name).get_type()
            assert isinstance(kind, h5py.h5t.TypeStringID) and not kind.is_variable_str()
            assert kind.get_strpad() == h5py.h5t.STR_NULLPAD
            assert kind.get_cset() == h5py.h5t.CSET_ASCII
            assert kind.get_size() == len(f.attrs[name])
            [row] = [line for line in table.splitlines() if line.startswith(f"| `{name}`")]
            assert "fixed-length" in row and "null-padded ASCII" in row
            assert "variable-length UTF-8" not in row


def test_reader_detects_what_h5ckpt_detects(tmp_path: Path, read_checkpoint):
    path, manager = saved(tmp_path / "ckpt")
    size = path.stat().st_size
    offsets = [0, 9, 20, 50, 60, 70, 100, 200, 479, 500, 511, 512, 600, size // 2, size - 1]
    offsets += list(np.random.default_rng(7).integers(0, size, 20))
    original = path.read_bytes()
    for offset in offsets:
        flip_byte(path, int(offset))
        assert not manager.validate_checkpoint(path)
        with pytest.raises(ValueError):
            read_checkpoint(path)
        path.write_bytes(original)
    read_checkpoint(path)
    path.write_bytes(original[:-1])  # truncated
    with pytest.raises(ValueError):
        read_checkpoint(path)
    path.write_bytes(original + b"\0")  # a byte too many
    with pytest.raises(ValueError):
        read_checkpoint(path)


def test_reader_reads_and_checks_small_files(tmp_path: Path, read_checkpoint):
    """A checkpoint of a few KB (built in memory and written in one piece) reads as
    any other, and the reader detects what h5ckpt detects in it."""
    for name, kwargs in {"plain": {}, "keyed": {"hmac_key": b"key"}}.items():
        manager = CheckpointManager(tmp_path / name, **kwargs)
        path = manager.save_checkpoint(9, *small_state(9))
        got, want = read_checkpoint(path), manager.load_checkpoint(path)
        assert got["batch_idx"] == 9 and got["loss"] == want["loss"]
        assert got["timestamp"] == want["timestamp"]
        assert values_equal(got["parameters"], want["parameters"])
        original = path.read_bytes()
        assert len(original) < 16384
        for offset in range(0, len(original), 97):
            flip_byte(path, offset)
            assert not manager.validate_checkpoint(path)
            with pytest.raises(ValueError):
                read_checkpoint(path)
            path.write_bytes(original)
        read_checkpoint(path)


def test_reader_refuses_a_seed_file(tmp_path: Path, read_checkpoint, seed_writer):
    path = seed_writer(tmp_path, 1, np.ones(2), {}, 1.0)
    with pytest.raises(ValueError, match="not an h5ckpt file"):
        read_checkpoint(path)


# ------------------------------------------------------------------- docstrings


def _public_callables():
    for name in h5ckpt.__all__:
        obj = getattr(h5ckpt, name)
        if name.startswith("__"):
            continue
        yield name, obj
        if inspect.isclass(obj) and not issubclass(obj, BaseException):
            for attr, member in vars(obj).items():
                if attr.startswith("_") or (
                    not callable(member) and not isinstance(member, property)
                ):
                    continue
                yield f"{name}.{attr}", member


def test_every_public_name_has_a_numpy_style_docstring():
    missing, sections = [], []
    for name, obj in _public_callables():
        doc = inspect.getdoc(obj.fget if isinstance(obj, property) else obj)
        if not doc:
            missing.append(name)
            continue
        if inspect.isfunction(obj):
            sig = inspect.signature(obj)
            takes = [p for p in sig.parameters if p != "self"]
            if takes and "Parameters\n----------" not in doc:
                sections.append(f"{name}: no Parameters section")
            returns = sig.return_annotation not in (None, "None", inspect.Signature.empty)
            if returns and "Returns\n-------" not in doc and "Yields\n------" not in doc:
                sections.append(f"{name}: no Returns section")
    assert not missing, f"no docstring: {missing}"
    assert not sections, sections


def test_command_line_modules_are_documented():
    from h5ckpt import cli, inspection, migrate

    for module in (cli, inspection, migrate):
        assert module.__doc__
        for name in module.__all__:
            obj = getattr(module, name)
            if callable(obj):
                assert inspect.getdoc(obj), f"{module.__name__}.{name}"


TREE_ALONE = """
import json, sys
namespace = {}
for path in sys.argv[1:3]:
    exec(compile(open(path, encoding="utf-8").read(), "docs/format.md", "exec"), namespace)
import h5py, numpy as np
out = {}
for path in sys.argv[3:]:
    namespace["read_checkpoint"](path)  # the checks first
    with h5py.File(path, "r") as f:
        state = namespace["read_tree"](f["optimizer_state"])
        meta = namespace["read_tree"](f["metadata"])
        params = namespace["read_tree"](f["parameters"])
    adam = state[1][0]
    out[path] = {
        "adam": [type(adam).__name__, list(adam._fields), int(adam.count)],
        "mu_w": [str(adam.mu["w"].dtype), adam.mu["w"].tobytes().hex()],
        "empty": [type(state[0]).__name__, list(state[0])],
        "params": [str(params.dtype), params.tobytes().hex()],
        "meta": repr(meta),
    }
assert not [m for m in sys.modules if m.startswith("h5ckpt")]
print(json.dumps(out))
"""


@pytest.mark.jax
def test_tree_reader_alone_reads_optax_states_with_bfloat16(tmp_path: Path):
    """The doc's tree reader, in an interpreter that never imported h5ckpt, on the
    nodes of format 1.1: NamedTuples, jax arrays, bfloat16 leaves."""
    jax = pytest.importorskip("jax", reason="jax is not installed (pip install 'h5ckpt[jax]')")
    optax = pytest.importorskip("optax", reason="optax is not installed")
    jnp = jax.numpy
    params = {"w": jnp.linspace(-1, 1, 6, dtype=jnp.bfloat16).reshape(3, 2), "b": jnp.ones(2)}
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))
    state = opt.init(params)
    grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.5), params)
    _, state = opt.update(grads, state, params)
    metadata = {
        "a/b": [None, True, 3, 2**70, 1.5, "é", b"\x00\x01", bytearray(b"x"), "\ud800"],
        "": (np.float32(2.5), np.arange(3, dtype=">i2"), np.array(1.0), ()),
    }
    loaded = {}
    for name, compression in (("raw", None), ("default", "auto")):
        manager = CheckpointManager(tmp_path / name, compression=compression)
        path = manager.save_checkpoint(1, params["w"], state, 0.5, metadata)
        loaded[str(path)] = manager.load_checkpoint(path)
    code = blocks(section(FORMAT, "## A reader in 20 lines"), "python")
    code += blocks(section(FORMAT, "## Reading a payload tree"), "python")
    assert len(code) == 2
    scripts = []
    for i, text in enumerate(code):
        scripts.append(tmp_path / f"doc{i}.py")
        scripts[-1].write_text(text, encoding="utf-8")
    runner = tmp_path / "tree_alone.py"
    runner.write_text(TREE_ALONE, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(runner), *map(str, scripts), *loaded],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    for path, want in loaded.items():
        adam = want["optimizer_state"][1][0]
        assert got[path] == {
            "adam": ["ScaleByAdamState", ["count", "mu", "nu"], 1],
            "mu_w": ["bfloat16", adam.mu["w"].tobytes().hex()],
            "empty": ["EmptyState", []],
            "params": ["bfloat16", want["parameters"].tobytes().hex()],
            "meta": repr(want["metadata"]),
        }, path

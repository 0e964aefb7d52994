"""The HDF5 payload of a checkpoint: what goes where inside the file.

Writing goes through h5py for everything except the bytes of large raw arrays: for
those HDF5 only reserves the space (early allocation, no fill), and the Rust core
writes the array bytes into it while hashing them, so they are neither written twice
nor read back. The arrays are the caller's own memory, which another thread may
change during the save: the core reads each piece of them once, into a private
buffer that it both writes and hashes, so the digest covers exactly what the file
holds. Every other byte (HDF5's, and the chunks compressed here, each built from one
copy of its input) is hashed as read back from the file. Reading parses bytes that
the Rust core has already verified.
"""

from __future__ import annotations

import errno
import io
import itertools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import h5py
import numpy as np
from h5py import h5a, h5d, h5f, h5g, h5o, h5p, h5s, h5t

from . import _native, codec, interop
from ._native import (
    HEADER_SIZE,
    Header,
    blosc_compress_chunks,
    blosc_max_frame_len,
    start_writeback,
)
from .errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointLimitError,
    CheckpointResourceError,
    CheckpointValueError,
)
from .limits import LoadLimits
from .staging import oserror_to_checkpoint, sigint_deferred
from .tree import ByteBudget, file_budget, read_value, write_array, write_value

__all__ = [
    "FORMAT_VERSION",
    "MAX_ATTRIBUTES_WRITTEN",
    "ArrayWriter",
    "Contents",
    "DescriptorFile",
    "WritebackFile",
    "check_payload",
    "read_payload",
    "write_payload",
    "write_sealed",
]

#: Payload layout version. 1.1 added the tags namedtuple, pytree, ml_ndarray and
#: ml_scalar; a 1.0 reader reads every 1.1 file that holds none of them.
FORMAT_VERSION = "1.1"
#: The most attributes the writer puts on one object: the root's five (format,
#: version, batch index, loss, timestamp); every other object carries its tag and at
#: most two more (a NamedTuple's class and fields, an array's ml_dtypes name and hint).
MAX_ATTRIBUTES_WRITTEN = 5
_TYPE_ATTR = "h5ckpt_type"
#: Chunks compressed per call into the Rust core: enough to keep every core busy,
#: few enough that their compressed copies stay small next to the array.
_CHUNKS_PER_BATCH = 8
#: A checkpoint whose arrays are each smaller than ``codec.SMALL_ARRAY_BYTES`` (so
#: stored raw, by HDF5) and that total at most this is built in memory.
SMALL_PAYLOAD_BYTES = 1 << 20


@dataclass
class ArrayWriter:
    """Creates every array dataset of one file and remembers which it must fill in.

    Called by the tree writer for each array (``put_array``).
    """

    compression: str | None
    pending: list[tuple[h5py.h5d.DatasetID, np.ndarray]] = field(default_factory=list)

    def __call__(self, group: h5py.Group, name: str, arr: np.ndarray) -> h5py.Dataset:
        if not arr.flags.c_contiguous:  # np.ascontiguousarray would turn 0-d into 1-d
            arr = arr.copy(order="C")
        chosen = codec.codec_for(arr, self.compression)
        if chosen is not None:
            chunks = codec.chunk_shape(arr.shape, arr.itemsize)
            if codec.native_lz4(arr, chosen, chunks):
                return self._compress_in_parallel(group, name, arr, chunks, chosen)
            return group.create_dataset(
                name, data=arr, chunks=chunks, **codec.filter_options(chosen)
            )
        if arr.nbytes < codec.SMALL_ARRAY_BYTES or arr.size == 0:
            return group.create_dataset(name, data=arr)
        return self._reserve(group, name, arr)

    def _compress_in_parallel(
        self, group: h5py.Group, name: str, arr: np.ndarray, chunks: tuple[int, ...], chosen: str
    ) -> h5py.Dataset:
        """The chunks compressed by the Rust core on all cores, then written as they are.

        A batch of chunks at a time, so the compressed copy held in memory stays small.
        """
        ds = group.create_dataset(
            name, shape=arr.shape, dtype=arr.dtype, chunks=chunks, **codec.filter_options(chosen)
        )
        rows = chunks[0]
        flat = arr.reshape(-1).view(np.uint8)
        chunk_bytes = rows * (arr.nbytes // arr.shape[0])
        batch_bytes = chunk_bytes * _CHUNKS_PER_BATCH
        slot = blosc_max_frame_len(chunk_bytes)
        starts = range(0, flat.size, batch_bytes)
        per_batch = min(_CHUNKS_PER_BATCH, -(-flat.size // chunk_bytes))
        # Two output buffers: the next batch is compressed (GIL released, all cores)
        # while HDF5 writes the frames of this one.
        outs = [np.empty(slot * per_batch, np.uint8) for _ in range(min(2, len(starts)))]
        tail = (0,) * (arr.ndim - 1)

        def compress(b: int) -> list[int]:
            data = flat[starts[b] : starts[b] + batch_bytes]
            return blosc_compress_chunks(data, chunk_bytes, arr.itemsize, outs[b % 2])

        index = 0
        with ThreadPoolExecutor(1, thread_name_prefix="h5ckpt-compress") as pool:
            pending = pool.submit(compress, 0)
            for b in range(len(starts)):
                lengths = pending.result()
                if b + 1 < len(starts):
                    pending = pool.submit(compress, b + 1)
                out = outs[b % 2]
                for k, n in enumerate(lengths):
                    ds.id.write_direct_chunk((index * rows, *tail), out[k * slot : k * slot + n])
                    index += 1
        return ds

    def _reserve(self, group: h5py.Group, name: str, arr: np.ndarray) -> h5py.Dataset:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_layout(h5py.h5d.CONTIGUOUS)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        dsid = h5py.h5d.create(
            group.id,
            name.encode(),
            h5py.h5t.py_create(arr.dtype, logical=True),
            h5py.h5s.create_simple(arr.shape),
            dcpl=dcpl,
        )
        self.pending.append((dsid, arr))
        return h5py.Dataset(dsid)

    def segments(self) -> list[tuple[int, np.ndarray]]:
        """``(file offset, bytes)`` of each reserved dataset; call before closing the file.

        The bytes are views of the caller's arrays, not copies: ``finalize`` copies
        them piece by piece as it writes and hashes them.
        """
        return [(dsid.get_offset(), arr.reshape(-1).view(np.uint8)) for dsid, arr in self.pending]


class WritebackFile(io.FileIO):
    """The temp file as HDF5 writes it, handing its pages to the disk every few MiB.

    HDF5 writes a compressed dataset chunk by chunk while it compresses the next
    ones; starting the writeback of what is written lets the disk work meanwhile, so
    the final fsync finds little left to do. Without ``writeback`` (saves that are
    not durable) it is a plain file. The descriptor stays open after ``close()``.
    """

    KICK_BYTES = 8 << 20

    def __init__(self, fd: int, *, writeback: bool = True) -> None:
        super().__init__(fd, "r+b", closefd=False)
        self._writeback = writeback
        self._unkicked = 0

    def write(self, b: Any) -> int:
        n = super().write(b)
        self._unkicked += n or 0
        if self._writeback and self._unkicked >= self.KICK_BYTES:
            self._unkicked = 0
            start_writeback(self.fileno())
        return n


def as_parameters(parameters: object) -> np.ndarray:
    """``parameters`` as a numeric numpy array (an ml_dtypes one too), or a
    ``CheckpointValueError``. An array-like (``jax.Array``, ``torch.Tensor``...) is
    copied to host memory at most once (a CPU ``jax.Array`` not at all)."""
    try:
        if type(parameters) is not np.ndarray and interop.array_spec(parameters) is not None:
            arr = interop.host_array(parameters)[0]
        else:
            arr = np.asarray(parameters)
    except Exception as exc:
        raise CheckpointValueError(
            f"parameters cannot be converted to a numpy array: {exc}",
            {"key": "parameters", "type": type(parameters).__name__},
        ) from exc
    if arr.dtype.kind not in "biufc" and interop.ml_name(arr.dtype) is None:
        raise CheckpointValueError(
            f"parameters must be a numeric or boolean array, got dtype {arr.dtype}",
            {"key": "parameters", "dtype": str(arr.dtype)},
        )
    return arr


@dataclass(frozen=True)
class Contents:
    """What one checkpoint file holds: the header's fields and the three values."""

    batch_idx: int
    loss: float
    timestamp: float
    parameters: np.ndarray
    optimizer_state: Any
    metadata: Any
    #: The h5ckpt version that writes the file.
    version: str = _native.__version__


def write_sealed(
    fd: int,
    contents: Contents,
    *,
    compression: str | None,
    allow_pickle: bool,
    hmac_key: bytes | None,
    durable: bool,
) -> Header:
    """Write one whole checkpoint into the empty file open at ``fd`` and seal it.

    h5py writes the HDF5 layout; the Rust core then writes the large raw arrays
    (through a private buffer it hashes, so the digest covers exactly what was
    written), the header with the digests and, when ``durable``, fsyncs.

    A small checkpoint (see :func:`build_image`) is built in memory instead and
    handed to the Rust core whole: it hashes it, writes header and payload in one
    write and fsyncs; HDF5 never touches the file.
    """
    seal = (contents.batch_idx, contents.loss, contents.timestamp, hmac_key, durable)
    if not allow_pickle:  # a pickle's size is known only once it is made
        image = build_image(contents)
        if image is not None:
            return _native.seal_image(fd, image, *seal)
    with WritebackFile(fd, writeback=durable) as raw:
        segments = write_payload(raw, contents, compression=compression, allow_pickle=allow_pickle)
    return _native.finalize(fd, segments, *seal)


def write_payload(
    fileobj: io.RawIOBase, contents: Contents, *, compression: str | None, allow_pickle: bool
) -> list[tuple[int, np.ndarray]]:
    """Write the HDF5 part of a checkpoint into ``fileobj`` (see
    :func:`_write_payload`); an interrupt that lands inside HDF5 is raised once HDF5
    has let go of the file."""
    with sigint_deferred(), _ErrorKeepingFile(fileobj) as sink:
        return _write_payload(sink, contents, compression, allow_pickle)


def _write_payload(
    sink: _ErrorKeepingFile, contents: Contents, compression: str | None, allow_pickle: bool
) -> list[tuple[int, np.ndarray]]:
    """Write the HDF5 part of a checkpoint into ``sink``.

    Returns the segments the caller still has to write (see :class:`ArrayWriter`).
    The first ``HEADER_SIZE`` bytes are left to the header.
    """
    writer = ArrayWriter(compression)
    with h5py.File(
        sink,
        "w",
        userblock_size=HEADER_SIZE,
        locking=False,
        track_order=True,
        libver=("v110", "latest"),
        # Large arrays start on 256-byte boundaries (HDF5 wants the alignment below
        # the user block size): loading hands them out as aligned views.
        alignment_threshold=ArrayViews.MIN_BYTES,
        alignment_interval=256,
    ) as f:
        # Fixed-length strings: variable-length ones live in HDF5's global heap, whose
        # parsing of damaged files can hang libhdf5.
        f.attrs["h5ckpt_format"] = np.bytes_(FORMAT_VERSION)
        f.attrs["h5ckpt_version"] = np.bytes_(contents.version)
        f.attrs["batch_idx"] = np.int64(contents.batch_idx)
        f.attrs["loss"] = np.float64(contents.loss)
        f.attrs["timestamp"] = np.float64(contents.timestamp)
        parameters = contents.parameters
        ml = interop.ml_name(parameters.dtype)
        if ml is None:
            ds = writer(f, "parameters", parameters)
            ds.attrs[_TYPE_ATTR] = np.bytes_("ndarray")
        else:  # bfloat16 and the like: their bits, as the tree stores them (ml_ndarray)
            ds = writer(f, "parameters", parameters.view(interop.bits_dtype(parameters.dtype)))
            ds.attrs[_TYPE_ATTR] = np.bytes_("ml_ndarray")
            ds.attrs[interop.DTYPE_ATTR] = np.bytes_(ml)
        for name in ("optimizer_state", "metadata"):
            value = getattr(contents, name)
            write_value(f, name, value, allow_pickle=allow_pickle, put_array=writer)
        segments = writer.segments()
    if sink.error is not None:
        raise sink.error
    return segments


class _NotSmall(Exception):
    """Internal: the checkpoint being built in memory holds an array too large for it."""


class _SmallArrays:
    """``put_array`` of a checkpoint built in memory: each array written by HDF5,
    as the file-backed writer writes small ones (no filters); refuses (``_NotSmall``)
    any array the file-backed writer would treat as large, and arrays past
    ``SMALL_PAYLOAD_BYTES`` in all."""

    def __init__(self) -> None:
        self.left = SMALL_PAYLOAD_BYTES

    def take(self, arr: np.ndarray) -> None:
        self.left -= arr.nbytes
        if arr.nbytes >= codec.SMALL_ARRAY_BYTES or self.left < 0:
            raise _NotSmall

    def __call__(self, group: h5py.Group, name: str, arr: np.ndarray) -> h5py.Dataset:
        return h5py.Dataset(self.put_id(group.id, name, arr))

    def put_id(self, gid: h5g.GroupID, name: str, arr: np.ndarray) -> h5d.DatasetID:
        """What the tree writer calls: the new dataset's low-level id."""
        self.take(arr)
        return write_array(gid, name, arr)


class _ImageLists:
    """The property lists and types of files in memory, made once per process.

    For building one: those ``h5py.File(..., track_order=True, libver=("v110",
    "latest"))`` makes, with a 512-byte user block, on HDF5's in-memory driver
    without a backing file. For reading an image: the file access list, copied for
    each file, which gets its image in its copy.
    """

    _made: ClassVar[_ImageLists | None] = None

    @classmethod
    def get(cls) -> _ImageLists:
        lists = cls._made
        if lists is None:
            lists = cls._made = cls()
        return lists

    def __init__(self) -> None:
        order = h5p.CRT_ORDER_TRACKED | h5p.CRT_ORDER_INDEXED
        self.fcpl = h5p.create(h5p.FILE_CREATE)
        self.fcpl.set_userblock(HEADER_SIZE)
        self.fcpl.set_link_creation_order(order)
        self.fcpl.set_attr_creation_order(order)
        self.fcpl.set_obj_track_times(False)
        self.fapl = h5p.create(h5p.FILE_ACCESS)
        self.fapl.set_libver_bounds(h5f.LIBVER_V110, h5f.LIBVER_LATEST)
        self.fapl.set_file_locking(False, True)
        # Closing the file closes whatever is still open in it: an error half way
        # leaves no open object that would keep its memory.
        self.fapl.set_fclose_degree(h5f.CLOSE_STRONG)
        self.fapl.set_fapl_core(8192, False)  # grows 8 KiB at a time, no file
        self.read_fapl = h5p.create(h5p.FILE_ACCESS)
        self.read_fapl.set_file_locking(False, True)
        self.read_fapl.set_fclose_degree(h5f.CLOSE_STRONG)
        self.read_fapl.set_fapl_core(8192, False)
        self.scalar = h5s.create(h5s.SCALAR)
        self.i64 = h5t.py_create(np.dtype("<i8"))
        self.f64 = h5t.py_create(np.dtype("<f8"))
        self.native_i64 = h5t.py_create(np.dtype(np.int64))
        self.native_f64 = h5t.py_create(np.dtype(np.float64))
        self.tag_type, self.tag_data = _fixed_text("ndarray")


#: The in-memory driver tells files apart by name: each one gets its own.
_IMAGE_NAMES = itertools.count()


def _fixed_text(text: str) -> tuple[h5t.TypeID, np.ndarray]:
    """A fixed-length, null-padded ASCII string type exactly as long as ``text``,
    and ``text`` in it (what ``attrs[...] = np.bytes_(text)`` writes); remembered
    (the format and the version are the same in every file)."""
    made = _FIXED_TEXTS.get(text)
    if made is None:
        data = np.array(text.encode("ascii"), dtype=f"S{max(1, len(text))}")
        data.flags.writeable = False
        made = (h5t.py_create(data.dtype), data)
        if len(_FIXED_TEXTS) < 16:
            _FIXED_TEXTS[text] = made
    return made


_FIXED_TEXTS: dict[str, tuple[h5t.TypeID, np.ndarray]] = {}


def build_image(contents: Contents) -> bytes | None:
    """The HDF5 part of a small checkpoint without pickles, built in memory (the
    file from ``HEADER_SIZE`` on), or ``None`` when it holds an array too large for
    that (see :class:`_SmallArrays`): then nothing is left of the attempt.

    The same objects as :func:`write_payload` writes, written through h5py's
    low-level API; the image is what HDF5 would have written to a file. An
    interrupt (``KeyboardInterrupt``) is raised once HDF5 is done.
    """
    parameters = contents.parameters
    arrays = _SmallArrays()
    try:
        arrays.take(parameters)
    except _NotSmall:
        return None
    lists = _ImageLists.get()
    name = f"h5ckpt-image-{os.getpid()}-{next(_IMAGE_NAMES)}".encode()
    with sigint_deferred():
        fid = h5f.create(name, h5f.ACC_TRUNC, fcpl=lists.fcpl, fapl=lists.fapl)
        try:
            root = h5g.open(fid, b"/")
            texts = ((b"h5ckpt_format", FORMAT_VERSION), (b"h5ckpt_version", contents.version))
            for key, text in texts:
                tid, data = _fixed_text(text)
                h5a.create(root, key, tid, lists.scalar).write(data, mtype=tid)
            for key, tid, value in (
                (b"batch_idx", lists.i64, np.array(contents.batch_idx, dtype="<i8")),
                (b"loss", lists.f64, np.array(contents.loss, dtype="<f8")),
                (b"timestamp", lists.f64, np.array(contents.timestamp, dtype="<f8")),
            ):
                h5a.create(root, key, tid, lists.scalar).write(value, mtype=tid)
            if not parameters.flags.c_contiguous:
                parameters = parameters.copy(order="C")
            ml = interop.ml_name(parameters.dtype)
            if ml is None:
                dset = write_array(root, "parameters", parameters)
                tag_type, tag_data = lists.tag_type, lists.tag_data
            else:  # bfloat16 and the like: their bits, as write_payload stores them
                bits = parameters.view(interop.bits_dtype(parameters.dtype))
                dset = write_array(root, "parameters", bits)
                tag_type, tag_data = _fixed_text("ml_ndarray")
            h5a.create(dset, _TYPE_ATTR.encode(), tag_type, lists.scalar).write(
                tag_data, mtype=tag_type
            )
            if ml is not None:
                dtype_type, dtype_data = _fixed_text(ml)
                h5a.create(dset, interop.DTYPE_ATTR.encode(), dtype_type, lists.scalar).write(
                    dtype_data, mtype=dtype_type
                )
            parent = h5py.Group(root)
            for root_name in ("optimizer_state", "metadata"):
                value = getattr(contents, root_name)
                write_value(parent, root_name, value, allow_pickle=False, put_array=arrays)
            # The image is what the driver holds: HDF5's caches are written to it first.
            h5f.flush(fid)
            return fid.get_file_image()
        except _NotSmall:
            return None
        finally:
            fid.close()


class _ErrorKeepingFile:
    """The file object HDF5 writes through: keeps the first ``OSError`` of a write,
    truncate or flush (a full disk, a file size limit) and makes every later one a
    no-op, so that HDF5 never sees a driver error.

    An exception raised inside h5py's file-object driver callbacks can leave libhdf5
    with a half-closed file that crashes the process later (seen on a full disk), and
    h5py calls the next callback with the exception still pending, where any Python
    call may fail (a Ctrl-C in a write became an ``AttributeError`` in the truncate
    that followed). So an interrupt (``KeyboardInterrupt``, any ``BaseException``
    that is not an ``Exception``) landing in a callback is kept too: writes become
    no-ops, positioning and reads are redone. The file is discarded anyway;
    :func:`write_payload` raises the kept interrupt (whatever else HDF5 then
    raised), else the kept error, once HDF5 has closed it.
    """

    def __init__(self, raw: io.RawIOBase) -> None:
        self.raw = raw
        self.error: OSError | None = None
        self.interrupt: BaseException | None = None

    def __enter__(self) -> _ErrorKeepingFile:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            try:
                self._close_left_open()
            except BaseException:  # an interrupt landed in this close: finish it
                self._close_left_open()
                raise
        if self.interrupt is not None and exc is not self.interrupt:
            raise self.interrupt

    def _close_left_open(self) -> None:
        """Close the HDF5 file on this object if it is still open: an interrupt that
        lands in ``h5py.File()`` or its ``__exit__`` leaves it open, and libhdf5
        closing it later, after the descriptor is gone, crashes the process."""
        name = repr(self).encode("ascii", "replace")  # the name h5py gives HDF5
        for fid in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE):
            if h5py.h5f.get_name(fid) == name:
                h5py.File(fid).close()

    def _failed(self) -> bool:
        return self.error is not None or self.interrupt is not None

    def _keep(self, exc: BaseException) -> None:
        if isinstance(exc, OSError):
            self.error = self.error or exc
        elif isinstance(exc, Exception):
            raise exc
        else:
            self.interrupt = self.interrupt or exc

    def _redone(self, call: Any) -> Any:
        """``call()``, redone until no interrupt lands in it (each one is kept)."""
        while True:
            try:
                return call()
            except Exception:
                raise
            except BaseException as exc:
                self._keep(exc)

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._redone(lambda: self.raw.seek(pos, whence))

    def tell(self) -> int:
        return self._redone(self.raw.tell)

    def read(self, size: int = -1) -> bytes | None:
        start = self.tell()
        return self._redone(lambda: (self.raw.seek(start), self.raw.read(size))[1])

    def readinto(self, buffer: Any) -> int | None:
        start = self.tell()
        return self._redone(lambda: (self.raw.seek(start), self.raw.readinto(buffer))[1])

    def write(self, data: Any) -> int:
        if not self._failed():
            try:
                return self._write_all(data)
            except BaseException as exc:
                self._keep(exc)
        return len(memoryview(data))

    def _write_all(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            n = self.raw.write(view[done:])
            if not n:
                raise OSError(f"short write at offset {self.raw.tell()}")
            done += n
        return done

    def truncate(self, size: int | None = None) -> int:
        if not self._failed():
            try:
                return self.raw.truncate(size)
            except BaseException as exc:
                self._keep(exc)
        return 0 if size is None else size

    def flush(self) -> None:
        if not self._failed():
            try:
                self.raw.flush()
            except BaseException as exc:
                self._keep(exc)


class _ReadOnlyFile(io.RawIOBase):
    """A seekable, read-only raw file of ``_size`` bytes; subclasses read."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self._pos = 0
        self._size = size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + pos < 0:
            raise OSError(errno.EINVAL, f"negative seek position {base + pos}")
        self._pos = base + pos
        return self._pos


class BufferFile(_ReadOnlyFile):
    """A read-only file over bytes in memory, for h5py, that never copies them whole."""

    def __init__(self, buf: Any) -> None:
        view = memoryview(buf).cast("B")
        super().__init__(len(view))
        self._view = view

    def readinto(self, b: Any) -> int:
        dst = memoryview(b).cast("B")
        n = max(0, min(len(dst), len(self._view) - self._pos))
        dst[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n


class ArrayViews:
    """``get_array`` for :func:`read_value`: large raw arrays as views of the buffer.

    A contiguous, unfiltered array of at least ``MIN_BYTES`` is handed out as a
    (writable) view of the verified bytes instead of a copy: loading then touches
    its memory once. Views keep the whole buffer alive. Arrays that overlap, are
    misaligned for their dtype or lie outside the buffer are read as copies.
    """

    MIN_BYTES = 1 << 20

    def __init__(self, buf: np.ndarray) -> None:
        self.buf = buf
        self.claimed: list[tuple[int, int]] = []

    def __call__(
        self, dset: h5py.h5d.DatasetID, shape: tuple[int, ...], dtype: np.dtype
    ) -> np.ndarray | None:
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < self.MIN_BYTES:
            return None
        dcpl = dset.get_create_plist()
        if (
            dcpl.get_layout() != h5py.h5d.CONTIGUOUS
            or dcpl.get_nfilters() != 0
            or dcpl.get_external_count() != 0
        ):
            return None
        offset = dset.get_offset()
        if offset is None or offset < HEADER_SIZE or offset + nbytes > self.buf.size:
            return None
        if (self.buf.ctypes.data + offset) % dtype.alignment:
            return None
        if any(offset < end and start < offset + nbytes for start, end in self.claimed):
            return None
        self.claimed.append((offset, offset + nbytes))
        return self.buf[offset : offset + nbytes].view(dtype).reshape(shape)


class DescriptorFile(_ReadOnlyFile):
    """A read-only file over a descriptor the caller owns, for h5py (positional
    reads: the descriptor's offset is not used). Keeps the first ``OSError`` of a
    read, so that a failing disk or an exhausted resource is not taken for a
    malformed file once HDF5 has turned it into an HDF5 error."""

    def __init__(self, fd: int) -> None:
        super().__init__(os.fstat(fd).st_size)
        self._fd = fd
        self.error: OSError | None = None

    def readinto(self, b: Any) -> int:
        dst = memoryview(b).cast("B")
        try:
            n = os.preadv(self._fd, [dst], self._pos)
        except OSError as exc:
            if self.error is None:
                self.error = exc
            raise
        self._pos += n
        return n


def read_payload(
    data: bytes | np.ndarray, header: Header, *, allow_pickle: bool, limits: LoadLimits
) -> dict[str, Any]:
    """Parse the verified bytes of a whole checkpoint file.

    ``data`` is ``bytes``, or a writable ``uint8`` array whose large raw arrays are
    returned as views of it (see :class:`ArrayViews`). A file too small to hold such
    an array is opened by HDF5 as an image in memory.
    """
    views: ArrayViews | None = None
    source: BufferFile | io.BytesIO | _Image
    if len(data) < ArrayViews.MIN_BYTES:
        source = _Image(data)
    elif isinstance(data, np.ndarray):
        views = ArrayViews(data)
        source = BufferFile(data)
    else:
        source = io.BytesIO(data)
    params, optimizer_state, metadata, version = _parse(
        source, header, allow_pickle=allow_pickle, limits=limits, views=views
    )
    return {
        "batch_idx": int(header.batch_idx),
        "parameters": params,
        "optimizer_state": optimizer_state,
        "loss": float(header.loss),
        "metadata": metadata,
        "version": version,
        "timestamp": float(header.timestamp),
    }


def check_payload(
    fd: int, header: Header, *, limits: LoadLimits, path: str | os.PathLike[str]
) -> None:
    """Make every check :func:`read_payload` makes on the payload of the file open at
    ``fd`` (whose digests were verified), reading no array data: what makes a
    verified file that would not load invalid. Large arrays and blobs are not read
    and pickles not unpickled (their presence is for the loader to refuse). A small
    file is read whole and parsed in memory, as loading does."""
    source: DescriptorFile | _Image
    size = os.fstat(fd).st_size
    if size < ArrayViews.MIN_BYTES:
        try:
            data = os.pread(fd, size, 0)
        except OSError as exc:
            raise oserror_to_checkpoint(exc, "read", path) from exc
        if len(data) != size:
            raise CheckpointCorruptError(
                f"the file is {len(data)} bytes long, {size} a moment ago (it changed)",
                {"size_bytes": size},
            )
        source = _Image(data)
    else:
        source = DescriptorFile(fd)
    try:
        _parse(source, header, allow_pickle=False, limits=limits, structure_only=True)
    except CheckpointCorruptError:
        # HDF5 reports a failed read of its file as a malformed file.
        if isinstance(source, DescriptorFile) and source.error is not None:
            raise oserror_to_checkpoint(source.error, "read", path) from source.error
        raise


class _Image:
    """The bytes of a whole (small) file, which HDF5 opens in memory."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | np.ndarray) -> None:
        self.data = data


def _open(source: Any) -> h5py.File:
    """The HDF5 file of ``source``, read-only: an :class:`_Image` through HDF5's
    in-memory driver, a file object through h5py's."""
    if not isinstance(source, _Image):
        return h5py.File(source, "r", locking=False)
    fapl = _ImageLists.get().read_fapl.copy()
    fapl.set_file_image(source.data)
    name = f"h5ckpt-read-{os.getpid()}-{next(_IMAGE_NAMES)}".encode()
    return h5py.File(h5f.open(name, h5f.ACC_RDONLY, fapl=fapl))


def _parse(
    source: Any,
    header: Header,
    *,
    allow_pickle: bool,
    limits: LoadLimits,
    views: ArrayViews | None = None,
    structure_only: bool = False,
) -> tuple[np.ndarray, Any, Any, str]:
    """The checks and reads of one payload (the one definition of a loadable one)."""
    try:
        f = _open(source)
        try:
            # h5py's low-level API: its File, Group and AttributeManager objects
            # cost more than the HDF5 calls they make.
            fid = f.id
            root = h5g.open(fid, b"/")
            version = _check_root(f, root, header, limits)
            budget = ByteBudget(file_budget(limits, f))
            options: dict[str, Any] = {
                "limits": limits,
                "get_array": views,
                "budget": budget,
                "structure_only": structure_only,
            }
            params = read_value(h5o.open(root, b"parameters"), allow_pickle=False, **options)
            if not isinstance(params, np.ndarray):
                raise CheckpointCorruptError("'parameters' is not an array", {})
            optimizer_state = read_value(
                h5o.open(root, b"optimizer_state"), allow_pickle=allow_pickle, **options
            )
            metadata = read_value(h5o.open(root, b"metadata"), allow_pickle=allow_pickle, **options)
        finally:
            f.close()
    except CheckpointError:
        raise
    except MemoryError as exc:
        raise CheckpointResourceError(
            "out of memory while parsing the payload (the file is not at fault; free "
            "memory or raise the process's memory limit)",
            {"resource": "memory"},
        ) from exc
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointCorruptError(f"the HDF5 payload is malformed: {exc}", {}) from exc
    return params, optimizer_state, metadata, version


class _Unusual(Exception):
    """Internal: a root attribute not as h5ckpt writes it; the general check decides."""


def _check_root(f: h5py.File, root: h5g.GroupID, header: Header, limits: LoadLimits) -> str:
    """The header and the HDF5 attributes must tell the same story; returns the
    version of h5ckpt that wrote the file."""
    num_attrs = h5a.get_num_attrs(root)
    if num_attrs > limits.max_attributes:
        raise CheckpointLimitError(
            f"the root group has {num_attrs} attributes, more than "
            f"max_attributes={limits.max_attributes}",
            {"max_attributes": limits.max_attributes, "attributes": num_attrs},
        )
    if f.id.get_create_plist().get_userblock() != HEADER_SIZE:
        raise CheckpointCorruptError("the HDF5 user block does not match the header", {})
    try:
        attrs = _root_attributes(root)
    except _Unusual:
        # Read as h5py reads any attribute (variable-length strings, other types).
        found = f.attrs
        attrs = {
            "h5ckpt_format": _as_str(found.get("h5ckpt_format", "")),
            "h5ckpt_version": _as_str(found.get("h5ckpt_version", "unknown")),
            "batch_idx": int(found.get("batch_idx", -1)),
            "loss": float(found.get("loss", np.nan)),
            "timestamp": float(found.get("timestamp", np.nan)),
        }
    fmt = attrs["h5ckpt_format"]
    if fmt.split(".")[0] != FORMAT_VERSION.split(".")[0]:
        raise CheckpointCorruptError(f"unexpected payload format {fmt!r}", {"format": fmt})
    same = (
        attrs["batch_idx"] == header.batch_idx
        and _same_float(attrs["loss"], header.loss)
        and _same_float(attrs["timestamp"], header.timestamp)
    )
    if not same:
        raise CheckpointCorruptError(
            "the header and the HDF5 attributes disagree on batch index, loss or timestamp",
            {"header_batch_idx": header.batch_idx},
        )
    return attrs["h5ckpt_version"]


def _root_attributes(root: h5g.GroupID) -> dict[str, Any]:
    """The five root attributes, read as h5ckpt writes them (scalar fixed-length
    strings and numbers) through h5py's low-level API; ``_Unusual`` for anything
    else (a missing one too)."""
    lists = _ImageLists.get()
    out: dict[str, Any] = {}
    for key in ("h5ckpt_format", "h5ckpt_version"):
        attr = _scalar_attribute(root, key)
        tid = attr.get_type()
        if not isinstance(tid, h5t.TypeStringID) or tid.is_variable_str():
            raise _Unusual
        buf = np.empty((), dtype=f"S{tid.get_size()}")
        attr.read(buf, mtype=tid)
        out[key] = _as_str(buf[()])
    for key, convert in (("batch_idx", int), ("loss", float), ("timestamp", float)):
        attr = _scalar_attribute(root, key)
        # Exactly the type h5ckpt writes: HDF5's conversions from others (a NaN to
        # an integer, say) are not Python's, which the general check applies.
        if attr.get_type() != (lists.i64 if convert is int else lists.f64):
            raise _Unusual
        number = np.empty((), dtype=np.int64 if convert is int else np.float64)
        attr.read(number, mtype=lists.native_i64 if convert is int else lists.native_f64)
        out[key] = convert(number[()])
    return out


def _scalar_attribute(root: h5g.GroupID, key: str) -> h5a.AttrID:
    try:
        attr = h5a.open(root, key.encode())
    except KeyError:
        raise _Unusual from None
    # Also what makes reading it into a 0-d buffer safe: h5py does not check sizes.
    if attr.get_space().get_simple_extent_type() != h5s.SCALAR:
        raise _Unusual
    return attr


def _same_float(a: float, b: float) -> bool:
    return (a == b) or (np.isnan(a) and np.isnan(b))


def _as_str(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

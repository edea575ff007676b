"""Paged optimizer state: CUDA unified memory and CPU memory-mapped spill files, per rank.

A :class:`Pager` belongs to one paged optimizer (``PagedAdamW*``, ``is_paged=True``) and
makes every state-slot tensor it keeps (8-bit ``codes`` and ``<slot>_absmax``, 32-bit
state): small per-parameter scalars (``step``, counts, the clipping history) stay in
ordinary memory.

- **CPU**: each tensor is a file of the spill directory (``spill_dir=``, else
  ``$DISTOPT_SPILL_DIR``, else :func:`tempfile.gettempdir`), created exclusively as
  ``distopt-<pid>-rank<r>-*``, its full size reserved with ``posix_fallocate``, mapped
  shared by :func:`torch.from_file` and unlinked at once. The mapping belongs to the
  tensor's storage: torch unmaps it when the last tensor using it is freed, and an
  unlinked file leaves nothing behind, even after ``kill -9``. Before a parameter is
  updated its state and the next parameter's are advised ``MADV_WILLNEED`` (read
  ahead); after the update its pages are dropped from the process (``MADV_DONTNEED``:
  the data stays in the file and the page cache, which the kernel writes back and
  reclaims under pressure), so resident memory holds about one parameter's state.
- **CUDA**: each tensor is unified memory (``distopt._ops.managed_empty``, freed with
  its storage), prefetched to the parameter's device on the current stream before the
  update (``distopt._ops.managed_prefetch``); the driver pages it to host under pressure.

Invariants: paging moves pages, never bits (a paged run equals the unpaged one bitwise);
a full disk or an unusable spill directory is an error at allocation naming the
parameter and the directory (never a SIGBUS at the first write), raised before any
update; each rank's files and mappings are its own.
"""

from __future__ import annotations

import ctypes
import errno
import math
import os
import tempfile
import warnings
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

ENV_VAR = "DISTOPT_SPILL_DIR"
"""Environment variable naming the spill directory when ``spill_dir`` is not given."""

FILE_PREFIX = "distopt-"
MADV_WILLNEED = 3
MADV_DONTNEED = 4
MADV_POPULATE_WRITE = 23  # Linux >= 5.14: map every page now, one call instead of a fault per page
_SPACE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_RAM_FILESYSTEMS = ("tmpfs", "ramfs")
_warned_dirs: set[str] = set()
_libc = None
_can_populate = True


class PagingError(RuntimeError):
    """Paged state could not be allocated (the optimizer and its parameters are unchanged)."""


def resolve_spill_dir(spill_dir: str | os.PathLike | None) -> str:
    """The absolute spill directory: ``spill_dir``, else ``$DISTOPT_SPILL_DIR``, else the
    system temp dir; ValueError naming the argument unless it is a writable directory."""
    where = "spill_dir"
    if spill_dir is None and os.environ.get(ENV_VAR):
        spill_dir, where = os.environ[ENV_VAR], f"${ENV_VAR}"
    if spill_dir is None:
        spill_dir, where = tempfile.gettempdir(), "the system temp dir (tempfile.gettempdir())"
    if not isinstance(spill_dir, (str, os.PathLike)):
        raise TypeError(f"Invalid spill_dir: {spill_dir!r} (expected a path or None)")
    path = os.path.realpath(os.fspath(spill_dir))
    if not os.path.exists(path):
        raise ValueError(f"Invalid {where}: {path!r} does not exist")
    if not os.path.isdir(path):
        raise ValueError(f"Invalid {where}: {path!r} is not a directory")
    try:  # os.access says yes to root on a read-only filesystem: create a file to know
        fd, probe = tempfile.mkstemp(prefix=FILE_PREFIX + "probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"Invalid {where}: cannot create files in {path!r} ({err.strerror})") from None
    _warn_if_in_ram(path)
    return path


def filesystem_type(path: str) -> str:
    """The type of the filesystem holding ``path`` (longest mount point of /proc/mounts)."""
    best, kind = "", ""
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].replace("\\040", " ")
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, fields[2]
    except OSError:
        return ""
    return kind


def _warn_if_in_ram(path: str) -> None:
    kind = filesystem_type(path)
    if kind in _RAM_FILESYSTEMS and path not in _warned_dirs:
        _warned_dirs.add(path)
        warnings.warn(
            f"distopt: the spill directory {path!r} is on {kind}, which keeps files in RAM: paged "
            f"optimizer state saves no memory there. Set spill_dir= or ${ENV_VAR} to a disk directory.",
            UserWarning,
            stacklevel=4,
        )


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _madvise(t: torch.Tensor, advice: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    storage = t.untyped_storage()
    if _libc.madvise(storage.data_ptr(), storage.nbytes(), advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise({advice}) of a spill mapping failed: {os.strerror(err)}")


class Pager:
    """Allocates, reads ahead, and releases one optimizer's paged state (see the module)."""

    def __init__(self, spill_dir: str | os.PathLike | None = None) -> None:
        self.spill_dir = resolve_spill_dir(spill_dir)

    # --- allocation -----------------------------------------------------------------------

    def new(self, shape, dtype: torch.dtype, fill: float, device: torch.device, name: str) -> torch.Tensor:
        """A paged tensor of ``shape`` filled with ``fill``, for ``name``'s state."""
        device = torch.device(device)
        if math.prod(shape) == 0:
            return torch.full(shape, fill, dtype=dtype, device=device)
        if device.type == "cuda":
            t = _managed_op("managed_empty", name)(tuple(shape), dtype, device)
            t.fill_(fill)
            return t
        if device.type != "cpu":
            raise PagingError(f"distopt: paged state for {name} on {device}: only CPU and CUDA are supported")
        t = self._spill_tensor(tuple(shape), dtype, name)
        if fill != 0:  # a reserved file reads as zeros
            t.fill_(fill)
            _madvise(t, MADV_DONTNEED)
        return t

    def _spill_tensor(self, shape: tuple, dtype: torch.dtype, name: str) -> torch.Tensor:
        numel = math.prod(shape)
        nbytes = numel * dtype.itemsize
        where = f"spill_dir {self.spill_dir!r}"
        try:
            fd, path = tempfile.mkstemp(prefix=f"{FILE_PREFIX}{os.getpid()}-rank{_rank()}-", dir=self.spill_dir)
        except OSError as err:
            raise PagingError(f"distopt: cannot create a spill file for {name} in {where}: {err.strerror}") from None
        try:
            try:
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as err:
                if err.errno in _SPACE_ERRORS:
                    free = _free_bytes(self.spill_dir)
                    raise PagingError(
                        f"distopt: not enough disk space for the paged state of {name}: it needs {nbytes} bytes "
                        f"in {where}, which has {free} bytes free; free space or choose another spill_dir"
                    ) from None
                raise PagingError(f"distopt: cannot reserve {nbytes} bytes for {name} in {where}: {err}") from None
            try:
                flat = torch.from_file(path, shared=True, size=numel, dtype=dtype)
            except RuntimeError as err:
                raise PagingError(f"distopt: cannot map the spill file of {name} in {where}: {err}") from None
        finally:
            os.close(fd)
            os.unlink(path)
        return flat.view(shape)

    def copy(self, t: torch.Tensor, name: str) -> torch.Tensor:
        """A paged copy of ``t`` (a DTensor keeps its mesh, placements and global shape)."""
        if isinstance(t, DTensor):
            mine = self.copy(t.to_local(), name)
            return DTensor.from_local(mine, t.device_mesh, t.placements, shape=t.shape, stride=t.stride())
        out = self.new(t.shape, t.dtype, 0, t.device, name)
        out.copy_(t)
        self.release([out])
        return out

    def is_spilled(self, t: torch.Tensor) -> bool:
        """Whether ``t`` (a plain tensor) lives in one of this pager's spill files."""
        if t.device.type != "cpu" or t.numel() == 0:
            return False
        filename = t.untyped_storage().filename
        return (
            bool(filename)
            and os.path.dirname(filename) == self.spill_dir
            and (os.path.basename(filename).startswith(FILE_PREFIX))
        )

    # --- around each update -----------------------------------------------------------------

    def prefetch(self, now: Iterable[torch.Tensor], ahead: Iterable[torch.Tensor], device: torch.device) -> None:
        """Bring the state about to be updated (``now``) and the next one (``ahead``) towards
        ``device``. CPU spill files: ``now`` is mapped in one call (``MADV_POPULATE_WRITE``,
        where the kernel has it), ``ahead`` is read ahead (``MADV_WILLNEED``). CUDA managed
        memory: both are prefetched to the GPU on the current stream.

        Best effort, called mid-step: a failed hint (an ``madvise`` error, a GPU that cannot
        prefetch managed memory) warns once and the data is paged in on demand instead, so
        a step never stops half-applied here."""
        for t, advice in [(t, MADV_POPULATE_WRITE) for t in now] + [(t, MADV_WILLNEED) for t in ahead]:
            if t.numel() == 0:
                continue
            try:
                self._prefetch_one(t, advice, device)
            except PagingError:
                raise  # the ops are missing: allocation has already refused this, never reached
            except (OSError, RuntimeError) as err:
                _warn_hint_failed("prefetch", err)

    def _prefetch_one(self, t: torch.Tensor, advice: int, device: torch.device) -> None:
        global _can_populate
        if t.device.type == "cuda":
            _managed_op("managed_prefetch", "state")(t, torch.device(device))
            return
        if not self.is_spilled(t):
            return
        if advice == MADV_POPULATE_WRITE and _can_populate:
            try:
                _madvise(t, advice)
                return
            except OSError as err:  # EINVAL before Linux 5.14: read ahead instead
                if err.errno != errno.EINVAL:
                    raise
                _can_populate = False
        _madvise(t, MADV_WILLNEED)

    def release(self, tensors: Iterable[torch.Tensor]) -> None:
        """Drop spill-file pages of ``tensors`` from this process (the data stays in the
        file); CUDA managed memory is left to the driver. Best effort, like :meth:`prefetch`."""
        for t in tensors:
            if self.is_spilled(t):
                try:
                    _madvise(t, MADV_DONTNEED)
                except OSError as err:
                    _warn_hint_failed("release", err)


_warned_hints: set[str] = set()


def _warn_hint_failed(what: str, err: Exception) -> None:
    if what not in _warned_hints:
        _warned_hints.add(what)
        warnings.warn(
            f"distopt: paged state {what} failed ({type(err).__name__}: {err}); continuing, the "
            "state is paged on demand (results are unchanged)",
            RuntimeWarning,
            stacklevel=3,
        )


def _free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _managed_op(op: str, name: str):
    from . import _ops

    fn = getattr(_ops, op, None)
    if fn is None:
        raise PagingError(
            f"distopt: paged CUDA state for {name} needs CUDA managed memory (distopt._ops.{op}), "
            "which this build of distopt does not have"
        )
    return fn

"""Crash-safe checkpoint directories for ``torch.distributed.checkpoint`` (DCP).

A checkpoint of step ``s`` lives in ``root/step_<s, 8 digits>/``: the DCP files of a
sharded save (``.metadata`` and each rank's ``__<rank>_0.distcp``), optionally one small
``rank_<rank>.pt`` per rank (state that differs between ranks, such as the RNG state),
and ``manifest.json``, which records the world size and the size and CRC-32 of every
rank file. Invariants:

- **Complete or invisible.** Every rank writes into ``step_<s>.partial/``; only after
  every rank has written does the group's rank 0 write the manifest, fsync, and rename
  the directory to ``step_<s>/`` (one atomic ``rename``), then fsync ``root``. A name
  without ``.partial`` therefore means every rank finished; a crash at any moment leaves
  at most a ``.partial`` directory, which is never loaded (the next completed save
  removes it). Checkpoints leave (pruning, replacement by a new save of the same step)
  by a rename too, so no half-deleted checkpoint is ever a candidate.
- **Checked before loading.** ``dcp.load`` writes into the live tensors in place and
  fails half-way on a missing or short file (with ``CheckpointException``, a
  ``BaseException``), so :func:`load` first runs :func:`verify`: the DCP metadata must
  be readable, every chunk it lists must have storage, every storage file must exist and
  hold at least ``offset + length`` bytes, and every rank file must match the manifest.
  A bad checkpoint raises :class:`CheckpointError` naming it, what is wrong, and the
  newest complete older checkpoint to fall back to. Sizes are checked, not the bytes of
  the DCP files: damage inside a file of the right length is found only by ``dcp.load``
  itself, half-way, and :func:`load` then raises :class:`CheckpointError` saying so.
- **Every rank agrees.** Decisions that read the file system (:func:`latest`, the
  verification in :func:`load`, the commit in :func:`save`) are made on the group's
  rank 0 and broadcast, together with any error, so that no rank enters a DCP
  collective that another has refused, and a failure on rank 0 is raised on every rank.

:func:`save`, :func:`latest` and :func:`load` are collective when a process group is
up (call them on every rank of ``process_group``, the default group if ``None``);
:func:`verify` is local. The ranks must share ``root`` (one file system), and one job
at a time may write to a ``root``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

__all__ = ["CheckpointError", "checkpoint_name", "latest", "load", "save", "verify"]

PARTIAL = ".partial"
"""Suffix of a checkpoint directory that is still being written (or never was finished)."""
MANIFEST = "manifest.json"
_TRASH = ".deleted"
_COMPLETE = re.compile(r"step_(\d{8,})")
_FORMAT = 1

T = TypeVar("T")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be saved or loaded; ``path`` is it, ``fallback`` the one to use instead."""

    def __init__(self, message: str, *, path: Path | None = None, fallback: Path | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.fallback = fallback


def checkpoint_name(step: int) -> str:
    """The directory name of the complete checkpoint of ``step``: ``step_00000042``."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be an integer >= 0, not {step!r}")
    return f"step_{step:08d}"


# --- save --------------------------------------------------------------------------------------------------------


def save(
    root: str | os.PathLike,
    step: int,
    state: dict[str, Any],
    *,
    rank_state: dict[str, Any] | None = None,
    keep_last: int | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> Path:
    """Write ``state`` (a DCP state dict: sharded, one copy of replicated values) as ``root/step_<step>/``.

    ``rank_state`` is this rank's own small state (tensors, numbers, strings, lists and
    dicts of them), written with ``torch.save``; :func:`load` returns it to the same rank.
    The directory appears under its final name only once every rank has written (see
    the module docstring); an existing checkpoint of the same step is replaced. With
    ``keep_last``, only the newest ``keep_last`` complete checkpoints are kept. Returns
    the checkpoint's path on every rank once it is complete.

    Plain (non-DTensor) tensors and values in ``state`` must be the same on every rank:
    DCP keeps one copy of them. Anything that differs between ranks belongs in a
    DTensor or in ``rank_state``.
    """
    root, rank, world = Path(root), _rank(process_group), _world(process_group)
    final = root / checkpoint_name(step)
    partial = final.with_name(final.name + PARTIAL)
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (or None to keep every checkpoint), not {keep_last!r}")
    _on_coordinator(lambda: _fresh_dir(partial), process_group)
    with _single_process_quiet(process_group) as no_dist:
        dcp.save(state, checkpoint_id=partial, process_group=process_group, no_dist=no_dist)
    try:
        record = _write_rank_state(partial, rank, rank_state)
    except Exception as e:  # reported to every rank below, so that none waits for this one
        record = {"rank": rank, "error": f"{type(e).__name__}: {e}"}
    records = _gather(record, process_group)
    failed = [r for r in records if r and "error" in r]
    if failed:
        raise CheckpointError(
            f"distopt.checkpoint: {partial} not completed: rank {failed[0]['rank']} could not write its rank "
            f"state ({failed[0]['error']})",
            path=partial,
        )
    _on_coordinator(lambda: _commit(partial, final, step, world, records, keep_last), process_group)
    return final


def _fresh_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def _write_rank_state(directory: Path, rank: int, rank_state: dict[str, Any] | None) -> dict[str, Any] | None:
    """Write this rank's file, durably; return its manifest entry."""
    if rank_state is None:
        return None
    buffer = io.BytesIO()
    torch.save(rank_state, buffer)
    data = buffer.getvalue()
    try:  # load() reads it with weights_only=True: refuse now what it could never read back
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception as e:
        raise ValueError(f"rank_state must hold only tensors, numbers, strings, lists and dicts ({e})") from None
    path = directory / f"rank_{rank:05d}.pt"
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"file": path.name, "rank": rank, "bytes": len(data), "crc32": zlib.crc32(data)}


def _commit(
    partial: Path, final: Path, step: int, world: int, records: list[dict | None], keep_last: int | None
) -> None:
    """On one rank, after every rank has written: manifest, fsync, atomic rename, fsync the root."""
    manifest = {"format": _FORMAT, "step": step, "world_size": world, "rank_files": [r for r in records if r]}
    with open(partial / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(partial)
    if final.exists():  # an older checkpoint of the same step: out of the way, deleted once the new one is in
        _to_trash(final)
    os.rename(partial, final)
    _fsync_dir(final.parent)
    if keep_last is not None:  # the new one, and the newest keep_last - 1 good older ones, stay
        older = [p for p, s in _complete_checkpoints(final.parent) if s < step and _problem(p) is None]
        for old in older[keep_last - 1 :]:
            _to_trash(old)
    for garbage in [*final.parent.glob(f"step_*{PARTIAL}"), *final.parent.glob(f"step_*{_TRASH}")]:
        shutil.rmtree(garbage, ignore_errors=True)  # crashed saves (never loadable), replaced and pruned ones


def _to_trash(path: Path) -> None:
    """Rename ``path`` atomically out of sight (a name no later save reuses); it is deleted after."""
    os.rename(path, path.with_name(f"{path.name}.{os.getpid()}-{time.monotonic_ns()}{_TRASH}"))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- find and check ----------------------------------------------------------------------------------------------


def latest(root: str | os.PathLike, *, process_group: dist.ProcessGroup | None = None) -> Path | None:
    """The newest complete checkpoint under ``root`` that passes :func:`verify`, or ``None``.

    ``.partial`` directories are never candidates; a complete-looking checkpoint that
    fails verification is skipped with a warning. Decided on the group's rank 0, so
    every rank gets the same answer.
    """
    return _on_coordinator(lambda: _latest_here(Path(root)), process_group)


def _latest_here(root: Path, before: int | None = None) -> Path | None:
    for path, step in _complete_checkpoints(root):
        if before is not None and step >= before:
            continue
        problem = _problem(path)
        if problem is None:
            return path
        if before is None:
            warnings.warn(f"distopt.checkpoint: skipping {path}: {problem}", RuntimeWarning, stacklevel=2)
    return None


def _complete_checkpoints(root: Path) -> list[tuple[Path, int]]:
    """(path, step) of every directory named like a complete checkpoint, newest first."""
    if not root.is_dir():
        return []
    found = [(p, _COMPLETE.fullmatch(p.name)) for p in root.iterdir()]
    return sorted(((p, int(m.group(1))) for p, m in found if m and p.is_dir()), key=lambda x: -x[1])


def verify(path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a complete checkpoint written by :func:`save`.

    Reads only metadata and file sizes (and the small rank files), never the DCP data.
    The error names the checkpoint, what is wrong, and the newest complete older
    checkpoint beside it to fall back to (``error.fallback``), if there is one.
    """
    path = Path(path)
    problem = _problem(path)
    if problem is None:
        return
    fallback = _latest_here(path.parent, before=_step_of(path))
    advice = (
        f"fall back to {fallback}, the newest complete older checkpoint"
        if fallback is not None
        else f"there is no complete older checkpoint in {path.parent} to fall back to"
    )
    raise CheckpointError(
        f"distopt.checkpoint: refusing to load {path}: {problem}; {advice}", path=path, fallback=fallback
    )


def _step_of(path: Path) -> int | None:
    match = re.fullmatch(r"step_(\d{8,})(\..*)?", path.name)
    return int(match.group(1)) if match else None


def _problem(path: Path) -> str | None:
    """What makes ``path`` unloadable, or None."""
    if not path.is_dir():
        return "it does not exist" if not path.exists() else "it is not a directory"
    if path.name.endswith(PARTIAL):
        return f"it was never completed (the {PARTIAL} suffix: some rank stopped before every rank had written)"
    return _dcp_problem(path) or _manifest_problem(path)


def _dcp_problem(path: Path) -> str | None:
    """Missing or unreadable DCP metadata, a chunk without storage, or a missing or short storage file."""
    if not (path / ".metadata").is_file():
        return "its DCP metadata file .metadata is missing"
    try:
        metadata = dcp.FileSystemReader(path).read_metadata()
    except Exception as e:  # a truncated pickle: EOFError, UnpicklingError, ...
        return f"its DCP metadata file .metadata is unreadable ({type(e).__name__}: {e})"
    storage = metadata.storage_data or {}
    for fqn, item in metadata.state_dict_metadata.items():
        indices = [MetadataIndex(fqn)] if isinstance(item, BytesStorageMetadata) else []
        indices += [MetadataIndex(fqn, chunk.offsets) for chunk in getattr(item, "chunks", [])]
        missing = next((i for i in indices if i not in storage), None)
        if missing is not None:
            return f"the DCP metadata lists {fqn!r} (offset {missing.offset}) but no file holds it"
    sizes: dict[str, int | None] = {}
    for index, info in storage.items():
        name = info.relative_path
        if name not in sizes:
            sizes[name] = (path / name).stat().st_size if (path / name).is_file() else None
        if sizes[name] is None:
            return f"its data file {name} is missing (it holds {index.fqn!r})"
        if sizes[name] < info.offset + info.length:
            return (
                f"its data file {name} is truncated: {sizes[name]} bytes, but {index.fqn!r} needs bytes "
                f"{info.offset}..{info.offset + info.length}"
            )
    return None


def _manifest_problem(path: Path) -> str | None:
    """A missing or unreadable manifest, or a rank file that is missing or differs from it."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["rank_files"]
    except FileNotFoundError:
        return f"it has no {MANIFEST} (save writes it last, before the rename that completes a checkpoint)"
    except (ValueError, KeyError, TypeError) as e:
        return f"its {MANIFEST} is unreadable ({type(e).__name__}: {e})"
    for entry in files:
        file = path / entry["file"]
        if not file.is_file():
            return f"its rank file {entry['file']} is missing"
        data = file.read_bytes()
        if len(data) != entry["bytes"] or zlib.crc32(data) != entry["crc32"]:
            saved = f"{entry['bytes']} bytes, CRC-32 {entry['crc32']:08x}"
            return f"its rank file {entry['file']} differs from the manifest ({len(data)} bytes; saved: {saved})"
    return None


# --- load --------------------------------------------------------------------------------------------------------


def load(
    path: str | os.PathLike, state: dict[str, Any], *, process_group: dist.ProcessGroup | None = None
) -> dict[str, Any] | None:
    """Verify ``path``, then load it into ``state`` in place (``dcp.load``); return this rank's ``rank_state``.

    ``rank_state`` is ``None`` when none was saved or when the checkpoint was written by
    another number of ranks (per-rank state does not carry over a change of world
    size; the DCP state does). Raises :class:`CheckpointError` before anything is
    written when verification fails, and also if DCP fails half-way (the tensors in
    ``state`` are then partly overwritten: rebuild them and load ``error.fallback``).
    """
    path = Path(path)
    _on_coordinator(lambda: verify(path), process_group)
    found = _gather(_mismatch(path, state), process_group)  # each rank checks its own state dict
    problem = next((m for m in found if m), None)
    if problem is not None:
        raise CheckpointError(
            f"distopt.checkpoint: {path} does not fit the state it would be loaded into: {problem}; nothing "
            "was loaded (build the model and optimizer with the settings the checkpoint was saved with)",
            path=path,
        )
    try:
        with _single_process_quiet(process_group) as no_dist:
            dcp.load(state, checkpoint_id=path, process_group=process_group, no_dist=no_dist)
    except CheckpointException as e:  # a BaseException: re-raise as an ordinary error that says what to do
        fallback = _latest_here(path.parent, before=_step_of(path))
        raise CheckpointError(
            f"distopt.checkpoint: loading {path} failed half-way; the state it was loaded into is partly "
            f"overwritten: rebuild it and load {fallback or 'another checkpoint'} ({e})",
            path=path,
            fallback=fallback,
        ) from e
    return _read_rank_state(path, _rank(process_group), _world(process_group))


def _mismatch(path: Path, state: dict[str, Any]) -> str | None:
    """The first tensor of ``state`` that the checkpoint lacks or holds with another global
    shape or dtype (``dcp.load`` would fail on it, or cast it silently), or None."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    flat, _ = flatten_state_dict(state)
    for key, value in flat.items():
        item = saved.get(key)
        if item is None:
            return f"it has no {key!r}"
        if not torch.is_tensor(value):
            continue
        if not isinstance(item, TensorStorageMetadata):
            return f"its {key!r} is not a tensor"
        if tuple(item.size) != tuple(value.shape) or item.properties.dtype != value.dtype:
            return (
                f"its {key!r} is {item.properties.dtype} {tuple(item.size)}, "
                f"the live one {value.dtype} {tuple(value.shape)}"
            )
    return None


def _read_rank_state(path: Path, rank: int, world: int) -> dict[str, Any] | None:
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest["world_size"] != world:
        return None
    entry = next((e for e in manifest["rank_files"] if e["rank"] == rank), None)
    if entry is None:
        return None
    return torch.load(path / entry["file"], map_location="cpu", weights_only=True)


# --- collectives -------------------------------------------------------------------------------------------------


def _distributed(group: dist.ProcessGroup | None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def _world(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


@contextlib.contextmanager
def _single_process_quiet(group: dist.ProcessGroup | None) -> Iterator[bool]:
    """Yield DCP's ``no_dist`` (True without a process group), silencing DCP's warning that it assumes it."""
    no_dist = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield no_dist


def _gather(obj: Any, group: dist.ProcessGroup | None) -> list[Any]:
    if not _distributed(group):
        return [obj]
    objects: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(objects, obj, group=group)
    return objects


def _on_coordinator(fn: Callable[[], T], group: dist.ProcessGroup | None) -> T:
    """``fn()`` run on the group's rank 0 only; every rank returns its result or raises its exception."""
    result, error, sent = None, None, None
    if _rank(group) == 0:
        try:
            result = fn()
        except Exception as e:  # raised below on every rank, not only here
            error = e
            sent = e if isinstance(e, CheckpointError) else CheckpointError(f"on rank 0: {type(e).__name__}: {e}")
    if _distributed(group):
        box = [(result, sent)]
        dist.broadcast_object_list(box, group=group, group_src=0)
        result, sent = box[0]
    if error is not None:
        raise error
    if sent is not None:
        raise sent
    return result

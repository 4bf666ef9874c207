"""Whole-run output safety: check every output path before any work, then write them all or none.

:func:`check_outputs` refuses, in one sentence naming the file, output paths that coincide with each
other or with an input (the scan, its detached data or series files, checkpoints, a prior or truth
file), whose folder is a file or is not writable (checked with ``os.access`` *and* by creating and
removing a probe file, since root ignores permission bits), that are folders or devices, or whose
extension no writer supports.  Nothing is created by the check except that short-lived probe file.

:class:`OutputSet` writes each output to a temporary file beside its target and moves them all into
place in :meth:`OutputSet.commit`, with SIGINT and SIGTERM held back during the moves (so a signal
lands before the first move or after the last).  Leaving the ``with`` block any other way, including
by ``KeyboardInterrupt``, removes every temporary file and any folder it created: the targets then
hold either the complete new set or what they held before.  The temporaries that only a SIGKILL can leave
behind are removed by the next set that writes the same target (:func:`.temporaries.remove_stale`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .guard import resolved
from .readers import file_suffix
from .temporaries import BACKUP_END, make_temporary, remove_stale
from .volume import Volume
from .writers import WRITE_SUFFIXES, VolumeWriteError, WriteKind, _cast, checked_write, write_file


def _key(path: Path) -> str:
    """A comparable form of a path: absolute, links resolved as far as they exist (a loop stays as given)."""
    return os.path.normcase(str(resolved(os.path.abspath(path))))


def _same(a: Path, b: Path) -> bool:
    if _key(a) == _key(b):
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)  # hard links, bind mounts
    except (OSError, ValueError):
        return False


def _existing_ancestor(folder: Path) -> Path:
    current = Path(os.path.abspath(folder))
    while not os.path.lexists(current) and current.parent != current:
        current = current.parent
    return current


def _probe_writable(folder: Path) -> str | None:
    """``None`` when a file can be created and removed in ``folder``, else the reason."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return "it is not writable"
    try:
        fd, name = tempfile.mkstemp(prefix=".spinesegdiff-probe-", dir=folder)
    except OSError as exc:
        return f"no file can be created in it ({exc.strerror or type(exc).__name__})"
    os.close(fd)
    try:
        os.unlink(name)
    except OSError as exc:
        return f"a file created in it cannot be removed ({exc.strerror or type(exc).__name__})"
    return None


def _check_kind(path: Path, role: str, volume: bool) -> None:
    """A supported extension, and not an existing folder or device."""
    where = f"Cannot write the {role} {path}"
    if volume and file_suffix(path) not in WRITE_SUFFIXES:
        raise VolumeWriteError(
            f"{where}: its extension is not one SpineSegDiff writes ({', '.join(WRITE_SUFFIXES)})."
        )
    if os.path.lexists(path):
        try:
            mode = os.stat(path).st_mode
        except OSError:
            mode = None
        if mode is not None and stat.S_ISDIR(mode):
            raise VolumeWriteError(f"{where}: it is a folder; give a file name.")
        if mode is not None and not stat.S_ISREG(mode):
            raise VolumeWriteError(f"{where}: it is a device, pipe or socket, not a file.")


def _check_folder(path: Path, role: str) -> None:
    """The nearest existing folder of ``path`` is a folder in which a file can be created and removed."""
    where = f"Cannot write the {role} {path}"
    folder = _existing_ancestor(path.parent)
    if not folder.is_dir():
        raise VolumeWriteError(f"{where}: {folder} is a file, not a folder.")
    reason = _probe_writable(folder)
    if reason is not None:
        missing = "" if _key(folder) == _key(path.parent) else f" (the nearest existing folder of {path.parent})"
        raise VolumeWriteError(f"{where}: the folder {folder}{missing} is not usable because {reason}.")


def check_output_path(path: Path, role: str, volume: bool = True) -> None:
    """One output on its own: a supported extension, not a folder or device, a writable folder."""
    _check_kind(Path(path), role, volume)
    _check_folder(Path(path), role)


def check_outputs(
    outputs: Mapping[str, Path | str | None],
    inputs: Mapping[str, Path | str | None] | Iterable[Path | str | None] = (),
    text_outputs: Iterable[str] = (),
) -> None:
    """Refuse, in one sentence naming the file, an output set that cannot all be written safely.

    ``outputs`` maps a role (``"labels"``, ``"uncertainty map"``, ...) to its path; roles named in
    ``text_outputs`` (e.g. the JSON sidecar) skip the volume extension check.  ``inputs`` are the files
    the run reads (a mapping from role, e.g. ``"input scan"``, to path, or just paths): no output may be
    one of them.
    """
    items = [(role, Path(p)) for role, p in outputs.items() if p is not None]
    texts = set(text_outputs)
    if isinstance(inputs, Mapping):
        sources = [(role, Path(p)) for role, p in inputs.items() if p is not None]
    else:
        sources = [("input", Path(p)) for p in inputs if p is not None]
    for role, path in items:  # the cheapest refusals first, and never a probe file for them
        for what, src in sources:
            if _same(path, src):
                shown = f"the {what}" if what != "input" else f"an input of this run ({src})"
                raise VolumeWriteError(f"Cannot write the {role} {path}: it is {shown}; choose another file.")
    for role, path in items:
        _check_kind(path, role, volume=role not in texts)
    for i, (role, path) in enumerate(items):
        for other_role, other in items[:i]:
            if _same(path, other):
                raise VolumeWriteError(
                    f"Cannot write the {role} {path}: it is also the {other_role} output; give each output its own "
                    "file."
                )
    probed: set[str] = set()
    for role, path in items:
        folder = _key(_existing_ancestor(path.parent))
        if folder not in probed:
            _check_folder(path, role)
            probed.add(folder)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back (delivered when the block ends) where the platform allows it."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class OutputSet:
    """Outputs written to temporaries beside their targets and moved into place together.

    Use as a context manager; call :meth:`commit` at the end.  Without a commit (an exception, a
    ``KeyboardInterrupt``) every temporary and every folder the set created is removed.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []  # (temporary, target)
        self._made_dirs: list[Path] = []
        self._done = False

    # ----------------------------------------------------------------------------------------- staging

    def _make_dirs(self, folder: Path) -> None:
        missing = []
        current = Path(os.path.abspath(folder))
        while not current.exists():
            missing.append(current)
            current = current.parent
        for d in reversed(missing):
            with signals_held():
                d.mkdir()
                self._made_dirs.append(d)

    def _stage(self, target: Path) -> Path:
        if self._done:
            raise RuntimeError("This output set was already committed or discarded.")
        if any(_same(target, t) for _, t in self._staged):
            raise VolumeWriteError(f"Cannot write {target}: it is already part of this output set.")
        self._make_dirs(target.parent)
        remove_stale(target)  # what a killed earlier run writing this output left behind
        with signals_held():  # the temporary is registered before a signal can leave it behind
            tmp = make_temporary(target)
            self._staged.append((tmp, target))
        return tmp

    def add_volume(self, data: np.ndarray, path: str | Path, like: Volume, kind: WriteKind = "labels",
                   produced_by: str | dict[str, Any] = "spinesegdiff") -> Path:
        """Write ``data`` (file voxel order of ``like``) for ``path`` into a temporary; return ``path``."""
        path = Path(path)
        suffix, arr = checked_write(data, path, like)
        arr = _cast(arr, kind, path)
        write_file(arr, self._stage(path), suffix, like, produced_by)
        return path

    def add_text(self, path: str | Path, text: str) -> Path:
        """Write ``text`` (UTF-8) for ``path`` into a temporary; return ``path``."""
        path = Path(path)
        tmp = self._stage(path)
        tmp.write_text(text, encoding="utf-8")
        os.chmod(tmp, 0o644)
        return path

    def add_bytes(self, path: str | Path, data: bytes) -> Path:
        """Write ``data`` for ``path`` (a table, any binary file) into a temporary; return ``path``."""
        path = Path(path)
        tmp = self._stage(path)
        tmp.write_bytes(data)
        os.chmod(tmp, 0o644)
        return path

    @property
    def targets(self) -> list[Path]:
        return [t for _, t in self._staged]

    # ------------------------------------------------------------------------------------------ ending

    def commit(self) -> list[Path]:
        """Move every temporary onto its target; on a failure put back what the targets held before."""
        if self._done:
            raise RuntimeError("This output set was already committed or discarded.")
        with signals_held():
            backups: list[tuple[Path, Path | None]] = []  # (target, hard link to its previous content)
            moved: list[Path] = []
            try:
                for _, target in self._staged:
                    backups.append((target, self._backup(target)))
                for tmp, target in self._staged:
                    os.replace(tmp, target)
                    moved.append(target)
            except BaseException:
                for target, backup in backups:
                    if backup is not None:
                        os.replace(backup, target)
                    elif target in moved:
                        _unlink(target)
                self._discard_held()
                raise
            for _, backup in backups:
                if backup is not None:
                    _unlink(backup)
            self._done = True
        return self.targets

    @staticmethod
    def _backup(target: Path) -> Path | None:
        if not target.exists():
            return None
        name = make_temporary(target, BACKUP_END)
        os.unlink(name)
        try:
            os.link(target, name)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            return None  # no hard links here: the previous content cannot be kept
        return Path(name)

    def discard(self) -> None:
        """Remove every temporary and every folder this set created (a no-op after :meth:`commit`)."""
        if self._done:
            return
        with signals_held():
            self._discard_held()

    def _discard_held(self) -> None:
        for tmp, _ in self._staged:
            _unlink(tmp)
        for d in reversed(self._made_dirs):
            with contextlib.suppress(OSError):
                d.rmdir()  # only when empty
        self._done = True

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.discard()


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

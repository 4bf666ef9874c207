"""The temporary files every write goes through, and the removal of those a killed writer left behind.

A write goes to a hidden temporary beside its target and is moved onto it when complete
(:func:`~.writers.write_volume`, :class:`~.outputs.OutputSet`), so a final name is never half-written.  A
SIGKILL (or a power cut) while writing leaves the temporary itself behind, though, and nothing else would
ever remove it.  So the next write of the same target removes them (:func:`remove_stale`).

Names: ``.<target name>.<writer>.<random>.tmp<target extension>``, where ``<writer>`` is ``<host>-<pid>``:
``<host>`` 8 hexadecimal digits that name this machine and process namespace (a hash of the host name and
the PID namespace), ``<pid>`` the writing process, ``<random>`` the 8 characters of :func:`tempfile.mkstemp`.
The previous content of a target kept as a hard link while a set of outputs is moved into place ends in
``.tmp.old`` instead of the extension.

A temporary is *stale*, and removed, when it matches that pattern for the target exactly, is a regular file
(never a link or folder), and either

* its writer ran on this machine in this process namespace and is no longer running (no such process, or a
  zombie), whatever its age: a live writer's temporaries are never touched, so two runs writing the same
  output at once do not break each other; or
* it is older than :data:`STALE_AFTER_S` (its writer cannot be asked: another machine sharing the folder,
  another container, a name from before the writer was recorded, or a target name so long that the writer
  did not fit), since a writer moves its temporaries into place seconds after it writes them.

A ``.tmp.old`` copy is removed only when it is a hard link to the target's current content (a kill between
making the copy and the moves), so no content that exists nowhere else is ever removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import stat
import tempfile
import time
from pathlib import Path

from .readers import file_suffix

#: Prefix and infix of the temporary files (``.<name>.<writer>.<random>.tmp<suffix>`` beside the target).
TEMP_PREFIX = "."
TEMP_INFIX = ".tmp"
BACKUP_END = ".tmp.old"
#: A temporary whose writer cannot be asked is stale once it is this old (seconds since it was written).
STALE_AFTER_S = 3600.0
_RANDOM = r"[a-z0-9_]{8}"  # tempfile.mkstemp's names
NAME_MAX = 255  # bytes in one file name on the usual file systems


def _host_tag() -> str:
    """8 hex digits naming this machine and PID namespace (processes elsewhere cannot be asked)."""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        namespace = ""
    return hashlib.sha256(f"{socket.gethostname()}\0{namespace}".encode()).hexdigest()[:8]


def writer_tag() -> str:
    """``<host>-<pid>`` of this process, as written into its temporaries' names."""
    return f"{_host_tag()}-{os.getpid()}"


def make_temporary(target: Path, end: str | None = None) -> Path:
    """Create (empty) and return a new temporary for ``target`` in its folder, named as described above;
    ``end`` replaces ``.tmp<extension>`` (e.g. :data:`BACKUP_END`)."""
    target = Path(target)
    end = end or f"{TEMP_INFIX}{file_suffix(target)}"
    prefix = f"{TEMP_PREFIX}{target.name}.{writer_tag()}."
    if len(os.fsencode(prefix + end)) + 8 > NAME_MAX:  # a long target name: no room for the writer
        prefix = f"{TEMP_PREFIX}{target.name}."
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=end, dir=target.parent)
    os.close(fd)
    return Path(name)


def _pattern(target: Path) -> re.Pattern[str]:
    name, suffix = re.escape(target.name), re.escape(file_suffix(target))
    end = f"(?:{re.escape(TEMP_INFIX)}{suffix}|{re.escape(BACKUP_END)})"
    return re.compile(rf"\.{name}\.(?:(?P<host>[0-9a-f]{{8}})-(?P<pid>[0-9]{{1,10}})\.)?{_RANDOM}(?P<end>{end})\Z")


def _running(pid: int) -> bool:
    """True while a process ``pid`` exists in this namespace and is not a zombie."""
    if pid <= 0:
        return True  # never a writer's pid: treat as unknown, so as alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def stale_temporaries(target: Path, now: float | None = None) -> list[Path]:
    """The stale temporaries of ``target`` (see the module docstring), without removing them."""
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    pattern, host, now = _pattern(target), _host_tag(), time.time() if now is None else now
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    try:
        target_stat = os.stat(target)
    except OSError:
        target_stat = None
    stale = []
    for name in names:
        match = pattern.match(name)
        if match is None:
            continue
        path = folder / name
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or (match["pid"] and int(match["pid"]) == os.getpid()):
            continue
        if match["end"] == BACKUP_END and not (
            target_stat is not None and (st.st_dev, st.st_ino) == (target_stat.st_dev, target_stat.st_ino)
        ):
            continue  # a copy of content the target no longer holds: kept
        writer_gone = match["host"] == host and not _running(int(match["pid"]))
        if writer_gone or now - st.st_mtime > STALE_AFTER_S:
            stale.append(path)
    return sorted(stale)


def remove_stale(target: Path) -> list[Path]:
    """Remove the stale temporaries of ``target`` (see the module docstring); return the removed paths."""
    removed = []
    for path in stale_temporaries(target):
        with contextlib.suppress(FileNotFoundError, PermissionError, IsADirectoryError):
            os.unlink(path)
            removed.append(path)
    return removed

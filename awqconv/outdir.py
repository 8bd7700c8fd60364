"""Output directories: never delete what is not ours, one writer at a time, nothing half-written.

A command's ``-o`` directory is built in a hidden temporary sibling and swapped into place at the
end, under a lock held for the whole run. The rules, all checked before any work (``check_output``)
and again under the lock just before the swap:

- ``-o`` may not be an input (model, artifact, calibration file, adapter), a parent of one, or
  inside one, with or without ``--overwrite``.
- A non-empty ``-o`` is replaced only with ``--overwrite`` and only when awqconv wrote it: its
  ``awqconv-output.json`` lists every entry, and nothing else may be there.
- Sibling names have a fixed length (a hash of the output's name), so any name the file system
  accepts for ``-o`` also works for its temporary, old and lock siblings.

A run killed at any point leaves at most hidden siblings; the next run into the same output removes
them, or puts the previous output back if the kill fell between the two renames of a swap.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, OutputExistsError

OUTPUT_MARKER = "awqconv-output.json"
OUTPUT_FORMAT = "awqconv-output"
# files a later command adds to an output it did not write (verify's report)
ADDED_LATER = frozenset({"verify.json"})
SIBLING_PREFIX = ".awqconv-"
FREE_MARGIN = 1.1  # estimates are rough; keep 10 % in hand
_PATH_RESERVE = 128  # room below -o for an artifact's own sub-directories and file names


class OutputLockedError(OutputExistsError):
    """Another awqconv process holds the output's lock."""


def _key(out: Path) -> str:
    return hashlib.sha256(out.name.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def temp_prefix(out: Path) -> str:
    return f"{SIBLING_PREFIX}{_key(out)}.tmp-"


def old_prefix(out: Path) -> str:
    return f"{SIBLING_PREFIX}{_key(out)}.old-"


def work_path(out: Path) -> Path:
    """Where a quantize run keeps its per-layer checkpoints (quant/resume.py) until it finishes."""
    return out.parent / f"{SIBLING_PREFIX}{_key(out)}.work"


def lock_path(out: Path) -> Path:
    return out.parent / f"{SIBLING_PREFIX}{_key(out)}.lock"


def fmt_bytes(n: float) -> str:
    """``20.0 MiB``, ``3.4 GiB``: never ``0.0 GiB`` for a small amount."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def absolute(path: str | os.PathLike, what: str = "-o") -> Path:
    """``path`` made absolute with symlinks resolved (as far as it exists); loops are an InputError."""
    p = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    try:
        return p.resolve(strict=False)
    except (RuntimeError, OSError) as e:
        if isinstance(e, RuntimeError) or getattr(e, "errno", None) == errno.ELOOP:
            raise InputError(f"{what} {path}: a symbolic link in it points back at itself (a symlink loop); fix or remove the link") from None
        raise InputError(f"{what} {path}: {e.strerror or e}") from None


def _nearest_existing(p: Path) -> Path:
    a = p
    while not a.exists():
        if a.is_symlink():  # a dangling link: creating below it would fail
            raise InputError(f"-o {p}: {a} is a symbolic link to a missing target; fix it or choose another -o")
        a = a.parent
    return a


def read_marker(out: Path) -> dict | None:
    """The output marker of ``out`` when awqconv wrote it, else None."""
    f = out / OUTPUT_MARKER
    try:
        m = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or m.get("format") != OUTPUT_FORMAT or not isinstance(m.get("entries"), list):
        return None
    return m


def foreign_entries(out: Path) -> list[str] | None:
    """Entries of ``out`` that awqconv did not write; None when ``out`` is not an awqconv output."""
    m = read_marker(out)
    if m is None:
        return None
    ours = {str(e) for e in m["entries"]} | {OUTPUT_MARKER} | ADDED_LATER
    return sorted(p.name for p in out.iterdir() if p.name not in ours)


def check_overlap(out: Path, inputs: Sequence[str | os.PathLike]) -> None:
    """Refuse an output that is, holds or lies inside any input (whatever --overwrite says)."""
    for raw in inputs:
        inp = absolute(raw, "input")
        if out == inp:
            rel = "is the input"
        elif inp.is_relative_to(out):
            rel = "contains the input"
        elif out.is_relative_to(inp):
            rel = "lies inside the input"
        else:
            continue
        raise InputError(
            f"-o {out} {rel} {inp}; awqconv never writes over its inputs: choose an -o outside it "
            f"(e.g. {inp.parent / (inp.name + '-awq')})"
        )


def check_output(
    out_dir: str | os.PathLike,
    *,
    overwrite: bool,
    inputs: Sequence[str | os.PathLike] = (),
    needed_bytes: int | None = None,
) -> Path:
    """Every check on ``-o`` that can be made before the work; returns its absolute path."""
    name_max = os.pathconf("/", "PC_NAME_MAX")
    for part in Path(os.path.abspath(os.path.expanduser(os.fspath(out_dir)))).parts:
        if len(part.encode("utf-8", "surrogateescape")) > name_max:
            raise InputError(
                f"-o {out_dir}: the name {part[:40]}... is {len(part.encode())} bytes; this file system allows "
                f"{name_max}; choose a shorter name"
            )
    out = absolute(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"-o {out} exists and is not a directory; choose another -o path")
    anchor = _nearest_existing(out)
    if not anchor.is_dir():
        raise InputError(f"-o {out}: {anchor} is a file, so nothing can be created below it; choose another -o")
    check_overlap(out, inputs)
    name_max = os.pathconf(anchor, "PC_NAME_MAX")
    for part in out.relative_to(anchor).parts or (out.name,):
        if len(part.encode("utf-8", "surrogateescape")) > name_max:
            raise InputError(
                f"-o {out}: the name {part[:40]}... is {len(part.encode())} bytes; this file system allows "
                f"{name_max}; choose a shorter name"
            )
    path_max = os.pathconf(anchor, "PC_PATH_MAX")
    if len(os.fsencode(str(out))) + _PATH_RESERVE > path_max:
        raise InputError(f"-o {out} is too long a path ({len(str(out))} characters); choose a shorter one")
    if out.is_dir():
        if os.path.ismount(out):
            raise InputError(
                f"-o {out} is a mount point; awqconv replaces its output by renaming, which a mount point "
                f"does not allow: write to a directory inside it, e.g. -o {out / 'awq'}"
            )
        check_replaceable(out, overwrite)
    writable_dir = out.parent if out.parent.exists() else anchor
    if not os.access(writable_dir, os.W_OK | os.X_OK) or _read_only_fs(writable_dir):
        raise InputError(
            f"-o {out}: cannot create files in {writable_dir} "
            f"({'read-only file system' if _read_only_fs(writable_dir) else 'permission denied'}); choose another -o"
        )
    if needed_bytes is not None:
        free = shutil.disk_usage(anchor).free
        need = int(needed_bytes * FREE_MARGIN)
        if free < need:
            raise InputError(
                f"not enough free disk at {anchor}: ~{fmt_bytes(need)} needed (with a 10 % margin), "
                f"{fmt_bytes(free)} free; free some space or write elsewhere with -o"
            )
    return out


def check_replaceable(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` unless ``overwrite`` and awqconv wrote all of it."""
    try:
        entries = [p.name for p in out.iterdir()]
    except OSError as e:
        raise InputError(f"-o {out}: cannot list it ({e.strerror}); choose another -o") from None
    if not entries:
        return
    foreign = foreign_entries(out)
    if foreign is None:
        raise OutputExistsError(
            f"-o {out} is not empty and was not written by awqconv (it has no {OUTPUT_MARKER}); "
            "awqconv replaces only its own outputs: choose another -o"
        )
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputExistsError(
            f"-o {out} holds an awqconv output plus entries awqconv did not write ({shown}); "
            "move them out or choose another -o"
        )
    if not overwrite:
        raise OutputExistsError(f"-o {out} holds an earlier awqconv output; pass --overwrite to replace it or choose another -o")


def _read_only_fs(p: Path) -> bool:
    try:
        return bool(os.statvfs(p).f_flag & os.ST_RDONLY)
    except OSError:
        return False


# -- the lock ----------------------------------------------------------------------------------------


@dataclass
class OutputLock:
    """An exclusive ``flock`` on a hidden sibling of the output, held for a whole run.

    The kernel drops it when the process dies (even by kill -9), so a stale lock file never blocks.
    """

    out: Path
    _fh: object | None = None

    def holder(self) -> str:
        try:
            info = json.loads(lock_path(self.out).read_text())
            return (f"pid {info['pid']} on {info['host']}, started {info['started']}: "
                    f"{info['command']}")
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def acquire(self) -> "OutputLock":
        import fcntl

        path = lock_path(self.out)
        while True:
            fh = open(path, "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                raise OutputLockedError(
                    f"-o {self.out} is being written by another awqconv run ({self.holder()}); "
                    "wait for it to finish or choose another -o"
                ) from None
            try:
                same = os.fstat(fh.fileno()).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            fh.close()  # the previous holder removed the file between our open and flock: retry
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300],
            "output": str(self.out),
        }))
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is None:
            return
        with contextlib.suppress(OSError):
            lock_path(self.out).unlink()
        self._fh.close()  # closing drops the flock
        self._fh = None

    def probe(self) -> None:
        """Raise OutputLockedError when another run holds the lock; take nothing."""
        if not lock_path(self.out).exists():
            return
        self.acquire()
        self.release()


# -- staging and the swap -----------------------------------------------------------------------------


def recover(out: Path) -> None:
    """Clean what killed runs left beside ``out`` (call with the lock held).

    An ``.old-`` sibling with no ``out`` means a run died between the two renames of a swap: the
    previous output goes back in place. Every other temporary or old sibling is stale.
    """
    parent = out.parent
    if not parent.is_dir():
        return
    olds = sorted(p for p in parent.iterdir() if p.name.startswith(old_prefix(out)))
    tmps = [p for p in parent.iterdir() if p.name.startswith(temp_prefix(out))]
    if olds and not out.exists():
        os.rename(olds.pop(), out)
    for p in olds + tmps:
        shutil.rmtree(p, ignore_errors=True)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step with Linux's renameat2(RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGTERM and SIGINT for the few system calls of a swap."""
    sigs = {signal.SIGTERM, signal.SIGINT}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    except (AttributeError, ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def apply_umask_modes(root: Path) -> None:
    """Give every file and directory under ``root`` the mode the umask gives new files.

    Some writers create files through mkstemp (mode 0600); an artifact's files should all read alike.
    """
    umask = os.umask(0)
    os.umask(umask)
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~umask)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~umask)


def swap_into_place(tmp: Path, out: Path) -> None:
    """Make ``tmp`` the new ``out``; the previous ``out`` (if any) is removed afterwards."""
    with _signals_held():
        if not out.exists():
            os.rename(tmp, out)
            return
        if _exchange(tmp, out):
            shutil.rmtree(tmp, ignore_errors=True)  # now holds the previous output
            return
        old = out.parent / f"{old_prefix(out)}{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def write_marker(tmp: Path, extra: dict | None = None) -> None:
    from . import __version__
    from ._io import timestamp

    entries = sorted(p.name for p in tmp.iterdir() if p.name != OUTPUT_MARKER)
    body = {"format": OUTPUT_FORMAT, "awqconv_version": __version__,
            "created": timestamp(), "entries": entries, **(extra or {})}
    (tmp / OUTPUT_MARKER).write_text(json.dumps(body, indent=2) + "\n")


@contextlib.contextmanager
def reserved(out_dir: str | os.PathLike) -> Iterator[OutputLock]:
    """Hold the output's lock (creating its parent directories) for the ``with`` block.

    Parents created here are removed again when the run ends without an output.
    """
    out = absolute(out_dir)
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = OutputLock(out).acquire()
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield lock
    finally:
        lock.release()
        if not out.exists():
            _remove_empty(created)


def _remove_empty(dirs: list[Path]) -> None:
    for d in dirs:  # deepest first
        with contextlib.suppress(OSError):
            d.rmdir()


@contextlib.contextmanager
def staged_output(
    out_dir: str | os.PathLike,
    *,
    overwrite: bool,
    inputs: Sequence[str | os.PathLike] = (),
    owned: bool = True,
    lock: OutputLock | None = None,
) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``out_dir`` and swap it into place on success.

    Runs under ``lock`` (taken here when not given). ``owned`` (user outputs) writes the output
    marker and applies the ownership rules; awqconv's own cache directories pass ``owned=False``
    and are replaced whatever they hold.
    """
    if lock is None:
        with reserved(out_dir) as held, staged_output(
            out_dir, overwrite=overwrite, inputs=inputs, owned=owned, lock=held
        ) as tmp:
            yield tmp
        return
    out = absolute(out_dir)
    recover(out)
    if owned:
        check_overlap(out, inputs)
        if out.is_dir():
            check_replaceable(out, overwrite)
    tmp = out.parent / f"{temp_prefix(out)}{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
        if owned:
            write_marker(tmp)
            if out.is_dir():  # content may have appeared while we worked
                check_replaceable(out, overwrite)
        apply_umask_modes(tmp)
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

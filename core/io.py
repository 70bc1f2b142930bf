"""One way to write a file: atomically, never into the shipped weights, never over a file the user did not name.

Every writer in fewstep goes through :func:`atomic_path`: the data is written to a temporary file in the target's
folder, flushed and ``fsync``-ed, then moved over the target with ``os.replace`` (atomic on POSIX and Windows for
files on one file system). A crash, a full disk or an exception in the writer leaves the old target untouched and
removes the temporary file, so a reader sees either the old file or the new one, never half of one.

The small functions on top cover what fewstep writes: bytes, text, JSON, safetensors with a JSON sidecar, and any
library writer that wants a path (``torch.save``, ``safetensors.torch.save_file``, ``matplotlib``'s ``savefig``,
``PIL``'s ``Image.save``). :func:`read_safetensors` and :func:`read_json` name the file when it is truncated or
corrupt. :func:`output_lock` keeps two runs out of one output folder.

The package's weights folders are read-only to the code (:func:`check_not_shipped`); maintainers who really mean to
replace a shipped file set ``FEWSTEP_WRITE_SHIPPED=1``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "CorruptFileError", "ShippedFileError", "OutputLockedError", "SHIPPED_DIRS", "atomic_path", "write_bytes",
    "write_text", "write_json", "save_safetensors", "read_safetensors", "read_json", "check_not_shipped",
    "check_new_file", "check_writable_dir", "output_lock", "fsync_dir", "atomic_file_set",
    "replace_with_companions", "read_safetensors_metadata", "previous_path", "load_with_fallback",
]

_PKG = Path(__file__).resolve().parent.parent
#: folders of the installed package that hold shipped files (weights, calibrations): never written by the code
SHIPPED_DIRS = (_PKG / "core" / "models" / "weights", _PKG / "core" / "metrics" / "weights",
                _PKG / "core" / "cache" / "calibrations")
_SHIPPED_ENV = "FEWSTEP_WRITE_SHIPPED"


class ShippedFileError(PermissionError):
    """A write into one of the package's shipped-weights folders."""


class CorruptFileError(ValueError):
    """A file that exists but cannot be read (truncated, corrupt, wrong format); the message names it."""


class OutputLockedError(RuntimeError):
    """Another live run holds the output folder's lock file."""


def check_not_shipped(path: str | Path) -> Path:
    """``path`` (resolved) unless it lies inside the package's shipped weights folders (``ShippedFileError``)."""
    p = Path(path).expanduser().resolve()
    if os.environ.get(_SHIPPED_ENV) == "1":
        return p
    for d in SHIPPED_DIRS:
        if p == d or d in p.parents:
            raise ShippedFileError(
                f"refusing to write {p}: it is inside fewstep's shipped weights folder {d}, which the code never "
                f"changes. Write to a folder of your own (e.g. --out ./my-run) and point the loaders at it; "
                f"maintainers replacing a shipped file set {_SHIPPED_ENV}=1")
    return p


def check_new_file(path: str | Path, overwrite: bool, flag: str = "--overwrite") -> Path:
    """``path`` if it may be written: not shipped, and not an existing file unless ``overwrite``."""
    p = check_not_shipped(path)
    if p.exists() and not overwrite:
        raise FileExistsError(f"{p} already exists; pass {flag} to replace it (or choose another path)")
    return p


def check_writable_dir(folder: str | Path, flag: str = "--out") -> Path:
    """Create ``folder`` if needed and prove a file can be written there, before any expensive work."""
    d = check_not_shipped(folder)
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".fewstep-write-test.", dir=d)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(f"cannot write to the output folder {d} ({e.strerror or e}); choose a writable "
                              f"folder with {flag}") from None
    return d


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (the rename) to disk where the platform allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(str(folder), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _file_mode(target: Path) -> int:
    if target.exists():
        return target.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | Path, overwrite: bool = True, flag: str = "--overwrite",
                keep_previous: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on a clean exit it is fsync-ed and moved onto ``path``.

    The temporary name keeps ``path``'s suffix (``savefig`` and ``Image.save`` pick the format from it). On any
    exception the temporary file is removed and ``path`` is left as it was. ``overwrite=False`` refuses an existing
    ``path`` (``FileExistsError`` naming it and ``flag``). ``keep_previous``: the file being replaced is kept as
    ``<path>.prev`` (training checkpoints: :func:`load_with_fallback` resumes from it when ``path`` is torn).
    """
    target = check_new_file(path, overwrite, flag)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if not tmp.exists():
            raise OSError(errno.ENOENT, f"the writer produced no file for {target}")
        _fsync_file(tmp)
        os.chmod(tmp, _file_mode(target))  # mkstemp makes 0600; keep the target's mode or the umask default
        if keep_previous and target.exists():
            _keep_previous(target)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def replace_with_companions(tmp_dir: Path, name: str, target: Path, suffixes: tuple[str, ...] = (".data",),
                            mode: int | None = None) -> None:
    """Move ``tmp_dir/name`` and its companions ``tmp_dir/name<suffix>`` onto ``target`` (``target<suffix>``),
    fsync-ed, companions first and the main file last; a stale companion at the target without a new one is
    removed (an ONNX model's external-data file from an earlier, larger export)."""
    src = tmp_dir / name
    for suf in suffixes:
        new, old = tmp_dir / f"{name}{suf}", target.with_name(target.name + suf)
        if new.exists():
            _fsync_file(new)
            if mode is not None:
                os.chmod(new, mode)
            os.replace(new, old)
        elif old.exists():
            old.unlink()
    _fsync_file(src)
    if mode is not None:
        os.chmod(src, mode)
    os.replace(src, target)
    fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_file_set(path: str | Path, overwrite: bool = True, flag: str = "--overwrite",
                    companions: tuple[str, ...] = (".data",)) -> Iterator[Path]:
    """Like :func:`atomic_path` for a file with companions that refer to it by name (an ONNX model and its
    ``.data`` external weights): yield ``<hidden temp folder>/<path name>``; on a clean exit the files written there
    are moved into place (:func:`replace_with_companions`); on any error the folder is removed and the target left
    untouched."""
    import shutil

    target = check_new_file(path, overwrite, flag)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp_dir / target.name
        if not (tmp_dir / target.name).exists():
            raise OSError(errno.ENOENT, f"the writer produced no file for {target}")
        mode = _file_mode(target)
        replace_with_companions(tmp_dir, target.name, target, companions, mode)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def previous_path(path: str | Path) -> Path:
    """Where :func:`atomic_path` keeps the file it replaced with ``keep_previous``: ``<path>.prev``."""
    path = Path(path)
    return path.with_name(path.name + ".prev")


def _keep_previous(target: Path) -> None:
    """Make ``<target>.prev`` a copy of ``target`` (a hard link where possible), itself written atomically; the
    target stays in place throughout, so a crash never leaves neither."""
    import shutil

    prev = previous_path(target)
    tmp = prev.with_name(f".{prev.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(target, tmp)
    except OSError:
        shutil.copy2(target, tmp)
    os.replace(tmp, prev)


def load_with_fallback(path: str | Path, load: Any, what: str = "checkpoint") -> tuple[Any, Path]:
    """``(load(path), path)``; when ``path`` is torn or corrupt, ``(load(<path>.prev), <path>.prev)`` with a
    warning that names the corrupt file (which is moved aside to ``<path>.corrupt``).

    ``CorruptFileError`` naming both files when neither loads; ``FileNotFoundError`` passes through.
    """
    import warnings

    path = Path(path)
    try:
        return load(path), path
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - torch.load raises RuntimeError/EOFError/UnpicklingError on a torn file
        err = e
    why = f"{type(err).__name__}: {str(err).split('. ')[0][:200]}"
    prev = previous_path(path)
    if not prev.is_file():
        raise CorruptFileError(f"{what} {path} is truncated or corrupt ({why}) and "
                               f"there is no previous {what} {prev.name} to fall back to; delete {path} to start "
                               "afresh") from None
    try:
        obj = load(prev)
    except Exception as e2:  # noqa: BLE001
        raise CorruptFileError(f"{what} {path} is truncated or corrupt ({why}) and so is the previous one {prev} "
                               f"({str(e2).split('. ')[0][:200]}); delete both to start afresh") from None
    corrupt = path.with_name(path.name + ".corrupt")
    os.replace(path, corrupt)
    warnings.warn(f"{what} {path} is truncated or corrupt ({why}); resuming from "
                  f"the previous good {what} {prev} (the corrupt file was moved to {corrupt.name})", UserWarning,
                  stacklevel=2)
    return obj, prev


def save_torch(obj: Any, path: str | Path, keep_previous: bool = True) -> Path:
    """``torch.save(obj)`` to ``path`` atomically; ``keep_previous``: the replaced file stays as ``<path>.prev`` for
    :func:`load_with_fallback` (training checkpoints). Load it back with :func:`load_torch`."""
    import torch

    with atomic_path(path, keep_previous=keep_previous) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def load_torch(path: str | Path, what: str = "checkpoint", map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` (no pickle), falling back to ``<path>.prev`` when ``path`` is torn
    (:func:`load_with_fallback`)."""
    import torch

    obj, _ = load_with_fallback(path, lambda p: torch.load(p, map_location=map_location, weights_only=True), what)
    return obj


def write_bytes(path: str | Path, data: bytes, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path, overwrite) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: str | Path, text: str, overwrite: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"), overwrite)


def write_json(path: str | Path, obj: Any, indent: int | None = 2, overwrite: bool = True, **kwargs: Any) -> Path:
    """Write ``obj`` as JSON (newline-terminated) to ``path`` atomically; ``kwargs`` go to ``json.dumps``."""
    return write_text(path, json.dumps(obj, indent=indent, **kwargs) + "\n", overwrite)


def save_safetensors(tensors: dict[str, Any], path: str | Path, meta: dict[str, Any] | None = None,
                     sidecar: bool = True, header: dict[str, str] | None = None, overwrite: bool = True) -> Path:
    """Write ``tensors`` to a ``.safetensors`` file atomically.

    ``meta`` is stored as JSON under the header key ``"fewstep"`` and, with ``sidecar``, as ``<path stem>.json``
    next to it (written after the weights, so a sidecar never describes weights that are not there); ``header``
    adds raw string entries to the header. Returns ``path``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    head = dict(header or {})
    if meta is not None:
        head["fewstep"] = json.dumps(meta, default=str)
    if sidecar and meta is not None:
        check_new_file(path.with_suffix(".json"), overwrite)
    with atomic_path(path, overwrite) as tmp:
        save_file(state, str(tmp), metadata=head or None)
    if sidecar and meta is not None:
        write_json(path.with_suffix(".json"), meta, default=str)
    return path


def _corrupt(path: Path, what: str, err: BaseException) -> CorruptFileError:
    return CorruptFileError(f"{path} is not a readable {what} file (truncated or corrupt: {err}); replace it with "
                            "a good copy (re-download, re-export or re-train it)")


def read_safetensors(path: str | Path, device: str = "cpu") -> tuple[dict[str, Any], dict[str, str]]:
    """``(tensors, header metadata)`` of a ``.safetensors`` file; ``FileNotFoundError`` / ``CorruptFileError`` name
    the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(str(path), "pt", device=device) as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type and OSError for torn files
        raise _corrupt(path, ".safetensors", e) from None
    return tensors, meta


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The header metadata of a ``.safetensors`` file (no tensors read); errors name the file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001
        raise _corrupt(path, ".safetensors", e) from None


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; ``CorruptFileError`` names the file and the position (never echoes its contents)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f"line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else "bad UTF-8"
        raise CorruptFileError(f"{path} is not valid JSON ({where}); replace it with a good copy") from None


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (POSIX ``kill(pid, 0)``; on Windows ``os.kill`` would terminate it, so a lock
    there is never taken for stale: the message tells the user to delete it)."""
    if pid <= 0:
        return False
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _secondary_process() -> bool:
    """True in a process other than rank 0 of a multi-process launch (it reads the launchers' environment)."""
    return any(os.environ.get(k, "0") not in ("", "0") for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


@contextlib.contextmanager
def output_lock(folder: str | Path, what: str = "run") -> Iterator[Path]:
    """Hold ``<folder>/.fewstep.lock`` (created with ``O_EXCL``, the pid inside) while the block runs.

    A second run into the same folder gets ``OutputLockedError`` naming the folder and the pid holding it; a lock
    left by a dead process is reclaimed with a message. The lock is removed on exit. In a multi-process launch
    (Lightning, torchrun, SLURM) only the first process takes it: the others are the same run.
    """
    d = check_writable_dir(folder)
    lock = d / ".fewstep.lock"
    if _secondary_process():
        yield lock
        return
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pid = -1
            if pid == os.getpid() or _pid_alive(pid):
                raise OutputLockedError(
                    f"another fewstep {what} (pid {pid}) is writing to {d} (lock file {lock}); wait for it to "
                    "finish or choose another output folder (if no such run exists, delete the lock file)") from None
            print(f"fewstep: removing the stale lock {lock} of a process that no longer runs (pid {pid})")
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        break
    else:
        raise OutputLockedError(f"could not take the lock {lock}; remove it if no fewstep run is using {d}")
    try:
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()

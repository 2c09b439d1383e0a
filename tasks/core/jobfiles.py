"""Reading what a start-up's job wrote, as the orchestrator (root on a site).

A job's folder is handed to the start-up's Unix user before the job starts (the Slurm
door's ``hand_over``), so anything in it may be a link the start-up's own code planted:
``metrics.json -> /path/of/another/start-up's/key.json``. The orchestrator reads such a
folder with the rights of root, and what it reads goes into Prefect logs, MLflow and the
model's documents, which the start-up can read back. So every read of a job's file here
refuses a link (``O_NOFOLLOW``) and anything but a regular file, and every tree that the
orchestrator copies or uploads is checked first, without following links (``os.fwalk``).
Files directly in a job's folder are safe from a swap of a folder above them: the job's
folder sits in one that only root can write (runs/train, runs/sweeps, ...).

What runs a start-up's own files (its model's class or pickle, git in its repository) runs
as the start-up's user (``as_user``: ``runuser`` with an environment of nothing but PATH,
HOME and the locale), never as root and never with the orchestrator's secrets.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import stat
from pathlib import Path

from aifactory.tasks.core.errors import ConfigError, TenancyError

READ_LIMIT = 64 * 2**20  # a manifest, metrics or log chunk: never a data set


class JobFileError(TenancyError):
    """A job's output that the orchestrator will not read: a link, or not a regular file."""


def _refused(path: str | os.PathLike[str], why: str) -> JobFileError:
    return JobFileError(f"job output {os.fspath(path)}: {why}; the orchestrator reads only "
                        "regular files that the job wrote (a link could point at files of the "
                        "site or of another start-up)")  # fmt: skip


def open_job_file(path: str | os.PathLike[str], under: str | os.PathLike[str] | None = None) -> int:
    """A read-only descriptor of the regular file ``path``, never through a link: in its last
    component, and (with ``under``, a folder the job cannot replace) in none of the folders
    between ``under`` and it either, each opened by descriptor. FileNotFoundError when it
    is absent; JobFileError when it is a link or not a regular file (a FIFO would block the
    flow, a device would read forever)."""
    link = "is reached through a symbolic link"
    if under is None:
        return _open_regular(os.fspath(path), None, path, link)
    rel = Path(path).relative_to(under)
    dir_fd = _open_dirs(list(rel.parts[:-1]), under, create=False, shown=path)
    try:
        return _open_regular(rel.name, dir_fd, path, link)
    finally:
        os.close(dir_fd)


def _open_regular(name: str, dir_fd: int | None, shown: str | os.PathLike[str],
                  link: str) -> int:  # fmt: skip
    """A read-only descriptor of the regular file ``name`` (in ``dir_fd``), never through a
    link (JobFileError ``link``) and never of anything but a regular file."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)  # fmt: skip
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refused(shown, link) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _refused(shown, "is not a regular file")
    return fd


def read_job_bytes(path: str | os.PathLike[str], limit: int = READ_LIMIT, offset: int = 0,
                   under: str | os.PathLike[str] | None = None) -> bytes:  # fmt: skip
    """At most ``limit`` bytes of a job's file from ``offset`` (see ``open_job_file``)."""
    fd = open_job_file(path, under)
    try:
        with os.fdopen(fd, "rb", closefd=False) as fh:
            fh.seek(offset)
            return fh.read(limit)
    finally:
        os.close(fd)


def read_job_text(path: str | os.PathLike[str], limit: int = READ_LIMIT,
                  under: str | os.PathLike[str] | None = None) -> str:  # fmt: skip
    return read_job_bytes(path, limit, under=under).decode("utf-8", errors="replace")


def check_job_tree(folder: str | os.PathLike[str]) -> list[Path]:
    """The regular files under a job's ``folder`` (or the file itself), after checking that
    nothing in it is a link or a special file; JobFileError otherwise. Walked by descriptor
    (``os.fwalk``), so a folder swapped for a link during the walk is not followed."""
    top = os.fspath(folder)
    st = os.lstat(top)
    if stat.S_ISLNK(st.st_mode):
        raise _refused(top, "is a symbolic link")
    if stat.S_ISREG(st.st_mode):
        return [Path(top)]
    if not stat.S_ISDIR(st.st_mode):
        raise _refused(top, "is not a regular file or folder")
    out: list[Path] = []
    for root, dirs, files, rootfd in os.fwalk(top, follow_symlinks=False):
        for name in dirs + files:
            mode = os.stat(name, dir_fd=rootfd, follow_symlinks=False).st_mode
            where = os.path.join(root, name)
            if stat.S_ISLNK(mode):
                raise _refused(where, "is a symbolic link")
            if stat.S_ISREG(mode):
                out.append(Path(where))
            elif not stat.S_ISDIR(mode):
                raise _refused(where, "is not a regular file or folder")
    return sorted(out)


def copy_job_tree(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Copy a job's file or folder ``src`` to ``dst`` (a folder of the orchestrator's own),
    every file opened by descriptor without following a link: what is then uploaded (MLflow)
    is what the job wrote, even if the job's folder changes meanwhile. Returns ``dst``."""
    top, out = os.fspath(src), Path(dst)
    st = os.lstat(top)
    if stat.S_ISLNK(st.st_mode):
        raise _refused(top, "is a symbolic link")
    if stat.S_ISREG(st.st_mode):
        out.parent.mkdir(parents=True, exist_ok=True)
        _copy_fd(open_job_file(top), out)
        return out
    if not stat.S_ISDIR(st.st_mode):
        raise _refused(top, "is not a regular file or folder")
    out.mkdir(parents=True, exist_ok=True)
    for root, dirs, files, rootfd in os.fwalk(top, follow_symlinks=False):
        rel = Path(root).relative_to(top)
        for name in dirs:
            if stat.S_ISLNK(os.stat(name, dir_fd=rootfd, follow_symlinks=False).st_mode):
                raise _refused(os.path.join(root, name), "is a symbolic link")
            (out / rel / name).mkdir(exist_ok=True)
        for name in files:
            fd = _open_regular(name, rootfd, os.path.join(root, name), "is a symbolic link")
            _copy_fd(fd, out / rel / name)
    return out


def _copy_fd(fd: int, dest: Path) -> None:
    """Copy the open file ``fd`` (closed after) to the new file ``dest``."""
    import shutil

    with os.fdopen(fd, "rb") as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out, 2**20)


def _open_dirs(parts: list[str], under: str | os.PathLike[str], create: bool,
               shown: str | os.PathLike[str] | None = None) -> int:  # fmt: skip
    """A descriptor of the folder ``under/parts...``, each step opened by descriptor without
    following a link (and made when ``create``); JobFileError (naming ``shown``, by default
    that folder) when a step is a link."""
    fd = os.open(under, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
            try:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=fd)  # fmt: skip
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise _refused(shown or os.path.join(os.fspath(under), *parts),
                                   "is reached through a symbolic link") from None  # fmt: skip
                raise
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_job_file(path: str | os.PathLike[str], data: bytes,
                   under: str | os.PathLike[str]) -> None:  # fmt: skip
    """Write ``data`` to ``path`` in a job's folder ``under`` (which the job's user owns) as
    root safely: its folders are made and opened by descriptor without following a link,
    the file is a new one of a random name (never opened through a link), then renamed into
    place (a link at ``path`` is replaced, not followed). Readers see all of it or none."""
    rel = Path(path).relative_to(under)
    fd = _open_dirs(list(rel.parts[:-1]), under, create=True)
    try:
        write_new_at(fd, rel.name, data)
    finally:
        os.close(fd)


def write_new_at(dir_fd: int, name: str, data: bytes, mode: int = 0o644,
                 durable: bool = True) -> None:  # fmt: skip
    """Write ``name`` in the folder ``dir_fd`` whole: a new file of a random name (never an
    existing one, never opened through a link), synced when ``durable``, then renamed into
    place (a link at ``name`` is replaced, not followed)."""
    import uuid

    tmp = f".aif-tmp-{uuid.uuid4().hex}"
    out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                  mode, dir_fd=dir_fd)  # fmt: skip
    try:
        with os.fdopen(out, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def replace_job_folder(staged: str | os.PathLike[str], name: str,
                       under: str | os.PathLike[str]) -> None:  # fmt: skip
    """Move the folder ``staged`` (in a folder only root writes) to ``under/name`` in one
    rename by descriptor: whatever the job put at that name (a link, an empty folder) is
    replaced, never followed."""
    fd = os.open(under, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            os.rename(staged, name, dst_dir_fd=fd)
        except NotADirectoryError:  # a link or a file there: removed itself, never followed
            os.unlink(name, dir_fd=fd)
            os.rename(staged, name, dst_dir_fd=fd)
    finally:
        os.close(fd)


# -- running a start-up's own files -------------------------------------------------------
def as_user(run_as: str, argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that run ``argv`` as ``run_as``."""
    try:
        home = pwd.getpwnam(run_as).pw_dir
    except KeyError:
        raise ConfigError(f"start-up Unix user {run_as!r} does not exist on this host "
                          "(startups.<id>.user)") from None  # fmt: skip
    env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": home, "LANG": "C.UTF-8",
           "USER": run_as, "LOGNAME": run_as}  # fmt: skip
    return ["runuser", "-u", run_as, "--", *argv], env


def owned_by(path: str | os.PathLike[str], user: str | None) -> bool:
    """Whether ``user`` (a Unix user name) owns ``path`` and is not this process's user."""
    if not user:
        return False
    try:
        uid = pwd.getpwnam(user).pw_uid
        return uid != os.getuid() and os.stat(path).st_uid == uid
    except (KeyError, OSError):
        return False

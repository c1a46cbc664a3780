"""Writing directories so that readers never see a half-written one.

A directory is assembled under a temporary name next to its target
(`.<name>.tmp-XXXX`, same file system) and renamed into place in one step.
Replacing an existing directory moves the old one aside first and puts it
back if the final rename fails, so a failed write never loses the previous
contents. A process killed between those two renames leaves the old
directory at `.<name>.old-XXXX`, never deleted.
"""

import contextlib
import os
import shutil
import tempfile
import uuid

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"


class NonFiniteError(ValueError):
    """Weights or optimizer state hold NaN or Inf (training diverged); they
    are never written, since nothing could load them back."""


def refuse_non_finite(counts: dict, what: str, target=None):
    """Raises `NonFiniteError` when any of `counts` (`{name: number of
    NaN/Inf values}`) is non-zero; `what` says whose values they are,
    `target` the path that was to be written."""
    bad = {name: n for name, n in counts.items() if n}
    if not bad:
        return
    shown = ", ".join(f"'{k}' ({n})" for k, n in list(bad.items())[:5])
    kept = f" at {target}" if target else " at the target path"
    raise NonFiniteError(
        f"{what} holds NaN or Inf values in {len(bad)} tensor(s): {shown}; "
        f"training has diverged. Nothing was written, and what was already"
        f"{kept} is unchanged."
    )


def write_bytes(path, data: bytes):
    """Writes `data` to `path` and flushes it to disk (no rename: use inside
    a staging directory)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def check_overwrite(target, overwrite) -> bool:
    """Checks `overwrite` for a write to `target`; returns whether `target`
    exists (and may then be replaced).

    Raises:
        TypeError: `overwrite` is not a bool (a string such as "no" would
            otherwise count as True and replace the file).
        FileExistsError: `target` exists and `overwrite` is False.
    """
    if not isinstance(overwrite, bool):
        raise TypeError(
            "overwrite must be a bool (True or False). Received: "
            f"overwrite={overwrite!r} of type {type(overwrite).__name__}"
        )
    if not os.path.lexists(target):
        return False
    if not overwrite:
        raise FileExistsError(
            f"{target} already exists. Pass overwrite=True to replace it."
        )
    return True


def check_replaceable(target, overwrite, marker, kind):
    """Fails unless `target` may be written: it must not exist, or
    `overwrite` is set and it is an empty directory or one holding
    `marker` (so that overwrite=True never replaces an unrelated folder).

    Args:
        target: the directory to write.
        overwrite: whether an existing directory of this kind may go.
        marker: a file name every directory of this kind contains.
        kind: what such a directory is called in messages.

    Raises:
        TypeError: `overwrite` is not a bool (a string such as "no" would
            otherwise count as True and replace the directory).
        FileExistsError: `target` exists and `overwrite` is False.
        ValueError: `target` exists and is not a directory of this kind.
    """
    if not check_overwrite(target, overwrite):
        return
    ours = os.path.isdir(target) and (
        not os.listdir(target) or os.path.isfile(os.path.join(target, marker))
    )
    if not ours:
        raise ValueError(
            f"{target} exists and is not {kind} (no {marker}); refusing to "
            "replace it even with overwrite=True."
        )


def make_dirs(directory, target=None):
    """Creates `directory` and its parents, as `os.makedirs`.

    Raises:
        NotADirectoryError: `directory` or a path above it is a file; the
            message names it (and `target`, what was to be written).
    """
    directory = os.path.abspath(os.fspath(directory))
    try:
        os.makedirs(directory, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = directory
        while not os.path.exists(blocker):
            blocker = os.path.dirname(blocker)
        raise NotADirectoryError(
            f"Cannot write {target or directory}: {blocker} is a file, not "
            "a directory."
        ) from None


def make_parents(target):
    """Creates the directories above `target` (see `make_dirs`)."""
    make_dirs(os.path.dirname(os.path.abspath(os.fspath(target))), target)


@contextlib.contextmanager
def staging_dir(target):
    """Yields a fresh temporary directory next to `target`.

    It is removed if the block raises; otherwise the caller commits it with
    `commit_dir`.
    """
    target = os.path.abspath(os.fspath(target))
    parent, name = os.path.split(target)
    make_parents(target)
    tmp = tempfile.mkdtemp(prefix=f".{name}{TMP_MARK}", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def staging_file(target, suffix=""):
    """Yields a temporary file path next to `target` (same file system,
    ending in `suffix`); when the block completes the file is renamed onto
    `target` in one step, and when it raises the file is removed, so
    `target` is either the old file or the complete new one."""
    target = os.path.abspath(os.fspath(target))
    parent, name = os.path.split(target)
    make_parents(target)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{name}{TMP_MARK}", suffix=suffix, dir=parent
    )
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(parent)


def commit_dir(tmp, target, overwrite=False):
    """Renames the staged `tmp` to `target`; removes `tmp` on failure.

    Args:
        tmp: a directory made by `staging_dir(target)`.
        target: the final path.
        overwrite: replace an existing `target` (which must be a directory).

    Raises:
        FileExistsError: `target` exists and `overwrite` is False.
        OSError: the rename failed; `target` is as it was before.
    """
    target = os.path.abspath(os.fspath(target))
    try:
        if not os.path.lexists(target):
            os.replace(tmp, target)
        elif not overwrite:
            raise FileExistsError(
                f"{target} already exists. Pass overwrite=True to replace it."
            )
        else:
            _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(os.path.dirname(target))


def _swap_in(tmp, target):
    parent, name = os.path.split(target)
    old = os.path.join(parent, f".{name}{OLD_MARK}{uuid.uuid4().hex[:12]}")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path):
    # Makes the rename itself durable; not every file system allows it.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

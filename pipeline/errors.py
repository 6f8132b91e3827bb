"""The one exception type a user can cause: the CLI prints it as a single line and exits non-zero."""
import errno
import json
import os
import re


class UserError(Exception):
    """A problem with the user's input, named along with what to do about it."""


_ERRNO_IN_TEXT = re.compile(r"errno = (\d+)|os error (\d+)")


def write_error(e: Exception, path: str, then: str = "") -> Exception:
    """A UserError for a failed write the user can fix (full disk, size limit, read-only folder, file in use),
    else `e` itself. h5py and safetensors do not always set errno: the number is then read from the message."""
    code = getattr(e, "errno", None)
    m = None if code else _ERRNO_IN_TEXT.search(str(e))
    code = code or (int(m.group(1) or m.group(2)) if m else None)
    if code == errno.ENOSPC:
        return UserError(f"the disk is full writing {path}; free some space or choose another --out{then}")
    if code == errno.EFBIG:
        return UserError(f"writing {path} went past the file size limit (ulimit -f); raise it or choose another "
                         f"--out{then}")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return UserError(f"cannot write {path}: {os.strerror(code)}; choose a writable --out")
    if code in (errno.EAGAIN, errno.EWOULDBLOCK):
        return UserError(f"{path} is locked by another process (another extract writing it?); wait for it to "
                         "finish or choose another --out")
    return e


def check_new_file(path: str, option: str = "--out", folder: bool = False) -> None:
    """Refuse, before any work, a path that cannot be written: one under a file, or (unless `folder`) an
    existing folder where a file is to go."""
    if not folder and os.path.isdir(path):
        raise UserError(f"{path} is a folder; give {option} a file name in it, e.g. {os.path.join(path, 'NAME.h5')}")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"cannot create {path}: {parent} is a file, not a folder; choose another {option}")


def read_json_file(path: str, folder: str, fmt: str, what: str) -> dict:
    """The JSON object at `path`, whose "format" must be `fmt`; else a UserError naming `folder` as not `what`."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        raise UserError(f"{folder} is not {what} ({os.path.basename(path)} has no format {fmt!r})")
    return obj

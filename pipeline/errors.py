"""The one exception type a user can cause (the CLI prints it as a single line and exits non-zero), and the
checks of what users hand in that more than one module makes."""
import errno
import json
import os
import re
import unicodedata


class UserError(Exception):
    """A problem with the user's input, named along with what to do about it.

        >>> import pipeline as bc
        >>> try:
        ...     bc.FeatureStore("no-such-file.h5")
        ... except bc.UserError as e:
        ...     print(e)
        features file not found: no-such-file.h5
    """


# What no text is made of: Python's whitespace and the invisible format characters (category Cf: zero-width
# space and joiners, BOM, soft hyphen, bidi marks), which tokenizers drop. The regexes say the same to pyarrow
# (RE2) and pydantic (Rust), whose \s is not Python's.
_INVISIBLE = r"\t\n\x0b\f\r\x1c-\x1f\x85\p{Z}\p{Cf}"
BLANK_RE = f"^[{_INVISIBLE}]*$"  # the whole text is invisible
VISIBLE_RE = f"[^{_INVISIBLE}]"  # the text has something to read


def is_blank(text: str) -> bool:
    """Whether `text` has nothing to read: empty, whitespace, or invisible format characters only (a zero-width
    space, a BOM). Such a text gives the encoder no tokens of its own, so it is skipped or refused as blank.

        >>> is_blank(" \u3000"), is_blank("\u200b\ufeff"), is_blank("\u200b好")
        (True, True, False)
    """
    s = text.strip()
    return not s or (unicodedata.category(s[0]) == "Cf"
                     and all(c.isspace() or unicodedata.category(c) == "Cf" for c in s))


def unicode_problem(texts) -> tuple[int, str] | None:
    """(position, what is wrong) of the first text in `texts` that is not Unicode text, or None. What is wrong
    is a lone surrogate: what Python makes of bytes that are not UTF-8 in command-line arguments, or of a
    JSON "\\ud800" escape. No tokenizer, HDF5 file or JSON output takes one.

        >>> unicode_problem(["好", "caf\\udce9"])
        (1, 'holds a lone surrogate (U+DCE9 at character 4), not Unicode text: bytes that are not UTF-8 decode to these; give it as UTF-8')
    """
    for i, t in enumerate(texts):
        if t.isascii():
            continue
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            return i, (f"holds a lone surrogate (U+{ord(t[e.start]):04X} at character {e.start + 1}), not Unicode "
                       "text: bytes that are not UTF-8 decode to these; give it as UTF-8")
    return None


def as_texts(texts) -> tuple[bool, list[str]]:
    """(whether one string was given, the texts as a list): a str is one text, not its characters. Refuses
    what no tokenizer takes: non-strings, and text that is not Unicode (`unicode_problem`).

        >>> as_texts("好"), as_texts(("好", "坏"))
        ((True, ['好']), (False, ['好', '坏']))
    """
    one = isinstance(texts, str)
    if not one and (texts is None or isinstance(texts, (bytes, dict)) or not hasattr(texts, "__iter__")):
        raise UserError(f"give a text or a list of texts, not {type(texts).__name__}")
    texts = [texts] if one else list(texts)
    bad = [t for t in texts if not isinstance(t, str)][:1]  # a list: the bad item may be None itself
    if bad:
        raise UserError(f"every text must be a str; got {type(bad[0]).__name__} {bad[0]!r:.40}")
    problem = unicode_problem(texts)
    if problem:
        raise UserError(("the text " if one else f"text {problem[0] + 1} ") + problem[1])
    return one, texts


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (a library's can run to a traceback), for a UserError."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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

"""Reading memdefragd.yaml safely: the file, then YAML, then the walk (config/schema.py).

PyYAML silently keeps the last of duplicate keys and knows nothing of our schema, so we
walk the composed node tree ourselves (config/walk.py): every message names the file, the
line, the key path and what to do, and all problems are reported at once (the first
MAX_ERRORS).

memdefragd runs as root, so the file is treated as hostile until proven otherwise:
`load_config` opens it the way OpenSSH opens its own files (trusted directories from / down,
no symbolic link, owner and mode checked on the open descriptor, a size limit before
parsing), and no message ever quotes what the file says, only where and what kind of value
(`memdefragd check-config /etc/shadow` must not print a password hash).
"""

from __future__ import annotations

import errno
import hashlib
import os
import pwd
import re
import stat
from dataclasses import replace

import yaml

from ..units import format_size
from .schema import Config, read_config
from .walk import MAX_VALUES, TooManyValues, Walk

DEFAULT_PATH = "/etc/memdefragd/memdefragd.yaml"
# 1 MiB: the example with 500 targets takes about 100 KB. Checked on the open file before a
# byte is read (a 50 MB file took minutes and 2 GiB to parse), and again while reading.
MAX_CONFIG_BYTES = 1 << 20
# A SafeLoader with libyaml underneath parses several times faster; same nodes, same marks.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ConfigError(Exception):
    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


def load_config(path: str | os.PathLike[str], *, check_owner: bool = True) -> Config:
    """Read and validate the config at `path`.

    With check_owner (always, except for files of this repository in tests) the file must be
    one that only root (or we) could have written, checked so that nothing can be swapped
    between the check and the read: see _read_trusted. Without it, any regular file is
    read (still within the size limit)."""
    path = os.fspath(path)
    data = _read_trusted(path) if check_owner else _read_plain(path)
    return parse_config(data, path)


def parse_config(text: str | bytes, path: str = "<config>") -> Config:
    """Validate a config's text (bytes: as read from the file, decoded here). Errors say
    line and column and what kind of value was found, never the text itself."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError([_too_big(path, len(text))])
    if isinstance(text, bytes):
        text = _decode(text, path)
    _check_characters(text, path)
    try:
        root = yaml.compose(text, Loader=_LOADER)
    except yaml.MarkedYAMLError as e:
        raise ConfigError([_syntax_error(e, path)]) from None
    except yaml.YAMLError as e:  # a ReaderError _check_characters did not foresee
        raise ConfigError(
            [f"{path}: YAML cannot read this file ({type(e).__name__}); save it as plain "
             "UTF-8 text"]
        ) from None  # fmt: skip
    except RecursionError:  # the pure-Python composer, without libyaml
        raise ConfigError([f"{path}: nested too deeply for a config"]) from None
    v = Walk(path)
    try:
        cfg = read_config(v, root)
    except TooManyValues:
        raise ConfigError(
            [f"{path}: expands to more than {MAX_VALUES:,} values (YAML aliases repeating "
             "whole lists?); write the config out without aliases"]
        ) from None  # fmt: skip
    if v.errors:
        more = v.problems - len(v.errors)
        if more:
            v.errors.append(f"{path}: ... and {more} more error(s) not shown; fix these first")
        raise ConfigError(v.errors)
    return replace(cfg, sha256=hashlib.sha256(text.encode()).hexdigest())


_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO
_O_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC  # a symlink: ENOTDIR


def _read_trusted(path: str) -> bytes:
    """The file's bytes, read so that no one but root (or our euid) could have chosen them.

    As OpenSSH's safe_path, but on descriptors, so nothing can be swapped between a check
    and the use: the directories of the file's real path are opened one by one from /, each
    relative to the last and without following a link, and each is checked on its
    descriptor (owned by root or us; writable by no one else, unless it is sticky like /tmp,
    where others cannot rename or remove what they do not own). The file is then opened in
    the last one without following a symbolic link (whoever can change a link chooses what
    we read), and its type, owner, mode and size are checked on the open descriptor, which
    is the only one read, at most MAX_CONFIG_BYTES + 1 bytes of it. Symbolic links among the
    directories are resolved first (realpath) and the result walked as above: a link in an
    untrusted directory is caught there, one that changes under us fails the walk."""
    parent, name = os.path.split(os.path.abspath(path))
    if not name:
        raise ConfigError([f"{path}: is a directory; give the config file's path"])
    dirfd = _open_trusted_dirs(os.path.realpath(parent), path)
    try:
        try:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
            _check_type(st, path)  # before opening: opening a device can do things
            fd = os.open(name, _O_READ, dir_fd=dirfd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ConfigError(
                    [f"{path}: refusing a symbolic link: whoever can change the link chooses "
                     "what memdefragd (root) reads; give the real file's path instead (see: "
                     f"readlink -f {path})"]
                ) from None  # fmt: skip
            raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    finally:
        os.close(dirfd)
    try:
        st = os.fstat(fd)
        _check_type(st, path)
        _check_owner_and_mode(st, path)
        return _read_fd(fd, st, path)
    finally:
        os.close(fd)


def _open_trusted_dirs(real_dir: str, path: str) -> int:
    """A descriptor of `real_dir` (absolute, no links) reached from / by descriptors, every
    directory on the way checked by _check_dir."""
    where = "/"
    fd = os.open(where, _O_DIR)
    try:
        _check_dir(os.fstat(fd), where, path)
        for part in real_dir.split("/"):
            if not part:
                continue
            where = os.path.join(where, part)
            try:
                nfd = os.open(part, _O_DIR, dir_fd=fd)
            except OSError as e:
                if e.errno == errno.ENOTDIR:  # realpath said directory; now it is not
                    msg = f"{where} changed while it was checked (now a link or a file)"
                    raise ConfigError([f"{path}: cannot read: {msg}; try again"]) from None
                raise ConfigError([f"{path}: cannot read: {e.strerror} ({where})"]) from None
            os.close(fd)
            fd = nfd
            _check_dir(os.fstat(fd), where, path)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _trusted_uid(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _owner(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _others_can_write(st: os.stat_result) -> bool:
    """Writable by users other than the owner: others, or a group other than root's."""
    return bool(st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP and st.st_gid != 0))


def _check_dir(st: os.stat_result, where: str, path: str) -> None:
    if not _trusted_uid(st.st_uid):
        raise ConfigError(
            [f"{path}: refusing a config under {where}, a directory owned by "
             f"{_owner(st.st_uid)}, neither root nor us: its owner could swap the file; "
             f"fix with: chown root {where} (or keep the config in a directory only root "
             "can write, such as /etc/memdefragd)"]
        )  # fmt: skip
    if _others_can_write(st) and not st.st_mode & stat.S_ISVTX:
        raise ConfigError(
            [f"{path}: refusing a config under {where}, a directory other users can write "
             f"to (mode {stat.filemode(st.st_mode)}): they could replace the file; fix "
             f"with: chmod go-w {where}"]
        )  # fmt: skip


def _check_type(st: os.stat_result, path: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise ConfigError([f"{path}: is {kind}; give the path of the YAML config file"])


def _check_owner_and_mode(st: os.stat_result, path: str) -> None:
    if _others_can_write(st):
        raise ConfigError(
            [
                f"{path}: refusing a config file writable by other users (mode "
                f"{stat.filemode(st.st_mode)}): memdefragd runs as root and acts on what it "
                f"says; fix with: chmod go-w {path}"
            ]
        )
    if not _trusted_uid(st.st_uid):
        raise ConfigError(
            [
                f"{path}: refusing a config file owned by {_owner(st.st_uid)}, neither root "
                f"nor us; fix with: chown root {path}"
            ]
        )


def _read_plain(path: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    try:
        st = os.fstat(fd)
        _check_type(st, path)
        return _read_fd(fd, st, path)
    finally:
        os.close(fd)


def _too_big(path: str, size: int) -> str:
    return (
        f"{path}: refusing a config of {format_size(size)}: the limit is "
        f"{format_size(MAX_CONFIG_BYTES)} (500 targets take about 100 KB); is this the "
        "right file?"
    )


def _read_fd(fd: int, st: os.stat_result, path: str) -> bytes:
    """At most MAX_CONFIG_BYTES + 1 bytes: the size is checked before reading and again
    after, for a file that grows in between."""
    if st.st_size > MAX_CONFIG_BYTES:
        raise ConfigError([_too_big(path, st.st_size)])
    chunks: list[bytes] = []
    got = 0
    try:
        while got <= MAX_CONFIG_BYTES:
            chunk = os.read(fd, MAX_CONFIG_BYTES + 1 - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    if got > MAX_CONFIG_BYTES:
        raise ConfigError([_too_big(path, got)])
    return b"".join(chunks)


def _line_column(data: bytes, offset: int) -> tuple[int, int]:
    """1-based line and column (in characters) of byte `offset`, all before it valid UTF-8."""
    start = data.rfind(b"\n", 0, offset) + 1
    return data.count(b"\n", 0, offset) + 1, len(data[start:offset].decode()) + 1


def _decode(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line, col = _line_column(data, e.start)
        raise ConfigError(
            [f"{path}:{line}:{col}: not valid UTF-8 (byte {e.start + 1} of the file); the "
             "config must be UTF-8 text: re-save it as UTF-8, or is this the right file?"]
        ) from None  # fmt: skip


# What YAML accepts in a stream (PyYAML's Reader.NON_PRINTABLE): found here first, so that
# the error has a line and column whichever parser (libyaml or Python) is in use.
_NON_PRINTABLE = re.compile(
    "[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"
)


def _check_characters(text: str, path: str) -> None:
    m = _NON_PRINTABLE.search(text)
    if m:
        i = m.start()
        line, col = text.count("\n", 0, i) + 1, i - text.rfind("\n", 0, i)
        raise ConfigError(
            [f"{path}:{line}:{col}: a control character, which YAML does not allow; the "
             "config must be plain text: remove it, or is this the right file?"]
        )  # fmt: skip


# PyYAML's messages quote what it found ("found character '%' that cannot start any
# token", "found undefined alias 'x'"): file text. Every quoted part is dropped but YAML's
# own punctuation and token names ("expected ',' or ']'", "but found '<block end>'").
_QUOTED = re.compile(r"'(?:[^'\\\n]|\\.)*'" r'|"(?:[^"\\\n]|\\.)*"')
_YAML_WORDS = re.compile(r"""'(?:[-,:?!\[\]{}|>]|<[a-z ]+>)'""")


def _redact(message: str | None) -> str:
    if not message:
        return ""
    kept = _QUOTED.sub(lambda m: m[0] if _YAML_WORDS.fullmatch(m[0]) else "", message)
    return re.sub(r" ([;,)])", r"\1", " ".join(kept.split())).rstrip(" ,:")


def _syntax_error(e: yaml.MarkedYAMLError, path: str) -> str:
    mark = e.problem_mark or e.context_mark
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
    msg = f"{where}: YAML syntax: {_redact(e.problem) or 'not valid YAML'}"
    context = _redact(e.context)
    if context and e.context_mark and e.context_mark is not mark:
        msg += f" ({context} at line {e.context_mark.line + 1})"
    return msg

"""Safe writing for the whole package, in one place: atomic files, atomic result folders, and the rule.

The rule: ddm4d never deletes or overwrites a file it did not write. A result folder that
`ddm4d generate` replaces as a whole must be new, empty, or hold nothing but an earlier result: its
manifest (report.json) and the files that manifest lists. Anything else is refused before any work.

Every write goes through :func:`atomic_write` (a temporary file in the same folder, fsync, the usual
permissions, os.replace), so a reader never sees a partial file and a crash leaves the old one.
What a killed run leaves beside a result is named so it can be recognised (``.NAME.ddm4d-…tmp``,
and a marker file inside temporary folders) and is cleaned by the next run into the same folder;
nothing else is.

Kept free of torch, numpy and SimpleITK, so `ddm4d phantom` and the Slicer GUI stay light.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import threading
import warnings
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, TypeVar

from .errors import InputError

__all__ = [
    "MANIFEST", "MARKER", "atomic_write", "write_text", "write_bytes", "is_temporary_file",
    "remove_temporary_files", "check_writable", "check_replaceable", "replace_folder", "written_files",
    "manifest", "temporary_folder", "discard_temporary_folder", "remove_leftovers", "publish_into",
    "check_own_results", "process_alive", "umask", "make_public",
]

#: what names every temporary file and folder ddm4d makes: ``.NAME.ddm4d-XXXXXXXX.tmp[.ext]`` (files),
#: ``.NAME.ddm4d-PID-XXXXXXXX.tmp`` (folders) and ``.NAME.ddm4d-PID-XXXXXXXX-old.tmp`` (a result set aside)
TEMPORARY_TAG = "ddm4d-"
TEMPORARY_SUFFIX = ".tmp"
#: a file inside every temporary folder, written only by ddm4d; its first line starts with MARKER_TEXT
MARKER = ".ddm4d-temporary"
MARKER_TEXT = "ddm4d temporary folder"
#: the manifest of a result folder: a JSON object with "format": RESULT_FORMAT and "files", every
#: other file (relative paths); see manifest()
MANIFEST = "report.json"
MANIFEST_FILES = "files"
RESULT_FORMAT = "ddm4d-result"
#: what a manifest written before RESULT_FORMAT (by an older ddm4d generate) always holds
_LEGACY_KEYS = {"gammas", "frames", "fields"}
#: the random part of tempfile's names (tempfile._RandomNameSequence: 8 of [a-z0-9_])
_RANDOM = "[a-z0-9_]{8}"
_TEMPORARY_FILE = re.compile(rf"\..+\.{TEMPORARY_TAG}{_RANDOM}{re.escape(TEMPORARY_SUFFIX)}(\.[A-Za-z0-9.]+)?")
SHOWN_NAMES = 3  # foreign names quoted in a refusal

_UMASK_LOCK = threading.Lock()
T = TypeVar("T")


# ---------------------------------------------------------------------------------------- permissions

def umask() -> int:
    """The process umask. Reading it means setting it, so threads writing files (generate's writer
    pool) take turns, or one could read the 0 another set and leave it in place."""
    with _UMASK_LOCK:
        value = os.umask(0)
        os.umask(value)
    return value


def make_public(path: str | os.PathLike) -> None:
    """Give a temporary file the mode a plain open() would have (0666 less the umask)."""
    os.chmod(path, 0o666 & ~umask())


def _make_public_folder(path: Path) -> None:
    """mkdtemp makes private (0700) folders; a result folder gets the mode a plain mkdir gives."""
    os.chmod(path, 0o777 & ~umask())


def process_alive(pid: int) -> bool:
    """A live process on this machine (a zombie, killed but not yet reaped, counts as dead).

    psutil (a dependency) on every platform; without it, signal 0 where that only probes (POSIX: on
    Windows os.kill would end the process)."""
    if pid <= 0:
        return False
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
        except psutil.AccessDenied:
            return True
    if os.name == "nt":
        return True  # cannot tell safely: assume alive, so nothing of a running process is touched
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


# ---------------------------------------------------------------------------------------------- files

def atomic_write(path: str | os.PathLike, write: Callable[[str], object], suffix: str = "") -> Path:
    """Call write(tmp_path) on a temporary file beside `path`, fsync it, give it the usual
    permissions and rename it over `path`: a reader never sees a partial file, a crash leaves the old
    one. `suffix` ends the temporary name, for writers that pick the format by extension (".nii.gz").
    Parent folders are created. Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{TEMPORARY_TAG}", suffix=TEMPORARY_SUFFIX + suffix,
                               dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        make_public(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding=encoding))


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def is_temporary_file(name: str) -> bool:
    """A temporary file of :func:`atomic_write` (left behind only when its process was killed)."""
    return _TEMPORARY_FILE.fullmatch(name) is not None


def remove_temporary_files(folder: str | os.PathLike) -> list[Path]:
    """Remove what killed writes left in `folder` (call it only while no other process writes there,
    e.g. under a lock); nothing else is touched."""
    removed = []
    for path in Path(folder).iterdir():
        if is_temporary_file(path.name) and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# ------------------------------------------------------------------------------------- output folders

def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(path.anchor or ".")


def _probe(folder: Path, path: Path, option: str) -> None:
    """Write permission, tested by writing: access() says yes to root on a read-only or virtual file
    system (/proc, /sys) and mode bits say nothing of those."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{TEMPORARY_TAG}probe-", dir=folder))
    except OSError as err:
        why = err.strerror or type(err).__name__
        raise InputError(f"{option} {path} cannot be written ({why} in {folder}); choose a folder you can "
                         "write to") from None


def _real(path: Path, option: str) -> Path:
    """`path` with symbolic links resolved; a link to nothing is refused rather than guessed at."""
    if path.is_symlink() and not path.exists():
        raise InputError(f"{option} {path} is a symbolic link to {os.readlink(path)}, which does not exist; "
                         "create that folder or choose another folder")
    real = path.resolve()
    if real.exists() and not real.is_dir():
        raise InputError(f"{option} {path} exists and is a file; choose a folder")
    return real


def check_writable(path: str | os.PathLike, option: str = "--out") -> Path:
    """Before any work: a folder that a command writes INTO (it never replaces the folder) must be a
    folder, or creatable, and writable. Returns the path with symbolic links resolved."""
    real = _real(Path(path).expanduser(), option)
    base = _nearest_existing(real)
    if not base.is_dir():
        raise InputError(f"cannot create {option} {path}: {base} is a file; choose another folder")
    _probe(base, Path(path), option)
    return real


def _inside(rel: str) -> PurePosixPath | None:
    """A manifest entry as a relative path that stays inside its folder, else None (never trusted)."""
    p = PurePosixPath(rel)
    if p.is_absolute() or not p.parts or any(part in ("", ".", "..") for part in p.parts):
        return None
    return p


def written_files(folder: str | os.PathLike, home: str | os.PathLike | None = None) -> set[str] | None:
    """Relative paths of what ddm4d wrote in a result folder: its manifest and the files the manifest
    lists; None when the folder holds no readable ddm4d manifest.

    The manifest's "files" list (relative paths) is the record; a manifest without it (written by an
    older ddm4d) lists the absolute paths of its files among its values, under `home`: where the
    folder was written (default: where it is)."""
    folder = Path(folder)
    try:
        report = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(report, dict):
        return None
    listed = report.get(MANIFEST_FILES)
    if report.get("format") == RESULT_FORMAT and isinstance(listed, list):
        entries = [str(v) for v in listed if isinstance(v, str)]
    elif "format" in report or not _LEGACY_KEYS <= report.keys():
        return None  # someone else's report.json
    else:
        here = Path(home or folder).resolve()
        entries = []
        for value in _strings(report):
            if os.path.isabs(value):
                try:
                    entries.append(Path(value).relative_to(here).as_posix())
                except ValueError:
                    pass
    ours = {str(p) for p in map(_inside, entries) if p is not None}
    return ours | {MANIFEST}


def manifest(folder: str | os.PathLike) -> dict[str, object]:
    """What a manifest must hold for :func:`written_files` to recognise the folder's files as ours:
    merge it into the report, written last into the folder."""
    folder = Path(folder)
    listed = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                    if p.is_file() and p.name not in (MARKER, MANIFEST))
    return {"format": RESULT_FORMAT, MANIFEST_FILES: listed}


def _strings(value) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _foreign(folder: Path, ours: set[str]) -> list[str]:
    """Everything in `folder` that is not in `ours` (relative file paths), nor a folder holding only
    those; symbolic links count as files, and a linked folder is never walked into."""
    allowed_dirs = {str(PurePosixPath(rel).parent) for rel in ours}
    allowed_dirs |= {str(p) for rel in ours for p in PurePosixPath(rel).parents}
    foreign = []
    for root, dirs, names in os.walk(folder, followlinks=False):
        rel_root = Path(root).relative_to(folder)
        for name in sorted(dirs):
            rel = (rel_root / name).as_posix()
            if (Path(root) / name).is_symlink() or rel not in allowed_dirs:
                foreign.append(rel + "/")
        dirs[:] = [d for d in dirs if (rel_root / d).as_posix() in allowed_dirs and not (Path(root) / d).is_symlink()]
        foreign += [(rel_root / n).as_posix() for n in sorted(names) if (rel_root / n).as_posix() not in ours]
    return foreign


def _result_or_empty(folder: Path, home: Path | None = None) -> list[str]:
    """What keeps `folder` from being replaced: [] when it is empty or holds only an earlier result."""
    return _foreign(folder, written_files(folder, home) or set())


def _refusal(option: str, path: Path, command: str, foreign: list[str]) -> InputError:
    shown = ", ".join(foreign[:SHOWN_NAMES]) + (f" and {len(foreign) - SHOWN_NAMES} more"
                                                if len(foreign) > SHOWN_NAMES else "")
    return InputError(f"{option} {path} holds files that {command} did not write ({shown}); choose an empty or "
                      f"new folder ({command} replaces only a folder holding nothing but its own earlier result)")


def check_replaceable(path: str | os.PathLike, option: str = "--out", command: str = "ddm4d generate") -> Path:
    """Before any work, the rule for a folder that is replaced as a whole: it must be new, empty or
    hold only an earlier result, and it and the folder beside it must be writable. A symbolic link is
    followed (the folder it points to is what gets replaced; the link stays). Returns that folder."""
    given = Path(path).expanduser()
    real = _real(given, option)
    if real.is_dir():
        foreign = _result_or_empty(real)
        if foreign:
            raise _refusal(option, given, command, foreign)
        _probe(real, given, option)
    base = _nearest_existing(real.parent)
    if not base.is_dir():
        raise InputError(f"cannot create {option} {given}: {base} is a file; choose another folder")
    _probe(base, given, option)
    return real


def temporary_folder(final: str | os.PathLike) -> Path:
    """A new, marked temporary folder beside `final` (same file system, so a rename is atomic)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{TEMPORARY_TAG}{os.getpid()}-", suffix=TEMPORARY_SUFFIX,
                                dir=final.parent))
    _make_public_folder(tmp)
    (tmp / MARKER).write_text(f"{MARKER_TEXT} of {final}\npid {os.getpid()} host {socket.gethostname()}\n",
                              encoding="utf-8")
    return tmp


def _marker_host(folder: Path) -> str | None:
    """The machine named in a temporary folder's marker; None when the folder has no marker of ours."""
    try:
        with open(folder / MARKER, encoding="utf-8") as f:
            first, second = f.readline(), f.readline().split()
    except (OSError, UnicodeDecodeError):
        return None
    if not first.startswith(MARKER_TEXT):
        return None
    return second[3] if len(second) == 4 and second[2] == "host" else ""


def _marked(folder: Path) -> bool:
    return _marker_host(folder) is not None


def discard_temporary_folder(tmp: str | os.PathLike) -> None:
    """Remove a temporary folder of ours (marked); anything else is left alone."""
    tmp = Path(tmp)
    if tmp.is_dir() and not tmp.is_symlink() and _marked(tmp):
        shutil.rmtree(tmp, ignore_errors=True)


def _leftover_pattern(final: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(final.name)}\.{TEMPORARY_TAG}(\d+)-{_RANDOM}(-old)?{re.escape(TEMPORARY_SUFFIX)}")


def remove_leftovers(final: str | os.PathLike) -> list[Path]:
    """Remove what killed runs into `final` left beside it: marked temporary folders (a half-written
    result: all of it ours), and finished or set-aside results never swapped in (by the rule: their
    manifest and listed files only). A folder of a process still running, or holding anything else,
    stays."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    pattern = _leftover_pattern(final)
    removed = []
    for entry in final.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match is None or entry.is_symlink() or not entry.is_dir():
            continue
        pid, host = int(match[1]), _marker_host(entry)
        if pid == os.getpid() or process_alive(pid) or host not in (None, socket.gethostname()):
            continue  # a run still writing (here, or on another machine sharing the folder)
        if host is not None:
            shutil.rmtree(entry, ignore_errors=True)
        elif written_files(entry, final) is not None and not _result_or_empty(entry, final):
            _remove_result(entry, final)
        else:
            continue
        removed.append(entry)
    return removed


def _remove_result(folder: Path, home: Path) -> None:
    """Delete an earlier result (written as `home`): the files its manifest lists, the manifest, the
    folders they were in, the folder. What is not ours stays (with a warning)."""
    ours = written_files(folder, home) or set()
    for rel in sorted(ours) + [MARKER]:
        try:
            (folder / rel).unlink()
        except OSError:  # gone already, or not a file: the rmdir below then keeps the folder
            pass
    dirs = sorted({p for rel in ours for p in PurePosixPath(rel).parents if str(p) != "."},
                  key=lambda p: len(p.parts), reverse=True)
    try:
        for d in dirs:
            if (folder / d).is_dir():
                os.rmdir(folder / d)
        os.rmdir(folder)
    except OSError:
        warnings.warn(f"kept {folder}: it holds files ddm4d did not write", stacklevel=3)


def replace_folder(path: str | os.PathLike, fill: Callable[[Path, Path], T], option: str = "--out",
                   command: str = "ddm4d generate") -> T:
    """Write a result folder atomically: fill(tmp, final) writes it into a temporary folder beside
    `path` (it must write the manifest last, listing every other file it wrote), which then replaces
    `path` as a whole. The rule is checked first (:func:`check_replaceable`) and again at the swap;
    leftovers of killed runs into the same folder are cleaned. Returns what fill returned."""
    real = check_replaceable(path, option, command)
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"{option} {path} cannot be created ({err.strerror}); choose a folder you can write "
                         "to") from None
    remove_leftovers(real)
    tmp = temporary_folder(real)
    try:
        value = fill(tmp, real)
        (tmp / MARKER).unlink()
        _swap(tmp, real, Path(path), option, command)
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # made by this call: everything in it is ours
        raise
    return value


def _swap(tmp: Path, real: Path, given: Path, option: str, command: str) -> None:
    if not real.exists():
        try:
            os.replace(tmp, real)
            return
        except OSError:
            if not real.exists():
                raise
    old = tmp.with_name(tmp.name[:-len(TEMPORARY_SUFFIX)] + "-old" + TEMPORARY_SUFFIX)
    os.replace(real, old)
    foreign = _result_or_empty(old, real)
    if foreign:  # something was added while the result was computed: put the folder back untouched
        os.replace(old, real)
        raise _refusal(option, given, command, foreign)
    os.replace(tmp, real)
    _remove_result(old, real)


def results_paths(stem: str | os.PathLike) -> tuple[Path, Path]:
    """STEM.json and STEM.md. The suffixes are added, not swapped in: `--out motion_s0.5` is
    motion_s0.5.json, never motion_s0.json, the file of another run (`--out x.json` or `x.md` is x)."""
    stem = Path(stem)
    if stem.suffix in (".json", ".md"):
        stem = stem.with_suffix("")
    return stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".md")


def check_results(stem: str | os.PathLike, ours: Callable[[object], bool], option: str = "--out") -> None:
    """check_own_results for a benchmark's STEM.json and STEM.md (what write_results writes)."""
    check_own_results(*results_paths(stem), ours=ours, option=option)


def write_results(stem: str | os.PathLike, record: object, markdown: str) -> None:
    """A benchmark's record as STEM.json and its table as STEM.md (check_own_results first)."""
    record_path, table_path = results_paths(stem)
    write_text(record_path, json.dumps(record, indent=2))
    write_text(table_path, markdown)


def publish_into(staging: str | os.PathLike, out: str | os.PathLike) -> None:
    """Move the files of a temporary folder into `out`: the whole folder when `out` is new, else file
    by file (each rename atomic), so files of `out` with other names stay."""
    staging, out = Path(staging), Path(out)
    if not out.exists():
        (staging / MARKER).unlink(missing_ok=True)
        try:
            os.replace(staging, out)
            return
        except OSError:
            out.mkdir(parents=True, exist_ok=True)
    for item in staging.iterdir():
        if item.name != MARKER:
            os.replace(item, out / item.name)
    (staging / MARKER).unlink(missing_ok=True)
    staging.rmdir()


def check_own_results(record: str | os.PathLike, *others: str | os.PathLike, ours: Callable[[object], bool],
                      option: str = "--out") -> None:
    """Before a long run that rewrites result files under fixed names (a JSON record and its twins,
    e.g. a Markdown table): they must be new, or the record must be one this writer wrote (`ours`
    says so from its content); the twins go with their record."""
    record = Path(record)
    existing = [Path(p) for p in (record, *others) if os.path.lexists(p)]
    if not existing:
        return
    try:
        content = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        content = None
    if content is None or not ours(content):
        raise InputError(f"{option}: {existing[0]} exists and was not written by this program; choose another "
                         "name or move that file")

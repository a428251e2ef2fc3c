"""Small file helpers: atomic writes, output-directory ownership, JSONL reading with errors that name file and line.

Three rules keep users' files safe (docs/reliability.md says why):

* **Atomic.** Directories are built under a temporary sibling ``.NAME.tmp-PID@HOST.XXXX`` and renamed
  into place; JSON is written to a temporary file and renamed. A crash leaves the old artifact or
  the new one. The PID and host in the name let a later run remove what a killed one left
  (:func:`remove_stale_temps`).
* **Owned.** Every output directory a command creates carries a marker file, ``.esft-output.json``,
  naming the command. Replacing a directory (``overwrite``) needs that marker, of the same command:
  the tool never deletes a directory it did not make.
* **Apart from the inputs.** An output may not be an input of the same command, lie inside an input
  directory, or (when it is replaced) contain one (:func:`check_output`).

Files follow the umask (``tempfile`` creates 0600 / 0700; they are widened to what ``open`` would give).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator


class DataError(ValueError):
    """Bad input data; the message names the file (and line) at fault."""


class OutputError(ValueError):
    """An output path that would destroy or change something the tool did not write."""


MARKER = ".esft-output.json"


def _umask() -> int:
    old = os.umask(0o022)  # reading the umask means setting it: put the old value straight back
    os.umask(old)
    return old


def follow_umask(path: str | os.PathLike, is_dir: bool) -> None:
    """Give a file or directory made by ``tempfile`` (0600 / 0700) the mode ``open`` / ``mkdir`` would have."""
    with contextlib.suppress(OSError):
        os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "", socket.gethostname().split(".")[0]) or "host"


# .NAME.tmp-PID@HOST.XXXX (or .old-): a temporary sibling made by atomic_dir / publish_dir
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]+)\.")


def _temp_prefix(final: Path, kind: str) -> str:
    return f".{final.name}.{kind}-{os.getpid()}@{_host()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temps(parent: str | os.PathLike) -> list[Path]:
    """Remove temporary directories in ``parent`` that a killed esft process on this host left behind.

    Only names of the form ``.NAME.tmp-PID@HOST.XXXX`` / ``.NAME.old-PID@HOST.XXXX`` whose HOST is
    this one and whose PID no longer runs are removed; others (a live writer, another node of a
    shared filesystem) are left alone. Returns what was removed.
    """
    parent = Path(parent)
    removed = []
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        m = _TEMP.match(p.name)
        if not m or m["host"] != _host() or int(m["pid"]) == os.getpid() or _alive(int(m["pid"])):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        removed.append(p)
    if removed:
        import logging

        logging.getLogger(__name__).warning("removed %d temporary item(s) left by a killed run in %s: %s",
                                            len(removed), parent, ", ".join(p.name for p in removed))
    return removed


def _resolve(p: str | os.PathLike) -> Path:
    return Path(p).expanduser().resolve()


def check_output(out: str | os.PathLike, inputs: dict[str, str | os.PathLike | None], what: str = "output") -> None:
    """Refuse an output path that is one of the inputs or lies inside an input directory.

    ``inputs`` maps a description ("model", "train_data", ...) to a path (None entries are skipped).
    Writing there would change the input itself; replacing it would delete it.
    """
    o = _resolve(out)
    for name, path in inputs.items():
        if not path:
            continue
        i = _resolve(path)
        if o == i:
            raise OutputError(f"{what} {out} is the {name} ({path}): writing there would destroy it; "
                              f"choose another {what}")
        if i in o.parents and i.is_dir():
            raise OutputError(f"{what} {out} lies inside the {name} directory ({path}): writing there would "
                              f"change that input; choose a {what} outside it")


def claim_output_dir(out: str | os.PathLike, command: str, inputs: dict[str, str | os.PathLike | None],
                     overwrite: bool, what: str = "output directory", remove: bool = True) -> Path:
    """Check an output directory before any work, and (``remove``) empty it when ``overwrite`` allows.

    * missing or empty: fine (created, with this command's marker);
    * holding files, without ``overwrite``: FileExistsError;
    * holding files, with ``overwrite``: replaced only if it carries the marker of ``command`` (the
      tool made it) and contains none of ``inputs``; otherwise OutputError naming why.

    Call it before loading anything, so a refusal costs nothing. With ``remove=False`` the checks are
    made but nothing is deleted (the caller replaces the directory atomically later).
    """
    out = Path(out)
    check_output(out, inputs, what)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{what} {out} is a file, not a directory; choose another {what}")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty: pass overwrite to replace it, or choose another "
                                  f"{what}")
        check_replaceable(out, command, inputs, what)
        if remove:
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {out} is not writable by this user; choose another {what}")
    mark_output_dir(out, command)
    return out


# Outputs written before the marker existed are still recognised by files only that command writes.
LEGACY_SIGNS = {"train": ("config.yaml", "train_log.jsonl"), "merge": ("esft_merge.json",),
                "demo": ("summary.json", "expert_cfg.json", "scores.json")}


def check_replaceable(out: Path, command: str, inputs: dict[str, str | os.PathLike | None],
                      what: str = "output directory") -> None:
    """Refuse to replace a directory this tool did not write with ``command``, or one holding an input."""
    o = _resolve(out)
    for name, path in inputs.items():
        if path and o in _resolve(path).parents:
            raise OutputError(f"{what} {out} contains the {name} ({path}): replacing it would delete that input; "
                              f"choose another {what}")
    made_by = read_marker(out)
    signs = LEGACY_SIGNS.get(command)
    if made_by is None and signs and all((out / f).is_file() for f in signs):
        made_by = command
    if made_by is None:
        raise OutputError(f"{out} was not written by esft (it has no {MARKER}), so it is not replaced: remove it "
                          f"yourself if it can go, or choose another {what}")
    if made_by != command:
        raise OutputError(f"{out} holds the output of `esft {made_by}`, not of `esft {command}`, so it is not "
                          f"replaced: remove it yourself if it can go, or choose another {what}")


def read_marker(d: str | os.PathLike) -> str | None:
    """The command that wrote directory ``d`` (its marker), or None."""
    try:
        meta = json.loads((Path(d) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return meta.get("command") if isinstance(meta, dict) and isinstance(meta.get("command"), str) else None


def mark_output_dir(d: str | os.PathLike, command: str) -> None:
    """Mark ``d`` as written by ``esft <command>`` (so that ``overwrite`` may later replace it)."""
    if read_marker(d) != command:
        write_json_atomic(Path(d) / MARKER, {"command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (new names, renames) to disk; a no-op where directories cannot be opened."""
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


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every directory (deepest first), so a rename publishes whole files."""
    dirs = [root]
    for p in root.rglob("*"):
        if p.is_dir():
            dirs.append(p)
        elif p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        fsync_dir(d)


def find_nonfinite(obj, where: str = "") -> str | None:
    """The path (e.g. ``scores.layer_3[5]``) of the first NaN or infinite float in a JSON-like object, or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "(top level)"
    if isinstance(obj, dict):
        items = ((f"{where}.{k}" if where else str(k), v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    for w, v in items:
        found = find_nonfinite(v, w)
        if found:
            return found
    return None


def dumps_strict(obj, indent: int | None = None, what: str = "JSON") -> str:
    """``json.dumps`` that refuses NaN and Infinity (not JSON: other tools' parsers reject them), naming the field."""
    bad = find_nonfinite(obj)
    if bad:
        raise ValueError(f"{what}: refusing to write a non-finite number at {bad} (NaN/Infinity are not JSON)")
    return json.dumps(obj, indent=indent, allow_nan=False)


def write_json_atomic(path: str | os.PathLike, obj, indent: int | None = 1) -> None:
    """Write JSON so that a crash leaves either the old file or the new one, never half of one.

    NaN and Infinity are refused (ValueError naming the field), before anything is written.
    """
    path = Path(path)
    text = dumps_strict(obj, indent=indent, what=str(path))
    if path.is_dir():
        raise OutputError(f"{path} is a directory; a JSON file was to be written there")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path, "tmp"))
    follow_umask(tmp, is_dir=False)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename itself survives a power loss
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``final`` in one rename.

    An exception or Ctrl-C inside the block removes the temporary directory and leaves
    ``final`` as it was (see :func:`publish_dir` for the replacement itself).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists")
    remove_stale_temps(final.parent)  # what a killed run (kill -9, OOM, power loss) left beside it
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=_temp_prefix(final, "tmp")))
    follow_umask(tmp, is_dir=True)
    try:
        yield tmp
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_dir(tmp: Path, final: Path) -> None:
    """Make the finished directory ``tmp`` visible as ``final``, replacing what was there.

    Contents are synced to disk before the rename. Replacing an existing directory takes two
    renames (old -> trash, new -> final); a crash between them leaves the old copy under
    ``.{name}.old-*``.
    """
    fsync_tree(tmp)  # file contents reach the disk before the rename makes them visible
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(dir=final.parent, prefix=_temp_prefix(final, "old")))
        os.rmdir(old)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file; a malformed line raises DataError naming file and line number."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory; expected a JSONL file")
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a BOM may open the file
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                "is it compressed or binary?") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, found {type(obj).__name__}")
            try:  # "\ud800" is valid JSON but no text: the tokenizer would fail on it later
                json.dumps(obj, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise DataError(f"{path}:{lineno}: a string holds a lone UTF-16 surrogate escape (e.g. \\ud800), "
                                "which is not text; fix or drop that line") from None
            obj["_line"] = lineno
            rows.append(obj)
    if not rows:
        raise DataError(f"{path}: empty dataset (no JSON lines)")
    return rows

"""Every file ti_flax reads or writes goes through here, so a fault is one line, not a traceback.

Reading: `read_json`, `read_safetensors`, `read_msgpack`, `read_torch`, `read_text` and the
`reading` context (for a library call that reads a file itself) turn a damaged, truncated or
unexpected file into a `DamagedFile` error naming the file and what is wrong:

    unet/diffusion_pytorch_model.safetensors: truncated or not a safetensors file (...); download it again

Writing: `write_bytes` is the one function that puts bytes on disk; `atomic_write` puts a
whole file in place by renaming, so a crash never leaves half of it under its name, and
`staged_folder` does the same for a folder (a checkpoint, a pipeline's components); `writing`
(which `atomic_write` uses) turns ENOSPC, EDQUOT, EROFS, EACCES and other OS errors into a
`WriteFailed` naming the file, its folder and the folder's free space.

Messages shorten long values with errors' helpers (`short_list`, `first_line`).
"""

import contextlib
import errno
import json
import os
import shutil
import tempfile

from .errors import UserError, first_line, short_list

# --------------------------------------------------------------------------------------------
# Reading


class DamagedFile(UserError):
    """A file exists but cannot be read as what it should be (truncated, corrupt, wrong kind)."""

    def __init__(self, path, problem, advice="download it again"):
        self.path, self.problem = os.fspath(path), problem
        super().__init__(f"{self.path}: {problem}" + (f"; {advice}" if advice else ""))


@contextlib.contextmanager
def reading(path, what, advice="download it again"):
    """Turn any failure inside the block into DamagedFile: "PATH: truncated or not WHAT (...)".

    For library calls that read a file themselves (a tokenizer's from_pretrained, a config
    class). A UserError raised inside passes through unchanged; so do KeyboardInterrupt and
    MemoryError. A missing or unreadable (permission) file gets its own wording.
    """
    try:
        yield
    except (UserError, MemoryError):
        raise
    except FileNotFoundError as err:
        raise DamagedFile(err.filename or path, "missing", "the folder is incomplete; download it again") from None
    except PermissionError as err:
        raise DamagedFile(err.filename or path, "permission denied", "make it readable") from None
    except IsADirectoryError as err:
        raise DamagedFile(err.filename or path, "is a folder, not a file", None) from None
    except Exception as err:  # noqa: BLE001 - every library error means the same thing here
        raise DamagedFile(path, f"truncated or not {what} ({first_line(err)})", advice) from None


def _exists(path):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DamagedFile(path, "missing", "the folder is incomplete; download it again")
    if os.path.isdir(path):
        raise DamagedFile(path, "is a folder, not a file", None)
    return path


def read_bytes(path, advice="download it again"):
    with reading(path, "a readable file", advice):
        with open(_exists(path), "rb") as f:
            return f.read()


def read_text(path, what="a UTF-8 text file", advice="download it again"):
    data = read_bytes(path, advice)
    with reading(path, what, advice):
        return data.decode("utf-8")


def read_json(path, what="a JSON file", kind=dict, advice="download it again"):
    """The parsed JSON of `path`; DamagedFile if it is not JSON or not a `kind` (dict by default)."""
    text = read_text(path, what, advice)
    with reading(path, what, advice):
        data = json.loads(text)
    if kind is not None and not isinstance(data, kind):
        raise DamagedFile(path, f"not {what} (holds a JSON {type(data).__name__}, expected an object)", advice)
    return data


def read_safetensors(path, keys=None, metadata=False, advice="download it again"):
    """{name: numpy array} of a safetensors file (only `keys`, if given); with metadata=True,
    (tensors, metadata dict). DamagedFile if the file is truncated or not safetensors."""
    from safetensors import safe_open

    with reading(path, "a safetensors file", advice):
        with safe_open(_exists(path), framework="numpy") as f:
            names = list(f.keys()) if keys is None else list(keys)
            missing = [k for k in names if k not in set(f.keys())]
            if missing:
                raise DamagedFile(path, f"has no tensor {short_list(missing)}", None)
            tensors = {k: f.get_tensor(k) for k in names}
            meta = f.metadata() or {}
    return (tensors, meta) if metadata else tensors


def safetensors_shapes(path, advice="download it again"):
    """{name: (shape, dtype name)} of a safetensors file, from its header alone (no tensor is read).

    DamagedFile if the file is truncated or not safetensors."""
    from safetensors import safe_open

    with reading(path, "a safetensors file", advice):
        with safe_open(_exists(path), framework="numpy") as f:
            out = {}
            for name in f.keys():
                piece = f.get_slice(name)
                out[name] = (tuple(piece.get_shape()), str(piece.get_dtype()))
            return out


def read_msgpack(path):
    """The nested dict of a Flax msgpack file (`flax.serialization.msgpack_restore`)."""
    from flax import serialization

    data = read_bytes(path)
    with reading(path, "a Flax msgpack file"):  # msgpack: "Unpack failed: incomplete input"
        tree = serialization.msgpack_restore(data)
    if not isinstance(tree, dict):
        raise DamagedFile(path, f"not Flax weights (holds a {type(tree).__name__}, expected a dict)")
    return tree


def read_torch(path, advice="download it again", allow_pickle=False):
    """`torch.load(path, weights_only=True)` with tensors turned into float32 numpy arrays
    (or their own dtype for integer tensors). Pickled Python objects beyond tensors and plain
    containers are refused, so the file cannot run code; `allow_pickle=True` unpickles them
    (`weights_only=False`: the file can run code, so only for files the user trusts)."""
    import pickle

    try:
        import torch
    except ImportError:
        raise UserError(f"{path}: reading a PyTorch file needs torch (`pip install torch`)") from None
    _exists(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err):
            raise DamagedFile(
                path, "holds Python objects other than tensors and plain containers, which are not loaded for safety", None
            ) from None
        raise DamagedFile(path, f"truncated or not a PyTorch file ({first_line(err)})", advice) from None
    except (UserError, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - zip errors, EOF, unpickling errors all mean a bad file
        raise DamagedFile(path, f"truncated or not a PyTorch file ({first_line(err)})", advice) from None

    def to_numpy(obj):
        if isinstance(obj, torch.Tensor):
            obj = obj.detach().cpu()
            return obj.float().numpy() if obj.is_floating_point() else obj.numpy()
        if isinstance(obj, dict):
            return {k: to_numpy(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [to_numpy(v) for v in obj]
        return obj

    return to_numpy(data)


def list_folder(path, what="folder"):
    """`os.listdir(path)`, with an unreadable folder as one line."""
    try:
        return os.listdir(path)
    except PermissionError:
        raise UserError(f"{path}: cannot read this {what} (permission denied)") from None
    except NotADirectoryError:
        raise UserError(f"{path}: not a folder") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read this {what} ({err.strerror or first_line(err)})") from None


# --------------------------------------------------------------------------------------------
# Writing


_WRITE_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "file too large for the file system",
}


def free_space(folder):
    """Free bytes on the file system holding `folder` (or its nearest existing parent); None if unknown."""
    folder = os.path.abspath(folder)
    while folder and not os.path.exists(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def human_bytes(n):
    if n is None:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


class WriteFailed(UserError):
    """An output could not be written (disk full, quota, read-only, permission...).

    The message names the file, its folder and the folder's free space, and, via `saved`,
    the files that were completed before (which stay intact).
    """

    def __init__(self, path, err, saved=(), what=None):
        self.path, self.err, self.saved = os.fspath(path), err, [os.fspath(p) for p in saved]
        self.what = what  # e.g. "the full pipeline into": "cannot write the full pipeline into out"
        super().__init__(self.message())

    @property
    def errno(self):
        return getattr(self.err, "errno", None)

    def message(self):
        path = os.path.abspath(self.path)
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        reason = _WRITE_REASONS.get(self.errno) or getattr(self.err, "strerror", None) or first_line(self.err)
        if self.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            advice = "choose a writable --output_dir"
        else:
            advice = "free some space or choose another --output_dir"
        what = f"{self.what} {self.path}" if self.what else self.path
        # The folder is in the path already: name it by its last part (and the saved files
        # relative to it), so the line stays short.
        where = os.path.basename(folder) + os.sep if folder != os.sep else folder
        text = f"cannot write {what}: {reason} ({human_bytes(free_space(folder))} free in {where}); {advice}"
        if self.saved:
            text += f"; already saved: {short_list(_relative(p, folder) for p in self.saved)}"
        return text

    def with_saved(self, saved):
        """The same failure, naming the files already completed."""
        return WriteFailed(self.path, self.err, [*self.saved, *[p for p in saved if p not in self.saved]], self.what)


@contextlib.contextmanager
def writing(path, what=None):
    """Turn an OSError inside the block into WriteFailed naming `path` (or the file the OS named)."""
    try:
        yield
    except WriteFailed:
        raise
    except OSError as err:
        if isinstance(err.filename, str) and not _is_temporary(err.filename):
            raise WriteFailed(err.filename, err) from None
        raise WriteFailed(path, err, what=what) from None


def _relative(path, folder):
    path = os.path.abspath(path)
    inside = path.startswith(os.path.join(folder, "")) and path != folder
    return os.path.relpath(path, folder) if inside else path


def _is_temporary(path):
    return os.path.basename(path).startswith(".")


def write_bytes(path, data):
    """Write `data` to `path` and flush it to disk: the lowest-level write of every output."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text(path, text):
    write_bytes(path, text.encode("utf-8"))


def atomic_write(path, write):
    """Write `path` under a temporary name in its folder, then rename it into place.

    `write` is the file's bytes, or a function called with the temporary path. An OS error
    (disk full, quota, read-only, permission) is a `WriteFailed` naming `path`, its folder
    and the free space; the temporary file is removed, and an existing `path` is untouched.
    Returns `path`.
    """
    folder = os.path.dirname(os.path.abspath(path))
    with writing(path):
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
        os.close(fd)
        try:
            if isinstance(write, (bytes, bytearray)):
                write_bytes(tmp, write)
            else:
                write(tmp)
            give_default_permissions(tmp)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
    return path


@contextlib.contextmanager
def staged_folder(final, hidden_name, merge=False, what=None):
    """Write a folder under a hidden temporary name, then move it into place at `final`.

    Args:
      final: where the folder's content belongs.
      hidden_name: the temporary folder's name (starting with "."), made empty (a leftover of
        that name is removed first): beside `final`, or with merge=True inside it.
      merge: False: the temporary folder is renamed to `final`, replacing a folder already
        there, so `final` appears only when complete. True: `final` is a folder that holds other
        files; each entry of the temporary folder is moved into it, replacing its namesake.
        Either way a replaced folder is moved aside first and put back if the move fails, so
        each is whole: the old one or the new one.
      what: how a failure names the folder ("cannot write {what} {final}").
    Yields:
      The temporary folder's path, to write everything into.
    Raises:
      WriteFailed for an OS error (naming a file inside the temporary folder by its final
      path). On any error the temporary folder is removed.
    """
    tmp = os.path.join(final if merge else os.path.dirname(final), hidden_name)
    try:
        with writing(final, what=what):
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            try:
                yield tmp
                if merge:
                    for name in os.listdir(tmp):
                        _swap_in(os.path.join(tmp, name), os.path.join(final, name), os.path.join(tmp, ".old-" + name))
                else:
                    old = final + f".old-{os.getpid()}"
                    _swap_in(tmp, final, old)
                    shutil.rmtree(old, ignore_errors=True)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except WriteFailed as err:
        if err.path.startswith(tmp):
            raise WriteFailed(final + err.path[len(tmp):], err.err) from None
        raise


def _swap_in(new, target, aside):
    """Move `new` to `target`. A folder already at `target` is moved to `aside` first and put
    back if the move fails, so `target` is always whole: the old one or the new one."""
    if not os.path.isdir(target):
        os.replace(new, target)  # a file (or nothing) at target: one atomic rename
        return
    os.replace(target, aside)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(aside, target)
        raise


def give_default_permissions(path):
    """chmod `path` to what a plain `open` would have made (0666 less the umask).

    mkstemp creates files 0600; a file renamed into place from one should look like any other.
    """
    os.chmod(path, 0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def safetensors_bytes(tensors, metadata=None):
    """safetensors bytes of {name: numpy array}, each array in C order.

    safetensors' numpy `save` takes the buffer of an array as it lies in memory: a strided view
    (an SDXL row's CLIP-L or bigG half, `rows[:, :768]`) would be written as the wrong values.
    """
    import numpy as np
    from safetensors.numpy import save

    return save({k: np.asarray(v, order="C") for k, v in tensors.items()}, metadata=metadata)


def png_bytes(image, **save_args):
    """PNG bytes of a PIL image."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save_args)
    return buffer.getvalue()


def torch_bytes(obj):
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()

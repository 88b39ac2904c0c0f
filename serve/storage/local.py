"""Local-folder result store: the default (``./outputs``) for development and single hosts."""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from pathlib import Path

from serve.errors import NotFoundError, StorageError
from serve.storage.base import ResultStore

logger = logging.getLogger(__name__)

# Errors a retry will not fix: the folder is read-only or not ours.
_PERMANENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR}


def _storage_error(action: str, key: str, exc: OSError) -> StorageError:
    return StorageError(f"could not {action} {key!r}: {exc}", transient=exc.errno not in _PERMANENT_ERRNOS)


class LocalStore(ResultStore):
    """Objects as files under ``root``; a key is a relative path below it.

    Writes go to a temp file in the target folder and are renamed into place, so readers never
    see half an image and a crash never leaves a truncated one under its final name.
    """

    def __init__(self, root: str | os.PathLike[str], *, public_base_url: str | None = None) -> None:
        # resolve() once: containment checks compare against this canonical path.
        self.root = Path(root).expanduser().resolve()
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None

    def __repr__(self) -> str:
        return f"LocalStore(root={str(self.root)!r}, public_base_url={self.public_base_url!r})"

    def _path(self, key: str) -> Path:
        """Absolute path of a validated key, refusing anything that resolves outside the root.

        Key validation already stops ``..``; this second check also stops symlinks placed
        inside the root that point elsewhere.
        """
        path = (self.root / key).resolve()
        if path == self.root or not path.is_relative_to(self.root):
            logger.warning("key %r resolves outside the store root; refused", key)
            raise NotFoundError(f"no such object: {key!r}")
        return path

    def _put(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        tmp_name: str | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                # fsync before rename: otherwise a power loss can leave the new name pointing at
                # an empty file, which breaks "never an image without its metadata".
                os.fsync(fh.fileno())
            os.chmod(tmp_name, 0o644)  # mkstemp makes 0600; outputs are meant to be shared
            os.replace(tmp_name, path)
            tmp_name = None
        except OSError as exc:
            raise _storage_error("write", key, exc) from exc
        finally:
            if tmp_name is not None:
                try:
                    os.unlink(tmp_name)
                except OSError:
                    logger.warning("could not remove temp file %s", tmp_name, exc_info=True)

    def _put_if_absent(self, key: str, data: bytes, content_type: str) -> bool:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.chmod(tmp_name, 0o644)
                # link() fails if the name exists: an atomic create-if-absent of a complete file.
                os.link(tmp_name, path)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp_name)
        except OSError as exc:
            raise _storage_error("write", key, exc) from exc

    def _get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFoundError(f"no such object: {key!r}") from None
        except OSError as exc:
            raise _storage_error("read", key, exc) from exc

    def _exists(self, key: str) -> bool:
        try:
            return self._path(key).is_file()
        except NotFoundError:
            return False

    def _delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except (IsADirectoryError, NotADirectoryError):
            return  # not an object, so nothing to delete
        except OSError as exc:
            raise _storage_error("delete", key, exc) from exc

    def _list(self, prefix: str) -> list[str]:
        folder = self._path(prefix.rstrip("/"))
        if not folder.is_dir():
            return []
        # Temp files of writes in progress (".tmp-*.part") are not objects.
        return sorted(f"{prefix}{p.name}" for p in folder.iterdir() if p.is_file() and not p.name.startswith(".tmp-"))

    def _url(self, key: str) -> str:
        if self.public_base_url:
            return f"{self.public_base_url}/v1/files/{key}"
        return self._path(key).as_uri()

    def check(self) -> None:
        """Create the root if needed and prove a file can be written and removed there."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=self.root, prefix=".readyz-")
            os.close(fd)
            os.unlink(name)
        except OSError as exc:
            raise StorageError(
                f"result folder {str(self.root)!r} is not writable: {exc}",
                transient=exc.errno not in _PERMANENT_ERRNOS,
            ) from exc

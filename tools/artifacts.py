"""Content-addressed artifact store: `ImageRef` and `ArtifactStore`.

Graph state, checkpoints and traces never hold pixels; they hold an `ImageRef` (sha256 of the
pixels, size, and the file's path relative to the store root). The store keeps one PNG per
distinct image:

    <root>/images/<sha[:2]>/<sha>.png      images; sha = `images.content_hash(pixels)`
    <root>/blobs/<sha[:2]>/<sha><suffix>   other blobs (JSON traces, ...); sha = sha256(bytes)

Design points:
- **Identical content, one file.** `put` of the same pixels returns the same ref and does not
  rewrite an existing file.
- **Atomic and multi-process safe.** Each write goes to a unique temporary file in the target
  folder, is fsynced, then `os.replace`d into place. Readers see either no file or a complete
  one; concurrent writers of the same content race harmlessly (same bytes, last rename wins).
- **No path tricks.** A sha must be 64 lowercase hex characters and a relative path must match
  the layout above exactly, so nothing can name a file outside the root; resolved paths are
  also checked to stay inside the root (against symlinked folders).
- **Removed only by `sweep`**, with the shas still referred to (`LavidaAgent.prune` reads
  them from the traces and checkpoints); `put` renews an existing file's time, so what was
  stored lately stays however old its first copy is.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from lavida_agent.tools.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    content_hash,
    decode_png,
    encode_png,
    load_image,
)

logger = logging.getLogger(__name__)

_SHA_RE = re.compile(r"[0-9a-f]{64}")
_SUFFIX_RE = re.compile(r"\.[a-z0-9]{1,16}")
# Every path the store hands out: kind / shard / sha + suffix (the shard is checked separately).
_PATH_RE = re.compile(r"(images|blobs)/([0-9a-f]{2})/([0-9a-f]{64})(\.[a-z0-9]{1,16})")

__all__ = ["ArtifactNotFound", "ArtifactStore", "ImageRef", "Swept", "check_sha256"]


class Swept(NamedTuple):
    """What `ArtifactStore.sweep` removed, and what it kept only for being stored lately."""

    removed: int
    freed: int
    waiting: int


class ArtifactNotFound(KeyError):
    """No artifact with this hash (or path) is in the store."""

    def __str__(self) -> str:
        # KeyError's str() is the repr of its argument (quotes and escapes); show plain text.
        return str(self.args[0]) if self.args else "artifact not found"


def check_sha256(sha: Any) -> str:
    """Return `sha` if it is 64 lowercase hex characters, else raise `ValueError` naming it."""
    if not isinstance(sha, str) or not _SHA_RE.fullmatch(sha):
        raise ValueError(f"not a sha256 (64 lowercase hex characters): {sha!r}")
    return sha


def _check_rel_path(path: Any) -> str:
    """Validate a store-relative path (`images/ab/ab....png`); raise `ValueError` otherwise."""
    if not isinstance(path, str):
        raise ValueError(f"artifact path must be a str, got {type(path).__name__}")
    m = _PATH_RE.fullmatch(path)
    if m is None or m.group(2) != m.group(3)[:2]:
        raise ValueError(
            f"not an artifact path of the form 'images/<sha[:2]>/<sha>.png': {path!r}"
        )
    return path


def _image_path(sha: str) -> str:
    return f"images/{sha[:2]}/{sha}.png"


@dataclass(frozen=True)
class ImageRef:
    """A reference to an image in an `ArtifactStore`; small, immutable and JSON-friendly.

    Usable directly as a pydantic v2 field type (pydantic validates stdlib dataclasses from
    dicts and dumps them to dicts), and `to_dict()` / `from_dict()` for plain JSON.

    Attributes:
        sha256: `images.content_hash` of the pixels (64 lowercase hex characters).
        width: image width in pixels.
        height: image height in pixels.
        path: file path relative to the store root, e.g. `"images/ab/ab12....png"`.

    Raises:
        ValueError: a malformed hash, a non-positive size, or a path that is not the store's.
    """

    sha256: str
    width: int
    height: int
    path: str

    def __post_init__(self) -> None:
        check_sha256(self.sha256)
        for name in ("width", "height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
                raise ValueError(f"ImageRef.{name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        _check_rel_path(self.path)
        if PurePosixPath(self.path).stem != self.sha256:
            raise ValueError(f"ImageRef.path {self.path!r} does not name sha256 {self.sha256!r}")

    @classmethod
    def for_image(cls, sha256: str, width: int, height: int) -> ImageRef:
        """Build the ref of an image with the store's standard path."""
        return cls(sha256=sha256, width=width, height=height, path=_image_path(sha256))

    def to_dict(self) -> dict[str, Any]:
        """Return `{"sha256", "width", "height", "path"}` (JSON-serialisable)."""
        return {
            "sha256": self.sha256,
            "width": self.width,
            "height": self.height,
            "path": self.path,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageRef:
        """Inverse of `to_dict`; unknown keys are ignored (forward compatibility).

        Raises:
            ValueError: a key is missing or a value is invalid.
        """
        missing = [k for k in ("sha256", "width", "height", "path") if k not in data]
        if missing:
            raise ValueError(f"ImageRef dict is missing {missing}: {data!r}")
        return cls(
            sha256=data["sha256"], width=data["width"], height=data["height"], path=data["path"]
        )


class ArtifactStore:
    """A content-addressed store of images (PNG) and blobs under one root folder.

    Safe to share between threads and processes (see the module docstring).

    Example:
        >>> store = ArtifactStore(tmp_path)
        >>> ref = store.put(np.zeros((64, 64, 3), np.uint8))
        >>> store.open(ref).shape
        (64, 64, 3)

    Args:
        root: the store folder; created if missing.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"ArtifactStore({str(self.root)!r})"

    # -- resolving ------------------------------------------------------------------------

    def _rel_path(self, ref: ImageRef | str) -> str:
        """Store-relative path of an `ImageRef`, an image sha, or a path from `put_bytes`."""
        if isinstance(ref, ImageRef):
            return _check_rel_path(ref.path)
        if isinstance(ref, str) and "/" in ref:
            return _check_rel_path(ref)
        return _image_path(check_sha256(ref))

    def path(self, ref: ImageRef | str) -> Path:
        """Absolute path of an artifact (whether or not it exists yet).

        Args:
            ref: an `ImageRef`, an image sha256, or a store-relative path (from `put_bytes`).

        Raises:
            ValueError: a malformed sha or path, or one that resolves outside the root.
        """
        full = (self.root / self._rel_path(ref)).resolve()
        if not full.is_relative_to(self.root):
            raise ValueError(f"artifact path {ref!r} resolves outside the store root {self.root}")
        return full

    def exists(self, ref: ImageRef | str) -> bool:
        """True when the artifact's file is present (same `ref` forms as `path`)."""
        return self.path(ref).is_file()

    # -- writing --------------------------------------------------------------------------

    def _write_atomic(self, target: Path, data: bytes) -> None:
        """Write `data` to `target` via a temp file + fsync + `os.replace` in the same folder."""
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=target.suffix, dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            # Never leave a half-written temp file behind, whatever interrupted us.
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        self._fsync_dir(target.parent)

    @staticmethod
    def _fsync_dir(folder: Path) -> None:
        """Persist the rename itself (POSIX); silently skipped where folders cannot be opened."""
        try:
            fd = os.open(folder, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def put(self, image: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageRef:
        """Store an image (anything `images.load_image` accepts) as PNG and return its ref.

        Identical pixels give the same ref; an existing file is not rewritten, only touched
        (its time is when it was last stored: `sweep` keeps what was stored recently).

        Raises:
            ImageError: `image` is not a loadable image.
        """
        pixels = load_image(image, max_pixels=max_pixels)
        h, w = pixels.shape[:2]
        ref = ImageRef.for_image(content_hash(pixels), w, h)
        target = self.path(ref)
        try:
            os.utime(target)
        except FileNotFoundError:
            self._write_atomic(target, encode_png(pixels))
            logger.debug("stored %s (%dx%d)", ref.sha256, w, h)
        return ref

    def put_bytes(self, data: bytes, suffix: str = ".bin") -> str:
        """Store an arbitrary blob (e.g. a JSON trace), addressed by the sha256 of its bytes.

        Args:
            data: the bytes.
            suffix: file extension, `.` + 1-16 lowercase letters or digits (e.g. `".json"`).

        Returns:
            The store-relative path `"blobs/<sha[:2]>/<sha><suffix>"`; pass it to `path`,
            `exists` or `read_bytes`.

        Raises:
            ValueError: `data` is not bytes or `suffix` is malformed.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ValueError(f"data must be bytes, got {type(data).__name__}")
        if not isinstance(suffix, str) or not _SUFFIX_RE.fullmatch(suffix):
            raise ValueError(f"suffix must be '.' + 1-16 lowercase letters/digits, got {suffix!r}")
        data = bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        rel = f"blobs/{sha[:2]}/{sha}{suffix}"
        target = self.path(rel)
        if not target.is_file():
            self._write_atomic(target, data)
        return rel

    # -- reading --------------------------------------------------------------------------

    def read_bytes(self, ref: ImageRef | str) -> bytes:
        """Raw file bytes of an artifact (the PNG of an image, or a blob).

        Raises:
            ArtifactNotFound: nothing stored under `ref`.
            ValueError: a malformed `ref`.
        """
        target = self.path(ref)
        try:
            return target.read_bytes()
        except FileNotFoundError:
            raise ArtifactNotFound(f"no artifact {self._rel_path(ref)!r} in {self.root}") from None

    def open(self, ref: ImageRef | str, *, verify: bool = True) -> np.ndarray:
        """Load a stored image as a canonical `(H, W, 3)` uint8 RGB array.

        Args:
            ref: an `ImageRef` or an image sha256.
            verify: re-hash the decoded pixels and check them against the sha (cheap for the
                small images this project stores; catches on-disk corruption).

        Raises:
            ArtifactNotFound: no image with this hash.
            ImageError: the stored file is corrupt or does not match its hash.
            ValueError: a malformed `ref`.
        """
        rel = self._rel_path(ref)
        if not rel.startswith("images/"):
            raise ValueError(f"{rel!r} is a blob, not an image: use read_bytes")
        pixels = decode_png(self.read_bytes(ref))
        sha = PurePosixPath(rel).stem
        if verify and content_hash(pixels) != sha:
            raise ImageError(f"stored image {rel!r} does not match its hash (corrupt file?)")
        return pixels

    # -- removing -------------------------------------------------------------------------

    def sweep(self, keep: Collection[str], *, older_than_s: float, also: Collection[str] = (),
              also_before: float = math.inf, dry_run: bool = False) -> Swept:  # fmt: skip
        """Remove every image whose sha is not in `keep` and that was last stored (`put`)
        more than `older_than_s` seconds ago (or is in `also` and was last stored before the
        time `also_before`), and temporary files as old (a write that crashed). Images
        stored since stay: a run of another process may have stored them and not yet
        recorded them where `keep` was read from.

        Returns:
            `Swept(removed, freed, waiting)`: images removed, bytes freed, and images kept
            only because they were stored lately (with `dry_run`, what would be).
        """
        cutoff = time.time() - older_than_s
        removed = freed = waiting = 0
        for path in self.root.glob("images/??/*"):
            is_tmp = path.name.startswith(".tmp-")
            if not is_tmp and (path.suffix != ".png" or path.stem in keep):
                continue
            try:
                st = path.stat()
                if st.st_mtime >= cutoff and not (path.stem in also and st.st_mtime < also_before):
                    waiting += not is_tmp
                    continue
                if not dry_run:
                    path.unlink()
            except FileNotFoundError:  # removed meanwhile (another sweep)
                continue
            removed += not is_tmp
            freed += st.st_size
        return Swept(removed, freed, waiting)

    def ref(self, sha: str) -> ImageRef:
        """Rebuild the `ImageRef` of a stored image from its sha (reads the PNG header only).

        Raises:
            ArtifactNotFound: no image with this hash.
        """
        target = self.path(sha)
        try:
            with Image.open(target) as img:
                w, h = img.size
        except FileNotFoundError:
            raise ArtifactNotFound(f"no image {sha!r} in {self.root}") from None
        return ImageRef.for_image(sha, w, h)

"""Tests for tools/artifacts.py: ImageRef, the content-addressed store, safety, concurrency."""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import time

import numpy as np
import pytest
from PIL import Image

from lavida_agent.tools import images
from lavida_agent.tools.artifacts import ArtifactNotFound, ArtifactStore, ImageRef
from lavida_agent.tools.images import ImageError


def _image(seed: int, h: int = 16, w: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(tmp_path / "store")


def _leftover_temp_files(root) -> list[str]:
    return [str(p) for p in root.rglob(".tmp-*")]


# -- ImageRef -----------------------------------------------------------------------------

SHA = "ab" + "0" * 62


def test_image_ref_dict_and_json_round_trip():
    ref = ImageRef.for_image(SHA, 64, 32)
    assert ref.path == f"images/ab/{SHA}.png"
    d = ref.to_dict()
    assert d == {"sha256": SHA, "width": 64, "height": 32, "path": ref.path}
    assert ImageRef.from_dict(json.loads(json.dumps(d))) == ref
    assert ImageRef.from_dict({**d, "future_field": 1}) == ref
    with pytest.raises(ValueError, match="missing \\['path'\\]"):
        ImageRef.from_dict({k: v for k, v in d.items() if k != "path"})
    assert hash(ref) == hash(ImageRef.from_dict(d))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sha256": SHA.upper()}, "not a sha256"),
        ({"sha256": SHA[:-1]}, "not a sha256"),
        ({"sha256": "../" + SHA[3:]}, "not a sha256"),
        ({"width": 0}, "width must be a positive integer"),
        ({"height": 2.0}, "height must be a positive integer"),
        ({"path": f"images/ab/../../../etc/{SHA}.png"}, "not an artifact path"),
        ({"path": f"/images/ab/{SHA}.png"}, "not an artifact path"),
        ({"path": f"images/cd/{SHA}.png"}, "not an artifact path"),
        ({"path": f"images/ab/{'ab' + '1' * 62}.png"}, "does not name sha256"),
    ],
)
def test_image_ref_validation(kwargs, match):
    fields = {"sha256": SHA, "width": 4, "height": 4, "path": f"images/ab/{SHA}.png"}
    with pytest.raises(ValueError, match=match):
        ImageRef(**{**fields, **kwargs})


def test_image_ref_as_pydantic_field():
    pydantic = pytest.importorskip("pydantic")

    class Attempt(pydantic.BaseModel):
        image: ImageRef
        seed: int

    ref = ImageRef.for_image(SHA, 64, 64)
    a = Attempt(image=ref, seed=3)
    dumped = json.loads(a.model_dump_json())
    assert dumped == {"image": ref.to_dict(), "seed": 3}
    back = Attempt.model_validate(dumped)
    assert back.image == ref and isinstance(back.image, ImageRef)
    with pytest.raises(pydantic.ValidationError):
        Attempt.model_validate({"image": {**ref.to_dict(), "sha256": "nope"}, "seed": 0})


# -- put / open ---------------------------------------------------------------------------


def test_put_and_open(store):
    img = _image(0)
    ref = store.put(img)
    assert ref.sha256 == images.content_hash(img)
    assert (ref.width, ref.height) == (24, 16)
    assert ref.path == f"images/{ref.sha256[:2]}/{ref.sha256}.png"
    assert store.path(ref) == store.root / ref.path
    assert store.read_bytes(ref).startswith(b"\x89PNG")
    np.testing.assert_array_equal(store.open(ref), img)
    np.testing.assert_array_equal(store.open(ref.sha256), img)
    assert store.exists(ref.sha256) and store.exists(ref)
    assert store.ref(ref.sha256) == ref
    assert not _leftover_temp_files(store.root)


def test_identical_content_written_once(store, tmp_path):
    img = _image(1)
    ref = store.put(img)
    st = store.path(ref).stat()
    # The same pixels through every input kind give the same ref, and no rewrite.
    png = images.encode_png(img)
    (tmp_path / "x.png").write_bytes(png)  # the same pixels as a file
    path = tmp_path / "x.png"
    for same in (img.copy(), Image.fromarray(img), png, path, str(path)):
        assert store.put(same) == ref
    st2 = store.path(ref).stat()
    assert st2.st_ino == st.st_ino and st2.st_mtime_ns >= st.st_mtime_ns  # touched, not rewritten
    assert store.put(_image(2)) != ref
    assert len(list((store.root / "images").rglob("*.png"))) == 2


def test_sweep_removes_old_unkept_images_and_crashed_writes(store):
    kept, old, new, now = (store.put(_image(i)) for i in range(1, 5))
    hour_ago = time.time() - 3600
    crashed = store.path(kept).parent / ".tmp-crashed.png"
    crashed.write_bytes(b"half")
    for path in (store.path(kept), store.path(old), crashed):
        os.utime(path, (hour_ago, hour_ago))
    keep = {kept.sha256}
    # (new and now were stored just now: they wait)
    assert store.sweep(keep, older_than_s=60, dry_run=True) == (1, store.path(old).stat().st_size + 4, 2)
    assert all(store.exists(r) for r in (kept, old, new, now)) and crashed.exists()
    assert store.sweep(keep, older_than_s=60, also={now.sha256}).removed == 2  # `also`: at once
    assert [store.exists(r) for r in (kept, old, new, now)] == [True, False, True, False]
    assert not crashed.exists()
    size = store.path(new).stat().st_size
    assert store.sweep(keep, older_than_s=0) == (1, size, 0) and store.exists(kept)


def test_put_rejects_bad_images(store):
    with pytest.raises(ImageError):
        store.put(b"garbage")
    with pytest.raises(ImageError):
        store.put(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(ImageError, match="too large"):
        store.put(_image(3), max_pixels=10)
    assert not list(store.root.rglob("*.png"))


def test_missing_artifact(store):
    sha = "0" * 64
    assert not store.exists(sha)
    with pytest.raises(ArtifactNotFound, match=sha) as info:
        store.open(sha)
    assert isinstance(info.value, KeyError)
    assert str(info.value).startswith("no artifact")  # plain text, not a quoted repr
    with pytest.raises(ArtifactNotFound):
        store.read_bytes(ImageRef.for_image(sha, 1, 1))
    with pytest.raises(ArtifactNotFound):
        store.ref(sha)


@pytest.mark.parametrize(
    "bad", ["", "abc", "0" * 63, "G" * 64, "A" * 64, "../../etc/passwd", "/etc/passwd", "..", 5]
)
def test_bad_hashes_and_paths(store, bad):
    for fn in (store.open, store.path, store.exists, store.read_bytes):
        with pytest.raises(ValueError):
            fn(bad)


def test_forged_ref_cannot_escape(store, tmp_path):
    ref = ImageRef.for_image(SHA, 1, 1)
    object.__setattr__(ref, "path", "../../outside.png")  # bypasses __post_init__
    with pytest.raises(ValueError, match="not an artifact path"):
        store.path(ref)


def test_symlinked_shard_outside_root_is_refused(store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (store.root / "images").mkdir()
    (store.root / "images" / "ab").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="outside the store root"):
        store.path(SHA)


def test_corrupt_file_detected(store):
    ref = store.put(_image(4))
    other = images.encode_png(_image(5))
    store.path(ref).write_bytes(other)
    with pytest.raises(ImageError, match="does not match its hash"):
        store.open(ref)
    assert store.open(ref, verify=False).shape == (16, 24, 3)
    store.path(ref).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ImageError):
        store.open(ref)


def test_put_bytes(store):
    data = json.dumps({"nodes": [1, 2]}).encode()
    rel = store.put_bytes(data, ".json")
    assert rel.startswith("blobs/") and rel.endswith(".json")
    assert store.put_bytes(data, ".json") == rel
    assert store.read_bytes(rel) == data and store.exists(rel)
    assert store.path(rel).parent.name == rel.split("/")[1]
    with pytest.raises(ValueError, match="blob, not an image"):
        store.open(rel)
    for bad_suffix in ("json", ".JSON", "./x", ".a/b", ""):
        with pytest.raises(ValueError, match="suffix"):
            store.put_bytes(data, bad_suffix)
    with pytest.raises(ValueError, match="data must be bytes"):
        store.put_bytes("text", ".txt")  # type: ignore[arg-type]
    with pytest.raises(ArtifactNotFound):
        store.read_bytes("blobs/00/" + "0" * 64 + ".json")


def test_failed_write_leaves_nothing(store, monkeypatch):
    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        store.put(_image(6))
    assert not _leftover_temp_files(store.root)
    assert not list(store.root.rglob("*.png"))


def test_store_accepts_str_root_and_creates_it(tmp_path):
    s = ArtifactStore(str(tmp_path / "a" / "b"))
    assert s.root.is_dir() and "ArtifactStore(" in repr(s)


# -- several processes --------------------------------------------------------------------


def _worker(root: str, worker: int, barrier, queue) -> None:
    """Put shared images (same in every process) and own images, interleaved, many times."""
    store = ArtifactStore(root)
    barrier.wait()  # start together to maximise contention
    refs = []
    for round_ in range(3):
        for k in range(4):
            refs.append(store.put(_image(100 + k, 32, 32)).to_dict())  # shared
            refs.append(store.put(_image(1000 * worker + 10 * round_ + k, 32, 32)).to_dict())
        refs.append({"blob": store.put_bytes(b"shared trace", ".json")})
    queue.put((worker, refs))


def test_concurrent_processes(tmp_path):
    root = str(tmp_path / "shared_store")
    ctx = mp.get_context("spawn")  # no inherited threads or locks from the test process
    barrier, queue = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(root, w, barrier, queue)) for w in range(4)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    store = ArtifactStore(root)
    shared = {w: [r for r in refs if "sha256" in r][0::2] for w, refs in results.items()}
    assert all(shared[w] == shared[0] for w in shared)  # same content -> same refs everywhere
    blobs = {r["blob"] for refs in results.values() for r in refs if "blob" in r}
    assert len(blobs) == 1 and store.read_bytes(blobs.pop()) == b"shared trace"
    all_refs = {ImageRef.from_dict(r) for refs in results.values() for r in refs if "sha256" in r}
    assert len(all_refs) == 4 + 4 * 3 * 4  # 4 shared + 12 own per worker
    for ref in all_refs:
        pixels = store.open(ref)  # decodes and re-hashes: the file is intact
        assert pixels.shape == (32, 32, 3)
    assert len(list((store.root / "images").rglob("*.png"))) == len(all_refs)
    assert not _leftover_temp_files(store.root)


def test_png_file_is_standard(store):
    ref = store.put(_image(7))
    with Image.open(io.BytesIO(store.read_bytes(ref))) as img:
        assert img.format == "PNG" and img.size == (24, 16) and img.mode == "RGB"

import numpy as np

from touchvl.imagebind import cache as vector_cache
from touchvl.imagebind.cache import VectorCache, image_key, text_key


def test_put_flush_reload_and_namespaces(tmp_path):
    cache = VectorCache(tmp_path, "fp-a")
    cache.put("k1", np.ones(4))
    assert "k1" in cache and cache.flush() == 1 and cache.flush() == 0
    reloaded = VectorCache(tmp_path, "fp-a")
    assert "k1" in reloaded and reloaded.get("k1").dtype == np.float32
    np.testing.assert_array_equal(reloaded.get("k1"), np.ones(4))
    assert "k1" not in VectorCache(tmp_path, "fp-b")  # another encoder fingerprint sees nothing


def test_unflushed_vectors_are_not_persisted(tmp_path):
    cache = VectorCache(tmp_path, "fp")
    cache.put("k", np.zeros(3))
    assert "k" not in VectorCache(tmp_path, "fp")


def test_many_shards_are_compacted_without_losing_vectors(tmp_path, monkeypatch):
    monkeypatch.setattr(vector_cache, "COMPACT_AFTER", 3)
    cache = VectorCache(tmp_path, "fp")
    for i in range(6):
        cache.put(f"k{i}", np.full(2, i))
        cache.flush()
    assert len(list((tmp_path / "fp").glob("shard-*.npz"))) <= 3
    again = VectorCache(tmp_path, "fp")
    assert len(again) == 6 and again.get("k5")[0] == 5


def test_keys_are_content_hashes(tmp_path):
    a, b, c = tmp_path / "a.jpg", tmp_path / "b.jpg", tmp_path / "c.jpg"
    a.write_bytes(b"same")
    b.write_bytes(b"same")
    c.write_bytes(b"other")
    assert image_key(a) == image_key(b) != image_key(c)
    assert text_key("smooth") != text_key("smooth ") and text_key("x").startswith("txt:")


def test_a_large_files_hash_is_remembered_by_its_stat_and_recomputed_when_it_changes(tmp_path, monkeypatch):
    import hashlib
    import json
    import os

    from touchvl import disk

    memo = tmp_path / "memo/file_hashes.json"
    monkeypatch.setenv(disk.HASH_MEMO_ENV, str(memo))
    ckpt = tmp_path / "imagebind_huge.pth"
    ckpt.write_bytes(b"weights v1" * 1000)
    assert disk.sha256_file_memo(ckpt) == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    (key, value), = json.loads(memo.read_text()).items()
    assert key.startswith(f"{ckpt.resolve()}|") and value == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    # a later run answers from the memo without reading the file (a planted answer proves it)
    memo.write_text(json.dumps({key: "0" * 64}))
    assert disk.sha256_file_memo(ckpt) == "0" * 64
    # the file rewritten (other bytes, a later mtime): hashed again, its stale entry dropped
    before = ckpt.stat().st_mtime_ns
    ckpt.write_bytes(b"weights v2" * 1000)
    os.utime(ckpt, ns=(before + 10**9, before + 10**9))
    assert disk.sha256_file_memo(ckpt) == hashlib.sha256(b"weights v2" * 1000).hexdigest()
    assert len(json.loads(memo.read_text())) == 1
    # a memo that is not JSON is ignored (and replaced), never trusted
    memo.write_text("{not json")
    assert disk.sha256_file_memo(ckpt) == hashlib.sha256(b"weights v2" * 1000).hexdigest()
    assert len(json.loads(memo.read_text())) == 1

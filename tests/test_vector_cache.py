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

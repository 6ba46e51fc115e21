"""Content-addressed store of embedding vectors, one namespace per encoder fingerprint.

Layout: ``<root>/<fingerprint>/shard-<digest>.npz`` with arrays ``keys`` (str) and ``vectors``
(float32 [n, D]).  A run appends one new shard holding only what it computed; shards are written
atomically, so a crash loses at most the unsaved shard and never corrupts the store.  Keys are
content hashes (image bytes, caption text), so an unchanged image is never embedded twice and a new
fingerprint (encoder, checkpoint, preprocessing) starts from an empty namespace.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

from touchvl import disk

COMPACT_AFTER = 16  # shards; merging keeps load time flat as nightly runs add small shards


def image_key(path: Path | str) -> str:
    return "img:" + disk.sha256_file(path)


def text_key(text: str) -> str:
    return "txt:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


class VectorCache:
    def __init__(self, root: Path | str, fingerprint: str):
        self.folder = Path(root) / fingerprint
        self._vectors: dict[str, np.ndarray] = {}
        self._pending: dict[str, np.ndarray] = {}
        for shard in sorted(self.folder.glob("shard-*.npz")):
            with np.load(shard, allow_pickle=False) as data:
                self._vectors.update(zip(data["keys"].tolist(), data["vectors"]))

    def __contains__(self, key: str) -> bool:
        return key in self._vectors or key in self._pending

    def __len__(self) -> int:
        return len(self._vectors) + len(self._pending)

    def get(self, key: str) -> np.ndarray:
        return self._pending[key] if key in self._pending else self._vectors[key]

    def put(self, key: str, vector: np.ndarray) -> None:
        self._pending[key] = np.asarray(vector, dtype=np.float32)

    def flush(self) -> int:
        """Persist vectors added since the last flush as one shard; returns how many."""
        if not self._pending:
            return 0
        keys = sorted(self._pending)
        self._write_shard(keys, [self._pending[k] for k in keys])
        self._vectors.update(self._pending)
        count = len(self._pending)
        self._pending = {}
        if len(list(self.folder.glob("shard-*.npz"))) > COMPACT_AFTER:
            self.compact()
        return count

    def compact(self) -> None:
        old = sorted(self.folder.glob("shard-*.npz"))
        keys = sorted(self._vectors)
        new = self._write_shard(keys, [self._vectors[k] for k in keys])
        for shard in old:
            if shard != new:
                shard.unlink()

    def _write_shard(self, keys: list[str], vectors: list[np.ndarray]) -> Path:
        digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
        path = self.folder / f"shard-{digest}.npz"
        buffer = io.BytesIO()
        np.savez(buffer, keys=np.array(keys), vectors=np.stack(vectors).astype(np.float32))
        disk.write_bytes(path, buffer.getvalue())
        return path

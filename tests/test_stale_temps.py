"""A killed run's temporary files (atomic_open's ``.<name>.<random>.tmp``) are removed when a stage starts again, so
DVC never hashes them as part of an output folder: embed, train_projector stage 2, index (jsonl too; upload keeps its
temporaries outside the output, tests/test_upload.py)."""
from __future__ import annotations

from pathlib import Path

from tasks import embed, index, train_projector
from touchvl import disk


def _plant(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(b"half a file from a kill -9")
    return path


def test_remove_stale_temps_cleans_owned_folders_and_only_a_files_own_temporaries(tmp_path):
    owned = tmp_path / "owned"
    keep = _plant(owned, "all_embeddings.npy")
    gone = [_plant(owned, ".all_embeddings.npy.k3j4.tmp"), _plant(owned / "nested", "x.tmp")]
    shared = tmp_path / "metrics"
    mine = _plant(shared, ".encoder.json.a1b2.tmp")
    theirs = _plant(shared, ".retrieval.json.c3d4.tmp")  # another stage's file in a shared folder: not ours to remove
    removed = disk.remove_stale_temps(owned, shared / "encoder.json", tmp_path / "missing" / "file.json")
    assert sorted(removed) == sorted([*gone, mine])
    assert keep.exists() and theirs.exists() and not any(p.exists() for p in gone + [mine])
    assert disk.remove_stale_temps(owned) == []


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_embed_projector_and_index_start_by_removing_a_killed_runs_temporaries(built):
    emb, proj, idx = built.embed.out_dir, built.projector, built.index
    index.run(built)
    expected = {folder: _files(folder) for folder in (emb / "embeddings_tac", emb / "embeddings_text", proj.projected_dir,
                                                      idx.out_dir)}
    leftovers = [_plant(emb / "embeddings_tac", ".all_embeddings.npy.x7k2.tmp"),
                 _plant(emb / "embeddings_text", ".all_indices.npy.p0q1.tmp"),
                 _plant(built.embed.cache_dir, ".shard-0001.npz.zz.tmp"),
                 _plant(emb, ".meta.json.m3.tmp"),
                 _plant(built.embed.metrics.parent, f".{built.embed.metrics.name}.aa.tmp"),
                 _plant(proj.projected_dir, ".all_embeddings.npy.b4.tmp"),
                 _plant(idx.out_dir, ".rgb.faiss.c5.tmp"),
                 _plant(idx.out_dir, ".rgb.digests.npz.d6.tmp")]
    embed.run(built)
    train_projector.run_stage2(built)
    index.run(built)
    assert [p for p in leftovers if p.exists()] == []
    for folder, files in expected.items():  # what DVC would hash for each output folder: the stage's own files only
        assert _files(folder) == files, folder

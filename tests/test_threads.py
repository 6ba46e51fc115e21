"""Thread pools sized for the machine: ``auto`` leaves room for a competing process and for decoding workers."""
import subprocess
import sys
from pathlib import Path

import pytest

from touchvl.devices import resolve_threads

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("cpus", "workers", "expected"), [
    (1, 0, 1), (2, 0, 1),        # this CI machine: one thread (8x faster than 2 when the other core is busy)
    (16, 0, 8), (16, 8, 4),      # a GPU box: the decoding workers' cores are not the forward's
    (4, 8, 1),                   # more workers than cores still leaves one thread
])
def test_auto_is_half_the_cpus_less_the_workers(cpus, workers, expected):
    assert resolve_threads("auto", workers, cpus=cpus) == expected


def test_an_explicit_count_is_honoured():
    assert resolve_threads(3, workers=8, cpus=2) == 3


SNIPPET = """
import sys, torch, faiss
from touchvl.devices import apply_threads
n = apply_threads({setting!r})
print(n, torch.get_num_threads(), faiss.omp_get_max_threads())
"""


@pytest.mark.parametrize("setting", [1, 3])
def test_apply_sets_torch_and_faiss_pools(setting):
    # a fresh process: torch's pool size is process-global and the test session's must stay as it is
    out = subprocess.run([sys.executable, "-c", SNIPPET.format(setting=setting)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    assert out == [str(setting)] * 3


def test_later_import_of_torch_gets_the_same_size():
    snippet = ("from touchvl.devices import apply_threads\nassert 'torch' not in __import__('sys').modules\n"
               "apply_threads(2)\nimport torch\nprint(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}).stdout.split()
    assert out == ["2"]

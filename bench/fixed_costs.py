"""Fixed costs of a fresh process, against the naive way, in one run: what every stage and CLI call pays first.

    .venv/bin/python -m bench.fixed_costs [--runs 5]

Each case is a fresh ``python -c`` (as ``dvc repro`` and the CLI start one), timed from outside, min and median of
``--runs`` interleaved rounds:

* ``encoder_load``: Meta's ImageBind model module as touchvl loads it (timm's ``drop.py``/``weight_init.py`` only,
  touchvl/imagebind/encoder.py) vs after ``import timm`` (its package ``__init__``: the model zoo and torchvision's,
  what loading it cost before);
* ``validation_identical``: a stage's validation of content it validated before, replayed from
  ``validation.replay_dir`` vs run by Great Expectations again (``replay_dir: null``, what every stage did before);
* ``query_preprocess``: one query image preprocessed by the exact path (no torchvision) vs torchvision's ``Compose``
  (the same tensor, bit for bit; tests/test_encoders.py).

The load average before and after is printed and written (bench/results/fixed_costs.json).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from touchvl import disk

ROOT = Path(__file__).resolve().parents[1]

_VALIDATION = """
import sys
from pathlib import Path
import numpy as np, pandas as pd
from touchvl import checks
from touchvl.params import ValidationParams
tmp = Path(sys.argv[1])
frame = pd.DataFrame({"uid": np.arange(2000), "norm": np.ones(2000)})
tables = [checks.Table("rows", frame, [checks.expect.ExpectColumnValuesToBeUnique(column="uid", severity="critical"),
          checks.expect.ExpectColumnValuesToBeBetween(column="norm", min_value=0.999, max_value=1.001, severity="critical")],
          id_column="uid")]
replay = None if sys.argv[2] == "gx" else tmp / "records"
report = checks.run_validation("bench", tables, ValidationParams(reports_dir=tmp / "reports", replay_dir=replay))
assert report.success and (sys.argv[2] != "replay" or report.replayed_from), report
"""

_PREPROCESS = """
import sys
import numpy as np
from PIL import Image
img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
if sys.argv[1] == "torchvision":
    from torchvision import transforms
    t = transforms.Compose([transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
                            transforms.CenterCrop(224), transforms.ToTensor(),
                            transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    x = t(img)
else:
    from touchvl.imagebind.preprocess import preprocess_image
    x = preprocess_image(img)
assert tuple(x.shape) == (3, 224, 224)
"""

CASES = {
    "encoder_load": {
        "touchvl": ["-c", "from touchvl.imagebind.encoder import imagebind_model_module; imagebind_model_module()"],
        "naive": ["-c", "import timm; from touchvl.imagebind.encoder import imagebind_model_module; imagebind_model_module()"],
    },
    "validation_identical": {"touchvl": ["-c", _VALIDATION, "{tmp}", "replay"], "naive": ["-c", _VALIDATION, "{tmp}", "gx"]},
    "query_preprocess": {"touchvl": ["-c", _PREPROCESS, "exact"], "naive": ["-c", _PREPROCESS, "torchvision"]},
}


def timed(argv: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"bench.fixed_costs: {argv[:2]} failed:\n{proc.stderr[-2000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="interleaved rounds (at least 3)")
    args = ap.parse_args()
    runs = max(3, args.runs)
    result = {"python": platform.python_version(), "cpus": os.cpu_count(), "runs": runs,
              "load_average_before": [round(x, 2) for x in os.getloadavg()], "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        # the replay record the "touchvl" validation case replays: one real run first
        timed([a.replace("{tmp}", tmp) for a in CASES["validation_identical"]["touchvl"][:-1]] + ["store"])
        times = {case: {"touchvl": [], "naive": []} for case in CASES}
        for _ in range(runs):  # interleaved: a drift in the machine's load hits both sides alike
            for case, sides in CASES.items():
                for side, argv in sides.items():
                    times[case][side].append(timed([a.replace("{tmp}", tmp) for a in argv]))
    for case, sides in times.items():
        t, n = sides["touchvl"], sides["naive"]
        row = result["cases"][case] = {
            side: {"min_s": round(min(v), 3), "median_s": round(statistics.median(v), 3)} for side, v in sides.items()}
        row["naive_over_touchvl"] = {"min": round(min(n) / min(t), 2), "median": round(statistics.median(n) / statistics.median(t), 2)}
        print(f"{case:>22}: touchvl min {min(t):.2f} s / median {statistics.median(t):.2f} s; naive min {min(n):.2f} s / "
              f"median {statistics.median(n):.2f} s; naive / touchvl {row['naive_over_touchvl']['median']}x (median)")
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    disk.write_json(Path(__file__).parent / "results" / "fixed_costs.json", result)
    print(f"load average (1, 5, 15 min) before {result['load_average_before']}, after {result['load_average_after']} "
          f"on {result['cpus']} CPUs")


if __name__ == "__main__":
    main()

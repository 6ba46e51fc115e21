"""Small valid chat fine-tuning files for tests."""
import json
from pathlib import Path


def write_dataset(path: Path, n: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"messages": [
                {"role": "system", "content": "You describe how things feel."},
                {"role": "user", "content": f"Sample {i}: how does a grainy, hard surface feel?"},
                {"role": "assistant", "content": f"It feels grainy and hard, like sandpaper (sample {i})."}]}) + "\n")

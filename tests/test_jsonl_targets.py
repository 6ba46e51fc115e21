"""`validate --target together`: Together AI's own limits on top of OpenAI's rules."""
import json
import subprocess
import sys
from pathlib import Path

from touchvl.chat.validate import validate_file
from tests.test_jsonl_validate import codes, data_url, example, write

ROOT = Path(__file__).resolve().parents[1]


def image(url):
    return {"type": "image_url", "image_url": {"url": url}}


# each line is fine for OpenAI and refused by Together, with the code Together's rule gives
TOGETHER_ONLY = {
    "image_not_base64": example([{"type": "text", "text": "How does it feel?"}, image("https://host.example/a.jpg")]),
    "image_mime_unsupported": example([image(data_url("JPEG", mime="jpg"))]),  # OpenAI takes image/jpg, Together wants image/jpeg
    "roles_not_alternating": {"messages": [{"role": "user", "content": "Feel this."},
                                           {"role": "user", "content": [image(data_url())]},
                                           {"role": "assistant", "content": "It feels smooth and hard."}]},
    "role_order": {"messages": [{"role": "user", "content": "How does it feel?"},
                                {"role": "system", "content": "You describe how things feel."},
                                {"role": "assistant", "content": "It feels smooth and hard."}]},
    "weight_invalid": {"messages": [{"role": "user", "content": "How does it feel?"},
                                    {"role": "assistant", "content": "It feels smooth and hard.", "weight": 0.5}]},
    "unrecognized_key": {**example(), "metadata": {"source": "ssvtp"}},
}


def test_each_together_rule_fires_at_its_line_and_openai_lets_it_through(tmp_path):
    lines, expected = [], []
    for i, (code, bad) in enumerate(TOGETHER_ONLY.items()):
        lines += [example(answer=f"It feels smooth and hard, sample {i}."), bad]  # distinct: no duplicate
        expected.append((len(lines), code))
    path = write(tmp_path, lines)
    together = validate_file(path, target="together")
    assert sorted(codes(together)) == sorted(expected), codes(together)
    openai_codes = codes(validate_file(path))
    # OpenAI's own rules do not object (the weight type is not one of them either)
    assert openai_codes == [], openai_codes


def test_good_together_lines_pass_including_png_webp_jpeg_and_ten_images(tmp_path):
    ten = [{"type": "text", "text": "Compare these surfaces."}] + [image(data_url("PNG"))] * 5 + [image(data_url("WEBP"))] * 5
    lines = [example(ten), example([image(data_url("JPEG"))]),
             {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                           {"role": "assistant", "content": "It feels smooth.", "weight": 0},
                           {"role": "user", "content": "b"}, {"role": "assistant", "content": "It feels rough.", "weight": 1}]}]
    report = validate_file(write(tmp_path, lines), target="together")
    assert report.ok, codes(report)
    eleven = example(ten + [image(data_url("PNG"))])
    assert codes(validate_file(write(tmp_path, [eleven], name="11.jsonl"), target="together")) == [(1, "too_many_images")]


def test_the_generated_datasets_pass_the_together_rules(tmp_path):
    """Our own jsonl stage's shape (system, user text + base64 images, assistant) is what Together takes."""
    from touchvl.chat.generate import Item, tactile_set

    url = data_url("JPEG", size=(64, 64))
    items = [Item(i, "smooth, hard, glossy", url, url) for i in range(6)]
    examples = tactile_set(items, 20, {"tactile_only": 0.6, "dual_image": 0.25, "text_only": 0.15},
                           ("describe", "compare", "material", "property"), seed=0,
                           system="You describe how things feel.", mode="base64", detail="low")
    path = tmp_path / "gen.jsonl"
    path.write_text("".join(json.dumps({"messages": e.messages}) + "\n" for e in examples))
    report = validate_file(path, target="together")
    assert report.ok and report.target == "together", codes(report)


def test_cli_target_together(tmp_path):
    good = [example(answer=f"It feels smooth and hard, sample {i}.") for i in range(9)]  # distinct: no duplicate
    bad = write(tmp_path, good + [TOGETHER_ONLY["image_not_base64"]], name="bad.jsonl")
    run = lambda *a: subprocess.run([sys.executable, "-m", "tasks.jsonl", "validate", *a], cwd=tmp_path,
                                    capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    openai_run = run(str(bad), "--report-dir", str(tmp_path / "r1"))
    assert openai_run.returncode == 0, openai_run.stdout + openai_run.stderr
    together_run = run(str(bad), "--target", "together", "--report-dir", str(tmp_path / "r2"))
    assert together_run.returncode == 1 and "line 10: image_not_base64" in together_run.stdout
    report = json.loads((tmp_path / "r2/report.json").read_text())
    assert report["target"] == "together" and report["model"] == "Qwen/Qwen3-VL-8B-Instruct"
    assert report["summary"]["cost"]["price_per_million"] == 0.48 and report["summary"]["cost"]["epochs"] == 3
    assert "Traceback" not in together_run.stderr
    assert run(str(bad), "--target", "fireworks").returncode == 2

import base64
from collections import Counter
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.jsonl_fuzz import bomb_png
from touchvl.chat.prices import auto_epochs, cost_estimate
from touchvl.chat.validate import MAX_IMAGE_BYTES, TokenCounter, estimate_tokens, image_tokens, validate_file

ROOT = Path(__file__).resolve().parents[1]


def data_url(fmt="PNG", size=(64, 48), mime=None):
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format=fmt)
    return f"data:image/{mime or fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def example(user_parts=None, answer="It feels smooth, hard and slightly glossy.", system=True):
    messages = [{"role": "system", "content": "You describe how things feel."}] if system else []
    messages.append({"role": "user", "content": user_parts or [{"type": "text", "text": "How does this feel?"},
                                                               {"type": "image_url", "image_url": {"url": data_url(), "detail": "low"}}]})
    messages.append({"role": "assistant", "content": answer})
    return {"messages": messages}


def write(tmp_path, lines, name="f.jsonl", newline="\n", bom=False):
    path = tmp_path / name
    text = newline.join(l if isinstance(l, str) else json.dumps(l) for l in lines) + newline
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def codes(report):
    return [(f.line, f.code) for f in report.errors]


@pytest.mark.parametrize("bom,newline", [(False, "\n"), (True, "\r\n")])
def test_good_file_passes_with_bom_and_crlf(tmp_path, bom, newline):
    lines = [example(answer=f"It feels smooth, hard and slightly glossy (sample {i}).") for i in range(12)]
    report = validate_file(write(tmp_path, lines, newline=newline, bom=bom))
    assert report.ok, codes(report)
    assert report.summary.examples == 12 and report.summary.images == {1: 12}
    assert not report.warnings and report.summary.duplicates == 0


BAD = {
    "invalid_json": '{"messages": [',
    "data_type": "[1, 2]",
    "missing_messages_list": {"msgs": []},
    "message_missing_key": {"messages": [{"content": "hi"}, {"role": "assistant", "content": "well then"}]},
    "message_unrecognized_key": {"messages": [{"role": "user", "content": "hi", "mood": "x"}, {"role": "assistant", "content": "ok fine then"}]},
    "unrecognized_role": {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "ok fine then"}]},
    "missing_content": {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "ok fine then"}]},
    "example_missing_assistant_message": {"messages": [{"role": "user", "content": "hi"}]},
    "image_in_non_user_message": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": data_url()}}]}]},
    "too_many_images": example([{"type": "image_url", "image_url": {"url": data_url(), "detail": "low"}}] * 11),
    "image_url_invalid": example([{"type": "image_url", "image_url": {"url": "file:///tmp/x.jpg"}}]),
    "image_format_unsupported": example([{"type": "image_url", "image_url": {"url": data_url("GIF")}}]),
    "image_data_corrupt": example([{"type": "image_url", "image_url": {"url": data_url("PNG", mime="jpeg")}}]),
    "unknown_part_type": example([{"type": "audio", "audio": "x"}]),
    "too_many_tokens": example(answer="word " * 300_000),
}


def test_every_error_code_at_the_right_line(tmp_path):
    lines = []
    expected = []
    for code, bad in BAD.items():
        lines.append(example(answer=f"It feels smooth, hard and slightly glossy (sample {len(lines)})."))
        lines.append(bad)
        expected.append((len(lines), code))
    report = validate_file(write(tmp_path, lines))
    found = codes(report)
    for line, code in expected:
        assert (line, code) in found, (code, [f for f in found if f[0] == line])
    assert {line for line, _ in found} == {line for line, _ in expected}  # good lines are clean


def test_corrupt_base64_oversized_image_unreachable_url_blank_line_and_empty_file(tmp_path):
    big = "data:image/png;base64," + base64.b64encode(b"\x89PNG" + b"0" * (MAX_IMAGE_BYTES + 10)).decode()
    lines = [example([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]),
             example([{"type": "image_url", "image_url": {"url": big}}]),
             example([{"type": "image_url", "image_url": {"url": "https://example.invalid/a.jpg"}}])]
    path = write(tmp_path, [json.dumps(lines[0]), json.dumps(lines[1]), "", json.dumps(lines[2])])

    def offline_fetch(url):
        raise ConnectionError("no route to host")

    report = validate_file(path, check_urls=True, fetch=offline_fetch)
    assert codes(report) == [(1, "image_data_corrupt"), (2, "image_too_large"), (3, "blank_line"), (4, "image_unreachable")]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert codes(validate_file(empty)) == [(1, "empty_file")]


def test_fetched_image_is_costed_by_its_real_size(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (1024, 1024)).save(buf, format="JPEG")
    path = write(tmp_path, [example([{"type": "image_url", "image_url": {"url": "https://host/x.jpg", "detail": "high"}}])])
    report = validate_file(path, check_urls=True, fetch=lambda url: buf.getvalue())
    assert report.ok and report.summary.image_tokens == 765


def test_warnings(tmp_path):
    lines = [example(system=False), example(answer="Soft."), example(answer="Soft."),
             {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a long enough answer"}]}]
    report = validate_file(write(tmp_path, lines))
    got = {(w.line, w.code) for w in report.warnings}
    assert {(1, "no_system_message"), (2, "short_assistant_message"), (3, "duplicate_example"),
            (4, "no_user_message"), (0, "few_examples")} <= got


def test_image_token_formula_on_known_sizes():
    assert image_tokens(1024, 1024, "low") == 85
    assert image_tokens(1024, 1024, "high") == 765  # 768x768 -> 4 tiles
    assert image_tokens(2048, 4096, "high") == 1105  # 2048x4096 -> 1024x2048 -> 768x1536 -> 6 tiles
    assert image_tokens(128, 128, "auto") == 255  # small images are not upscaled: 1 tile


def test_token_counts_of_known_strings():
    counter = TokenCounter()
    assert counter.exact and "o200k_base" in counter.source  # quicktok's bundled o200k works offline
    assert counter.count("hello world") == 2
    assert counter.count("It feels smooth, hard and slightly glossy.") == 9
    assert counter.count("") == 0
    assert estimate_tokens("hello world") == 3 and estimate_tokens("é" * 4) == 2


def test_cost_with_auto_epochs():
    assert auto_epochs(10) == 10 and auto_epochs(40) == 3 and auto_epochs(20_000) == 1 and auto_epochs(5) == 20
    from touchvl.chat.validate import Summary
    summary = Summary(tokens=Counter({1000: 10}))
    cost = cost_estimate(summary, "gpt-4o-2024-08-06", {"gpt-4o-2024-08-06": 25.0})
    assert cost["epochs"] == 10 and cost["trained_tokens"] == 100_000 and cost["cost_usd"] == 2.5
    capped = cost_estimate(Summary(tokens=Counter({100_000: 1})), "gpt-4o-2024-08-06", {"gpt-4o-2024-08-06": 25.0}, n_epochs=2)
    assert capped["billed_tokens_per_epoch"] == 65_536 and capped["trained_tokens"] == 131_072


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tasks.jsonl", *args], cwd=ROOT, capture_output=True, text=True)


def test_cli_exit_codes_reports_and_no_traceback(tmp_path):
    good = write(tmp_path, [example(answer=f"It feels smooth and hard, sample {i}.") for i in range(10)], name="good.jsonl")
    ok = _cli("validate", str(good), "--report-dir", str(tmp_path / "r"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    report = json.loads((tmp_path / "r/report.json").read_text())
    assert report["ok"] and report["summary"]["cost"]["epochs"] == 10
    assert (tmp_path / "r/report.md").is_file() and "<table>" in (tmp_path / "r/report.html").read_text()
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(b"\x00\xff\xfe binary \x80\n{\"messages\": 5}\n")
    bad = _cli("validate", str(garbage))
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "invalid_json" in bad.stdout
    assert _cli("validate").returncode == 2 and _cli("validate", str(tmp_path / "missing.jsonl")).returncode == 2
    assert _cli("bogus").returncode == 2


WEIRD = [
    '{"messages": [{"role": ["a"], "content": "x"}]}',
    '{"messages": [{"role": "user", "content": [7]}, {"role": "assistant", "content": null}]}',
    '{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}, {"role": "assistant", "content": 5}]}',
    '{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 3, "detail": []}}]}]}',
    '{"messages": [{"role": {"x": 1}, "content": [{"type": ["text"]}]}]}',
    '{"messages": "hello"}', "null", "3.5", '"str"', '{"messages": [null, 1, "x"]}',
]


def test_no_input_shape_makes_the_validator_crash(tmp_path):
    path = tmp_path / "weird.jsonl"
    path.write_text("\n".join(WEIRD) + "\n")
    report = validate_file(path)
    assert {f.line for f in report.errors} == set(range(1, len(WEIRD) + 1))
    proc = _cli("validate", str(path), "--report-dir", str(tmp_path / "r"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr


def test_duplicate_detection_survives_bloom_false_positives(tmp_path, monkeypatch):
    from touchvl.chat import validate as jsonl_validate

    monkeypatch.setattr(jsonl_validate.DigestFilter, "BITS", 16)  # nearly every example collides in the filter
    lines = [example(answer=f"It feels smooth and hard, sample {i}.") for i in range(12)] + [example(answer="It feels smooth and hard, sample 3.")]
    report = validate_file(write(tmp_path, lines))
    assert [(w.line, w.message) for w in report.warnings if w.code == "duplicate_example"] == [(13, "same example as line 4")]


def test_the_filter_checked_a_block_at_a_time_answers_as_one_digest_at_a_time(monkeypatch):
    import os

    from touchvl.chat.validate import DigestFilter

    for bits in (64, 1 << 12, 1 << 26):  # nearly everything collides .. almost nothing does
        monkeypatch.setattr(DigestFilter, "BITS", bits)
        digests = [os.urandom(16) for _ in range(3000)]
        digests += digests[100:400:7] + [digests[-1]] * 3  # real repeats, one of them back to back
        one, block = DigestFilter(), DigestFilter()
        expected = [i for i, d in enumerate(digests) if one.check_and_add(d)]
        got = block.check_and_add_many(b"".join(digests[:1000])) + \
            [1000 + i for i in block.check_and_add_many(b"".join(digests[1000:]))]  # two calls: state carries over
        assert got == expected and block.bits == one.bits
        assert len(expected) >= 46  # the repeats at least
    assert DigestFilter().check_and_add_many(b"") == []


# ------------------------------------------------------------------ the duplicate rate
def test_duplicate_rate_is_in_the_banner_and_over_the_limit_fails(tmp_path):
    from touchvl.chat.report import report_dict, write_reports

    distinct = [example(answer=f"It feels smooth and hard, sample {i}.") for i in range(97)]
    path = write(tmp_path, distinct + distinct[:3])  # 3 of 100 repeat an earlier line
    report = validate_file(path)  # the default limit: 1%
    assert report.summary.duplicates == 3 and report.summary.duplicate_fraction == 0.03
    assert not report.ok and [(f.line, f.code) for f in report.errors] == [(0, "too_many_duplicates")]
    assert "3 of 100 examples (3.0%)" in report.errors[0].message
    assert validate_file(path, max_duplicate_fraction=0.05).ok and validate_file(path, max_duplicate_fraction=None).ok
    d = report_dict(report, cost_estimate(report.summary, report.model, {"gpt-4o-2024-08-06": 25.0}))
    assert d["summary"]["duplicate_examples"] == 3 and d["summary"]["duplicate_fraction"] == 0.03
    write_reports(d, tmp_path / "r")
    for name in ("report.md", "report.html"):
        assert "3 duplicates (3.0%; at most 1.0% allowed)" in (tmp_path / "r" / name).read_text()
    proc = _cli("validate", str(path), "--report-dir", str(tmp_path / "r2"))
    assert proc.returncode == 1 and "3 duplicates (3.0%)" in proc.stdout and "too_many_duplicates" in proc.stdout
    ok = subprocess.run([sys.executable, "-m", "touchvl", "validate", str(path), "--report-dir", str(tmp_path / "r3"),
                         "--max-duplicate-fraction", "0.05"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr


@pytest.mark.parametrize("model", [None, "gpt-4o-mini-2024-07-18"])
def test_validate_costs_the_same_inside_and_outside_the_project(tmp_path, model):
    """Inside the project `touchvl validate` prices with params.yaml, outside with the schema default: one table."""
    path = write(tmp_path, [example(answer=f"It feels smooth and hard, sample {i}.") for i in range(20)])
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    costs = []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's package outside it too (a shared venv may hold another)
    for where, cwd in (("in", ROOT), ("out", outside)):
        proc = subprocess.run([sys.executable, "-m", "touchvl", "validate", str(path), "--report-dir",
                               str(tmp_path / f"report-{where}"), *(["--model", model] if model else [])],
                              cwd=cwd, capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        cost = json.loads((tmp_path / f"report-{where}" / "report.json").read_text())["summary"]["cost"]
        assert f"est. ${cost['cost_usd']} " in proc.stdout
        costs.append(cost)
    assert costs[0] == costs[1]
    assert costs[0]["model"] == (model or "gpt-4o-2024-08-06") and costs[0]["cost_usd"] > 0


# ------------------------------------------------------------------ hostile input: a verdict or exit 2, never a traceback


def _image_example(png: bytes):
    return example([{"type": "text", "text": "How does this feel?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}])


HOSTILE = {
    "deep_list": '{"messages": ' + "[" * 5000 + "]" * 5000 + "}",
    "deep_dict_under_parser_limit": '{"messages": [{"role": "user", "content": ' + '{"a":' * 900 + "1" + "}" * 900 + "}]}",
    "huge_int": '{"messages": [{"role": "user", "content": "hi", "weight": ' + "9" * 5000 + "}]}",
    "nan": '{"messages": [{"role": "user", "content": "hi", "weight": NaN}]}',
    "lone_surrogate": '{"messages": [{"role": "user", "content": "caf\\ud800"}, {"role": "assistant", "content": "a b c d"}]}',
    "surrogate_role": '{"messages": [{"role": "\\udfff", "content": "x"}]}',
    "surrogate_key": '{"messages": [{"role": "user", "content": "x", "\\ud800": 1}]}',
    "control_chars": '{"messages": [{"role": "\\u001b[31mred", "content": "x"}]}',
}


def test_hostile_lines_are_findings_not_crashes(tmp_path):
    lines = [example(answer=f"It feels smooth and hard, sample {i}.") for i in range(10)]
    lines += list(HOSTILE.values())
    lines += [_image_example(bomb_png()), _image_example(bomb_png(7000, 7000))]
    path = write(tmp_path, lines)
    report = validate_file(path)
    found = dict(codes(report))
    n = 10
    assert found[n + 1] == "nesting_too_deep" or found[n + 1] == "invalid_json"
    assert found[n + 2] == "nesting_too_deep"
    assert found[n + 3] == "invalid_json" and found[n + 4] == "invalid_json"
    assert found[n + 5] == found[n + 6] == found[n + 7] == "invalid_unicode"
    assert (n + 8, "unrecognized_role") in codes(report)
    assert found[n + 9] == "image_too_large" and found[n + 10] == "image_too_large"  # 49 M pixels > 40 M: not corrupt
    for f in report.errors:
        assert f.message.isprintable() and len(f.message) <= 501
    proc = _cli("validate", str(path), "--report-dir", str(tmp_path / "r"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    for name in ("report.json", "report.md", "report.html"):
        (tmp_path / "r" / name).read_text(encoding="utf-8")  # written, and valid UTF-8


def test_could_not_validate_is_exit_2(tmp_path):
    good = write(tmp_path, [example(answer=f"It feels smooth and hard, sample {i}.") for i in range(10)])
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    for args in (["--epochs", "²"], ["--epochs", "0"], ["--epochs", "9" * 5000], ["--epochs", "-3"],
                 ["--report-dir", str(a_file)], ["--report-dir", str(a_file / "sub")], ["--url-timeout", "nan"],
                 ["--max-duplicate-fraction", "2"]):
        proc = _cli("validate", str(good), *args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (args, proc.stderr)
    assert _cli("validate", str(tmp_path)).returncode == 2  # a folder
    weird_name = tmp_path / "caf\udcff.jsonl"  # a file name that is not UTF-8
    weird_name.write_bytes(good.read_bytes())
    proc = subprocess.run([sys.executable, "-m", "touchvl", "validate", str(weird_name)], cwd=ROOT, capture_output=True)
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr
    assert _cli("validate", str(good), "--epochs", "3").returncode == 0


def test_every_image_is_decoded_a_truncated_one_fails_at_its_line(tmp_path):
    rng = __import__("numpy").random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype="uint8"))
    urls = {}
    for fmt in ("JPEG", "PNG"):
        buf = io.BytesIO()
        noise.save(buf, format=fmt)
        whole = buf.getvalue()
        urls[fmt] = (f"data:image/{fmt.lower()};base64," + base64.b64encode(whole).decode(),
                     f"data:image/{fmt.lower()};base64," + base64.b64encode(whole[:int(len(whole) * 0.3)]).decode())
    lines = [example([{"type": "image_url", "image_url": {"url": urls["JPEG"][0]}}]),
             example([{"type": "image_url", "image_url": {"url": urls["JPEG"][1]}}]),  # the header is intact
             example([{"type": "image_url", "image_url": {"url": urls["PNG"][0]}}]),
             example([{"type": "image_url", "image_url": {"url": urls["PNG"][1]}}])]
    report = validate_file(write(tmp_path, lines))
    assert codes(report) == [(2, "image_data_corrupt"), (4, "image_data_corrupt")]
    assert all("not a readable image" in f.message for f in report.errors)


# ------------------------------------------------------------------ the fast paths (plain_example, simplejpeg)
def _jpeg_example(data: bytes, text: str, detail: str = "high"):
    return example([{"type": "text", "text": text},
                    {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(data).decode(),
                                                        "detail": detail}}])


def _reports_agree(path, variant: dict, **kw):
    """validate_file as configured and with ``variant``'s options on top: asserted equal -- findings, their order
    and messages, and the summary -- and the first returned."""
    report, other = validate_file(path, **kw), validate_file(path, **variant, **kw)
    assert report.errors == other.errors
    assert report.warnings == other.warnings
    assert report.summary == other.summary
    return report


def _same_report(path, **kw):
    """The fast paths against fast=False (check_example for every line, PIL for every image)."""
    return _reports_agree(path, {"fast": False}, **kw)


def test_fast_paths_find_exactly_what_the_general_checker_and_pil_find(tmp_path):
    from tests.jsonl_fuzz import jpeg_variants

    variants = jpeg_variants()
    names = list(variants)
    lines = [_jpeg_example(data, f"What is this surface ({name})?") for name, data in variants.items()]
    lines += [example(answer="It feels <|endoftext|> smooth."),  # encode raises on a special token's text
              example(answer="ok"),  # short_assistant_message
              example([{"type": "text", "text": "Hm?"}, {"type": "image_url", "image_url": {"url": "https://x.test/a.jpg"}}]),
              example([{"type": "text", "text": "Hm?"}, {"type": "image_url", "image_url": {"url": data_url(), "detail": "max"}}]),
              {"messages": [{"role": "user", "content": "What is it? 1234567890123456789012"},
                            {"role": "assistant", "content": "A 19-digit run, in a string: json or orjson alike."}]},
              {"messages": [{"role": "user", "content": "x", "weight": 12345678901234567890123},
                            {"role": "assistant", "content": "an integer beyond 64 bits"}]}]
    report = _same_report(write(tmp_path, lines))
    found = {names[f.line - 1] if f.line <= len(names) else f.line: f.code for f in report.errors}
    for name in ("truncated_30", "truncated_95", "no_eoi", "short_jfif", "short_icc", "tem_marker", "12_bit"):
        assert found[name] == "image_data_corrupt", name
    assert found["mpo"] == "image_format_unsupported" and found["png_bytes"] == "image_data_corrupt"
    for name in ("baseline", "progressive", "gray", "restarts", "icc", "exif", "cmyk", "corrupt_scan_0", "corrupt_scan_1"):
        assert name not in found, name  # a corrupt scan is a libjpeg warning: PIL reads it (simplejpeg, strict, does not)
    assert found[len(names) + 1] == "data_type" and found[len(names) + 4] == "image_url_invalid"


def test_fast_paths_on_the_fuzz_mutants(tmp_path):
    from tests.jsonl_fuzz import mutants

    for name, data in mutants(20_260_401, 120):
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(data)
        _same_report(path)
        _same_report(path, target="together")


def test_simplejpeg_decides_a_plain_jpeg_and_refuses_truncated_and_corrupt_ones():
    from tests.jsonl_fuzz import jpeg_variants
    from touchvl.chat.jpegcheck import jpeg_decodes, plain_jpeg_size
    from touchvl.chat.validate import image_header, pil_image_header

    v = jpeg_variants()
    for name in ("baseline", "progressive", "gray", "444", "restarts", "icc", "comment"):
        assert jpeg_decodes(v[name], 40_000_000) == (64, 48) == pil_image_header(v[name])[1], name
    for name in ("truncated_30", "truncated_95", "no_eoi", "corrupt_scan_0", "corrupt_scan_1", "corrupt_scan_2"):
        assert plain_jpeg_size(v[name]) == (64, 48) and jpeg_decodes(v[name], 40_000_000) is None, name  # the header is intact
    for name in ("truncated_30", "truncated_95", "no_eoi"):
        with pytest.raises(ValueError):
            image_header(v[name])
    assert image_header(v["corrupt_scan_0"]) == ("JPEG", (64, 48))  # simplejpeg refuses it, PIL reads it: PIL's verdict
    for name in ("exif", "cmyk", "mpo", "short_jfif", "short_adobe", "short_icc", "tem_marker", "padding", "mpf_junk"):
        assert plain_jpeg_size(v[name]) is None, name  # simplejpeg reads these; what PIL makes of them is PIL's to say


def test_plain_lines_and_jpegs_take_the_fast_paths(tmp_path, monkeypatch):
    from touchvl.chat import validate as jsonl_validate

    def not_called(*args, **kwargs):
        raise AssertionError("the general path")

    rng = __import__("numpy").random.default_rng(1)
    lines = []
    for i in range(12):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype="uint8")).save(buf, format="JPEG")
        lines.append(_jpeg_example(buf.getvalue(), f"How does sample {i} feel?", detail="low"))
    path = write(tmp_path, lines)
    monkeypatch.setattr(jsonl_validate, "check_example", not_called)
    monkeypatch.setattr(jsonl_validate, "pil_image_header", not_called)
    report = validate_file(path)
    assert report.ok and not report.warnings and report.summary.images == {1: 12} and report.summary.valid_examples == 12


def test_duplicates_whatever_the_key_order_and_spacing_and_never_by_a_digest_collision(tmp_path, monkeypatch):
    from touchvl.chat import validate as jsonl_validate

    lines = [example(answer=f"It feels smooth and hard, sample {i}.") for i in range(12)]
    same = example(answer="It feels smooth and hard, sample 3.")
    reordered = {"messages": [dict(reversed(list(m.items()))) for m in same["messages"]]}
    lines.append(json.dumps(reordered, separators=(" ,  ", " :\t")))
    path = write(tmp_path, lines)

    def duplicates():
        return [(w.line, w.message) for w in _same_report(path).warnings if w.code == "duplicate_example"]

    assert duplicates() == [(13, "same example as line 4")]
    # every line collides in the filter's fast digest (xxh3): the second pass's blake2b tells them apart
    monkeypatch.setattr(jsonl_validate.xxhash, "xxh3_128_digest", lambda data: b"\0" * 16)
    assert duplicates() == [(13, "same example as line 4")]


def test_a_remembered_jpeg_head_still_checks_the_scan_against_the_data():
    from tests.jsonl_fuzz import jpeg_variants
    from touchvl.chat.jpegcheck import _walk_jpeg, plain_jpeg_size

    base = jpeg_variants()["baseline"]
    sos = base.find(b"\xff\xda")
    assert plain_jpeg_size(base) == (64, 48) == plain_jpeg_size(base)  # walked, then looked up
    cut = base[:sos + 6]  # the head, then a start of scan longer than what is left
    assert plain_jpeg_size(cut) is None and _walk_jpeg(cut) == (None, -1)
    hidden = base[:2] + b"\xff\xfe\x00\x06\xff\xda\x00\x00" + base[2:]  # a comment holding the scan marker's bytes
    assert plain_jpeg_size(hidden) == (64, 48) == plain_jpeg_size(hidden)


def _same_with_workers(path, workers, **kw):
    return _reports_agree(path, {"workers": workers}, **kw)


def test_workers_make_the_report_one_process_makes(tmp_path):
    from tests.jsonl_fuzz import mutants

    lines = [example(answer=f"It feels smooth and hard, sample {i}.") for i in range(40)]
    lines[7] = lines[31] = ""  # blank lines inside the file
    lines[20:23] = ["", "  ", "{broken"]
    lines[35] = lines[2]  # a duplicate of an early line, in a later chunk
    lines += [example(answer="ok"), "", ""]  # a warning, then blank lines at the end (not findings)
    path = write(tmp_path, lines, newline="\r\n", bom=True)
    for workers in (2, 3, 5, 16):
        report = _same_with_workers(path, workers)
    assert (36, "same example as line 3") in [(w.line, w.message) for w in report.warnings if w.code == "duplicate_example"]
    assert [f.line for f in report.errors if f.code == "blank_line"] == [8, 21, 22, 32]
    for name, data in mutants(20_260_402, 40):
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(data)
        _same_with_workers(path, 3)


def test_simplejpeg_and_pil_agree_on_encoder_settings_sizes_and_cuts():
    import itertools

    import numpy as np
    import simplejpeg

    from touchvl.chat.jpegcheck import jpeg_decodes
    from touchvl.chat.validate import image_outcome

    rng, fast = np.random.default_rng(3), 0
    for (w, h), quality, subsampling, progressive in itertools.product(((1, 1), (17, 9), (160, 120)), (10, 95), (0, 2),
                                                                      (False, True)):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype="uint8")).save(
            buf, "JPEG", quality=quality, subsampling=subsampling, progressive=progressive)
        whole = buf.getvalue()
        other = simplejpeg.encode_jpeg(rng.integers(0, 255, (h, w, 3), dtype="uint8"), quality=quality)  # libjpeg-turbo's markers
        for data in (whole, whole[:len(whole) // 2], whole[:int(len(whole) * 0.99)], other, other[:-3]):
            assert image_outcome(data, "JPEG") == image_outcome(data, "JPEG", fast=False)
            fast += jpeg_decodes(data, 40_000_000) is not None
    assert fast == 2 * 24  # every whole JPEG of either encoder took the fast path; no cut one did


def test_base64_payload_is_binascii_strict_verdict_on_fuzzed_and_crafted_payloads():
    """pybase64 goes first, binascii decides where it refuses: the bytes (or None) are always binascii's strict ones."""
    import binascii
    import random

    from touchvl.chat.validate import base64_payload

    def strict(text):
        try:
            return binascii.a2b_base64(text, strict_mode=True)
        except (binascii.Error, ValueError):
            return None

    crafted = ["", "QQ==", "QQ=", "QQ", "Q", "QUJD", "QUJD\n", "QUJ D", "QQ==QQ==", "=QQ=", "QQ=A", "QUJD=",
               "QUJDRA===", "Qé==", "QQ==\x00", "-_-_", "QU+/", "AAAAAAAAAAAA=", "  QQ=="]
    rng = random.Random(7)
    alphabet = "ABCab01+/=\n -_é\x00\r"
    fuzzed = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14))) for _ in range(20000)]
    fuzzed += [base64.b64encode(rng.randbytes(rng.randint(0, 30))).decode() + rng.choice(["", "=", "==", "A"])
               for _ in range(5000)]
    accepted = 0
    for text in crafted + fuzzed:
        assert base64_payload(text) == strict(text), repr(text)
        accepted += strict(text) is not None
    assert "QUJD=" in crafted and base64_payload("QUJD=") == b"ABC"  # pybase64 refuses it; binascii takes it
    assert 3000 < accepted < len(fuzzed) - 3000  # the fuzz reaches both verdicts


def test_the_last_jpeg_head_shortcut_answers_as_the_walk(tmp_path):
    """plain_jpeg_size's last-head comparison gives the walk's answer: the same size for another scan of the same
    head, None for a scan cut short, and a different head is walked, not taken for the last one."""
    from touchvl.chat import jpegcheck

    def jpeg(colour, size=(64, 48)):
        out = io.BytesIO()
        Image.new("RGB", size, colour).save(out, "JPEG", quality=75)
        return out.getvalue()

    first, second, other_size = jpeg((10, 20, 30)), jpeg((200, 100, 50)), jpeg((10, 20, 30), (32, 40))
    assert jpegcheck.plain_jpeg_size(first) == (64, 48)
    assert jpegcheck._LAST_HEAD[0] == first[:first.find(b"\xff\xda") + 4]
    assert second.startswith(jpegcheck._LAST_HEAD[0])  # the shortcut's case
    assert jpegcheck.plain_jpeg_size(second) == jpegcheck._walk_jpeg(second)[0] == (64, 48)
    sos = second.find(b"\xff\xda")
    assert jpegcheck.plain_jpeg_size(second[:sos + 5]) is None  # the scan header claims more bytes than there are
    assert jpegcheck.plain_jpeg_size(other_size) == (32, 40)
    assert jpegcheck.jpeg_decodes(second[:len(second) * 3 // 10], 10**8) is None  # truncated: PIL decides

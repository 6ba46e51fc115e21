"""prepare under hostile input: captions.csv and split.csv as a real CSV parser sees them, bad sensors and ids.

Every case here is a file a user (or an attacker) can hand to ``data.root``: each must end in a quarantine row
naming the file and line, or a one-line error -- never a crash and never a plausible wrong row.
"""
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tasks.prepare import run
from touchvl.data.prepare import REASONS, PrepareError
from tests.conftest import make_params

ROOT = Path(__file__).resolve().parents[1]
HEADER = b"index,caption,sensor\n"


def _good_rows(ids) -> bytes:
    return b"".join(f'{i},"smooth, glossy, hard",{i % 2}\n'.encode() for i in ids)


def _prepare(tmp_path, root, **prepare):
    params = make_params(tmp_path, root, **{"max_bad_fraction": 0.9, "augment": {"copies": 0}, **prepare})
    manifest, scan = run(params)
    q = pd.read_csv(params.prepare.quarantine_csv, dtype=str, keep_default_na=False)
    assert q["id"].is_unique and set(q["reason"]) <= set(REASONS)
    return manifest.set_index("source_id"), q.set_index("id"), scan


# ----------------------------------------------------------------------------- item 3: CSV records


def test_quoted_newline_and_doubled_quotes_make_one_record_and_inject_no_row(tmp_path, dataset):
    (dataset / "captions.csv").write_bytes(
        HEADER
        + b'0,"smooth,\n8,injected",0\n'         # lines 2-3: one record; '8,injected' is caption text, not a row
        + b'1,"a ""quoted""\nword",1\n'          # lines 4-5: doubled quotes across a newline
        + b"abc,rough,0\n"                        # line 6: reported on its own physical line
        + _good_rows(range(2, 20)))
    manifest, q, _ = _prepare(tmp_path, dataset)
    assert manifest.loc[0, "caption"] == "smooth, 8,injected"
    assert manifest.loc[1, "caption"] == 'a "quoted" word'
    assert manifest.loc[8, "caption"] == "smooth, glossy, hard"  # its own row, nothing injected
    assert q.to_dict("index") == {"abc": {"file": "captions.csv:6", "reason": "bad_id",
                                          "detail": "id 'abc' is not a non-negative integer"}}


def test_unterminated_and_misplaced_quotes_cost_only_their_own_record(tmp_path, dataset):
    (dataset / "captions.csv").write_bytes(
        HEADER
        + b'3,"rough "grippy" hard",1\n'    # line 2: a quote closed mid-field
        + b"4,rough, hard,0\n"              # line 3: unquoted comma: four fields under a three-column header
        + _good_rows(r for r in range(20) if r not in (0, 3, 4))
        + b'0,"rough, unterminated,0\n')    # last line: the quote never closes
    manifest, q, _ = _prepare(tmp_path, dataset)
    assert dict(q["reason"]) == {"0": "bad_row", "3": "bad_row", "4": "bad_row"}
    assert q.loc["3", "file"] == "captions.csv:2" and q.loc["4", "file"] == "captions.csv:3"
    assert q.loc["0", "file"] == "captions.csv:21" and "quote" in q.loc["0", "detail"]
    assert "4 fields" in q.loc["4", "detail"]
    assert sorted(manifest.index) == [i for i in range(20) if i not in (0, 3, 4)]


def test_unterminated_quote_early_in_the_file_does_not_swallow_the_rest(tmp_path, dataset):
    (dataset / "captions.csv").write_bytes(HEADER + b'0,"rough,0\n' + _good_rows(range(1, 20)))
    manifest, q, _ = _prepare(tmp_path, dataset)
    assert dict(q["reason"]) == {"0": "bad_row"} and q.loc["0", "file"] == "captions.csv:2"
    assert sorted(manifest.index) == list(range(1, 20))


def test_non_utf8_multiline_record_costs_only_its_id_and_keeps_line_numbers(tmp_path, dataset):
    (dataset / "captions.csv").write_bytes(
        b"\xef\xbb\xbf" + HEADER                 # a UTF-8 BOM is fine
        + b'5,"caf\xe9,\nsmooth",1\n'            # lines 2-3: not UTF-8
        + b'6,"two\nlines",0\n'                  # lines 4-5
        + b"x7,rough,0\n"                        # line 6
        + _good_rows(r for r in range(20) if r not in (5, 6)))
    manifest, q, _ = _prepare(tmp_path, dataset)
    assert dict(q["reason"]) == {"5": "bad_encoding", "x7": "bad_id"}
    assert q.loc["5", "file"] == "captions.csv:2" and q.loc["x7", "file"] == "captions.csv:6"
    assert manifest.loc[6, "caption"] == "two lines"
    assert len(manifest) == 19


# ----------------------------------------------------------------------------- captions, sensors, ids


def test_caption_over_the_csv_field_limit_is_quarantined_not_a_crash(tmp_path, dataset):
    huge, long = "rough " * 21_846, "soft " * 2_500  # 131,076 and 12,500 characters
    rows = [(i, "smooth", 0) for i in range(20)]
    rows[2], rows[3] = (2, huge, 0), (3, long, 0)
    pd.DataFrame(rows, columns=["index", "caption", "sensor"]).to_csv(dataset / "captions.csv", index=False)
    manifest, q, _ = _prepare(tmp_path, dataset)
    assert dict(q["reason"]) == {"2": "caption_too_long", "3": "caption_too_long"}
    assert "prepare.max_caption_chars=10000" in q.loc["2", "detail"]
    # the limit is ours, not the csv module's: raised, a caption past 131,072 characters is read whole
    manifest, q, _ = _prepare(tmp_path / "raised", dataset, max_caption_chars=200_000)
    assert q.empty and manifest.loc[2, "caption"] == huge.strip()


@pytest.mark.parametrize("sensor", ["²", str(2**70), "100000000", "64", "-2", "1.5", "x", "9" * 5000])
def test_bad_sensor_is_quarantined_with_its_line(tmp_path, dataset, sensor):
    rows = [(i, "smooth", i % 2) for i in range(20)]
    rows[4] = (4, "smooth", sensor)
    pd.DataFrame(rows, columns=["index", "caption", "sensor"]).to_csv(dataset / "captions.csv", index=False)
    manifest, q, _ = _prepare(tmp_path, dataset)
    assert dict(q["reason"]) == {"4": "bad_sensor"}
    assert q.loc["4", "file"] == "captions.csv:6" and "prepare.max_sensor_id=63" in q.loc["4", "detail"]
    assert 4 not in manifest.index and manifest["sensor_id"].between(0, 1).all()


def test_sensor_bounds_follow_max_sensor_id(tmp_path, dataset):
    rows = [(i, "smooth", s) for i, s in enumerate([64, -1, "", 63] + [0] * 16)]
    pd.DataFrame(rows, columns=["index", "caption", "sensor"]).to_csv(dataset / "captions.csv", index=False)
    manifest, q, _ = _prepare(tmp_path, dataset, max_sensor_id=64, default_sensor=5)
    assert q.empty
    assert manifest.loc[[0, 1, 2, 3], "sensor_id"].tolist() == [64, -1, 5, 63]


def test_a_mistyped_id_is_one_quarantine_row(tmp_path, dataset):
    rows = [(i, "smooth", 0) for i in range(20)]
    rows[7], rows[12], rows[13] = ("7.0", "smooth", 0), ("\uff11\uff12", "smooth", 0), ("13x", "smooth", 0)
    rows.append(("abc", "rough", 0))  # no image id is spelled in it: stays a row of its own
    pd.DataFrame(rows, columns=["index", "caption", "sensor"]).to_csv(dataset / "captions.csv", index=False)
    for kind in ("tac", "rgb"):  # a mistyped file name, the same class: image_15.0_tac.jpg
        (dataset / f"images_{kind}/image_15_{kind}.jpg").rename(dataset / f"images_{kind}/image_15.0_{kind}.jpg")
    (dataset / "images_tac/image_16_tac.jpg").rename(dataset / "images_tac/image_16a_tac.jpg")
    manifest, q, scan = _prepare(tmp_path, dataset)
    assert dict(q["reason"]) == {"7": "bad_id", "12": "bad_id", "13": "bad_id", "15": "bad_id",
                                 "16": "bad_id", "abc": "bad_id"}
    assert q.loc["7", "file"] == "captions.csv:9" and "'7.0'" in q.loc["7", "detail"]
    assert q.loc["16", "file"].endswith("image_16a_tac.jpg")
    assert scan.n_candidates == 21 and len(scan.pairs) == 15  # 20 image ids + the 'abc' row, each once


# ----------------------------------------------------------------------------- split.csv


@pytest.mark.parametrize("content, match", [
    (b"", r"split\.csv: empty file"),
    (b"index,split\n0,train\n1,te\xe9st\n", r"split\.csv:3: not UTF-8"),
    (b"index,split\n0,train\n1,\"test\n2,train\n", r"split\.csv:3: malformed CSV record"),
    (b"index,split\n0,train\n1,test\n0,test\n", r"split\.csv:4: id 0 is already 'train' at line 2"),
    (b"index,split\n0,train,x\n", r"split\.csv:2: 3 fields"),
    (b"idx,split\n0,train\n", r"split\.csv:1: missing column\(s\) \['index'\]"),
])
def test_bad_split_file_is_a_clear_error_naming_file_and_line(tmp_path, dataset, content, match):
    (dataset / "split.csv").write_bytes(content)
    with pytest.raises(PrepareError, match=match):
        run(make_params(tmp_path, dataset))


def test_split_file_repeated_rows_and_quoted_fields_are_fine(tmp_path, dataset):
    (dataset / "split.csv").write_bytes(b'index,split\n"0",test\n0,test\n1, Train \n')
    manifest, _ = run(make_params(tmp_path, dataset))
    assert manifest.groupby("source_id")["split"].first()[[0, 1]].tolist() == ["test", "train"]


def test_cli_on_a_non_utf8_split_file_prints_one_line_no_traceback(tmp_path, dataset):
    (dataset / "split.csv").write_bytes(b"index,split\n0,train\n1,te\xe9st\n")
    (tmp_path / "params.yaml").write_text(f"data:\n  root: {dataset}\n")
    proc = subprocess.run([sys.executable, "-m", "tasks.prepare"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"{dataset / 'split.csv'}:3: not UTF-8" in proc.stderr


def test_an_id_of_thousands_of_digits_and_a_non_utf8_file_name_are_bad_ids(tmp_path, dataset):
    with open(dataset / "captions.csv", "ab") as fh:
        fh.write(b"9" * 5000 + b",rough,0\n")  # int() of 5,000 digits raises; the row is line 22
    name = bytes(dataset / "images_tac") + b"/image_\xff7_tac.jpg"  # a file name that is not UTF-8
    with open(name, "wb") as fh:
        fh.write((dataset / "images_tac/image_0_tac.jpg").read_bytes())
    manifest, q, _ = _prepare(tmp_path, dataset)
    assert dict(q["reason"]) == {"9" * 5000: "bad_id", "\ufffd7": "bad_id"}
    assert q.loc["9" * 5000, "file"] == "captions.csv:22" and len(q.loc["9" * 5000, "detail"]) < 100
    assert len(manifest) == 20


@pytest.mark.parametrize("name", ["captions.csv", "split.csv"])
def test_an_unreadable_csv_file_is_a_clear_error(tmp_path, dataset, monkeypatch, name):
    # as root, chmod cannot make a file unreadable: the OS's answer is simulated at the read
    (dataset / "split.csv").write_text("index,split\n0,train\n")
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == name:
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(PrepareError, match=rf"{name}: cannot be read \(Permission denied\)"):
        run(make_params(tmp_path, dataset))


def test_a_header_with_a_non_utf8_extra_column_is_still_read(tmp_path, dataset):
    (dataset / "captions.csv").write_bytes(b"index,caption,sensor,l\xe9gende\n"
                                           + b"".join(f"{i},smooth,0,x\n".encode() for i in range(20)))
    manifest, q, _ = _prepare(tmp_path, dataset)
    assert q.empty and len(manifest) == 20

"""Bad input through the real `sari-ray` executable: each case ends in seconds, with a message and no traceback,
before any Ray actor or vLLM engine starts. Prints each case's time-to-fail (run with -s to see them)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sari_ray.data.audio import write_wav

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SARI_RAY = Path(sys.executable).parent / "sari-ray"
DEMO = str(REPO / "configs" / "demo_cpu.yaml")
SECONDS = 60  # generous for a loaded 2-core CI machine; measured here: 3-10 s, mostly imports


def run(*argv: str, code: int, expect: tuple[str, ...] = (), cwd: Path | None = None, case: str = "") -> str:
    start = time.perf_counter()
    proc = subprocess.run([str(SARI_RAY), *argv], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={k: v for k, v in os.environ.items() if k != "SARI_RAY_DEBUG"})
    elapsed = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    print(f"\ntime-to-fail | {case or ' '.join(argv[:2])} | exit {proc.returncode} | {elapsed:.1f} s")
    assert proc.returncode == code, output
    assert "Traceback" not in output, output
    assert elapsed < SECONDS, f"took {elapsed:.1f} s"
    for text in expect:
        assert text in output, output
    return output


def _row(i: int, **overrides) -> str:
    row = dict(id=f"r{i}", audio="tone.wav", question="High or low?", choices=["high", "low"], answer="low", tier=0)
    row.update(overrides)
    return json.dumps(row)


@pytest.fixture
def folder(tmp_path) -> Path:
    write_wav(tmp_path / "tone.wav", np.full(8000, 0.1, np.float32))
    write_wav(tmp_path / "blip.wav", np.full(160, 0.1, np.float32))  # 0.01 s
    return tmp_path


def _write(folder: Path, name: str, lines: list[str]) -> str:
    (folder / name).write_text("\n".join(lines) + "\n")
    return str(folder / name)


def test_validate_lists_malformed_and_broken_rows_together(folder):
    broken = [_row(i, answer="medium") for i in range(8)]
    path = _write(folder, "d.jsonl", ["{oops", *broken, "[1, 2]"])
    out = run("data", "validate", "--data", path, code=1, case="validate: 2 malformed + 8 broken rows",
              expect=("10 problem(s)", "d.jsonl:1: malformed_row", "d.jsonl:9: id='r7': answer_not_in_choices"))
    assert out.count(": answer_not_in_choices: ") == 8
    run("data", "validate", "--data", path, "--policy", "skip", code=1, expect=("no valid samples left",),
        case="validate --policy skip: nothing left")
    path = _write(folder, "e.jsonl", ["{oops", _row(1), _row(2), "[1, 2]"])
    run("data", "validate", "--data", path, "--policy", "skip", code=0,
        case="validate --policy skip: malformed dropped", expect=("4 samples, 2 kept, 2 dropped", "malformed_row: 2"))


def test_validate_non_utf8_empty_huge_short_and_outside(folder):
    latin1 = folder / "latin1.jsonl"
    latin1.write_bytes(_row(0).encode() + b"\n" + _row(1).encode().replace(b"High", b"H\xefgh") + b"\n")
    run("data", "validate", "--data", str(latin1), code=1, case="validate: non-UTF-8 byte",
        expect=("latin1.jsonl:2: malformed_row: not UTF-8: byte 0xef at byte offset",))
    (folder / "empty.jsonl").write_text("")
    run("data", "validate", "--data", str(folder / "empty.jsonl"), code=1, case="validate: empty file",
        expect=("the file holds no rows",))
    huge = _write(folder, "huge.jsonl", [_row(0, choices=[f"c{i}" for i in range(100_000)], answer="c1")])
    run("data", "validate", "--data", huge, code=1, case="validate: 100,000 choices",
        expect=("100000 choices; at most 26",))
    short = _write(folder, "short.jsonl", [_row(0, audio="blip.wav")])
    run("data", "validate", "--data", short, code=1, case="validate: 0.01 s clip",
        expect=("audio_too_short", "10.0 ms (160 samples"))
    outside = _write(folder, "outside.jsonl", [_row(0, audio="../../etc/passwd"), _row(1, audio="/etc/passwd")])
    run("data", "validate", "--data", outside, code=1, case="validate: audio outside the data folder",
        expect=("audio_outside_data_dir: 2",))


def test_train_fails_before_anything_starts(folder, tmp_path):
    out = str(tmp_path / "run")
    broken = _write(folder, "broken.jsonl", [_row(i, answer="medium" if i % 2 else "low") for i in range(8)])
    text = run("train", DEMO, f"run.output_dir={out}", f"data.train={broken}", code=2, case="train: broken rows",
               expect=("error: ", "broken.jsonl:2: id='r1': answer_not_in_choices"))
    assert len(text.splitlines()) < 15
    malformed = _write(folder, "malformed.jsonl", ["{oops", "[1]"])
    run("train", DEMO, f"run.output_dir={out}", f"data.train={malformed}", "data.invalid_rows=skip", code=2,
        case="train invalid_rows=skip: only malformed lines", expect=("no valid training samples",))
    short = _write(folder, "short.jsonl", [_row(0, audio="blip.wav"), _row(1)])
    run("train", DEMO, f"run.output_dir={out}", f"data.train={short}", code=2, case="train: 0.01 s clip",
        expect=("audio_too_short",))
    outside = _write(folder, "outside.jsonl", [_row(0, audio="../../etc/passwd"), _row(1)])
    run("train", DEMO, f"run.output_dir={out}", f"data.train={outside}", code=2, case="train: ../../etc/passwd",
        expect=("audio_outside_data_dir",))
    before = sorted(p.name for p in folder.iterdir())
    run("train", DEMO, f"run.output_dir={out}", f"data.train={folder / 'dta.jsonl'}", "data.synth_if_missing=600",
        code=2, expect=("dta.jsonl does not exist",), case="train: mistyped data.train + synth_if_missing")
    assert sorted(p.name for p in folder.iterdir()) == before  # no synthetic clips in the mistyped place
    (tmp_path / "a-file").write_text("")
    run("train", DEMO, f"run.output_dir={tmp_path / 'a-file' / 'run'}", f"data.train={broken}", code=2,
        case="train: unwritable run.output_dir", expect=("error: ", "a-file"))


def test_data_synth_bad_arguments_and_eval_bad_bytes(folder, tmp_path):
    run("data", "synth", "--out", str(tmp_path / "s"), "--n", "4", "--num-tiers", "0", code=2,
        case="data synth --num-tiers 0", expect=("error: tiers must be in 1..3",))
    (tmp_path / "a-file").write_text("")
    run("data", "synth", "--out", str(tmp_path / "a-file" / "s"), "--n", "4", code=2, expect=("error: ",),
        case="data synth: unwritable --out")
    (folder / "latin1.jsonl").write_bytes(_row(0).encode() + b"\n\xff\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")  # eval checks the model folder first; no engine starts
    run("eval", "--model", str(tmp_path / "model"), "--data", str(folder / "latin1.jsonl"), "--format", "jsonl",
        "--out", str(tmp_path / "eval"), code=2, case="eval: non-UTF-8 byte",
        expect=("latin1.jsonl:2: not UTF-8: byte 0xff at byte offset",))

"""prepare_data: the checks that run before training starts (and before `eval --run` sweeps), and
`data.synth_if_missing` writing a synthetic set only where the generator's layout says it lives."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from sari_ray.config import ConfigError, load_config
from sari_ray.data.audio import write_wav
from sari_ray.data.prepare import prepare_data
from sari_ray.data.readers import DataFormatError
from sari_ray.data.validate import DataValidationError

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def _cfg(tmp_path, *overrides):
    # tiers 0-2 in these rows; the demo itself is one tier
    return load_config(REPO / "configs" / "demo_cpu.yaml", [f"run.output_dir={tmp_path / 'run'}",
                                                            "curriculum.num_tiers=3", *overrides])


def _console():
    return Console(file=io.StringIO())


def _rows(folder: Path, n: int, **overrides) -> list[str]:
    write_wav(folder / "tone.wav", np.full(8000, 0.1, np.float32))
    rows = []
    for i in range(n):
        row = dict(id=f"r{i}", audio="tone.wav", question="High or low?", choices=["high", "low"], answer="low",
                   tier=i % 3)
        row.update(overrides)
        rows.append(json.dumps(row))
    return rows


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_synthesises_a_new_folder_only(tmp_path):
    train = tmp_path / "demo" / "data" / "data.jsonl"  # the demo's layout: runs/demo/data/data.jsonl
    cfg = _cfg(tmp_path, f"data.train={train}", "data.synth_if_missing=9")
    train_set, eval_set = prepare_data(cfg, _console())
    assert len(train_set) + len(eval_set) == 9 and train.is_file()
    assert [p.name for p in (tmp_path / "demo").iterdir()] == ["data"]  # no partial folder left beside it
    again, _ = prepare_data(cfg, _console())  # exists now: read, not re-made
    assert [s.id for s in again] == [s.id for s in train_set]


@pytest.mark.parametrize("mistyped", [
    "real/data.jsnol",  # a typo in the file name, in the user's data folder
    "real/data.jsonl",  # the generator's name, but in a folder that holds other things
    "new/train.jsonl",  # a new folder, but not the generator's file name
])
def test_a_mistyped_path_is_missing_not_filled_with_synthetic_clips(tmp_path, mistyped):
    real = tmp_path / "real"
    real.mkdir()
    (real / "train.jsonl").write_text("")  # the user's data
    before = _listing(tmp_path)
    cfg = _cfg(tmp_path, f"data.train={tmp_path / mistyped}", "data.synth_if_missing=600")
    with pytest.raises(ConfigError, match=r"data\.train=.* does not exist"):
        prepare_data(cfg, _console())
    assert _listing(tmp_path) == before  # nothing written anywhere


def test_missing_train_or_eval_without_synthesis(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.train=.*nowhere\.jsonl does not exist$"):
        prepare_data(_cfg(tmp_path, f"data.train={tmp_path / 'nowhere.jsonl'}", "data.synth_if_missing=0"), _console())
    (tmp_path / "d.jsonl").write_text("\n".join(_rows(tmp_path, 4)) + "\n")
    cfg = _cfg(tmp_path, f"data.train={tmp_path / 'd.jsonl'}", f"data.eval={tmp_path / 'e.jsonl'}")
    with pytest.raises(ConfigError, match=r"data\.eval=.*e\.jsonl does not exist"):
        prepare_data(cfg, _console())


def test_broken_and_malformed_rows_are_listed_together(tmp_path):
    rows = _rows(tmp_path, 6)
    rows[1], rows[3] = "{oops", rows[3].replace('"answer": "low"', '"answer": "medium"')
    (tmp_path / "d.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataValidationError) as caught:
        prepare_data(_cfg(tmp_path, f"data.train={tmp_path / 'd.jsonl'}"), _console())
    assert [(p.line, p.kind) for p in caught.value.report.problems] == [(2, "malformed_row"),
                                                                        (4, "answer_not_in_choices")]


def test_skip_drops_malformed_rows_and_trains_on_the_rest(tmp_path):
    rows = _rows(tmp_path, 10)
    rows[2] = "{oops"
    rows[5] = b"\xff".decode("latin-1")  # written below as a non-UTF-8 byte
    (tmp_path / "d.jsonl").write_bytes(("\n".join(rows) + "\n").encode("latin-1"))
    cfg = _cfg(tmp_path, f"data.train={tmp_path / 'd.jsonl'}", "data.invalid_rows=skip", "data.eval_fraction=0.2")
    train, held_out = prepare_data(cfg, _console())
    assert len(train) + len(held_out) == 8


def test_nothing_left_after_skip_is_an_error(tmp_path):
    (tmp_path / "d.jsonl").write_text("{oops\n[1]\n")
    cfg = _cfg(tmp_path, f"data.train={tmp_path / 'd.jsonl'}", "data.invalid_rows=skip")
    with pytest.raises(ConfigError, match="no valid training samples"):
        prepare_data(cfg, _console())


def test_empty_file_and_external_audio(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataFormatError, match="holds no rows"):
        prepare_data(_cfg(tmp_path, f"data.train={tmp_path / 'empty.jsonl'}"), _console())
    data = tmp_path / "data"
    data.mkdir()
    (data / "d.jsonl").write_text("\n".join(_rows(data, 4, audio="../outside/tone.wav")) + "\n")
    write_wav(tmp_path / "outside" / "tone.wav", np.full(8000, 0.1, np.float32))
    with pytest.raises(DataValidationError, match="audio_outside_data_dir: 4"):
        prepare_data(_cfg(tmp_path, f"data.train={data / 'd.jsonl'}"), _console())
    train, held_out = prepare_data(_cfg(tmp_path, f"data.train={data / 'd.jsonl'}", "data.allow_external_audio=true"),
                                   _console())
    assert len(train) + len(held_out) == 4


def test_train_py_still_exports_prepare_data():
    import sari_ray.train

    assert sari_ray.train.prepare_data is prepare_data

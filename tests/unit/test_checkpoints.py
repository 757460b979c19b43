"""A checkpoint directory is complete or absent; rotation never loses the newest or the SFT one; a full disk is
refused before writing; the run's own error is reported even when MLflow cannot be updated."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from sari_ray import checkpoints

pytestmark = pytest.mark.unit


def write_checkpoint(out: Path, step: int, fail_after_learner: bool = False) -> Path:
    final = checkpoints.step_dir(out, step)
    with checkpoints.staged(final) as staging:
        (staging / "learner").mkdir()
        (staging / "learner" / "state.pt").write_bytes(b"x" * 100)
        if fail_after_learner:
            raise OSError(errno.ENOSPC, "unexpected pos 64 vs 0")  # what the checkpoint writer says on a full disk
        checkpoints.write_json(staging / checkpoints.STATE_FILE, {"step": step})
    return final


def test_a_failure_mid_write_leaves_no_checkpoint_and_keeps_the_last_complete(tmp_path):
    write_checkpoint(tmp_path, 2)
    with pytest.raises(OSError, match="unexpected pos"):
        write_checkpoint(tmp_path, 4, fail_after_learner=True)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000002"]
    assert checkpoints.latest_checkpoint(tmp_path).name == "step_000002"


def test_staging_without_state_file_is_not_committed(tmp_path):
    with pytest.raises(RuntimeError, match="not complete"):
        with checkpoints.staged(checkpoints.step_dir(tmp_path, 1)) as staging:
            (staging / "model").mkdir()
    assert not checkpoints.step_dir(tmp_path, 1).exists() and checkpoints.latest_checkpoint(tmp_path) is None


def test_a_replayed_step_replaces_its_checkpoint(tmp_path):
    write_checkpoint(tmp_path, 3)
    final = checkpoints.step_dir(tmp_path, 3)
    with checkpoints.staged(final) as staging:
        checkpoints.write_json(staging / checkpoints.STATE_FILE, {"step": 3, "again": True})
    assert json.loads((final / checkpoints.STATE_FILE).read_text())["again"] is True
    assert not (final / "learner").exists()  # the old one is gone whole, not merged
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000003"]


def test_stale_staging_is_dropped_and_never_counted(tmp_path):
    stale = tmp_path / "checkpoints" / ".staging-step_000007"
    stale.mkdir(parents=True)
    (stale / checkpoints.STATE_FILE).write_text("{}")  # even a stale one with a state file is not a checkpoint
    assert checkpoints.latest_checkpoint(tmp_path) is None
    assert checkpoints.drop_stale_staging(tmp_path) == [stale] and not stale.exists()


def test_a_kill_between_the_two_renames_of_a_rewrite_keeps_the_complete_checkpoint(tmp_path, monkeypatch):
    """A replayed step rewrites its checkpoint: the old one is set aside, then the new one renamed in. Killed
    between the two renames, the next start must put the old (complete) one back, not delete it as staging."""
    import os

    write_checkpoint(tmp_path, 2)
    real_replace, calls = os.replace, []

    def killed_at_the_second_rename(src, dst):  # of a directory (write_json renames files too)
        if Path(src).is_dir():
            calls.append(Path(src).name)
            if len(calls) == 2:
                raise KeyboardInterrupt("SIGKILL")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoints.os, "replace", killed_at_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        with checkpoints.staged(checkpoints.step_dir(tmp_path, 2)) as staging:
            checkpoints.write_json(staging / checkpoints.STATE_FILE, {"step": 2, "again": True})
    monkeypatch.setattr(checkpoints.os, "replace", real_replace)
    assert calls[0] == "step_000002" and not checkpoints.step_dir(tmp_path, 2).exists()  # set aside, not replaced
    # staged() removes its own staging on the way out; a SIGKILL would have left it too
    dropped = checkpoints.drop_stale_staging(tmp_path)
    assert [p.name for p in dropped] == []
    assert checkpoints.latest_checkpoint(tmp_path).name == "step_000002"
    assert json.loads((checkpoints.step_dir(tmp_path, 2) / checkpoints.STATE_FILE).read_text()) == {"step": 2}
    assert (checkpoints.step_dir(tmp_path, 2) / "learner" / "state.pt").exists()


def test_rotation_keeps_the_newest_and_the_sft_checkpoint(tmp_path):
    for step in (0, 10, 20, 30, 40):
        write_checkpoint(tmp_path, step)
    deleted = checkpoints.rotate(tmp_path, keep_last=2)
    assert [p.name for p in deleted] == ["step_000010", "step_000020"]
    assert [p.name for p in checkpoints.complete_checkpoints(tmp_path)] == ["step_000000", "step_000030", "step_000040"]
    checkpoints.rotate(tmp_path, keep_last=0)  # a nonsense setting still keeps the newest
    assert checkpoints.latest_checkpoint(tmp_path).name == "step_000040"


def test_too_little_free_space_is_refused_before_writing(tmp_path):
    with pytest.raises(checkpoints.CheckpointSpaceError, match="GiB free, about .* GiB needed"):
        with checkpoints.staged(checkpoints.step_dir(tmp_path, 5), needed_bytes=2**62):
            pytest.fail("nothing may be written")
    assert checkpoints.latest_checkpoint(tmp_path) is None


def test_expected_size_is_the_last_checkpoint_or_a_bound_from_the_model(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"w" * 1000)
    assert checkpoints.expected_bytes(tmp_path / "run", model) == 5000
    write_checkpoint(tmp_path / "run", 1)
    assert checkpoints.expected_bytes(tmp_path / "run", model) == checkpoints.directory_bytes(
        checkpoints.step_dir(tmp_path / "run", 1))


def test_a_failing_store_never_hides_the_runs_error(capsys):
    from sari_ray.stopping import mark_failed

    class FullStore:
        run_id = "r1"

        def finish(self, status):
            raise RuntimeError("(sqlite3.OperationalError) database or disk is full")

    mark_failed(FullStore(), OSError(errno.ENOSPC, "unexpected pos 64 vs 0"))
    err = capsys.readouterr().err
    assert "could not mark MLflow run r1 FAILED" in err and "unexpected pos 64 vs 0" in err


def test_mid_sft_checkpoints_come_first_and_go_once_sft_has_ended(tmp_path):
    for name in ("sft_000040", "sft_000080"):
        final = tmp_path / "checkpoints" / name
        with checkpoints.staged(final) as staging:
            checkpoints.write_json(staging / checkpoints.STATE_FILE, {})
    assert checkpoints.latest_checkpoint(tmp_path).name == "sft_000080"  # resume continues SFT there
    assert checkpoints.checkpoint_dir(tmp_path, {"phase": "sft", "sft_step": 80, "step": 0}).name == "sft_000080"
    assert checkpoints.checkpoint_dir(tmp_path, {"phase": "grpo", "sft_step": 125, "step": 0}).name == "step_000000"
    write_checkpoint(tmp_path, 0)  # the end of SFT
    assert checkpoints.latest_checkpoint(tmp_path).name == "step_000000"
    checkpoints.rotate(tmp_path, keep_last=3)
    assert [p.name for p in checkpoints.complete_checkpoints(tmp_path)] == ["step_000000"]

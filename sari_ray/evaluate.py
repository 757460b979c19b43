"""Evaluate a checkpoint on MMAU-style multiple-choice audio questions, or sweep every checkpoint of a run.

    sari-ray eval --model CKPT --data mmau-test-mini.json --format mmau --audio-dir DIR --out OUT
    sari-ray eval --model CKPT --data ... --audio silence --out OUT   # same OUT: report shows both
    sari-ray eval --run runs/NAME                                    # sweep (handled by eval_sweep)

Why it looks like this:
- Scoring is `sari_ray.mmau` (the official token rule after answer extraction), the same reading the GRPO
  reward uses, so training optimises what is reported here.
- Every number carries a Wilson 95% interval (`eval_stats`): run-to-run variance is R1-AQA users' main
  pain, and a sweep's "best" checkpoint is often within the noise of its neighbours.
- Everything that can fail cheaply is checked before the engine starts: the model directory, the data, the
  out dir, and every clip is decoded. A missing or undecodable clip stops the run there, listing every one
  at once; `--skip-missing` evaluates the rest and the report lists what was skipped. The denominator is
  never shrunk silently (the official MMAU script does exactly that).
- Finished work is never thrown away: each prediction is appended (and flushed) as it is made, so a crash
  keeps it, and `--resume` continues the file (same settings checked; ids already predicted are skipped).
  Without `--resume`, an --out that already holds predictions is refused rather than overwritten.
- `--audio silence|noise` swaps every clip for silence / noise of the same duration: the accuracy left is
  what the text alone earns. R1-AQA lost its audio silently once; this check would have caught it.

`generate_predictions` needs only an engine and a processor, so a Ray rollout actor can call it with its
own engine; vLLM and torch are imported lazily.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from sari_ray.data.schema import AudioMCQ

AUDIO_MODES = ("real", "silence", "noise")
MAX_LISTED = 50  # problem files printed in full up to this many (all are in the exception / metrics)
MISSING, UNDECODABLE = "missing", "undecodable"  # why a clip is unusable (the `problem` of a skipped item)
# Settings a resumed run must share with the run it continues (else its predictions are not one evaluation).
RESUME_KEYS = ("model", "data", "style", "audio_mode", "temperature", "max_tokens", "seed", "num_samples")


class EvalInputError(ValueError):
    """A user error found before the engine starts (bad --model, an --out that would lose work, ...)."""


class AudioCheckError(ValueError):
    """Audio files that are missing or do not decode; raised before any generation, listing every one.

    `missing`: (id, path); `undecodable`: (id, path, reason); `problems`: the dicts `audio_problems` made.
    """

    def __init__(self, problems: Sequence[dict[str, str]], n_items: int):
        self.problems = list(problems)
        self.missing = [(p["id"], p["audio"]) for p in self.problems if p["problem"] == MISSING]
        self.undecodable = [(p["id"], p["audio"], p["detail"]) for p in self.problems if p["problem"] == UNDECODABLE]
        what = " and ".join(part for part in (
            f"{len(self.missing)} of {n_items} audio files are missing" if self.missing else "",
            (f"{len(self.undecodable)}{'' if self.missing else f' of {n_items}'} audio files cannot be decoded"
             if self.undecodable else "")) if part)
        super().__init__(
            f"{what} (nothing was generated):\n{describe_problems(self.problems)}\n"
            "Fix --audio-dir or the files, or pass --skip-missing to evaluate the rest (the report then says "
            "the total is over fewer items).")


def describe_problems(problems: Sequence[dict[str, str]], limit: int = MAX_LISTED) -> str:
    """One indented line per unusable clip: id, file, what is wrong; at most `limit` lines and a count."""
    lines = [f"  {p['id']}: {p['audio']} ({p['detail']})" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


# path -> ((size, mtime_ns), problem or None): a clip is decoded once per process even when a sweep
# checks the same samples before every checkpoint; a file changed on disk is decoded again.
_AUDIO_CHECKED: dict[str, tuple[tuple[int, int], tuple[str, str] | None]] = {}


def _clip_problem(path: str, max_audio_seconds: float) -> tuple[str, str] | None:
    from sari_ray.data.audio import MIN_AUDIO_SAMPLES, AudioDecodeError, load_audio

    try:
        stat = Path(path).stat()
    except OSError:
        return MISSING, "file not found"
    if not Path(path).is_file():
        return MISSING, "not a regular file"
    key = (stat.st_size, stat.st_mtime_ns)
    cached = _AUDIO_CHECKED.get(path)
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        clip = load_audio(path, max_seconds=max_audio_seconds)
        problem = None
        if clip.samples.shape[0] < MIN_AUDIO_SAMPLES:  # the engine would refuse it after starting
            problem = (UNDECODABLE, f"too short for the models: {clip.samples.shape[0]} samples at 16 kHz, "
                                    f"at least {MIN_AUDIO_SAMPLES} make one audio token")
    except AudioDecodeError as e:
        problem = (UNDECODABLE, f"cannot decode: {e.reason}")
    _AUDIO_CHECKED[path] = (key, problem)
    return problem


def audio_problems(samples: Sequence[AudioMCQ], *, progress: bool = False,
                   max_audio_seconds: float = 30.0) -> list[dict[str, str]]:
    """{id, audio, problem (missing|undecodable), detail} for every sample whose clip cannot be used.

    Every clip is decoded (and thrown away), because a corrupt clip found mid-run used to crash it after the
    engine had started; decoding all first costs far less than an engine start.
    """
    found = []
    with _progress(len(samples), progress, "checking audio") as bar:
        for s in samples:
            problem = _clip_problem(s.audio, max_audio_seconds)
            if problem is not None:
                found.append({"id": s.id, "audio": s.audio, "problem": problem[0], "detail": problem[1]})
            bar.update(1)
    return found


def split_missing(samples: Sequence[AudioMCQ], skip_missing: bool, *, progress: bool = False,
                  ) -> tuple[list[AudioMCQ], list[dict[str, str]]]:
    """(samples to evaluate, skipped) or AudioCheckError listing every missing or undecodable clip."""
    problems = audio_problems(samples, progress=progress)
    if problems and not skip_missing:
        raise AudioCheckError(problems, len(samples))
    gone = {p["id"] for p in problems}
    return [s for s in samples if s.id not in gone], problems


def replace_audio(samples: np.ndarray, mode: str, key: str) -> np.ndarray:
    """The clip for `mode`: as is, silence of the same length, or white noise of the same length and RMS.

    Same duration, so the prompt's audio token count (and the position of the text) does not change: only
    the information in the audio goes. Noise is seeded by the sample id, so reruns are identical.
    """
    if mode == "real":
        return samples
    if mode == "silence":
        return np.zeros_like(samples)
    if mode == "noise":
        rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if samples.size else 0.0
        rng = np.random.default_rng(zlib.crc32(key.encode()))
        noise = rng.standard_normal(samples.shape[0]) * (rms or 0.05)
        return np.clip(noise, -1.0, 1.0).astype(np.float32)
    raise ValueError(f"unknown audio mode {mode!r}; valid: {', '.join(AUDIO_MODES)}")


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="item", dynamic_ncols=True)


def _make_record(sample: AudioMCQ, texts: Sequence[str], finish_reason: str | None, num_samples: int) -> dict[str, Any]:
    """A prediction record, judged against the options as listed (a letter names the listed option)."""
    from sari_ray.answers import extract_answer, listed_choices
    from sari_ray.mmau import judge

    choices = listed_choices(sample)
    extracted = [extract_answer(t, choices) for t in texts]
    correct = [judge(t, choices, sample.answer) for t in texts]
    record = {"id": sample.id, "model_output": texts[0], "extracted": extracted[0], "correct": correct[0],
              "finish_reason": finish_reason}
    if num_samples > 1:
        record.update(outputs=list(texts), extracted_all=extracted, correct_all=correct)
    return record


def generate_predictions(engine: Any, processor: Any, samples: Sequence[AudioMCQ], *, style: str,
                         num_samples: int = 1, temperature: float | None = None, max_tokens: int = 256,
                         audio_mode: str = "real", batch_size: int = 64, progress: bool = True, seed: int = 0,
                         max_audio_seconds: float = 30.0,
                         on_record: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Generate and judge: one record per sample, in order.

    Record: id, model_output (first output), extracted, correct, finish_reason; with num_samples K > 1 also
    outputs / extracted_all / correct_all (K each). temperature None: greedy for K = 1, 1.0 for K > 1.
    Audio is decoded one batch at a time, so memory stays bounded on the full benchmark. `on_record` gets
    each record as soon as its batch is done (the CLI appends it to disk, so a crash keeps finished work).
    """
    from sari_ray.data.audio import load_audio
    from sari_ray.prompts import build_messages, render_prompt

    if audio_mode not in AUDIO_MODES:
        raise ValueError(f"unknown audio mode {audio_mode!r}; valid: {', '.join(AUDIO_MODES)}")
    if temperature is None:
        temperature = 0.0 if num_samples == 1 else 1.0
    records: list[dict[str, Any]] = []
    with _progress(len(samples), progress, f"eval ({audio_mode} audio)") as bar:
        for start in range(0, len(samples), batch_size):
            batch = samples[start: start + batch_size]
            prompts = [render_prompt(build_messages(s, style), processor) for s in batch]
            audios = [replace_audio(load_audio(s.audio, max_seconds=max_audio_seconds).samples, audio_mode, s.id)
                      for s in batch]
            outs = engine.generate(prompts, audios, n=num_samples, temperature=temperature,
                                   max_tokens=max_tokens, seed=seed)
            for s, completions in zip(batch, outs):
                record = _make_record(s, [c.text for c in completions], completions[0].finish_reason, num_samples)
                records.append(record)
                if on_record is not None:
                    on_record(record)
            bar.update(len(batch))
    return records


# ------------------------------------------------------------------------------- output files and resume
def _suffix(audio_mode: str) -> str:
    return "" if audio_mode == "real" else f".{audio_mode}"


def output_paths(out_dir: str | Path, audio_mode: str = "real") -> dict[str, Path]:
    """Files of one audio mode in an out dir; `settings` records what a `--resume` must match."""
    out, sfx = Path(out_dir), _suffix(audio_mode)
    return {"predictions": out / f"predictions{sfx}.jsonl", "settings": out / f"predictions{sfx}.settings.json",
            "metrics": out / f"metrics{sfx}.json", "report": out / "report.md"}


def eval_settings(*, style: str, audio_mode: str, temperature: float | None, max_tokens: int, seed: int,
                  num_samples: int, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings that make predictions comparable (RESUME_KEYS); temperature None resolved as generation does."""
    if temperature is None:
        temperature = 0.0 if num_samples == 1 else 1.0
    meta = meta or {}
    return {"model": meta.get("model"), "data": meta.get("data"), "style": str(style), "audio_mode": audio_mode,
            "temperature": temperature, "max_tokens": max_tokens, "seed": seed, "num_samples": num_samples}


def count_predictions(path: str | Path) -> int:
    """Non-blank lines of a predictions file (0 when there is none)."""
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def check_out_dir(out_dir: str | Path, audio_mode: str, resume: bool) -> None:
    """Refuse an --out that would lose work: predictions there are continued (--resume) or left alone."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EvalInputError(f"--out {out} exists and is not a directory")
    path = output_paths(out, audio_mode)["predictions"]
    n = count_predictions(path)
    if n and not resume:
        raise EvalInputError(
            f"{path} already holds {n} predictions from an earlier run: pass --resume to continue it (same "
            "settings; ids already predicted are skipped), or choose another --out (or delete the file) to start over")


def resumable(out_dir: str | Path, audio_mode: str, settings: dict[str, Any]) -> bool:
    """True when `out_dir` holds predictions made with exactly these settings (a sweep continues those)."""
    paths = output_paths(out_dir, audio_mode)
    if not paths["settings"].is_file() or not count_predictions(paths["predictions"]):
        return False
    try:
        saved = json.loads(paths["settings"].read_text()).get("settings", {})
    except (OSError, ValueError):
        return False
    return all(saved.get(k) == settings.get(k) for k in RESUME_KEYS)


def read_resume(out_dir: str | Path, audio_mode: str, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Records an earlier run with the same settings wrote to `out_dir` ([] when there are none).

    A last line cut off mid-write (the run was killed while appending) is dropped from the file; any other
    malformed line, a repeated id or different settings is an error naming the file (and line).
    """
    paths = output_paths(out_dir, audio_mode)
    pred_path = paths["predictions"]
    if not count_predictions(pred_path):
        return []
    if not paths["settings"].is_file():
        raise EvalInputError(f"--resume: {pred_path} has no {paths['settings'].name} beside it, so it cannot be "
                             "checked to be the same evaluation; choose another --out")
    try:
        saved = json.loads(paths["settings"].read_text())["settings"]
        if not isinstance(saved, dict):
            raise TypeError(f"'settings' is a {type(saved).__name__}, not an object")
    except (ValueError, KeyError, TypeError) as e:
        raise EvalInputError(f"--resume: {paths['settings']} is unreadable ({e}); choose another --out") from None
    differ = [k for k in RESUME_KEYS if saved.get(k) != settings.get(k)]
    if differ:
        was = ", ".join(f"{k}={saved.get(k)!r}" for k in differ)
        now = ", ".join(f"{k}={settings.get(k)!r}" for k in differ)
        raise EvalInputError(f"--resume: {pred_path} was made with {was} but this run has {now}; rerun with the "
                             "same settings, or choose another --out")
    raw = pred_path.read_bytes()
    cut = raw.rfind(b"\n") + 1
    tail = raw[cut:]
    if tail.strip():  # the run stopped while appending: keep the line if it is whole, else drop it
        try:
            json.loads(tail)
            fix, note = (lambda f: f.write(b"\n")), "gave its complete last line the missing newline"
        except ValueError:
            fix, note = (lambda f: f.truncate(cut)), "dropped its cut-off last line (written when the run stopped)"
        with open(pred_path, "r+b") as f:
            f.seek(0, 2)
            fix(f)
        print(f"resume: {pred_path}: {note}", file=sys.stderr, flush=True)
    from sari_ray.data.readers import json_lines

    records, errors, seen = [], [], set()
    for lineno, record, problem in json_lines(pred_path):
        if problem:
            errors.append(f"{pred_path}:{lineno}: {problem}")
        elif not isinstance(record, dict) or not isinstance(record.get("id"), str) or "model_output" not in record:
            errors.append(f"{pred_path}:{lineno}: not a prediction record (needs 'id' and 'model_output')")
        elif record["id"] in seen:
            errors.append(f"{pred_path}:{lineno}: id {record['id']!r} appears twice")
        elif saved.get("num_samples", 1) > 1 and not isinstance(record.get("outputs"), list):
            errors.append(f"{pred_path}:{lineno}: no 'outputs' list ({saved['num_samples']} samples per item)")
        else:
            seen.add(record["id"])
            records.append(record)
    if errors:
        raise EvalInputError(f"--resume: {len(errors)} malformed line(s) in {pred_path}:\n  "
                             + "\n  ".join(errors[:MAX_LISTED]))
    return records


def _check_resumed_ids(records: Sequence[dict[str, Any]], samples: Sequence[AudioMCQ], where: Path) -> None:
    known = {s.id for s in samples}
    stray = [r["id"] for r in records if r["id"] not in known]
    if stray:
        raise EvalInputError(f"--resume: {where} holds {len(stray)} ids that are not among the items to evaluate "
                             f"(first: {stray[:5]}): it was made on other data or with other audio present; "
                             "choose another --out")


def write_metrics(out_dir: str | Path, metrics: dict[str, Any], audio_mode: str = "real") -> dict[str, Path]:
    """metrics[.mode].json, and report.md rebuilt from every metrics file in `out_dir`, so a silence run next
    to a real one shows both side by side."""
    from sari_ray.eval_stats import render_report

    paths = output_paths(out_dir, audio_mode)
    paths["metrics"].parent.mkdir(parents=True, exist_ok=True)
    paths["metrics"].write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
    paths["report"].write_text(render_report(read_metrics(out_dir)))
    return paths


def write_outputs(out_dir: str | Path, records: Sequence[dict[str, Any]], metrics: dict[str, Any],
                  audio_mode: str = "real") -> dict[str, Path]:
    """predictions[.mode].jsonl (all at once), then `write_metrics`."""
    paths = output_paths(out_dir, audio_mode)
    paths["predictions"].parent.mkdir(parents=True, exist_ok=True)
    with open(paths["predictions"], "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return write_metrics(out_dir, metrics, audio_mode)


def read_metrics(out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """audio mode -> metrics, for every metrics[.mode].json in `out_dir`."""
    found = {}
    for mode in AUDIO_MODES:
        path = Path(out_dir) / f"metrics{_suffix(mode)}.json"
        if path.is_file():
            found[mode] = json.loads(path.read_text())
    return found


class EvalInterrupted(RuntimeError):
    """Generation failed part-way; the predictions made so far are on disk and `--resume` continues them."""

    def __init__(self, path: Path, total: int, cause: BaseException):
        self.path, self.cause, self.kept = path, cause, count_predictions(path)
        first = str(cause).splitlines()[0] if str(cause) else ""
        super().__init__(f"evaluation stopped ({type(cause).__name__}: {first}); {self.kept} of {total} predictions "
                         f"are kept in {path}: fix the cause and rerun the same command with --resume to continue")


def evaluate_samples(engine: Any, processor: Any, samples: Sequence[AudioMCQ], *, style: str,
                     num_samples: int = 1, temperature: float | None = None, max_tokens: int = 256,
                     audio_mode: str = "real", skip_missing: bool = False, batch_size: int = 64,
                     progress: bool = True, seed: int = 0, out_dir: str | Path | None = None,
                     meta: dict[str, Any] | None = None, resume: bool = False) -> dict[str, Any]:
    """Check audio, generate, score (MMAU rule, 95% CIs, pass@k and majority vote when K > 1); with `out_dir`,
    append each prediction to disk as it is made, then write metrics and report. Returns the metrics dict.

    `resume`: continue the predictions `out_dir` already holds (same settings; their ids are not generated
    again); otherwise they are replaced. A failure part-way raises EvalInterrupted, the file kept.
    """
    from sari_ray.eval_stats import summarize

    present, skipped = split_missing(samples, skip_missing)
    if temperature is None:
        temperature = 0.0 if num_samples == 1 else 1.0
    settings = eval_settings(style=style, audio_mode=audio_mode, temperature=temperature, max_tokens=max_tokens,
                             seed=seed, num_samples=num_samples, meta=meta)
    done: dict[str, dict[str, Any]] = {}
    sink, paths = None, None
    if out_dir is not None:
        paths = output_paths(out_dir, audio_mode)
        paths["predictions"].parent.mkdir(parents=True, exist_ok=True)
        if resume:
            resumed = read_resume(out_dir, audio_mode, settings)
            _check_resumed_ids(resumed, present, paths["predictions"])
            by_id = {s.id: s for s in present}
            done = {r["id"]: _make_record(by_id[r["id"]], r.get("outputs") or [r["model_output"]],  # re-judged
                                          r.get("finish_reason"), num_samples) for r in resumed}
        if not done:
            paths["predictions"].write_text("")
            paths["settings"].write_text(json.dumps(
                {"settings": settings, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}, indent=2))
        sink = open(paths["predictions"], "a", encoding="utf-8")
    todo = [s for s in present if s.id not in done]

    def append(record: dict[str, Any]) -> None:
        sink.write(json.dumps(record, ensure_ascii=False) + "\n")
        sink.flush()

    started = time.perf_counter()
    try:
        new = generate_predictions(engine, processor, todo, style=str(style), num_samples=num_samples,
                                   temperature=temperature, max_tokens=max_tokens, audio_mode=audio_mode,
                                   batch_size=batch_size, progress=progress, seed=seed,
                                   on_record=append if sink is not None else None)
    except Exception as e:
        if paths is None:
            raise
        raise EvalInterrupted(paths["predictions"], len(present), e) from e
    finally:
        if sink is not None:
            sink.close()
    elapsed = time.perf_counter() - started
    made = {r["id"]: r for r in new}
    records = [done.get(s.id) or made[s.id] for s in present]
    meta = {**(meta or {}), "style": str(style), "audio_mode": audio_mode, "temperature": temperature,
            "max_tokens": max_tokens, "seed": seed, "elapsed_s": elapsed,
            "items_per_s": len(todo) / elapsed if elapsed > 0 and todo else None, "n_resumed": len(done),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    metrics = summarize(present, records, num_samples=num_samples, skipped=skipped, meta=meta)
    if out_dir is not None:
        write_metrics(out_dir, metrics, audio_mode)
    return metrics


def load_engine(model_path: str | Path, *, seed: int = 0, **engine_kwargs: Any) -> tuple[Any, Any]:
    """(VLLMEngine, processor) for a checkpoint directory. The caller shuts the engine down."""
    from transformers import AutoProcessor

    from sari_ray.engines.vllm_engine import VLLMEngine

    processor = AutoProcessor.from_pretrained(str(model_path))
    engine = VLLMEngine(str(model_path), seed=seed, **{k: v for k, v in engine_kwargs.items() if v is not None})
    return engine, processor


def check_model_dir(model: str | Path) -> Path:
    """The checkpoint directory, or an error saying what is wrong with it (before the hub is ever asked:
    transformers reads a path that does not exist as a hub repo id and says so confusingly)."""
    path = Path(model)
    if not path.exists():
        raise EvalInputError(f"model directory {model} does not exist (--model takes a local checkpoint "
                             "directory, e.g. runs/NAME/checkpoints/step_000200/model)")
    if not path.is_dir():
        raise EvalInputError(f"--model {model} is a file; give the checkpoint directory")
    if not (path / "config.json").is_file():
        raise EvalInputError(f"--model {model} has no config.json: not a Hugging Face checkpoint directory")
    return path.absolute()


def read_eval_samples(data: str | Path, format: str = "jsonl", audio_dir: str | Path | None = None,
                      limit: int | None = None) -> list[AudioMCQ]:
    from sari_ray.data.readers import read_samples

    samples = read_samples(data, format=format, audio_dir=audio_dir)
    if not samples:
        raise EvalInputError(f"{data}: no items to evaluate")
    return list(samples[:limit] if limit else samples)


def evaluate_model(model: str | Path, data: str | Path, out_dir: str | Path | None, *, format: str = "jsonl",
                   audio_dir: str | Path | None = None, style: str = "structured", limit: int | None = None,
                   skip_missing: bool = False, engine_kwargs: dict[str, Any] | None = None,
                   samples: Sequence[AudioMCQ] | None = None, resume: bool = False, num_samples: int = 1,
                   temperature: float | None = None, max_tokens: int = 256, audio_mode: str = "real",
                   batch_size: int = 64, progress: bool = True, seed: int = 0) -> dict[str, Any]:
    """Check all that can fail before the engine starts (an engine start costs ~30 s on CPU, minutes on GPU):
    the model directory, the data, the out dir (existing predictions are continued with `resume` or refused),
    that every clip decodes; then evaluate and shut the engine down. Skipped clips are listed on stderr."""
    model_dir = check_model_dir(model)
    if samples is None:
        samples = read_eval_samples(data, format, audio_dir, limit)
    meta = {"model": str(model_dir), "data": str(Path(data).absolute()), "format": format}
    settings = eval_settings(style=style, audio_mode=audio_mode, temperature=temperature, max_tokens=max_tokens,
                             seed=seed, num_samples=num_samples, meta=meta)
    resumed: list[dict[str, Any]] = []
    if out_dir is not None:
        check_out_dir(out_dir, audio_mode, resume)
        if resume:
            resumed = read_resume(out_dir, audio_mode, settings)
    present, skipped = split_missing(samples, skip_missing, progress=progress)
    if skipped:
        print(f"skipping {len(skipped)} of {len(samples)} items (audio missing or undecodable):\n"
              f"{describe_problems(skipped)}", file=sys.stderr, flush=True)
    if out_dir is not None and resume:
        _check_resumed_ids(resumed, present, output_paths(out_dir, audio_mode)["predictions"])
        if resumed:
            print(f"resume: {len(resumed)} of {len(present)} items already predicted in {out_dir}",
                  file=sys.stderr, flush=True)
    kwargs = dict(style=style, skip_missing=skip_missing, out_dir=out_dir, meta=meta, resume=resume,
                  num_samples=num_samples, temperature=temperature, max_tokens=max_tokens, audio_mode=audio_mode,
                  batch_size=batch_size, progress=progress, seed=seed)
    if len(resumed) == len(present):  # everything predicted already: score it, no engine
        return evaluate_samples(None, None, samples, **kwargs)
    engine, processor = load_engine(model_dir, seed=seed, **(engine_kwargs or {}))
    try:
        return evaluate_samples(engine, processor, samples, **kwargs)
    finally:
        engine.shutdown()


# -------------------------------------------------------------------------------------------------- CLI
def _summary_line(metrics: dict[str, Any]) -> str:
    t = metrics["total"]
    lo, hi = t["ci95"]
    tasks = ", ".join(f"{k} {100 * v['accuracy']:.1f}" for k, v in metrics["by_task"].items())
    skipped = metrics["n_skipped_missing_audio"]
    note = (f" [{skipped} skipped (audio missing or undecodable): over {t['n']} of {metrics['n_items']} items]"
            if skipped else "")
    return f"accuracy {100 * t['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] (n={t['n']}; {tasks}){note}"


def checkpoint_command(args: argparse.Namespace) -> int:
    """`sari-ray eval --model ...` (one checkpoint); the `eval` parser and `--run` live in `eval_sweep`.

    Exit codes: 0 done; 2 a user error (bad path, data, audio, out dir), said in one message, no traceback;
    1 anything else that stopped the run (the predictions made so far stay on disk); 130 interrupted.
    """
    engine_kwargs = {"max_model_len": args.max_model_len, "dtype": args.dtype,
                     "gpu_memory_utilization": args.gpu_memory_utilization}
    fmt = args.format or ("mmau" if str(args.data).endswith(".json") else "jsonl")
    try:
        metrics = evaluate_model(args.model, args.data, args.out, format=fmt, audio_dir=args.audio_dir,
                                 style=args.style or "structured", limit=args.limit, skip_missing=args.skip_missing,
                                 engine_kwargs=engine_kwargs, audio_mode=args.audio, max_tokens=args.max_tokens or 256,
                                 num_samples=args.samples, temperature=args.temperature, batch_size=args.batch_size,
                                 seed=args.seed, progress=not args.no_progress, resume=args.resume)
    except EvalInterrupted as e:
        print(f"sari-ray eval: {e}", file=sys.stderr)
        return 2 if isinstance(e.cause, (OSError, ValueError)) else 1
    except (OSError, ValueError) as e:  # AudioCheckError, DataFormatError, EvalInputError, a bad path
        print(f"sari-ray eval: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        path = output_paths(args.out, args.audio)["predictions"]
        print(f"\nsari-ray eval: interrupted; {count_predictions(path)} predictions are kept in {path}: rerun the "
              "same command with --resume to continue", file=sys.stderr)
        return 130
    meta = metrics["meta"]
    print(f"{args.audio} audio: {_summary_line(metrics)}")
    resumed = f" ({meta['n_resumed']} resumed)" if meta.get("n_resumed") else ""
    print(f"{metrics['n_evaluated']} items{resumed} in {meta['elapsed_s']:.1f} s; report: {Path(args.out) / 'report.md'}")
    return 0

"""Read and validate the train and eval sets before anything starts (training and evaluation).

Everything a data file can get wrong is found here, in one pass, before a Ray actor or an engine starts:
malformed rows and broken ones together (`sari_ray.data.validate.validate_file`), under the config's
`data.invalid_rows` policy.

`data.synth_if_missing` (the demo, tests) writes a synthetic set only where the generator's own layout says
it lives: `data.train` must be `<folder>/data.jsonl` (the file the generator writes) and `<folder>` must not
exist yet (or be empty). Anything else that is missing is a mistyped path, and is reported as missing
rather than filled with synthetic clips. The set is written to a temporary sibling folder and renamed into
place, so an interrupted run leaves no half-written folder behind.

`data.min_audio_contribution` with `data.audio_contribution` keeps only the training items whose audio
contribution (accuracy with real audio minus with silence, `sari-ray data audio-contribution`) reaches the
threshold. It runs after the held-out split, on the training items only: the held-out set is the same with
or without the filter, so runs stay comparable.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from sari_ray.config import ConfigError
from sari_ray.data.schema import AudioMCQ

SYNTH_FILE_NAME = "data.jsonl"  # what sari_ray.data.synth.synthesize writes into its folder


def prepare_data(cfg, console) -> tuple[list[AudioMCQ], list[AudioMCQ]]:
    """Read and validate train and eval sets before anything starts (all problems listed at once)."""
    from sari_ray.data.readers import split_samples
    from sari_ray.data.validate import validate_file

    train_path = Path(cfg.data.train)
    if not train_path.exists():
        if not cfg.data.synth_if_missing:
            raise ConfigError(f"data.train={cfg.data.train} does not exist")
        synthesize_missing(cfg, train_path, console)
    if cfg.data.eval and not Path(cfg.data.eval).exists():
        raise ConfigError(f"data.eval={cfg.data.eval} does not exist")

    def load(path: str):
        report = validate_file(path, cfg.data.format, cfg.data.audio_dir, check_audio=True,
                               policy=cfg.data.invalid_rows, num_tiers=cfg.curriculum.num_tiers,
                               allow_external_audio=cfg.data.allow_external_audio)
        console.print(report.summary())
        return report.samples

    train = load(cfg.data.train)
    if cfg.data.eval:
        evaluation = load(cfg.data.eval)
        if not evaluation:
            raise ConfigError(f"data.eval={cfg.data.eval}: no valid samples")
    else:
        train, evaluation = split_samples(train, cfg.data.eval_fraction, cfg.run.seed)
    if not train:
        raise ConfigError(f"data.train={cfg.data.train}: no valid training samples")
    if cfg.data.min_audio_contribution is not None:
        train = filter_by_audio_contribution(cfg, train, len(evaluation), console)
    elif cfg.data.audio_contribution is not None:
        console.print(f"data.audio_contribution={cfg.data.audio_contribution} is set but data.min_audio_contribution "
                      "is null: the training data is not filtered", markup=False, highlight=False)
    return train, evaluation


def filter_by_audio_contribution(cfg, train: list[AudioMCQ], n_eval: int, console) -> list[AudioMCQ]:
    """The training items whose contribution >= data.min_audio_contribution (every item must be in the file)."""
    from sari_ray.data.audio_contribution import ContributionFileError, filter_by_contribution, read_contributions

    path, threshold = cfg.data.audio_contribution, cfg.data.min_audio_contribution
    if path is None or not Path(path).is_file():
        raise ConfigError(f"data.audio_contribution={path} does not exist (data.min_audio_contribution={threshold} "
                          "filters by it); write it with `sari-ray data audio-contribution --data <the training "
                          "file> --out FILE ...`")
    try:
        kept, dropped = filter_by_contribution(train, read_contributions(path), threshold,
                                               source=f"data.audio_contribution={path}")
    except ContributionFileError as err:
        raise ConfigError(str(err)) from None
    console.print(f"audio contribution filter (data.min_audio_contribution={threshold:g}, {path}): kept "
                  f"{len(kept)} of {len(train)} training items, dropped {len(dropped)}; held-out set "
                  f"({n_eval} items) not filtered", markup=False, highlight=False)
    if not kept:
        raise ConfigError(f"data.min_audio_contribution={threshold:g} keeps none of the {len(train)} training items "
                          f"(data.audio_contribution={path}); lower the threshold")
    return kept


def synthesize_missing(cfg, train_path: Path, console) -> Path:
    """Write `cfg.data.synth_if_missing` synthetic questions at `train_path`, if that is where they belong."""
    from sari_ray.data.synth import synthesize

    folder = train_path.parent
    if train_path.name != SYNTH_FILE_NAME:
        raise ConfigError(
            f"data.train={cfg.data.train} does not exist (data.synth_if_missing writes a synthetic set only as "
            f"<new folder>/{SYNTH_FILE_NAME}; check the path)")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(
            f"data.train={cfg.data.train} does not exist, and {folder} already exists and is not empty: "
            "data.synth_if_missing writes a synthetic set only into a new or empty folder (check the path, or "
            "remove the folder to synthesise again)")
    console.print(f"synthesising {cfg.data.synth_if_missing} questions ({cfg.data.synth_set}, "
                  f"{cfg.curriculum.num_tiers} tiers) into {folder} ({cfg.data.train} was missing)")
    partial = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        produced = synthesize(partial, n=cfg.data.synth_if_missing, seed=cfg.run.seed,
                              tiers=cfg.curriculum.num_tiers, families=cfg.data.synth_set)
        assert produced.name == SYNTH_FILE_NAME, produced
        partial.replace(folder)  # atomic; replaces an empty folder
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return train_path

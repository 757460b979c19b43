"""Read and validate the train and eval sets before anything starts (training and evaluation)."""

from __future__ import annotations

from pathlib import Path

from sari_ray.config import ConfigError
from sari_ray.data.schema import AudioMCQ


def prepare_data(cfg, console) -> tuple[list[AudioMCQ], list[AudioMCQ]]:
    """Read and validate train and eval sets before anything starts (all problems listed at once)."""
    from sari_ray.data.readers import read_samples, split_samples
    from sari_ray.data.validate import validate_samples

    train_path = Path(cfg.data.train)
    if not train_path.exists() and cfg.data.synth_if_missing:
        from sari_ray.data.synth import synthesize

        console.print(f"synthesising {cfg.data.synth_if_missing} questions at {train_path.parent}")
        produced = synthesize(train_path.parent, n=cfg.data.synth_if_missing, seed=cfg.run.seed,
                              tiers=cfg.curriculum.num_tiers)
        if Path(produced) != train_path:
            raise ConfigError(f"data.train={train_path} but the generator writes {produced}; point data.train there")

    def load(path: str):
        rows = read_samples(path, cfg.data.format, cfg.data.audio_dir)
        report = validate_samples(rows, check_audio=True, policy=cfg.data.invalid_rows,
                                  num_tiers=cfg.curriculum.num_tiers, source=path)
        console.print(report.summary())
        return report.samples

    train = load(cfg.data.train)
    if cfg.data.eval:
        evaluation = load(cfg.data.eval)
    else:
        train, evaluation = split_samples(train, cfg.data.eval_fraction, cfg.run.seed)
    if not train:
        raise ConfigError(f"data.train={cfg.data.train}: no valid training samples")
    return train, evaluation

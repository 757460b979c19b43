"""`sari-ray data ...`: make and check question sets.

    sari-ray data synth --out runs/synth --n 96 --seed 0 [--tiers 3] [--set mixed|pitch_ladder] [--silent]
    sari-ray data validate --data shared/data/mmau/mmau-test-mini.json --format mmau --no-check-audio
    sari-ray data silent-copy --data runs/synth/data.jsonl --out runs/synth-silent
    sari-ray data difficulty ...   (registered from sari_ray.data.difficulty)
    sari-ray data audio-contribution ...   (registered from sari_ray.data.audio_contribution)

Heavy imports (torchaudio, soundfile) happen inside the command functions.
"""
from __future__ import annotations

import argparse
from collections import Counter


def add_data_command(subparsers) -> argparse._SubParsersAction:
    """Add the `data` command; return its sub-subparsers so other modules can add `data <name>` commands."""
    data = subparsers.add_parser("data", help="make and check audio question sets")
    return data.add_subparsers(dest="data_command", required=True)


def register_cli(subparsers) -> None:
    data_commands = add_data_command(subparsers)

    synth = data_commands.add_parser("synth", help="write a synthetic tiered audio-question set (wav + jsonl)")
    synth.add_argument("--out", required=True, help="output folder (gets audio/ and data.jsonl)")
    synth.add_argument("--n", type=int, required=True, help="number of questions")
    synth.add_argument("--seed", type=int, default=0, help="same seed -> byte-identical files")
    synth.add_argument("--tiers", "--num-tiers", dest="tiers", type=int, default=3,
                       help="number of curriculum tiers (1..3)")
    synth.add_argument("--set", dest="families", default="mixed", choices=("mixed", "pitch_ladder"),
                       help="mixed: a different skill per tier; pitch_ladder: one pitch question, harder per tier")
    synth.add_argument("--silent", action="store_true", help="silent clips (checks that a model uses the audio)")
    synth.set_defaults(func=run_synth)

    validate = data_commands.add_parser("validate", help="check a question set; exit 1 on problems")
    validate.add_argument("--data", required=True, help="data file")
    validate.add_argument("--format", default="jsonl", choices=("jsonl", "mmau", "r1aqa"))
    validate.add_argument("--audio-dir", default=None, help="base for relative audio paths (default: file's folder)")
    validate.add_argument("--policy", default="error", choices=("error", "skip"),
                          help="error: list every problem and exit 1; skip: drop bad rows and report counts")
    validate.add_argument("--num-tiers", type=int, default=None, help="require tiers in 0..num_tiers-1")
    validate.add_argument("--no-check-audio", dest="check_audio", action="store_false",
                          help="skip decoding the clips (e.g. MMAU metadata without its audio)")
    validate.add_argument("--allow-external-audio", action="store_true",
                          help="accept audio outside the data folder (--audio-dir, else the file's folder)")
    validate.set_defaults(func=run_validate)

    silent = data_commands.add_parser("silent-copy", help="the same questions over silent clips")
    silent.add_argument("--data", required=True, help="jsonl in this project's format")
    silent.add_argument("--out", required=True, help="output folder")
    silent.set_defaults(func=run_silent_copy)

    # `data difficulty` (curriculum tiers from a model's pass rates) lives with its owner's module; further
    # `data <name>` commands register the same way, on `data_commands`.
    from sari_ray.data.difficulty import add_difficulty_parser  # light at import: heavy imports are inside

    add_difficulty_parser(data_commands)

    from sari_ray.data.audio_contribution import add_audio_contribution_parser

    add_audio_contribution_parser(data_commands)


def _tier_counts(path) -> str:
    from sari_ray.data.readers import read_samples

    counts = Counter(sample.tier for sample in read_samples(path))
    return ", ".join(f"tier {tier}: {counts[tier]}" for tier in sorted(counts, key=lambda t: (t is None, t or 0)))


def run_synth(args: argparse.Namespace) -> int:
    from sari_ray.data.synth import synthesize

    path = synthesize(args.out, n=args.n, seed=args.seed, tiers=args.tiers, silence=args.silent,
                      families=args.families)
    print(path)
    print(_tier_counts(path))
    return 0


def run_validate(args: argparse.Namespace) -> int:
    """Exit 0: clean (or, under skip, something left to use); 1: the data has problems; 2 (from `sari-ray`'s
    main): a missing file or a bad argument."""
    from sari_ray.data.readers import DataFormatError
    from sari_ray.data.validate import DataValidationError, validate_file

    try:
        report = validate_file(args.data, args.format, args.audio_dir, check_audio=args.check_audio,
                               policy=args.policy, num_tiers=args.num_tiers,
                               allow_external_audio=args.allow_external_audio)
    except (DataValidationError, DataFormatError) as exc:  # the list of problems, or an empty / non-UTF-8 file
        print(exc)
        return 1
    print(report.summary())
    if not report.kept:
        print(f"error: {args.data}: no valid samples left")
        return 1
    return 0


def run_silent_copy(args: argparse.Namespace) -> int:
    from sari_ray.data.synth import make_silent_copy

    print(make_silent_copy(args.data, args.out))
    return 0

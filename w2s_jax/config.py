"""`--config FILE` support: option values from JSON/TOML, overridden by flags."""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path


def load_config_file(path: str | Path) -> dict:
    """Read a flat mapping of option names to values from a .json or .toml file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"config file {path} is not UTF-8 text ({exc.reason})") from None
    try:
        values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"config file {path} is not valid {path.suffix[1:]}: {exc}") from exc
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of option names")
    return {key.replace("-", "_"): value for key, value in values.items()}


def apply_config_file(
    parser: argparse.ArgumentParser, argv: list[str], args: argparse.Namespace
) -> argparse.Namespace:
    """Re-parse `argv` with defaults taken from `args.config`, so explicit flags win.

    Unknown keys in the file are an error naming the key and the file.
    """
    if not getattr(args, "config", None):
        return args
    values = load_config_file(args.config)
    known = {action.dest for action in parser._actions}  # noqa: SLF001
    unknown = sorted(set(values) - known - {"config"})
    if unknown:
        raise ValueError(
            f"config file {args.config} has unknown option(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known - {'help', 'config'}))}"
        )
    parser.set_defaults(**values)
    return parser.parse_args(argv)

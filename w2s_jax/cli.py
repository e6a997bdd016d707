"""The `w2s` command line: one subcommand per pipeline stage.

Each subcommand is a module `w2s_jax.commands.<name>` whose docstring's first
line is its help text and which exposes `add_arguments(parser)` and
`run(args) -> int`. Command modules import JAX and models inside `run`, so
`w2s --help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import pkgutil
import signal
import sys
import threading
import traceback

from w2s_jax import __version__, commands, compile_cache, run_folder
from w2s_jax.config import apply_config_file

# Pipeline order for `w2s --help`; commands not listed here come after, sorted.
ORDER = ("sample", "train", "export", "eval", "demo", "devices")


def _command_names() -> list[str]:
    """Every command's name: its module's, with dashes for underscores (`import-gguf`)."""
    modules = [m.name for m in pkgutil.iter_modules(commands.__path__)]
    names = [m.replace("_", "-") for m in modules if not m.startswith("_")]
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and the parser of each subcommand."""
    parser = argparse.ArgumentParser(
        prog="w2s", description="Weak-to-strong training in JAX (LightReasoner and friends)."
    )
    parser.add_argument("--version", action="version", version=f"w2s_jax {__version__}")
    parser.add_argument(
        "--no-compilation-cache",
        dest="compilation_cache",
        action="store_false",
        help="Compile everything afresh: no persistent compilation cache (on by default in "
        f"{compile_cache.default_cache_dir()}; {compile_cache.OFF_VARIABLE}=0 also turns it off).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    by_name = {}
    for name in _command_names():
        module = importlib.import_module(f"w2s_jax.commands.{name.replace('-', '_')}")
        summary = (module.__doc__ or "").strip().splitlines()[0]
        sub = subparsers.add_parser(
            name,
            help=summary,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,  # keep usage lines apart
        )
        sub.add_argument(
            "--config", metavar="FILE", help="JSON or TOML file of option values; flags win."
        )
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
        by_name[name] = sub
    return parser, by_name


class _Terminated(Exception):
    """SIGTERM arrived while a command ran (train handles it itself, saving a checkpoint)."""


def _raise_terminated(signum, frame):
    raise _Terminated


def _message(exc: Exception) -> str:
    """An exception as one line: an OSError as "PATH: reason", without "[Errno N]"."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc)


class _LibraryTracebacks(logging.Filter):
    """Drops the error logs (with their tracebacks) that Orbax's background threads and
    asyncio print when a save fails: the same failure reaches the command as an
    exception and is reported once, as its `error:` line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if record.name == "asyncio":
            return False
        trace = record.exc_info[2] if record.exc_info else None
        return not any("orbax" in frame.filename for frame in traceback.extract_tb(trace))


_LIBRARY_TRACEBACKS = _LibraryTracebacks()


def _drop_closed_loop_callbacks(unraisable, *, previous=sys.unraisablehook) -> None:
    """An unraisablehook that drops "Event loop is closed": TensorStore's write callbacks
    for an Orbax save that already failed, arriving after its event loop has gone."""
    value = unraisable.exc_value
    if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
        previous(unraisable)


def _quiet_library_errors() -> None:
    """`_LibraryTracebacks` on the loggers they use and `_drop_closed_loop_callbacks`,
    unless W2S_TRACEBACK is set. Kept for the process: a background save thread may
    report after the command's exception."""
    if not os.environ.get("W2S_TRACEBACK"):
        for name in ("absl", "asyncio"):
            logging.getLogger(name).addFilter(_LIBRARY_TRACEBACKS)  # once per object
        sys.unraisablehook = _drop_closed_loop_callbacks


def _run_folder_lock(args: argparse.Namespace, command: str):
    """The command's `--out` held for this process alone (see `run_folder.locked`)."""
    out = getattr(args, "out", None)
    if not out:
        return contextlib.nullcontext()
    return run_folder.locked(out, command=f"w2s {command}")


def main(argv: list[str] | None = None) -> int:
    """Run `w2s ARGV`. A user's error (a bad path, value or file) ends it with one
    `error: ...` line and exit status 1; W2S_TRACEBACK=1 shows the traceback instead.
    SIGTERM ends it with status 143 and says how to resume (outputs are written
    atomically, so finished work is kept). The command's --out is locked for the run:
    a second run on it is refused. JAX's persistent compilation cache is turned
    on (or, with --no-compilation-cache, off) before the command compiles anything."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, subparsers = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    command = args.command  # a --config file's re-parse returns the command's namespace
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        command_argv = argv[argv.index(command) + 1 :]
        if args.compilation_cache:  # before a config file's re-parse drops the global flag
            compile_cache.enable_compilation_cache()
        else:
            compile_cache.disable_compilation_cache()
        args = apply_config_file(subparsers[command], command_argv, args)
        _quiet_library_errors()
        with _run_folder_lock(args, command):
            return int(args._run(args) or 0)
    except _Terminated:
        print(
            f"w2s {command}: stopped by SIGTERM; finished work is kept, re-run the same "
            "command to resume",
            file=sys.stderr,
        )
        return 143
    except (ValueError, OSError) as exc:  # DataError, ConfigError, CheckpointError, ...
        if os.environ.get("W2S_TRACEBACK"):
            raise
        raise SystemExit(f"error: {_message(exc)}") from None
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())

"""JAX's persistent compilation cache: compiled programs kept on disk for later runs.

The `w2s` command line turns it on before anything compiles (`w2s --no-compilation-cache
COMMAND` or W2S_JAX_COMPILATION_CACHE=0 turn it off); notebooks and scripts call
`enable_compilation_cache()` themselves. Nothing happens on import.

The folder: the `path` given, else JAX_COMPILATION_CACHE_DIR (JAX's own variable), else
`jax_compilation_cache` in the w2s_jax cache folder ($W2S_JAX_CACHE_DIR,
$XDG_CACHE_HOME/w2s_jax or ~/.cache/w2s_jax). Least recently used entries go once it
holds MAX_BYTES (unless JAX_COMPILATION_CACHE_MAX_SIZE says otherwise). Only process 0
of a multi-host run writes entries (JAX's rule); every process reads its own folder, so
give all hosts one shared folder (NFS, gs://...) for the others to hit it too. The cache
is trusted code: never point it at a folder others can write.
"""

from __future__ import annotations

import os
from pathlib import Path

from w2s_jax.fingerprint import cache_path

OFF_VARIABLE = "W2S_JAX_COMPILATION_CACHE"
MAX_BYTES = 8 << 30
# Programs that compile faster than this are not worth a file (JAX's default is 1 s).
MIN_COMPILE_SECONDS = 0.2


def turned_off_by_environment() -> bool:
    """True when W2S_JAX_COMPILATION_CACHE is 0, false, no or off."""
    return os.environ.get(OFF_VARIABLE, "").strip().lower() in {"0", "false", "no", "off"}


def default_cache_dir() -> Path:
    """jax_compilation_cache in the w2s_jax cache folder (that of `fingerprint.cache_path`)."""
    return cache_path().parent / "jax_compilation_cache"


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str | None:
    """Turn the persistent compilation cache on (see the module docstring for the folder);
    returns the folder, or None when it stays off: W2S_JAX_COMPILATION_CACHE=0, or a local
    folder that cannot be created or written (that only means no caching). Thresholds
    that JAX's own variables set (JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS, ...) win."""
    import jax

    folder = str(path or os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_cache_dir())
    if turned_off_by_environment() or not _writable(folder):
        disable_compilation_cache()
        return None
    _set_unless_in_environment("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    _set_unless_in_environment("jax_compilation_cache_max_size", MAX_BYTES)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_enable_compilation_cache", True)
    _forget_cache_state()
    return folder


def disable_compilation_cache() -> None:
    """Turn the persistent compilation cache off for the rest of the process."""
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    _forget_cache_state()


def _writable(folder: str) -> bool:
    """Whether a local folder exists or can be created, and can be written; True for a
    URL (gs://...), which JAX opens itself."""
    if "://" in folder:
        return True
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def _set_unless_in_environment(name: str, value) -> None:
    """jax.config.update(name, value), unless the user set JAX's variable of that name."""
    import jax

    if name.upper() not in os.environ:
        jax.config.update(name, value)


def _forget_cache_state() -> None:
    """Make JAX read the cache settings again at the next compile (it keeps them after
    the first one)."""
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()

"""Print the JAX backend, device count and device kinds."""

from __future__ import annotations

import argparse
import collections


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def run(args: argparse.Namespace) -> int:
    del args
    import jax

    devices = jax.devices()
    kinds = collections.Counter(d.device_kind for d in devices)
    print(f"backend: {jax.default_backend()}")
    print(f"process: {jax.process_index()} of {jax.process_count()}")
    print(f"local devices: {jax.local_device_count()}")
    print(f"devices: {len(devices)}")
    for kind, count in sorted(kinds.items()):
        print(f"  {count} x {kind}")
    return 0

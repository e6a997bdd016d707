"""The ground every later test stands on: devices, sharding, CLI, scripts."""

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from tolerances import reordered_sum_bound

from w2s_jax import __version__
from w2s_jax.cli import main
from w2s_jax.config import apply_config_file

ROOT = Path(__file__).resolve().parents[1]


def test_eight_simulated_devices():
    assert jax.device_count() == 8
    assert all(d.platform == "cpu" for d in jax.devices())


def test_sharded_jit_matches_unsharded():
    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 16), dtype=np.float32)
    w = rng.standard_normal((16, 12), dtype=np.float32)

    def f(x, w):
        return jax.nn.log_softmax(jnp.tanh(x @ w), axis=-1).sum(axis=0)

    expected = jax.jit(f)(x, w)
    xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    ws = jax.device_put(w, NamedSharding(mesh, P(None, "tensor")))
    got = jax.jit(f, out_shardings=NamedSharding(mesh, P("tensor")))(xs, ws)
    assert len(xs.sharding.device_set) == 8
    assert got.sharding.spec == P("tensor")
    # float32 sums split over devices: x @ w (16 terms), the normaliser (12), the sum over
    # the 8 rows, at the result's scale (~25)
    bound = reordered_sum_bound(expected, terms=16, reductions=3)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=0, atol=bound)
    # And against numpy, so a silently broken jit cannot pass (a wrong axis: O(1) off).
    z = np.tanh(x @ w)
    ref = (z - np.log(np.exp(z).sum(-1, keepdims=True))).sum(0)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=bound)


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_cli_help_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in ("sample", "train", "export", "eval", "demo", "devices"):
        assert name in out


def test_cli_devices_reports_eight_cpu_devices():
    env = {
        **__import__("os").environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    out = subprocess.run(
        [sys.executable, "-m", "w2s_jax.cli", "devices"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    assert "backend: cpu" in out
    assert "devices: 8" in out


def _toy_parser():
    parser = argparse.ArgumentParser(prog="w2s toy")
    parser.add_argument("--config")
    parser.add_argument("--out", default="default_out")
    parser.add_argument("--steps", type=int, default=10)
    return parser


def _parse_with_config(argv):
    parser = _toy_parser()
    return apply_config_file(parser, argv, parser.parse_args(argv))


def test_config_file_sets_defaults_and_flags_win(tmp_path):
    cfg = tmp_path / "run.json"
    cfg.write_text('{"out": "from_file", "steps": 3}')
    args = _parse_with_config(["--config", str(cfg)])
    assert (args.out, args.steps) == ("from_file", 3)
    args = _parse_with_config(["--config", str(cfg), "--out", "from_flag"])
    assert (args.out, args.steps) == ("from_flag", 3)
    toml = tmp_path / "run.toml"
    toml.write_text('out = "from_toml"\n')
    assert _parse_with_config(["--config", str(toml)]).out == "from_toml"


def test_config_file_unknown_key_is_named(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("no_such_option = 3\n")
    with pytest.raises(ValueError, match="no_such_option"):
        _parse_with_config(["--config", str(cfg)])


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        _parse_with_config(["--config", str(tmp_path / "missing.json")])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid json"):
        _parse_with_config(["--config", str(bad)])
    # Through the command line: one `error:` line naming the file, no traceback.
    with pytest.raises(SystemExit, match="^error: config file .*bad.json is not valid json"):
        main(["devices", "--config", str(bad)])


@pytest.mark.parametrize("script", ["tpu_setup.sh", ".ci/run"])
def test_shell_scripts_pass_bash_n_and_shellcheck(script):
    path = ROOT / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    result = subprocess.run([shellcheck, str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_settings_difference_lists_changed_keys_only():
    from w2s_jax.run_folder import settings_difference

    recorded = {"beta": 0.4, "alpha": 0.2, "out": "a", "gone": 1}
    requested = {"beta": 0.5, "alpha": 0.2, "out": "b", "new": [1, 2]}
    assert settings_difference(recorded, requested, ignore=("out",)) == [
        "beta: 0.4 -> 0.5",
        "gone: 1 -> None",
        "new: None -> [1, 2]",
    ]
    assert settings_difference(recorded, dict(recorded)) == []


def _make_dry_run(target: str, venv) -> str:
    """The commands `make TARGET` would run for a fresh venv at `venv`."""
    command = ["make", "-n", target, f"VENV={venv}"]
    return subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True).stdout


def test_make_demo_installs_the_runtime_dependencies_only(tmp_path):
    """`make demo` on a fresh machine must not pull the test extras (torch, peft, tfds)."""
    demo = _make_dry_run("demo", tmp_path / "venv")
    installs = [line for line in demo.splitlines() if "pip install" in line]
    assert any(line.rstrip().endswith("-e .") for line in installs)
    assert not any("[test]" in line for line in installs)
    assert "-e '.[test]'" in _make_dry_run("test", tmp_path / "venv")


def test_sigterm_says_how_to_resume(monkeypatch, capsys):
    import os
    import signal

    from w2s_jax.commands import devices

    def terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the command")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(devices, "run", terminated)
    assert main(["devices"]) == 143
    assert "re-run the same command to resume" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back

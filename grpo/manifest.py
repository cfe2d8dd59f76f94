"""What a checkpoint holds, recorded when it is saved and checked before it is loaded.

``manifest.json`` in a checkpoint directory lists every file under it (relative path, size
in bytes, and the SHA-256 of each 64 MiB block of the file)::

    {"format": 1, "hash": "sha256", "block_bytes": 67108864,
     "files": {"state/__0_0.distcp": {"bytes": 123, "sha256": ["<64 hex digits>", ...]}, ...}}

Why a full checksum, in blocks: only a checksum of every byte tells an altered file from a
good one of the same size (a size alone catches a truncated or missing file). The price is
reading the checkpoint back once and hashing it. Hashed as independent 64 MiB blocks, that
work spreads over every rank (block ``i`` of the sorted list goes to rank ``i mod world``)
and over up to 8 threads within a rank (``hashlib`` releases the GIL). Measured on the
shared 2-core test machine: SHA-256 at 0.2-0.5 GiB/s per core (it varies with the load), the
read back at ~0.3 GiB/s. At 7B full-parameter scale a state is ~100 GB (fp32 weights and
AdamW's two moments), ~12 GB per rank on 8 ranks: about 6 s per save at 2 GB/s per rank,
about a minute at this test machine's speed with one thread, against the minute or so the
save itself takes (an estimate from these rates, not measured at 7B). A LoRA run's state is
megabytes. ``--resume`` reads the checkpoint once more the same way before loading it.

The manifest guards against truncation, bit rot and files swapped or edited by mistake;
it is not a signature (whoever can edit a file can edit the manifest too). That nothing in a
checkpoint runs code when read is ``grpo.checkpoint``'s job (a restricted unpickler).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import torch.distributed as dist

from data.quote import cut, quote

from models.collectives import gather_objects

MANIFEST = "manifest.json"
FORMAT = 1
BLOCK_BYTES = 64 * 2**20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(ValueError):
    """manifest.json is missing or is not a manifest this code wrote; the message names it."""


def _threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _n_blocks(size: int, block: int) -> int:
    return max(1, math.ceil(size / block))  # an empty file has one block: the hash of nothing


def _hash_block(root: Path, rel: str, index: int, block: int) -> str:
    with open(root / rel, "rb") as f:
        data = os.pread(f.fileno(), block, index * block)
    return hashlib.sha256(data).hexdigest()


def _hash_share(root: Path, blocks: list[tuple[str, int]], block: int) -> dict[tuple[str, int], str]:
    """This rank's share of ``blocks`` hashed (block ``i`` of the list belongs to rank ``i mod
    world``), gathered so every rank returns all of them. A file that cannot be read gives
    ``None`` for its blocks (reported by the caller), never an exception on one rank only."""
    rank, world = _world()
    mine = blocks[rank::world]

    def one(item):
        try:
            return _hash_block(root, item[0], item[1], block)
        except OSError:
            return None

    with ThreadPoolExecutor(_threads()) as pool:
        hashed = list(pool.map(one, mine))
    merged = {}
    for part in gather_objects(list(zip(mine, hashed))):
        merged.update({tuple(item): h for item, h in part})
    return merged


def files_under(root: Path) -> list[str]:
    """Every regular file below ``root`` as a POSIX relative path, sorted; the manifest excluded."""
    found = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != MANIFEST and (Path(dirpath) / name).is_file():
                found.append(rel)
    return sorted(found)


def record(root: str | Path, *, block: int = BLOCK_BYTES) -> dict:
    """The manifest of every file under ``root`` (a collective: every rank calls it, each
    hashes its share of the blocks; every rank returns the whole manifest)."""
    root = Path(root)
    sizes = {rel: (root / rel).stat().st_size for rel in files_under(root)}
    blocks = [(rel, i) for rel, size in sizes.items() for i in range(_n_blocks(size, block))]
    hashes = _hash_share(root, blocks, block)
    unreadable = sorted({rel for (rel, _), h in hashes.items() if h is None})
    if unreadable:
        raise OSError(f"could not read {root / unreadable[0]} back to record its checksum")
    files = {rel: {"bytes": size, "sha256": [hashes[(rel, i)] for i in range(_n_blocks(size, block))]}
             for rel, size in sizes.items()}
    return {"format": FORMAT, "hash": "sha256", "block_bytes": block, "files": files}


def write(root: str | Path, manifest: dict) -> Path:
    """``root/manifest.json``, through a temporary file and a rename (never half written)."""
    path = Path(root) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read(root: str | Path) -> dict:
    """``root/manifest.json``, checked to be a manifest; anything else is a ManifestError."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path} is missing: the checkpoint cannot be verified (it was not completely "
                            "written, or was saved without one)")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path} cannot be read as JSON ({err})") from None
    problem = _shape_problem(manifest)
    if problem:
        raise ManifestError(f"{path} is not a checkpoint manifest: {problem}")
    return manifest


def _shape_problem(manifest) -> str | None:
    if not isinstance(manifest, dict):
        return "not a JSON object"
    if manifest.get("format") != FORMAT or manifest.get("hash") != "sha256":
        return f"format {quote(manifest.get('format'))} / hash {quote(manifest.get('hash'))}, expected {FORMAT} / 'sha256'"
    block, files = manifest.get("block_bytes"), manifest.get("files")
    if type(block) is not int or block < 1:
        return f"block_bytes {quote(block)} is not a positive integer"
    if not isinstance(files, dict):
        return "'files' is not an object"
    for rel, entry in files.items():
        parts = PurePosixPath(rel).parts
        if not rel or rel.startswith("/") or ".." in parts or "\\" in rel or "\x00" in rel or rel == MANIFEST:
            return f"file name {quote(rel)} is not a path inside the checkpoint"
        if not isinstance(entry, dict) or type(entry.get("bytes")) is not int or entry["bytes"] < 0:
            return f"{cut(rel)}: no size in bytes"
        hashes = entry.get("sha256")
        if not isinstance(hashes, list) or len(hashes) != _n_blocks(entry["bytes"], block) \
                or not all(isinstance(h, str) and _HEX64.match(h) for h in hashes):
            return f"{cut(rel)}: the checksums do not match its size"
    return None


def _within(rel: str, names) -> bool:
    """Whether ``rel`` is one of ``names`` or inside one of them (top-level files or folders)."""
    return any(rel == n or rel.startswith(n.rstrip("/") + "/") for n in names)


def verify(root: str | Path, *, only: tuple[str, ...] | None = None, skip: tuple[str, ...] = (),
           require: tuple[str, ...] = (), checksums: bool = True) -> str | None:
    """None when every file the manifest lists is there with its size and checksums; else one
    line naming the first file that is not. ``only``: check just the files under these names;
    ``skip``: leave the files under these out; ``require`` (and ``only``): names under which
    the manifest must list at least one file; ``checksums=False``: sizes only (no reading, no
    collective).

    A collective when several ranks run (each hashes its share); all ranks get the same answer.
    A missing or malformed manifest is a ManifestError (raised on every rank alike).
    """
    root = Path(root)
    manifest = read(root)
    block = manifest["block_bytes"]
    files = {rel: e for rel, e in manifest["files"].items()
             if (only is None or _within(rel, only)) and not _within(rel, skip)}
    for name in (*(only or ()), *require):
        if not any(_within(rel, (name,)) for rel in files):
            return f"{root / name}: not listed in {root / MANIFEST} (the checkpoint does not hold it)"
    for rel in sorted(files):  # the cheap checks first, identical on every rank
        path, want = root / rel, files[rel]["bytes"]
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != want:
            kind = "truncated" if size < want else "longer than saved"
            return f"{path} is {kind}: {size} bytes, {want} when saved"
    if not checksums:
        return None
    blocks = [(rel, i) for rel in sorted(files) for i in range(len(files[rel]["sha256"]))]
    hashes = _hash_share(root, blocks, block)
    for rel, i in blocks:
        got = hashes[(rel, i)]
        if got is None:
            return f"{root / rel} cannot be read"
        if got != files[rel]["sha256"][i]:
            start = i * block
            return (f"{root / rel} was altered: bytes {start}-{min(start + block, files[rel]['bytes'])} "
                    "differ from what was saved (checksum mismatch)")
    return None


def drop(root: str | Path, prefixes: list[str]) -> None:
    """Remove from the manifest the files under ``prefixes`` (folders or file names) that were
    deleted on purpose (old full states pruned, exports kept)."""
    root = Path(root)
    try:
        manifest = read(root)
    except ManifestError:
        return  # nothing to keep in step with
    manifest["files"] = {rel: e for rel, e in manifest["files"].items() if not _within(rel, prefixes)}
    write(root, manifest)

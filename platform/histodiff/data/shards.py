"""The tile shard format: Parquet parts of PNG bytes plus a manifest written last.

Ingest and synthesis write it; every reader reads it. See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from histodiff.storage import Store, join

MANIFEST = "_manifest.json"

TILE_SCHEMA = pa.schema(
    [
        ("image", pa.binary()),
        ("label", pa.string()),
        ("dataset", pa.string()),
        ("source", pa.string()),
        ("sha1", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)


@dataclass
class Manifest:
    """What a complete shard directory holds."""

    uri: str
    shards: list[str]
    num_tiles: int
    classes: list[str]
    tile_size: int
    report: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def shard_uris(self) -> list[str]:
        """Return the absolute URIs of the shards."""
        return [join(self.uri, name) for name in self.shards]


def encode_png(tile: np.ndarray) -> bytes:
    """Return PNG bytes for an HWC uint8 RGB tile."""
    buf = io.BytesIO()
    Image.fromarray(tile, mode="RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """Return an HWC uint8 RGB array from encoded image bytes."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def pixel_sha1(tile: np.ndarray) -> str:
    """Return the sha1 of a tile's pixels (the dedup key)."""
    return hashlib.sha1(np.ascontiguousarray(tile).tobytes()).hexdigest()


def tiles_table(tiles: Iterable[np.ndarray], labels: Iterable[str | None], dataset: str,
                sources: Iterable[str]) -> pa.Table:
    """Return a TILE_SCHEMA table for in-memory tiles."""
    rows: dict[str, list] = {name: [] for name in TILE_SCHEMA.names}
    for tile, label, source in zip(tiles, labels, sources):
        rows["image"].append(encode_png(tile))
        rows["label"].append(label)
        rows["dataset"].append(dataset)
        rows["source"].append(source)
        rows["sha1"].append(pixel_sha1(tile))
        rows["height"].append(int(tile.shape[0]))
        rows["width"].append(int(tile.shape[1]))
    return pa.Table.from_pydict(rows, schema=TILE_SCHEMA)


def write_table(table: pa.Table, uri: str, store: Store) -> None:
    """Write one Parquet part atomically (temporary name, then rename; one PUT on S3)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    store.write_bytes(uri, sink.getvalue().to_pybytes())


def shard_name(index: int) -> str:
    """Return the deterministic file name of shard ``index``."""
    return f"part-{index:05d}.parquet"


def write_manifest(manifest: Manifest, store: Store) -> None:
    """Write the manifest last: it marks the directory complete."""
    store.write_json(
        join(manifest.uri, MANIFEST),
        {
            "shards": manifest.shards,
            "num_tiles": manifest.num_tiles,
            "classes": manifest.classes,
            "tile_size": manifest.tile_size,
            "report": manifest.report,
            "fingerprint": manifest.fingerprint,
            "extra": manifest.extra,
        },
    )


def read_manifest(uri: str, store: Store) -> Manifest:
    """Return the manifest of a complete shard directory, or raise a clear error."""
    path = join(uri, MANIFEST)
    if not store.exists(path):
        raise FileNotFoundError(
            f"{uri!r} holds no complete tile shards (no {MANIFEST}); run `histodiff run ingest` first"
        )
    data = store.read_json(path)
    return Manifest(
        uri=uri,
        shards=list(data["shards"]),
        num_tiles=int(data["num_tiles"]),
        classes=list(data.get("classes", [])),
        tile_size=int(data.get("tile_size", 0)),
        report=data.get("report", {}),
        fingerprint=data.get("fingerprint", ""),
        extra=data.get("extra", {}),
    )


def read_table(uri: str, store: Store, columns: list[str] | None = None) -> pa.Table:
    """Return all tiles of a complete shard directory as one Arrow table."""
    manifest = read_manifest(uri, store)
    tables = [store.read_parquet(shard, columns) for shard in manifest.shard_uris()]
    if not tables:
        return TILE_SCHEMA.empty_table() if columns is None else TILE_SCHEMA.empty_table().select(columns)
    return pa.concat_tables(tables)


def load_tiles(uri: str, store: Store) -> tuple[np.ndarray, list[str | None]]:
    """Return (uint8 NHWC tiles, labels) of a small shard directory, in shard order."""
    table = read_table(uri, store, columns=["image", "label"])
    images = [decode_png(b) for b in table.column("image").to_pylist()]
    labels = table.column("label").to_pylist()
    if not images:
        return np.zeros((0, 0, 0, 3), dtype=np.uint8), []
    return np.stack(images), labels


def to_model_range(tiles: np.ndarray) -> "Any":
    """Return a float32 NCHW torch tensor in [-1, 1] from uint8 NHWC tiles."""
    import torch

    tiles = np.ascontiguousarray(tiles)
    x = torch.from_numpy(tiles if tiles.flags.writeable else tiles.copy()).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def to_uint8(x: "Any") -> np.ndarray:
    """Return uint8 NHWC tiles from a float NCHW tensor in [-1, 1]."""
    arr = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().byte()
    return arr.permute(0, 2, 3, 1).cpu().numpy()

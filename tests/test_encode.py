"""Encode stage: tiles -> cached fp16 latents with a scale factor, on local disk and S3."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from histodiff import checkpoint as ckpt
from histodiff import storage
from histodiff.config import AutoencoderConfig, load_config
from histodiff.data import encode, shards
from histodiff.data.readers import read_spec
from histodiff.models.autoencoder import build_autoencoder
from histodiff.runner import run_stage
from histodiff.stages import encode as stage
from histodiff.storage import Store

AE_OVERRIDES = ["autoencoder.block_out_channels=[16,32,32]", "autoencoder.norm_num_groups=8",
                "autoencoder.encode_batch_size=16", "ray.cpus_per_worker=0.5"]


def smooth_tiles(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """Return n uint8 NHWC tiles of smooth colour fields."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(size, size), mode="bilinear", align_corners=False)
    return (x * 255).round().byte().permute(0, 2, 3, 1).numpy()


def write_shards(uri: str, tiles: np.ndarray, labels: list, per_shard: int = 16) -> None:
    """Write tiles as a complete shard directory (parts, then the manifest)."""
    names = []
    for i in range(0, len(tiles), per_shard):
        names.append(shards.shard_name(len(names)))
        table = shards.tiles_table(tiles[i : i + per_shard], labels[i : i + per_shard], "test",
                                   [f"t{j}" for j in range(i, i + per_shard)])
        shards.write_table(table, storage.join(uri, names[-1]), Store())
    classes = sorted({lab for lab in labels if lab is not None})
    shards.write_manifest(shards.Manifest(uri, names, len(tiles), classes, tiles.shape[1]), Store())


def make_inputs(root: str, labeled: bool = True) -> dict:
    """Write unlabeled (40), labeled (12) and labeled test (8) shards plus a random tiny autoencoder."""
    data = {"unlabeled": smooth_tiles(40, seed=1), "train": smooth_tiles(12, seed=2), "test": smooth_tiles(8, seed=3)}
    write_shards(storage.join(root, "shards/unlabeled"), data["unlabeled"], [None] * 40)
    if labeled:
        write_shards(storage.join(root, "shards/labeled"), data["train"], ["a", "b", "c"] * 4)
        write_shards(storage.join(root, "shards/labeled_test"), data["test"], ["a", "b"] * 4)
    torch.manual_seed(0)
    vae = build_autoencoder(AutoencoderConfig(block_out_channels=[16, 32, 32], norm_num_groups=8))
    meta = {"kind": "autoencoder", "fingerprint": "test", "downsample_factor": 4, "latent_channels": 3}
    data["sha256"] = ckpt.export_model(vae, storage.join(root, "models/autoencoder"), meta, Store())
    data["vae"] = vae.eval()
    return data


def expected_latents(vae, tiles: np.ndarray) -> torch.Tensor:
    """Return the posterior means of tiles, rounded to fp16 as stored."""
    with torch.no_grad():
        return vae.encode(shards.to_model_range(tiles)).latent_dist.mean.half().float()


def test_missing_autoencoder_is_a_clear_error(tmp_path):
    cfg = load_config("tiny", [f"paths.root={tmp_path}", "tracking.enabled=false"])
    with pytest.raises(FileNotFoundError, match="models/autoencoder"):
        run_stage(stage, cfg)


@pytest.mark.slow
def test_encode_writes_latents_meta_last_and_skips(tmp_path, ray_local):
    root = str(tmp_path)
    data = make_inputs(root)
    cfg = load_config("tiny", [f"paths.root={root}", "tracking.enabled=false", *AE_OVERRIDES])
    stale = storage.join(cfg.paths.latents, "junk.parquet")  # a crashed earlier attempt's leftover
    Store().write_bytes(stale, b"half a file")
    result = run_stage(stage, cfg)
    assert not result.skipped and not Store().exists(stale)
    meta = Store().read_json(storage.join(cfg.paths.latents, encode.LATENTS_META))
    assert meta["shape"] == [3, 4, 4] and meta["num_latents"] == 40 and meta["autoencoder_sha256"] == data["sha256"]
    parts = [os.path.join(cfg.paths.latents, p) for p in meta["shards"]]
    assert max(os.path.getmtime(p) for p in parts) <= os.path.getmtime(os.path.join(cfg.paths.latents, "_latents.json"))
    assert pq.read_schema(parts[0]).field("latent").type == "binary"

    # The scale factor is 1/std of the first batch (16 tiles in manifest order).
    first = expected_latents(data["vae"], data["unlabeled"][:16])
    assert meta["scale_factor"] == pytest.approx(1.0 / first.double().std(unbiased=False).item(), rel=1e-4)
    assert result.scale_factor == meta["scale_factor"]

    z, labels, sha1s, _ = encode.load_latents(cfg.paths.latents, Store())
    order = {s: i for i, s in enumerate(shards.pixel_sha1(t) for t in data["unlabeled"])}
    z_expected = expected_latents(data["vae"], data["unlabeled"])[[order[s] for s in sha1s]]
    assert torch.allclose(z, z_expected, atol=2e-3) and labels == [None] * 40
    assert data["vae"].decode(z[:2]).sample.shape == (2, 3, 16, 16)  # decodes back to tiles

    for split, n, classes in (("train", 12, {"a", "b", "c"}), ("test", 8, {"a", "b"})):
        zl, ll, sl, ml = encode.load_latents(result.labeled[split], Store())
        assert ml["scale_factor"] == meta["scale_factor"] and len(zl) == n and set(ll) == classes
        by_sha = {shards.pixel_sha1(t): t for t in data[split]}
        assert torch.allclose(zl, expected_latents(data["vae"], np.stack([by_sha[s] for s in sl])), atol=2e-3)
    assert result.num_labeled == {"train": 12, "test": 8}

    ds = encode.latent_dataset(cfg.paths.latents, Store(), read_spec(cfg), columns=("sha1",))
    batch = ds.take_batch(40, batch_format="numpy")
    assert batch["latent"].dtype == np.float32 and batch["latent"].shape == (40, 3, 4, 4)
    idx = [sha1s.index(s) for s in batch["sha1"]]
    assert np.allclose(batch["latent"], z[idx].numpy() * meta["scale_factor"], atol=1e-5)

    mtimes = [os.path.getmtime(p) for p in parts]
    again = run_stage(stage, cfg)
    assert again.skipped and again.scale_factor == result.scale_factor
    assert [os.path.getmtime(p) for p in parts] == mtimes


@pytest.mark.slow
def test_encode_latents_on_s3(tmp_path, s3_bucket, ray_local):
    root = f"{s3_bucket}/run"
    make_inputs(root, labeled=False)  # one Ray Data pass keeps this test short; labeled sets are optional
    cfg = load_config("tiny", [f"paths.root={root}", "tracking.enabled=false", *AE_OVERRIDES])
    result = run_stage(stage, cfg)
    assert result.latents_uri.startswith("s3://") and result.num_latents == 40 and result.labeled == {}
    z, labels, sha1s, meta = encode.load_latents(cfg.paths.latents, Store())
    assert z.shape == (40, 3, 4, 4) and len(set(sha1s)) == 40 and meta["scale_factor"] > 0
    batch = encode.latent_dataset(cfg.paths.latents, Store(), read_spec(cfg)).take_batch(8, batch_format="numpy")
    assert batch["latent"].shape == (8, 3, 4, 4)
    assert run_stage(stage, cfg).skipped


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_tile_encoder_matches_cpu(tmp_path):
    data = make_inputs(str(tmp_path))
    table = shards.read_table(str(tmp_path / "shards/unlabeled"), Store())
    out = encode.TileEncoder(str(tmp_path / "models/autoencoder"), Store(), use_gpu=True)(table.slice(0, 16))
    z = torch.from_numpy(encode.decode_latents(out.column("latent"), [3, 4, 4]))
    # bf16 autocast on the GPU: agree with the fp32 CPU encoder to bf16 precision.
    assert torch.allclose(z, expected_latents(data["vae"], data["unlabeled"][:16]), atol=5e-2)

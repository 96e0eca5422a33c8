"""Stage ``encode``: the unlabeled and labeled tile shards -> cached latents of the exported autoencoder.

The unlabeled set is encoded first; its first batch sets the latent ``scale_factor`` (the paper's
"scale by std"), which the labeled sets share. A set whose latents already carry this
autoencoder's hash and this scale factor is kept (a crash resumes set by set).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict

from histodiff.checkpoint import model_meta
from histodiff.config import HistodiffConfig
from histodiff.data import shards
from histodiff.data.encode import LATENTS_META, encode_set
from histodiff.data.readers import ReadSpec, read_spec
from histodiff.headline import metric_name
from histodiff.runner import Context, Spec as StageSpec, StageResult
from histodiff.storage import Store, join

log = logging.getLogger(__name__)

VERSION = 1


class EncodeSet(BaseModel):
    """One tile shard directory to encode and where its latents go."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    shards_uri: str
    shards_fingerprint: str
    latents_uri: str


class Spec(StageSpec):
    """The autoencoder export, the sets to encode (unlabeled first) and the encoder's batch."""

    autoencoder_uri: str
    autoencoder_sha256: str
    downsample_factor: int
    sets: list[EncodeSet]
    encode_batch_size: int
    encode_actors: int
    read: ReadSpec


@dataclass
class Result(StageResult):
    """Where the latents went, how many, and the scale factor the denoiser must apply."""

    latents_uri: str
    num_latents: int
    scale_factor: float
    shape: list[int]
    autoencoder_sha256: str
    labeled: dict[str, str] = field(default_factory=dict)  # split -> URI
    num_labeled: dict[str, int] = field(default_factory=dict)


def spec(cfg: HistodiffConfig, store: Store) -> Spec:
    """Return the encode spec: the autoencoder's hash and every ingested set's fingerprint."""
    paths = cfg.paths
    meta = model_meta(paths.autoencoder, store, "`histodiff run autoencoder`")
    sets = []
    for name, src, out in (("unlabeled", paths.unlabeled_shards, paths.latents),
                           ("train", paths.labeled_shards, join(paths.labeled_latents, "train")),
                           ("test", paths.labeled_test_shards, join(paths.labeled_latents, "test"))):
        if name != "unlabeled" and not (src and store.exists(join(src, shards.MANIFEST))):
            continue
        manifest = shards.read_manifest(src, store)  # the unlabeled set is required: a clear error if missing
        sets.append(EncodeSet(name=name, shards_uri=src, shards_fingerprint=manifest.fingerprint or
                              str(manifest.num_tiles), latents_uri=out))
    ae = cfg.autoencoder
    return Spec(output_uri=paths.latents, autoencoder_uri=paths.autoencoder, autoencoder_sha256=meta["sha256"],
                downsample_factor=int(meta["downsample_factor"]), sets=sets, encode_batch_size=ae.encode_batch_size,
                encode_actors=ae.encode_actors, read=read_spec(cfg))


def _current(store: Store, s: EncodeSet, sha: str, scale: float | None) -> dict | None:
    uri = join(s.latents_uri, LATENTS_META)
    if not store.exists(uri):
        return None
    meta = store.read_json(uri)
    same = meta.get("autoencoder_sha256") == sha and (scale is None or meta.get("scale_factor") == scale)
    return meta if same else None


def work(spec: Spec, ctx: Context) -> Result:
    """Encode every set (the unlabeled one first, which sets the scale factor); return the latents."""
    done: dict[str, dict] = {}
    scale = None
    for s in spec.sets:
        meta = _current(ctx.store, s, spec.autoencoder_sha256, scale)
        if meta is None:
            meta = encode_set(s.shards_uri, s.latents_uri, ctx.store, autoencoder_uri=spec.autoencoder_uri,
                              autoencoder_sha256=spec.autoencoder_sha256, downsample_factor=spec.downsample_factor,
                              encode_batch_size=spec.encode_batch_size, encode_actors=spec.encode_actors,
                              read=spec.read, cpus_per_actor=ctx.ray.cpus_per_worker, use_gpu=ctx.ray.use_gpu,
                              scale_factor=scale)
        else:
            log.info("encode: latents of %s at %s are current; kept", s.name, s.latents_uri)
        scale = meta["scale_factor"] if scale is None else scale
        done[s.name] = meta
    ctx.tracker.log_metrics({"scale_factor": scale, **{metric_name("num_latents", k): v["num_latents"] for k, v in done.items()}})
    unl = done["unlabeled"]
    return Result(latents_uri=spec.output_uri, num_latents=unl["num_latents"], scale_factor=unl["scale_factor"],
                  shape=unl["shape"], autoencoder_sha256=spec.autoencoder_sha256,
                  labeled={s.name: s.latents_uri for s in spec.sets if s.name != "unlabeled"},
                  num_labeled={k: v["num_latents"] for k, v in done.items() if k != "unlabeled"})

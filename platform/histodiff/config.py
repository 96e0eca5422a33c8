"""Typed configuration for every stage: one source for every default.

A run is described by one :class:`HistodiffConfig`. Presets (``histodiff/presets/*.yaml``,
shipped inside the package) override its defaults, and command-line ``dotted.key=value``
pairs override the preset.
Every error (an unknown key, a wrong type, an out-of-range value) is raised here, as one
:class:`ConfigError` that names the key, before any Ray or cluster resource is taken.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

# Package data: an installed histodiff finds its presets wherever it is installed.
PRESET_DIR = Path(__file__).resolve().parent / "presets"


class ConfigError(ValueError):
    """A configuration problem, reported with the offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _absolute(path: str) -> str:
    """Return a local path made absolute (from the current directory); URIs are returned unchanged."""
    if "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


class PathsConfig(_Strict):
    """Where each stage reads and writes. Every value is a local path or an s3:// URI.

    Unset outputs are derived from ``root``, so a preset only has to name ``root``.
    """

    root: str = "outputs/demo"
    unlabeled_sources: list[str] = Field(default_factory=list)
    labeled_source: str | None = None
    labeled_test_source: str | None = None
    unlabeled_shards: str | None = None
    labeled_shards: str | None = None
    labeled_test_shards: str | None = None
    autoencoder: str | None = None
    latents: str | None = None
    labeled_latents: str | None = None
    denoiser: str | None = None
    classifier: str | None = None
    pseudo_labels: str | None = None
    selector: str | None = None
    synthetic: str | None = None
    evaluation: str | None = None
    checkpoints: str | None = None
    sweep: str | None = None

    @model_validator(mode="after")
    def _derive(self) -> "PathsConfig":
        root = self.root.rstrip("/")
        defaults = {
            "unlabeled_shards": "shards/unlabeled",
            "labeled_shards": "shards/labeled",
            "labeled_test_shards": "shards/labeled_test",
            "autoencoder": "models/autoencoder",
            "latents": "latents/unlabeled",
            "labeled_latents": "latents/labeled",
            "denoiser": "models/denoiser",
            "classifier": "models/latent_classifier",
            "pseudo_labels": "pseudo_labels",
            "selector": "models/selector",
            "synthetic": "synthetic",
            "evaluation": "evaluation",
            "checkpoints": "checkpoints",
            "sweep": "sweep",
        }
        for key, rel in defaults.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, f"{root}/{rel}")
        # Local paths become absolute here, on the driver: Ray workers run in other directories,
        # so a relative path would name a different (empty) place there.
        for key in type(self).model_fields:
            value = getattr(self, key)
            if isinstance(value, list):
                object.__setattr__(self, key, [_absolute(v) for v in value])
            elif isinstance(value, str):
                object.__setattr__(self, key, _absolute(value))
        return self


class StorageConfig(_Strict):
    """Object-store settings. Credentials come from the environment unless set here."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    connect_timeout_s: float = Field(5.0, gt=0)
    request_timeout_s: float = Field(30.0, gt=0)
    max_attempts: int = Field(3, ge=1, le=20)


class RayConfig(_Strict):
    """Where and how wide stages run. ``address=None`` starts an embedded local Ray."""

    address: str | None = None
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    threads_per_worker: int | None = Field(None, ge=1, description=(
        "torch threads of each CPU training worker; default: its cpus_per_worker (Ray's OMP_NUM_THREADS). "
        "More threads than CPUs lets one worker use a small machine's cores while Ray Data keeps a CPU"))
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the embedded local Ray")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how Ray Train places its workers: PACK fills a node first (no network between workers "
                            "that fit on one); STRICT_PACK insists on one node; SPREAD / STRICT_SPREAD put them on "
                            "different nodes")
    max_failures: int = Field(2, ge=0)
    checkpoints_to_keep: int = Field(2, ge=1, description="Ray Train CheckpointConfig.num_to_keep")
    checkpoint_upload_mode: Literal["sync", "async"] = Field(
        "sync", description="async uploads in a background thread so accelerators keep training")
    upload_attempts: int = Field(5, ge=1, le=50, description="tries per checkpoint upload before failing")
    upload_backoff_s: float = Field(1.0, ge=0, description="first retry delay; doubles per try")


class TrackingConfig(_Strict):
    """MLflow settings; the URI of a server is never a secret, its token is (from env)."""

    enabled: bool = True
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "histodiff"
    registry_prefix: str = "histodiff"
    register_models: bool = True
    champion_alias: str = "champion"
    buffer_dir: str | None = Field(
        None, description="local folder where calls wait while the tracking server is down "
        "(default ~/.cache/histodiff/tracking-buffer); `histodiff tracking sync` sends them")
    buffer_max_mb: float = Field(1024.0, gt=0, description="per process and run; past it, calls are dropped (counted)")
    retry_s: float = Field(30.0, gt=0, description="while the tracking server is down, how often to look for it")
    request_timeout_s: int = Field(10, ge=1, description="per-request timeout towards a tracking server")
    request_max_retries: int = Field(2, ge=0, le=10, description="retries before a request counts as failed")
    max_model_upload_mb: float = Field(
        256.0, ge=0, description="exports above this stay in storage; the registry keeps their URI and sha256"
    )


class DataConfig(_Strict):
    """Tile ingest, reading and labeled splits."""

    tile_size: int = Field(64, ge=8, le=4096)
    extensions: list[str] = Field(default_factory=lambda: [".png", ".jpg", ".jpeg", ".tif", ".tiff"])
    min_source_size: int = Field(32, ge=1, description="smaller images are skipped")
    saturation_threshold: int | None = Field(
        None, ge=0, le=255, description="drop tiles whose mean HSV saturation is below this (paper: 80)"
    )
    max_bad_fraction: float = Field(0.2, ge=0, le=1)
    tiles_per_shard: int = Field(512, ge=1)
    augment: bool = Field(True, description="dihedral flips/rotations of unlabeled tiles for the autoencoder")
    materialize_max_mb: float = Field(
        256, ge=0, description="decoded datasets up to this size are read once and kept in Ray's object store"
        " instead of re-reading shards every epoch (0: always stream)")
    steps_per_pass: int = Field(
        100, ge=1, description="small (materialized) training sets are repeated, each copy in a new seeded order, "
        "until one Ray Data pass holds this many steps: every pass costs about a second of start-up")
    val_fraction: float = Field(0.2, ge=0, lt=1)
    test_fraction: float = Field(0.2, ge=0, lt=1)
    label_fraction: float | None = Field(None, gt=0, le=1)
    labels_per_class: int | None = Field(None, ge=1)
    label_draw: int = Field(0, ge=0, description="which draw of the label budget from the labeled pool (0: the "
                                                 "first); validation and test tiles are the same for every draw")

    @model_validator(mode="after")
    def _budget(self) -> "DataConfig":
        if self.label_fraction is not None and self.labels_per_class is not None:
            raise ValueError("set at most one of label_fraction and labels_per_class")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1")
        return self


class AutoencoderConfig(_Strict):
    """KL autoencoder (diffusers AutoencoderKL). f = 2 ** (len(block_out_channels) - 1)."""

    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = Field(1, ge=1)
    latent_channels: int = Field(3, ge=1)
    norm_num_groups: int = Field(16, ge=1)
    kl_weight: float = Field(1e-6, ge=0)
    perceptual_weight: float = Field(0.0, ge=0)
    perceptual_weights_uri: str | None = None
    disc_weight: float = Field(0.0, ge=0, description="0 turns the PatchGAN discriminator off")
    disc_start_step: int = Field(0, ge=0)
    disc_adaptive: bool = Field(True, description="scale the GAN loss by grad norms (LDM) instead of fixed")
    disc_layers: int = Field(3, ge=1, le=6)
    disc_channels: int = Field(64, ge=8)
    lr: float = Field(4.5e-4, gt=0)
    batch_size: int = Field(16, ge=1)
    steps: int = Field(300, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    report_every: int = Field(50, ge=1)
    eval_tiles: int = Field(32, ge=1, description="held-out tiles for PSNR/SSIM and the grid")
    encode_batch_size: int = Field(64, ge=1)
    encode_actors: int = Field(1, ge=1, description="encoder actors (one GPU each when use_gpu)")

    @model_validator(mode="after")
    def _perceptual(self) -> "AutoencoderConfig":
        if self.perceptual_weight > 0 and not self.perceptual_weights_uri:
            raise ValueError("perceptual_weight > 0 needs perceptual_weights_uri (nothing is downloaded)")
        return self


class ScheduleConfig(_Strict):
    """DDPM noise schedule; the paper's is diffusers' scaled_linear 0.0015..0.0155, T=1000."""

    num_train_timesteps: int = Field(1000, ge=2)
    beta_start: float = Field(0.0015, gt=0, lt=1)
    beta_end: float = Field(0.0155, gt=0, lt=1)
    beta_schedule: Literal["scaled_linear", "linear", "squaredcos_cap_v2"] = "scaled_linear"


class DenoiserConfig(_Strict):
    """Unconditional UNet (diffusers UNet2DModel) on latents, epsilon prediction."""

    block_out_channels: list[int] = Field(default_factory=lambda: [64, 128, 128])
    layers_per_block: int = Field(1, ge=1)
    attention_levels: list[bool] = Field(default_factory=lambda: [False, False, True])
    attention_head_dim: int = Field(32, ge=1)
    norm_num_groups: int = Field(32, ge=1)
    loss: Literal["l1", "l2"] = "l1"
    lr: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(100, ge=0)
    batch_size: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1)
    steps: int = Field(1000, ge=1)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    checkpoint_every: int = Field(250, ge=1)
    report_every: int = Field(25, ge=1)
    sample_every: int = Field(500, ge=1)
    compile: bool = False
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)

    @model_validator(mode="after")
    def _levels(self) -> "DenoiserConfig":
        if len(self.attention_levels) != len(self.block_out_channels):
            raise ValueError("attention_levels needs one entry per block_out_channels entry")
        return self


class LatentClassifierConfig(_Strict):
    """Time-conditioned classifier on noisy latents (encoder half of a UNet)."""

    block_out_channels: list[int] = Field(default_factory=lambda: [64, 128, 128])
    layers_per_block: int = Field(1, ge=1)
    norm_num_groups: int = Field(32, ge=1)
    pool: Literal["attention", "mean"] = "attention"
    attention_heads: int = Field(4, ge=1)
    mode: Literal["noisy", "clean"] = "noisy"
    max_timestep: int | None = Field(None, ge=0, description="train on t <= this (default: all)")
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    batch_size: int = Field(32, ge=1)
    steps: int = Field(600, ge=1)
    eval_timesteps: list[int] = Field(default_factory=lambda: [0, 200, 400, 600, 800])
    report_every: int = Field(50, ge=1)
    checkpoint_every: int = Field(200, ge=1)


class PseudoLabelConfig(_Strict):
    """Labels from the pool: kNN propagation in the pretrained denoiser's feature space (DDAE, DPT)."""

    per_class: int = Field(0, ge=0, description="pool tiles pseudo-labeled per class, the most confident first "
                                                "(0: off)")
    timestep: int = Field(50, ge=0, description="the denoiser reads noised latents at this timestep")
    k: int = Field(10, ge=1, description="labeled neighbours that vote for a pool tile's label")
    temperature: float = Field(0.05, gt=0, description="vote weight exp(cosine similarity / temperature)")
    use_in: list[Literal["classifier", "selector", "anchors"]] = Field(
        default_factory=lambda: ["classifier", "selector", "anchors"],
        description="which parts learn from the pseudo-labels: the latent classifier, the selector, the anchors "
                    "of anchored synthesis")


class SelectorConfig(_Strict):
    """Auxiliary pixel-space classifier (timm) that judges each synthetic tile."""

    backbone: str = "resnet18"
    mode: Literal["confidence", "centroid", "none"] = Field(
        "confidence", description="none keeps every generated tile: the unfiltered control")
    threshold: float = Field(0.9, ge=0, le=1)
    max_per_class: int | None = Field(None, ge=1)
    epochs: int = Field(15, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(32, ge=1)


class SynthesisConfig(_Strict):
    """Guided DDIM synthesis and the selective mechanism."""

    classes: list[str] | None = None
    accepted_per_class: int = Field(32, ge=1)
    max_samples_per_class: int = Field(256, ge=1)
    batch_size: int = Field(32, ge=1)
    num_inference_steps: int = Field(50, ge=1)
    eta: float = Field(1.0, ge=0)
    guidance_scale: float = Field(10.0, ge=0)
    strength: float = Field(1.0, gt=0, le=1, description=(
        "1: generate from pure noise (the paper). Below 1: anchored synthesis (SDEdit): each tile starts from a "
        "labeled tile of its class noised this far up the schedule, several variants per anchor"))
    num_actors: int = Field(1, ge=1)
    colour_drift_bound: float = Field(
        0.5, gt=0, description="flag a class whose accepted tiles' HED or LAB colour distribution drifts from the "
                               "real tiles' by more than this (a Wasserstein distance in real standard deviations)")
    keep_rejected: bool = Field(True, description="also write every generated tile (generated/): the unfiltered "
                                                  "control draws from it, and a user can audit the selector")
    selector: SelectorConfig = Field(default_factory=SelectorConfig)


class EvaluationConfig(_Strict):
    """Downstream classifier trained on real vs real + synthetic tiles, K seeds."""

    backbone: str = "resnet18"
    image_size: int = Field(64, ge=8)
    epochs: int = Field(15, ge=1, description="passes over each arm's train set; with steps: validation rounds")
    steps: int | None = Field(
        None, ge=1, description="optimizer steps per arm, the same for every arm (None: `epochs` passes, which gives "
                                "arms with synthetic tiles more steps than the baseline and confounds the gain)")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    batch_size: int = Field(32, ge=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    synthetic_fraction: float = Field(
        0.5, ge=0, lt=1, description="probability that a training row of a class with synthetic tiles is a "
                                     "synthetic tile of that class (0: baseline only): real tiles keep their share of "
                                     "the gradient and the class mix stays the real one however many synthetic tiles "
                                     "each class has; the synthetic volume is synthesis.accepted_per_class")
    synthetic_loss_weight: float = Field(1.0, ge=0)
    synthetic_label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="soft labels for every extra tile: (1 - e) on its class, e spread over all")
    synthetic_weighting: Literal["none", "confidence"] = Field(
        "none", description="confidence: each accepted synthetic tile's loss is weighted by the selector's score")
    augment: Literal["dihedral", "shift", "none"] = Field(
        "dihedral", description="label-safe augmentation: flips/rot90 for tissue, small shifts for digits")
    controls: list[Literal["unfiltered", "duplicated_real", "classical_aug", "pseudo_label"]] = Field(
        default_factory=lambda: ["unfiltered", "duplicated_real", "classical_aug"],
        description="control arms trained beside the augmented arm, at its volume, mixing and steps")
    knn_k: int = Field(5, ge=1, description="cheap baseline: neighbours of the latent kNN probe")
    memorisation_pairs: int = Field(16, ge=1, description="closest synthetic/real pairs shown in the grid")
    fid_extractor: Literal["baseline", "inception"] = "baseline"
    inception_weights_uri: str | None = None

    @model_validator(mode="after")
    def _inception(self) -> "EvaluationConfig":
        if self.fid_extractor == "inception" and not self.inception_weights_uri:
            raise ValueError("fid_extractor=inception needs inception_weights_uri (nothing is downloaded)")
        return self


class SweepConfig(_Strict):
    """Ray Tune sweep over guidance scale x selection threshold (x synthetic fraction)."""

    guidance_scales: list[float] = Field(default_factory=lambda: [1.0, 10.0])
    thresholds: list[float] = Field(default_factory=lambda: [0.5, 0.9])
    synthetic_fractions: list[float] | None = None
    strengths: list[float] | None = Field(None, description="anchored-synthesis strengths to try (None: "
                                                            "synthesis.strength)")
    search: Literal["grid", "random"] = "grid"
    num_samples: int = Field(1, ge=1)
    asha: bool = False
    max_concurrent_trials: int | None = Field(None, ge=1)
    resume: bool = True


class HistodiffConfig(_Strict):
    """The whole pipeline's configuration."""

    name: str = Field("demo", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    paths: PathsConfig = Field(default_factory=PathsConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = Field(default_factory=AutoencoderConfig)
    denoiser: DenoiserConfig = Field(default_factory=DenoiserConfig)
    classifier: LatentClassifierConfig = Field(default_factory=LatentClassifierConfig)
    pseudo_labels: PseudoLabelConfig = Field(default_factory=PseudoLabelConfig)
    synthesis: SynthesisConfig = Field(default_factory=SynthesisConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)

    @model_validator(mode="after")
    def _discriminator_fits_tiles(self) -> "HistodiffConfig":
        ae, tile = self.autoencoder, self.data.tile_size
        need = 3 * 2 ** ae.disc_layers  # the PatchGAN halves disc_layers times, then two 4x4 convs cut 1 px each
        if ae.disc_weight > 0 and tile < need:
            raise ValueError(f"autoencoder.disc_layers={ae.disc_layers} needs data.tile_size >= {need} (the "
                             f"PatchGAN discriminator halves the tile {ae.disc_layers} times); got {tile}. "
                             "Lower autoencoder.disc_layers or set autoencoder.disc_weight=0")
        return self

    def public_dict(self) -> dict[str, Any]:
        """Return the config as plain data with every secret removed (safe to log)."""
        data = self.model_dump(mode="json")
        data["storage"].pop("access_key_id", None)
        data["storage"].pop("secret_access_key", None)
        return data

    def flat_params(self) -> dict[str, str]:
        """Return ``{"a.b.c": value}`` for every public leaf, for MLflow params."""
        out: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)

        walk("", self.public_dict())
        return out

    def fingerprint(self, *sections: str) -> str:
        """Return a short hash of the named sections (all when none), for skip/resume checks."""
        data = self.public_dict()
        if sections:
            data = {s: data[s] for s in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Return a nested dict from ``key.sub=value`` strings (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {key!r}: cannot parse value {raw!r}: {exc}") from None
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _format_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<top level>"
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling)"
        else:
            msg = err["msg"]
            if "input" in err and not isinstance(err["input"], dict) and err["type"] != "missing" and not key.startswith("storage."):
                msg += f" (got {err['input']!r})"
        lines.append(f"  {key}: {msg}")
    return f"invalid configuration from {source}:\n" + "\n".join(lines)


def resolve_preset(preset: str | Path) -> Path:
    """Return the YAML file for a preset name (``tiny``) or a path."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        return path
    candidate = PRESET_DIR / f"{preset}.yaml"
    if not candidate.is_file():
        names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset {str(preset)!r}; choose one of {names} or give a .yaml path")
    return candidate


def load_config(preset: str | Path | None = "tiny", overrides: list[str] | None = None) -> HistodiffConfig:
    """Return a validated config from a preset (name or YAML path) plus dotted overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if preset is not None:
        path = resolve_preset(preset)
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {source!r} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {source!r} must hold a mapping at the top level")
        data = loaded
    if overrides:
        data = _merge(data, parse_overrides(overrides))
        source += " + overrides"
    try:
        return HistodiffConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None


def config_from_dict(data: dict[str, Any]) -> HistodiffConfig:
    """Return a validated config from plain data (as shipped to Ray workers)."""
    try:
        return HistodiffConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, "dict")) from None

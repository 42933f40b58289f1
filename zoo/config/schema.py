"""The resolved configuration of a run: pydantic models, every level closed to unknown keys.

Every section forbids unknown keys, so a misspelt key anywhere fails before any work is done.
Validation is strict: a TOML `true` is not the integer 1, nor the string "100" a number (the
command line's and the environment's values are parsed as TOML literals first, so `steps=100`
there is an integer).  Floats must be finite and every count has an upper bound, so a typo like
`train.steps=99999999999999999999` is refused up front instead of training for ever.
"""

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

DatasetName = Literal[
    "moons",
    "checkerboard",
    "gaussians8",
    "clusters",
    "digits",
    "fashion-mnist",
    "cifar10",
    "celeba",
    "imagenet",
    "imagenet-latents",
]


# Upper bounds of counts: far above any real run, low enough that a slip of the keyboard is caught.
MAX_STEPS = 100_000_000
MAX_BATCH = 1 << 20
MAX_SEED = 2**32 - 1
MAX_THREADS = 1024
# Network evaluations of one sample: a thousand-step ODE solve is already far past convergence.
MAX_NFE = 1000
# Samples an energy distance compares: its cost grows with the square of the number.
MAX_EVAL_SAMPLES = 100_000
MAX_GUIDANCE = 20.0
# iMF draws guidance intervals with t_min in [0, split] and t_max in [split, 1]: an interval that
# does not contain the split was never trained on.
GUIDANCE_INTERVAL_SPLIT = 0.5
# Validation context of a config read back from a checkpoint: rules that only guard a run's start
# must not lock its checkpoints away (zoo sample/eval check the guidance they actually use).
STORED = {"stored": True}
# `zoo sample` keeps its samples in memory and writes them to one .npz: a count and a size bound it.
MAX_SAMPLES = 1_000_000
MAX_SAMPLE_BYTES = 4 << 30
DEVICE_PATTERN = r"auto|cpu|mps|cuda(:[0-9]+)?"
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class DataConfig(Section):
    name: DatasetName = "moons"
    root: str = Field("data", description="folder holding datasets (Fashion-MNIST, CIFAR-10, ...)")
    download: bool = Field(False, description="let torchvision download the dataset if missing")
    hflip: bool = Field(True, description="random horizontal flips (ignored for 2-D and digit data)")
    image_size: int | None = Field(None, ge=8, le=1024, description="resize images (CelebA, ImageNet)")
    class_conditional: bool = False
    num_workers: int = Field(0, ge=0, le=64)
    on_device: bool = Field(True, description="keep datasets that fit as one tensor on the device")
    train_size: int | None = Field(None, ge=1, le=10**9, description="use only the first N training examples")
    latent_folder: str = Field(
        "imagenet-latents",
        min_length=1,
        description="folder under data.root with the latents of data.name=imagenet-latents "
        "(written by `zoo data encode-latents`)",
    )
    vae: str | None = Field(
        None,
        description="where to load the latents' VAE from to decode pictures (a local folder or a hub id); "
        "default: the VAE recorded in the latents' meta.json",
    )
    decode_latents: bool = Field(
        True,
        description="decode latent samples with the VAE for pictures (needs its weights; false shows latent "
        "channels 0-2)",
    )


TimeInputs = Literal["t_h", "t_r", "h"]


class NetworkConditioning(Section):
    """What every zoo network can be conditioned on, and its optional auxiliary velocity head."""

    time_inputs: TimeInputs = Field(
        "t_h",
        description="the times the network embeds: t_h = t and t - r (MeanFlow's), t_r = t and r, "
        "h = t - r alone (iMF's; the noise level is then read from z)",
    )
    guidance_inputs: bool = Field(
        False,
        description="also condition on the guidance scale omega and its interval [t_min, t_max] "
        "(iMF; class-conditional models): guidance is then chosen at sampling time",
    )
    v_head: int = Field(
        0,
        ge=0,
        le=64,
        description="blocks duplicated into an auxiliary instantaneous-velocity head (loss.kind=imf): "
        "DiT's last k blocks, the U-Net's last k decoder blocks, the MLP's last k residual blocks, "
        "each copy with its own output layer; 0 = none. Sampling never runs it",
    )


class MLPConfig(NetworkConditioning):
    arch: Literal["mlp"] = "mlp"
    hidden: int = Field(256, ge=8, le=8192)
    depth: int = Field(4, ge=1, le=32)
    time_embed_dim: int = Field(64, ge=8, le=4096)

    @model_validator(mode="after")
    def _v_head_fits(self) -> "MLPConfig":
        if self.v_head > self.depth:
            raise ValueError(f"v_head={self.v_head} duplicates more blocks than depth={self.depth} has")
        return self


class UNetConfig(NetworkConditioning):
    arch: Literal["unet"] = "unet"
    channels: int = Field(128, ge=8, le=1024)
    channel_mults: list[Annotated[int, Field(ge=1, le=16)]] = Field(
        default_factory=lambda: [2, 2, 2], min_length=1, max_length=6
    )
    blocks_per_res: int = Field(4, ge=1, le=8)
    attention_res: list[Annotated[int, Field(ge=1, le=1024)]] = Field(default_factory=lambda: [16])
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    num_groups: int = Field(32, ge=1, le=1024)
    heads: int = Field(1, ge=1, le=64)

    @model_validator(mode="after")
    def _groups_divide_channels(self) -> "UNetConfig":
        widths = {self.channels * m for m in self.channel_mults} | {self.channels}
        bad = sorted(w for w in widths if w % self.num_groups)
        if bad:
            raise ValueError(
                f"num_groups={self.num_groups} must divide every channel width {sorted(widths)}; "
                f"it does not divide {bad}"
            )
        return self

    @model_validator(mode="after")
    def _v_head_fits(self) -> "UNetConfig":
        top = self.blocks_per_res + 1  # decoder blocks at the input resolution, after the last up-block
        if self.v_head > top:
            raise ValueError(
                f"v_head={self.v_head} must not exceed the {top} decoder blocks at full resolution "
                f"(blocks_per_res + 1)"
            )
        return self


# The DiT paper's model sizes (Peebles & Xie 2023, Table 1): width, depth and attention heads.
# Each comes with a patch size of 2, 4 or 8, named like the paper's models: "B/2", "XL/8".
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
DIT_PATCH_SIZES = (2, 4, 8)
DiTSize = Literal["S/2", "S/4", "S/8", "B/2", "B/4", "B/8", "L/2", "L/4", "L/8", "XL/2", "XL/4", "XL/8"]
DIT_SIZE_NAMES: tuple[str, ...] = get_args(DiTSize)


def dit_size_fields(size: str) -> dict[str, int]:
    """The fields a named size fixes: "B/4" -> hidden 768, depth 12, heads 12, patch_size 4."""
    name, _, patch = size.partition("/")
    hidden, depth, heads = DIT_SIZES[name]
    return {"hidden": hidden, "depth": depth, "heads": heads, "patch_size": int(patch)}


class DiTConfig(NetworkConditioning):
    arch: Literal["dit"] = "dit"
    size: DiTSize | None = Field(
        None,
        description="a size of the DiT paper, S|B|L|XL with patch 2|4|8 (e.g. 'B/2'): sets hidden, "
        "depth, heads and patch_size",
    )
    patch_size: int = Field(2, ge=1, le=16)
    hidden: int = Field(384, ge=16, le=4096)
    depth: int = Field(12, ge=1, le=64)
    heads: int = Field(6, ge=1, le=64)
    mlp_ratio: float = Field(4.0, gt=0, le=16)

    @model_validator(mode="before")
    @classmethod
    def _named_size(cls, data: Any) -> Any:
        """Fill in the fields `size` fixes; a differing explicit value is a contradiction, not an override."""
        if not isinstance(data, dict) or data.get("size") not in DIT_SIZE_NAMES:
            return data  # no size, or an unknown one (the field's own check names the choices)
        implied = dit_size_fields(data["size"])
        for key, value in implied.items():
            if key in data and str(data[key]) != str(value):
                raise ValueError(
                    f"model.size={data['size']} means {key}={value}, but {key}={data[key]} was also "
                    f"given: drop model.{key}, pick another size, or set model.size=none to choose hidden, "
                    "depth, heads and patch_size yourself"
                )
        return {**data, **implied}

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "DiTConfig":
        if self.hidden % self.heads:
            raise ValueError(f"heads={self.heads} must divide hidden={self.hidden}")
        return self

    @model_validator(mode="after")
    def _v_head_fits(self) -> "DiTConfig":
        if self.v_head > self.depth:
            raise ValueError(f"v_head={self.v_head} duplicates more blocks than depth={self.depth} has")
        return self


ModelConfig = Annotated[MLPConfig | UNetConfig | DiTConfig, Field(discriminator="arch")]

JvpMode = Literal["auto", "primal", "fused", "selective", "nograd", "full_batch", "cuda_graph", "compile"]
# The modes a new run trains with; the others are zoo bench-jvp's alternatives (zoo.training.jvp_plan).
TRAINING_JVP_MODES = ("fused", "nograd")


# Objectives whose network learns the average velocity u(z, t, r) (sampled in 1 or a few jumps);
# every one of them computes a JVP for at least part of training.
AVERAGE_VELOCITY_LOSSES = ("meanflow", "imf", "alphaflow")


class LossConfig(Section):
    kind: Literal["meanflow", "flow_matching", "imf", "alphaflow"] = "meanflow"
    ratio: float = Field(0.75, ge=0.0, le=1.0, description="fraction of samples with r != t")
    time_sampler: Literal["logit_normal", "uniform"] = "logit_normal"
    time_mu: float = Field(-0.4, ge=-10, le=10, description="logit-normal mean")
    time_sigma: float = Field(1.0, gt=0, le=10, description="logit-normal std")
    weight_p: float = Field(1.0, ge=0.0, le=2.0, description="adaptive weight power p")
    weight_c: float = Field(1e-3, gt=0.0, le=1e3, description="adaptive weight constant c")
    jvp: JvpMode = Field(
        "fused",
        description=(
            "how MeanFlow computes its JVP: fused (the fastest) or nograd (the reference); auto = fused; "
            "the other modes are zoo bench-jvp's (zoo.training.jvp_plan)"
        ),
    )
    jvp_precision: Literal["fp32", "tf32", "bf16"] = Field(
        "tf32",
        description=(
            "precision inside the JVP, even under bf16 autocast: tf32 = fp32 tensors with TF32 "
            "matmuls/convolutions on CUDA (plain fp32 elsewhere); fp32 = IEEE fp32 on CUDA too; "
            "bf16 = bf16 autocast; under train.compile the JVP follows the run's TF32 setting "
            "(fp32 is refused on CUDA there)"
        ),
    )
    jvp_kernels: Literal["auto", "torch", "triton"] = Field(
        "auto",
        description=(
            "how jvp='fused' computes its group-norm tangents: torch = PyTorch operations; triton = two "
            "Triton kernels per layer (CUDA only; fewer launches and passes over memory); auto = triton "
            "on a CUDA device with Triton installed where a first tiny launch works (else torch, with "
            "a warning), torch elsewhere; train.compile uses the torch operations, which inductor fuses"
        ),
    )
    class_dropout: float = Field(0.1, ge=0.0, le=1.0, description="label dropout for guidance")
    guidance_omega: float = Field(1.0, gt=0.0, le=10.0, description="training-time CFG scale (1 = off)")
    guidance_kappa: float = Field(0.0, ge=0.0, lt=1.0)
    guidance_t_min: float = Field(0.0, ge=0.0, le=1.0)
    guidance_t_max: float = Field(1.0, ge=0.0, le=1.0)
    # iMF: guidance as a condition (model.guidance_inputs), drawn per sample in training: omega,
    # and an interval of its own (not guidance_t_min/max above) around GUIDANCE_INTERVAL_SPLIT.
    omega_max: float = Field(8.0, ge=1.0, le=100.0, description="iMF: omega is drawn on [1, omega_max]")
    omega_power: float = Field(
        1.0,
        ge=0.0,
        le=10.0,
        description="iMF: omega is drawn from p(omega) ~ omega ** -omega_power on [1, omega_max]; "
        "1 = log-uniform, 0 = uniform, > 1 puts more mass near omega = 1",
    )
    # alpha-Flow: alpha falls from 1 to 0 along a sigmoid over the fraction of training done.
    alpha_start: float = Field(
        0.1, ge=0.0, le=1.0, description="alphaflow: fraction of training where alpha leaves 1"
    )
    alpha_end: float = Field(
        0.7, ge=0.0, le=1.0, description="alphaflow: fraction of training where alpha reaches 0"
    )
    alpha_steepness: float = Field(10.0, gt=0.0, le=100.0, description="alphaflow: the sigmoid's steepness")
    alpha_threshold: float = Field(
        0.005,
        ge=0.0,
        lt=1.0,
        description="alphaflow: below this alpha the step uses MeanFlow's JVP target instead",
    )

    @property
    def average_velocity(self) -> bool:
        """Whether this objective trains u(z, t, r) for one-step jumps (not flow matching)."""
        return self.kind in AVERAGE_VELOCITY_LOSSES

    @model_validator(mode="after")
    def _alpha_schedule_ordered(self) -> "LossConfig":
        if self.alpha_start >= self.alpha_end:
            raise ValueError(
                f"alpha_start={self.alpha_start} must be below alpha_end={self.alpha_end} "
                "(the fractions of training where alpha leaves 1 and reaches 0)"
            )
        return self

    @model_validator(mode="after")
    def _guidance_interval_ordered(self) -> "LossConfig":
        if self.guidance_t_min > self.guidance_t_max:
            raise ValueError(
                f"guidance_t_min={self.guidance_t_min} must not exceed guidance_t_max={self.guidance_t_max}"
            )
        return self


class OptimConfig(Section):
    name: Literal["adam", "adamw"] = "adam"
    lr: float = Field(6e-4, gt=0.0, le=1.0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS)
    grad_clip: float = Field(1.0, ge=0.0, le=1e6, description="max global grad norm; 0 = off")

    @field_validator("betas", mode="before")
    @classmethod
    def _betas_from_list(cls, value: Any) -> Any:
        """TOML, JSON and stored configs write the pair as a list."""
        return tuple(value) if isinstance(value, list) else value

    @model_validator(mode="after")
    def _betas_in_range(self) -> "OptimConfig":
        for b in self.betas:
            if not 0.0 <= b < 1.0:
                raise ValueError(f"betas must lie in [0, 1), got {list(self.betas)}")
        return self


# torch.compile's modes (zoo.training.compiled_step); reduce-overhead and max-autotune replay CUDA graphs.
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


class TrainConfig(Section):
    steps: int = Field(2000, ge=1, le=MAX_STEPS)
    batch_size: int = Field(128, ge=1, le=MAX_BATCH)
    grad_accum: int = Field(1, ge=1, le=1024, description="micro-batches per optimiser step")
    auto_microbatch: bool = Field(True, description="split the batch if a probe step does not fit")
    memory_limit_gb: float | None = Field(None, gt=0, le=65536, description="cap for the memory probe")
    ema_decay: float = Field(0.9999, ge=0.0, lt=1.0)
    log_every: int = Field(50, ge=1, le=MAX_STEPS)
    eval_every: int = Field(0, ge=0, le=MAX_STEPS, description="0 = only at the end")
    save_every: int = Field(500, ge=1, le=MAX_STEPS, description="refresh last.pt")
    archive_every: int = Field(
        0, ge=0, le=MAX_STEPS, description="keep step_XXXXXXX.pt; 0 = only the final one"
    )
    compile: bool = Field(
        False,
        description="torch.compile each micro-batch's loss and backward (flow matching, or MeanFlow with "
        "loss.jvp=fused): fuses the step's small kernels; the first step of each shape compiles",
    )
    compile_mode: CompileMode = Field(
        "default",
        description="torch.compile's mode; reduce-overhead and max-autotune also replay CUDA graphs",
    )
    cuda_graph: bool = Field(
        False,
        description="replay each micro-batch's loss + backward from a CUDA graph (CUDA, fp32 or bf16): "
        "removes the host's kernel-launch cost, which bounds steps of small and mid-size models",
    )

    @model_validator(mode="after")
    def _one_way_to_capture(self) -> "TrainConfig":
        if self.compile and self.cuda_graph:
            raise ValueError(
                "train.compile and train.cuda_graph cannot be combined (a compiled step inside a "
                "hand-made capture); for compiled kernels replayed from CUDA graphs set "
                "train.compile_mode=reduce-overhead and train.cuda_graph=false"
            )
        return self

    @model_validator(mode="after")
    def _accumulation_divides_batch(self) -> "TrainConfig":
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"grad_accum={self.grad_accum} must divide batch_size={self.batch_size} "
                "(batch_size is the effective batch per optimiser step)"
            )
        return self


class EvalConfig(Section):
    n_samples: int = Field(
        2000, ge=16, le=MAX_EVAL_SAMPLES, description="generated and held-out samples per metric"
    )
    meanflow_steps: list[Annotated[int, Field(ge=1, le=MAX_NFE)]] = Field(
        default_factory=lambda: [1, 2, 4], min_length=1
    )
    solvers: list[Literal["euler", "midpoint", "heun", "rk4"]] = Field(
        default_factory=lambda: ["euler", "heun"]
    )
    solver_nfe: list[Annotated[int, Field(ge=1, le=MAX_NFE)]] = Field(
        default_factory=lambda: [2, 8, 50], min_length=1
    )
    batch_size: int = Field(500, ge=1, le=MAX_BATCH)
    grid_size: int = Field(64, ge=1, le=1024, description="images in a sample grid")
    guidance: float = Field(1.0, ge=0.0, le=MAX_GUIDANCE)
    guidance_interval: tuple[float, float] | None = Field(
        None,
        description="models conditioned on guidance (model.guidance_inputs): the times [a, b] guidance acts "
        "on, 0 <= a <= b <= 1; none = [0, 1]",
    )
    features: Literal["auto", "on", "off"] = Field(
        "auto",
        description="score samples by FD, KID, precision and recall in the feature space of zoo's classifier "
        "for the dataset (trained and cached on first use): auto = for labelled image data; off = energy "
        "distance only",
    )

    @field_validator("guidance_interval", mode="before")
    @classmethod
    def _interval_from_list(cls, value: Any) -> Any:
        """TOML, JSON and stored configs write the pair as a list."""
        return tuple(value) if isinstance(value, list) else value

    @model_validator(mode="after")
    def _interval_in_range(self) -> "EvalConfig":
        if self.guidance_interval is not None:
            low, high = self.guidance_interval
            if not 0.0 <= low <= high <= 1.0:
                raise ValueError(f"guidance_interval must satisfy 0 <= a <= b <= 1, got {[low, high]}")
        return self


class TrackingConfig(Section):
    enabled: bool = True
    project: str = Field("zoo", min_length=1)


class ZooConfigBody(Section):
    """Every section; the settings class in zoo.config.loading adds sources on top."""

    run_name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    preset: str | None = None
    seed: int = Field(0, ge=0, le=MAX_SEED)
    device: str = Field("auto", pattern=f"^({DEVICE_PATTERN})$", description=DEVICE_CHOICES)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    threads: int = Field(
        0,
        ge=0,
        le=MAX_THREADS,
        description="CPU threads for torch (0 = torch's default). On a shared machine use 1: OpenMP threads "
        "spin-waiting for a busy core can slow a step down many times",
    )
    output_dir: str = Field("outputs", min_length=1, description="folder that holds the run folders")
    experiment_log: str = Field(
        "EXPERIMENT_LOG.md", description="file each finished run appends an entry to; empty = none"
    )
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=MLPConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _eval_guidance_fits_the_model(self, info: ValidationInfo) -> "ZooConfigBody":
        """The evaluation at the end of training samples with eval.guidance on eval.guidance_interval:
        refuse what it could not sample before training starts."""
        if self.eval.guidance_interval is not None and not self.model.guidance_inputs:
            raise ValueError(
                "eval.guidance_interval needs a model conditioned on guidance: set "
                "model.guidance_inputs=true or leave eval.guidance_interval out"
            )
        if self.model.guidance_inputs and self.loss.kind == "imf":
            if not 1.0 <= self.eval.guidance <= self.loss.omega_max:
                raise ValueError(
                    f"eval.guidance={self.eval.guidance:g} lies outside the scales iMF trains on, "
                    f"[1, loss.omega_max={self.loss.omega_max:g}]: choose one in that range"
                )
            if self.eval.guidance_interval is not None and not (info.context or {}).get("stored"):
                low, high = self.eval.guidance_interval
                if not low <= GUIDANCE_INTERVAL_SPLIT <= high:
                    raise ValueError(
                        f"eval.guidance_interval={[low, high]} lies outside the intervals iMF trains on, "
                        f"[a, b] with a <= {GUIDANCE_INTERVAL_SPLIT:g} <= b: choose one such as [0.2, 0.8]"
                    )
        return self

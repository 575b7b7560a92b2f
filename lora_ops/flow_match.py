"""FLUX rectified-flow training math and the LoRA training loop (no ComfyUI imports).

FLUX is trained on the straight path x_t = (1 - t) x0 + t eps and predicts the velocity
eps - x0; ComfyUI samples it with the same convention (sigma = t, ModelSamplingFlux).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .distributed import GradientSync, World, rank_slots

TIMESTEP_SCHEMES = ("shift", "uniform")
LR_SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("adamw", "adam", "sgd", "rmsprop")

# FLUX's resolution-dependent shift: mu on the line through (256 tokens, 0.5) and (4096, 1.15).
BASE_TOKENS, BASE_SHIFT = 256, 0.5
MAX_TOKENS, MAX_SHIFT = 4096, 1.15
# The timestep shift of each family (flux_family.Member.train_shift): FLUX.1's line above over 2x2
# patches; FLUX.2's empirical mu over its 1x1 patches (ComfyUI's Flux2Scheduler); Chroma's fixed mu
# (ComfyUI samples Chroma with ModelSamplingFlux's default shift, its sampling_settings set none).
SHIFT_SCHEDULES = ("flux1", "flux2", "chroma")
CHROMA_MU = 1.15
# Flux2Scheduler's mu also depends on the sampling step count (below 4300 tokens); training has no
# step count, so it uses the scheduler's default (and the FLUX.2 [dev] blueprint's) 20 steps. Trained
# on the sigmas ComfyUI samples FLUX.2 with; musubi-tuner's `flux2_shift` puts FLUX.1's line over the
# same tokens instead (mu 1.15 at 1024², here 2.20): `timestep_sampling` uniform drops the shift.
FLUX2_MU_STEPS = 20


def image_token_count(latent_height: int, latent_width: int, patch_size: int = 2) -> int:
    """Tokens FLUX sees for a latent: one per 2x2 patch."""
    return math.ceil(latent_height / patch_size) * math.ceil(latent_width / patch_size)


def flux_shift_mu(image_tokens: int) -> float:
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_TOKENS - BASE_TOKENS)
    return BASE_SHIFT + slope * (image_tokens - BASE_TOKENS)


def flux2_empirical_mu(image_tokens: int, num_steps: int) -> float:
    """ComfyUI 0.33.0 comfy_extras/nodes_flux.py compute_empirical_mu (FLUX.2's reference code):
    mu on lines fitted at 10 and 200 steps, interpolated in the step count; above 4300 tokens the
    200-step line alone."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    m_200 = a2 * image_tokens + b2
    if image_tokens > 4300:
        return float(m_200)
    m_10 = a1 * image_tokens + b1
    a = (m_200 - m_10) / 190.0
    return float(a * num_steps + m_200 - 200.0 * a)


def schedule_mu(schedule: str, latent_height: int, latent_width: int) -> float:
    """The timestep shift mu of family schedule `schedule` (SHIFT_SCHEDULES) for a latent of this size."""
    if schedule == "flux1":
        return flux_shift_mu(image_token_count(latent_height, latent_width))
    if schedule == "flux2":
        return flux2_empirical_mu(image_token_count(latent_height, latent_width, patch_size=1), FLUX2_MU_STEPS)
    if schedule == "chroma":
        return CHROMA_MU
    raise ValueError(f"unknown shift schedule {schedule!r}; expected one of {SHIFT_SCHEDULES}")


def shift_timesteps(t: torch.Tensor, mu: float) -> torch.Tensor:
    """sigma = e^mu / (e^mu + 1/t - 1): ComfyUI's flux_time_shift with exponent 1."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))


def sample_timesteps(
    batch: int, scheme: str, image_tokens: int, generator: torch.Generator, mu: float | None = None
) -> torch.Tensor:
    """Per-sample t in (0, 1), fp32 on the CPU (so a seed means the same t on every device). The
    shift is `mu` when given (`schedule_mu`), else FLUX.1's for `image_tokens`."""
    if scheme == "uniform":
        # Keep t off 0 exactly: at t = 0 the sample is the clean latent and carries no signal.
        return torch.rand(batch, generator=generator).clamp_min(1e-5)
    if scheme == "shift":
        # Logit-normal (sigmoid of a standard normal), shifted towards noise like FLUX sampling.
        u = torch.sigmoid(torch.randn(batch, generator=generator))
        return shift_timesteps(u, flux_shift_mu(image_tokens) if mu is None else mu)
    raise ValueError(f"unknown timestep scheme {scheme!r}; expected one of {TIMESTEP_SCHEMES}")


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, *([1] * (x0.dim() - 1))).to(x0)
    return (1.0 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def flow_matching_loss(predicted_velocity: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(predicted_velocity.float(), target.float())


def prior_preservation_loss(instance_loss: torch.Tensor, class_loss: torch.Tensor, weight: float) -> torch.Tensor:
    """DreamBooth's objective: the instance loss plus the weighted loss on class images, on the
    same step, so the LoRA learns the subject without forgetting the class."""
    return instance_loss + weight * class_loss


def class_stream_seed(seed: int) -> int:
    """The seed the class images' draws (which image, noise, t) use: their own stream, so adding
    prior preservation leaves the instance draws of a seed unchanged."""
    return (seed * 7_919 + 104_729) % (2**63)


def lr_multiplier(step: int, total_steps: int, schedule: str, warmup_steps: int = 0) -> float:
    """Factor on the base learning rate for optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown lr schedule {schedule!r}; expected one of {LR_SCHEDULES}")


def init_lora_factors(
    in_features: int, out_features: int, rank: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's init: down kaiming-uniform (as nn.Linear, a = sqrt(5)), up zero, so training
    starts exactly at the base model."""
    bound = 1.0 / math.sqrt(in_features)
    down = (torch.rand(rank, in_features, generator=generator) * 2.0 - 1.0) * bound
    return down, torch.zeros(out_features, rank)


def make_optimizer(name: str, params: Sequence[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")


def step_generator(seed: int, step: int) -> torch.Generator:
    """Randomness of one optimizer step depends only on (seed, step): resuming at step k draws
    exactly what an uninterrupted run would have drawn."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))


def slot_generator(seed: int, step: int, micro_batch: int, slot: int) -> torch.Generator:
    """Randomness of one sample of a global batch (its noise, t and caption dropout) depends only
    on (seed, step, micro-batch, position): whichever rank computes it draws the same."""
    return torch.Generator().manual_seed(
        (((seed * 1_000_003 + step) * 10_007 + micro_batch) * 1_000_033 + slot) % (2**63))


@dataclass
class Conditioning:
    context: torch.Tensor  # (tokens, dim) text embedding
    pooled: torch.Tensor | None  # (dim,) pooled embedding; None where the encoder has none (T5 only, LLMs)


@dataclass
class TrainingExample:
    latent: torch.Tensor  # (C, H, W), already in the model's latent space
    cond: Conditioning
    # Edit pairs: the control image's latent as the VAE gives it (the model's extra_conds maps it,
    # as for ReferenceLatent); fitted to the target's bucket, so a bucket's references stack.
    reference: torch.Tensor | None = None


@dataclass
class TrainSettings:
    steps: int
    learning_rate: float
    batch_size: int = 1
    gradient_accumulation: int = 1
    optimizer: str = "adamw"
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    timestep_sampling: str = "shift"
    caption_dropout: float = 0.0
    seed: int = 0
    prior_loss_weight: float = 1.0  # used when the trainer has class examples
    shift_schedule: str = "flux1"  # the family's mu for the "shift" scheme (SHIFT_SCHEDULES)


@dataclass
class TrainState:
    """What a resume needs besides the LoRA weights."""

    step: int = 0
    loss_history: list[float] = field(default_factory=list)
    optimizer_state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    # Other tensors the run needs back by name (the raw factors when the LoRA file holds an EMA).
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


# predict(x_t, t, context, pooled or None, reference latents or None) -> velocity of x_t's tokens
# alone (the reference tokens are context, not predicted), all batched.
VelocityPredictor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None],
                             torch.Tensor]


def bucket_indices(examples: Sequence[TrainingExample]) -> list[list[int]]:
    """Indices of `examples` grouped by latent shape (aspect bucket), in first-seen order."""
    buckets: dict[tuple[int, ...], list[int]] = {}
    for index, example in enumerate(examples):
        buckets.setdefault(tuple(example.latent.shape), []).append(index)
    return list(buckets.values())


class FlowMatchTrainer:
    """Trains named fp32 parameters (the LoRA factors) by flow matching on fixed examples.

    `examples` are grouped by latent shape (aspect buckets); a micro-batch comes from one bucket.
    `empty_cond` replaces a caption when caption dropout fires. With `class_examples` (prior
    preservation) every micro-batch also draws as many class examples, from their own random
    stream (`class_stream_seed`), and the loss is `prior_preservation_loss` of the two.

    With a `world` of N ranks each rank computes its block of a global micro-batch of
    N x batch_size samples drawn exactly as one process with batch N x batch_size draws them,
    and DDP averages the gradients: the same steps within float rounding.

    The examples may stay on the CPU: each micro-batch is moved to the parameters' device when it
    is drawn, so a data set's latents and caption embeddings (FLUX.2 [dev]: up to 31 MB a caption)
    never all sit beside the model.
    """

    def __init__(
        self,
        predict: VelocityPredictor,
        examples: Sequence[TrainingExample],
        empty_cond: Conditioning | None,
        params: Mapping[str, torch.Tensor],
        settings: TrainSettings,
        state: TrainState | None = None,
        world: World = World(),
        class_examples: Sequence[TrainingExample] = (),
    ):
        if not examples:
            raise ValueError("no training examples")
        if not params:
            raise ValueError("no parameters to train")
        if settings.caption_dropout > 0 and empty_cond is None:
            raise ValueError("caption dropout needs the empty caption's conditioning")
        self.predict = predict
        self.examples = list(examples)
        self.empty_cond = empty_cond
        self.params = dict(params)
        self.device = next(iter(self.params.values())).device
        self.settings = settings
        self.state = state or TrainState()
        self.world = world
        self.buckets = bucket_indices(self.examples)
        self.class_examples = list(class_examples)
        self.class_buckets = bucket_indices(self.class_examples)
        self.optimizer = make_optimizer(
            settings.optimizer, list(self.params.values()), settings.learning_rate
        )
        self._load_optimizer_state(self.state.optimizer_state)
        self.gradients = GradientSync(list(self.params.values()), world)

    def run(self) -> Iterator[tuple[int, float]]:
        """Trains up to `settings.steps`, yielding (completed step count, loss) after each
        optimizer step; the caller may save or stop between yields."""
        while self.state.step < self.settings.steps:
            loss = self.train_step(self.state.step)
            self.state.step += 1
            self.state.loss_history.append(loss)
            yield self.state.step, loss

    def train_step(self, step: int) -> float:
        """One optimizer step; returns its loss averaged over the global batch."""
        s = self.settings
        lr = s.learning_rate * lr_multiplier(step, s.steps, s.lr_schedule, s.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        generator = step_generator(s.seed, step)
        class_generator = step_generator(class_stream_seed(s.seed), step)
        total = 0.0
        for micro in range(s.gradient_accumulation):
            chosen = self._global_micro_batch(generator)
            chosen_class = self._global_micro_batch(class_generator, self.class_buckets) if self.class_examples else None
            last = micro == s.gradient_accumulation - 1
            total += self.gradients.backward(
                lambda: self._step_loss(chosen, chosen_class, step, micro) / s.gradient_accumulation, sync=last)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.world.mean(total, next(iter(self.params.values())).device)

    def _step_loss(self, chosen: list[int], chosen_class: list[int] | None, step: int, micro: int) -> torch.Tensor:
        seed = self.settings.seed
        loss = self._micro_batch_loss(chosen, step, micro)
        if chosen_class is None:
            return loss
        class_loss = self._micro_batch_loss(chosen_class, step, micro, self.class_examples, class_stream_seed(seed))
        return prior_preservation_loss(loss, class_loss, self.settings.prior_loss_weight)

    def _global_micro_batch(self, generator: torch.Generator, buckets: list[list[int]] | None = None) -> list[int]:
        """Example indices of one global micro-batch (world size x batch_size), from one bucket,
        without repeats while the bucket has enough examples, cycling through it when not. Every
        rank draws the same list from the step's generator."""
        size = self.settings.batch_size * self.world.size
        buckets = buckets or self.buckets
        weights = torch.tensor([len(b) for b in buckets], dtype=torch.float)
        bucket = buckets[int(torch.multinomial(weights, 1, generator=generator))]
        order = torch.randperm(len(bucket), generator=generator)
        return [bucket[int(order[i % len(bucket)])] for i in range(size)]

    def _micro_batch_loss(self, chosen: list[int], step: int, micro: int,
                          examples: Sequence[TrainingExample] | None = None, seed: int | None = None) -> torch.Tensor:
        """Mean velocity loss of this rank's block of the global micro-batch `chosen` of `examples`
        (the instance examples and the run's seed unless given)."""
        s = self.settings
        examples = self.examples if examples is None else examples
        seed = s.seed if seed is None else seed
        slots = rank_slots(len(chosen), self.world)
        latents, noises, times, conds, references = [], [], [], [], []
        for slot in slots:
            example = examples[chosen[slot]]
            generator = slot_generator(seed, step, micro, slot)
            dropped = bool(torch.rand(1, generator=generator) < s.caption_dropout)
            height, width = example.latent.shape[-2:]
            times.append(sample_timesteps(1, s.timestep_sampling, image_token_count(height, width), generator,
                                          schedule_mu(s.shift_schedule, height, width)))
            noises.append(torch.randn(example.latent.shape, generator=generator))
            latents.append(example.latent)
            references.append(example.reference)
            # caption dropout drops the instruction, never an edit pair's control image
            conds.append(self.empty_cond if dropped else example.cond)

        device = self.device
        x0 = torch.stack(latents).float().to(device)
        noise, t = torch.stack(noises).to(device), torch.cat(times).to(device)
        x_t = noisy_latents(x0, noise, t)
        target = velocity_target(x0, noise)

        # Captions of different token lengths cannot share a batch: one forward per length.
        by_length: dict[int, list[int]] = {}
        for i, cond in enumerate(conds):
            by_length.setdefault(cond.context.shape[0], []).append(i)
        loss = x0.new_zeros(())
        for rows in by_length.values():
            context = torch.stack([conds[i].context for i in rows]).to(device)
            pooled = None if conds[rows[0]].pooled is None else torch.stack([conds[i].pooled for i in rows]).to(device)
            reference = None if references[rows[0]] is None else torch.stack([references[i] for i in rows]).to(device)
            velocity = self.predict(x_t[rows], t[rows], context, pooled, reference)
            loss = loss + flow_matching_loss(velocity, target[rows]) * (len(rows) / len(conds))
        return loss

    def optimizer_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Optimizer state keyed by parameter name (stable across runs, unlike indices)."""
        names = {id(p): name for name, p in self.params.items()}
        return {
            names[id(p)]: {k: v.detach().cpu().clone() for k, v in st.items() if torch.is_tensor(v)}
            for p, st in self.optimizer.state.items()
        }

    def _load_optimizer_state(self, saved: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        for name, tensors in saved.items():
            param = self.params.get(name)
            if param is None:
                raise ValueError(f"saved optimizer state names an unknown parameter {name!r}")
            self.optimizer.state[param] = {
                # Copies the optimizer owns and updates in place. Adam keeps `step` on the CPU
                # unless fused/capturable; the moments live with the parameter.
                k: v.clone() if k == "step" else v.to(param.device, param.dtype, copy=True)
                for k, v in tensors.items()
            }

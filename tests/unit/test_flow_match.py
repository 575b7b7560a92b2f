import math

import pytest
import torch

from lora_ops import flow_match as fm


def comfy_flux_time_shift(mu, sigma, t):
    # comfy/model_sampling.py, ComfyUI 0.3.75, verbatim formula
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def test_shift_mu_runs_from_half_at_256_tokens_to_1_15_at_4096():
    assert fm.flux_shift_mu(256) == pytest.approx(0.5)
    assert fm.flux_shift_mu(4096) == pytest.approx(1.15)
    # 1024 px -> 128x128 latent -> 4096 tokens; 512 px -> 1024 tokens
    assert fm.image_token_count(128, 128) == 4096
    assert fm.flux_shift_mu(fm.image_token_count(64, 64)) == pytest.approx(0.5 + 0.65 * 768 / 3840)


@pytest.mark.parametrize("mu", [0.5, 0.79, 1.15])
def test_shifted_timesteps_equal_comfyui_flux_time_shift(mu):
    ts = torch.tensor([0.01, 0.2, 0.5, 0.77, 0.999], dtype=torch.float64)
    ours = fm.shift_timesteps(ts, mu)
    theirs = torch.tensor([comfy_flux_time_shift(mu, 1.0, float(t)) for t in ts], dtype=torch.float64)
    torch.testing.assert_close(ours, theirs)


def test_shift_scheme_is_logit_normal_pushed_towards_noise():
    gen = torch.Generator().manual_seed(0)
    t = fm.sample_timesteps(20000, "shift", 4096, gen)
    assert ((t > 0) & (t < 1)).all()
    # median of sigmoid(N(0,1)) is 0.5; the 4096-token shift maps it to e^1.15 / (e^1.15 + 1)
    assert t.median().item() == pytest.approx(math.exp(1.15) / (math.exp(1.15) + 1), abs=0.01)
    u = fm.sample_timesteps(20000, "uniform", 4096, torch.Generator().manual_seed(0))
    assert u.mean().item() == pytest.approx(0.5, abs=0.01)
    assert u.min().item() > 0


def test_timesteps_are_deterministic_per_seed_and_step():
    a = fm.sample_timesteps(8, "shift", 1024, fm.step_generator(7, 3))
    b = fm.sample_timesteps(8, "shift", 1024, fm.step_generator(7, 3))
    c = fm.sample_timesteps(8, "shift", 1024, fm.step_generator(7, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="timestep"):
        fm.sample_timesteps(1, "sigmoid2", 256, torch.Generator())
    with pytest.raises(ValueError, match="optimizer"):
        fm.make_optimizer("lion", [torch.zeros(1, requires_grad=True)], 1e-3)
    with pytest.raises(ValueError, match="schedule"):
        fm.lr_multiplier(5, 10, "exp")


def test_noisy_latents_interpolate_and_velocity_is_their_derivative():
    x0, eps = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    t = torch.tensor([0.0, 1.0])
    x_t = fm.noisy_latents(x0, eps, t)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[1], eps[1])
    # d x_t / d t = eps - x0: the velocity FLUX predicts
    h, t0 = 1e-3, torch.tensor([0.3, 0.6])
    slope = (fm.noisy_latents(x0, eps, t0 + h) - fm.noisy_latents(x0, eps, t0)) / h
    torch.testing.assert_close(slope, fm.velocity_target(x0, eps), atol=1e-2, rtol=1e-3)
    # the x0 ComfyUI recovers from a perfect velocity (x_t - sigma * v) is the clean latent
    x_mid = fm.noisy_latents(x0, eps, t0)
    recovered = x_mid - t0.view(-1, 1, 1, 1) * fm.velocity_target(x0, eps)
    torch.testing.assert_close(recovered, x0, atol=1e-5, rtol=1e-5)


def test_loss_is_mse_in_fp32():
    pred = torch.ones(1, 4, dtype=torch.bfloat16)
    target = torch.zeros(1, 4)
    loss = fm.flow_matching_loss(pred, target)
    assert loss.dtype == torch.float32 and loss.item() == 1.0


@pytest.mark.parametrize(
    "schedule,step,expected",
    [("constant", 0, 0.25), ("constant", 3, 1.0), ("constant", 90, 1.0),
     ("linear", 4, 1.0), ("linear", 52, 0.5), ("linear", 100, 0.0),
     ("cosine", 4, 1.0), ("cosine", 52, 0.5), ("cosine", 100, 0.0)],
)
def test_lr_schedules_with_warmup(schedule, step, expected):
    assert fm.lr_multiplier(step, 100, schedule, warmup_steps=4) == pytest.approx(expected)


def test_lora_init_is_kaiming_uniform_down_zero_up():
    down, up = fm.init_lora_factors(300, 50, 8, torch.Generator().manual_seed(1))
    assert down.shape == (8, 300) and up.shape == (50, 8)
    assert torch.count_nonzero(up) == 0
    assert down.abs().max() <= 1 / math.sqrt(300)
    assert down.std().item() == pytest.approx(1 / math.sqrt(300) / math.sqrt(3), rel=0.05)
    again, _ = fm.init_lora_factors(300, 50, 8, torch.Generator().manual_seed(1))
    assert torch.equal(down, again)


def _toy_problem(seed=0):
    """A linear 'velocity model' on latents with a large common mean: learnable in a few steps
    (the best constant velocity is minus that mean)."""
    gen = torch.Generator().manual_seed(123)
    examples = [
        fm.TrainingExample(3 + 0.1 * torch.randn(4, 4, 4, generator=gen),
                           fm.Conditioning(torch.randn(3, 8, generator=gen), torch.randn(8, generator=gen)))
        for _ in range(4)
    ] + [fm.TrainingExample(3 + 0.1 * torch.randn(4, 4, 6, generator=gen),
                            fm.Conditioning(torch.randn(5, 8, generator=gen), torch.randn(8, generator=gen)))]
    weight = torch.zeros(4, 4, requires_grad=True)
    bias = torch.zeros(4, requires_grad=True)

    def predict(x_t, t, context, pooled, reference):
        assert x_t.shape[0] == context.shape[0] == pooled.shape[0] == t.shape[0]
        return torch.einsum("oc,bchw->bohw", weight, x_t) + bias.view(1, -1, 1, 1)

    empty = fm.Conditioning(torch.zeros(1, 8), torch.zeros(8))
    return predict, examples, empty, {"w": weight, "b": bias}


def test_trainer_reduces_loss_and_is_deterministic():
    def train(steps):
        predict, examples, empty, params = _toy_problem()
        settings = fm.TrainSettings(steps=steps, learning_rate=0.05, batch_size=2, gradient_accumulation=2,
                                    optimizer="adam", caption_dropout=0.3, seed=5, timestep_sampling="uniform")
        trainer = fm.FlowMatchTrainer(predict, examples, empty, params, settings)
        losses = [loss for _, loss in trainer.run()]
        return losses, params
    losses, params = train(60)
    assert len(losses) == 60 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])  # measured: 0.29
    again, params2 = train(60)
    assert again == losses and torch.equal(params["w"], params2["w"])


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_resume_from_saved_state_continues_exactly(optimizer):
    settings = fm.TrainSettings(steps=6, learning_rate=0.05, batch_size=2, optimizer=optimizer,
                                lr_schedule="cosine", warmup_steps=2, seed=3)
    predict, examples, empty, params = _toy_problem()
    straight = fm.FlowMatchTrainer(predict, examples, empty, params, settings)
    straight_losses = [loss for _, loss in straight.run()]

    predict, examples, empty, params = _toy_problem()
    first = fm.FlowMatchTrainer(predict, examples, empty, params, fm.TrainSettings(**{**vars(settings), "steps": 6}))
    run = first.run()
    for _ in range(3):
        next(run)
    saved = fm.TrainState(first.state.step, list(first.state.loss_history), first.optimizer_state())
    weights = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}

    predict, examples, empty, fresh = _toy_problem()
    with torch.no_grad():
        for k in fresh:
            fresh[k].copy_(weights[k])
    resumed = fm.FlowMatchTrainer(predict, examples, empty, fresh, settings, saved)
    steps = [step for step, _ in resumed.run()]
    assert steps == [4, 5, 6]
    assert resumed.state.loss_history == pytest.approx(straight_losses, rel=1e-6)
    torch.testing.assert_close(fresh["w"], straight.params["w"])


def _class_examples():
    """Class images of the toy problem: another mean, the same two latent shapes."""
    gen = torch.Generator().manual_seed(77)
    return [fm.TrainingExample(-2 + 0.1 * torch.randn(4, 4, w, generator=gen),
                               fm.Conditioning(torch.randn(3, 8, generator=gen), torch.randn(8, generator=gen)))
            for w in (4, 4, 6)]


def test_prior_preservation_loss_and_step_are_the_instance_and_weighted_class_terms_computed_separately():
    def one_sgd_step(seed, weight=None, class_only=False):
        predict, examples, empty, params = _toy_problem()
        settings = fm.TrainSettings(steps=1, learning_rate=0.1, batch_size=2, optimizer="sgd", seed=seed,
                                    prior_loss_weight=weight or 0.0)
        if class_only:
            trainer = fm.FlowMatchTrainer(predict, _class_examples(), empty, params, settings)
        else:
            trainer = fm.FlowMatchTrainer(predict, examples, empty, params, settings,
                                          class_examples=_class_examples() if weight else ())
        start = {k: v.detach().clone() for k, v in params.items()}
        loss = trainer.train_step(0)
        return loss, {k: params[k].detach() - start[k] for k in params}

    combined, combined_update = one_sgd_step(5, weight=0.7)
    instance, instance_update = one_sgd_step(5)
    # the class term alone: the class images as a run's only examples, drawn from the class stream
    class_term, class_update = one_sgd_step(fm.class_stream_seed(5), class_only=True)
    assert class_term > 0 and instance > 0
    assert combined == pytest.approx(instance + 0.7 * class_term, rel=1e-6)
    assert combined != pytest.approx(instance, rel=1e-3), "the class term must count"
    # SGD's step is -lr * gradient, and gradients add as the losses do
    for k in combined_update:
        torch.testing.assert_close(combined_update[k], instance_update[k] + 0.7 * class_update[k])
    assert fm.prior_preservation_loss(torch.tensor(2.0), torch.tensor(3.0), 0.5) == 3.5


def comfy_compute_empirical_mu(image_seq_len, num_steps):
    # comfy_extras/nodes_flux.py, ComfyUI 0.33.0 (Flux2Scheduler's mu), verbatim formula
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * num_steps + b)


@pytest.mark.parametrize("tokens,steps", [(16, 20), (1024, 4), (4096, 20), (4096, 50), (4300, 20), (4301, 20),
                                          (16384, 28)])
def test_flux2_mu_is_flux2_schedulers(tokens, steps):
    assert fm.flux2_empirical_mu(tokens, steps) == pytest.approx(comfy_compute_empirical_mu(tokens, steps), abs=1e-12)


def test_each_family_schedule_counts_its_own_tokens():
    # FLUX.1: 2x2 patches of a /8 latent, exactly today's mu (its training stays bit-identical)
    assert fm.schedule_mu("flux1", 64, 48) == fm.flux_shift_mu(fm.image_token_count(64, 48))
    # FLUX.2: one token per /16 latent pixel, Flux2Scheduler's mu at its default 20 steps; a 1024²
    # image is 64x64 latent = 4096 tokens -> 2.20 (the shared FLUX_FAMILY notes' figure)
    assert fm.schedule_mu("flux2", 64, 64) == pytest.approx(comfy_compute_empirical_mu(4096, 20))
    assert fm.schedule_mu("flux2", 64, 64) == pytest.approx(2.20, abs=0.005)
    assert fm.schedule_mu("flux2", 4, 6) == pytest.approx(comfy_compute_empirical_mu(24, 20))
    # Chroma: ComfyUI's ModelSamplingFlux default (Chroma's sampling_settings set no shift), any size
    assert fm.schedule_mu("chroma", 8, 8) == fm.schedule_mu("chroma", 128, 128) == 1.15
    with pytest.raises(ValueError, match="shift schedule"):
        fm.schedule_mu("sd3", 8, 8)


def test_the_trainer_draws_t_with_its_familys_shift():
    """Same seed, same u: only the mu differs, so t = shift(u, mu) per schedule."""
    latent = torch.zeros(128, 4, 4)

    def first_t(schedule):
        seen = []

        def predict(x_t, t, context, pooled, reference):
            seen.append(float(t[0]))
            assert pooled is None  # an encoder without a pooled vector
            return torch.zeros_like(x_t, requires_grad=True)

        example = fm.TrainingExample(latent, fm.Conditioning(torch.zeros(3, 8), None))
        param = torch.zeros(1, requires_grad=True)
        trainer = fm.FlowMatchTrainer(predict, [example], None, {"p": param},
                                      fm.TrainSettings(steps=1, learning_rate=0.0, shift_schedule=schedule))
        trainer.train_step(0)
        return seen[0]

    u = fm.shift_timesteps(torch.tensor(first_t("flux1"), dtype=torch.float64),
                           -fm.schedule_mu("flux1", 4, 4))  # invert the shift: mu -> -mu
    for schedule in fm.SHIFT_SCHEDULES:
        assert first_t(schedule) == pytest.approx(float(fm.shift_timesteps(u, fm.schedule_mu(schedule, 4, 4))),
                                                  rel=1e-5)


def test_each_sample_is_predicted_with_its_own_reference_and_dropout_keeps_it():
    """Edit pairs: the predictor gets the stacked control latents of the very examples drawn (each
    example's context and reference carry its index), and caption dropout drops the instruction,
    never the control image."""
    gen = torch.Generator().manual_seed(0)
    examples = [fm.TrainingExample(torch.randn(4, 4, 4, generator=gen), fm.Conditioning(torch.full((3, 8), float(i)), None),
                                   torch.full((4, 4, 4), 100.0 + i)) for i in range(5)]
    empty = fm.Conditioning(torch.full((3, 8), -1.0), None)
    seen = []

    def predict(x_t, t, context, pooled, reference):
        assert reference.shape == x_t.shape
        seen.extend(zip(context[:, 0, 0].tolist(), reference[:, 0, 0, 0].tolist()))
        return torch.zeros_like(x_t, requires_grad=True)

    param = torch.zeros(1, requires_grad=True)
    for dropout in (0.0, 0.5):
        trainer = fm.FlowMatchTrainer(predict, examples, empty, {"p": param},
                                      fm.TrainSettings(steps=4, learning_rate=0.0, batch_size=3, caption_dropout=dropout))
        list(trainer.run())
    kept = [(c, r) for c, r in seen if c >= 0]
    assert len(seen) == 24 and 0 < len(seen) - len(kept) < 12  # some captions dropped in the second run
    assert all(r == 100.0 + c for c, r in kept) and all(100 <= r <= 104 for _, r in seen)


def test_each_micro_batch_is_moved_to_the_parameters_device():
    """The examples stay where they are (the CPU): latents, contexts, pooled vectors and references
    of a micro-batch reach the predictor on the trained parameters' device. The parameters are on
    the CPU here, so the trainer's device is pointed at `meta` to see the move."""
    examples = [fm.TrainingExample(torch.randn(4, 4, 4), fm.Conditioning(torch.randn(3, 8), torch.randn(8)),
                                   torch.randn(4, 4, 4)) for _ in range(2)]
    devices = []

    def predict(x_t, t, context, pooled, reference):
        devices.extend(x.device.type for x in (x_t, t, context, pooled, reference))
        return torch.zeros_like(x_t)

    trainer = fm.FlowMatchTrainer(predict, examples, None, {"p": torch.zeros(1, requires_grad=True)},
                                  fm.TrainSettings(steps=1, learning_rate=0.0, batch_size=2))
    assert trainer.device == torch.device("cpu")
    trainer.device = torch.device("meta")
    loss = trainer._micro_batch_loss([0, 1], step=0, micro=0)
    assert loss.device.type == "meta" and devices == ["meta"] * 5
    assert all(e.latent.device.type == "cpu" for e in examples)

"""ResGen (arXiv 2412.10208) and its residual-VQ tokenizer: fine-to-coarse masking keeps coarse prefixes, the
re-quantisation round trip, the mixture-of-Gaussians loss on hand-computed cases, the sampler (coarse prefixes at every
step, a step count independent of depth, editing keeps the known region), the error for a depth the tokenizer was
not trained for, and the CLI end to end (tokenizer, generator, sample, edit, cache-latents)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from effigen.config import ConfigError
from effigen.models.resgen import RESGEN_PRESETS, Mixture, ResGen, ResGenConfig
from effigen.objectives.resgen import (ResGenObjective, ResGenObjectiveConfig, draw_fine_to_coarse_mask,
                                       mixture_nll)
from effigen.pipeline import Pipeline
from effigen.rng import BatchRandom
from effigen.samplers.resgen import ResGenSamplerConfig, prefix_scores, sample_resgen
from effigen.tokenizers.rvq import RVQ_PRESETS, ResidualVQ, ResidualVQConfig

from conftest import randomize


def tiny_models(depth: int = 3, rvq_depth: int | None = None, seed: int = 0) -> tuple[ResidualVQ, ResGen]:
    torch.manual_seed(seed)
    tokenizer = ResidualVQ(ResidualVQConfig(**{**RVQ_PRESETS["RVQ-Test"], "depth": depth}, resolution=8)).eval()
    config = ResGenConfig(**RESGEN_PRESETS["ResGen-Test"], num_classes=4, vocab_size=16, latent_channels=4,
                          scales=(4,), rvq_depth=rvq_depth or depth)
    return tokenizer, randomize(ResGen(config), seed, std=0.05).eval()


def separated_codebooks(tokenizer: ResidualVQ, seed: int = 0) -> None:
    """Codes of depth j at scale 30^-j: greedy residual quantization then recovers any token combination exactly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        books = tokenizer.quantize.codebooks
        for j in range(books.shape[0]):
            books[j] = torch.randn(books.shape[1:], generator=generator) * 30.0 ** -j


# ---------------------------------------------------------------------------------------------- masking
def test_masking_keeps_a_coarse_prefix_at_every_position():
    B, L, D = 64, 16, 4
    masked, ratio = draw_fine_to_coarse_mask(B, L, D, BatchRandom.local(0, B))
    assert masked.shape == (B, L, D) and masked.dtype == torch.bool
    # masked depths are a suffix (the finest ones): once a depth is masked every finer one is
    assert torch.equal(masked, masked.cummax(dim=-1).values)
    expected = torch.ceil(torch.cos(math.pi / 2 * ratio) * L * D).clamp(1, L * D)
    assert torch.equal(masked.sum((1, 2)).float(), expected)
    # the counts per position are spread over positions (not all at the first ones): multivariate hypergeometric
    counts = masked.sum(-1).float()
    assert counts.std(dim=1).mean() > 0 and (counts.mean(0) - counts.mean()).abs().max() < 1.0
    # the same seed gives the same masks; another seed others
    assert torch.equal(draw_fine_to_coarse_mask(B, L, D, BatchRandom.local(0, B))[0], masked)
    assert not torch.equal(draw_fine_to_coarse_mask(B, L, D, BatchRandom.local(1, B))[0], masked)


def test_prefix_scores_hand_out_scores_coarse_to_fine():
    scores = torch.tensor([[[0.1, 0.9, 0.5], [3.0, 2.0, 1.0]]])
    kept = torch.tensor([[0, 2]])
    out = prefix_scores(scores, kept)
    assert torch.equal(out[0, 0], torch.tensor([0.9, 0.5, 0.1]))  # the best score goes to the coarsest masked depth
    assert out[0, 1, :2].isinf().all() and out[0, 1, 2] == 1.0  # known depths never get picked


# ---------------------------------------------------------------------------------------------- tokenizer
def test_requantisation_round_trip():
    tokenizer, _ = tiny_models(depth=3)
    separated_codebooks(tokenizer)
    quant = tokenizer.quantize
    indices = torch.randint(0, 16, (2, 16, 3), generator=torch.Generator().manual_seed(1))
    f_hat = tokenizer.latent_from_indices(indices)  # (B, C, 4, 4)
    assert f_hat.shape == (2, 4, 4, 4)
    assert torch.equal(quant.quantize(f_hat), indices)  # latent -> tokens -> latent -> the same tokens
    codes = quant.embed(indices)  # (B, L, D, C)
    for start in range(3):  # the sum of the depths >= start, re-quantised from depth `start` on
        z = codes[:, :, start:].sum(-2).reshape(-1, 4)
        again, total = quant.requantize(z, torch.full((32,), start))
        assert torch.equal(again[:, start:], indices.reshape(32, 3)[:, start:]) and (again[:, :start] == 0).all()
        torch.testing.assert_close(total, z)
    # per-row start depths in one call
    start = torch.tensor([0, 1, 2, 1] * 8)
    z = (codes.reshape(32, 3, 4) * (torch.arange(3) >= start[:, None]).unsqueeze(-1)).sum(1)
    again, _ = quant.requantize(z, start)
    keep = torch.arange(3) >= start[:, None]
    assert torch.equal(again[keep], indices.reshape(32, 3)[keep])
    # images: encode is the latent of the token indices; decode gives images in [-1, 1]
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    tokens = tokenizer.indices_from_images(images)
    assert tokens.shape == (2, 16, 3)
    torch.testing.assert_close(tokenizer.encode(images), tokenizer.latent_from_indices(tokens))
    assert tokenizer.decode(tokenizer.encode(images)).abs().max() <= 1
    # a prefix of depths is a coarser approximation of the same latent
    features = tokenizer.features(images)
    errors = [(tokenizer.latent_from_indices(tokens[..., :d]) - features).square().mean() for d in (1, 2, 3)]
    assert errors[2] <= errors[1] <= errors[0]


def test_tokenizer_training_pass_and_dead_code_restarts():
    tokenizer, _ = tiny_models(depth=2)
    tokenizer.train()
    reconstruction, vq_loss, hits = tokenizer(torch.rand(4, 3, 8, 8) * 2 - 1)
    assert reconstruction.shape == (4, 3, 8, 8) and vq_loss.requires_grad and hits.shape == (2, 16)
    assert hits.sum(1).tolist() == [64.0, 64.0]
    vq_loss.backward()
    assert tokenizer.quantize.codebooks.grad is not None and tokenizer.encoder.conv_in.weight.grad is not None
    restarted = tokenizer.quantize.restart_dead_codes(1e9, torch.Generator().manual_seed(0))  # everything is "dead"
    assert restarted == 32 and len(tokenizer.quantize.usage()) == 2


def test_a_depth_the_tokenizer_was_not_trained_for_is_a_clear_error():
    tokenizer, network = tiny_models(depth=3, rvq_depth=4)
    with pytest.raises(ValueError, match="trained for depth 3.*train a tokenizer of that depth"):
        tokenizer.indices_from_images(torch.zeros(1, 3, 8, 8), depth=5)
    assert tokenizer.indices_from_images(torch.zeros(1, 3, 8, 8), depth=2).shape == (1, 16, 2)  # a prefix is fine
    objective = ResGenObjective(ResGenObjectiveConfig(), 4, tokenizer)
    batch = {"images": torch.zeros(2, 3, 8, 8), "labels": torch.tensor([0, 1])}
    with pytest.raises(ValueError, match="predicts 4 depths per position but the tokenizer was trained for depth 3"):
        objective.loss(network, batch, BatchRandom.local(0, 2))
    with pytest.raises(ValueError, match="predicts 4 depths per position but the tokenizer was trained for depth 3"):
        objective.sample(network, torch.tensor([0]), None, ResGenSamplerConfig(num_steps=2))


# ---------------------------------------------------------------------------------------------- MoG loss
def test_mixture_loss_on_hand_computed_cases():
    log_2pi = math.log(2 * math.pi)
    # one standard Gaussian in 2 dimensions
    one = Mixture(torch.zeros(1, 1), torch.zeros(1, 1, 2), torch.zeros(1, 1))
    assert mixture_nll(one, torch.zeros(1, 2)).item() == pytest.approx(log_2pi)
    assert mixture_nll(one, torch.ones(1, 2)).item() == pytest.approx(1 + log_2pi)
    # sigma = e: log N(z; 0, e^2) = -z^2 / (2 e^2) - 1 - log(2 pi) / 2 in one dimension
    wide = Mixture(torch.zeros(1, 1), torch.zeros(1, 1, 1), torch.ones(1, 1))
    assert mixture_nll(wide, torch.full((1, 1), 2.0)).item() == pytest.approx(2 / math.e**2 + 1 + log_2pi / 2)
    # two equal components at 0 and 2, z = 0: p = (N(0; 0, 1) + N(0; 2, 1)) / 2
    two = Mixture(torch.zeros(1, 2), torch.tensor([[[0.0], [2.0]]]), torch.zeros(1, 2))
    expected = -math.log(0.5 * (1 + math.exp(-2)) / math.sqrt(2 * math.pi))
    assert mixture_nll(two, torch.zeros(1, 1)).item() == pytest.approx(expected, rel=1e-6)
    # split: -log pi_k* - log N(z; mu_k*) of the most responsible component (an upper bound on the NLL)
    assert mixture_nll(two, torch.zeros(1, 1), "split").item() == pytest.approx(math.log(2) + log_2pi / 2, rel=1e-6)
    assert mixture_nll(two, torch.full((1, 1), 1.9), "split").item() == pytest.approx(
        math.log(2) + 0.5 * 0.01 + log_2pi / 2, rel=1e-5)
    # unequal weights: logits (log 3, 0) -> pi = (3/4, 1/4)
    skewed = Mixture(torch.tensor([[math.log(3), 0.0]]), torch.tensor([[[0.0], [2.0]]]), torch.zeros(1, 2))
    expected = -math.log((0.75 + 0.25 * math.exp(-2)) / math.sqrt(2 * math.pi))
    assert mixture_nll(skewed, torch.zeros(1, 1)).item() == pytest.approx(expected, rel=1e-6)
    z = torch.randn(5, 1)
    assert (mixture_nll(two, z, "split") >= mixture_nll(two, z) - 1e-6).all()


def test_a_few_steps_on_one_batch_lower_the_loss():
    tokenizer, network = tiny_models(depth=3)
    network.train()
    objective = ResGenObjective(ResGenObjectiveConfig(label_dropout=0.0), 4, tokenizer)
    batch = {"images": torch.rand(8, 3, 8, 8) * 2 - 1, "labels": torch.arange(8) % 4}
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        logs = objective.loss(network, batch, BatchRandom.local(0, 8))  # the same masks every step
        optimizer.zero_grad()
        logs["loss"].backward()
        optimizer.step()
        losses.append(logs["loss"].item())
    assert losses[-1] < losses[0] - 0.3, losses


# ---------------------------------------------------------------------------------------------- sampler
class Recorder:
    """Wraps the network and checks every call's inputs: known sums are the sums of each position's kept prefix."""

    def __init__(self, network, tokenizer):
        self.network, self.tokenizer, self.kept = network, tokenizer, []

    def __getattr__(self, name):
        return getattr(self.network, name)

    def __call__(self, labels, known_sum, kept):
        self.kept.append(kept.clone())
        return self.network(labels, known_sum, kept)


@pytest.mark.parametrize("depth", [2, 4])
def test_sampling_fills_coarse_prefixes_in_a_step_count_independent_of_depth(depth):
    tokenizer, network = tiny_models(depth=depth)
    recorder = Recorder(network, tokenizer)
    settings = ResGenSamplerConfig(num_steps=5, cfg_scale=2.0)
    labels = torch.tensor([0, 3, 1])
    f_hat, tokens = sample_resgen(recorder, tokenizer, labels, settings, torch.Generator().manual_seed(0),
                                  return_indices=True)
    assert len(recorder.kept) == 5  # num_steps passes (cond + uncond rows together), whatever the depth
    assert recorder.kept[0].eq(0).all() and all(k.shape == (6, 16) for k in recorder.kept)
    counts = [k[:3].sum().item() for k in recorder.kept]
    assert counts == sorted(counts) and counts[-1] < 3 * 16 * depth  # monotone, not done before the last step
    assert tokens.shape == (3, 16, depth) and f_hat.shape == (3, 4, 4, 4)
    torch.testing.assert_close(f_hat, tokenizer.latent_from_indices(tokens))
    # the same seed gives the same samples; a sample does not depend on its batch
    again = sample_resgen(network, tokenizer, labels, settings, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, f_hat)
    objective = ResGenObjective(ResGenObjectiveConfig(), 4, tokenizer)
    assert objective.evaluations_per_sample(settings) == 10
    assert objective.evaluations_per_sample(ResGenSamplerConfig(num_steps=7, cfg_scale=1.0)) == 7


def test_editing_keeps_the_known_positions():
    tokenizer, network = tiny_models(depth=3)
    objective = ResGenObjective(ResGenObjectiveConfig(), 4, tokenizer)
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    keep_mask = torch.ones(1, 1, 8, 8)
    keep_mask[..., 2:6, 2:6] = 0  # regenerate the centre 2x2 positions of the 4x4 grid
    spec = objective.edit_spec(images, keep_mask)
    assert spec.keep.shape == (2, 16) and spec.keep.sum().item() == 2 * 12
    recorder = Recorder(network, tokenizer)
    _, tokens = sample_resgen(recorder, tokenizer, torch.tensor([4, 4]), ResGenSamplerConfig(num_steps=3), None, spec,
                              return_indices=True)
    assert (recorder.kept[0][spec.keep.repeat(2, 1)] == 3).all()  # known positions start complete
    assert torch.equal(tokens[spec.keep], spec.indices[spec.keep])
    with pytest.raises(ValueError, match="the mask must be"):
        objective.edit_spec(images, torch.ones(1, 8, 8))


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_end_to_end_tokenizer_generator_sample_edit(tmp_path, run_cli, capsys):
    common = ["--data.resolution=8", "--trainer.batch_size=8", "--trainer.checkpoint_every=0",
              "--trainer.sample_every=0", "--trainer.progress=false", "--trainer.precision=fp32",
              "--trainer.max_minutes=null", "--trainer.warmup_steps=0"]
    code, out, err = run_cli(["train", "--preset", "mnist-rvq", "--network_preset=RVQ-Test", "--trainer.max_steps=2",
                              f"--trainer.output_dir={tmp_path / 'rvq'}", "--objective.perceptual_weight=0", *common],
                             capsys)
    assert code == 0, err
    tokenizer = tmp_path / "rvq" / "final"
    summary = json.loads((tmp_path / "rvq" / "summary.json").read_text())
    assert len(summary["codebook_usage_per_scale"]) == 3  # one entry per depth
    code, out, err = run_cli(["train", "--preset", "mnist-resgen", "--network_preset=ResGen-Test",
                              f"--tokenizer={tokenizer}", f"--trainer.output_dir={tmp_path / 'gen'}",
                              "--trainer.max_steps=4", "--trainer.log_every=1", "--sampler.num_steps=3", *common], capsys)
    assert code == 0, err
    folder = tmp_path / "gen" / "final"
    pipeline = Pipeline.from_pretrained(folder)
    assert isinstance(pipeline.generator, ResGen) and pipeline.generator.config.rvq_depth == 3
    assert pipeline.number_of_evaluations() == 6
    records = [json.loads(line) for line in (tmp_path / "gen" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(math.isfinite(r["loss"]) for r in records)
    code, out, err = run_cli(["sample", "--from", folder, "--classes", "0,1", "--num", "4", "--steps", "2",
                              "--out", tmp_path / "samples.png"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["edit", "--from", folder, "--image", tmp_path / "samples.png", "--box",
                              "0.25,0.25,0.75,0.75", "--num", "2", "--class", "1", "--out", tmp_path / "edit.png"], capsys)
    assert code == 0, err
    assert (tmp_path / "edit.png").is_file()
    code, out, err = run_cli(["cache-latents", "--tokenizer", tokenizer, "--out", tmp_path / "cache",
                              "--data.name=digits", "--data.resolution=8", "--device=cpu"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "cache" / "index.json").read_text())["count"] > 0
    # a generator depth that disagrees with the tokenizer is refused before training
    code, out, err = run_cli(["train", "--preset", "mnist-resgen", "--network_preset=ResGen-Test",
                              f"--tokenizer={tokenizer}", "--network.rvq_depth=5",
                              f"--trainer.output_dir={tmp_path / 'bad'}", *common], capsys)
    assert code != 0 and "rvq_depth=5 disagrees" in err
    # a tokenizer of another resolution is refused
    with pytest.raises(ConfigError, match="works at 8 px"):
        from effigen.training.experiment import build_experiment_dict, parse_experiment

        parse_experiment(build_experiment_dict("mnist-resgen", overrides=[f"--tokenizer={tokenizer}",
                                                                          "--data.resolution=16"]))

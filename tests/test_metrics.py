"""Closed-form and behavioural checks of effigen.eval (metrics, loaders, Inception weight handling).

These need no parity data and no real Inception weights: the network tests use seeded random weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from effigen.eval import (
    INCEPTION_WEIGHT_FILENAMES,
    INCEPTION_WEIGHTS_ENV,
    InceptionV3Features,
    compute_statistics,
    convert_inception_state_dict,
    extract_features,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    load_images,
    load_inception,
    load_reference_statistics,
    precision_recall,
    resize_bilinear_tf1,
    save_reference_statistics,
)
from effigen.eval.metrics import _sqrtm_trace_eigh


def _random_spd(d: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# --------------------------------------------------------------------------------------------------
# FID


def test_fid_identical_gaussians_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(16), _random_spd(16, rng)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_fid_mean_shift_equal_covariances():
    rng = np.random.default_rng(1)
    mu, sigma, d = rng.standard_normal(12), _random_spd(12, rng), rng.standard_normal(12)
    assert frechet_distance(mu, sigma, mu + d, sigma) == pytest.approx(float(d @ d), rel=1e-8, abs=1e-8)


def test_fid_diagonal_covariances_closed_form():
    rng = np.random.default_rng(2)
    s1, s2 = rng.uniform(0.1, 3.0, 10), rng.uniform(0.1, 3.0, 10)
    mu1, mu2 = rng.standard_normal(10), rng.standard_normal(10)
    expected = float(np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2) + np.sum((mu1 - mu2) ** 2))
    for method in ("sqrtm", "eigvals"):
        got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), method=method)
        assert got == pytest.approx(expected, rel=1e-10)


def test_fid_methods_agree_on_rank_deficient_statistics():
    # fewer samples than dimensions, as in small evaluation sets
    rng = np.random.default_rng(3)
    a = rng.standard_normal((30, 64))
    b = rng.standard_normal((25, 64)) * 1.3 + 0.2
    (m1, s1), (m2, s2) = compute_statistics(a), compute_statistics(b)
    ref = frechet_distance(m1, s1, m2, s2)
    assert np.isfinite(ref) and ref > 0
    assert frechet_distance(m1, s1, m2, s2, method="eigvals") == pytest.approx(ref, rel=1e-6)
    diff = m1 - m2
    via_eigh = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * _sqrtm_trace_eigh(s1, s2)
    assert via_eigh == pytest.approx(ref, rel=1e-6)


def test_compute_statistics_matches_numpy_and_accepts_torch():
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(0))
    mu, sigma = compute_statistics(x)
    assert mu.dtype == np.float64 and sigma.shape == (5, 5)
    np.testing.assert_allclose(mu, x.double().mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.double().numpy(), rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError):
        compute_statistics(np.zeros((1, 5)))


def test_fid_shape_errors():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3), method="nope")


# --------------------------------------------------------------------------------------------------
# KID


def _mmd2_direct(x: np.ndarray, y: np.ndarray, degree=3, coef0=1.0) -> float:
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + coef0) ** degree  # noqa: E731
    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return float(xx + yy - 2 * xy)


def test_kid_polynomial_mmd_matches_direct_computation():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((7, 4)), rng.standard_normal((7, 4)) + 0.5
    # subset_size == n: every subset is a permutation of the whole set, so each MMD equals the direct one
    mean, std = kernel_inception_distance(x, y, subset_size=7, subsets=5)
    assert mean == pytest.approx(_mmd2_direct(x, y), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_identical_near_zero_shifted_positive():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((400, 32))
    same, _ = kernel_inception_distance(x, x.copy(), subset_size=100, subsets=50)
    shifted, _ = kernel_inception_distance(x, x + 1.0, subset_size=100, subsets=50)
    assert shifted > 0.1
    assert abs(same) < 0.01 * shifted


def test_kid_subset_rng_is_torch_fidelity_s():
    # torch-fidelity: one RandomState(seed); per subset choice() into set 1, then into set 2
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((30, 3)), rng.standard_normal((20, 3))
    r = np.random.RandomState(2020)
    mmds = []
    for _ in range(4):
        xi = x[r.choice(30, 8, replace=False)]
        yi = y[r.choice(20, 8, replace=False)]
        mmds.append(_mmd2_direct(xi, yi))
    mean, std = kernel_inception_distance(x, y, subset_size=8, subsets=4, seed=2020)
    assert mean == pytest.approx(np.mean(mmds), rel=1e-10)
    assert std == pytest.approx(np.std(mmds), rel=1e-8)
    with pytest.raises(ValueError, match="subset_size"):
        kernel_inception_distance(x, y, subset_size=25)


# --------------------------------------------------------------------------------------------------
# Inception Score


def test_inception_score_uniform_is_one():
    mean, std = inception_score(torch.zeros(50, 1008), splits=5)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_confident_distinct_classes():
    num_classes, splits = 8, 2
    labels = np.tile(np.arange(num_classes), splits)  # every split holds each class once
    logits = np.zeros((len(labels), 1008))
    logits[np.arange(len(labels)), labels] = 60.0
    mean, std = inception_score(logits, splits=splits, shuffle=False)
    assert mean == pytest.approx(num_classes, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_shuffle_is_seeded_permutation():
    logits = torch.randn(40, 20, generator=torch.Generator().manual_seed(1)) * 3
    perm = np.random.RandomState(7).permutation(40)
    assert inception_score(logits, splits=4, shuffle=True, seed=7) == inception_score(
        logits[perm], splits=4, shuffle=False
    )


# --------------------------------------------------------------------------------------------------
# precision / recall


def _pr_bruteforce(real, fake, k):
    def d(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    rr, ff, fr = d(real, real), d(fake, fake), d(fake, real)
    rad_r = np.sort(rr, axis=1)[:, k]
    rad_f = np.sort(ff, axis=1)[:, k]
    precision = np.mean((fr <= rad_r[None, :]).any(1))
    recall = np.mean((fr.T <= rad_f[None, :]).any(1))
    return precision, recall


def test_precision_recall_identical_and_disjoint():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((120, 16))
    assert precision_recall(x, x.copy()) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)


def test_precision_recall_half_the_modes():
    # 4 well separated modes in 2-D; the fake set samples 2 of them (fresh draws)
    rng = np.random.default_rng(9)
    centers = rng.standard_normal((4, 2)) * 50
    real = np.concatenate([c + rng.standard_normal((200, 2)) for c in centers])
    fake = np.concatenate([c + rng.standard_normal((200, 2)) for c in centers[:2]])
    precision, recall = precision_recall(real, fake)
    assert precision >= 0.9  # k-NN balls of a finite sample miss a few fresh points
    assert 0.45 <= recall <= 0.5


def test_precision_recall_chunked_matches_bruteforce():
    rng = np.random.default_rng(10)
    real = rng.standard_normal((150, 8))
    fake = rng.standard_normal((130, 8)) * 1.2 + 0.3
    ref = _pr_bruteforce(real, fake, 3)
    got_big = precision_recall(real, fake, k=3, dtype=torch.float64)
    got_small = precision_recall(real, fake, k=3, row_batch=17, col_batch=23, dtype=torch.float64)
    assert got_big == pytest.approx(ref, abs=1e-12)
    assert got_small == pytest.approx(ref, abs=1e-12)
    assert precision_recall(real, fake, k=3) == pytest.approx(ref, abs=2 / 130)  # float32


# --------------------------------------------------------------------------------------------------
# loaders


def test_load_images_folder_sorted_rgb(tmp_path):
    rng = np.random.default_rng(11)
    arrays = [rng.integers(0, 256, (6, 5, 3), dtype=np.uint8) for _ in range(3)]
    for name, a in zip(["b.png", "a.png", "c.jpg"], arrays):
        Image.fromarray(a).save(tmp_path / name, quality=100)
    Image.fromarray(arrays[0][..., 0]).save(tmp_path / "d.png")  # grayscale -> RGB
    (tmp_path / "notes.txt").write_text("not an image")
    x = load_images(tmp_path)
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 6, 5)
    assert torch.equal(x[0], torch.from_numpy(arrays[1]).permute(2, 0, 1))  # a.png first
    assert torch.equal(x[1], torch.from_numpy(arrays[0]).permute(2, 0, 1))
    assert torch.equal(x[3], torch.from_numpy(arrays[0][..., 0]).expand(3, 6, 5))
    Image.fromarray(np.zeros((7, 7, 3), np.uint8)).save(tmp_path / "e.png")
    with pytest.raises(ValueError, match="e.png"):
        load_images(tmp_path)


def test_load_images_npz_and_errors(tmp_path):
    arr = np.random.default_rng(12).integers(0, 256, (4, 8, 9, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr)  # ADM layout: arr_0
    x = load_images(tmp_path / "samples.npz")
    assert x.shape == (4, 3, 8, 9) and torch.equal(x, torch.from_numpy(arr).permute(0, 3, 1, 2))
    np.savez(tmp_path / "bad.npz", images=arr)
    with pytest.raises(ValueError, match="bad.npz"):
        load_images(tmp_path / "bad.npz")
    np.savez(tmp_path / "float.npz", arr.astype(np.float32))
    with pytest.raises(ValueError, match="float.npz"):
        load_images(tmp_path / "float.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_images(tmp_path / "missing.npz")


def test_reference_statistics_round_trip_and_adm_layout(tmp_path):
    rng = np.random.default_rng(13)
    mu, sigma = rng.standard_normal(6), _random_spd(6, rng)
    save_reference_statistics(tmp_path / "ref.npz", mu, sigma)
    ref = load_reference_statistics(tmp_path / "ref.npz")
    assert set(ref) == {"mu", "sigma"}
    np.testing.assert_array_equal(ref["sigma"], sigma)
    # ADM reference batch: images plus FID and sFID statistics (float32 there)
    np.savez(
        tmp_path / "adm.npz",
        arr_0=np.zeros((2, 4, 4, 3), np.uint8),
        mu=mu.astype(np.float32), sigma=sigma.astype(np.float32),
        mu_s=mu[:3], sigma_s=sigma[:3, :3],
    )
    ref = load_reference_statistics(tmp_path / "adm.npz")
    assert set(ref) == {"mu", "sigma", "mu_s", "sigma_s"} and ref["mu"].dtype == np.float64
    np.savez(tmp_path / "images_only.npz", np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="images_only.npz"):
        load_reference_statistics(tmp_path / "images_only.npz")
    np.savez(tmp_path / "badshape.npz", mu=mu, sigma=sigma[:3])
    with pytest.raises(ValueError, match="badshape.npz"):
        load_reference_statistics(tmp_path / "badshape.npz")
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_reference_statistics(tmp_path / "nope.npz")


class _MeanModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, taps=None):
        x = x.float() * self.w
        return {"mean": x.mean((2, 3)), "max": x.amax((2, 3))}


def test_extract_features_batches_and_dtype():
    images = torch.randint(0, 256, (7, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = extract_features(_MeanModel(), images, batch_size=3, progress=False)
    assert set(out) == {"mean", "max"} and out["mean"].dtype == np.float64 and out["mean"].shape == (7, 3)
    np.testing.assert_allclose(out["mean"], images.double().mean((2, 3)).numpy(), rtol=1e-6)
    out_np = extract_features(_MeanModel(), images.numpy(), batch_size=50, progress=False)
    np.testing.assert_array_equal(out_np["max"], out["max"])


# --------------------------------------------------------------------------------------------------
# Inception: resize, weights, taps (seeded random weights)


def _tf1_resize_reference(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Naive per-pixel TF1 ResizeBilinear (align_corners=False, no half-pixel centres)."""
    c, h, w = img.shape
    sy, sx = np.float32(h / out_h), np.float32(w / out_w)
    out = np.zeros((c, out_h, out_w))
    for i in range(out_h):
        y = float(np.float32(i) * sy)
        y0 = int(np.floor(y)); y1 = min(y0 + 1, h - 1); dy = y - y0  # noqa: E702
        for j in range(out_w):
            x = float(np.float32(j) * sx)
            x0 = int(np.floor(x)); x1 = min(x0 + 1, w - 1); dx = x - x0  # noqa: E702
            top = img[:, y0, x0] + (img[:, y0, x1] - img[:, y0, x0]) * dx
            bot = img[:, y1, x0] + (img[:, y1, x1] - img[:, y1, x0]) * dx
            out[:, i, j] = top + (bot - top) * dy
    return out


def test_resize_bilinear_tf1_matches_formula():
    img = torch.randint(0, 256, (1, 3, 5, 7), generator=torch.Generator().manual_seed(0)).float()
    for size in [(11, 3), (13, 17), (4, 7)]:
        got = resize_bilinear_tf1(img, size)[0].double().numpy()
        ref = _tf1_resize_reference(img[0].double().numpy(), *size)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-3)
    assert torch.equal(resize_bilinear_tf1(img, (5, 7)), img)
    # top-left aligned: output (0, 0) is input (0, 0), unlike half-pixel-centred interpolation
    up = resize_bilinear_tf1(img, (10, 14))
    assert torch.equal(up[..., 0, 0], img[..., 0, 0])
    assert not torch.allclose(up, F.interpolate(img, size=(10, 14), mode="bilinear", align_corners=False))


@pytest.fixture(scope="module")
def random_state_dict():
    torch.manual_seed(0)
    model = InceptionV3Features()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0, (2.0 / fan_in) ** 0.5)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.8, 1.2)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        model.fc.weight.normal_(0, 0.05)
        model.fc.bias.normal_(0, 0.1)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_images():
    return torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def test_missing_weights_error_is_helpful(tmp_path, monkeypatch):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for kwargs in ({}, {"weights": tmp_path / "nope.pth"}):
        with pytest.raises(FileNotFoundError) as info:
            load_inception(**kwargs)
        msg = str(info.value)
        for needed in (*INCEPTION_WEIGHT_FILENAMES, INCEPTION_WEIGHTS_ENV, "weights=", "never downloads"):
            assert needed in msg, f"{needed!r} not in error message:\n{msg}"
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(tmp_path / "also-missing.pth"))
    with pytest.raises(FileNotFoundError, match="also-missing.pth"):
        load_inception()
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(tmp_path))  # a folder without the files
    with pytest.raises(FileNotFoundError, match="holds neither file"):
        load_inception()


def test_weight_layouts_load_to_same_outputs(random_state_dict, tiny_images, tmp_path, monkeypatch):
    sd = random_state_dict
    # released layout (torch-fidelity / pytorch-fid module names), via the env var
    torch.save(sd, tmp_path / INCEPTION_WEIGHT_FILENAMES[0])
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(tmp_path / INCEPTION_WEIGHT_FILENAMES[0]))
    ref_model = load_inception()
    with torch.inference_mode():
        ref = ref_model(tiny_images)
    assert set(ref) == set(ref_model.available_taps)
    assert all(torch.isfinite(v).all() and v.abs().sum() > 0 for v in ref.values())

    # converter output without num_batches_tracked, with a DataParallel prefix, from a folder
    folder = tmp_path / "other"
    folder.mkdir()
    torch.save(
        {"module." + k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")},
        folder / INCEPTION_WEIGHT_FILENAMES[1],
    )
    # pytorch-fid InceptionV3 module state dict: blocks.i.j.*, no classifier
    blocks = [
        ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"],
        ["Conv2d_3b_1x1", "Conv2d_4a_3x3"],
        ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"],
        ["Mixed_7a", "Mixed_7b", "Mixed_7c"],
    ]
    rename = {n: f"blocks.{i}.{j}" for i, names in enumerate(blocks) for j, n in enumerate(names)}
    blocks_sd = {rename[k.split(".", 1)[0]] + "." + k.split(".", 1)[1]: v for k, v in sd.items() if not k.startswith("fc.")}
    torch.save(blocks_sd, tmp_path / "blocks.pth")

    m_other = load_inception(folder)
    m_blocks = load_inception(tmp_path / "blocks.pth")
    with torch.inference_mode():
        o_other, o_blocks = m_other(tiny_images), m_blocks(tiny_images)
    for tap, v in ref.items():
        torch.testing.assert_close(o_other[tap], v, rtol=0, atol=0)
        if tap in m_blocks.available_taps:
            torch.testing.assert_close(o_blocks[tap], v, rtol=0, atol=0)
    assert "logits" not in m_blocks.available_taps
    with pytest.raises(ValueError, match="classifier"):
        m_blocks(tiny_images, taps=["logits_unbiased"])


def test_bad_state_dicts_fail_loudly(random_state_dict, tmp_path):
    sd = dict(random_state_dict)
    missing = {k: v for k, v in sd.items() if k != "Mixed_6c.branch1x1.conv.weight"}
    with pytest.raises(ValueError, match="missing keys: Mixed_6c.branch1x1.conv.weight"):
        convert_inception_state_dict(missing)
    extra = dict(sd, **{"AuxLogits.fc.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected keys: AuxLogits.fc.weight"):
        convert_inception_state_dict(extra)
    wrong = dict(sd, **{"fc.bias": torch.zeros(1000)})
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=r"wrong\.pth.*fc\.bias"):
        load_inception(tmp_path / "wrong.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_inception(tmp_path / "garbage.pth")


def test_taps_shapes_spatial_order_and_early_exit(random_state_dict, tiny_images):
    model = load_inception(random_state_dict)
    with torch.inference_mode():
        out = model(tiny_images)
        dims = {k: v.shape[1] for k, v in out.items()}
        assert dims == {"64": 64, "192": 192, "768": 768, "spatial": 2023, "2048": 2048,
                        "logits_unbiased": 1008, "logits": 1008}
        torch.testing.assert_close(out["logits"], out["logits_unbiased"] + model.fc.bias)
        # spatial = ReLU output of Mixed_6d.branch1x1 (TF mixed_6/conv), channels [:7], NHWC-flattened
        x = model.preprocess(tiny_images)
        for name in ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"]:
            x = getattr(model, name)(x)
        x = F.max_pool2d(x, 3, 2)
        x = F.max_pool2d(model.Conv2d_4a_3x3(model.Conv2d_3b_1x1(x)), 3, 2)
        for name in ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c"]:
            x = getattr(model, name)(x)
        conv = model.Mixed_6d.branch1x1(x)  # (B, 192, 17, 17)
        assert conv.shape[1:] == (192, 17, 17)
        torch.testing.assert_close(out["spatial"].view(2, 17, 17, 7), conv[:, :7].permute(0, 2, 3, 1))
        only = model(tiny_images, taps=["spatial"])
        assert list(only) == ["spatial"]
        torch.testing.assert_close(only["spatial"], out["spatial"])
        # float input in [0, 255] gives the same features as uint8
        torch.testing.assert_close(model(tiny_images.float(), taps="2048")["2048"], out["2048"])
    with pytest.raises(ValueError, match="unknown Inception tap"):
        model(tiny_images, taps=["pool3"])
    with pytest.raises(ValueError):
        model(tiny_images[:, :1])


def test_load_images_scales_16_bit_grayscale_pngs(tmp_path):
    # PIL opens 16-bit grayscale PNGs as mode I;16 (0..65535); convert("RGB") alone clips them to white
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(values).save(tmp_path / "a16.png")
    Image.fromarray(np.full((4, 4, 3), 7, np.uint8)).save(tmp_path / "b8.png")
    x = load_images(tmp_path)
    assert x.shape == (2, 3, 4, 4)
    assert x[0, :, 0].tolist() == [[0, 1, 128, 255]] * 3 and int(x[1].max()) == 7


def test_image_set_errors_are_user_errors(tmp_path):
    from effigen.config import UserError
    from effigen.eval.metrics import EvaluationError

    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationError, match="no images"):
        load_images(tmp_path / "empty")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(EvaluationError, match="junk.npz"):
        load_images(tmp_path / "junk.npz")
    assert issubclass(EvaluationError, UserError) and issubclass(EvaluationError, ValueError)

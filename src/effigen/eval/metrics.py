"""Sample-quality metrics on Inception features: FID, sFID, IS, KID, precision / recall.

Protocols reproduced (numbers agree with the reference implementations to round-off):

* **FID** -- Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local
  Nash Equilibrium": Frechet distance between Gaussians fitted to the 2048-d ``pool_3`` features.
  :func:`frechet_distance` follows the TTUR code as copied by pytorch-fid and by the ADM evaluation
  suite (Dhariwal & Nichol 2021, ``guided-diffusion/evaluations/evaluator.py``): ``scipy.linalg.sqrtm``
  of ``sigma1 @ sigma2``, retried with ``eps`` added to both diagonals when the result is not finite,
  and a small imaginary part dropped. ``method="eigvals"`` gives torch-fidelity 0.4.0's variant (sum of
  square roots of the eigenvalues of the product), equal up to round-off.
* **sFID** -- Nash et al. 2021 ("Generating Images with Sparse Representations"), as computed by the
  ADM suite: the same :func:`frechet_distance`, applied to the ``"spatial"`` tap of
  :class:`~effigen.eval.inception.InceptionV3Features` (first 7 channels of TF ``mixed_6/conv``,
  2023-d) -- ``frechet_distance(*compute_statistics(f["spatial"]), ref["mu_s"], ref["sigma_s"])``.
* **IS** -- Salimans et al. 2016, as torch-fidelity computes it (float64 softmax of the bias-free
  logits, contiguous splits, optional seeded shuffle; mean and population std over the splits).
* **KID** -- Binkowski et al. 2018 ("Demystifying MMD GANs"), as torch-fidelity computes it: unbiased
  MMD^2 with the cubic polynomial kernel ``(x.y / d + 1)^3`` averaged over random subsets drawn with
  ``numpy.random.RandomState(seed).choice(..., replace=False)``.
* **Precision / recall** -- Kynkaanniemi et al. 2019 ("Improved Precision and Recall Metric for
  Assessing Generative Models"), k-NN manifolds (k = 3) as in the ADM suite and torch-fidelity, with
  chunked pairwise distances so that 50k x 50k sets fit in memory.

Plus helpers to load image sets (image folders, ADM ``.npz`` batches), reference statistics (ADM
reference batches, ``mu``/``sigma`` files) and to run the feature extractor over a set.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from ..config import UserError

__all__ = [
    "IMAGE_EXTENSIONS",
    "EvaluationError",
    "compute_statistics",
    "extract_features",
    "frechet_distance",
    "inception_score",
    "kernel_inception_distance",
    "load_images",
    "load_reference_statistics",
    "precision_recall",
    "save_reference_statistics",
    "spatial_frechet_distance",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class EvaluationError(UserError, ValueError):
    """An evaluation input cannot be used (an image set that is empty, unreadable or too small, a bad reference);
    the message names it and the fix. `effigen eval` prints it on one line and exits 2."""


def _to_numpy_2d(x, name: str, dtype=np.float64) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=dtype)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (num_samples, dim) array, got shape {x.shape}")
    return x


# --------------------------------------------------------------------------------------------------
# FID / sFID


def compute_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (``np.cov``, unbiased, float64) of ``(N, D)`` features, as in TTUR / ADM."""
    f = _to_numpy_2d(features, "features")
    if f.shape[0] < 2:
        raise EvaluationError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrtm_trace_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    # tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2) for PSD S1, S2; the right side is symmetric PSD,
    # so two symmetric eigendecompositions suffice (used only when scipy is unavailable).
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    ev = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    return float(np.sqrt(np.clip(ev, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "sqrtm") -> float:
    """Frechet distance ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2)`` between two Gaussians.

    ``method="sqrtm"`` (default) is the TTUR / pytorch-fid / ADM computation with
    ``scipy.linalg.sqrtm`` (falls back to an equivalent symmetric eigendecomposition if scipy is not
    installed); ``method="eigvals"`` is torch-fidelity 0.4.0's. All statistics are used in float64.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"mean vectors have different or invalid shapes: {mu1.shape} vs {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be ({d}, {d}), got {sigma1.shape} and {sigma2.shape}")
    diff = mu1 - mu2
    base = float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2))

    if method == "eigvals":
        # torch-fidelity 0.4.0: complex sqrt of the (possibly slightly negative/complex) eigenvalues
        # of the product, real part summed.
        ev = np.linalg.eigvals(sigma1.dot(sigma2)).astype("complex128")
        return base - 2 * float(np.sum(np.sqrt(ev).real))
    if method != "sqrtm":
        raise ValueError(f"method must be 'sqrtm' or 'eigvals', got {method!r}")
    try:
        from scipy import linalg
    except ImportError:  # pragma: no cover - scipy ships with scikit-learn, a dependency
        return base - 2 * _sqrtm_trace_eigh(sigma1, sigma2)

    # Kept from TTUR/ADM: the product can be near-singular (fewer samples than dimensions);
    # then retry with eps on both diagonals.
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: singular product; adding {eps} to the diagonal of the covariances", stacklevel=2)
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    # Round-off can leave a tiny imaginary component; TTUR/ADM drop it (and fail on a large one).
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm has a large imaginary component ({np.max(np.abs(covmean.imag)):.3g})")
        covmean = covmean.real
    return base - 2 * float(np.trace(covmean))


def spatial_frechet_distance(mu_s1, sigma_s1, mu_s2, sigma_s2, eps: float = 1e-6) -> float:
    """sFID: :func:`frechet_distance` of the ``"spatial"`` tap statistics (ADM's ``mu_s``/``sigma_s``)."""
    return frechet_distance(mu_s1, sigma_s1, mu_s2, sigma_s2, eps=eps)


# --------------------------------------------------------------------------------------------------
# Inception Score


def inception_score(logits, splits: int = 10, shuffle: bool = True, seed: int = 2020) -> tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))``: (mean, std) over ``splits`` groups.

    ``logits`` should be the ``"logits_unbiased"`` tap (torch-fidelity and the ADM suite use the
    bias-free ``softmax/logits/MatMul``). Computed as torch-fidelity does, in float64: rows permuted
    with ``numpy.random.RandomState(seed).permutation(N)`` when ``shuffle`` (torch-fidelity's default,
    ``samples_shuffle=True``, seed 2020), split ``i`` = rows ``[i*N//splits, (i+1)*N//splits)``,
    population std. ``shuffle=False`` gives the unshuffled variant (ADM's evaluator splits unshuffled
    samples into chunks of 5000 and reports only the mean).
    """
    if torch.is_tensor(logits):
        x = logits.detach().cpu().to(torch.float64)
    else:
        x = torch.from_numpy(np.asarray(logits, dtype=np.float64))
    if x.dim() != 2:
        raise ValueError(f"logits must be (num_samples, num_classes), got shape {tuple(x.shape)}")
    n = x.shape[0]
    if splits < 1 or n < splits:
        raise ValueError(f"need 1 <= splits <= num_samples, got splits={splits} for {n} samples")
    if shuffle:
        x = x[torch.from_numpy(np.random.RandomState(seed).permutation(n))]
    p = x.softmax(dim=1)
    log_p = x.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        p_i, log_p_i = p[lo:hi], log_p[lo:hi]
        q = p_i.mean(dim=0, keepdim=True)
        kl = (p_i * (log_p_i - q.log())).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------------------------------
# KID


def _polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int, gamma: float | None, coef0: float) -> np.ndarray:
    if gamma is None:
        gamma = 1.0 / x.shape[1]
    return (x @ y.T * gamma + coef0) ** degree


def _mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    m = k_xx.shape[0]
    sum_xx = k_xx.sum() - np.trace(k_xx)
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float((sum_xx + sum_yy) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    features_1,
    features_2,
    subset_size: int = 1000,
    subsets: int = 100,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int = 2020,
) -> tuple[float, float]:
    """KID: unbiased polynomial-kernel MMD^2 averaged over ``subsets`` random subsets; (mean, std).

    As torch-fidelity: one ``numpy.random.RandomState(seed)``; for each subset, indices into
    ``features_1`` then into ``features_2`` from ``rng.choice(n, subset_size, replace=False)``;
    ``gamma=None`` means ``1 / dim``; population std. Computed in float64 (torch-fidelity uses the
    float32 features as they are; the difference is round-off).
    """
    f1 = _to_numpy_2d(features_1, "features_1")
    f2 = _to_numpy_2d(features_2, "features_2")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature dims differ: {f1.shape[1]} vs {f2.shape[1]}")
    n1, n2 = len(f1), len(f2)
    if subset_size < 2 or n1 < subset_size or n2 < subset_size:
        raise ValueError(
            f"KID subset_size={subset_size} needs 2 <= subset_size <= number of samples "
            f"(features_1: {n1}, features_2: {n2}); pass a smaller subset_size"
        )
    rng = np.random.RandomState(seed)
    mmds = np.zeros(subsets)
    for i in range(subsets):
        x = f1[rng.choice(n1, subset_size, replace=False)]
        y = f2[rng.choice(n2, subset_size, replace=False)]
        mmds[i] = _mmd2_unbiased(
            _polynomial_kernel(x, x, degree, gamma, coef0),
            _polynomial_kernel(x, y, degree, gamma, coef0),
            _polynomial_kernel(y, y, degree, gamma, coef0),
        )
    return float(np.mean(mmds)), float(np.std(mmds))


# --------------------------------------------------------------------------------------------------
# precision / recall


def _sq_dists(a: torch.Tensor, b: torch.Tensor, a_sq: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    return (a_sq[:, None] + b_sq[None, :] - 2 * (a @ b.T)).clamp_min_(0)


def _knn_radii(feats: torch.Tensor, sq: torch.Tensor, k: int, row_batch: int, col_batch: int) -> torch.Tensor:
    """Squared distance of every point to its k-th nearest neighbour (the point itself excluded,
    i.e. the (k+1)-th smallest distance including the zero self-distance, as the reference code)."""
    n = feats.shape[0]
    out = torch.empty(n, dtype=feats.dtype, device=feats.device)
    for r0 in range(0, n, row_batch):
        rows = feats[r0 : r0 + row_batch]
        best = None  # running k+1 smallest, (b, k+1)
        for c0 in range(0, n, col_batch):
            d = _sq_dists(rows, feats[c0 : c0 + col_batch], sq[r0 : r0 + row_batch], sq[c0 : c0 + col_batch])
            cand = d if best is None else torch.cat([best, d], dim=1)
            best = torch.topk(cand, min(k + 1, cand.shape[1]), dim=1, largest=False).values
        out[r0 : r0 + row_batch] = best[:, k]
    return out


def _fraction_in_manifold(
    queries: torch.Tensor, q_sq: torch.Tensor, refs: torch.Tensor, r_sq: torch.Tensor, radii: torch.Tensor,
    row_batch: int, col_batch: int,
) -> float:
    inside = torch.zeros(queries.shape[0], dtype=torch.bool, device=queries.device)
    for r0 in range(0, queries.shape[0], row_batch):
        q = queries[r0 : r0 + row_batch]
        acc = inside[r0 : r0 + row_batch]
        for c0 in range(0, refs.shape[0], col_batch):
            d = _sq_dists(q, refs[c0 : c0 + col_batch], q_sq[r0 : r0 + row_batch], r_sq[c0 : c0 + col_batch])
            acc |= (d <= radii[None, c0 : c0 + col_batch]).any(dim=1)
    return float(inside.double().mean())


def precision_recall(
    real_features,
    fake_features,
    k: int = 3,
    row_batch: int = 1024,
    col_batch: int = 8192,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN manifolds.

    precision = fraction of fake samples inside the real manifold (some real sample's ball whose
    radius is its k-th nearest real neighbour distance); recall = fraction of real samples inside
    the fake manifold. Pairwise distances are computed in ``row_batch x col_batch`` blocks (memory
    ``O(row_batch * col_batch)``), so 50k x 50k sets are fine; ``device="cuda"`` speeds it up.
    ``dtype`` float32 matches the reference implementations (ADM uses float16/32, torch-fidelity 32).
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")

    def as_tensor(x, name):
        t = x.detach() if torch.is_tensor(x) else torch.from_numpy(np.asarray(x))
        if t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D (num_samples, dim) array, got shape {tuple(t.shape)}")
        return t.to(device=dev, dtype=dtype)

    r = as_tensor(real_features, "real_features")
    f = as_tensor(fake_features, "fake_features")
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature dims differ: {r.shape[1]} vs {f.shape[1]}")
    if k < 1 or len(r) <= k or len(f) <= k:
        raise ValueError(f"k={k} needs more than k samples in each set (real: {len(r)}, fake: {len(f)})")
    r_sq, f_sq = (r * r).sum(1), (f * f).sum(1)
    with torch.inference_mode():
        radii_r = _knn_radii(r, r_sq, k, row_batch, col_batch)
        radii_f = _knn_radii(f, f_sq, k, row_batch, col_batch)
        precision = _fraction_in_manifold(f, f_sq, r, r_sq, radii_r, row_batch, col_batch)
        recall = _fraction_in_manifold(r, r_sq, f, f_sq, radii_f, row_batch, col_batch)
    return precision, recall


# --------------------------------------------------------------------------------------------------
# image sets, reference statistics, feature extraction


def load_images(path: str | os.PathLike) -> torch.Tensor:
    """Load an image set as a uint8 tensor (N, 3, H, W).

    * a folder: every ``.png`` / ``.jpg`` / ``.jpeg`` file directly inside it (not recursive), sorted
      by file name, converted to RGB with PIL (as torch-fidelity reads folders); all must share a size;
    * an ``.npz`` file with ``arr_0`` of uint8 (N, H, W, 3) (the ADM sample / reference batch layout);
    * an ``.npy`` file with the same array.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        from PIL import Image

        from ..images import convert_image

        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise EvaluationError(f"{p}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder; give a folder that "
                                  "holds the image files directly (not in subfolders), an .npz or an .npy")
        arrays = []
        for f in files:
            try:
                with Image.open(f) as im:  # 16-bit grayscale is scaled to 8 bits, not clipped
                    a = np.asarray(convert_image(im, "RGB"), dtype=np.uint8)
            except Exception as e:  # noqa: BLE001 - re-raised with the file name
                raise EvaluationError(f"{f}: cannot read image: {e}; delete or replace the file") from e
            if arrays and a.shape != arrays[0].shape:
                raise EvaluationError(
                    f"{f}: image size {a.shape[1]}x{a.shape[0]} differs from {files[0].name}'s "
                    f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; all images of a set must share one size"
                )
            arrays.append(a)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such image folder or .npz/.npy file")
    if p.suffix.lower() not in (".npz", ".npy"):
        raise EvaluationError(f"{p}: unsupported image set; give a folder of images, an .npz with 'arr_0', or an .npy")
    try:
        if p.suffix.lower() == ".npz":
            with np.load(p) as z:
                if "arr_0" not in z.files:
                    raise EvaluationError(f"{p}: expected an ADM-style .npz with 'arr_0' (N, H, W, 3) uint8; "
                                          f"keys: {z.files}")
                arr = z["arr_0"]
        else:
            arr = np.load(p)
    except EvaluationError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged or non-numpy file, re-raised with its name
        raise EvaluationError(f"{p}: cannot read as {p.suffix.lower()} ({type(e).__name__}: {e}); replace the file") from e
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise EvaluationError(f"{p}: expected uint8 images of shape (N, H, W, 3), got {arr.dtype} {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()


def _check_stats(path, out: dict, mu_key: str, sigma_key: str) -> None:
    mu, sigma = out[mu_key], out[sigma_key]
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise EvaluationError(f"{path}: '{mu_key}' {mu.shape} and '{sigma_key}' {sigma.shape} are not (D,) and (D, D)")


def load_reference_statistics(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load precomputed statistics from an ``.npz``: ``mu`` / ``sigma`` (2048-d FID statistics) and,
    when present, ``mu_s`` / ``sigma_s`` (ADM's 2023-d sFID statistics). ADM reference batches also hold
    the reference images as ``arr_0`` (use :func:`load_images` on the same file for those).
    Returns float64 arrays under the keys found."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{p}: reference statistics file not found")
    try:
        z = np.load(p)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise EvaluationError(f"{p}: cannot read as .npz: {e}") from e
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise EvaluationError(f"{p}: expected an .npz archive with 'mu' and 'sigma'")
    with z:
        keys = set(z.files)
        if not {"mu", "sigma"} <= keys:
            hint = " (it holds only images: compute features with extract_features first)" if "arr_0" in keys else ""
            raise EvaluationError(f"{p}: missing 'mu'/'sigma' statistics; keys: {sorted(keys)}{hint}")
        out = {k: np.asarray(z[k], dtype=np.float64) for k in ("mu", "sigma", "mu_s", "sigma_s") if k in keys}
    _check_stats(p, out, "mu", "sigma")
    if ("mu_s" in out) != ("sigma_s" in out):
        raise EvaluationError(f"{p}: has only one of 'mu_s' / 'sigma_s'")
    if "mu_s" in out:
        _check_stats(p, out, "mu_s", "sigma_s")
    return out


def save_reference_statistics(path: str | os.PathLike, mu, sigma, mu_s=None, sigma_s=None) -> None:
    """Write ``mu``/``sigma`` (and optionally ``mu_s``/``sigma_s``) in the layout
    :func:`load_reference_statistics` and ADM's evaluator read."""
    arrays = {"mu": np.asarray(mu, dtype=np.float64), "sigma": np.asarray(sigma, dtype=np.float64)}
    if (mu_s is None) != (sigma_s is None):
        raise ValueError("give both mu_s and sigma_s, or neither")
    if mu_s is not None:
        arrays.update(mu_s=np.asarray(mu_s, dtype=np.float64), sigma_s=np.asarray(sigma_s, dtype=np.float64))
    np.savez(path, **arrays)


def extract_features(
    model: torch.nn.Module,
    images,
    batch_size: int = 50,
    device: str | torch.device | None = None,
    taps: Iterable[str] | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Run ``model`` (an :class:`~effigen.eval.inception.InceptionV3Features`) over ``images``
    (uint8 or 0..255 float, (N, 3, H, W), tensor or array) in batches; returns ``{tap: float64 (N, dim)}``.

    ``device``: where to run (the model is moved there); default: the model's current device.
    ``progress=False`` hides the tqdm bar.
    """
    from tqdm.auto import tqdm

    if not torch.is_tensor(images):
        images = torch.from_numpy(np.asarray(images))
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("no images to extract features from")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is not None:
        model.to(device)
    dev = next(model.parameters()).device
    model.eval()
    chunks: dict[str, list[np.ndarray]] = {}
    n = images.shape[0]
    with torch.inference_mode(), tqdm(total=n, disable=not progress, unit="img", desc="Inception features") as bar:
        for i in range(0, n, batch_size):
            out = model(images[i : i + batch_size].to(dev), taps=taps)
            for k, v in out.items():
                chunks.setdefault(k, []).append(v.detach().to("cpu", torch.float64).numpy())
            bar.update(min(batch_size, n - i))
    return {k: np.concatenate(v, axis=0) for k, v in chunks.items()}

"""Image and feature metrics of ``reenact eval`` (torch, images in [0, 1], shape (B, C, H, W)).

``l1``, ``psnr`` (capped at :data:`PSNR_CAP_DB`) and ``ssim`` per image; Gaussian feature
statistics and the Frechet distance for FID; cosine similarity for identity. The protocol that
uses them is in :mod:`reenact.eval`."""
import torch
import torch.nn.functional as F

#: PSNR of identical images is infinite; it is reported as this many dB (MSE floor 1e-10).
PSNR_CAP_DB = 100.0


def _check_pair(x, y):
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise TypeError("images must be torch tensors")
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"images must be two (B, C, H, W) tensors of one shape, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")


def gaussian_window(size=11, sigma=1.5, dtype=torch.float64, device=None):
    """A normalised 1D Gaussian (size,): ``exp(-d^2 / (2 sigma^2))`` at d = -size//2 .. size//2."""
    offsets = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    window = torch.exp(-offsets.square() / (2 * sigma * sigma))
    return window / window.sum()


def _gaussian_filter(images, window):
    """Separable 'valid' Gaussian filtering of (B, C, H, W), one channel at a time."""
    channels = images.shape[1]
    size = window.numel()
    rows = window.reshape(1, 1, size, 1).expand(channels, 1, size, 1)
    cols = window.reshape(1, 1, 1, size).expand(channels, 1, 1, size)
    return F.conv2d(F.conv2d(images, rows, groups=channels), cols, groups=channels)


def ssim(x, y, data_range=1.0, window_size=11, sigma=1.5, k1=0.01, k2=0.03):
    """Structural similarity per image -> (B,), the mean of the SSIM map over channels and positions.

    The map is computed where the Gaussian window fits inside the image (no padding), with
    population (not sample) statistics; this equals skimage's ``structural_similarity(...,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=data_range)``.
    Computed in float64.
    """
    _check_pair(x, y)
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"images must be at least {window_size} pixels a side for SSIM, got {tuple(x.shape[-2:])}")
    x, y = x.double(), y.double()
    window = gaussian_window(window_size, sigma, torch.float64, x.device)
    mu_x, mu_y = _gaussian_filter(x, window), _gaussian_filter(y, window)
    var_x = _gaussian_filter(x * x, window) - mu_x.square()
    var_y = _gaussian_filter(y * y, window) - mu_y.square()
    cov = _gaussian_filter(x * y, window) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    return value.flatten(1).mean(1)


def psnr(x, y, data_range=1.0):
    """Peak signal-to-noise ratio per image in dB -> (B,), capped at :data:`PSNR_CAP_DB`."""
    _check_pair(x, y)
    mse = (x.double() - y.double()).square().flatten(1).mean(1)
    floor = data_range ** 2 * 10.0 ** (-PSNR_CAP_DB / 10)
    return 10.0 * torch.log10(data_range ** 2 / mse.clamp_min(floor))


def l1(x, y):
    """Mean absolute difference per image -> (B,)."""
    _check_pair(x, y)
    return (x.double() - y.double()).abs().flatten(1).mean(1)


def image_metrics(output, target):
    """{"l1", "psnr", "ssim"}: per-image (B,) float64 CPU tensors of images in [-1, 1]."""
    a, b = ((t.detach().float().clamp(-1, 1) + 1) / 2 for t in (output, target))
    return {"l1": l1(a, b).cpu(), "psnr": psnr(a, b).cpu(), "ssim": ssim(a, b).cpu()}


# -- feature statistics (FID) ----------------------------------------------------------------------

class GaussianStatistics:
    """Running mean and covariance of feature vectors, accumulated in float64."""

    def __init__(self):
        self.count, self._sum, self._outer = 0, None, None

    def add(self, features):
        features = features.detach().double().cpu().reshape(features.shape[0], -1)
        if self._sum is None:
            self._sum = torch.zeros(features.shape[1], dtype=torch.float64)
            self._outer = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64)
        self.count += features.shape[0]
        self._sum += features.sum(0)
        self._outer += features.T @ features

    def mean_and_covariance(self):
        """(mean (D,), unbiased covariance (D, D)); needs at least 2 vectors."""
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.count}")
        mean = self._sum / self.count
        covariance = (self._outer - self.count * torch.outer(mean, mean)) / (self.count - 1)
        return mean, covariance


def _sqrt_psd(matrix):
    values, vectors = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(mean_a, cov_a, mean_b, cov_b):
    """Fréchet distance between N(mean_a, cov_a) and N(mean_b, cov_b):

        |mean_a - mean_b|^2 + tr(cov_a) + tr(cov_b) - 2 tr((cov_a cov_b)^(1/2)).

    ``tr((A B)^(1/2))`` is computed as the sum of the square roots of the eigenvalues of the
    symmetric ``A^(1/2) B A^(1/2)`` (which has the same spectrum as ``A B``), so no non-symmetric
    matrix square root and no complex parts are needed. float64.
    """
    mean_a, cov_a, mean_b, cov_b = (torch.as_tensor(t, dtype=torch.float64) for t in (mean_a, cov_a, mean_b, cov_b))
    root_a = _sqrt_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    cross = torch.linalg.eigvalsh(0.5 * (middle + middle.T)).clamp_min(0).sqrt().sum()
    return float((mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def cosine_similarity(a, b):
    """Cosine similarity of matching rows of (B, D) embeddings -> (B,) float64."""
    return F.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-12)

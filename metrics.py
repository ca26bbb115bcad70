"""
How good a VQGAN is: PSNR and SSIM of its reconstructions, the reconstruction FID (Inception-v3
features, the paper's Table 2 measure), pixel accuracy for semantic maps, codebook usage, and the
evaluation pass train_vqgan.py runs every eval_interval steps (sample.py --eval runs it too).
"""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw

from data import BUILT_IN_DATA, colourise, condition_input
from lpips_lite import download_imagenet_weights
from shape_score import score_canvas, score_image
from utils import autocast
from vqgan import codebook_usage, usage_from_counts


def psnr(x, x_hat):
    """Per-image PSNR in dB of images in [-1, 1], measured on the [0, 1] scale (peak 1)."""
    mse = ((x - x_hat).clamp(-2, 2) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def gaussian_window(size=11, sigma=1.5):
    """The (size, size) Gaussian weights SSIM averages with, summing to 1."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return torch.outer(g, g) / g.sum() ** 2


def ssim(x, y, size=11, sigma=1.5):
    """Per-image SSIM (Wang et al. 2004) of images in [-1, 1], measured on the [0, 1] scale like psnr.

    At every position of an 11x11 Gaussian window (sigma 1.5, no padding), per channel:
        (2 mu_x mu_y + C1) (2 cov_xy + C2) / ((mu_x^2 + mu_y^2 + C1) (var_x + var_y + C2))
    with C1 = (0.01 L)^2, C2 = (0.03 L)^2, L = 1 the peak; averaged over positions and channels.
    The first factor compares brightness, the second contrast and structure; 1 = identical.
    """
    if min(x.shape[-2:]) < size:
        raise ValueError(f"ssim needs images of at least {size}x{size} pixels, got {tuple(x.shape[-2:])}")
    x, y = (x.double() + 1) / 2, (y.double() + 1) / 2
    channels = x.shape[1]
    window = gaussian_window(size, sigma).to(x.device).expand(channels, 1, size, size)
    mean = lambda t: F.conv2d(t, window, groups=channels)  # local Gaussian-weighted mean, per channel
    mu_x, mu_y = mean(x), mean(y)
    var_x, var_y, cov_xy = mean(x * x) - mu_x ** 2, mean(y * y) - mu_y ** 2, mean(x * y) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = (2 * mu_x * mu_y + c1) * (2 * cov_xy + c2) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1).float()


def sqrtm_psd(a):
    """Square root of a symmetric positive semi-definite matrix, by eigendecomposition: V sqrt(W) V^T."""
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1, s1, mu2, s2):
    """FID's distance between Gaussians N(mu1, s1) and N(mu2, s2), in float64:
        d^2 = ||mu1 - mu2||^2 + tr(s1) + tr(s2) - 2 tr((s1 s2)^(1/2))
    s1 s2 is not symmetric, but it is similar to the symmetric PSD m = s1^(1/2) s2 s1^(1/2)
    (multiply by s1^(-1/2) and s1^(1/2)), so tr((s1 s2)^(1/2)) = the sum of the square roots of
    m's eigenvalues: two eigh calls, no scipy, no complex numbers."""
    mu1, s1, mu2, s2 = (t.double() for t in (mu1, s1, mu2, s2))
    r1 = sqrtm_psd(s1)
    m = r1 @ s2 @ r1
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return ((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * tr_covmean).item()


def fid(features_a, features_b):
    """Frechet distance between the Gaussians fitted to two sets of features (N, D)."""
    stats = [(f.double().mean(0), torch.cov(f.double().T)) for f in (features_a, features_b)]
    return frechet_distance(*stats[0], *stats[1])


def build_inception(pretrained=True):
    """torchvision's Inception-v3 up to its 2048-d average pool, FID's features; frozen, eval mode.

    pretrained: torchvision's ImageNet weights (downloaded on first use; offline, WeightsUnavailable
    with one line). Those are not the TF-Inception weights behind published FIDs (the paper's),
    so our FIDs compare with each other only. False: random weights (tests; offline comparisons).
    """
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=False)
    if not pretrained:
        # He init keeps the activations O(1) through the ~95 layers (BatchNorm in eval mode is the
        # identity here); torchvision's own random init (std 0.1) lets them grow to ~1e12.
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    else:
        sd = download_imagenet_weights(torchvision.models.Inception_V3_Weights.IMAGENET1K_V1,
                                       "Inception-v3 ImageNet weights for FID",
                                       "evaluate with --pretrained=false (random weights: figures comparable only "
                                       "with other --pretrained=false runs)")
        net.load_state_dict({k: v for k, v in sd.items() if not k.startswith("AuxLogits.")})
    net.fc = nn.Identity()  # the 2048 pooled features instead of the 1000 class logits
    return net.eval().requires_grad_(False)


def inception_features(net, x):
    """Images (B, 3, H, W) in [-1, 1] -> (B, 2048) float64. These weights were converted from
    Google's, which expect inputs in [-1, 1] (torchvision's transform_input=True would rescale
    ImageNet-normalised inputs to that range; ours are already there), at 299x299."""
    x = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
    return net(x).double()


def pixel_accuracy(logits, one_hot):
    """Per-map fraction of pixels whose most likely class is the true one: logits and one-hot
    maps (B, C, H, W) -> (B,)."""
    return (logits.argmax(1) == one_hot.argmax(1)).float().flatten(1).mean(1)


@torch.no_grad()
def evaluate(model, lpips, val_set, config, device, dtype, inception=None):
    # inception: a build_inception() network, for the reconstruction FID (val_fid); None skips it
    model.eval()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(val_set, range(min(len(val_set), config["eval_images"]))),
                                         batch_size=config["batch_size"], num_workers=config["num_workers"])
    l1, ps, lp, acc, all_indices, first = [], [], [], [], [], None
    ss, real, fake, clean = [], [], [], []
    scored = config["data"] in BUILT_IN_DATA and config["condition"] == ""  # shape_score.py applies
    for batch in loader:
        x = condition_input(batch, config).to(device)
        with autocast(device, dtype):
            x_hat, indices, _ = model(x)
        if config["condition"] == "semantic":  # class accuracy; the PNG shows the maps in colour
            acc.append(pixel_accuracy(x_hat.float(), x))
            x, x_hat = colourise(x.argmax(1)), colourise(x_hat.argmax(1))
        else:
            x_hat = x_hat.float().clamp(-1, 1)  # measure the image a person sees (the PNG is clamped too)
            l1.append((x - x_hat).abs().flatten(1).mean(1))
            ps.append(psnr(x, x_hat))
            if lpips is not None:
                lp.append(lpips(x, x_hat).float())
            if min(x.shape[-2:]) >= 11:  # SSIM's window
                ss.append(ssim(x, x_hat))
            if scored:
                clean += clean_shapes(x_hat.cpu(), config["data"], config["image_size"])
            if inception is not None:
                real.append(inception_features(inception, x))
                fake.append(inception_features(inception, x_hat))
        all_indices.append(indices.flatten())
        first = first if first is not None else (x[:8].cpu(), x_hat[:8].cpu())
    model.train()
    usage, perplexity = codebook_usage(torch.cat(all_indices), model.n_codes)
    if acc:
        metrics = dict(val_accuracy=torch.cat(acc).mean().item())
    else:
        metrics = dict(val_l1=torch.cat(l1).mean().item(), val_psnr=torch.cat(ps).mean().item(),
                       val_lpips=torch.cat(lp).mean().item() if lp else float("nan"),
                       val_ssim=torch.cat(ss).mean().item() if ss else float("nan"))
    metrics.update(val_usage=usage, val_perplexity=perplexity)
    if scored:
        metrics["val_clean"] = sum(clean) / max(1, len(clean))
    if inception is not None:
        metrics["val_fid"] = fid(torch.cat(real), torch.cat(fake))
    return metrics, first


def clean_shapes(images, data, image_size):
    """The built-in score (shape_score.py) of images of the built-in data -> one bool per shape:
    for 'shapes' one per image, for 'scenes' each shape wholly inside the crop. The reconstructions'
    share is the ceiling of what a GPT over this VQGAN can score."""
    if data == "shapes":
        return [score_image(x)[0] for x in images]
    return [shape[0] for x in images for shape in score_canvas(x, image_size)["shapes"]]


def save_usage_histogram(counts, path, what, width=512, height=160):
    """Bar chart of code counts (K,), codes sorted from most to least used, as a PNG with a caption.
    A flat profile is a healthy codebook; a cliff after a few codes is collapse."""
    counts = counts.double()
    used, (_, perplexity) = int((counts > 0).sum()), usage_from_counts(counts)
    # one bar per pixel column: the mean count of the codes falling in it (K > width) or a repeat (K < width)
    bars = F.interpolate(counts.sort(descending=True).values.view(1, 1, -1), size=width, mode="area").view(-1)
    bar_px = (bars / bars.max().clamp_min(1) * height).round().long()
    rows = torch.arange(height).view(-1, 1)
    chart = torch.where(rows >= height - bar_px.view(1, -1), 60, 255).to(torch.uint8)  # dark bars on white
    image = Image.new("L", (width, height + 30), 255)
    image.paste(Image.fromarray(chart.numpy()), (0, 30))
    ImageDraw.Draw(image).text((4, 2), f"code usage, {what}: {used}/{len(counts)} codes used, perplexity "
                                       f"{perplexity:.1f}\ncodes sorted by count; tallest bar {int(counts.max())}", fill=0)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    image.save(path)
    return path

"""
LPIPS (VGG16 variant) in one small file: the perceptual loss VQGAN uses in L_rec.

LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric") compares two images through a frozen ImageNet classifier: run both through VGG16,
take five intermediate feature maps, unit-normalise every feature vector, square the
difference, weight the channels with learned non-negative 1x1 weights, average over space and
sum over the five layers. One number per image; 0 for identical images.

Module layout (lin0..lin4, net.slice1..5 keeping torchvision's layer indices, scaling_layer)
is chosen so that the state-dict keys equal those of an official taming VQGAN checkpoint's
`loss.perceptual_loss.*` and of the `lpips` package's vgg.pth, by plain prefix stripping.
"""

import importlib.util
import pickle
import socket
import urllib.error
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn

# channels of the five tapped layers relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
CHANNELS = (64, 128, 256, 512, 512)
# VGG16 "D" config up to relu5_3: numbers are 3x3 conv widths (each followed by a ReLU), "M" a 2x2
# max-pool. Written out here (instead of building torchvision's vgg16()) because vgg16() also
# allocates and initialises the 120M-parameter classifier we would throw away (~2 s, ~0.5 GB).
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# [start, end) of each slice in torchvision's vgg16().features indexing; each ends on a ReLU
SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
MIN_SIZE = 16  # 4 max-pools happen before relu5_3, so H and W must be >= 2**4
DOWNLOAD_TIMEOUT = 60.0  # seconds per socket operation while fetching the VGG weights


class WeightsUnavailable(RuntimeError):
    """torchvision's ImageNet weights (VGG16 for LPIPS, Inception-v3 for FID) are not cached and
    could not be downloaded."""


# -----------------------------------------------------------------------------
# building blocks

class ScalingLayer(nn.Module):
    """Maps images in [-1, 1] to what ImageNet VGG expects. The odd constants are just ImageNet's
    mean/std re-expressed for [-1,1] inputs: mean = (shift+1)/2 = (.485,.456,.406) and
    std = scale/2 = (.229,.224,.225). Buffers (not constants) so they sit in the state dict,
    exactly as in the official checkpoints."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def forward(self, x):
        return (x - self.shift) / self.scale


class VGG16Features(nn.Module):
    """VGG16's conv trunk cut into five slices; forward returns the five ReLU outputs.
    Each slice is an nn.Sequential whose children are named by torchvision's global index
    (slice2 holds '4','5',...,'8'), so torchvision's 'features.5.weight' is our 'slice2.5.weight'."""

    def __init__(self):
        super().__init__()
        layers, in_ch = [], 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                # not inplace: a tapped ReLU output must survive untouched for the loss
                layers += [nn.Conv2d(in_ch, v, kernel_size=3, padding=1), nn.ReLU()]
                in_ch = v
        for k, (a, b) in enumerate(SLICES, start=1):
            self.add_module(f"slice{k}", nn.Sequential(OrderedDict((str(i), layers[i]) for i in range(a, b))))
        # the same random init torchvision's VGG uses; only matters for pretrained=False
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def load_torchvision_features(self, sd):
        """Load torchvision-indexed weights ('5.weight', ...) into the slice holding that index."""
        slice_of = {i: k for k, (a, b) in enumerate(SLICES, start=1) for i in range(a, b)}
        self.load_state_dict({f"slice{slice_of[int(k.split('.')[0])]}.{k}": v for k, v in sd.items()})  # strict

    def forward(self, x):
        feats = []
        for k in range(1, 6):
            x = getattr(self, f"slice{k}")(x)
            feats.append(x)
        return feats


class NetLin(nn.Module):
    """A non-negative 1x1 conv from C channels to 1, no bias. Why the nn.Identity at index 0: the
    original (with its dropout option on, as taming uses it) has an nn.Dropout there, so the weight
    lives at 'model.1.weight'; we keep that key but no dropout (this module is never trained here)."""

    def __init__(self, channels):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))
        nn.init.ones_(self.model[1].weight)  # all ones = the paper's un-learned "baseline" LPIPS

    def forward(self, x):
        return self.model(x)


def normalize_channels(x, eps=1e-10):
    # unit length along channels at every position, so only the *direction* of the feature vector
    # counts, not its magnitude (which varies wildly between layers). eps keeps 0/0 away; it sits
    # outside the sqrt as in the original. Where a whole vector is 0 the sqrt's backward gives 0/0,
    # but every tapped layer is a ReLU output, whose backward masks those positions to 0 anyway.
    return x / (torch.sqrt(torch.sum(x ** 2, dim=1, keepdim=True)) + eps)


# -----------------------------------------------------------------------------
# weight loading

def find_lpips_package_weights():
    """Path to vgg.pth inside an installed `lpips` package, or None. find_spec locates a top-level
    package without importing it: we only want one file, not to run lpips's code and imports."""
    spec = importlib.util.find_spec("lpips")
    folders = (spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / "weights" / "v0.1" / "vgg.pth"
        if path.is_file():
            return path
    return None


def download_imagenet_weights(weights, what, ways_out):
    """weights.get_state_dict() for a torchvision weights enum: downloaded once into
    torch.hub.get_dir()/checkpoints, read from that cache afterwards. Offline, one line naming
    `what` failed, where the cache is, and `ways_out`."""
    # torch.hub's download calls urlopen() without a timeout, so a network that silently drops
    # packets would hang here forever; bound every socket operation unless the user already did.
    old_timeout = socket.getdefaulttimeout()
    if old_timeout is None:
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        # only network failures: anything else (bad hash, full disk) keeps torch's own error
        reason = getattr(e, "reason", e)
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise WeightsUnavailable(
            f"cannot download torchvision's {what} ({type(e).__name__}: {reason}); "
            f"either connect once so torchvision caches them in {cache}, or {ways_out}") from e
    finally:
        socket.setdefaulttimeout(old_timeout)


def load_vgg16_imagenet_state_dict():
    """torchvision's VGG16 ImageNet weights (IMAGENET1K_V1), 'features.*' keys only."""
    from torchvision.models import VGG16_Weights

    sd = download_imagenet_weights(VGG16_Weights.IMAGENET1K_V1, "VGG16 ImageNet weights for LPIPS",
                                   "train with --perceptual_weight=0 (pure L1), or --lpips_pretrained=false "
                                   "(random VGG features, a weaker loss)")
    return {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}


def read_lin_weights(path):
    """Read and strictly check an LPIPS-format vgg.pth: exactly lin0..lin4.model.1.weight with
    shapes (1,C,1,1) and no negative entries. Anything else is a ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"LPIPS weights file not found: {path} (point --lpips_weights at an LPIPS vgg.pth, "
                         f"or leave it unset for all-ones weights)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a readable torch file ({first_line})") from e
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict of lin0..lin4 weights, got {type(sd).__name__}")
    expected = {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate(CHANNELS)}
    missing, extra = sorted(expected.keys() - sd.keys()), sorted(sd.keys() - expected.keys())
    if missing or extra:
        raise ValueError(f"{path}: not an LPIPS vgg.pth: missing keys {missing}, unexpected keys {extra[:5]}"
                         f"{' ...' if len(extra) > 5 else ''}")
    for key, shape in expected.items():
        w = sd[key]
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != shape:
            got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"{path}: {key} has shape {got}, expected {shape}")
        # negative weights would reward differences, i.e. not a distance any more
        if not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError(f"{path}: {key} has negative or non-finite entries (LPIPS weights must be >= 0)")
    return {k: sd[k].float() for k in expected}


# -----------------------------------------------------------------------------
# the metric

class LPIPS(nn.Module):
    """d = LPIPS()(x, y): x, y images in [-1, 1] of shape (B,3,H,W), H and W >= 16 -> d of shape (B,).
    pretrained: ImageNet VGG16 features (downloaded by torchvision on first use); False builds
        random VGG features: no download, a weaker loss (used by the tests).
    lin_weights: path to an LPIPS-format vgg.pth. If None and pretrained, the `lpips` package's
        copy is used when installed; otherwise all ones (the paper's un-learned baseline).
        The learned weights were fitted on ImageNet VGG features, so with pretrained=False they
        are only loaded when given explicitly.
    Always frozen and in eval mode; gradients still flow to the inputs (it is a loss)."""

    def __init__(self, pretrained=True, lin_weights=None):
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Features()
        for k, c in enumerate(CHANNELS):
            self.add_module(f"lin{k}", NetLin(c))

        if pretrained:
            self.net.load_torchvision_features(load_vgg16_imagenet_state_dict())
        if lin_weights is None and pretrained:
            lin_weights = find_lpips_package_weights()
        if lin_weights is not None:
            self.load_state_dict(read_lin_weights(lin_weights), strict=False)  # only lin keys; checked above
        else:
            print("lpips_lite: no learned LPIPS weights (vgg.pth) found, using all-ones 1x1 weights "
                  "(the paper's un-learned baseline); pass --lpips_weights=PATH or pip install lpips to change")

        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        # Pinned to eval: a parent's .train() recurses into children and would flip us otherwise.
        # VGG16 has no dropout or batch norm, so today eval vs train computes the same thing, but a
        # frozen metric must never change behaviour with the mode of the model it is grading
        # (swap in a backbone with BN and train mode would silently update its running stats).
        return super().train(False)

    @property
    def lins(self):
        return [getattr(self, f"lin{k}") for k in range(len(CHANNELS))]

    def forward(self, x, y):
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects two (B,3,H,W) images of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        if min(x.shape[-2:]) < MIN_SIZE:
            raise ValueError(f"LPIPS needs H, W >= {MIN_SIZE} (VGG pools 4 times before relu5_3), got {tuple(x.shape[-2:])}")
        # Two passes, not one over torch.cat([x, y]): as a loss, only y (the reconstruction) needs a
        # gradient, and with VGG frozen autograd then records nothing for x's pass. A concatenated
        # batch would carry x through VGG's backward too: a third more work for the loss.
        feats_x = self.net(self.scaling_layer(x))
        feats_y = self.net(self.scaling_layer(y))
        d = 0
        for fx, fy, lin in zip(feats_x, feats_y, self.lins):
            fx, fy = fx.float(), fy.float()  # fp32: a sum of 512 squares is coarse under bf16 autocast
            diff = (normalize_channels(fx) - normalize_channels(fy)) ** 2  # (B,C,h,w)
            # LPIPS distance: d = sum_l mean_hw sum_c w_lc * (fx_hat - fy_hat)^2_lc. The paper writes
            # ||w_l * (fx_hat - fy_hat)||^2; weighting the squared difference is the same thing with w
            # standing for w^2, which is why the stored weights must be >= 0.
            d = d + lin(diff.to(lin.model[1].weight.dtype)).mean(dim=(2, 3))  # (B,1)
        return d[:, 0]

"""
Train the VQGAN of Taming Transformers (Sec. 3.1): encoder, codebook and decoder against
L1 (+ LPIPS) + the VQ loss of Eq. (4), and, from `disc_start` on, a patch discriminator with the
hinge loss of Eq. (5) weighted by the adaptive lambda of Eq. (7).

    python train_vqgan.py                         # built-in shapes, a few minutes on a CPU
    python train_vqgan.py --data=~/photos --image_size=64 --perceptual_weight=1.0
    python train_vqgan.py --preset=paper --data=~/imagenet/train --batch_size=4
    python train_vqgan.py --help                  # every hyperparameter with its default

Writes out_dir/ckpt.pt (model, discriminator, both optimisers, step, config, RNG state),
out_dir/log.csv and out_dir/recon_XXXXXX.png (originals over reconstructions).
This file also holds the small utilities the other scripts share (flag parsing, device,
checkpoints, data), so the data path stays one straight line: train_vqgan -> train_gpt -> sample.
"""

import csv
import math
import os
import random
import sys
import time
import warnings
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from PIL import Image, ImageDraw
from tqdm import tqdm

from lpips_lite import LPIPS, WeightsUnavailable, download_imagenet_weights
from vqgan import (VQGAN, Discriminator, PAPER_CONFIG, adaptive_weight, codebook_usage, hinge_d_loss,
                   hinge_g_loss, init_codebook_with_kmeans, pixel_loss, restart_dead_codes, semantic_rec_loss,
                   usage_from_counts)

# -----------------------------------------------------------------------------
# Hyperparameters. Each can be overridden from the shell: --name=value. The defaults train on the
# built-in shapes in under 6 minutes on a 2-core CPU (see README for the measured figures).
CONFIG = dict(
    # data
    data="shapes",            # 'shapes' (built in, no download), a folder of images, or cifar10 / mnist / celeba
    data_root="data",         # where torchvision datasets are downloaded to
    image_size=32,            # training images are resized/cropped to this many pixels square
    val_fraction=0.05,        # share of a folder held out for validation (torchvision sets use their official split)
    num_workers=0,            # DataLoader worker processes; shapes are generated faster in the main process
    # model (the paper: ch 128, ch_mult 1,1,2,2,4, 2 res blocks, attention at 16, z/embed 256, K 1024)
    ch=32,                    # base channel count; level i has ch * ch_mult[i] channels
    ch_mult=(1, 2, 2),        # one entry per resolution level; f = 2^(len-1): 32x32 images -> 8x8 tokens
    num_res_blocks=1,         # ResnetBlocks per level in the encoder (the decoder has one more)
    attn_resolutions=(),      # feature-map sizes that get a self-attention block (besides the middle one, always
                              # there). () for shapes: attention at 8 too cost 15% of a step and gained nothing
    z_channels=64,            # encoder output channels
    embed_dim=8,              # n_z: dimension of each codebook vector (small: codes are used more evenly)
    n_codes=256,              # K: codebook size = the GPT's vocabulary of image tokens
    beta=0.25,                # commitment weight of Eq. (4)
    # codebook health: later fixes for unused codes; all off = the paper's quantizer
    code_dim=0,               # 0 = look codes up in the embed_dim space (paper); D > 0 = 1x1 projections to D dims and back
    l2_codes=False,           # l2-normalise encoder output and codes before the lookup (cosine similarity, ViT-VQGAN)
    kmeans_init=False,        # initialise the codebook with k-means on the first batches' encoder outputs
    dead_code_restart=0,      # N > 0: a code unused for N steps is reset to a random recent encoder output (0 = off)
    # loss
    pixel_loss="l2",          # pixel term of L_rec: 'l2' = (x - x_hat)^2, Eq. (4) as the paper writes it, and what
                              # PSNR measures (+0.9 dB on shapes); 'l1' = |x - x_hat|, the official code (paper preset)
    perceptual_weight=0.0,    # LPIPS weight in L_rec. Off for shapes: VGG16 weights are a download, and
                              # on flat synthetic shapes the pixel loss alone already gives sharp edges. 1.0 for photos.
    lpips_pretrained=True,    # False: random VGG features (works offline, but a much weaker perceptual loss)
    lpips_weights="",         # path to an LPIPS vgg.pth with the learned 1x1 weights ('' = find or use ones)
    disc_start=1900,          # step at which the discriminator starts; before it, D neither trains nor runs
    disc_weight=0.1,          # multiplies the adaptive lambda of Eq. (7). Official configs: 0.8, next to LPIPS;
                              # with L1 alone on shapes, 0.8 lets D trade ~3 dB of PSNR for texture in minutes
    adaptive_lambda=True,     # False: lambda = disc_weight, fixed, instead of Eq. (7) (an experiment: see README)
    disc_ndf=32,              # discriminator base width (paper 64; 32 is plenty for 32x32 shapes)
    disc_layers=3,            # stride-2 conv blocks in D (paper 3); needs image_size >= 3 * 2^disc_layers
    # optimisation
    batch_size=16,
    max_steps=2200,           # total generator steps (about 5 3/4 minutes on a 2-core CPU)
    lr=2e-3,                  # Adam learning rate for both G and D (paper: 4.5e-6 x batch size, for 256x256)
    warmup_steps=100,         # cosine only: a linear warm-up first; at lr 2e-3 Adam's first, noisy steps can wreck a run
    lr_schedule="cosine",     # 'cosine': decay to lr / 10 by max_steps (+0.6 dB on shapes in the same steps);
                              # 'constant': the official code's fixed lr (the paper preset)
    # logging and checkpoints
    out_dir="out/vqgan",
    eval_interval=500,        # validate, save a reconstruction grid and the checkpoint every this many steps
    eval_images=256,          # validation images per evaluation
    preset="",                # 'paper': the paper's configuration (256x256, f16, K=1024, LPIPS, D from 10k)
    device="auto",            # auto = cuda, then mps, then cpu
    dtype="auto",             # auto = bf16 autocast on CUDA (fp16 + GradScaler without bf16), fp32 elsewhere
    seed=0,
    resume=False,             # continue from out_dir/ckpt.pt exactly where it stopped
    # speed and memory; under torchrun batch_size is per process
    compile=False,            # wrap the models in torch.compile (slow first steps, faster after; needs a C++ compiler)
    grad_checkpointing=False, # recompute encoder/decoder blocks in backward instead of storing their activations
    # spatial conditioning: a condition VQGAN, whose index grid the spatial GPT is conditioned on
    condition="",             # '' = the image VQGAN; 'semantic' = one-hot semantic maps in, per-pixel class logits
                              # out, cross-entropy + VQ loss (no L1/LPIPS/GAN); 'lowres' = images downsampled
                              # by lowres_factor, the usual losses
    lowres_factor=4,          # condition=lowres: the images are downsampled by this factor (the paper's SR used 8)
    cond_data="",             # condition=semantic with --data=PATH: a parallel folder of label PNGs (same names, .png)
    cond_classes=0,           # condition=semantic: number of classes incl. background (0 = the shapes' 4; a folder needs it)
)

# --preset=paper: the paper's VQGAN (custom_vqgan.yaml). lr becomes 4.5e-6 x batch_size unless given.
PAPER_PRESET = dict(PAPER_CONFIG, image_size=256, pixel_loss="l1", perceptual_weight=1.0, disc_start=10000,
                    disc_weight=0.8, lr_schedule="constant", disc_ndf=64, batch_size=4, max_steps=500000,
                    eval_interval=2000, eval_images=64)

# Model keys: these must match a checkpoint we resume from.
MODEL_KEYS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "embed_dim", "n_codes", "condition",
              "cond_classes", "lowres_factor",
              "disc_ndf", "disc_layers", "code_dim", "l2_codes")

# -----------------------------------------------------------------------------
# Shared utilities: flags, device, precision, checkpoints


def parse_overrides(defaults, argv, source_file):
    """--name=value flags -> {name: value} with the type of the default. Errors are one line."""
    out = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print_help(source_file)
            sys.exit(0)
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"error: cannot read {arg!r}: flags look like --name=value (see --help)")
        name, value = arg[2:].split("=", 1)
        if name not in defaults:
            raise SystemExit(f"error: unknown flag --{name} (see --help for the list)")
        out[name] = convert_value(name, value, defaults[name])
    return out


def convert_value(name, value, default):
    try:
        if isinstance(default, bool):  # before int: bool is a subclass of int
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if isinstance(default, tuple):
            return tuple(int(v) for v in value.split(",") if v.strip())
        return type(default)(value)
    except ValueError:
        kind = "true or false" if isinstance(default, bool) else \
            "comma-separated integers like 1,2,2" if isinstance(default, tuple) else f"a {type(default).__name__}"
        raise SystemExit(f"error: --{name}={value} is not {kind} (default: {format_value(default)})") from None


def format_value(v):
    return ",".join(str(x) for x in v) if isinstance(v, tuple) else str(v)


def print_help(source_file):
    # The hyperparameters are documented once, where they are defined: print that block.
    lines = open(source_file).read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("CONFIG = dict("))
    end = next(i for i in range(start, len(lines)) if lines[i] == ")")
    print(f"usage: python {os.path.basename(source_file)} [--name=value ...]\n")
    print("\n".join(lines[start + 1:end]))


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device={name} but CUDA is not available here (use --device=auto or cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("error: --device=mps but MPS is not available here (use --device=auto or cpu)")
    if name != "cpu" and not name.startswith("cuda") and name != "mps":
        raise SystemExit(f"error: --device={name} is not one of auto, cpu, cuda, cuda:N, mps")
    return torch.device(name)


def pick_dtype(name, device):
    """The autocast dtype, or None for plain fp32."""
    if name == "auto":
        if device.type != "cuda":
            return None  # CPU: fp32 is fastest and exact; MPS: keep the simple, known-good path
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    choices = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in choices:
        raise SystemExit(f"error: --dtype={name} is not one of auto, float32, bfloat16, float16")
    if choices[name] is not None and device.type != "cuda":
        raise SystemExit(f"error: --dtype={name} needs a CUDA device (use --dtype=auto on {device.type})")
    return choices[name]


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def setup_ddp(device_name):
    """-> (ddp, rank, world_size, device). torchrun sets RANK, LOCAL_RANK and WORLD_SIZE in each
    process it starts; without them this is a plain single-process run and nothing changes."""
    if "RANK" not in os.environ:
        return False, 0, 1, pick_device(device_name)
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device = pick_device(device_name)
    if device.type == "mps":
        raise SystemExit("error: torchrun needs CUDA (nccl) or the CPU (gloo), not MPS (use --device=cpu)")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per process
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True, rank, world_size, device


def wrap_for_training(module, config, ddp, device):
    """The module the training step calls: torch.compile'd and/or DDP-wrapped as asked. It shares
    its parameters with `module`, which stays the one to save, evaluate and sample with (plain
    state-dict keys, no collective operations)."""
    if config["compile"]:
        # Eq. (7) takes gradients of the same graph twice (retain_graph=True), which compiled
        # backward functions refuse while they reuse ("donate") their buffers: keep them their own.
        torch._functorch.config.donated_buffer = False
        module = torch.compile(module)
    if ddp:
        # DDP averages the gradients over the processes during backward
        module = torch.nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    return module


def unwrap_ddp(module):
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


def unwrap(module):
    """The plain module inside DDP and torch.compile wrappers."""
    return getattr(unwrap_ddp(module), "_orig_mod", unwrap_ddp(module))  # torch.compile keeps it as _orig_mod


def save_checkpoint(obj, path):
    # Write to a temp file, then rename: a crash mid-write never leaves a half-written ckpt.pt.
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, kind):
    """Load one of this project's checkpoints, safely (tensors and plain values only)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at {path} (train one first, or give the right path)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"error: {path} is not a checkpoint this project can load safely ({first_line[:200]})")
    return check_kind(ckpt, path, kind)


def check_kind(ckpt, path, kind):
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        found = ckpt.get("kind", "unknown") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise SystemExit(f"error: {path} is a {found} checkpoint, not a {kind} checkpoint (check the path)")
    return ckpt


class Inert:
    """Stands in for every Python object an official checkpoint pickles around its tensors
    (Lightning callbacks, OmegaConf configs, ...): it accepts any arguments and state and does
    nothing with them."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def load_checkpoint_file(path):
    """torch.load(weights_only=True) that also reads the official Lightning checkpoints.

    Those pickle Lightning and OmegaConf objects beside the state dict, which weights_only=True
    refuses, and unpickling them for real could run any code the file names. Instead we
    allow-list exactly the globals the file names, each mapped onto an `Inert` stand-in: the
    tensors load as usual, the rest become empty shells, and nothing from the file ever runs.
    (Lightning and OmegaConf need not be installed either.)"""
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at {path} (download or train one first, or give the right path)")
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - not a zip checkpoint: torch.load below gives the reason
        names = []
    stand_ins = [(type(name.rsplit(".", 1)[-1], (Inert,), {}), name) for name in names]
    try:
        with torch.serialization.safe_globals(stand_ins):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        # also where torch refuses a stand-in outright (globals from os, subprocess, ... are blocked)
        raise SystemExit(f"error: {path} could not be loaded safely as a PyTorch checkpoint ({_last_line(e)})") from None
    if names:
        print(f"note: {path} pickles {len(names)} Python class(es) besides tensors (e.g. {names[0]}); "
              f"they were loaded as inert stand-ins, none of their code ran")
    return ckpt


def _last_line(e):
    # torch's weights_only errors put the reason (the refused global) at the end
    lines = [line for line in str(e).strip().splitlines() if line.strip() and not line.startswith("Check the doc")]
    return (lines or [type(e).__name__])[-1][:200]


def first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def official_state_dict(ckpt, path):
    """The state dict inside an official Lightning checkpoint ({"state_dict": {...}, ...})."""
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise SystemExit(f"error: {path} holds no state dict of tensors (is it a taming-transformers checkpoint?)")
    return sd


def load_official_state_dict(path):
    """The state dict of an official taming-transformers checkpoint, loaded safely (see
    load_checkpoint_file)."""
    return official_state_dict(load_checkpoint_file(path), path)


def config_to_resume(overrides, out_dir, kind, model_keys):
    """The config saved in out_dir/ckpt.pt, after checking that no flag changes the model's shape."""
    saved = load_checkpoint(os.path.join(out_dir, "ckpt.pt"), kind)["config"]
    plain = lambda v: list(v) if isinstance(v, tuple) else v  # checkpoints store tuples as lists
    changed = [k for k in model_keys if k in overrides and plain(overrides[k]) != saved.get(k)]
    if changed:
        raise SystemExit(f"error: --resume with a different {', '.join(changed)} than the checkpoint "
                         f"(drop those flags, or train a new model with another --out_dir)")
    return saved


def vqgan_from_checkpoint(ckpt):
    model = VQGAN(**ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    return model


# -----------------------------------------------------------------------------
# Data: built-in shapes, a folder of images, or a torchvision dataset. Every dataset yields images as
# float32 (3, H, W) in [-1, 1], the range the VQGAN works in.

SHAPE_NAMES = ("circle", "square", "triangle")
NUM_SHAPE_CLASSES = len(SHAPE_NAMES)
# 8 colours far apart in RGB, so that a colour is never ambiguous even after a blurry reconstruction.
PALETTE = (
    (0, 0, 0),        # black
    (255, 255, 255),  # white
    (230, 25, 25),    # red
    (25, 180, 25),    # green
    (30, 60, 230),    # blue
    (250, 220, 0),    # yellow
    (0, 200, 220),    # cyan
    (200, 0, 200),    # magenta
)
SHAPE_SIZE_RANGE = (0.35, 0.80)  # side / diameter as a fraction of the image: small VQGANs learn these in minutes
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
DATA_HELP = "give a folder of images, or --data=shapes for the built-in data"


def palette_tensor():
    return torch.tensor(PALETTE, dtype=torch.float32) / 127.5 - 1.0  # uint8 0..255 -> [-1, 1]


def _shape_mask(kind, cx, cy, size, xs, ys):
    # Hard-edged test on pixel centres: the same boolean mask paints the image and the
    # semantic map, so the two can never disagree.
    half = size / 2
    if kind == 0:  # circle of diameter `size`
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= half ** 2
    if kind == 1:  # axis-aligned square of side `size`
        return (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    # upright isosceles triangle, `size` wide and high: it widens linearly from the apex down
    depth = (ys - (cy - half)) / size
    return (depth >= 0) & (depth <= 1) & (np.abs(xs - cx) <= half * depth)


class ShapesDataset(torch.utils.data.Dataset):
    """One flat shape on a flat background, drawn from (seed, index) when asked: no files.

    Item -> (image float32 (3, S, S) in [-1, 1], label int (index into SHAPE_NAMES),
    semantic map long (S, S): 0 background, 1 + label on the shape).
    """

    def __init__(self, num_items, image_size=32, seed=0):
        if image_size < 8:
            raise ValueError(f"ShapesDataset: image_size must be >= 8, got {image_size}")
        if num_items < 1 or seed < 0:
            raise ValueError(f"ShapesDataset: need num_items >= 1 and seed >= 0, got {num_items}, {seed}")
        self.num_items, self.image_size, self.seed = num_items, image_size, seed
        centres = np.arange(image_size) + 0.5
        self.ys, self.xs = np.meshgrid(centres, centres, indexing="ij")
        self.colours = palette_tensor()
        self.random_flip, self.num_classes = False, NUM_SHAPE_CLASSES  # read by train_gpt.py

    def __len__(self):
        return self.num_items

    def __getitem__(self, index):
        if not 0 <= index < self.num_items:
            raise IndexError(f"index {index} out of range for {self.num_items} shapes")
        # A private generator per item: the same (seed, index) gives the same image in any
        # process, in any order, whatever else touched the global RNGs (DataLoader workers too).
        rng = np.random.default_rng([self.seed, index])
        label = int(rng.integers(NUM_SHAPE_CLASSES))
        background = int(rng.integers(len(PALETTE)))
        colour = (background + int(rng.integers(1, len(PALETTE)))) % len(PALETTE)  # never the background
        s = self.image_size
        size = s * rng.uniform(*SHAPE_SIZE_RANGE)
        cx, cy = rng.uniform(size / 2, s - size / 2, size=2)  # keeps the whole shape inside
        mask = torch.from_numpy(_shape_mask(label, cx, cy, size, self.xs, self.ys))
        image = torch.where(mask, self.colours[colour][:, None, None], self.colours[background][:, None, None])
        semantic = mask.long() * (1 + label)
        return image.contiguous(), label, semantic


def draw_scene(height, width, cell, seed=0):
    """A canvas of several shapes for spatial conditioning: one shape per cell x cell square (cell =
    the training size, so every shape has the size the models were trained on), one background
    colour. -> (image float32 (3, height, width) in [-1, 1], semantic map long (height, width)).
    Pixels outside the last whole cell are background."""
    rng = np.random.default_rng([seed, height, width])
    ys, xs = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    colours = palette_tensor()
    background = int(rng.integers(len(PALETTE)))
    image = colours[background][:, None, None].repeat(1, height, width)
    semantic = torch.zeros(height, width, dtype=torch.long)
    for top in range(0, height - cell + 1, cell):
        for left in range(0, width - cell + 1, cell):
            label = int(rng.integers(NUM_SHAPE_CLASSES))
            colour = (background + int(rng.integers(1, len(PALETTE)))) % len(PALETTE)
            size = cell * rng.uniform(*SHAPE_SIZE_RANGE)
            cx, cy = left + rng.uniform(size / 2, cell - size / 2), top + rng.uniform(size / 2, cell - size / 2)
            mask = torch.from_numpy(_shape_mask(label, cx, cy, size, xs, ys))
            image[:, mask] = colours[colour][:, None]
            semantic[mask] = 1 + label
    return image, semantic


def one_hot_map(semantic, n_classes):
    """Semantic maps long (B, H, W) -> the condition VQGAN's input, float one-hot (B, n_classes, H, W)."""
    if int(semantic.min()) < 0 or int(semantic.max()) >= n_classes:
        raise ValueError(f"class id out of range [0, {n_classes}): got ids {int(semantic.min())}..{int(semantic.max())}")
    return torch.nn.functional.one_hot(semantic, n_classes).permute(0, 3, 1, 2).float()


def downsample(images, factor):
    # The low-resolution condition: each factor x factor block averaged (a box filter, no aliasing
    # from skipped pixels). Sizes must be multiples of `factor`.
    return torch.nn.functional.avg_pool2d(images, factor)


def condition_input(batch, config):
    """A data batch (images, labels[, semantic maps]) -> what the VQGAN described by `config`
    (a train_vqgan config, e.g. a checkpoint's) encodes: the images, their one-hot semantic maps
    (condition='semantic') or their downsampled versions (condition='lowres')."""
    condition = config.get("condition", "")  # checkpoints from before spatial conditioning: image VQGANs
    if condition == "semantic":
        if len(batch) < 3:
            raise SystemExit("error: this data has no semantic maps (use --data=shapes, or a folder with --cond_data=LABELS)")
        return one_hot_map(batch[2], config["cond_classes"])
    if condition == "lowres":
        return downsample(batch[0], config["lowres_factor"])
    return batch[0]


def colourise(semantic):
    """Semantic maps long (B, H, W) -> RGB (B, 3, H, W) in [-1, 1] a person can look at:
    class k gets palette colour k (0 = background black, 1 white, 2 red, ...)."""
    return palette_tensor()[semantic % len(PALETTE)].permute(0, 3, 1, 2)


def show_condition(x, config):
    """A condition VQGAN's input or output -> RGB pictures in [-1, 1] at the image size: a semantic
    map (one-hot or logits) in colour, a low-resolution image enlarged with nearest neighbours."""
    if config.get("condition", "") == "semantic":
        return colourise(x.argmax(1))
    if config.get("condition", "") == "lowres":
        return torch.nn.functional.interpolate(x.clamp(-1, 1), scale_factor=config["lowres_factor"], mode="nearest")
    return x


def read_label_map(path, n_classes):
    """A label PNG (one channel: mode L or P, pixel value = class id) -> uint8 array (H, W), checked."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: no label PNG at {path} (every image needs a label map of the same name in --cond_data)")
    try:
        with Image.open(path) as img:
            img.load()
            mode, labels = img.mode, np.array(img)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for unreadable files
        raise SystemExit(f"error: {path} could not be read as a label PNG ({first_line(e)})") from None
    if mode not in ("L", "P"):
        raise SystemExit(f"error: {path} is a mode-{mode} image; a label map has one channel of class ids (mode L or P)")
    if int(labels.max()) >= n_classes:
        raise SystemExit(f"error: {path} has class id {int(labels.max())}, out of range for {n_classes} classes "
                         f"(ids 0..{n_classes - 1}; fix the map, or train with a larger --cond_classes)")
    return labels


class LabelledFolderDataset(torch.utils.data.Dataset):
    """Images of a folder with their semantic maps from a parallel folder of label PNGs:
    <cond_root>/<path relative to image_root, extension .png>. Item -> (image float32 (3, S, S)
    in [-1, 1], -1, semantic long (S, S)). Resized (the labels with nearest neighbours, so no id
    is blended into another) and centre-cropped, never randomly cropped or flipped: the image
    and its map stay aligned without a paired random transform. Every map is checked up front."""

    def __init__(self, files, image_root, cond_root, image_size, n_classes):
        self.files, self.n_classes = list(files), n_classes
        self.label_files = [os.path.join(cond_root, os.path.splitext(os.path.relpath(f, image_root))[0] + ".png")
                            for f in self.files]
        for image_file, label_file in zip(self.files, self.label_files):
            labels = read_label_map(label_file, n_classes)
            with Image.open(image_file) as img:
                if img.size != labels.shape[::-1]:
                    raise SystemExit(f"error: {label_file} is {labels.shape[1]}x{labels.shape[0]} but its image "
                                     f"{image_file} is {img.size[0]}x{img.size[1]} (a label map must match its image)")
        self.transform = image_transform(image_size, train=False)
        self.label_transform = T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.NEAREST),
                                          T.CenterCrop(image_size)])
        self.random_flip, self.num_classes = False, 0  # read by train_gpt.py

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        labels = Image.fromarray(read_label_map(self.label_files[index], self.n_classes))
        semantic = torch.from_numpy(np.array(self.label_transform(labels))).long()
        return self.transform(open_rgb(self.files[index])), -1, semantic


# -----------------------------------------------------------------------------
# a folder of images (--data=PATH)

def _is_image_name(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def open_rgb(path, min_size=1):
    """PIL image at `path` as RGB, fully decoded (so truncated files fail here, not later)."""
    with Image.open(path) as img:
        # JPEGs can decode at 1/2..1/8 scale for free; draft keeps both sides >= min_size.
        img.draft(None, (min_size, min_size))
        img.load()
        if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
            # Composite on white: plain convert("RGB") would show whatever colour hides under
            # transparent pixels (often black).
            rgba = img.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
        return img.convert("RGB")


def list_image_files(root):
    """Image files under `root` (recursively), sorted so every run sees the same order."""
    if not os.path.isdir(root):
        raise SystemExit(f"error: --data={root}: no such folder ({DATA_HELP})")
    files = []
    for folder, _, names in os.walk(root):
        files += [os.path.join(folder, n) for n in names if _is_image_name(n)]
    return sorted(files)


def find_images(root):
    """-> (good_files, bad_files). Each file is decoded once: Image.verify() misses truncated
    JPEG/BMP/GIF/TIFF files, and a bad file found mid-training would kill a long run."""
    files = list_image_files(root)
    good, bad = [], []
    for path in files:
        try:
            open_rgb(path)
            good.append(path)
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
            warnings.warn(f"skipping {path}: cannot read it as an image ({type(e).__name__}: {e})")
            bad.append(path)
    if bad:
        warnings.warn(f"skipped {len(bad)} of {len(files)} files that could not be read")
    if not good:
        raise SystemExit(f"error: --data={root}: no readable images found "
                         f"(extensions {' '.join(IMAGE_EXTENSIONS)}; {DATA_HELP})")
    return good, bad


def image_transform(image_size, train, flip=True):
    # Short side -> image_size keeps the aspect ratio; the crop then makes it square.
    # Random crop + flip multiply a small folder's variety; validation must be repeatable.
    steps = [T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True)]
    if train:
        steps += [T.RandomCrop(image_size)] + ([T.RandomHorizontalFlip()] if flip else [])
    else:
        steps += [T.CenterCrop(image_size)]
    # PIL resizes in uint8, so no bicubic overshoot; ToTensor gives [0, 1], Normalize -> [-1, 1].
    steps += [T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
    return T.Compose(steps)


class ImageFileDataset(torch.utils.data.Dataset):
    """Item -> (image float32 (3, S, S) in [-1, 1], label -1: a folder has no labels).

    RGBA and other transparent images are composited on white; grayscale and palette images
    become RGB. Augmentation (train=True) uses the global torch RNG, like any torchvision
    transform, so DataLoader workers each get their own random crops.
    """

    def __init__(self, files, image_size, train):
        self.files, self.image_size, self.train = list(files), image_size, train
        self.transform = image_transform(image_size, train)
        self.random_flip, self.num_classes = train, 0  # read by train_gpt.py's token cache

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        return self.transform(open_rgb(self.files[index], self.image_size)), -1


# -----------------------------------------------------------------------------
# torchvision datasets (--data=cifar10|mnist|celeba), downloaded to --data_root on first use

# name -> (torchvision.datasets class name, train split, val split, where its files go under
# data_root, whether a mirror image is still a valid sample). The class is looked up when used.
TORCHVISION_DATA = {
    "cifar10": ("CIFAR10", {"train": True}, {"train": False}, "cifar-10-batches-py", True),
    "mnist": ("MNIST", {"train": True}, {"train": False}, "MNIST/raw", False),  # mirrored digits are not digits
    "celeba": ("CelebA", {"split": "train"}, {"split": "valid"}, "celeba", True),
}


def _open_torchvision(name, data_root, split_kwargs):
    cls, where = getattr(torchvision.datasets, TORCHVISION_DATA[name][0]), TORCHVISION_DATA[name][3]
    kwargs = dict(split_kwargs, target_type=[]) if name == "celeba" else split_kwargs  # celeba: no class label
    try:
        return cls(data_root, download=False, **kwargs)  # already there: skip the download check
    except RuntimeError:  # torchvision's "Dataset not found or corrupted"
        pass
    try:
        return cls(data_root, download=True, **kwargs)
    except Exception as e:  # URLError, RuntimeError, missing gdown, disk full, ...
        reason = " ".join(str(e).split())[:200] or type(e).__name__  # one line, however torchvision words it
        raise SystemExit(
            f"error: --data={name}: download to {os.path.join(data_root, where)} failed ({reason}) "
            f"(connect to the internet once, or put the files there yourself, or use --data=shapes)")


class TorchvisionImages(torch.utils.data.Dataset):
    """Wraps a torchvision dataset: item -> (image float32 (3, S, S) in [-1, 1], label int or -1)."""

    def __init__(self, name, image_size, train, data_root="data"):
        split = TORCHVISION_DATA[name][1 if train else 2]
        self.base = _open_torchvision(name, data_root, split)
        self.transform = image_transform(image_size, train, flip=TORCHVISION_DATA[name][4])
        # read by train_gpt.py: the token cache stores both orientations of flipped data
        self.random_flip = train and TORCHVISION_DATA[name][4]
        self.num_classes = 0 if name == "celeba" else 10

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        img, label = self.base[index]
        label = label if isinstance(label, int) else -1  # celeba gives None (no class)
        return self.transform(img.convert("RGB")), label  # convert: MNIST is 1-channel


# -----------------------------------------------------------------------------

def _check_data_args(image_size, val_fraction):
    if not isinstance(image_size, int) or image_size < 8:
        raise SystemExit(f"error: --image_size={image_size}: must be an integer >= 8 (e.g. --image_size=32)")
    if not 0 < val_fraction < 1:
        raise SystemExit(f"error: --val_fraction={val_fraction}: must be between 0 and 1 (e.g. --val_fraction=0.05)")


def split_files(files, val_fraction, seed):
    """Seeded shuffle -> (train_files, val_files), at least one of each."""
    if len(files) < 2:
        raise SystemExit(f"error: found only {len(files)} readable image(s) (need at least 2: one to train, one to validate)")
    shuffled = list(files)
    random.Random(seed).shuffle(shuffled)
    n_val = min(len(files) - 1, max(1, round(len(files) * val_fraction)))
    return sorted(shuffled[n_val:]), sorted(shuffled[:n_val])


def make_datasets(data, image_size, val_fraction=0.05, seed=0, data_root="data",
                  num_shapes=50_000, num_val_shapes=512, cond_data="", cond_classes=0):
    """--data=shapes | cifar10 | mnist | celeba | PATH -> (train_ds, val_ds). With cond_data (a
    folder of label PNGs for --data=PATH), the items also carry their semantic maps."""
    _check_data_args(image_size, val_fraction)
    if data == "shapes":
        # Shapes cost nothing to store, so the training set can be large. The validation seed is
        # far from the training one, so no run's validation set is another nearby seed's train set.
        return (ShapesDataset(num_shapes, image_size, seed),
                ShapesDataset(num_val_shapes, image_size, seed + 1_000_003))
    if data in TORCHVISION_DATA:
        return (TorchvisionImages(data, image_size, True, data_root),
                TorchvisionImages(data, image_size, False, data_root))
    root = os.path.expanduser(data)
    good, _ = find_images(root)
    train_files, val_files = split_files(good, val_fraction, seed)
    if cond_data:
        cond_root = os.path.expanduser(cond_data)
        if not os.path.isdir(cond_root):
            raise SystemExit(f"error: --cond_data={cond_data}: no such folder (a folder of label PNGs named like the images)")
        return tuple(LabelledFolderDataset(files, root, cond_root, image_size, cond_classes)
                     for files in (train_files, val_files))
    return ImageFileDataset(train_files, image_size, True), ImageFileDataset(val_files, image_size, False)


def save_image_grid(images, path, nrow=8, padding=2):
    """images float (N, 3, H, W) in [-1, 1] -> PNG grid at `path`; returns `path`."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    images = (images.detach().float().cpu().clamp(-1, 1) + 1) / 2
    # grey padding: black would merge with black tiles
    torchvision.utils.save_image(images, path, nrow=nrow, padding=padding, pad_value=0.5)
    return path


# -----------------------------------------------------------------------------
# Training


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


def adam(params, lr, device):
    """Adam with the official VQGAN betas (0.5, 0.9). fused=True updates every parameter in one
    kernel instead of a Python loop over them: 3x faster on a CPU (9.4 -> 3.0 ms per step for the
    shapes VQGAN), the same update up to float rounding. (MPS keeps the loop: fused Adam arrived
    there later.)"""
    return torch.optim.Adam(params, lr=lr, betas=(0.5, 0.9), fused=device.type in ("cuda", "cpu"))


def lr_at(step, config):
    """The learning rate at `step`, shared by both training scripts: a linear warm-up over
    warmup_steps (Adam's first steps are noisy), then a cosine decay to a tenth of lr at max_steps.
    lr_schedule='constant' keeps lr fixed, as the official VQGAN does."""
    if config.get("lr_schedule", "cosine") == "constant":
        return config["lr"]
    warmup = config.get("warmup_steps", 0)
    if step < warmup:
        return config["lr"] * (step + 1) / warmup
    progress = (step - warmup) / max(1, config["max_steps"] - warmup)
    return config["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def step_batches(dataset, batch_size, seed, start_step, num_workers, rank=0, world_size=1):
    """Batches for steps start_step, start_step+1, ... in an order fixed by (seed, epoch).

    Because the order depends only on the step number, --resume sees exactly the batches the
    interrupted run would have seen, without storing any sampler state. Under torchrun each of
    the world_size processes takes every world_size-th index of the same shuffle (its shard,
    DistributedSampler); together their batches are exactly the single-process batch of
    batch_size x world_size. Works for any map-style dataset, the on-the-fly shapes included.
    """
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                                  seed=seed * 100003, drop_last=True)
    if len(sampler) < batch_size:
        raise SystemExit(f"error: the training set has {len(dataset)} images, fewer than --batch_size={batch_size}"
                         f"{f' x {world_size} processes' if world_size > 1 else ''}")
    per_epoch = len(sampler) // batch_size

    def indices():
        step, epoch, order = start_step, None, None
        while True:
            if step // per_epoch != epoch:
                epoch = step // per_epoch
                sampler.set_epoch(epoch)  # reseed: a new shuffle every epoch, the same one in every process
                order = list(sampler)
            k = step % per_epoch
            yield from order[k * batch_size:(k + 1) * batch_size]
            step += 1

    return iter(torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=indices(),
                                            num_workers=num_workers, drop_last=True))


def build_lpips(config, device):
    try:
        return LPIPS(pretrained=config["lpips_pretrained"], lin_weights=config["lpips_weights"] or None).to(device)
    except (WeightsUnavailable, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


def discriminator_on(step, config):
    # a semantic condition VQGAN never uses the GAN (its loss is cross-entropy + VQ); .get: callers
    # such as bench.py pass only the loss settings
    return step >= config["disc_start"] and config.get("condition", "") != "semantic"


def generator_step(model, disc, lpips, x, step, config):
    """Eq. (6) for E, G and the codebook. Returns the reconstruction and the logged numbers."""
    x_hat, indices, q_loss = model(x)
    if config.get("condition", "") == "semantic":  # x one-hot, x_hat per-pixel class logits
        rec_loss = semantic_rec_loss(x_hat, x)
        return rec_loss + q_loss, x_hat, indices, dict(rec=rec_loss.item(), q=q_loss.item(), lam=0.0)
    # L_rec: per-pixel L2 or L1, plus LPIPS per image broadcast over its pixels (the official nll).
    rec = pixel_loss(x, x_hat, config.get("pixel_loss", "l1"))  # .get: bench.py passes only the loss settings
    if lpips is not None and config["perceptual_weight"] > 0:
        rec = rec + config["perceptual_weight"] * lpips(x, x_hat).view(-1, 1, 1, 1)
    rec_loss = rec.mean()
    loss = rec_loss + q_loss  # Eq. (4): L_rec + codebook term + beta * commitment term
    lam = torch.zeros(())
    if discriminator_on(step, config):
        # D scores the reconstruction; D's own weights are frozen here, so this step moves G only.
        # (Past DDP's wrapper: frozen weights have no gradients to average, and its reducer would
        # wait for them.)
        g_loss = hinge_g_loss(unwrap_ddp(disc)(x_hat))
        # Eq. (7); under autocast the two gradients come from the same fp32 master weights.
        if config.get("adaptive_lambda", True):
            lam = adaptive_weight(rec_loss, g_loss, unwrap(model).last_layer) * config["disc_weight"]
        else:  # the ablation: a fixed weight, whatever the two gradients' sizes
            lam = torch.tensor(float(config["disc_weight"]), device=x.device)
        loss = loss + lam * g_loss  # Eq. (6): L_VQ + lambda * L_GAN
    return loss, x_hat, indices, dict(rec=rec_loss.item(), q=q_loss.item(), lam=lam.item())


def discriminator_step(disc, x, x_hat):
    # Eq. (5) for D on the *detached* reconstruction: the D step never reaches the generator.
    # Real and fake go through D separately, as officially, so BatchNorm sees one kind at a time.
    return hinge_d_loss(disc(x), disc(x_hat.detach()))


def train_step(model, disc, lpips, opt_g, opt_d, scaler, x, step, config, device, dtype):
    """One generator step, then (from disc_start on) one discriminator step on the same x_hat."""
    for group in opt_g.param_groups + opt_d.param_groups:
        group["lr"] = lr_at(step, config)
    disc.requires_grad_(False)  # the generator step must not leave gradients in D
    with autocast(device, dtype):
        loss, x_hat, indices, logs = generator_step(model, disc, lpips, x, step, config)
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt_g)
    scaler.update()

    logs["d"] = 0.0
    if discriminator_on(step, config):  # before disc_start D costs nothing: no forward, no backward
        disc.requires_grad_(True)
        with autocast(device, dtype):
            d_loss = discriminator_step(disc, x, x_hat)
        opt_d.zero_grad(set_to_none=True)
        scaler.scale(d_loss).backward()
        scaler.step(opt_d)
        scaler.update()
        logs["d"] = d_loss.item()
    return logs, indices



@torch.no_grad()
def evaluate(model, lpips, val_set, config, device, dtype, inception=None):
    # inception: a build_inception() network, for the reconstruction FID (val_fid); None skips it
    model.eval()
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(val_set, range(min(len(val_set), config["eval_images"]))),
                                         batch_size=config["batch_size"], num_workers=config["num_workers"])
    l1, ps, lp, acc, all_indices, first = [], [], [], [], [], None
    ss, real, fake = [], [], []
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
    if inception is not None:
        metrics["val_fid"] = fid(torch.cat(real), torch.cat(fake))
    return metrics, first


def append_log(path, row):
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def resolve_config(overrides):
    """Defaults <- preset <- (checkpoint config when resuming) <- command-line flags."""
    config = dict(CONFIG)
    preset = overrides.get("preset", "")
    if preset not in ("", "paper"):
        raise SystemExit(f"error: --preset={preset} is unknown (the only preset is 'paper')")
    if preset == "paper":
        config.update({k: tuple(v) if isinstance(v, list) else v for k, v in PAPER_PRESET.items() if k in config})
    if overrides.get("resume", False):
        config.update(config_to_resume(overrides, overrides.get("out_dir", config["out_dir"]), "vqgan", MODEL_KEYS))
    config.update(overrides)
    if preset == "paper" and "lr" not in overrides and not overrides.get("resume", False):
        # the paper's lr scaling rule, on the global batch (torchrun: batch_size per process)
        config["lr"] = 4.5e-6 * config["batch_size"] * int(os.environ.get("WORLD_SIZE", 1))
    check_config(config)
    return config


def check_config(c):
    f = 2 ** (len(c["ch_mult"]) - 1)
    positive = ["image_size", "ch", "num_res_blocks", "z_channels", "embed_dim", "batch_size", "max_steps",
                "eval_interval", "eval_images", "disc_ndf", "disc_layers"]
    for k in positive:
        if c[k] <= 0:
            raise SystemExit(f"error: --{k}={c[k]} must be positive")
    if c["n_codes"] < 2:
        raise SystemExit(f"error: --n_codes={c['n_codes']} must be at least 2")
    if not c["ch_mult"]:
        raise SystemExit("error: --ch_mult needs at least one level, e.g. --ch_mult=1,2,2")
    check_condition(c)
    size, what = input_size(c), "" if c["condition"] != "lowres" else f" / --lowres_factor={c['lowres_factor']}"
    if size % f:
        raise SystemExit(f"error: --image_size={c['image_size']}{what} = {size} is not a multiple of the downsampling "
                         f"factor f={f} (from --ch_mult); use a multiple of {f}")
    if size < 3 * 2 ** c["disc_layers"]:
        raise SystemExit(f"error: --image_size={c['image_size']}{what} = {size} is too small for a discriminator with "
                         f"--disc_layers={c['disc_layers']} (needs >= {3 * 2 ** c['disc_layers']}; lower --disc_layers)")
    if c["lr"] <= 0 or c["beta"] < 0 or c["perceptual_weight"] < 0 or c["disc_weight"] < 0:
        raise SystemExit("error: --lr must be positive and --beta, --perceptual_weight, --disc_weight non-negative")
    if c["lr_schedule"] not in ("cosine", "constant"):
        raise SystemExit(f"error: --lr_schedule={c['lr_schedule']} is unknown; use cosine or constant")
    if c["lr_schedule"] == "cosine" and not 0 <= c["warmup_steps"] < c["max_steps"]:
        raise SystemExit(f"error: --warmup_steps={c['warmup_steps']} must be at least 0 and below --max_steps="
                         f"{c['max_steps']} (e.g. --warmup_steps=0 for a short run)")
    if c["pixel_loss"] not in ("l2", "l1"):
        raise SystemExit(f"error: --pixel_loss={c['pixel_loss']} is unknown; use l2 or l1")
    if not 0 < c["val_fraction"] < 1:
        raise SystemExit(f"error: --val_fraction={c['val_fraction']} must be between 0 and 1")
    if c["code_dim"] < 0 or c["dead_code_restart"] < 0:
        raise SystemExit("error: --code_dim and --dead_code_restart must be 0 (off) or positive (e.g. --code_dim=8)")


def check_condition(c):
    """The spatial-conditioning flags; fills in cond_classes for the built-in shapes."""
    if c["condition"] not in ("", "semantic", "lowres"):
        raise SystemExit(f"error: --condition={c['condition']} is not one of semantic, lowres ('' = the image VQGAN)")
    folder = c["data"] != "shapes" and c["data"] not in TORCHVISION_DATA
    if c["cond_data"] and not (c["condition"] == "semantic" and folder):
        raise SystemExit("error: --cond_data is for --condition=semantic with --data=PATH (a folder of images)")
    if c["condition"] == "semantic":
        if c["data"] == "shapes":
            if c["cond_classes"] not in (0, 1 + NUM_SHAPE_CLASSES):
                raise SystemExit(f"error: --cond_classes={c['cond_classes']}: the shapes have {1 + NUM_SHAPE_CLASSES} "
                                 f"classes (background + {', '.join(SHAPE_NAMES)}); leave it at 0")
            c["cond_classes"] = 1 + NUM_SHAPE_CLASSES
        elif not c["cond_data"]:
            raise SystemExit(f"error: --condition=semantic needs semantic maps: --data=shapes, or --data=PATH with "
                             f"--cond_data=LABELS (--data={c['data']} has none)")
        if c["cond_classes"] < 2:
            raise SystemExit(f"error: --cond_classes={c['cond_classes']}: give the number of classes in the label "
                             f"PNGs, background included (at least 2)")
    if c["condition"] == "lowres" and (c["lowres_factor"] < 2 or c["image_size"] % c["lowres_factor"]):
        raise SystemExit(f"error: --lowres_factor={c['lowres_factor']} must be >= 2 and divide "
                         f"--image_size={c['image_size']}")


def input_size(config):
    # what the VQGAN sees: the images, or for a low-resolution condition their downsampled versions
    lowres = config.get("condition", "") == "lowres"
    return config["image_size"] // config["lowres_factor"] if lowres else config["image_size"]


def model_kwargs(config):
    # semantic condition: one input channel per class (one-hot), one output logit per class
    channels = config["cond_classes"] if config["condition"] == "semantic" else 3
    return dict(ch=config["ch"], ch_mult=config["ch_mult"], num_res_blocks=config["num_res_blocks"],
                attn_resolutions=config["attn_resolutions"], resolution=input_size(config),
                z_channels=config["z_channels"], embed_dim=config["embed_dim"], n_codes=config["n_codes"],
                beta=config["beta"], in_channels=channels, out_channels=channels,
                code_dim=config["code_dim"], l2_codes=config["l2_codes"])


KMEANS_POINTS_PER_CODE = 10  # --kmeans_init: encoder outputs gathered per code before k-means


@torch.no_grad()
def kmeans_init_codebook(model, train_set, config, device, dtype):
    """--kmeans_init: the codebook from k-means on the encoder outputs of the first training
    batches (the ones step 0, 1, ... will train on), in the lookup space."""
    tokens_per_batch = config["batch_size"] * (input_size(config) // model.downsample_factor) ** 2
    n_batches = -(-KMEANS_POINTS_PER_CODE * model.n_codes // tokens_per_batch)  # ceil
    batches = step_batches(train_set, config["batch_size"], config["seed"], 0, config["num_workers"])
    z_e = []
    for _ in tqdm(range(n_batches), desc="k-means init", leave=False):
        with autocast(device, dtype):
            x = condition_input(next(batches), config).to(device)  # what training feeds the encoder
            z_e.append(model.quant_conv(model.encoder(x)).float())
    init_codebook_with_kmeans(model.quantize, torch.cat(z_e))


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


def start_run(config):
    """What both training scripts start with: this process's place in a torchrun job (or a single
    process), its device and dtype, and the seed."""
    ddp, rank, world_size, device = setup_ddp(config["device"])
    torch.manual_seed(config["seed"])
    return ddp, rank, world_size, device, pick_dtype(config["dtype"], device)


def train(config):
    ddp, rank, world_size, device, dtype = start_run(config)
    master = rank == 0  # only this process writes checkpoints, images and logs
    train_set, val_set = make_datasets(config["data"], config["image_size"], config["val_fraction"],
                                       config["seed"], data_root=config["data_root"], cond_data=config["cond_data"],
                                       cond_classes=config["cond_classes"])

    model = VQGAN(**model_kwargs(config)).to(device)
    disc = Discriminator(ndf=config["disc_ndf"], n_layers=config["disc_layers"]).to(device)
    lpips = build_lpips(config, device) if config["perceptual_weight"] > 0 else None
    if config["grad_checkpointing"]:
        model.encoder.grad_checkpointing = model.decoder.grad_checkpointing = True
    if device.type == "cuda":  # channels-last: the layout cuDNN's fastest convolutions want
        model.to(memory_format=torch.channels_last)
        disc.to(memory_format=torch.channels_last)
    if ddp and device.type == "cuda":
        # D's BatchNorm normalises with the statistics of the whole batch, across processes.
        # (PyTorch's SyncBatchNorm runs on GPUs only: on the CPU each process uses its shard's.)
        disc = torch.nn.SyncBatchNorm.convert_sync_batchnorm(disc)
    # Two Adam optimisers with betas (0.5, 0.9) and no weight decay (official); lr follows lr_at.
    opt_g, opt_d = adam(model.parameters(), config["lr"], device), adam(disc.parameters(), config["lr"], device)
    # fp16 needs loss scaling (its small exponent range underflows gradients); bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    out_dir = config["out_dir"]
    ckpt_path, log_path = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "log.csv")
    step = 0
    if config["resume"]:
        ckpt = load_checkpoint(ckpt_path, "vqgan")
        model.load_state_dict(ckpt["model"])
        disc.load_state_dict(ckpt["disc"])
        opt_g.load_state_dict(ckpt["opt_g"])
        opt_d.load_state_dict(ckpt["opt_d"])
        step = ckpt["step"]
        torch.set_rng_state(ckpt["rng"])
        if master:
            print(f"resuming from {ckpt_path} at step {step}")
    elif config["kmeans_init"]:
        # Under torchrun every rank runs it (seconds, and it keeps the ranks' random streams in step);
        # wrapping the model in DDP below then copies rank 0's codebook to all of them.
        kmeans_init_codebook(model, train_set, config, device, dtype)
    os.makedirs(out_dir, exist_ok=True)
    # steps since each code was last chosen (--dead_code_restart), and code counts since the last
    # evaluation (the usage histogram); code_age is checkpointed so --resume stays exact
    code_age = ckpt["code_age"].to(device) if config["resume"] and "code_age" in ckpt else \
        torch.zeros(model.n_codes, dtype=torch.long, device=device)
    code_counts, restarts = torch.zeros(model.n_codes, dtype=torch.long, device=device), 0
    # what the training step calls (model and disc stay the plain modules, sharing the weights)
    train_model, train_disc = wrap_for_training(model, config, ddp, device), wrap_for_training(disc, config, ddp, device)

    def save():
        save_checkpoint(dict(kind="vqgan", model=model.state_dict(), model_config=model.config,
                             disc=disc.state_dict(), disc_config=disc.config, opt_g=opt_g.state_dict(),
                             opt_d=opt_d.state_dict(), step=step, config=config_for_checkpoint(config),
                             rng=torch.get_rng_state(), code_age=code_age.cpu()), ckpt_path)

    batches = step_batches(train_set, config["batch_size"], config["seed"], step, config["num_workers"], rank, world_size)
    bar = tqdm(total=config["max_steps"], initial=step, desc="vqgan", dynamic_ncols=True, disable=not master)
    model.train()
    disc.train()
    started = time.time()
    while step < config["max_steps"]:
        x = condition_input(next(batches), config).to(device)
        x = x.to(memory_format=torch.channels_last) if device.type == "cuda" else x
        logs, indices = train_step(train_model, train_disc, lpips, opt_g, opt_d, scaler, x, step, config, device, dtype)
        step += 1
        code_counts += torch.bincount(indices.flatten(), minlength=model.n_codes)
        if config["dead_code_restart"]:
            restarts += restart_dead_codes(model.quantize, indices, code_age, config["dead_code_restart"], opt_g)
        usage, _ = codebook_usage(indices, model.n_codes)
        bar.update(1)
        bar.set_postfix(rec=f"{logs['rec']:.3f}", q=f"{logs['q']:.3f}", d=f"{logs['d']:.3f}",
                        lam=f"{logs['lam']:.2f}", codes=f"{usage:.0%}")

        if master and (step % config["eval_interval"] == 0 or step == config["max_steps"]):
            metrics, (x0, x0_hat) = evaluate(model, lpips, val_set, config, device, dtype)
            grid = save_image_grid(torch.cat([x0, x0_hat]), os.path.join(out_dir, f"recon_{step:06d}.png"), len(x0))
            append_log(log_path, dict(step=step, time=round(time.time() - started, 1), **logs, **metrics))
            save()
            lpips_text = "" if math.isnan(metrics.get("val_lpips", math.nan)) else f", LPIPS {metrics['val_lpips']:.4f}"
            quality = (f"pixel accuracy {metrics['val_accuracy']:.2%}" if "val_accuracy" in metrics else
                       f"val L1 {metrics['val_l1']:.4f}, PSNR {metrics['val_psnr']:.2f} dB{lpips_text}")
            tqdm.write(f"step {step}: {quality}, codes used {metrics['val_usage']:.1%}, "
                       f"perplexity {metrics['val_perplexity']:.1f}; wrote {grid} and {ckpt_path}")
            if config["dead_code_restart"]:
                tqdm.write(f"dead-code restarts so far: {restarts}")
            if step == config["max_steps"]:
                first = step - (step - 1) % config["eval_interval"]  # first step these counts cover
                histogram = save_usage_histogram(code_counts.cpu(), os.path.join(out_dir, "code_usage.png"),
                                                 f"training steps {first}-{step}" + (", rank 0's batches" if ddp else ""))
                tqdm.write(f"wrote {histogram}")
            code_counts.zero_()
    bar.close()
    if ddp:
        dist.destroy_process_group()
    return model


def config_for_checkpoint(config):
    # Tuples become lists: checkpoints hold plain values that weights_only=True accepts.
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def main(argv):
    overrides = parse_overrides(CONFIG, argv, __file__)
    config = resolve_config(overrides)
    config = {k: tuple(v) if isinstance(CONFIG[k], tuple) else v for k, v in config.items()}
    train(config)


if __name__ == "__main__":
    main(sys.argv[1:])

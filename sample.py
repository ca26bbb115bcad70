"""
Sample images from a trained GPT (Sec. 3.2): write a grid of codebook indices token by token,
then decode it with the VQGAN in one pass.

    python sample.py                                   # out/gpt/ckpt.pt -> out/samples.png
    python sample.py --top_k=100 --temperature=0.9     # the official sampling controls
    python sample.py --class_label=2                   # class-conditional models: one class
    python sample.py --width=96                        # wider than trained: the sliding window
    python sample.py --complete=photo.png              # keep the top half, sample the rest
    python sample.py --gpt_ckpt=out/gpt_spatial/ckpt.pt --cond=scene   # spatial GPT: shapes where a map puts them
    python sample.py --gpt_ckpt=OFFICIAL_DEPTH.ckpt --cond=depth.png     # the official depth-to-image transformer
    python sample.py --animate=out/generation.gif      # also a GIF of the grid filling in, token by token
    python sample.py --reconstruct=photo.png --vqgan_ckpt=last.ckpt
                                                       # image | tokens | reconstruction, PSNR (own or official VQGAN)
    python sample.py --eval=true --vqgan_ckpt=out/vqgan/ckpt.pt
                                                       # L1, PSNR, SSIM, LPIPS, codebook usage, perplexity, FID
    python sample.py --sample_fid=true --num_samples=512  # FID of GPT samples against validation images

When the requested size's token grid is larger than the grid the GPT was trained on, every
token is sampled from a window of the trained size placed around it (the paper's sliding
window, Fig. 3; `window_start` in gpt.py), and the whole grid is decoded at the end: the
convolutional decoder takes any size.
"""

import math
import os

import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
from PIL import ImageDraw
from tqdm import tqdm

from data import (BUILT_IN_DATA, SHAPE_NAMES, condition_input, draw_scene, draw_scenes_canvas, image_transform, input_size,
                  make_datasets, open_rgb, palette_tensor, read_label_map, show_condition)
from gpt import cond_tokens, gpt_from_loaded, sample_sliding_window, spatial_cond_tokens
from lpips_lite import LPIPS, MIN_SIZE, WeightsUnavailable
from metrics import build_inception, evaluate, fid, inception_features, psnr
from shape_score import MAP_IOU, MIN_IOU, score_against_map, score_batch, score_canvas
from utils import (check_kind, check_non_negative, first_line, load_checkpoint, load_checkpoint_file, official_state_dict,
                   parse_overrides, pick_device, pick_dtype, run_script, save_image_grid, weights_digest)
from vqgan import load_official_vqgan, vqgan_from_checkpoint, vqgan_from_loaded

CONFIG = dict(
    gpt_ckpt="out/gpt/ckpt.pt",   # a checkpoint written by train_gpt.py
    vqgan_ckpt="",                # '' = the VQGAN the GPT was trained with (its path is in the GPT checkpoint)
    num_samples=16,               # images to sample (class-conditional without --class_label: per class, 8 at most)
    temperature=1.0,              # < 1 sharper, > 1 more varied
    top_k=16,                     # sample only among the k most likely codes (0 = all; official: 100 to 600);
                                  # 16 gives the cleanest shapes of the built-in data (RESULTS.md)
    top_p=1.0,                    # nucleus: the smallest set of codes with this much probability (1.0 = all)
    class_label=-1,               # class-conditional models: the class to draw (-1 = one row per class)
    height=0,                     # output height in pixels (0 = the training size); a multiple of the VQGAN's f
    width=0,                      # output width in pixels (0 = the training size)
    complete="",                  # an image file: keep its top half of tokens and sample the bottom half
    reconstruct="",               # an image file: write it, its token grid (a colour per code) and its VQGAN
                                  # reconstruction side by side (needs --vqgan_ckpt)
    image_size=0,                 # --reconstruct: resize + centre-crop to this (0 = the VQGAN's training size; 256 official)
    official_classes=0,           # official transformers: 0 = unconditional (start token), else the class count (ImageNet: 1000)
    n_head=16,                    # official transformers: attention heads (not in the weights; 16 in every official config)
    out="out/samples.png",        # where the PNG grid goes
    device="auto",                # auto = cuda, then mps, then cpu
    seed=0,
    # spatial conditioning: models trained with train_gpt.py --conditional=spatial
    cond="",                      # a semantic-map PNG (class id per pixel) or, for lowres models, an image at the output
                                  # size; 'scene' = draw shapes on a --height x --width canvas (default 3x the training width);
                                  # official depth-to-image transformers: a grayscale depth PNG
    cond_vqgan_ckpt="",           # '' = the condition VQGAN the GPT was trained with
    # watch it generate
    animate="",                   # a .gif path: also write the decoded grid every few tokens (first 4 samples;
                                  # a red outline shows the window when it slides)
    # evaluation: a VQGAN's reconstructions, a GPT's samples
    eval=False,                   # True: --vqgan_ckpt on validation images: L1, PSNR, SSIM, LPIPS, codes used, perplexity, FID
    sample_fid=False,             # True: FID of --num_samples GPT samples against --eval_images validation images
    data="",                      # --eval / --sample_fid: '' = the VQGAN's training data (its validation split), or a folder, ...
    eval_images=512,              # validation images to compare with (0 = all); FID reads high with few (it wants thousands)
    pretrained=True,              # False: random-weight VGG16 / Inception-v3 (no download; figures compare only with such runs)
)

EVAL_BATCH_SIZE = 32  # images per forward pass while evaluating (memory only; the figures do not depend on it)


def load_official_transformer(ckpt, config):
    """An official Net2NetTransformer checkpoint -> its GPT, its first-stage VQGAN, and the
    facts sample() needs (which our own checkpoints store). A depth-to-image transformer also
    holds its condition VQGAN (cond_stage_model.*), which comes back among those facts."""
    path, n_classes = config["gpt_ckpt"], config["official_classes"]
    sd = official_state_dict(ckpt, path)

    def stage(prefix):
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

    try:
        vqgan, _ = load_official_vqgan(stage("first_stage_model."))
        cond_vqgan = load_official_vqgan(stage("cond_stage_model."))[0] \
            if "cond_stage_model.encoder.conv_in.weight" in sd else None  # a condition VQGAN: depth-to-image
    except ValueError as e:
        raise SystemExit(f"error: {path}: {e}") from None
    model = gpt_from_loaded(ckpt, path, n_head=config["n_head"], n_classes=n_classes)  # gpt.load_gpt's reading
    if cond_vqgan is not None:
        return model, vqgan, official_depth_facts(path, model, vqgan, cond_vqgan)
    side = official_grid_side(model.block_size, vqgan.downsample_factor)
    return model, vqgan, dict(grid_hw=[side, side], conditional="class" if n_classes else "none",
                              class_names=[str(c) for c in range(n_classes)], image_size=side * vqgan.downsample_factor)


def official_grid_side(block_size, f):
    """The side of the square token grid an official (unconditional or class) transformer was
    trained on, from its block: it read [c, s] less the last token, 1 + side^2 - 1 = side^2
    positions (every official config: 256 = 16x16, from 256x256 crops at f16). A block that is
    no square was larger than the sequence; then the official 256x256 crops are assumed."""
    side = math.isqrt(block_size)
    return side if side * side == block_size else min(side, max(1, 256 // f))


def official_depth_facts(path, model, vqgan, cond_vqgan):
    """What sample_spatial needs to know about an official depth-to-image transformer. The
    trained grid is not stored, but the block held [r, s] for two equal grids (both VQGANs f16
    on 256x256 crops: 16x16 each), so block_size >= len(r) + len(s) - 1 = 2 side^2 - 1."""
    channels = cond_vqgan.config["in_channels"]
    if channels != 1 or cond_vqgan.downsample_factor != vqgan.downsample_factor:
        raise SystemExit(f"error: {path}: its condition VQGAN reads {channels} channels with f="
                         f"{cond_vqgan.downsample_factor} (image VQGAN f={vqgan.downsample_factor}); sample.py samples "
                         f"official transformers conditioned on depth maps (1 channel, the same f)")
    side = math.isqrt((model.block_size + 1) // 2)
    return dict(conditional="spatial", grid_hw=[side, side], image_size=side * vqgan.downsample_factor,
                cond_config=dict(condition="depth"), cond_vqgan=cond_vqgan)


def load_models(config, device):
    ckpt = load_checkpoint_file(config["gpt_ckpt"])
    if not (isinstance(ckpt, dict) and "kind" in ckpt):  # not ours: an official Lightning file
        model, vqgan, gpt_ckpt = load_official_transformer(ckpt, config)
        return model.to(device).eval(), vqgan.to(device).eval(), gpt_ckpt
    gpt_ckpt = check_kind(ckpt, config["gpt_ckpt"], "gpt")
    model = gpt_from_loaded(gpt_ckpt, config["gpt_ckpt"])
    check_grid(gpt_ckpt, model, config["gpt_ckpt"])
    vqgan_path = config["vqgan_ckpt"] or gpt_ckpt["vqgan_ckpt"]
    vqgan_ckpt = load_checkpoint(vqgan_path, "vqgan")
    vqgan = vqgan_from_checkpoint(vqgan_ckpt, vqgan_path)
    if vqgan.n_codes != model.n_codes:
        raise SystemExit(f"error: the VQGAN {vqgan_path} has {vqgan.n_codes} codes but the GPT {config['gpt_ckpt']} "
                         f"was trained on {model.n_codes} (give the --vqgan_ckpt it was trained with)")
    check_pinned(gpt_ckpt.get("vqgan_digest"), vqgan, vqgan_path, config["gpt_ckpt"], "vqgan_ckpt")
    # the VQGAN's data says whether the built-in shape score applies to the samples
    return model.to(device).eval(), vqgan.to(device).eval(), dict(gpt_ckpt, vqgan_data=vqgan_ckpt["config"]["data"])


def check_grid(gpt_ckpt, model, path):
    # the trained grid must fit the model's block ([c, s] minus the last token); else sampling
    # would fail deep inside the sliding window
    grid = gpt_ckpt["grid_hw"]
    if not (isinstance(grid, list) and len(grid) == 2 and all(isinstance(n, int) and n > 0 for n in grid)) or \
            grid[0] * grid[1] > model.block_size:
        raise SystemExit(f"error: {path}: its grid_hw={grid} does not fit the GPT's block_size={model.block_size} "
                         f"(a damaged file: retrain it or give another)")


def check_pinned(digest, vqgan, vqgan_path, gpt_path, flag):
    """A GPT's codes mean the pictures of the VQGAN it was trained on: any other VQGAN (even one
    with the same codebook size, or the same file trained further) decodes them into noise.
    Checkpoints from before the pin have no digest and are not checked."""
    if digest and weights_digest(vqgan.state_dict()) != digest:
        raise SystemExit(f"error: the VQGAN {vqgan_path} is not the one the GPT {gpt_path} was trained on (its "
                         f"weights differ: retrained or replaced?); give the --{flag} it was trained with, "
                         f"or train the GPT again on this one")


def class_label(gpt_ckpt, config):
    """The requested class (None for an unconditional model or -1 = every class), checked."""
    names, label = gpt_ckpt["class_names"], config["class_label"]
    if gpt_ckpt["conditional"] != "class":
        if label != -1:
            raise SystemExit("error: --class_label is for class-conditional models, and this GPT is unconditional")
        return None
    if label != -1 and not 0 <= label < len(names):
        listing = ", ".join(f"{i} = {n}" for i, n in enumerate(names[:16])) + (", ..." if len(names) > 16 else "")
        raise SystemExit(f"error: --class_label={label} is out of range (this model knows {listing})")
    return label


def sampling_options(config):
    # 0 and 1.0 are the shell's way of saying "off"
    return dict(temperature=config["temperature"], top_k=config["top_k"] or None,
                top_p=config["top_p"] if config["top_p"] < 1 else None)


def conditioning(model, gpt_ckpt, config, device):
    """(B, 1) conditioning tokens and the grid's row length for the PNG."""
    names, label = gpt_ckpt["class_names"], class_label(gpt_ckpt, config)
    if label is None:
        return cond_tokens(model, None, config["num_samples"], device), 8
    if label == -1:
        if len(names) > 16:
            raise SystemExit(f"error: this model has {len(names)} classes: pick one with --class_label=N")
        per_class = min(8, config["num_samples"])
        labels = torch.arange(len(names), device=device).repeat_interleave(per_class)
        return cond_tokens(model, labels, len(labels), device), per_class
    return cond_tokens(model, label, config["num_samples"], device), 8


def token_grid_size(config, gpt_ckpt, f):
    """(h, w) in tokens for the requested pixel size; never smaller than the trained grid."""
    trained_h, trained_w = gpt_ckpt["grid_hw"]
    size = []
    for name, trained in (("height", trained_h), ("width", trained_w)):
        pixels = config[name] or trained * f
        if pixels % f:
            raise SystemExit(f"error: --{name}={pixels} is not a multiple of the VQGAN's downsampling factor "
                             f"f={f} (try {max(f, pixels // f * f)})")
        if pixels // f < trained:
            raise SystemExit(f"error: --{name}={pixels} is smaller than the training size {trained * f} "
                             f"(the GPT only knows grids of at least {trained} tokens)")
        size.append(pixels // f)
    return tuple(size)


@torch.no_grad()
def complete_image(model, vqgan, gpt_ckpt, config, device):
    """The paper's completion demo: encode an image, keep its top half of tokens, sample the rest."""
    if not os.path.isfile(config["complete"]):
        raise SystemExit(f"error: --complete={config['complete']}: no such file (give an image file)")
    try:
        image = image_transform(gpt_ckpt["image_size"], train=False)(open_rgb(config["complete"]))
    except Exception as e:  # noqa: BLE001 - PIL raises many types for unreadable files
        raise SystemExit(f"error: --complete={config['complete']} could not be read as an image ({e})") from None
    label = class_label(gpt_ckpt, config)
    if label == -1:
        raise SystemExit("error: --complete with a class-conditional model needs --class_label=N")
    x = image[None].to(device)
    tokens = vqgan.encode(x)[1]  # (1, h, w)
    h, w = tokens.shape[1:]
    keep = (h // 2) * w  # the top half of the rows, in raster order
    n = config["num_samples"]
    prefix = torch.cat([cond_tokens(model, label, n, device), tokens.flatten(1)[:, :keep].expand(n, -1)], dim=1)
    g = torch.Generator(device=device).manual_seed(config["seed"])
    rest = model.generate(prefix, h * w - keep, generator=g, **sampling_options(config))
    completed = torch.cat([tokens.flatten(1).expand(n, -1)[:, :keep], rest], dim=1).view(n, h, w)
    # first the original and its reconstruction, then the completions
    return torch.cat([x, vqgan.decode_indices(tokens), vqgan.decode_indices(completed)]), n + 2


def load_any_vqgan(path):
    """(VQGAN, training image size) from this project's checkpoint or an official one."""
    ckpt = load_checkpoint_file(path)
    vqgan = vqgan_from_loaded(ckpt, path)
    ours = isinstance(ckpt, dict) and "kind" in ckpt  # written by train_vqgan.py, checked by vqgan_from_loaded
    return vqgan, ckpt["config"]["image_size"] if ours else 256  # every official VQGAN was trained on 256x256 crops


def token_picture(indices, n_codes, f):
    """Index grids (B, h, w) -> images (B, 3, h*f, w*f): each code a fixed random colour, each
    token an f x f square over the pixels it stands for. What the GPT reads and writes."""
    colours = torch.rand(n_codes, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    picture = colours[indices.cpu()].permute(0, 3, 1, 2)
    return F.interpolate(picture, scale_factor=f, mode="nearest").to(indices.device)


@torch.no_grad()
def reconstruct(config):
    """Encode and decode one image; write [image, its token grid, reconstruction] and print PSNR
    and the grid size."""
    if not config["vqgan_ckpt"]:
        raise SystemExit("error: --reconstruct needs --vqgan_ckpt=CKPT (this project's or an official last.ckpt)")
    if not os.path.isfile(config["reconstruct"]):
        raise SystemExit(f"error: --reconstruct={config['reconstruct']}: no such file (give an image file)")
    device = pick_device(config["device"])
    vqgan, trained_size = load_any_vqgan(config["vqgan_ckpt"])
    vqgan = vqgan.to(device).eval()
    size, f = config["image_size"] or trained_size, vqgan.downsample_factor
    if size <= 0 or size % f:
        raise SystemExit(f"error: --image_size={size} is not a positive multiple of the VQGAN's f={f} "
                         f"(try {max(f, size // f * f)})")
    try:
        image = image_transform(size, train=False)(open_rgb(config["reconstruct"]))
    except Exception as e:  # noqa: BLE001 - PIL raises many types for unreadable files
        raise SystemExit(f"error: --reconstruct={config['reconstruct']} could not be read as an image ({e})") from None
    x = image[None].to(device)
    x_hat, indices, _ = vqgan(x)
    path = save_image_grid(torch.cat([x, token_picture(indices, vqgan.n_codes, f), x_hat]), config["out"], nrow=3)
    h, w = indices.shape[1:]
    print(f"PSNR {psnr(x, x_hat).item():.2f} dB, {h}x{w} tokens of {vqgan.n_codes} codes; wrote {path}")
    return path


def foreground_agreement(images, semantic):
    """How closely samples follow their semantic maps' foreground/background split, per sample:
    images (B, 3, H, W) in [-1, 1], maps long (B, H, W) with 0 = background -> (B,) in [0, 1].

    Every pixel gets its nearest palette colour (the built-in shapes are drawn in those 8). A
    sample's background colour is the colour most of its map's background pixels have, and a
    pixel agrees when it has the background colour exactly where the map says background: a
    foreground pixel must have any other colour. (A map without background has no background
    colour, so there every pixel agrees.)"""
    palette = palette_tensor()  # (8, 3)
    pixels = images.permute(0, 2, 3, 1).reshape(len(images), -1, 3).float()
    colour = torch.cdist(pixels, palette.expand(len(images), -1, -1)).argmin(-1)  # (B, H*W)
    background = semantic.reshape(len(images), -1) == 0
    agreement = []
    for c, bg in zip(colour, background):
        bg_colour = torch.bincount(c[bg], minlength=len(palette)).argmax() if bg.any() else -1
        agreement.append(((c == bg_colour) == bg).float().mean())
    return torch.stack(agreement)


def load_cond_vqgan(gpt_ckpt, config, device):
    """The condition VQGAN of a spatial GPT (the one it was trained with unless --cond_vqgan_ckpt)."""
    if "cond_vqgan" in gpt_ckpt:  # an official transformer: the file holds its condition VQGAN
        if config["cond_vqgan_ckpt"]:
            raise SystemExit("error: --cond_vqgan_ckpt is for this project's spatial GPTs; an official transformer "
                             "brings its own condition VQGAN (drop the flag)")
        return gpt_ckpt["cond_vqgan"].to(device).eval()
    path = config["cond_vqgan_ckpt"] or gpt_ckpt["cond_vqgan_ckpt"]
    ckpt = load_checkpoint(path, "vqgan")
    kind, n_codes = gpt_ckpt["cond_config"]["condition"], gpt_ckpt["model_config"]["n_cond_tokens"]
    if ckpt["config"].get("condition", "") != kind or ckpt["model_config"].get("n_codes") != n_codes:
        raise SystemExit(f"error: {path} is not a {kind} condition VQGAN with {n_codes} codes, which this GPT "
                         f"was trained with (give the --cond_vqgan_ckpt it was trained with)")
    cond_vqgan = vqgan_from_checkpoint(ckpt, path)
    check_pinned(gpt_ckpt.get("cond_vqgan_digest"), cond_vqgan, path, config["gpt_ckpt"], "cond_vqgan_ckpt")
    return cond_vqgan.to(device).eval()


def read_condition(gpt_ckpt, config):
    """--cond -> (images (B, 3, H, W) or None, semantic maps (B, H, W) or None): 'scene' draws
    num_samples scenes (maps and their pictures); a file gives one label map or one image (a
    depth map: one channel, (1, 1, H, W) in [-1, 1])."""
    cond_config, name, cell = gpt_ckpt["cond_config"], config["cond"], gpt_ckpt["image_size"]
    depth = cond_config["condition"] == "depth"
    if name == "scene" and depth:
        raise SystemExit("error: --cond=scene draws shapes for this project's spatial GPTs; a depth-to-image "
                         "transformer needs a depth map: --cond=DEPTH.png (grayscale)")
    if name == "scene":
        height, width = config["height"] or cell, config["width"] or 3 * cell
        # a map like the training data's: scenes canvases for a model trained on scene crops, else
        # one shape per cell x cell square (the shapes data has one shape per image)
        draw = draw_scenes_canvas if cond_config["data"] == "scenes" else draw_scene
        scenes = [draw(height, width, cell, seed=config["seed"] + i) for i in range(config["num_samples"])]
        return torch.stack([s[0] for s in scenes]), torch.stack([s[1] for s in scenes])
    if not os.path.isfile(name):
        wanted = "a depth PNG" if depth else "a label PNG, or --cond=scene" if cond_config["condition"] == "semantic" \
            else "an image, or --cond=scene"
        raise SystemExit(f"error: --cond={name}: no such file (give {wanted})")
    if cond_config["condition"] == "semantic":
        return None, torch.from_numpy(read_label_map(name, cond_config["cond_classes"])).long()[None]
    try:
        image = open_rgb(name)
        # a depth map: RGB -> luminance (a grayscale file comes back unchanged)
        return TF.to_tensor(image.convert("L") if depth else image)[None] * 2 - 1, None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for unreadable files
        raise SystemExit(f"error: --cond={name} could not be read as an image ({e})") from None


class Animation:
    """--animate: while sample_sliding_window fills the token grid, decode it every few tokens
    into a GIF frame. Positions not sampled yet are grey (the decoder still sees code 0 there, so
    their neighbours are a preview, not the final pixels). The frame count is capped, so a 16x16
    or a 64x64 grid gives a GIF of the same small size."""
    max_frames = 30
    max_shown = 4           # samples side by side in the GIF

    def __init__(self, vqgan, h, w):
        self.vqgan, self.h, self.w = vqgan, h, w
        self.every = math.ceil(h * w / self.max_frames)  # tokens per frame
        self.frames = []

    def on_token(self, grid, i, j, window):
        done = i * self.w + j + 1
        if done % self.every == 0 or done == self.h * self.w:
            self.frames.append(self.frame(grid[:self.max_shown], done, window))

    @torch.no_grad()
    def frame(self, grid, done, window):
        f = self.vqgan.downsample_factor
        images = self.vqgan.decode_indices(grid).float().clamp(-1, 1)
        sampled = (torch.arange(self.h * self.w, device=grid.device) < done).view(1, 1, self.h, self.w)
        images = images * F.interpolate(sampled.float(), scale_factor=f)  # 0 = mid grey in [-1, 1]
        scale = max(1, min(4, 96 // images.shape[2]))  # small images are enlarged to be seen
        images = F.interpolate(images, scale_factor=scale, mode="nearest")
        pad = 2
        picture = TF.to_pil_image(torchvision.utils.make_grid((images.cpu() + 1) / 2, nrow=len(images),
                                                              padding=pad, pad_value=0.5))
        r0, c0, wh, ww = window
        if (wh, ww) != (self.h, self.w):  # sliding: outline the window this token was sampled in
            draw, size = ImageDraw.Draw(picture), f * scale
            width = self.w * size + pad
            for k in range(len(images)):
                x0, y0 = pad + k * width + c0 * size, pad + r0 * size
                draw.rectangle([x0, y0, x0 + ww * size - 1, y0 + wh * size - 1], outline=(255, 0, 0))
        return picture

    def save(self, path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        durations = [80] * (len(self.frames) - 1) + [1500]  # hold the finished images
        self.frames[0].save(path, save_all=True, append_images=self.frames[1:], duration=durations, loop=0)
        print(f"wrote {len(self.frames)} frames of generation to {path}")


@torch.no_grad()
def sample_spatial(model, vqgan, gpt_ckpt, config, device):
    """Sample images that follow a spatial condition of any size (the sliding window when it is
    larger than the training crops). -> (rows of [condition, sample] or, for a low-resolution
    condition, [image, sample, low-res input], images per row)."""
    cond_vqgan, cond_config = load_cond_vqgan(gpt_ckpt, config, device), gpt_ckpt["cond_config"]
    images, semantic = read_condition(gpt_ckpt, config)
    height, width = (semantic if semantic is not None else images[:, 0]).shape[-2:]
    # both sides must split into whole tokens of the image VQGAN and of the condition VQGAN
    cond_f = cond_vqgan.downsample_factor * (cond_config["lowres_factor"] if cond_config["condition"] == "lowres" else 1)
    step = math.lcm(vqgan.downsample_factor, cond_f)
    if height % step or width % step:
        raise SystemExit(f"error: the condition is {width}x{height} pixels; both sides must be multiples of {step} "
                         f"(the VQGANs' downsampling; e.g. {max(step, width // step * step)}x{max(step, height // step * step)})")
    h, w = token_grid_size(dict(config, height=height, width=width), gpt_ckpt, vqgan.downsample_factor)
    x = condition_input((images, None, semantic), cond_config).to(device)
    n = config["num_samples"]
    r = cond_vqgan.encode(x)[1].expand(n, -1, -1)  # one file: the same condition for every sample
    g = torch.Generator(device=device).manual_seed(config["seed"])
    animation = Animation(vqgan, h, w) if config["animate"] else None
    try:
        tokens = sample_sliding_window(model, spatial_cond_tokens(model, r), h, w, *gpt_ckpt["grid_hw"], generator=g,
                                       progress=True, on_token=animation and animation.on_token,
                                       **sampling_options(config))
    except ValueError as e:  # a condition grid that does not tile the image grid
        raise SystemExit(f"error: {e}") from None
    samples = vqgan.decode_indices(tokens)
    if animation:
        animation.save(config["animate"])
    if semantic is not None and cond_config["data"] in BUILT_IN_DATA:
        agreement = foreground_agreement(samples.cpu().clamp(-1, 1), semantic.expand(n, -1, -1))
        print(f"foreground/background agreement with the map: {agreement.mean().item():.3f} "
              f"(per sample: {', '.join(f'{a:.2f}' for a in agreement.tolist())})")
        print(map_score_line(samples.float().cpu().clamp(-1, 1), semantic.expand(n, -1, -1)))
    pictures = show_condition(x, cond_config).expand(n, 3, -1, -1)  # 3: a depth map's one channel shown as grey
    columns = [images.to(device).expand(n, -1, -1, -1), samples, pictures] if cond_config["condition"] == "lowres" \
        else [pictures, samples]
    return torch.stack(columns, 1).flatten(0, 1), len(columns)


def print_shape_score(images, gpt_ckpt, config, per_class, trained_size):
    """The built-in score (shape_score.py) of samples of a VQGAN trained on shapes or scenes: one
    line each. Training-size samples of shapes: the share of clean shapes and their classes (and,
    class-conditional, the share that is the class asked for); wider canvases and scenes: the
    share of clean shapes among those wholly inside, and of canvases with one background colour."""
    if trained_size and gpt_ckpt["vqgan_data"] == "shapes":
        score = score_batch(images)
        classes = ", ".join(f"{name} {score['classes'][name]}" for name in SHAPE_NAMES)
        failures = ", ".join(f"{k} {v}" for k, v in score["reasons"].most_common() if k != "clean") or "none"
        print(f"shape score: {share(sum(r[0] for r in score['results']), len(images))} clean shapes "
              f"({classes}); failures: {failures}")
        wanted = requested_classes(gpt_ckpt, config, per_class, len(images))
        if wanted is not None:
            hits = sum(clean and name == SHAPE_NAMES[k] for (clean, name, _, _), k in zip(score["results"], wanted))
            print(f"requested class: {share(hits, len(images))} samples are a clean shape of the class asked for")
        return
    canvases = [score_canvas(x, gpt_ckpt["image_size"]) for x in images]
    shapes = [s for c in canvases for s in c["shapes"]]
    print(f"canvas score: {share(sum(s[0] for s in shapes), len(shapes))} of the shapes wholly inside are clean; "
          f"background one colour in {share(sum(c['one_background'] for c in canvases), len(canvases))} samples")


def requested_classes(gpt_ckpt, config, per_class, n):
    """The class each sample was asked to be (as conditioning() laid them out), or None."""
    label = class_label(gpt_ckpt, config)
    if label is None:
        return None
    return [label] * n if label != -1 else [k for k in range(len(gpt_ckpt["class_names"])) for _ in range(per_class)]


def map_score_line(samples, semantic):
    """Samples against the semantic maps they follow (shape_score.score_against_map), in one line."""
    found = [s for x, m in zip(samples, semantic) for s in score_against_map(x, m)]
    def right(iou):
        return sum(s["predicted"] == s["wanted"] and s["map_iou"] >= iou and s["one_colour"] for s in found)
    return (f"map score: {share(right(MAP_IOU), len(found))} of the map's shapes drawn in one colour as the class "
            f"asked for, IoU with the map >= {MAP_IOU} ({share(right(MIN_IOU), len(found))} at >= {MIN_IOU})")


def share(k, n):
    return f"{k}/{n} ({k / n:.0%})" if n else "0/0"


def check_config(config):
    """The numeric flags' ranges, before any file is read."""
    if config["num_samples"] <= 0 or config["temperature"] <= 0 or not 0 < config["top_p"] <= 1 or config["top_k"] < 0:
        raise SystemExit("error: need --num_samples > 0, --temperature > 0, 0 < --top_p <= 1 and --top_k >= 0")
    if config["class_label"] < -1 or config["n_head"] <= 0:
        raise SystemExit(f"error: --class_label={config['class_label']} must be a class (0, 1, ...) or -1 for all, "
                         f"and --n_head={config['n_head']} positive")
    check_non_negative(config, ("height", "width", "image_size", "official_classes", "eval_images"))


@torch.no_grad()
def sample(config):
    check_config(config)
    if config["reconstruct"]:
        return reconstruct(config)
    device = pick_device(config["device"])
    model, vqgan, gpt_ckpt = load_models(config, device)
    spatial = gpt_ckpt["conditional"] == "spatial"
    if spatial != bool(config["cond"]):
        kind = "unconditional" if gpt_ckpt["conditional"] == "none" else f"{gpt_ckpt['conditional']}-conditional"
        raise SystemExit(f"error: --cond is for spatially conditioned GPTs, and this one is {kind} (drop --cond)"
                         if config["cond"] else f"error: this GPT is conditioned on {gpt_ckpt['cond_config']['condition']} "
                         f"maps: give --cond=FILE" + ("" if "cond_vqgan" in gpt_ckpt else " or --cond=scene"))
    if spatial and config["complete"]:
        raise SystemExit("error: --complete is for unconditional and class-conditional GPTs (use --cond with this one)")
    if config["animate"] and (config["complete"] or not config["animate"].lower().endswith(".gif")):
        raise SystemExit(f"error: --animate={config['animate']} needs a path ending in .gif, and sampling "
                         f"without --complete")
    if spatial:
        images, nrow = sample_spatial(model, vqgan, gpt_ckpt, config, device)
    elif config["complete"]:
        images, nrow = complete_image(model, vqgan, gpt_ckpt, config, device)
    else:
        h, w = token_grid_size(config, gpt_ckpt, vqgan.downsample_factor)
        cond, nrow = conditioning(model, gpt_ckpt, config, device)
        g = torch.Generator(device=device).manual_seed(config["seed"])
        trained_h, trained_w = gpt_ckpt["grid_hw"]
        animation = Animation(vqgan, h, w) if config["animate"] else None
        if (h, w) == (trained_h, trained_w) and animation is None:
            # Eq. (8) as written: one token after another in raster order, with the KV cache
            tokens = model.generate(cond, h * w, generator=g, **sampling_options(config)).view(-1, h, w)
        else:
            # a larger grid (or frames to draw): the sliding window, which on the trained grid
            # gives exactly generate's tokens for the same seed (tested)
            tokens = sample_sliding_window(model, cond, h, w, trained_h, trained_w, generator=g, progress=True,
                                           on_token=animation and animation.on_token, **sampling_options(config))
        images = vqgan.decode_indices(tokens)
        if animation:
            animation.save(config["animate"])
        if gpt_ckpt.get("vqgan_data") in BUILT_IN_DATA:
            print_shape_score(images.float().cpu().clamp(-1, 1), gpt_ckpt, config, nrow, (h, w) == (trained_h, trained_w))
    path = save_image_grid(images, config["out"], nrow)
    print(f"wrote {len(images)} images to {path}")
    return path


# -----------------------------------------------------------------------------
# Evaluation: --eval (a VQGAN's reconstructions) and --sample_fid (a GPT's samples)


def eval_data_settings(config, vqgan_path, trained_size):
    """Which validation images to compare with: --data if given, else the VQGAN's own training
    data (its held-out split), at --image_size or the size the VQGAN was trained on."""
    if config["data"]:
        settings = dict(data=config["data"], image_size=trained_size, val_fraction=0.05, seed=0, data_root="data",
                        condition="")
    else:
        ckpt = load_checkpoint_file(vqgan_path) if vqgan_path else None
        if not (isinstance(ckpt, dict) and ckpt.get("kind") == "vqgan"):
            raise SystemExit("error: this VQGAN's checkpoint does not say what data it was trained on "
                             "(give --data=FOLDER or a dataset name)")
        settings = ckpt["config"]
    if config["eval_images"] < 0:
        raise SystemExit(f"error: --eval_images={config['eval_images']} must be positive (or 0 for all)")
    return dict(settings, image_size=config["image_size"] or settings["image_size"])


def validation_images(settings, eval_images):
    """The first eval_images (0 = all) validation images of the settings' data."""
    val_set = make_datasets(settings["data"], settings["image_size"], settings["val_fraction"], settings["seed"],
                            data_root=settings["data_root"])[1]
    return torch.utils.data.Subset(val_set, range(min(len(val_set), eval_images or len(val_set))))


def metric_network(build, what):
    """(network, None), or (None, the reason) when its pretrained weights cannot be downloaded."""
    try:
        return build(), None
    except WeightsUnavailable as e:
        reason = first_line(e.__cause__ or e)
        return None, (f"unavailable: torchvision's {what} weights are not cached and cannot be downloaded ({reason}); "
                      f"connect once, or use --pretrained=false (random weights)")


@torch.no_grad()
def evaluate_vqgan(config):
    """--eval: print L1, PSNR, SSIM, LPIPS, codebook usage, perplexity and reconstruction FID."""
    if not config["vqgan_ckpt"]:
        raise SystemExit("error: --eval needs --vqgan_ckpt=CKPT (this project's or an official last.ckpt)")
    device = pick_device(config["device"])
    vqgan, trained_size = load_any_vqgan(config["vqgan_ckpt"])
    settings = eval_data_settings(config, config["vqgan_ckpt"], trained_size)
    size = input_size(settings)  # what the VQGAN sees (a low-resolution condition VQGAN: downsampled images)
    if size % vqgan.downsample_factor:
        raise SystemExit(f"error: --image_size={settings['image_size']} gives {size}x{size} inputs, not a multiple "
                         f"of the VQGAN's f={vqgan.downsample_factor}")
    if settings.get("condition") == "semantic":
        raise SystemExit(f"error: {config['vqgan_ckpt']} is a semantic-map VQGAN: --eval measures images "
                         f"(its pixel accuracy is in its log.csv)")
    val_set = validation_images(settings, config["eval_images"])
    torch.manual_seed(config["seed"])  # fixes the random networks of --pretrained=false
    random_note = "" if config["pretrained"] else "; random weights: compare only with other --pretrained=false runs"
    lpips, lpips_note = metric_network(lambda: LPIPS(pretrained=config["pretrained"]).to(device), "VGG16")
    if size < MIN_SIZE:
        lpips, lpips_note = None, f"unavailable: needs images of at least {MIN_SIZE}x{MIN_SIZE} pixels"
    inception, fid_note = metric_network(lambda: build_inception(config["pretrained"]).to(device), "Inception-v3")
    eval_config = dict(settings, condition=settings.get("condition", ""), eval_images=len(val_set),
                       batch_size=EVAL_BATCH_SIZE, num_workers=0)
    m, _ = evaluate(vqgan.to(device), lpips, val_set, eval_config, device, pick_dtype("auto", device), inception)
    print(f"{config['vqgan_ckpt']} on {len(val_set)} validation images of {settings['data']} ({size}x{size}):")
    print(f"  L1         {m['val_l1']:.4f}")
    print(f"  PSNR       {m['val_psnr']:.2f} dB")
    print(f"  SSIM       {m['val_ssim']:.4f}")
    print(f"  LPIPS      {lpips_note or format(m['val_lpips'], '.4f') + '  (VGG16' + random_note + ')'}")
    print(f"  codebook   {m['val_usage']:.1%} of {vqgan.n_codes} codes used, perplexity {m['val_perplexity']:.1f}")
    print(f"  FID        {fid_note or format(m['val_fid'], '.2f') + '  (reconstructions vs originals' + random_note + ')'}")
    return m


def features_of_images(inception, dataset, device):
    loader = torch.utils.data.DataLoader(dataset, batch_size=EVAL_BATCH_SIZE)
    return torch.cat([inception_features(inception, batch[0].to(device)) for batch in loader])


@torch.no_grad()
def sample_fid(config):
    """--sample_fid: FID between --num_samples GPT samples and the validation images."""
    device = pick_device(config["device"])
    model, vqgan, gpt_ckpt = load_models(config, device)
    if config["num_samples"] < 2:
        raise SystemExit(f"error: --sample_fid needs --num_samples of at least 2 (got {config['num_samples']})")
    if gpt_ckpt["conditional"] == "spatial":
        raise SystemExit("error: --sample_fid samples unconditional and class-conditional GPTs; this one needs a "
                         "spatial condition per sample (compare its samples by eye: python sample.py --cond=scene)")
    settings = eval_data_settings(config, config["vqgan_ckpt"] or gpt_ckpt.get("vqgan_ckpt", ""), gpt_ckpt["image_size"])
    label = class_label(gpt_ckpt, config)
    torch.manual_seed(config["seed"])
    inception, note = metric_network(lambda: build_inception(config["pretrained"]).to(device), "Inception-v3")
    if inception is None:
        raise SystemExit(f"error: FID {note}")
    h, w = gpt_ckpt["grid_hw"]
    g = torch.Generator(device=device).manual_seed(config["seed"])
    features, shown = [], []
    for first in tqdm(range(0, config["num_samples"], EVAL_BATCH_SIZE), desc="sample"):
        n = min(EVAL_BATCH_SIZE, config["num_samples"] - first)
        # class-conditional without --class_label: the classes in turn, as often as each other
        labels = torch.arange(first, first + n) % len(gpt_ckpt["class_names"]) if label == -1 else label
        tokens = model.generate(cond_tokens(model, labels, n, device), h * w, generator=g, **sampling_options(config))
        images = vqgan.decode_indices(tokens.view(n, h, w))
        features.append(inception_features(inception, images))
        shown.append(images[:max(0, 64 - first)].cpu())
    real = features_of_images(inception, validation_images(settings, config["eval_images"]), device)
    path = save_image_grid(torch.cat(shown), config["out"])
    score = fid(real, torch.cat(features))
    weights = "" if config["pretrained"] else " (random-weight Inception-v3: compare only with other such runs)"
    print(f"FID {score:.2f}{weights}: {config['num_samples']} samples vs {len(real)} validation images of "
          f"{settings['data']}; the first {min(64, config['num_samples'])} samples are in {path}")
    return score


def main(argv):
    config = dict(CONFIG, **parse_overrides(CONFIG, argv, __file__))
    check_config(config)
    if config["eval"]:
        evaluate_vqgan(config)
    elif config["sample_fid"]:
        sample_fid(config)
    else:
        sample(config)


if __name__ == "__main__":
    run_script(main)

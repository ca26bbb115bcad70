"""
The data every stage reads: the built-in shapes and scenes (no files, drawn from a seed), a folder of
images (optionally with a parallel folder of label maps), or a torchvision dataset; the
train/validation split; and the batch order, fixed by (seed, step) so --resume sees the same
batches. Every dataset yields images as float32 (3, H, W) in [-1, 1], the range the VQGAN
works in; the shapes also give a class label and a semantic map, the scenes a semantic map.
"""

import os
import random
import warnings

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image

from utils import first_line

# -----------------------------------------------------------------------------
# the built-in shapes

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


SHAPE_SIZE_RANGE = (0.35, 0.80)  # side / diameter as a fraction of the image: big enough for an 8x8 token grid to draw


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


DATA_HELP = "give a folder of images, or --data=shapes or --data=scenes for the built-in data"


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


def check_generated_data_args(what, num_items, image_size, seed):
    if image_size < 8:
        raise ValueError(f"{what}: image_size must be >= 8, got {image_size}")
    if num_items < 1 or seed < 0:
        raise ValueError(f"{what}: need num_items >= 1 and seed >= 0, got {num_items}, {seed}")


class ShapesDataset(torch.utils.data.Dataset):
    """One flat shape on a flat background, drawn from (seed, index) when asked: no files.

    Item -> (image float32 (3, S, S) in [-1, 1], label int (index into SHAPE_NAMES),
    semantic map long (S, S): 0 background, 1 + label on the shape).
    """

    def __init__(self, num_items, image_size=32, seed=0):
        check_generated_data_args("ShapesDataset", num_items, image_size, seed)
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


SCENE_CANVAS_SCALE = 2   # a scene's canvas is this many crops wide and high: room for several training-size shapes
SCENE_ATTEMPTS = 12      # shapes tried per canvas; one that would overlap (or come within 1 px of) another is skipped


def place_scene_shapes(rng, height, width, crop_size, attempts):
    """Non-overlapping shapes on a height x width canvas, each of a training size (SHAPE_SIZE_RANGE x
    crop_size) and wholly inside it, at least 1 px apart (a shape's mask grown by 1 px in the
    8-neighbourhood never meets another's). -> [(label, colour offset 1..7, boolean mask)]."""
    taken = np.zeros((height, width), dtype=bool)  # the placed shapes, grown by 1 px
    shapes = []
    for _ in range(attempts):
        label, offset = int(rng.integers(NUM_SHAPE_CLASSES)), int(rng.integers(1, len(PALETTE)))
        size = crop_size * rng.uniform(*SHAPE_SIZE_RANGE)
        cx, cy = rng.uniform(size / 2, (width - size / 2, height - size / 2))
        # drawn in the shape's bounding box (+1 px for the margin) only: large canvases stay fast
        (top, bottom), (left, right) = ((max(0, int(c - size / 2) - 1), min(n, int(c + size / 2) + 2))
                                        for c, n in ((cy, height), (cx, width)))
        ys, xs = np.meshgrid(np.arange(top, bottom) + 0.5, np.arange(left, right) + 0.5, indexing="ij")
        mask = np.zeros((height, width), dtype=bool)
        mask[top:bottom, left:right] = _shape_mask(label, cx, cy, size, xs, ys)
        if (mask & taken).any():
            continue
        shapes.append((label, offset, mask))
        taken[top:bottom, left:right] |= _grow(mask[top:bottom, left:right])
    return shapes


def _grow(mask):
    # the mask and its 8 neighbours: the 1-px margin every other shape must keep
    padded = np.pad(mask, 1)
    h, w = mask.shape
    return np.logical_or.reduce([padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)])


def paint_scene(rng, height, width, crop_size, attempts):
    """One background colour and place_scene_shapes' shapes, each in a colour of its own draw (never
    the background) -> (image (3, height, width) in [-1, 1], semantic map long, the shapes)."""
    colours = palette_tensor()
    background = int(rng.integers(len(PALETTE)))
    shapes = place_scene_shapes(rng, height, width, crop_size, attempts)
    image = colours[background][:, None, None].repeat(1, height, width)
    semantic = torch.zeros(height, width, dtype=torch.long)
    for label, offset, mask in shapes:
        mask = torch.from_numpy(mask)
        image[:, mask] = colours[(background + offset) % len(PALETTE)][:, None]
        semantic[mask] = 1 + label
    return image, semantic, shapes


def draw_scenes_canvas(height, width, crop_size, seed=0):
    """A canvas of any size with the statistics of ScenesDataset's canvases (the same shape sizes,
    the same 1-px gaps, the same number of shapes tried per crop-sized area), for a spatial model
    trained on scenes: --cond=scene. -> (image (3, height, width), semantic map (height, width))."""
    rng = np.random.default_rng([seed, height, width, crop_size])
    crops_of_a_canvas = SCENE_CANVAS_SCALE ** 2
    attempts = max(1, round(SCENE_ATTEMPTS * height * width / (crops_of_a_canvas * crop_size ** 2)))
    image, semantic, _ = paint_scene(rng, height, width, crop_size, attempts)
    return image, semantic


class ScenesDataset(torch.utils.data.Dataset):
    """Crops of procedural scenes, drawn from (seed, index) when asked: no files. Each item has its
    own canvas, SCENE_CANVAS_SCALE crops wide and high, of one background colour and several flat
    shapes of the training sizes that never overlap; the item is a random crop of it, shapes cut
    by the crop's edge included, so a model learns what a part of a larger picture looks like.

    Item -> (image float32 (3, S, S) in [-1, 1], -1 (no class label), semantic map long (S, S):
    0 background, 1 + class on a shape)."""

    def __init__(self, num_items, image_size=32, seed=0):
        check_generated_data_args("ScenesDataset", num_items, image_size, seed)
        self.num_items, self.image_size, self.seed = num_items, image_size, seed
        self.random_flip, self.num_classes = False, 0  # read by train_gpt.py: no class labels

    def __len__(self):
        return self.num_items

    def canvas(self, index):
        """The whole canvas of item `index` -> (image (3, C, C), semantic (C, C), shapes as from
        place_scene_shapes, (top, left) of the item's crop)."""
        if not 0 <= index < self.num_items:
            raise IndexError(f"index {index} out of range for {self.num_items} scenes")
        rng = np.random.default_rng([self.seed, index])  # private per item, as in ShapesDataset
        side = SCENE_CANVAS_SCALE * self.image_size
        image, semantic, shapes = paint_scene(rng, side, side, self.image_size, SCENE_ATTEMPTS)
        top, left = (int(v) for v in rng.integers(0, side - self.image_size + 1, size=2))
        return image, semantic, shapes, (top, left)

    def __getitem__(self, index):
        image, semantic, _, (top, left) = self.canvas(index)
        s = self.image_size
        return image[:, top:top + s, left:left + s].contiguous(), -1, semantic[top:top + s, left:left + s].contiguous()


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


def input_size(config):
    # what the VQGAN sees: the images, or for a low-resolution condition their downsampled versions
    lowres = config.get("condition", "") == "lowres"
    return config["image_size"] // config["lowres_factor"] if lowres else config["image_size"]


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


# -----------------------------------------------------------------------------
# what a VQGAN encodes: images, semantic maps, low-resolution images


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


BUILT_IN_DATA = {"shapes": ShapesDataset, "scenes": ScenesDataset}  # no files: drawn from a seed


def make_datasets(data, image_size, val_fraction=0.05, seed=0, data_root="data",
                  num_shapes=50_000, num_val_shapes=512, cond_data="", cond_classes=0):
    """--data=shapes | scenes | cifar10 | mnist | celeba | PATH -> (train_ds, val_ds). With cond_data (a
    folder of label PNGs for --data=PATH), the items also carry their semantic maps."""
    _check_data_args(image_size, val_fraction)
    if data in BUILT_IN_DATA:
        # Shapes and scenes cost nothing to store, so the training set can be large. The validation
        # seed is far from the training one, so no run's validation set is a nearby seed's train set.
        cls = BUILT_IN_DATA[data]
        return cls(num_shapes, image_size, seed), cls(num_val_shapes, image_size, seed + 1_000_003)
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

    # Its own generator: starting a DataLoader draws a seed from the global RNG otherwise, and a
    # resumed run, which starts it after restoring that RNG, would then draw every later random
    # number (e.g. --dead_code_restart's) one step out of line with the uninterrupted run.
    return iter(torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=indices(),
                                            num_workers=num_workers, drop_last=True,
                                            generator=torch.Generator().manual_seed(seed)))

"""
An honest score for images of the built-in data (data.py's shapes and scenes): is a generated
image a clean shape, drawn the way the data draws them? FID on 32x32 toy images says little;
this says exactly what went wrong with each sample.

A 'clean shape' image (score_image), with the tolerances below:
  1. every pixel snaps to its nearest PALETTE colour;
  2. the background is the colour of the majority of the border pixels, and it must be the
     only colour outside the shape and its edge band (4.), the border included, but for specks;
  3. the shape is the largest 4-connected region of one non-background colour; regions of at
     most SPECK_PIXELS pixels are specks and ignored, MAX_SPECK_PIXELS of them in all;
  4. strict elsewhere, tolerant at the edge: pixels of a third colour, and off-palette pixels
     (farther than OFF_PALETTE from every palette colour), may only lie in the shape's edge
     band, the pixels within 1 px (8-neighbourhood) of its boundary, inside or outside: that
     is where a slightly soft edge puts its mixed colours. Anywhere else they fail the image:
     'touching' (a region reaching beyond the band touches the shape: a second shape, a
     recoloured half), 'stray' (another region elsewhere: a blob on the background), 'blurry'
     (off-palette pixels beyond the band), 'specks' (more than MAX_SPECK_PIXELS);
  5. the shape's mask fits a circle, square or triangle of data._shape_mask (centre and size
     from its bounding box, refined on a half-pixel grid) with IoU >= MIN_IOU.
The result is (clean, class name or None, IoU, reason); the reason's word before ':' is one of
REASONS, so reasons can be counted.
"""

from collections import Counter

import numpy as np
import torch

from data import PALETTE, SHAPE_NAMES, SHAPE_SIZE_RANGE, _shape_mask

OFF_PALETTE = 0.25     # in [-1, 1] RGB units (~32/255): a pixel farther than this from every colour is off-palette
SPECK_PIXELS = 2       # a region this small is noise, not a shape
MAX_SPECK_PIXELS = 4   # ... but no more than this many speck pixels per image (or per shape's surroundings)
MIN_IOU = 0.9          # the mask must overlap its best-fitting circle/square/triangle this well
MAP_IOU = 0.8          # a shape drawn from a semantic map is in the right place when its IoU with the map's shape is this
REASONS = ("clean", "empty", "touching", "specks", "blurry", "iou", "stray")

_PALETTE = np.array(PALETTE, dtype=np.float32) / 127.5 - 1.0  # (8, 3) in [-1, 1], like the images


# -----------------------------------------------------------------------------
# pixels -> palette indices, connected regions, edge bands


def snap(image):
    """Image (3, H, W) in [-1, 1] (tensor or array) -> (palette index per pixel (H, W), distance
    to that colour (H, W))."""
    pixels = np.asarray(image.detach().cpu().float() if torch.is_tensor(image) else image, dtype=np.float32)
    if pixels.ndim != 3 or pixels.shape[0] != 3:
        raise SystemExit(f"error: shape_score wants images of shape (3, H, W), got {tuple(pixels.shape)}")
    d = np.linalg.norm(pixels.transpose(1, 2, 0)[:, :, None, :] - _PALETTE, axis=-1)  # (H, W, 8)
    return d.argmin(-1), d.min(-1)


def regions(colours, keep):
    """4-connected regions of equal colour among the pixels where `keep` -> label map (H, W):
    -1 outside `keep`, else 0..n-1. Labels spread as the smallest flat index of the region
    (neighbour minima, then pointer jumping), so no recursion and no scipy."""
    h, w = colours.shape
    big = h * w
    label = np.where(keep, np.arange(big).reshape(h, w), big)
    while True:
        best = label.copy()
        for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
            src_y, dst_y = slice(max(dy, 0), h + min(dy, 0)), slice(max(-dy, 0), h + min(-dy, 0))
            src_x, dst_x = slice(max(dx, 0), w + min(dx, 0)), slice(max(-dx, 0), w + min(-dx, 0))
            same = keep[dst_y, dst_x] & keep[src_y, src_x] & (colours[dst_y, dst_x] == colours[src_y, src_x])
            best[dst_y, dst_x] = np.where(same, np.minimum(best[dst_y, dst_x], label[src_y, src_x]), best[dst_y, dst_x])
        flat = best.ravel()
        inside = flat < big
        flat[inside] = flat[flat[inside]]  # jump: the label of my label's pixel is at least as small
        if np.array_equal(best, label):
            break
        label = best
    _, dense = np.unique(label, return_inverse=True)
    dense = dense.reshape(h, w)
    return np.where(keep, dense, -1) if keep.any() else np.full((h, w), -1)


def dilate(mask, steps=1):
    """Grow a boolean mask by `steps` pixels in the 8-neighbourhood (a 3x3 square per step)."""
    for _ in range(steps):
        padded = np.pad(mask, 1)
        h, w = mask.shape
        mask = np.zeros_like(mask)
        for dy in range(3):
            for dx in range(3):
                mask = mask | padded[dy:dy + h, dx:dx + w]
    return mask


def edge_band(mask):
    """The pixels within 1 px of the mask's boundary, on either side: where soft edges may mix colours."""
    return dilate(mask) & ~(~dilate(~mask))


def border(shape):
    h, w = shape
    ring = np.zeros((h, w), dtype=bool)
    ring[0, :] = ring[-1, :] = ring[:, 0] = ring[:, -1] = True
    return ring


# -----------------------------------------------------------------------------
# geometry: which of the data's shapes a mask is


def fit_shape(mask):
    """Boolean mask -> (class name, IoU) of the best circle/square/triangle drawn by
    data._shape_mask. Centre and size start from the bounding box (every kind is `size` wide and
    high) and are refined over sizes +-1 px and centres +-0.5 px in half-pixel steps."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    m = 3  # a margin, so that a candidate larger than the mask is scored whole
    window = np.pad(mask, m)[y0:y1 + 2 * m, x0:x1 + 2 * m]
    gy, gx = np.meshgrid(np.arange(y0 - m, y1 + m) + 0.5, np.arange(x0 - m, x1 + m) + 0.5, indexing="ij")
    steps = np.array([-0.5, 0.0, 0.5])
    size = ((x1 - x0) + (y1 - y0)) / 2 + np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
    size, cx, cy = (a.reshape(-1, 1, 1) for a in np.meshgrid(size, (x0 + x1) / 2 + steps, (y0 + y1) / 2 + steps))
    best = (None, 0.0)
    for kind, name in enumerate(SHAPE_NAMES):
        fits = _shape_mask(kind, cx, cy, size, gx, gy)
        iou = ((fits & window).sum((1, 2)) / (fits | window).sum((1, 2))).max()
        if iou > best[1]:
            best = (name, float(iou))
    return best


# -----------------------------------------------------------------------------
# one shape on a background


def judge_shape(colours, distance, label, index):
    """Is region `index` of the label map a clean shape, judged by the pixels near it (within 3 px)?
    Another region touching it (within 1 px) must lie wholly in its edge band (mixed colours of a
    soft edge), else the two are touching shapes or one shape in two colours; regions farther
    away are shapes of their own, so the same test serves single images and canvases.
    -> (clean, class name or None, IoU, reason)."""
    shape = label == index
    band, near = edge_band(shape), dilate(shape, 3)
    specks = speck_pixels(label)
    for other in np.unique(label[dilate(shape) & ~shape & ~specks & (label >= 0)]):
        if ((label == other) & ~band).any():
            return False, None, 0.0, "touching: a region of another colour touches the shape beyond its edge"
    loose = near & specks & ~shape & ~band  # in the band, specks are a soft edge's mixed colours (rule 4)
    if loose.sum() > MAX_SPECK_PIXELS:
        return False, None, 0.0, (f"specks: {int(loose.sum())} speck pixels near the shape, beyond its edge "
                                  f"(at most {MAX_SPECK_PIXELS})")
    blurry = near & ~band & (distance > OFF_PALETTE)
    if blurry.any():
        return False, None, 0.0, f"blurry: {int(blurry.sum())} off-palette pixels away from the shape's edge"
    name, iou = fit_shape(shape)
    if iou < MIN_IOU:
        return False, None, iou, f"iou: best fit {name} with IoU {iou:.2f} < {MIN_IOU}"
    return True, name, iou, "clean"


def speck_pixels(label):
    """Pixels of regions of at most SPECK_PIXELS pixels."""
    sizes = np.bincount(label[label >= 0], minlength=1)
    return (label >= 0) & (sizes[np.maximum(label, 0)] <= SPECK_PIXELS)


def background_colour(colours):
    return int(np.bincount(colours[border(colours.shape)], minlength=len(PALETTE)).argmax())


def foreground_regions(colours):
    """(background colour, label map of the non-background regions)."""
    background = background_colour(colours)
    return background, regions(colours, colours != background)


def score_image(image):
    """One image (3, H, W) in [-1, 1] of the built-in shapes -> (clean, class name or None, IoU,
    reason): one clean shape on a flat background (the module docstring has the rules)."""
    colours, distance = snap(image)
    background, label = foreground_regions(colours)
    sizes = np.bincount(label[label >= 0], minlength=1)
    if sizes.max() <= SPECK_PIXELS:
        return False, None, 0.0, "empty: no region larger than a speck on the background"
    index = int(sizes.argmax())
    clean, name, iou, reason = judge_shape(colours, distance, label, index)
    shape = label == index
    specks = speck_pixels(label)
    # the rest of the image: flat background, but for the shape's edge band and a few speck pixels
    stray = ~shape & ~edge_band(shape) & (colours != background) & ~specks
    if clean and stray.any():
        return False, None, iou, f"stray: {int(stray.sum())} pixels of another colour away from the shape"
    loose = ~dilate(shape, 3) & ((distance > OFF_PALETTE) | specks)
    if clean and loose.sum() > MAX_SPECK_PIXELS:
        return False, None, iou, f"specks: {int(loose.sum())} off-palette or speck pixels in the background"
    return clean, name, iou, reason


def score_batch(images):
    """Images (B, 3, H, W) -> dict(n, share_clean, classes: Counter of clean shapes' classes,
    reasons: Counter of the reasons' first words, results: score_image's answer per image)."""
    results = [score_image(x) for x in images]
    classes = Counter(name for clean, name, _, _ in results if clean)
    reasons = Counter(reason.split(":")[0] for _, _, _, reason in results)
    return dict(n=len(results), share_clean=sum(r[0] for r in results) / max(1, len(results)),
                classes=classes, reasons=reasons, results=results)


# -----------------------------------------------------------------------------
# canvases of several shapes, and agreement with a semantic map


def score_canvas(image, shape_size):
    """A canvas (3, H, W) of several shapes -> dict(shapes: [(clean, class, IoU, reason)] for every
    region not touching the canvas border, one_background: bool). The background is one colour
    when that colour (the border majority) covers most of the border and no region is larger
    than the largest training shape (SHAPE_SIZE_RANGE[1] x shape_size, the trained image size,
    plus 2 px): a second background patch would be such a region."""
    colours, distance = snap(image)
    background, label = foreground_regions(colours)
    edge = border(colours.shape)
    sizes = np.bincount(label[label >= 0], minlength=1)
    touching = set(np.unique(label[edge & (label >= 0)]).tolist())
    shapes = [judge_shape(colours, distance, label, i)
              for i in range(len(sizes)) if sizes[i] > SPECK_PIXELS and i not in touching]
    largest = (SHAPE_SIZE_RANGE[1] * shape_size + 2) ** 2
    one_background = bool((colours[edge] == background).mean() > 0.5 and sizes.max(initial=0) <= largest)
    return dict(shapes=shapes, one_background=one_background)


def score_against_map(image, semantic):
    """An image (3, H, W) and the semantic map (H, W) it should follow (0 background, 1 + class)
    -> per map shape (a 4-connected region of one class): dict(wanted, predicted, map_iou,
    one_colour). The image's shape there is its largest non-background region overlapping the
    map's shape; predicted = its best-fitting class when that fit reaches MIN_IOU (else None);
    map_iou = its IoU with the map's shape; one_colour: >= 90% of the map's shape has that
    region's colour. The background colour is the majority over the map's background."""
    colours, _ = snap(image)
    semantic = np.asarray(semantic)
    background = int(np.bincount(colours[semantic == 0], minlength=len(PALETTE)).argmax()) if (semantic == 0).any() \
        else background_colour(colours)
    label = regions(colours, colours != background)
    wanted = regions(semantic, semantic > 0)
    out = []
    for k in range(int(wanted.max()) + 1):
        target = wanted == k
        cls = SHAPE_NAMES[int(semantic[target][0]) - 1]
        hits = np.bincount(label[target & (label >= 0)], minlength=1)
        if not hits.any():
            out.append(dict(wanted=cls, predicted=None, map_iou=0.0, one_colour=False))
            continue
        found = label == int(hits.argmax())
        name, fit = fit_shape(found)
        colour = colours[found][0]
        out.append(dict(wanted=cls, predicted=name if fit >= MIN_IOU else None,
                        map_iou=float((found & target).sum() / (found | target).sum()),
                        one_colour=bool((colours[target] == colour).mean() >= 0.9)))
    return out

"""
The tests of taming-mini: the math of every equation against hand-computed values, the behaviour
of the scripts, and their clear errors. Run: python -m pytest -q test_all.py  (minutes on 2 CPU cores)
"""

import copy
import os
import time

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import train_vqgan
from train_vqgan import (PALETTE, SHAPE_NAMES, ImageFileDataset, ShapesDataset, TorchvisionImages,
                         discriminator_step, find_images, make_datasets, save_image_grid, split_files)
from vqgan import (PAPER_CONFIG, VQGAN, Discriminator, VectorQuantizer, adaptive_weight, codebook_loss,
                   codebook_usage, commitment_loss, count_parameters, hinge_d_loss, hinge_g_loss, nearest_code,
                   straight_through)


# =============================================================================
# Stage 1: the VQGAN (vqgan.py) and its training script (train_vqgan.py)


def tiny_vqgan(**kw):
    cfg = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16,
               z_channels=8, embed_dim=4, n_codes=16)
    cfg.update(kw)
    return VQGAN(**cfg)


def tiny_train_config(out_dir, **kw):
    config = dict(train_vqgan.CONFIG, ch=8, ch_mult=(1, 2), attn_resolutions=(8,), z_channels=8, embed_dim=4,
                  n_codes=16, image_size=16, batch_size=4, max_steps=4, eval_interval=2, eval_images=8,
                  disc_start=1, disc_ndf=8, disc_layers=2, device="cpu", out_dir=str(out_dir))
    config.update(kw)
    return config


def test_nearest_code_picks_the_closest_code_eq2():
    codebook = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [-3.0, -3.0]])
    z = torch.tensor([[0.1, 0.1], [0.9, -0.2], [0.2, 1.4], [-1.0, -1.0], [-2.0, -2.5], [0.6, 0.0]])
    # by hand: nearest of each row is code 0, 1, 2, 0 (dist^2 2 vs 8), 3, 1 (0.16 vs 0.36)
    assert nearest_code(z, codebook).tolist() == [0, 1, 2, 0, 3, 1]
    # and against brute force on random data
    z, codebook = torch.randn(200, 5), torch.randn(37, 5)
    brute = ((z[:, None, :] - codebook[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(nearest_code(z, codebook), brute)


def test_straight_through_copies_the_gradient_unchanged():
    z_e = torch.randn(2, 3, 4, 4, requires_grad=True)
    z_q = torch.randn(2, 3, 4, 4)
    out = straight_through(z_e, z_q)
    assert torch.equal(out, z_e + (z_q - z_e))  # forward value is z_q (up to float rounding)
    assert torch.allclose(out, z_q, atol=1e-6)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    assert torch.equal(z_e.grad, upstream)


def test_codebook_and_commitment_losses_move_the_right_side_eq4():
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    z_e = torch.tensor([[0.5, 0.0], [0.0, 3.0]], requires_grad=True)
    z_q = codebook[torch.tensor([0, 1])]
    # (z_q - z_e) = [[0.5, 0], [0, -2]] -> mean of squares = (0.25 + 4) / 4
    cb = codebook_loss(z_e, z_q)
    assert cb.item() == pytest.approx(4.25 / 4)
    cb.backward()
    assert z_e.grad is None  # sg[E(x)]: the encoder gets nothing from the codebook term
    assert torch.allclose(codebook.grad, 2 * torch.tensor([[0.5, 0.0], [0.0, -2.0]]) / 4)

    codebook.grad = None
    z_q = codebook[torch.tensor([0, 1])]
    cm = commitment_loss(z_e, z_q, beta=0.25)
    assert cm.item() == pytest.approx(0.25 * 4.25 / 4)  # beta on the commitment term
    cm.backward()
    assert codebook.grad is None  # sg[z_q]: the codes get nothing from the commitment term
    assert torch.allclose(z_e.grad, 0.25 * 2 * torch.tensor([[-0.5, 0.0], [0.0, 2.0]]) / 4)


def test_vector_quantizer_gradients_beta_on_commitment():
    torch.manual_seed(0)
    vq = VectorQuantizer(n_codes=8, code_dim=3, beta=0.25)
    vq.embedding.weight.data = torch.randn(8, 3)
    z_e = torch.randn(2, 3, 4, 4, requires_grad=True)
    z_st, idx, loss = vq(z_e)
    z_q = vq.embedding.weight[idx].permute(0, 3, 1, 2)
    assert torch.allclose(z_st, z_q, atol=1e-6)
    loss.backward()
    n = z_e.numel()
    # d loss / d z_e = beta * 2 (z_e - z_q) / n ;  d loss / d code k = sum over its uses of 2 (z_q - z_e) / n
    assert torch.allclose(z_e.grad, 0.25 * 2 * (z_e - z_q).detach() / n, atol=1e-7)
    expected = torch.zeros(8, 3).index_add_(0, idx.flatten(), (2 * (z_q - z_e).detach() / n).permute(0, 2, 3, 1).reshape(-1, 3))
    assert torch.allclose(vq.embedding.weight.grad, expected, atol=1e-7)


def test_hinge_losses_on_known_logits_eq5():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2] -> mean 5/6 ; relu(1 + fake) = [0, 1, 2] -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert hinge_g_loss(fake).item() == pytest.approx(1 / 3)
    # a confident, correct D has zero loss (the hinge saturates)
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0.0


def test_adaptive_weight_is_the_ratio_of_gradient_norms_eq7():
    last = torch.zeros(4, requires_grad=True)
    a = torch.tensor([3.0, 4.0, 0.0, 0.0])  # grad of rec wrt last: norm 5
    b = torch.tensor([1.0, 1.0, 1.0, 1.0])  # grad of gan wrt last: norm 2
    lam = adaptive_weight((last * a).sum(), (last * b).sum(), last)
    assert lam.item() == pytest.approx(5 / (2 + 1e-6))
    assert not lam.requires_grad
    lam = adaptive_weight((last * a).sum(), (last * b).sum(), last, delta=1e-4)
    assert lam.item() == pytest.approx(5 / (2 + 1e-4))
    # a GAN gradient of zero: 5 / 1e-6 is clamped to 1e4
    assert adaptive_weight((last * a).sum(), (last * 0).sum(), last).item() == pytest.approx(1e4)


def test_codebook_usage_and_perplexity_by_hand():
    usage, ppl = codebook_usage(torch.tensor([0, 0, 1, 1]), 4)
    assert usage == 0.5 and ppl == pytest.approx(2.0)
    usage, ppl = codebook_usage(torch.tensor([3, 3, 3]), 4)
    assert usage == 0.25 and ppl == pytest.approx(1.0)
    usage, ppl = codebook_usage(torch.arange(8).repeat(5), 8)
    assert usage == 1.0 and ppl == pytest.approx(8.0)


def test_paper_configuration_has_the_official_parameter_count():
    with torch.device("meta"):
        model = VQGAN(**PAPER_CONFIG)
        disc = Discriminator()
    # official: encoder 29,298,176 + decoder 42,449,795 + codebook 262,144 + two 1x1 convs 65,792
    assert count_parameters(model.encoder) == 29_298_176
    assert count_parameters(model.decoder) == 42_449_795
    assert count_parameters(model) == 72_141_699
    assert count_parameters(disc) == 2_765_633
    assert model.downsample_factor == 16


def test_group_norm_keeps_32_groups_where_possible():
    from vqgan import Normalize
    assert Normalize(128).num_groups == 32 and Normalize(512).num_groups == 32
    assert Normalize(8).num_groups == 8 and Normalize(48).num_groups == 24


def test_vqgan_shapes_and_decode_indices():
    torch.manual_seed(0)
    model = tiny_vqgan().eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    z_q, idx, q_loss = model.encode(x)
    assert z_q.shape == (3, 4, 8, 8) and idx.shape == (3, 8, 8) and q_loss.ndim == 0
    assert idx.dtype == torch.long and 0 <= idx.min() and idx.max() < 16
    x_hat, idx2, _ = model(x)
    assert x_hat.shape == x.shape and torch.equal(idx, idx2)
    assert torch.allclose(model.decode_indices(idx), x_hat, atol=1e-4)  # z_e + (z_q - z_e) rounds
    # the convolutional model takes any multiple of f, e.g. a wider image
    assert model.encode(torch.zeros(1, 3, 16, 32))[1].shape == (1, 8, 16)


def test_discriminator_gets_no_gradient_from_the_generator_step(tmp_path):
    torch.manual_seed(0)
    config = tiny_train_config(tmp_path, disc_start=0)
    model, disc = tiny_vqgan(), Discriminator(ndf=8, n_layers=2)
    # lr 0 for both: the weights stay put, so the gradients left behind can be recomputed and compared
    opt_g, opt_d = torch.optim.SGD(model.parameters(), lr=0.0), torch.optim.SGD(disc.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    cpu = torch.device("cpu")
    logs, _ = train_vqgan.train_step(model, disc, None, opt_g, opt_d, scaler, x, 0, config, cpu, None)
    assert logs["lam"] > 0 and logs["d"] > 0
    got = [p.grad.clone() for p in disc.parameters()]
    # D's gradient is exactly that of the hinge D loss on (x, detached x_hat): G's step added nothing.
    disc.zero_grad(set_to_none=True)
    discriminator_step(disc, x, model(x)[0].detach()).backward()
    for g, p in zip(got, disc.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)
    # before disc_start D neither runs nor trains
    disc.zero_grad(set_to_none=True)
    logs, _ = train_vqgan.train_step(model, disc, None, opt_g, opt_d, scaler, x, 0, dict(config, disc_start=10), cpu, None)
    assert logs["d"] == 0.0 and logs["lam"] == 0.0
    assert all(p.grad is None for p in disc.parameters())


def test_generator_step_leaves_no_gradient_in_the_discriminator():
    torch.manual_seed(0)
    config = tiny_train_config("unused", disc_start=0)
    model, disc = tiny_vqgan(), Discriminator(ndf=8, n_layers=2)
    disc.requires_grad_(False)  # as train_step does
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    loss, x_hat, _, logs = train_vqgan.generator_step(model, disc, None, x, 0, config)
    loss.backward()
    assert all(p.grad is None for p in disc.parameters())
    assert model.last_layer.grad is not None and logs["lam"] > 0


def test_discriminator_step_does_not_reach_the_generator():
    torch.manual_seed(0)
    model, disc = tiny_vqgan(), Discriminator(ndf=8, n_layers=2)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    x_hat = model(x)[0]
    discriminator_step(disc, x, x_hat).backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in disc.parameters())


def test_a_few_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    config = tiny_train_config("unused", disc_start=10**9)
    model, disc = tiny_vqgan(), Discriminator(ndf=8, n_layers=2)
    opt_g = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=2e-3, betas=(0.5, 0.9))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x = torch.stack([train_vqgan.ShapesDataset(8, image_size=16, seed=1)[i][0] for i in range(8)])
    first = None
    for step in range(40):
        logs, _ = train_vqgan.train_step(model, disc, None, opt_g, opt_d, scaler, x, step, config,
                                         torch.device("cpu"), None)
        first = first if first is not None else logs["rec"]
    assert logs["rec"] < 0.6 * first


def test_psnr_by_hand():
    x = torch.zeros(2, 3, 4, 4)
    # 0.2 on the [-1, 1] scale is 0.1 on [0, 1]: MSE 0.01 -> 20 dB
    assert torch.allclose(train_vqgan.psnr(x, x + 0.2), torch.tensor([20.0, 20.0]), atol=1e-4)


def test_checkpoint_resume_gives_the_same_next_steps(tmp_path):
    full = train_vqgan.train(tiny_train_config(tmp_path / "full", max_steps=4))
    train_vqgan.train(tiny_train_config(tmp_path / "split", max_steps=2))
    resumed = train_vqgan.train(tiny_train_config(tmp_path / "split", max_steps=4, resume=True))
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    ckpt = train_vqgan.load_checkpoint(str(tmp_path / "split" / "ckpt.pt"), "vqgan")
    assert ckpt["step"] == 4 and set(ckpt) >= {"model", "disc", "opt_g", "opt_d", "config", "rng", "model_config"}
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "split").iterdir())  # atomic write
    assert (tmp_path / "split" / "recon_000004.png").exists()
    rows = (tmp_path / "split" / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and len(rows) == 3  # header + steps 2 and 4


def test_bad_flags_give_one_clear_line():
    parse = lambda *a: train_vqgan.parse_overrides(train_vqgan.CONFIG, list(a), train_vqgan.__file__)
    assert parse("--batch_size=8", "--ch_mult=1,2", "--resume=true") == dict(batch_size=8, ch_mult=(1, 2), resume=True)
    for args, words in [(("--batchsize=8",), "unknown flag --batchsize"),
                        (("--batch_size=eight",), "--batch_size=eight is not a int"),
                        (("--resume=maybe",), "true or false"),
                        (("--ch_mult=1;2",), "comma-separated"),
                        (("batch_size=8",), "--name=value")]:
        with pytest.raises(SystemExit) as e:
            parse(*args)
        assert words in str(e.value) and "\n" not in str(e.value)
    for overrides, words in [(dict(image_size=30), "not a multiple"), (dict(batch_size=0), "must be positive"),
                             (dict(preset="huge"), "preset"), (dict(val_fraction=1.5), "val_fraction")]:
        with pytest.raises(SystemExit) as e:
            train_vqgan.resolve_config(overrides)
        assert words in str(e.value)


def test_paper_preset_and_help(capsys):
    config = train_vqgan.resolve_config(dict(preset="paper", batch_size=2))
    assert config["image_size"] == 256 and config["n_codes"] == 1024 and config["disc_start"] == 10000
    assert config["lr"] == pytest.approx(4.5e-6 * 2)
    with pytest.raises(SystemExit) as e:
        train_vqgan.parse_overrides(train_vqgan.CONFIG, ["--help"], train_vqgan.__file__)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(f"    {name}=" in out for name in train_vqgan.CONFIG)


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint at"):
        train_vqgan.load_checkpoint(str(tmp_path / "missing.pt"), "vqgan")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="not a checkpoint this project can load"):
        train_vqgan.load_checkpoint(str(tmp_path / "junk.pt"), "vqgan")
    torch.save({"kind": "gpt"}, tmp_path / "gpt.pt")
    with pytest.raises(SystemExit, match="is a gpt checkpoint, not a vqgan checkpoint"):
        train_vqgan.load_checkpoint(str(tmp_path / "gpt.pt"), "vqgan")
    torch.save({"kind": "vqgan", "evil": copy.deepcopy}, tmp_path / "code.pt")  # pickles a function
    with pytest.raises(SystemExit, match="load safely"):
        train_vqgan.load_checkpoint(str(tmp_path / "code.pt"), "vqgan")


def _palette_index(rgb):
    """Index into PALETTE of a [-1, 1] colour vector (asserts it is a palette colour)."""
    as_uint8 = tuple(int(round(v)) for v in ((rgb + 1) * 127.5).tolist())
    assert as_uint8 in PALETTE, as_uint8
    return PALETTE.index(as_uint8)


# -----------------------------------------------------------------------------
# shapes

def test_shapes_items_have_documented_types_and_range():
    image, label, semantic = ShapesDataset(10, image_size=16, seed=0)[3]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1
    assert isinstance(label, int) and 0 <= label < len(SHAPE_NAMES)
    assert semantic.shape == (16, 16) and semantic.dtype == torch.long
    batch = next(iter(torch.utils.data.DataLoader(ShapesDataset(8, 16), batch_size=4)))
    assert batch[0].shape == (4, 3, 16, 16) and batch[1].shape == (4,) and batch[2].shape == (4, 16, 16)


def test_shapes_are_deterministic_per_seed_and_index_and_ignore_global_rng():
    a, b = ShapesDataset(50, 32, seed=7), ShapesDataset(50, 32, seed=7)
    torch.manual_seed(123)
    np.random.seed(123)
    first = [a[i] for i in range(50)]
    torch.manual_seed(999)
    np.random.seed(999)
    for i in reversed(range(50)):  # other order, other global state: same items
        assert torch.equal(first[i][0], b[i][0]) and first[i][1] == b[i][1]
        assert torch.equal(first[i][2], b[i][2])
    other = ShapesDataset(50, 32, seed=8)
    n_same = sum(torch.equal(first[i][0], other[i][0]) for i in range(50))
    assert n_same <= 1
    assert not torch.equal(first[0][0], first[1][0])  # and different across indices


def test_shapes_semantic_map_agrees_exactly_with_pixels():
    ds = ShapesDataset(300, 32, seed=1)
    for i in range(len(ds)):
        image, label, semantic = ds[i]
        shape = semantic > 0
        assert shape.any() and (~shape).any()
        assert (semantic[shape] == 1 + label).all()
        colours = image.permute(1, 2, 0)  # (H, W, 3)
        bg, fg = colours[~shape][0], colours[shape][0]
        assert (colours[~shape] == bg).all() and (colours[shape] == fg).all()
        assert _palette_index(bg) != _palette_index(fg)


def test_shapes_classes_and_colours_all_occur():
    ds = ShapesDataset(300, 16, seed=0)
    labels, colours = set(), set()
    for image, label, semantic in (ds[i] for i in range(len(ds))):
        labels.add(label)
        colours.add(_palette_index(image.permute(1, 2, 0)[semantic > 0][0]))
        colours.add(_palette_index(image.permute(1, 2, 0)[semantic == 0][0]))
    assert labels == {0, 1, 2}
    assert len(colours) == len(PALETTE) == 8


def _bbox_fill(mask):
    rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
    h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
    return mask.sum().item() / (h * w), h, w


def test_shape_masks_look_like_their_class():
    ds = ShapesDataset(150, 64, seed=2)
    fills = {0: [], 1: [], 2: []}
    for i in range(len(ds)):
        _, label, semantic = ds[i]
        fill, h, w = _bbox_fill(semantic > 0)
        fills[label].append(fill)
        assert abs(h - w) <= 2  # every shape is as wide as it is high
    assert all(f == 1.0 for f in fills[1])                         # square: filled box
    assert all(abs(f - np.pi / 4) < 0.08 for f in fills[0])        # circle: pi r^2 / (2r)^2
    assert all(0.4 < f < 0.62 for f in fills[2])                   # triangle: about half its box


@pytest.mark.parametrize("size", [8, 13, 128])
def test_shape_size_scales_with_image_size(size):
    ds = ShapesDataset(40, size, seed=3)
    fractions = [(ds[i][2] > 0).float().mean().item() for i in range(len(ds))]
    assert min(fractions) > 0.02 and max(fractions) < 0.7


def test_shapes_reject_tiny_images_and_bad_index():
    with pytest.raises(ValueError):
        ShapesDataset(10, image_size=7)
    with pytest.raises(IndexError):
        ShapesDataset(10, 16)[10]


def test_shapes_are_fast():
    ds = ShapesDataset(1000, 32)
    start = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    assert time.perf_counter() - start < 2.0


# -----------------------------------------------------------------------------
# a folder of images

def _make_folder(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (50, 30), dtype=np.uint8)).save(tmp_path / "gray.PNG")
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    # fully transparent red: must come out white if RGBA is composited on white
    Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(tmp_path / "sub" / "deeper" / "clear.png")
    (tmp_path / "sub" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_find_images_skips_and_names_bad_files(tmp_path):
    root = _make_folder(tmp_path)
    with pytest.warns(UserWarning) as record:
        good, bad = find_images(str(root))
    assert [os.path.basename(f) for f in good] == ["gray.PNG", "rgb.png", "clear.png"]
    assert [os.path.basename(f) for f in bad] == ["corrupt.png"]
    messages = [str(w.message) for w in record]
    assert any("corrupt.png" in m for m in messages)
    assert any("skipped 1 of 4 files" in m for m in messages)


def test_find_images_catches_truncated_jpeg(tmp_path):
    y, x = np.mgrid[:64, :64]
    Image.fromarray(np.stack([x * 4, y * 4, x + y], -1).astype(np.uint8)).save(tmp_path / "a.jpg")
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "b.jpg").write_bytes(data[: len(data) * 2 // 3])  # Image.verify() would pass this
    with pytest.warns(UserWarning) as record:
        good, bad = find_images(str(tmp_path))
    assert len(good) == 1 and len(bad) == 1
    assert any("b.jpg" in str(w.message) for w in record)


def test_folder_items_are_square_rgb_in_range(tmp_path):
    root = _make_folder(tmp_path)
    with pytest.warns(UserWarning):
        good, _ = find_images(str(root))
    for train in (True, False):
        ds = ImageFileDataset(good, image_size=16, train=train)
        for i in range(len(ds)):
            image, label = ds[i]
            assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and label == -1
            assert image.min() >= -1 and image.max() <= 1
    clear = ImageFileDataset([f for f in good if f.endswith("clear.png")], 16, train=False)[0][0]
    assert torch.allclose(clear, torch.ones_like(clear))  # composited on white
    val = ImageFileDataset(good, 16, train=False)
    assert torch.equal(val[1][0], val[1][0])  # centre crop is repeatable


def test_missing_empty_and_unreadable_folders_exit_naming_the_path(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(SystemExit, match="nope.*no such folder"):
        make_datasets(missing, 16)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="empty.*no readable images"):
        make_datasets(str(empty), 16)
    (empty / "bad.jpg").write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(SystemExit, match="empty.*no readable images"):
        make_datasets(str(empty), 16)


def test_val_split_sizes_and_determinism(tmp_path):
    files = [f"img{i:03d}.png" for i in range(100)]
    train, val = split_files(files, 0.05, seed=0)
    assert len(val) == 5 and len(train) == 95 and sorted(train + val) == files
    assert split_files(files, 0.05, seed=0) == (train, val)
    assert split_files(files, 0.05, seed=1)[1] != val
    assert len(split_files(files[:3], 0.05, seed=0)[1]) == 1  # at least one validation image
    assert len(split_files(files[:2], 0.9, seed=0)[0]) == 1   # and at least one training image
    with pytest.raises(SystemExit):
        split_files(files[:1], 0.05, seed=0)
    for i in range(6):
        Image.new("RGB", (12, 12), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    train_ds, val_ds = make_datasets(str(tmp_path), 8, val_fraction=0.34, seed=0)
    assert (len(train_ds), len(val_ds)) == (4, 2) and train_ds.train and not val_ds.train
    assert not set(train_ds.files) & set(val_ds.files)


def test_make_datasets_validates_arguments():
    with pytest.raises(SystemExit, match="image_size"):
        make_datasets("shapes", 4)
    for bad in (0, 1, -0.5):
        with pytest.raises(SystemExit, match="val_fraction"):
            make_datasets("shapes", 16, val_fraction=bad)


def test_make_datasets_shapes_uses_separate_seeds():
    train, val = make_datasets("shapes", 16, seed=0, num_shapes=100, num_val_shapes=10)
    assert (len(train), len(val)) == (100, 10)
    assert not torch.equal(train[0][0], val[0][0]) or train[0][1] != val[0][1]
    assert train.seed != val.seed


# -----------------------------------------------------------------------------
# torchvision datasets, with the classes faked: no network, no big downloads in tests

class _OfflineDataset:
    calls = []

    def __init__(self, root, download=False, **kwargs):
        _OfflineDataset.calls.append(download)
        if download:
            # worded like torchvision's MNIST error: several lines
            raise RuntimeError("Error downloading x.gz:\nTried https://example.org/, got:\n"
                               "<urlopen error [Errno -2] Name or service not known>\n")
        raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")


class _FakeMNIST:
    def __init__(self, root, download=False, train=True):
        assert not download  # files "present": never try the network

    def __len__(self):
        return 3

    def __getitem__(self, i):
        return Image.new("L", (28, 28), 255), 7


def test_torchvision_download_failure_exits_with_a_clear_line(monkeypatch, tmp_path):
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _OfflineDataset)
    _OfflineDataset.calls = []
    with pytest.raises(SystemExit) as info:
        make_datasets("cifar10", 32, data_root=str(tmp_path))
    message = str(info.value)
    assert _OfflineDataset.calls == [False, True]
    assert message.startswith("error: --data=cifar10: download") and "\n" not in message
    assert str(tmp_path) in message and "--data=shapes" in message and "urlopen error" in message


def test_torchvision_items_are_rgb_in_range_with_labels(monkeypatch, tmp_path):
    monkeypatch.setattr(torchvision.datasets, "MNIST", _FakeMNIST)
    train, val = make_datasets("mnist", 16, data_root=str(tmp_path))
    image, label = train[0]
    assert image.shape == (3, 16, 16) and label == 7
    assert torch.allclose(image, torch.ones_like(image))
    assert isinstance(val, TorchvisionImages) and len(val) == 3


# -----------------------------------------------------------------------------

def test_save_image_grid_writes_png_of_expected_size(tmp_path):
    images = torch.cat([-torch.ones(5, 3, 8, 8), torch.ones(5, 3, 8, 8)])
    path = save_image_grid(images, str(tmp_path / "new" / "grid.png"), nrow=4)
    assert path.endswith("grid.png") and os.path.exists(path)
    with Image.open(path) as img:
        assert img.size == (4 * (8 + 2) + 2, 3 * (8 + 2) + 2)  # 10 images in 3 rows, padding 2
        pixels = np.asarray(img.convert("RGB"))
    assert (pixels[2 + 3, 2 + 3] == 0).all()              # first tile: -1 -> black
    assert (pixels[2 + 10 + 3, 2 + 10 + 3] == 255).all()  # image 5 (row 1, col 1): +1 -> white

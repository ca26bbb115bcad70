"""
The tests of taming-mini: the math of every equation against hand-computed values, the behaviour
of the scripts, and their clear errors. Run: python -m pytest -q test_all.py  (minutes on 2 CPU cores)

Course kit (see EXERCISES below):
    python test_all.py --list-exercises          # the functions a course can blank out, and their tests
    python test_all.py --blank=codebook_loss     # a copy of the project with that function blanked
    python test_all.py --exercise=codebook_loss  # grade it: run only the tests that grade it
"""

import ast
import copy
import csv
import functools
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

import data
import gpt as gpt_module
import lpips_lite
import metrics
import sample
import shape_score
import train_gpt
import train_vqgan
import utils
import vqgan
import vqgan_loss
from data import (PALETTE, SHAPE_NAMES, ImageFileDataset, ScenesDataset, ShapesDataset, TorchvisionImages, draw_scene,
                  find_images, make_datasets, split_files)
from gpt import (GPT, KVCache, cond_tokens, corrupt_tokens, gpt_loss, load_official_gpt, sample_logits, sample_sliding_window,
                 spatial_cond_tokens, top_k_filter, top_p_filter, window_start)
from lpips_lite import LPIPS, WeightsUnavailable
from metrics import fid, frechet_distance, ssim
from utils import save_image_grid
from vqgan import (PAPER_CONFIG, VQGAN, Discriminator, VectorQuantizer, adaptive_weight, codebook_loss, codebook_usage,
                   commitment_loss, count_parameters, hinge_d_loss, hinge_g_loss, init_codebook_with_kmeans, kmeans,
                   last_layer_grads, load_official_vqgan, nearest_code, pixel_loss, restart_dead_codes, semantic_rec_loss,
                   straight_through, vqgan_config_from_state_dict)
from vqgan_loss import discriminator_step

# The models here are tiny: a second thread buys nothing, and on a busy machine two threads that
# wait on each other make the suite many times slower.
torch.set_num_threads(1)

# The official implementation's outputs for small random models (CompVis/taming-transformers
# @3ba01b2, fp32 on the CPU), recorded once into this repository's official_small_fixture.pt.
FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "official_small_fixture.pt")


# =============================================================================
# Course kit. Each equation lives in one small self-contained function; a course blanks one out
# (its body becomes `raise NotImplementedError`) and the tests marked @grades(name) grade the
# student's version. Blanking one makes exactly its grading tests fail, each with one line that
# names the missing equation (tested below: test_blanking_an_exercise_fails_exactly_its_tests).
# The end-to-end tests (training, sampling) need the functions too, so they fail as well until
# the exercise is done: grade with --exercise=NAME, which runs only the grading tests.

EXERCISES = {  # function: (file, what the student writes)
    "nearest_code": ("vqgan.py", "Eq. (2): the index of the nearest codebook entry, argmin_k ||z - e_k||^2"),
    "straight_through": ("vqgan.py", "the straight-through estimator: forward z_q, backward the gradient to z_e"),
    "codebook_loss": ("vqgan.py", "Eq. (4), codebook term: ||sg[E(x)] - z_q||^2"),
    "commitment_loss": ("vqgan.py", "Eq. (4), commitment term: beta ||sg[z_q] - E(x)||^2"),
    "hinge_d_loss": ("vqgan.py", "Eq. (5), discriminator: mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))), halved"),
    "hinge_g_loss": ("vqgan.py", "Eq. (5), generator: -mean(D(x_hat))"),
    "adaptive_weight": ("vqgan.py", "Eq. (7): lambda = ||grad L_rec|| / (||grad L_GAN|| + delta) at the last layer"),
    "gpt_loss": ("gpt.py", "Eq. (8)/(9): mean cross-entropy of each image token given the ones before it"),
    "cond_tokens": ("gpt.py", "Eq. (10): the conditioning token(s) put before the image tokens"),
    "top_k_filter": ("gpt.py", "top-k sampling: keep the k most likely codes"),
    "top_p_filter": ("gpt.py", "top-p (nucleus) sampling: keep the smallest set holding probability p"),
    "window_start": ("gpt.py", "the sliding window rule (Sec. 3.2, Fig. 3): where the window around a token starts"),
}
GRADED_BY = {name: [] for name in EXERCISES}  # exercise -> names of its grading tests (filled by @grades)


def innermost_function(error):
    """The name of the function an exception was raised in."""
    tb = error.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_name


def grades(*names):
    """Marks a test as grading the exercises `names`. A blank exercise (NotImplementedError) then
    fails the test with one line naming the missing equation instead of a traceback."""
    def mark(test):
        for name in names:
            GRADED_BY[name].append(test.__name__)

        @functools.wraps(test)  # pytest still sees the test's own arguments (fixtures, parameters)
        def graded(*args, **kwargs):
            try:
                return test(*args, **kwargs)
            except NotImplementedError as e:
                blank = innermost_function(e)
                if blank not in EXERCISES:
                    raise
            file, what = EXERCISES[blank]  # outside the except: no "during handling..." traceback
            pytest.fail(f"exercise {file}:{blank} is blank: write {what}", pytrace=False)
        return graded
    return mark


def blank_function(source, name):
    """Python source with function `name`'s body (after its docstring) replaced by
    `raise NotImplementedError(...)`: the form in which a course hands an exercise out."""
    node = next((n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name == name), None)
    if node is None:
        raise ValueError(f"no function {name} in this file")
    has_docstring = isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant) \
        and isinstance(node.body[0].value.value, str)
    first = node.body[1] if has_docstring and len(node.body) > 1 else node.body[0]
    lines = source.splitlines(keepends=True)
    indent = " " * first.col_offset
    todo = f"{indent}raise NotImplementedError(\"exercise: {EXERCISES[name][1]}\")\n"
    return "".join(lines[:first.lineno - 1] + [todo] + lines[node.end_lineno:])


def write_blanked_copy(name, folder):
    """Copy the project's files into `folder` with exercise `name` blanked; returns the folder."""
    here = os.path.dirname(os.path.abspath(__file__))
    os.makedirs(folder, exist_ok=True)
    for file in os.listdir(here):
        if file.endswith(".py") or file in ("official_small_fixture.pt", "README.md"):
            shutil.copy(os.path.join(here, file), folder)
    path = os.path.join(folder, EXERCISES[name][0])
    with open(path) as f:
        source = blank_function(f.read(), name)
    with open(path, "w") as f:
        f.write(source)
    return folder


def course_kit(argv):
    """python test_all.py --list-exercises | --blank=NAME | --exercise=NAME"""
    flag, _, name = (argv[0] if argv else "").partition("=")
    if flag == "--list-exercises":
        for ex, (file, what) in EXERCISES.items():
            print(f"{file}:{ex}\n    {what}\n    graded by: {', '.join(GRADED_BY[ex])}")
        return 0
    if flag in ("--blank", "--exercise") and name not in EXERCISES:
        raise SystemExit(f"error: no exercise '{name}' (python test_all.py --list-exercises names them)")
    if flag == "--blank":
        folder = write_blanked_copy(name, os.path.join("exercises", name))
        print(f"wrote {folder}/ : the project with {EXERCISES[name][0]}:{name} blanked; "
              f"grade it there with: python test_all.py --exercise={name}")
        return 0
    if flag == "--exercise":
        return pytest.main(["-q", "-p", "no:cacheprovider"] + [f"{__file__}::{t}" for t in GRADED_BY[name]])
    raise SystemExit("usage: python test_all.py --list-exercises | --blank=NAME | --exercise=NAME "
                     "(the full suite: python -m pytest -q test_all.py)")


# =============================================================================
# vqgan.py: the model, the quantizer and the loss terms (Sec. 3.1)


def tiny_vqgan(**kw):
    cfg = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16,
               z_channels=8, embed_dim=4, n_codes=16)
    cfg.update(kw)
    return VQGAN(**cfg)


def tiny_train_config(out_dir, **kw):
    config = dict(train_vqgan.CONFIG, ch=8, ch_mult=(1, 2), attn_resolutions=(8,), z_channels=8, embed_dim=4,
                  n_codes=16, image_size=16, batch_size=4, max_steps=4, eval_interval=2, eval_images=8,
                  disc_start=1, disc_ndf=8, disc_layers=2, warmup_steps=0, device="cpu", out_dir=str(out_dir))
    config.update(kw)
    return config


@grades("nearest_code")
def test_nearest_code_picks_the_closest_code_eq2():
    codebook = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [-3.0, -3.0]])
    z = torch.tensor([[0.1, 0.1], [0.9, -0.2], [0.2, 1.4], [-1.0, -1.0], [-2.0, -2.5], [0.6, 0.0]])
    # by hand: nearest of each row is code 0, 1, 2, 0 (dist^2 2 vs 8), 3, 1 (0.16 vs 0.36)
    assert nearest_code(z, codebook).tolist() == [0, 1, 2, 0, 3, 1]
    # and against brute force on random data
    z, codebook = torch.randn(200, 5), torch.randn(37, 5)
    brute = ((z[:, None, :] - codebook[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(nearest_code(z, codebook), brute)


@grades("straight_through")
def test_straight_through_copies_the_gradient_unchanged():
    z_e = torch.randn(2, 3, 4, 4, requires_grad=True)
    z_q = torch.randn(2, 3, 4, 4)
    out = straight_through(z_e, z_q)
    assert torch.equal(out, z_e + (z_q - z_e))  # forward value is z_q (up to float rounding)
    assert torch.allclose(out, z_q, atol=1e-6)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    assert torch.equal(z_e.grad, upstream)


@grades("codebook_loss", "commitment_loss")
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


@grades("nearest_code", "straight_through", "codebook_loss", "commitment_loss")
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


@grades("hinge_d_loss", "hinge_g_loss")
def test_hinge_losses_on_known_logits_eq5():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2] -> mean 5/6 ; relu(1 + fake) = [0, 1, 2] -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert hinge_g_loss(fake).item() == pytest.approx(1 / 3)
    # a confident, correct D has zero loss (the hinge saturates)
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0.0


@grades("adaptive_weight")
def test_adaptive_weight_is_the_ratio_of_gradient_norms_eq7():
    a = torch.tensor([3.0, 4.0, 0.0, 0.0], requires_grad=True)  # grad of L_rec at G_L: norm 5
    b = torch.tensor([1.0, 1.0, 1.0, 1.0])  # grad of L_GAN at G_L: norm 2
    lam = adaptive_weight(a, b)
    assert lam.item() == pytest.approx(5 / (2 + 1e-6))
    assert not lam.requires_grad
    assert adaptive_weight(a, b, delta=1e-4).item() == pytest.approx(5 / (2 + 1e-4))
    # a GAN gradient of zero: 5 / 1e-6 is clamped to 1e4
    assert adaptive_weight(a, b * 0).item() == pytest.approx(1e4)
    # the gradients it is given are those of the two losses at the last layer
    last = torch.zeros(4, requires_grad=True)
    rec_grad, gan_grad = last_layer_grads((last * a.detach()).sum(), (last * b).sum(), last)
    assert torch.equal(rec_grad, a.detach()) and torch.equal(gan_grad, b)


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


def step_args(step, config):
    """(lr, use_disc, losses) for train_step at `step`, as train_vqgan.py's loop computes them."""
    lr = utils.lr_at(step, config["lr"], config["max_steps"], config["warmup_steps"], config["lr_schedule"])
    use_disc = vqgan_loss.discriminator_on(step, config["disc_start"], config["condition"] == "semantic")
    return lr, use_disc, train_vqgan.loss_settings(config)


def run_train_step(model, disc, opt_g, opt_d, scaler, x, step, config):
    lr, use_disc, losses = step_args(step, config)
    return vqgan_loss.train_step(model, disc, None, opt_g, opt_d, scaler, x, lr, use_disc, losses, torch.device("cpu"), None)


def run_generator_step(model, disc, x, step, config):
    _, use_disc, losses = step_args(step, config)
    return vqgan_loss.generator_step(model, disc, None, x, use_disc, **losses)


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


@grades("nearest_code", "straight_through", "codebook_loss", "commitment_loss")
def test_quantizer_matches_the_official_one():
    ref = torch.load(FIXTURE, weights_only=True)["quantizers"]
    for name in ("vq2_legacyFalse", "vq2_legacyTrue"):
        r = ref[name]
        vq = VectorQuantizer(n_codes=32, code_dim=4, beta=0.25)
        vq.load_state_dict(r["state_dict"])
        z = r["z"].clone().requires_grad_(True)
        z_q, idx, loss = vq(z)
        assert torch.equal(idx, r["indices_bhw"]) and torch.allclose(z_q, r["z_q"], atol=1e-6)
        assert loss.item() == pytest.approx(r["loss"].item(), rel=1e-5)  # the forward value is the same either way
        # the reference differentiated loss + sum(z_q^2) (a stand-in for the decoder's gradient through
        # the straight-through path). Ours agrees exactly with legacy=False (beta on the commitment
        # term, the paper) and differs from legacy=True (beta on the codebook term, the official bug).
        (loss + z_q.pow(2).sum()).backward()
        same_z = torch.allclose(z.grad, r["grad_z"], atol=1e-6)
        same_codebook = torch.allclose(vq.embedding.weight.grad, r["grad_codebook"], atol=1e-6)
        assert same_z == same_codebook == (name == "vq2_legacyFalse")


@grades("hinge_d_loss", "adaptive_weight")
def test_loss_helpers_match_the_official_ones():
    r = torch.load(FIXTURE, weights_only=True)["loss_helpers"]
    assert hinge_d_loss(r["logits_real"], r["logits_fake"]).item() == pytest.approx(r["hinge_d_loss"].item(), rel=1e-6)
    a = r["adaptive"]
    w = a["last_layer"].clone().requires_grad_(True)
    out = F.conv2d(a["inp"], w, padding=1)
    nll, g = out.abs().mean(), -torch.tanh(0.3 * out).mean()
    assert nll.item() == pytest.approx(a["nll"].item(), rel=1e-5) and g.item() == pytest.approx(a["g"].item(), rel=1e-4)
    lam = adaptive_weight(*last_layer_grads(nll, g, w), delta=1e-4) * 0.8  # the official delta and disc_weight
    assert lam.item() == pytest.approx(a["d_weight(disc_weight=0.8)"].item(), rel=1e-5)


def official_layout(model, disc):
    """A Lightning-style checkpoint dict of our models under the official key names."""
    sd = dict(model.state_dict())
    sd.update({"loss.discriminator." + k: v for k, v in disc.state_dict().items()})
    sd["loss.perceptual_loss.scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)  # ignored: our own LPIPS
    return {"state_dict": sd}


def test_vqgan_config_is_inferred_from_shapes_alone():
    with torch.device("meta"):  # shapes only, no memory
        sd = VQGAN(**PAPER_CONFIG).state_dict()
    assert vqgan_config_from_state_dict(sd) == dict(PAPER_CONFIG, in_channels=3, out_channels=3)
    with torch.device("meta"):  # attention at two levels, 3 res blocks, f=8
        sd = VQGAN(ch=64, ch_mult=(1, 2, 2, 4), num_res_blocks=3, attn_resolutions=(64, 32), resolution=128,
                   z_channels=4, embed_dim=3, n_codes=512).state_dict()
    cfg = vqgan_config_from_state_dict(sd)
    # the same attention levels (1 and 2) expressed at the official resolution 256
    assert (cfg["ch_mult"], cfg["num_res_blocks"], cfg["attn_resolutions"], cfg["resolution"]) == \
        ((1, 2, 2, 4), 3, (128, 64), 256)
    # ... which builds the identical network
    with torch.device("meta"):
        assert {k: v.shape for k, v in VQGAN(**cfg).state_dict().items()} == {k: v.shape for k, v in sd.items()}
    assert (cfg["z_channels"], cfg["embed_dim"], cfg["n_codes"]) == (4, 3, 512)


def test_load_official_vqgan_round_trips_model_and_discriminator():
    torch.manual_seed(0)
    model, disc = tiny_vqgan().eval(), Discriminator(ndf=8, n_layers=2).eval()
    with torch.no_grad():  # non-default BatchNorm statistics, so that the buffers are checked too
        for m in disc.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    loaded, loaded_disc = load_official_vqgan(official_layout(model, disc))
    assert loaded_disc.config == disc.config
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        x_hat, idx, _ = model(x)
        y_hat, idy, _ = loaded.eval()(x)
        assert torch.equal(idx, idy) and torch.equal(x_hat, y_hat)
        assert torch.equal(disc(x), loaded_disc.eval()(x))
    # without loss.discriminator.* there is no discriminator
    assert load_official_vqgan(model.state_dict())[1] is None


def test_paper_size_vqgan_round_trips_under_the_official_key_names(tmp_path):
    torch.manual_seed(0)
    model, disc = VQGAN(**PAPER_CONFIG), Discriminator(ndf=64, n_layers=3)
    ckpt = official_layout(model, disc)
    # every key and shape of the published ImageNet f16 checkpoint (LPIPS aside), and nothing else
    official = torch.load(FIXTURE, weights_only=True)["paper_vqgan_keys"]
    ours = {k: list(v.shape) for k, v in ckpt["state_dict"].items() if not k.startswith("loss.perceptual_loss.")}
    assert ours == official
    path = tmp_path / "paper.ckpt"
    torch.save(ckpt, path)
    loaded, loaded_disc = load_official_vqgan(utils.load_official_state_dict(path))
    assert loaded.config == model.config
    for mine, theirs in ((model, loaded), (disc, loaded_disc)):
        sd = theirs.state_dict()
        assert sd.keys() == mine.state_dict().keys()
        assert all(torch.equal(v, sd[k]) for k, v in mine.state_dict().items())


def test_load_official_vqgan_names_missing_and_unexpected_keys():
    model, disc = tiny_vqgan(), Discriminator(ndf=8, n_layers=2)
    sd = official_layout(model, disc)["state_dict"]
    missing = {k: v for k, v in sd.items() if k != "decoder.up.1.block.0.conv2.bias"}
    with pytest.raises(ValueError, match=r"missing: decoder\.up\.1\.block\.0\.conv2\.bias"):
        load_official_vqgan(missing)
    with pytest.raises(ValueError, match=r"unexpected: quantize\.extra"):
        load_official_vqgan(dict(sd, **{"quantize.extra": torch.zeros(1)}))
    with pytest.raises(ValueError, match=r"loss\.discriminator.*unexpected: main\.9\.weight"):
        load_official_vqgan(dict(sd, **{"loss.discriminator.main.9.weight": torch.zeros(1)}))
    with pytest.raises(ValueError, match="no tensor 'quantize.embedding.weight'"):
        load_official_vqgan({k: v for k, v in sd.items() if not k.startswith("quantize.")})


def test_official_vqgan_weights_reproduce_the_official_outputs():
    # The official VQModel (ch 32, ch_mult 1,1,2, attention at 8, K 64) with its own weights, rounded
    # to fp16 to keep the fixture small; its outputs were computed in fp32. A wrong padding, norm or
    # attention layout would be off by O(0.1); the fp16 rounding accounts for about 1e-3.
    v = torch.load(FIXTURE, weights_only=True)["vqmodel"]
    sd = {k: t.float() if t.is_floating_point() else t for k, t in v["state_dict_fp16"].items()}
    model, disc = load_official_vqgan(sd)
    model.eval()
    assert disc is None and model.config["ch_mult"] == [1, 1, 2] and model.n_codes == 64
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(v["x"]), v["enc_out"], atol=5e-3, rtol=0)
        z_q, indices, _ = model.encode(v["x"])
        assert (indices.flatten() == v["indices"]).float().mean() > 0.97  # rounding may flip a near-tie
        torch.testing.assert_close(model.quantize.lookup(v["indices"].view(2, 8, 8)), v["quant"], atol=1e-5, rtol=0)
        torch.testing.assert_close(model.decode(v["quant"]), v["dec"], atol=1e-2, rtol=0)


def test_quantizer_distances_and_losses_stay_fp32_under_autocast():
    # CPU autocast to bf16 stands in for CUDA's here: both would run a plain matmul in bf16.
    torch.manual_seed(0)
    vq = VectorQuantizer(n_codes=32, code_dim=8)
    a = torch.randn(16, 8) * 30                     # |a|^2 ~ 7000: bf16 resolves ~30 there
    u = F.normalize(torch.randn(16, 8), dim=1)
    vq.embedding.weight.data = torch.stack([a, a + u], 1).reshape(32, 8)  # pairs of codes 1 apart
    z_e = (a + 0.3 * u)[:, :, None, None]           # closer to code 2i (0.09 vs 0.49 squared)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q, idx, loss = vq(z_e)
    assert loss.dtype == torch.float32 and z_q.dtype == torch.float32
    assert torch.equal(idx.flatten(), torch.arange(0, 32, 2))


def _saved_bytes_and_grads(model, loss_fn):
    """Bytes autograd keeps for backward while loss_fn(model) is built, and the gradients."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model)
    model.zero_grad(set_to_none=True)
    loss.backward()
    return sum(saved), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", ["vqgan", "gpt"])
def test_grad_checkpointing_keeps_the_gradients_and_stores_less(kind):
    torch.manual_seed(0)
    if kind == "vqgan":
        model, x = tiny_vqgan(), torch.rand(2, 3, 16, 16) * 2 - 1

        def loss_fn(m):
            x_hat, _, q_loss = m(x)
            return (x_hat - x).abs().mean() + q_loss
        switch = lambda m, on: setattr(m.encoder, "grad_checkpointing", on) or setattr(m.decoder, "grad_checkpointing", on)
    else:
        model, seq = GPT(n_codes=16, block_size=12, n_layer=2, n_head=2, n_embd=16), torch.randint(0, 16, (2, 12))
        loss_fn = lambda m: gpt_loss(m(seq[:, :-1]), seq, n_cond=1)
        switch = lambda m, on: setattr(m, "grad_checkpointing", on)
    plain_bytes, plain_grads = _saved_bytes_and_grads(model, loss_fn)
    switch(model, True)
    ckpt_bytes, ckpt_grads = _saved_bytes_and_grads(model, loss_fn)
    assert ckpt_bytes < 0.6 * plain_bytes  # only block inputs are kept (the rest is recomputed)
    for a, b in zip(plain_grads, ckpt_grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_semantic_reconstruction_loss_and_accuracy_by_hand():
    one_hot = data.one_hot_map(torch.tensor([[[0, 0, 1]]]), 2)  # 1 map of 1x3 pixels, classes 0, 0, 1
    assert one_hot.tolist() == [[[[1.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]]]]
    # pixel 1: logits (0, 0) -> -log 1/2; pixel 2: (log 3, 0) -> -log 3/4; pixel 3: (0, log 3), class 1 -> -log 3/4
    logits = torch.tensor([[[[0.0, np.log(3), 0.0]], [[0.0, 0.0, np.log(3)]]]])
    expected = (np.log(2) + 2 * np.log(4 / 3)) / 3
    assert semantic_rec_loss(logits, one_hot).item() == pytest.approx(expected, rel=1e-6)
    # argmax: pixel 1 is a tie (argmax picks class 0, right), pixels 2 and 3 right; flip pixel 3 -> 2/3
    assert metrics.pixel_accuracy(logits, one_hot).tolist() == [1.0]
    assert metrics.pixel_accuracy(-logits, one_hot).item() == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match=r"class id out of range \[0, 2\)"):
        data.one_hot_map(torch.tensor([[[0, 2]]]), 2)


def test_condition_vqgan_round_trips_semantic_maps(tmp_path):
    # 16x16 shapes' maps, K = 16 codes, f = 2: a few hundred steps give well over the 70% that
    # "all background" would score; the PNG shows the maps in colour, the checkpoint records the kind
    torch.manual_seed(0)
    config = tiny_train_config(tmp_path, condition="semantic", cond_classes=4, max_steps=250, eval_interval=250,
                               eval_images=64, batch_size=8, lr=3e-3)
    model = train_vqgan.train(config).eval()
    maps = torch.stack([ShapesDataset(32, 16, seed=7)[i][2] for i in range(32)])
    x = data.one_hot_map(maps, 4)
    with torch.no_grad():
        accuracy = metrics.pixel_accuracy(model(x)[0], x).mean().item()
    assert accuracy > 0.9, accuracy
    ckpt = utils.load_checkpoint(str(tmp_path / "ckpt.pt"), "vqgan")
    assert ckpt["config"]["condition"] == "semantic" and ckpt["config"]["cond_classes"] == 4
    assert ckpt["model_config"]["in_channels"] == ckpt["model_config"]["out_channels"] == 4
    png = np.array(Image.open(tmp_path / "recon_000250.png"))
    assert {tuple(c) for c in png.reshape(-1, 3)} <= {(0, 0, 0), (255, 255, 255), (230, 25, 25), (25, 180, 25),
                                                       (30, 60, 230), (128, 128, 128)}  # class colours + padding


def test_l2_lookup_picks_the_largest_cosine_similarity_not_the_nearest_point():
    # z = (3, 1): Euclid is closest to the short code (0, 0.1) (distance^2 9.81 vs 50 to (10, 0)),
    # but its direction is closest to (10, 0): cos 3/sqrt(10) = 0.95 against 1/sqrt(10) = 0.32.
    codes = torch.tensor([[10.0, 0.0], [0.0, 0.1], [-1.0, -1.0]])
    z_e = torch.tensor([3.0, 1.0]).view(1, 2, 1, 1)
    plain, l2 = VectorQuantizer(3, 2), VectorQuantizer(3, 2, l2_codes=True)
    for vq in (plain, l2):
        vq.embedding.weight.data = codes.clone()
    assert plain(z_e)[1].item() == 1
    z_q, idx, loss = l2(z_e)
    assert idx.item() == 0
    assert torch.allclose(z_q.flatten(), torch.tensor([1.0, 0.0]))  # the unit code, not (10, 0)
    # Eq. (4) between unit vectors: (1 + beta) * mean((z/|z| - e/|e|)^2)
    u = torch.tensor([3.0, 1.0]) / 10 ** 0.5
    assert loss.item() == pytest.approx(1.25 * ((u - torch.tensor([1.0, 0.0])) ** 2).mean().item(), rel=1e-6)
    assert torch.allclose(l2.lookup(idx), z_q)


def test_code_dim_projects_to_the_lookup_space_and_back():
    torch.manual_seed(0)
    model = tiny_vqgan(code_dim=3, l2_codes=True).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z_e = model.quant_conv(model.encoder(x))
    z_q, idx, _ = model.encode(x)
    assert model.quantize.embedding.weight.shape == (16, 3) and z_q.shape == z_e.shape == (2, 4, 8, 8)
    # the lookup: largest cosine similarity between the projected encoder output and the codes
    z = F.normalize(model.quantize.proj_in(z_e).permute(0, 2, 3, 1).reshape(-1, 3), dim=1)
    codes = F.normalize(model.quantize.embedding.weight, dim=1)
    assert torch.equal(idx.flatten(), (z @ codes.t()).argmax(1))
    # decoding a token grid goes through the same projection out as the forward pass
    assert torch.allclose(model.quantize.lookup(idx), z_q, atol=1e-6)
    # the config rebuilds it; with the options off, the paper's keys and nothing else
    VQGAN(**model.config).load_state_dict(model.state_dict())
    assert {k for k in model.state_dict() if k.startswith("quantize.")} == {
        "quantize.embedding.weight", "quantize.proj_in.weight", "quantize.proj_in.bias",
        "quantize.proj_out.weight", "quantize.proj_out.bias"}
    assert [k for k in tiny_vqgan().state_dict() if k.startswith("quantize.")] == ["quantize.embedding.weight"]
    with pytest.raises(ValueError, match="code_dim must be 0"):
        tiny_vqgan(code_dim=-1)


def _clusters(centres, per_cluster=50, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor(centres)
    return (centres.repeat_interleave(per_cluster, 0) + noise * torch.randn(len(centres) * per_cluster,
                                                                             centres.shape[1], generator=g))


def test_kmeans_recovers_well_separated_clusters():
    centres = [[10.0, 10.0], [-10.0, 10.0], [10.0, -10.0], [-10.0, -10.0]]
    found = kmeans(_clusters(centres), 4, generator=torch.Generator().manual_seed(1))
    # one centroid per cluster, each at its cluster's mean (noise 0.05 over 50 points)
    assert torch.cdist(found, torch.tensor(centres)).min(0).values.max() < 0.05
    assert torch.cdist(found, torch.tensor(centres)).argmin(1).unique().numel() == 4
    with pytest.raises(ValueError, match="too few"):
        kmeans(torch.zeros(3, 2), 4)


def test_kmeans_init_starts_every_code_on_the_data():
    centres = [[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0], [-3.0, -3.0, -3.0]]
    z_e = _clusters(centres, per_cluster=16).view(4, 4, 4, 3).permute(0, 3, 1, 2)  # (B, C, h, w)
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 3)
    assert codebook_usage(vq(z_e)[1], 4)[0] < 1  # the official init (+-1/K) starts codes in a corner
    init_codebook_with_kmeans(vq, z_e, generator=torch.Generator().manual_seed(0))
    assert torch.cdist(vq.embedding.weight, torch.tensor(centres)).min(1).values.max() < 0.05
    assert codebook_usage(vq(z_e)[1], 4)[0] == 1.0


def test_a_dead_code_is_restarted_on_recent_data_and_then_used():
    vq = VectorQuantizer(4, 2).train()
    vq.embedding.weight.data = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [50.0, 50.0]])
    z_e = torch.tensor([[1.1, 0.0], [0.0, 0.9], [-1.0, 0.1], [0.5, 0.5]]).t().reshape(1, 2, 2, 2)
    opt = torch.optim.Adam(vq.parameters())
    vq(z_e)[2].backward()
    opt.step()
    state = opt.state[vq.embedding.weight]
    state["exp_avg"].fill_(1.0)  # stale moments to be cleared for the restarted code only
    age = torch.zeros(4, dtype=torch.long)
    _, idx, _ = vq(z_e)
    assert 3 not in idx and restart_dead_codes(vq, idx, age, max_age=2, optimizer=opt) == 0
    assert age.tolist() == [0, 0, 0, 1]
    assert restart_dead_codes(vq, idx, age, max_age=2, optimizer=opt) == 1  # unused for 2 steps
    new = vq.embedding.weight[3].detach()
    assert any(torch.equal(new, row) for row in vq.recent)  # now exactly one of the encoder outputs
    assert age[3] == 0 and state["exp_avg"][3].eq(0).all() and state["exp_avg"][:3].eq(1).all()
    assert 3 in vq(z_e)[1]


def _restart_on_two_ranks(rank, folder):
    # Rank 0 uses codes 0 and 1, rank 1 uses code 2: only code 3 is unused everywhere.
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    torch.manual_seed(rank)  # different random picks on each rank: the broadcast must override them
    vq = VectorQuantizer(4, 2).train()
    vq.embedding.weight.data = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [50.0, 50.0]])
    z_e = (torch.tensor([[1.0, 0.1], [0.1, 1.0]]) if rank == 0 else torch.tensor([[-1.0, 0.2], [-1.1, 0.0]]))
    _, idx, _ = vq(z_e.t().reshape(1, 2, 1, 2))
    restarted = restart_dead_codes(vq, idx, torch.zeros(4, dtype=torch.long), max_age=1)
    torch.save(dict(restarted=restarted, codes=vq.embedding.weight.detach()), f"{folder}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_dead_code_restart_takes_the_same_decision_on_every_ddp_rank(tmp_path):
    # fork: the children start with this process's modules loaded (spawn would import them again, seconds)
    torch.multiprocessing.start_processes(_restart_on_two_ranks, args=(str(tmp_path),), nprocs=2, start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["restarted"] == r1["restarted"] == 1  # code 2 is alive: rank 1 used it
    assert torch.equal(r0["codes"], r1["codes"]) and r0["codes"][3].abs().max() < 2


def test_load_vqgan_and_load_gpt_read_own_and_official_files(tiny_runs, tmp_path):
    root, _ = tiny_runs
    same = lambda a, b: a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # this project's checkpoints
    for load, name in ((vqgan.load_vqgan, "vqgan"), (gpt_module.load_gpt, "gpt")):
        path = str(root / name / "ckpt.pt")
        assert same(load(path).state_dict(), utils.load_checkpoint(path, name)["model"])
    # official Lightning files (with a pickled object beside the state dict)
    torch.manual_seed(0)
    vq, disc = tiny_vqgan(), Discriminator(ndf=8, n_layers=2)
    path = str(tmp_path / "vqgan.ckpt")
    torch.save(dict(official_layout(vq, disc), callbacks=PickledCallback()), path)
    assert same(vqgan.load_vqgan(path).state_dict(), vq.state_dict())
    gpt = GPT(16, 65, n_layer=1, n_head=2, n_embd=16).eval()
    layout = official_transformer_layout(gpt, vq)
    path = str(tmp_path / "gpt.ckpt")
    torch.save(layout, path)
    idx = torch.randint(0, 16, (2, 10))  # image codes (the start token is official code 0, not ours)
    with torch.no_grad():
        torch.testing.assert_close(gpt_module.load_gpt(path, n_head=2).eval()(idx), gpt(idx))
    assert gpt_module.load_gpt(path, n_head=2, n_classes=3).n_cond_tokens == 3
    # a depth-to-image transformer: the condition VQGAN's codebook gives the condition tokens
    layout["state_dict"]["cond_stage_model.quantize.embedding.weight"] = torch.zeros(8, 4)
    torch.save(layout, path)
    assert gpt_module.load_gpt(path, n_head=2).n_cond_tokens == 8
    # each refuses the other's file, in one line
    assert "is a gpt checkpoint, not a vqgan" in one_error_line(lambda: vqgan.load_vqgan(str(root / "gpt" / "ckpt.pt")))
    assert "no tensor 'tok_emb.weight'" in one_error_line(lambda: gpt_module.load_gpt(str(tmp_path / "vqgan.ckpt")))
    assert "n_head=3 does not divide" in one_error_line(lambda: gpt_module.load_gpt(path, n_head=3))


# =============================================================================
# vqgan_loss.py: the training objective, Eq. (6)


def test_discriminator_gets_no_gradient_from_the_generator_step(tmp_path):
    torch.manual_seed(0)
    # lr 0 for both (train_step sets the optimisers' lr from the config): the weights stay put, so
    # the gradients left behind can be recomputed and compared
    config = tiny_train_config(tmp_path, disc_start=0, lr=0.0, lr_schedule="constant")
    model, disc = tiny_vqgan(), Discriminator(ndf=8, n_layers=2)
    opt_g, opt_d = torch.optim.SGD(model.parameters(), lr=0.0), torch.optim.SGD(disc.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    logs, _ = run_train_step(model, disc, opt_g, opt_d, scaler, x, 0, config)
    assert logs["lam"] > 0 and logs["d"] > 0
    got = [p.grad.clone() for p in disc.parameters()]
    # D's gradient is exactly that of the hinge D loss on (x, detached x_hat): G's step added nothing.
    disc.zero_grad(set_to_none=True)
    discriminator_step(disc, x, model(x)[0].detach()).backward()
    for g, p in zip(got, disc.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)
    # before disc_start D neither runs nor trains
    disc.zero_grad(set_to_none=True)
    logs, _ = run_train_step(model, disc, opt_g, opt_d, scaler, x, 0, dict(config, disc_start=10))
    assert logs["d"] == 0.0 and logs["lam"] == 0.0
    assert all(p.grad is None for p in disc.parameters())


def test_generator_step_leaves_no_gradient_in_the_discriminator():
    torch.manual_seed(0)
    config = tiny_train_config("unused", disc_start=0)
    model, disc = tiny_vqgan(), Discriminator(ndf=8, n_layers=2)
    disc.requires_grad_(False)  # as train_step does
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    loss, x_hat, _, logs = run_generator_step(model, disc, x, 0, config)
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
    config = tiny_train_config("unused", disc_start=10**9, lr=2e-3, max_steps=80)
    model, disc = tiny_vqgan(), Discriminator(ndf=8, n_layers=2)
    opt_g = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=2e-3, betas=(0.5, 0.9))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x = torch.stack([data.ShapesDataset(8, image_size=16, seed=1)[i][0] for i in range(8)])
    first = None
    for step in range(40):
        logs, _ = run_train_step(model, disc, opt_g, opt_d, scaler, x, step, config)
        first = first if first is not None else logs["rec"]
    assert logs["rec"] < 0.6 * first
    # the step follows the cosine schedule: lr at step 39 of 80, for G and D alike
    expected = 2e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * 39 / 80)))
    assert [g["lr"] for g in opt_g.param_groups + opt_d.param_groups] == pytest.approx([expected, expected])


def test_pixel_loss_by_hand_and_in_the_generator_step():
    x, x_hat = torch.zeros(1, 1, 1, 3), torch.tensor([[[[0.5, -2.0, 0.0]]]])
    assert pixel_loss(x, x_hat, "l2").flatten().tolist() == [0.25, 4.0, 0.0]  # Eq. (4): (x - x_hat)^2
    assert pixel_loss(x, x_hat, "l1").flatten().tolist() == [0.5, 2.0, 0.0]   # official: |x - x_hat|
    # the generator step's L_rec is the mean of the chosen one (no LPIPS, D not started)
    torch.manual_seed(0)
    model, disc = tiny_vqgan(), Discriminator(ndf=8, n_layers=2)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    for kind, expected in [("l2", lambda e: e.pow(2).mean()), ("l1", lambda e: e.abs().mean())]:
        config = tiny_train_config("unused", disc_start=10**9, pixel_loss=kind)
        _, x_hat, _, logs = run_generator_step(model, disc, x, 0, config)
        assert logs["rec"] == pytest.approx(expected(x - x_hat).item(), rel=1e-6)
    # the shapes default and the paper preset both use the official L1
    assert train_vqgan.CONFIG["pixel_loss"] == "l1"
    assert train_vqgan.resolve_config(dict(preset="paper"))["pixel_loss"] == "l1"


def test_fixed_lambda_experiment_replaces_eq7_by_disc_weight():
    torch.manual_seed(0)
    model, disc = tiny_vqgan(), Discriminator(ndf=8, n_layers=2)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    config = tiny_train_config("unused", disc_start=0, disc_weight=0.3)
    logs = run_generator_step(model, disc, x, 0, config)[3]
    assert logs["lam"] > 0 and logs["lam"] != pytest.approx(0.3)  # Eq. (7) times 0.3
    logs = run_generator_step(model, disc, x, 0, dict(config, adaptive_lambda=False))[3]
    assert logs["lam"] == pytest.approx(0.3)


# =============================================================================
# lpips_lite.py: the perceptual loss


# The official taming VQGAN checkpoint's `loss.perceptual_loss.*` keys with that prefix removed.
OFFICIAL_LPIPS_KEYS = {
    "scaling_layer.shift", "scaling_layer.scale",
    *(f"net.slice1.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")),
    *(f"net.slice2.{i}.{p}" for i in (5, 7) for p in ("weight", "bias")),
    *(f"net.slice3.{i}.{p}" for i in (10, 12, 14) for p in ("weight", "bias")),
    *(f"net.slice4.{i}.{p}" for i in (17, 19, 21) for p in ("weight", "bias")),
    *(f"net.slice5.{i}.{p}" for i in (24, 26, 28) for p in ("weight", "bias")),
    *(f"lin{k}.model.1.weight" for k in range(5)),
}


LIN_CHANNELS = (64, 128, 256, 512, 512)


def _images(n=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # smooth-ish images: a blurred random field, more image-like than white noise
    x = torch.rand(n, 3, size // 4, size // 4, generator=g) * 2 - 1
    return nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _lin_file(tmp_path, name="vgg.pth", **overrides):
    g = torch.Generator().manual_seed(1)
    sd = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate(LIN_CHANNELS)}
    sd.update(overrides)
    sd = {k: v for k, v in sd.items() if v is not None}
    path = tmp_path / name
    torch.save(sd, path)
    return path


def test_lpips_state_dict_keys_match_official_checkpoint():
    torch.manual_seed(0)
    sd = LPIPS(pretrained=False).state_dict()
    assert set(sd) == OFFICIAL_LPIPS_KEYS
    assert sd["scaling_layer.shift"].shape == (1, 3, 1, 1)
    assert sd["net.slice5.28.weight"].shape == (512, 512, 3, 3)
    for k, c in enumerate(LIN_CHANNELS):
        assert sd[f"lin{k}.model.1.weight"].shape == (1, c, 1, 1)


def test_lpips_backbone_matches_torchvision_vgg16_layout():
    # same layer types and conv shapes at the same indices as torchvision's vgg16().features[:30]
    with torch.device("meta"):  # structure only: no memory, no init time
        tv = torchvision.models.vgg16().features
    net = LPIPS(pretrained=False).net
    ours = {name: m for k in range(1, 6) for name, m in getattr(net, f"slice{k}").named_children()}
    assert sorted(ours, key=int) == [str(i) for i in range(30)]
    for i in range(30):
        assert type(ours[str(i)]) is type(tv[i])
        if isinstance(tv[i], nn.Conv2d):
            assert ours[str(i)].weight.shape == tv[i].weight.shape


def test_lpips_zero_symmetric_positive():
    torch.manual_seed(0)
    model = LPIPS(pretrained=False)
    x, y = _images(seed=0), _images(seed=1)
    assert torch.equal(model(x, x), torch.zeros(4))
    d_xy, d_yx = model(x, y), model(y, x)
    assert d_xy.shape == (4,)
    torch.testing.assert_close(d_xy, d_yx)
    assert (d_xy > 0).all()


def test_lpips_grows_with_perturbation():
    torch.manual_seed(0)
    model = LPIPS(pretrained=False)
    x = _images(n=8)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    small = model(x, (x + 0.05 * noise).clamp(-1, 1)).mean()
    big = model(x, (x + 0.5 * noise).clamp(-1, 1)).mean()
    assert 0 < small < big


def test_lpips_hand_checked_value_with_stub_features():
    # Replace VGG with a stub whose features are one-hot along channels, with arbitrary magnitude:
    # channel 0 where the (scaled) first pixel is > 0, else channel 1. Unit-normalising removes the
    # magnitude, so two images on different sides give (1-0)^2 + (0-1)^2 on channels 0 and 1 at every
    # position: each layer contributes w0 + w1, and the total is the sum over 5 layers.
    class OneHotNet(nn.Module):
        def forward(self, x):
            side = (x[:, 0, 0, 0] > 0).long()  # (N,)
            mag = x[:, 0, 0, 0].abs() * 7 + 0.5
            feats = []
            for c in LIN_CHANNELS:
                f = torch.zeros(x.shape[0], c, 2, 2)
                f[torch.arange(x.shape[0]), side] = mag[:, None, None]
                feats.append(f)
            return feats

    torch.manual_seed(0)
    model = LPIPS(pretrained=False)
    model.net = OneHotNet()
    x = torch.full((2, 3, 16, 16), 0.9)
    y = torch.full((2, 3, 16, 16), -0.4)
    torch.testing.assert_close(model(x, y), torch.full((2,), 5 * 2.0))  # all-ones weights: 5 layers * 2
    torch.testing.assert_close(model(x, 0.2 * x), torch.zeros(2))  # same side, other magnitude: 0
    for lin in model.lins:
        w = lin.model[1].weight
        w.data.zero_()
        w.data[0, 0], w.data[0, 1] = 2.0, 0.5
    torch.testing.assert_close(model(x, y), torch.full((2,), 5 * 2.5))


def test_lpips_matches_formula_recomputed_from_features():
    torch.manual_seed(0)
    model = LPIPS(pretrained=False)
    for lin in model.lins:  # non-uniform weights so the channel weighting is exercised
        lin.model[1].weight.data.uniform_(0, 2)
    x, y = _images(n=2, seed=0), _images(n=2, seed=1)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    fx, fy = model.net((x - shift) / scale), model.net((y - shift) / scale)
    expected = torch.zeros(2)
    for a, b, lin in zip(fx, fy, model.lins):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        w = lin.model[1].weight.view(1, -1, 1, 1)
        expected += ((a - b) ** 2 * w).sum(1).mean(dim=(1, 2))
    torch.testing.assert_close(model(x, y), expected, rtol=1e-4, atol=1e-6)


def test_lpips_gradient_reaches_input_not_params():
    torch.manual_seed(0)
    model = LPIPS(pretrained=False)
    x = _images(n=2).requires_grad_(True)
    y = torch.full_like(x, -1.0)  # flat image: many all-zero feature vectors, the 0/0 corner
    model(x, y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())


def test_lpips_backward_keeps_nothing_of_the_target_image():
    # As a loss only the reconstruction y needs a gradient. One VGG pass over torch.cat([x, y])
    # would keep 2B-image activations for backward and carry x through it; two passes keep only y's.
    torch.manual_seed(0)
    model = LPIPS(pretrained=False)
    x, y = _images(n=2, seed=0), _images(n=2, seed=1).requires_grad_(True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append((t.shape, isinstance(t, nn.Parameter))) or t,
                                                  lambda t: t):
        model(x, y).sum().backward()
    # images and feature maps (leaving out weights and the (1,3,1,1) shift and scale)
    batches = [shape[0] for shape, is_weight in kept if len(shape) == 4 and not is_weight and shape[0] > 1]
    assert len(batches) > 10 and set(batches) == {2}
    assert y.grad is not None and y.grad.abs().sum() > 0 and x.grad is None


def test_lpips_stays_in_eval_mode():
    torch.manual_seed(0)
    model = LPIPS(pretrained=False)
    parent = nn.ModuleDict({"lpips": model, "other": nn.Linear(2, 2)})
    parent.train()
    assert parent["other"].training
    assert not any(m.training for m in model.modules())
    model.train(True)
    assert not model.training


def test_lpips_rejects_too_small_or_mismatched_images():
    torch.manual_seed(0)
    model = LPIPS(pretrained=False)
    with pytest.raises(ValueError, match="16"):
        model(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 32, 32))


def test_lpips_loads_good_lin_file(tmp_path):
    path = _lin_file(tmp_path)
    torch.manual_seed(0)
    ones = LPIPS(pretrained=False)
    torch.manual_seed(0)
    learned = LPIPS(pretrained=False, lin_weights=path)
    # same random VGG (same seed), so only the lin weights differ
    assert torch.equal(ones.net.slice3.get_submodule("10").weight, learned.net.slice3.get_submodule("10").weight)
    torch.testing.assert_close(learned.lin2.model[1].weight, torch.load(path, weights_only=True)["lin2.model.1.weight"])
    assert not learned.lin2.model[1].weight.requires_grad
    x, y = _images(n=2, seed=0), _images(n=2, seed=1)
    assert not torch.allclose(ones(x, y), learned(x, y))


@pytest.mark.parametrize("overrides, match", [
    ({"lin4.model.1.weight": None}, "missing keys"),  # missing key
    ({"lin9.model.1.weight": torch.ones(1, 64, 1, 1)}, "unexpected keys"),  # extra key
    ({"lin1.model.1.weight": torch.ones(1, 64, 1, 1)}, "shape"),  # wrong shape
    ({"lin0.model.1.weight": -torch.ones(1, 64, 1, 1)}, "negative"),  # negative weight
])
def test_lpips_rejects_bad_lin_file(tmp_path, overrides, match):
    path = _lin_file(tmp_path, name="bad_vgg.pth", **overrides)
    with pytest.raises(ValueError, match=match) as info:
        LPIPS(pretrained=False, lin_weights=path)
    assert "bad_vgg.pth" in str(info.value) and "\n" not in str(info.value)


def test_lpips_rejects_missing_or_unreadable_lin_file(tmp_path):
    with pytest.raises(ValueError, match="not found.*nope.pth"):
        LPIPS(pretrained=False, lin_weights=tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        LPIPS(pretrained=False, lin_weights=junk)


def test_lpips_pretrained_offline_fails_fast_with_ways_out(tmp_path, monkeypatch):
    # an empty torch hub cache and a download that fails the way it does offline
    def no_network(*args, **kwargs):
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    timeout_before = socket.getdefaulttimeout()
    with pytest.raises(WeightsUnavailable) as info:
        LPIPS(pretrained=True)
    msg = str(info.value)
    assert "--perceptual_weight=0" in msg and "--lpips_pretrained=false" in msg
    assert str(tmp_path / "checkpoints") in msg and "\n" not in msg
    assert socket.getdefaulttimeout() == timeout_before  # our temporary download timeout is undone


def test_lpips_pretrained_loads_torchvision_features(monkeypatch):
    # Stand in for the cached torchvision file: 'features.N.*' keys plus classifier keys to ignore.
    torch.manual_seed(0)
    donor = lpips_lite.VGG16Features()
    fake = {f"features.{k.split('.', 1)[1]}": v.clone() for k, v in donor.state_dict().items()}
    fake["classifier.0.weight"] = torch.zeros(2, 2)
    monkeypatch.setattr(torchvision.models.VGG16_Weights, "get_state_dict", lambda self, **kw: fake)
    monkeypatch.setattr(lpips_lite, "find_lpips_package_weights", lambda: None)
    torch.manual_seed(1)  # a different random init, so equality below proves the load happened
    model = LPIPS(pretrained=True)
    assert torch.equal(model.net.get_submodule("slice4.19").weight, donor.get_submodule("slice4.19").weight)
    assert torch.equal(model.net.get_submodule("slice5.28").weight, donor.get_submodule("slice5.28").weight)


def test_lpips_finds_weights_in_installed_lpips_package_without_importing_it(tmp_path, monkeypatch):
    import sys
    pkg = tmp_path / "lpips"
    (pkg / "weights" / "v0.1").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('lpips must not be imported')\n")
    vgg = _lin_file(pkg / "weights" / "v0.1")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lpips", raising=False)
    assert lpips_lite.find_lpips_package_weights() == vgg
    assert "lpips" not in sys.modules


# =============================================================================
# data.py: the built-in shapes and scenes, folders, torchvision sets


def _palette_index(rgb):
    """Index into PALETTE of a [-1, 1] colour vector (asserts it is a palette colour)."""
    as_uint8 = tuple(int(round(v)) for v in ((rgb + 1) * 127.5).tolist())
    assert as_uint8 in PALETTE, as_uint8
    return PALETTE.index(as_uint8)


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


def test_draw_scene_one_shape_per_cell():
    image, semantic = data.draw_scene(16, 48, 16, seed=3)
    assert image.shape == (3, 16, 48) and semantic.shape == (16, 48)
    for k in range(3):  # each 16x16 cell holds one shape of one class
        ids = set(semantic[:, 16 * k:16 * (k + 1)].unique().tolist())
        assert len(ids) == 2 and 0 in ids
    # the picture and the map agree: background pixels share one colour, shape pixels have another
    background = image[:, semantic == 0]
    assert torch.equal(background, background[:, :1].expand_as(background))
    assert not (image[:, semantic > 0] == background[:, :1]).all(0).any()


def test_semantic_maps_from_a_folder_of_label_pngs(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    (images / "sub").mkdir(parents=True)
    (labels / "sub").mkdir(parents=True)
    for name in ("a", "b", "sub/c"):
        Image.fromarray(np.full((20, 24, 3), 100, np.uint8)).save(images / f"{name}.jpg")
        Image.fromarray(np.tile(np.arange(24, dtype=np.uint8) // 8, (20, 1))).save(labels / f"{name}.png")
    train, val = make_datasets(str(images), 16, val_fraction=0.3, cond_data=str(labels), cond_classes=3)
    image, label, semantic = train[0]
    assert image.shape == (3, 16, 16) and label == -1 and semantic.dtype == torch.long
    # resized with nearest neighbours (24 -> 19 wide), centre-cropped: ids stay ids, in column order
    assert set(semantic.unique().tolist()) == {0, 1, 2} and torch.equal(semantic[0], semantic[0].sort().values)
    with pytest.raises(SystemExit, match=r"labels/.*\.png has class id 2, out of range for 2 classes"):
        make_datasets(str(images), 16, val_fraction=0.3, cond_data=str(labels), cond_classes=2)
    (labels / "b.png").unlink()
    with pytest.raises(SystemExit, match="no label PNG at .*b.png"):
        make_datasets(str(images), 16, val_fraction=0.3, cond_data=str(labels), cond_classes=3)


def test_shape_score_real_shapes_are_clean_with_the_right_class():
    ds = ShapesDataset(200, 32, seed=5)
    images, labels = zip(*[ds[i][:2] for i in range(200)])
    score = shape_score.score_batch(images)
    right = sum(clean and name == SHAPE_NAMES[k] for (clean, name, _, _), k in zip(score["results"], labels))
    assert right >= 198, score["reasons"]  # measured: 200 of 200, the lowest IoU 0.93
    assert sum(score["classes"].values()) == round(score["share_clean"] * 200) >= 198
    assert score["classes"] == Counter(SHAPE_NAMES[k] for k in labels) or right < 200


def test_scenes_are_deterministic_and_items_differ():
    a, b = ScenesDataset(8, 32, seed=3), ScenesDataset(8, 32, seed=3)
    torch.manual_seed(123)
    np.random.seed(7)
    first = a[2]
    assert all(torch.equal(x, y) for x, y in zip(first[::2], b[2][::2])) and first[1] == -1
    assert first[0].shape == (3, 32, 32) and first[0].dtype == torch.float32 and first[2].dtype == torch.long
    crops = [a[i][0] for i in range(8)]
    assert all(not torch.equal(crops[i], crops[j]) for i in range(8) for j in range(i))
    assert not torch.equal(ScenesDataset(8, 32, seed=4)[2][0], first[0])
    assert a.random_flip is False and a.num_classes == 0 and ScenesDataset(2, 20)[1][0].shape == (3, 20, 20)


def test_scene_crops_agree_with_their_maps_and_shapes_never_overlap():
    ds = ScenesDataset(20, 24, seed=1)
    colours = data.palette_tensor()
    counts = []
    for i in range(20):
        canvas, semantic, shapes, (top, left) = ds.canvas(i)
        masks = np.stack([m for _, _, m in shapes])
        assert masks.sum(0).max() <= 1  # no pixel in two shapes
        for k, (label, offset, m) in enumerate(shapes):
            grown = np.pad(m, 1)
            grown = np.logical_or.reduce([grown[dy:dy + 48, dx:dx + 48] for dy in range(3) for dx in range(3)])
            assert not (grown & np.delete(masks, k, 0).any(0)).any()  # >= 1 px from every other shape
            ys, xs = np.nonzero(m)
            side = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
            assert 0.35 * 24 - 1 <= side <= 0.8 * 24 + 1
        counts.append(len(shapes))
        image, label, crop_map = ds[i]
        assert torch.equal(image, canvas[:, top:top + 24, left:left + 24]) and label == -1
        bg = image[:, crop_map == 0]
        assert (bg == bg[:, :1]).all()  # one background colour
        for label, offset, m in shapes:
            inside = torch.from_numpy(m[top:top + 24, left:left + 24])
            assert (crop_map[inside] == 1 + label).all()
            assert (image[:, inside] == colours[(_palette_index(bg[:, 0]) + offset) % 8][:, None]).all()
        union = torch.from_numpy(masks.any(0)[top:top + 24, left:left + 24])
        assert torch.equal(union, crop_map > 0)
    assert min(counts) >= 2 and max(counts) >= 4


def test_scenes_canvases_of_any_size_keep_the_training_statistics():
    image, semantic = data.draw_scenes_canvas(32, 128, 32, seed=2)
    again = data.draw_scenes_canvas(32, 128, 32, seed=2)
    assert image.shape == (3, 32, 128) and torch.equal(image, again[0]) and torch.equal(semantic, again[1])
    assert not torch.equal(semantic, data.draw_scenes_canvas(32, 128, 32, seed=3)[1])
    bg = image[:, semantic == 0]
    assert (bg == bg[:, :1]).all()  # one background, never a shape's colour
    assert not (image[:, semantic > 0] == bg[:, :1]).all(0).any()
    # every shape is one colour and one class, and >= 1 px from the next: growing a shape's mask by
    # 1 px (8-neighbourhood) meets only the background
    labels = shape_score.regions(semantic.numpy(), semantic.numpy() > 0)
    for k in range(int(labels.max()) + 1):
        mask = labels == k
        assert len(semantic[torch.from_numpy(mask)].unique()) == 1
        assert len(image[:, torch.from_numpy(mask)].unique(dim=1).T) == 1
        ring = shape_score.dilate(mask, 1) & ~mask
        assert (semantic.numpy()[ring] == 0).all()
    # as many shapes per crop-sized area as the training canvases (64 x 64 for 32-px crops): a canvas
    # of 4x their area holds about 4x their shapes
    def shapes_on(side):
        return sum(int(shape_score.regions(m.numpy(), m.numpy() > 0).max()) + 1
                   for m in (data.draw_scenes_canvas(side, side, 32, seed=s)[1] for s in range(10)))
    assert 3 * shapes_on(64) < shapes_on(128) < 5 * shapes_on(64)


def test_cond_scene_draws_maps_like_the_spatial_models_data():
    for data_name, draw in (("scenes", data.draw_scenes_canvas), ("shapes", draw_scene)):
        ckpt = dict(cond_config=dict(condition="semantic", data=data_name), image_size=32)
        images, maps = sample.read_condition(ckpt, dict(cond="scene", height=0, width=128, num_samples=2, seed=5))
        assert images.shape == (2, 3, 32, 128) and maps.shape == (2, 32, 128)
        assert torch.equal(maps[1], draw(32, 128, 32, seed=6)[1])


def test_scenes_data_flag_wiring():
    train_set, val_set = make_datasets("scenes", 16, num_shapes=10, num_val_shapes=3)
    assert isinstance(train_set, ScenesDataset) and len(train_set) == 10 and len(val_set) == 3
    assert val_set.seed != train_set.seed and train_set[0][0].shape == (3, 16, 16)
    assert train_vqgan.resolve_config(dict(data="scenes", condition="semantic"))["cond_classes"] == 4
    with pytest.raises(SystemExit, match="the scenes have 4 classes"):
        train_vqgan.resolve_config(dict(data="scenes", condition="semantic", cond_classes=5))
    with pytest.raises(SystemExit, match="--cond_data is for"):
        train_vqgan.resolve_config(dict(data="scenes", condition="semantic", cond_data="labels"))


# =============================================================================
# utils.py: flags, checkpoints, pictures; bad inputs to every script


def test_bad_flags_give_one_clear_line():
    parse = lambda *a: utils.parse_overrides(train_vqgan.CONFIG, list(a), train_vqgan.__file__)
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
                             (dict(preset="huge"), "preset"), (dict(val_fraction=1.5), "val_fraction"),
                             (dict(lr_schedule="linear"), "--lr_schedule=linear is unknown"),
                             (dict(pixel_loss="l3"), "--pixel_loss=l3 is unknown; use l2 or l1"),
                             (dict(max_steps=50), "--warmup_steps=100 must be at least 0 and below --max_steps=50")]:
        with pytest.raises(SystemExit) as e:
            train_vqgan.resolve_config(overrides)
        assert words in str(e.value)


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint at"):
        utils.load_checkpoint(str(tmp_path / "missing.pt"), "vqgan")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="not a checkpoint this project can load"):
        utils.load_checkpoint(str(tmp_path / "junk.pt"), "vqgan")
    torch.save({"kind": "gpt"}, tmp_path / "gpt.pt")
    with pytest.raises(SystemExit, match="is a gpt checkpoint, not a vqgan checkpoint"):
        utils.load_checkpoint(str(tmp_path / "gpt.pt"), "vqgan")
    torch.save({"kind": "vqgan", "evil": copy.deepcopy}, tmp_path / "code.pt")  # pickles a function
    with pytest.raises(SystemExit, match="load safely"):
        utils.load_checkpoint(str(tmp_path / "code.pt"), "vqgan")


def test_save_image_grid_writes_png_of_expected_size(tmp_path):
    images = torch.cat([-torch.ones(5, 3, 8, 8), torch.ones(5, 3, 8, 8)])
    path = save_image_grid(images, str(tmp_path / "new" / "grid.png"), nrow=4)
    assert path.endswith("grid.png") and os.path.exists(path)
    with Image.open(path) as img:
        assert img.size == (4 * (8 + 2) + 2, 3 * (8 + 2) + 2)  # 10 images in 3 rows, padding 2
        pixels = np.asarray(img.convert("RGB"))
    assert (pixels[2 + 3, 2 + 3] == 0).all()              # first tile: -1 -> black
    assert (pixels[2 + 10 + 3, 2 + 10 + 3] == 255).all()  # image 5 (row 1, col 1): +1 -> white


class PickledCallback:
    """A Python object beside the state dict, like the Lightning callbacks in official files."""

    def __init__(self):
        self.best_score = 1.5


class RunsACommand:
    """What a malicious checkpoint pickles: unpickling it for real would call os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_official_checkpoints_load_safely_with_inert_stand_ins(tmp_path, monkeypatch, capsys):
    import sys
    import types
    sd = tiny_vqgan().state_dict()
    path = str(tmp_path / "last.ckpt")
    marker = tmp_path / "code_ran"
    # a Lightning class from a package that is not installed here, a plain object, and a payload
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    cls = type("ModelCheckpoint", (), {"__module__": "pytorch_lightning.callbacks"})
    sys.modules["pytorch_lightning.callbacks"].ModelCheckpoint = cls
    torch.save({"state_dict": sd, "callbacks": {cls: {"best": 1}}, "cb": PickledCallback()}, path)
    monkeypatch.delitem(sys.modules, "pytorch_lightning.callbacks")
    monkeypatch.delitem(sys.modules, "pytorch_lightning")
    loaded = utils.load_official_state_dict(path)
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    note = capsys.readouterr().out
    assert "inert stand-ins" in note and "\n" not in note.strip()
    ckpt = utils.load_checkpoint_file(path)
    assert isinstance(ckpt["cb"], utils.Inert) and not hasattr(ckpt["cb"], "best_score")
    # a file whose unpickling would run a command is refused, and the command never runs
    torch.save({"state_dict": sd, "evil": RunsACommand(marker)}, path)
    with pytest.raises(SystemExit, match="could not be loaded safely.*system"):
        utils.load_checkpoint_file(path)
    assert not marker.exists()
    # a plain state dict (no Python objects) loads silently
    capsys.readouterr()
    torch.save({"state_dict": sd}, path)
    assert utils.load_official_state_dict(path).keys() == sd.keys()
    assert capsys.readouterr().out == ""
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="could not be loaded safely"):
        utils.load_official_state_dict(str(tmp_path / "junk.ckpt"))


def one_error_line(call):
    """Run call(); it must stop with SystemExit('error: ...'): one line, returned."""
    with pytest.raises(SystemExit) as e:
        call()
    message = e.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, repr(message)
    return message


def damaged_copies(src, folder, missing_key):
    """{damage: (path, words its error names)} for broken versions of the checkpoint file src."""
    folder.mkdir(parents=True, exist_ok=True)
    raw, ckpt = open(src, "rb").read(), torch.load(src, weights_only=True)
    first = next(iter(ckpt["model"]))
    bigger = torch.zeros(ckpt["model"][first].shape[0] + 1, *ckpt["model"][first].shape[1:])
    unreadable = "safely"  # both loaders' word for a file torch.load cannot read
    files = dict(truncated=(raw[:len(raw) // 2], unreadable), empty=(b"", unreadable),
                 random=(np.random.default_rng(0).bytes(4096), unreadable),
                 missing_key=({k: v for k, v in ckpt.items() if k != missing_key}, f"without {missing_key}"),
                 wrong_shape=(dict(ckpt, model=dict(ckpt["model"], **{first: bigger})), f"wrong shape: {first}"),
                 bad_config=(dict(ckpt, model_config=dict(ckpt["model_config"], n_codes="many")), "does not describe"))
    out = {}
    for damage, (content, words) in files.items():
        path = folder / f"{damage}.pt"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content, path)
        out[damage] = (str(path), words)
    return out


def as_resume_dir(path, folder, extra=()):
    """A training out_dir whose ckpt.pt is a copy of `path` (and the files in extra)."""
    folder.mkdir(parents=True)
    shutil.copy(path, folder / "ckpt.pt")
    for file in extra:
        shutil.copy(file, folder)
    return folder


def test_damaged_checkpoints_are_one_line_wherever_they_are_read(tiny_runs, tmp_path):
    root, gpt_config = tiny_runs
    vq_path, gpt_path = str(root / "vqgan" / "ckpt.pt"), str(root / "gpt" / "ckpt.pt")
    photo = tmp_path / "photo.png"
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(photo)
    sampling = dict(sample.CONFIG, gpt_ckpt=gpt_path, device="cpu", num_samples=1, out=str(tmp_path / "x.png"))
    caches = list((root / "gpt").glob("tokens_*.pt"))
    vqgan_readers = {
        "vqgan.load_vqgan": lambda p, i: vqgan.load_vqgan(p),
        "sample --reconstruct": lambda p, i: sample.sample(dict(sampling, reconstruct=str(photo), vqgan_ckpt=p)),
        "sample --vqgan_ckpt": lambda p, i: sample.sample(dict(sampling, vqgan_ckpt=p)),
        "train_gpt --vqgan_ckpt": lambda p, i: train_gpt.train(dict(gpt_config, vqgan_ckpt=p,
                                                                    out_dir=str(tmp_path / f"g{i}"))),
        "train_vqgan --resume": lambda p, i: train_vqgan.train(tiny_train_config(
            as_resume_dir(p, tmp_path / f"v{i}"), resume=True)),
    }
    gpt_readers = {
        "gpt.load_gpt": lambda p, i: gpt_module.load_gpt(p),
        "sample --gpt_ckpt": lambda p, i: sample.sample(dict(sampling, gpt_ckpt=p)),
        "train_gpt --resume": lambda p, i: train_gpt.train(dict(gpt_config, resume=True, out_dir=str(
            as_resume_dir(p, tmp_path / f"r{i}", caches)))),
    }
    for readers, src, other, kind in ((vqgan_readers, vq_path, gpt_path, "gpt"), (gpt_readers, gpt_path, vq_path, "vqgan")):
        cases = damaged_copies(src, tmp_path / kind, "model_config")
        cases["wrong_kind"] = (other, f"is a {kind} checkpoint, not a")
        for i, (damage, (path, words)) in enumerate(cases.items()):
            for reader, read in readers.items():
                if damage == "bad_config" and reader.endswith("--resume"):
                    continue  # --resume builds the model from the flags' config, not from model_config
                message = one_error_line(lambda: read(path, f"{kind}{i}"))
                named = f"{kind}{i}/ckpt.pt" if reader.endswith("--resume") else path  # resume: the out_dir's copy
                assert named in message and words in message, (reader, damage, message)


def run_scripts(*commands):
    """Run the scripts side by side (each imports torch: seconds) -> [(returncode, stderr)]."""
    runs = [subprocess.Popen([sys.executable] + list(c), cwd=os.path.dirname(os.path.abspath(__file__)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    return [(r.wait(timeout=300), r.communicate()[1]) for r in runs]


def assert_one_line_exit_2(result, words):
    code, stderr = result
    assert code == 2 and "Traceback" not in stderr, (code, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], stderr


def test_damaged_checkpoints_exit_2_from_the_shell(tiny_runs, tmp_path):
    root, _ = tiny_runs
    cases = damaged_copies(str(root / "gpt" / "ckpt.pt"), tmp_path, "grid_hw")
    resume = as_resume_dir(cases["truncated"][0], tmp_path / "resume")
    results = run_scripts(["sample.py", f"--gpt_ckpt={cases['random'][0]}", "--device=cpu"],
                          ["sample.py", f"--gpt_ckpt={cases['wrong_shape'][0]}", "--device=cpu"],
                          ["train_vqgan.py", "--resume=true", f"--out_dir={resume}"])
    assert_one_line_exit_2(results[0], "could not be loaded safely")
    assert_one_line_exit_2(results[1], "wrong shape")
    assert_one_line_exit_2(results[2], "not a checkpoint this project can load safely")


ANY_INTEGER = {"seed"}  # every integer is a seed


def bad_values(name, default):
    """Values a flag with this default must refuse: not its type, not finite, or below its range."""
    if isinstance(default, bool):
        return ["maybe"]
    if isinstance(default, tuple):
        return ["1;2", "-2"]
    if isinstance(default, int):
        return ["x", "1.5"] + ([] if name in ANY_INTEGER else ["-2"])
    if isinstance(default, float):
        return ["x", "nan", "inf", "-inf", "-1.5"]
    return []  # names and paths: checked where they are used (the choices below, missing files above)


def test_every_flag_of_every_script_refuses_a_bad_value():
    import bench
    checks = {train_vqgan: train_vqgan.resolve_config, train_gpt: train_gpt.resolve_config,
              sample: lambda o: sample.check_config(dict(sample.CONFIG, **o)),
              bench: lambda o: bench.check_config(dict(bench.CONFIG, **o))}
    tried = 0
    for script, check in checks.items():
        for name, default in script.CONFIG.items():
            for value in bad_values(name, default):
                message = one_error_line(lambda: check(utils.parse_overrides(script.CONFIG, [f"--{name}={value}"],
                                                                             script.__file__)))
                assert f"--{name}" in message, (script.__name__, name, value, message)
                tried += 1
        check({})  # ... and the defaults pass
    assert tried > 100
    assert "is not a finite number" in one_error_line(lambda: utils.convert_value("lr", "nan", 1e-3))
    assert utils.convert_value("lr", "1e-3", 1.0) == 1e-3
    # flags that name one of a few choices
    for script, name, value in [(train_vqgan, "preset", "huge"), (train_vqgan, "lr_schedule", "linear"),
                                (train_vqgan, "pixel_loss", "l3"), (train_vqgan, "condition", "depth"),
                                (train_gpt, "conditional", "pixels"), (bench, "config", "huge")]:
        assert f"--{name}={value}" in one_error_line(lambda: checks[script]({name: value}))
    assert "--device=tpu" in one_error_line(lambda: utils.pick_device("tpu"))
    assert "--dtype=fp8" in one_error_line(lambda: utils.pick_dtype("fp8", torch.device("cpu")))


def test_bad_flags_exit_2_with_one_line_from_the_shell():
    results = run_scripts(["train_vqgan.py", "--lr=nan"], ["train_gpt.py", "--batch_size=-2"],
                          ["sample.py", "--top_p=2"], ["bench.py", "--iters=0"])
    for result, words in zip(results, ["--lr=nan is not a finite number", "--batch_size=-2 must be positive",
                                       "--top_p", "--iters"]):
        assert_one_line_exit_2(result, words)


def nan_at(real_step, bad_step, poison):
    """train_step as it is, except that call number bad_step (1-based) goes through poison(result, args)."""
    calls = []

    def step(*args):
        calls.append(1)
        result = real_step(*args)
        return poison(result, args) if len(calls) == bad_step else result
    return step


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tiny_runs, tmp_path, monkeypatch):
    root, gpt_config = tiny_runs
    # the VQGAN: a checkpoint at step 2, a nan loss at step 3
    config = tiny_train_config(tmp_path / "vqgan", max_steps=4, eval_interval=2, disc_start=10)
    monkeypatch.setattr(train_vqgan, "train_step", nan_at(vqgan_loss.train_step, 3,
                                                          lambda r, a: (dict(r[0], rec=math.nan), r[1])))
    message = one_error_line(lambda: train_vqgan.train(config))
    assert message.startswith("error: step 3: the loss is not finite (rec=nan)") and "ckpt.pt is kept" in message
    ckpt = utils.load_checkpoint(str(tmp_path / "vqgan" / "ckpt.pt"), "vqgan", resume=True)
    assert ckpt["step"] == 2 and vqgan.vqgan_from_checkpoint(ckpt) is not None
    # the GPT: the same, from its own train_step (the token cache copied, not encoded again)
    out = tmp_path / "gpt"
    out.mkdir()
    for cache in (root / "gpt").glob("tokens_*.pt"):
        shutil.copy(cache, out)
    config = dict(gpt_config, out_dir=str(out), max_steps=4, eval_interval=2)
    monkeypatch.setattr(train_gpt, "train_step", nan_at(train_gpt.train_step, 3, lambda r, a: math.inf))
    message = one_error_line(lambda: train_gpt.train(config))
    assert message.startswith("error: step 3: the loss is not finite (loss=inf)")
    assert utils.load_checkpoint(str(out / "ckpt.pt"), "gpt", resume=True)["step"] == 2
    # a finite loss whose update overflowed a weight: nothing is saved over the last checkpoint
    monkeypatch.undo()
    (out / "ckpt.pt").unlink()

    def poison(loss, args):
        with torch.no_grad():
            utils.unwrap(args[0]).head.weight[0, 0] = math.nan
        return loss
    monkeypatch.setattr(train_gpt, "train_step", nan_at(train_gpt.train_step, 2, poison))
    message = one_error_line(lambda: train_gpt.train(config))
    assert message.startswith("error: step 2: a weight is no longer finite") and "no checkpoint was written" in message
    assert not (out / "ckpt.pt").exists()


# =============================================================================
# metrics.py: PSNR, SSIM, FID


def test_psnr_by_hand():
    x = torch.zeros(2, 3, 4, 4)
    # 0.2 on the [-1, 1] scale is 0.1 on [0, 1]: MSE 0.01 -> 20 dB
    assert torch.allclose(metrics.psnr(x, x + 0.2), torch.tensor([20.0, 20.0]), atol=1e-4)


def test_ssim_of_identical_and_of_constant_images():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-6)
    # flat images 0.5 and 0.25 on the [0, 1] scale: no variance, so SSIM is the brightness term
    # (2 * 0.5 * 0.25 + C1) / (0.5^2 + 0.25^2 + C1) with C1 = 0.01^2
    a, b = torch.zeros(1, 3, 11, 11), torch.full((1, 3, 11, 11), -0.5)
    assert ssim(a, b).item() == pytest.approx((0.25 + 1e-4) / (0.3125 + 1e-4), rel=1e-6)
    # noise lowers it; and the window needs 11x11 pixels
    assert ssim(x, x + 0.3 * torch.randn_like(x)).max() < 0.9
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    # diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(a_i) - sqrt(b_i))^2 = 5 + (1 + 1 + 0) = 7
    mu1, mu2 = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([1.0, 2.0, 0.0])
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 9.0])
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(7.0, abs=1e-9)
    # the same covariances turned by one rotation: the distance does not change
    q = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    a_rot, b_rot = q @ torch.diag(a).double() @ q.T, q @ torch.diag(b).double() @ q.T
    assert frechet_distance(mu1, a_rot, mu2, b_rot) == pytest.approx(7.0, abs=1e-9)
    # covariances that do not commute: s1 s2 = [[8, 4], [1, 2]], and for a 2x2 matrix with
    # eigenvalues >= 0, tr(sqrt(M)) = sqrt(tr M + 2 sqrt(det M)) = sqrt(10 + 2 sqrt(12))
    s1, s2 = torch.diag(torch.tensor([4.0, 1.0])), torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    expected = 5 + 4 - 2 * (10 + 2 * 12 ** 0.5) ** 0.5
    assert frechet_distance(torch.zeros(2), s1, torch.zeros(2), s2) == pytest.approx(expected, abs=1e-9)
    # from samples: identical sets are at distance 0
    f = torch.randn(64, 5)
    assert fid(f, f) == pytest.approx(0.0, abs=1e-9)


def test_clean_shapes_scores_reconstructions_of_the_built_in_data(tmp_path):
    shapes = torch.stack([data.ShapesDataset(8, 32, seed=3)[i][0] for i in range(8)])
    assert metrics.clean_shapes(shapes, "shapes", 32) == [True] * 8
    smeared = shapes.clone()
    smeared[:, :, :, 16:] = smeared[:, :, :, 16:].roll(1, dims=0)  # right halves from another image: two shapes
    assert sum(metrics.clean_shapes(smeared, "shapes", 32)) <= 1
    scenes = torch.stack([data.ScenesDataset(8, 32, seed=3)[i][0] for i in range(8)])
    inside = metrics.clean_shapes(scenes, "scenes", 32)  # one entry per shape wholly inside a crop
    assert len(inside) >= 1 and all(inside)
    # evaluate() reports the share, the ceiling of a GPT over this VQGAN, on the built-in data only:
    # a perfect "VQGAN" (it returns its input) scores 1, one that returns flat grey scores 0
    class Echo(nn.Module):
        n_codes = 4

        def __init__(self, grey=False):
            super().__init__()
            self.grey = grey

        def forward(self, x):
            return x * 0 if self.grey else x, torch.zeros(len(x), 8, 8, dtype=torch.long), torch.zeros(())
    config, val_set, cpu = tiny_train_config(tmp_path, image_size=32), data.ShapesDataset(8, 32, seed=3), torch.device("cpu")
    assert metrics.evaluate(Echo(), None, val_set, config, cpu, None)[0]["val_clean"] == 1.0
    assert metrics.evaluate(Echo(grey=True), None, val_set, config, cpu, None)[0]["val_clean"] == 0.0
    assert "val_clean" not in metrics.evaluate(Echo(), None, val_set, dict(config, data="cifar10"), cpu, None)[0]


# =============================================================================
# shape_score.py: the built-in score


def _one_shape(kind, size=16.0, cx=16.0, cy=16.0, colour=2, background=0, side=32):
    """A hand-drawn shapes image: one shape of data._shape_mask on a flat background. -> (image, mask)."""
    centres = np.arange(side) + 0.5
    ys, xs = np.meshgrid(centres, centres, indexing="ij")
    mask = torch.from_numpy(data._shape_mask(kind, cx, cy, size, xs, ys))
    colours = data.palette_tensor()
    return torch.where(mask, colours[colour][:, None, None], colours[background][:, None, None]), mask


def _paint(image, mask, colour):
    image = image.clone()
    image[:, mask] = data.palette_tensor()[colour][:, None]
    return image


def test_shape_score_regions_and_fit_by_hand():
    # four regions: the two top-left 1s, the lone 1 (only diagonal to them), the column of 2s, the
    # bottom-left 2s (apart from the column); the 0s are left out
    colours = np.array([[1, 1, 0, 2],
                        [0, 0, 1, 2],
                        [2, 2, 0, 2]])
    label = shape_score.regions(colours, colours != 0)
    assert (label == -1).sum() == 4 and len(np.unique(label[label >= 0])) == 4
    assert label[0, 0] == label[0, 1] != label[1, 2] and label[0, 3] == label[2, 3] != label[2, 0]
    # each kind is recognised, off the half-pixel grid too; on it, exactly; a 2:1 rectangle is none of them
    for kind, name in enumerate(SHAPE_NAMES):
        _, mask = _one_shape(kind, size=15.3, cx=15.2, cy=16.7)
        fitted, iou = shape_score.fit_shape(mask.numpy())
        assert fitted == name and iou > 0.95
        assert shape_score.fit_shape(_one_shape(kind, size=16, cx=16, cy=16)[1].numpy()) == (name, 1.0)
    rectangle = np.zeros((32, 32), dtype=bool)
    rectangle[10:20, 6:26] = True
    name, iou = shape_score.fit_shape(rectangle)
    assert iou < 0.7  # at best a 15 px square inside the 20 x 10 box: 150 / 275 = 0.55, give or take the refinement


def test_shape_score_blur_mild_mostly_passes_strong_fails():
    ds = ShapesDataset(200, 32, seed=5)
    images = torch.stack([ds[i][0] for i in range(200)])
    mild = shape_score.score_batch(torchvision.transforms.functional.gaussian_blur(images, 9, 0.5))
    strong = shape_score.score_batch(torchvision.transforms.functional.gaussian_blur(images, 9, 1.5))
    assert mild["share_clean"] >= 0.95, mild["reasons"]    # measured 0.995
    assert strong["share_clean"] <= 0.05, strong["reasons"]  # measured 0.01, most of them 'blurry'
    assert strong["reasons"]["blurry"] >= 100


def test_shape_score_fails_broken_images():
    square, mask = _one_shape(1)
    assert shape_score.score_image(square) == (True, "square", 1.0, "clean")
    cases = {}
    # half the shape in another palette colour
    half = mask.clone()
    half[:, :16] = False
    cases["touching"] = [_paint(square, half, 4)]
    # two shapes touching: of one colour they merge into one region that is no shape; of two, they touch
    _, left = _one_shape(1, size=10, cx=11, cy=16)
    _, right = _one_shape(1, size=10, cx=21, cy=16)
    background = _one_shape(1, size=0.1)[0]  # a shape too small to cover a pixel centre: an empty image
    cases["iou"] = [_paint(background, left | right, 3)]
    cases["touching"].append(_paint(_paint(background, left, 3), right, 5))
    # a blob of a second colour on the background, 3 x 3 pixels
    blob = torch.zeros(32, 32, dtype=torch.bool)
    blob[1:4, 27:30] = True
    cases["stray"] = [_paint(square, blob, 3)]
    cases["empty"] = [background]
    # specks: one 2-pixel speck is tolerated, five 1-pixel specks are not
    speck = torch.zeros(32, 32, dtype=torch.bool)
    speck[2, 2:4] = True
    assert shape_score.score_image(_paint(square, speck, 3))[0]
    speck[::7, 1] = True
    cases["specks"] = [_paint(square, speck, 3)]
    # single pixels of a third colour along the edge are a soft edge's mixed colours: tolerated
    # in the edge band (1 px out), specks 2 px out
    left = int(mask.any(0).nonzero().min())
    rows = torch.arange(10, 23, 3)
    along, beyond = torch.zeros(32, 32, dtype=torch.bool), torch.zeros(32, 32, dtype=torch.bool)
    along[rows, left - 1], beyond[rows, left - 3] = True, True
    assert shape_score.score_image(_paint(square, along, 5)) == (True, "square", 1.0, "clean")
    cases["specks"].append(_paint(square, beyond, 5))
    for word, images in cases.items():
        for image in images:
            clean, name, _, reason = shape_score.score_image(image)
            assert not clean and name is None and reason.split(":")[0] == word, reason
    batch = shape_score.score_batch([square, _one_shape(0)[0], background])
    assert batch["share_clean"] == pytest.approx(2 / 3) and batch["classes"] == Counter(square=1, circle=1)
    assert batch["reasons"] == Counter(clean=2, empty=1)
    with pytest.raises(SystemExit, match="wants images of shape") as e:
        shape_score.score_image(torch.zeros(1, 8, 8))
    assert "\n" not in str(e.value)


def test_shape_score_canvases_and_semantic_maps():
    image, semantic = draw_scene(32, 96, 32, seed=0)  # one shape per 32 x 32 cell
    cells = [semantic[:, 32 * k:32 * k + 32] > 0 for k in range(3)]
    # the shapes wholly inside the canvas: not on its top or bottom row, nor on its outer columns
    inside = [k for k, c in enumerate(cells) if not (c[[0, -1]].any() or (k == 0 and c[:, 0].any())
                                                    or (k == 2 and c[:, -1].any()))]
    score = shape_score.score_canvas(image, 32)
    assert len(score["shapes"]) == len(inside) >= 1 and all(s[0] for s in score["shapes"]) and score["one_background"]
    found = shape_score.score_against_map(image, semantic)
    wanted = [SHAPE_NAMES[int(semantic[:, 32 * k:32 * k + 32].max()) - 1] for k in range(3)]
    assert sorted(f["wanted"] for f in found) == sorted(wanted)
    assert all(f["predicted"] == f["wanted"] and f["map_iou"] == 1.0 and f["one_colour"] for f in found)
    # a second background colour over the right third: one big region, larger than any training shape
    background = shape_score.background_colour(shape_score.snap(image)[0])
    patched = image.clone()
    patched[:, :, 64:] = data.palette_tensor()[(background + 1) % 8][:, None, None]
    assert not shape_score.score_canvas(patched, 32)["one_background"]
    # against another scene's map the shapes are neither where nor what the map says
    other = shape_score.score_against_map(image, draw_scene(32, 96, 32, seed=1)[1])
    assert sum(f["map_iou"] >= shape_score.MIN_IOU for f in other) == 0
    # the map score's line: a square of side 10 drawn 1 px off its map's square overlaps it with
    # IoU 90 / 110 = 0.82 (in place at 0.8, not at 0.9); 2 px off, 80 / 120 = 0.67
    square = torch.zeros(32, 32, dtype=torch.long)
    square[10:20, 10:20] = 2
    picture = data.palette_tensor()[0][:, None, None].repeat(1, 32, 32)
    for shift, at_08, at_09 in ((0, 1, 1), (1, 1, 0), (2, 0, 0)):
        drawn = torch.zeros(32, 32, dtype=torch.bool)
        drawn[10 + shift:20 + shift, 10:20] = True
        line = sample.map_score_line(_paint(picture, drawn, 4)[None], square[None])
        assert f"map score: {at_08}/1" in line and f"({at_09}/1 " in line, (shift, line)
    # a shape painted half in another colour is not one colour
    half = (semantic > 0) & (torch.arange(96) % 2 == 0)[None, :]
    assert not any(f["one_colour"] for f in shape_score.score_against_map(_paint(image, half, 3), semantic))


def test_sample_prints_the_shape_score(tiny_runs, capsys):
    root, _ = tiny_runs
    base = dict(sample.CONFIG, gpt_ckpt=str(root / "gpt" / "ckpt.pt"), device="cpu", num_samples=2)
    capsys.readouterr()
    sample.sample(dict(base, class_label=1, out=str(root / "scored.png")))
    out = capsys.readouterr().out
    assert re.search(r"^shape score: \d/2 \(\d+%\) clean shapes \(circle \d, square \d, triangle \d\); failures: ", out, re.M), out
    assert re.search(r"^requested class: \d/2 \(\d+%\) samples are a clean shape of the class asked for$", out, re.M), out
    sample.sample(dict(base, class_label=0, width=40, out=str(root / "scored_wide.png")))
    out = capsys.readouterr().out
    assert re.search(r"^canvas score: .* of the shapes wholly inside are clean; background one colour in \d/2 \(\d+%\) "
                     r"samples$", out, re.M), out


# =============================================================================
# train_vqgan.py: the loop, resume, presets, DDP


def train_until_interrupted(config, steps, monkeypatch):
    """Run train_vqgan.train(config) as if Ctrl-C came after `steps` steps: the same max_steps, so
    the same learning-rate schedule, as the resumed run will have."""
    real_step, done = vqgan_loss.train_step, []

    def step(*args):
        if len(done) == steps:
            raise KeyboardInterrupt
        done.append(1)
        return real_step(*args)
    monkeypatch.setattr(train_vqgan, "train_step", step)
    with pytest.raises(KeyboardInterrupt):
        train_vqgan.train(config)
    monkeypatch.undo()


def test_checkpoint_resume_gives_the_same_next_steps(tmp_path, monkeypatch):
    full = train_vqgan.train(tiny_train_config(tmp_path / "full", max_steps=4))
    train_until_interrupted(tiny_train_config(tmp_path / "split", max_steps=4), 2, monkeypatch)  # saved at step 2
    resumed = train_vqgan.train(tiny_train_config(tmp_path / "split", max_steps=4, resume=True))
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    ckpt = utils.load_checkpoint(str(tmp_path / "split" / "ckpt.pt"), "vqgan")
    assert ckpt["step"] == 4 and set(ckpt) >= {"model", "disc", "opt_g", "opt_d", "config", "rng", "model_config"}
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "split").iterdir())  # atomic write
    assert (tmp_path / "split" / "recon_000004.png").exists()
    rows = (tmp_path / "split" / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and len(rows) == 3  # header + steps 2 and 4
    # from the shell: the saved config comes back; a flag that would change the model is refused
    resumed = train_vqgan.resolve_config(dict(out_dir=str(tmp_path / "split"), resume=True, ch_mult=(1, 2), max_steps=6))
    assert resumed["n_codes"] == 16 and resumed["max_steps"] == 6
    with pytest.raises(SystemExit, match="--resume with a different ch_mult"):
        train_vqgan.resolve_config(dict(out_dir=str(tmp_path / "split"), resume=True, ch_mult=(1, 2, 2)))


def test_paper_preset_and_help(capsys):
    config = train_vqgan.resolve_config(dict(preset="paper", batch_size=2))
    assert config["image_size"] == 256 and config["n_codes"] == 1024 and config["disc_start"] == 10000
    assert config["lr"] == pytest.approx(4.5e-6 * 2)
    with pytest.raises(SystemExit) as e:
        utils.parse_overrides(train_vqgan.CONFIG, ["--help"], train_vqgan.__file__)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(f"    {name}=" in out for name in train_vqgan.CONFIG)


def _ddp_worker(rank, world_size, ports, vqgan_config, gpt_config, out):
    """One torchrun-like process: the environment torchrun would set, then the real train().
    (A port per run: torchrun runs one per process, and a new group on the old port could meet
    the previous run's store before rank 0 has closed it.)"""
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    os.environ["MASTER_PORT"] = str(ports[0])
    torch.save(train_vqgan.train(vqgan_config).state_dict(), os.path.join(out, f"vqgan_rank{rank}.pt"))
    os.environ["MASTER_PORT"] = str(ports[1])
    torch.save(train_gpt.train(gpt_config).state_dict(), os.path.join(out, f"gpt_rank{rank}.pt"))


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:  # all bound at once, so the n ports differ
        s.bind(("127.0.0.1", 0))
    ports = tuple(s.getsockname()[1] for s in sockets)
    for s in sockets:
        s.close()
    return ports


def test_ddp_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    # D without BatchNorm (disc_layers=0): PyTorch's SyncBatchNorm runs on GPUs only, and on the
    # CPU each process would normalise by its own shard, which no single process reproduces.
    vq = dict(max_steps=3, disc_start=1, disc_layers=0, eval_interval=3)
    gpt = dict(train_gpt.CONFIG, max_images=64, n_layer=1, n_head=2, n_embd=16, max_steps=3, eval_interval=3,
               eval_batches=1, num_samples=2, device="cpu", warmup_steps=1, pkeep=0.8)
    # one process, global batches of 8 (its VQGAN is also the GPT's first stage)
    single_vq = train_vqgan.train(tiny_train_config(tmp_path / "vq1", batch_size=8, **vq)).state_dict()
    gpt.update(vqgan_ckpt=str(tmp_path / "vq1" / "ckpt.pt"))
    single_gpt = train_gpt.train(dict(gpt, out_dir=str(tmp_path / "gpt1"), batch_size=8)).state_dict()
    # two processes with gloo, batches of 4 each
    torch.multiprocessing.spawn(_ddp_worker, nprocs=2, args=(
        2, _free_ports(2), tiny_train_config(tmp_path / "vq2", batch_size=4, **vq),
        dict(gpt, out_dir=str(tmp_path / "gpt2"), batch_size=4), str(tmp_path)))
    for kind, single in (("vqgan", single_vq), ("gpt", single_gpt)):
        rank0, rank1 = (torch.load(tmp_path / f"{kind}_rank{r}.pt", weights_only=True) for r in (0, 1))
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), f"{kind}: the ranks' weights differ"
        # Weight matrices match the single process to float rounding (a lambda of Eq. (7) from one
        # shard's gradients alone, or unsynchronised shards, move them by ~1e-3). Biases are left
        # out: in these tiny models GroupNorm has one channel per group, so the gradient of a bias
        # just before a norm is zero in exact arithmetic, and Adam turns its rounding noise into
        # full-size steps of either sign.
        for k in rank0:
            if rank0[k].dim() > 1:
                assert torch.allclose(rank0[k], single[k], atol=2e-5), f"{kind}: {k} differs from one process"
    # only rank 0 wrote: one log row per evaluation, one checkpoint, and it resumes
    assert len((tmp_path / "vq2" / "log.csv").read_text().splitlines()) == 2
    ckpt = utils.load_checkpoint(str(tmp_path / "vq2" / "ckpt.pt"), "vqgan")
    assert all(torch.equal(ckpt["model"][k], rank0_vq) for k, rank0_vq in
               torch.load(tmp_path / "vqgan_rank0.pt", weights_only=True).items())


def test_kmeans_init_fits_the_codebook_to_what_a_condition_vqgan_encodes(tmp_path):
    # semantic: one-hot maps (4 channels), lowres: images downsampled 2x; the codes must start on
    # the encoder outputs of those inputs (a crash, or codes fitted to the full images, before)
    for condition, extra in (("semantic", dict(cond_classes=4)), ("lowres", dict(lowres_factor=2))):
        torch.manual_seed(0)
        config = tiny_train_config(tmp_path / condition, condition=condition, kmeans_init=True, max_steps=1,
                                   eval_interval=1, disc_start=10, **extra)
        model = train_vqgan.train(config)
        assert model.config["in_channels"] == (4 if condition == "semantic" else 3)
        torch.manual_seed(0)
        train_vqgan.train(dict(config, kmeans_init=False, out_dir=str(tmp_path / f"{condition}_plain")))
        with_kmeans, plain = (float(next(csv.DictReader(open(tmp_path / run / "log.csv")))["val_usage"])
                              for run in (condition, f"{condition}_plain"))
        assert with_kmeans >= 0.75 and with_kmeans > plain, (condition, with_kmeans, plain)


def test_training_with_the_codebook_options_resumes_exactly_and_draws_the_usage_histogram(tmp_path, capsys,
                                                                                         monkeypatch):
    options = dict(code_dim=3, l2_codes=True, kmeans_init=True, dead_code_restart=1, disc_start=10)
    full = train_vqgan.train(tiny_train_config(tmp_path / "full", **options))
    train_until_interrupted(tiny_train_config(tmp_path / "split", **options), 2, monkeypatch)
    resumed = train_vqgan.train(tiny_train_config(tmp_path / "split", resume=True, **options))
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    ckpt = utils.load_checkpoint(str(tmp_path / "full" / "ckpt.pt"), "vqgan")
    assert ckpt["model_config"]["code_dim"] == 3 and ckpt["code_age"].shape == (16,)
    rebuilt = vqgan.vqgan_from_checkpoint(ckpt)
    assert rebuilt.quantize.l2_codes and rebuilt.quantize.embedding.weight.shape == (16, 3)
    out = capsys.readouterr().out + capsys.readouterr().err
    histogram = tmp_path / "full" / "code_usage.png"
    assert f"wrote {histogram}" in out and Image.open(histogram).size == (512, 190)
    assert "val_ssim" in (tmp_path / "full" / "log.csv").read_text().splitlines()[0]


def test_bad_codebook_flags_give_one_clear_line(tmp_path):
    for overrides in (dict(code_dim=-1), dict(dead_code_restart=-5)):
        with pytest.raises(SystemExit, match="must be 0 .off. or positive") as e:
            train_vqgan.resolve_config(overrides)
        assert "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="true or false"):
        utils.parse_overrides(train_vqgan.CONFIG, ["--l2_codes=maybe"], train_vqgan.__file__)
    train_vqgan.train(tiny_train_config(tmp_path, max_steps=1, eval_interval=1))
    with pytest.raises(SystemExit, match="--resume with a different code_dim"):
        train_vqgan.resolve_config(dict(out_dir=str(tmp_path), resume=True, code_dim=8))


# =============================================================================
# gpt.py: the transformer, its loss, sampling and the sliding window (Sec. 3.2)


def tiny_gpt(n_codes=16, block_size=40, n_cond_tokens=1, seed=0, std=None):
    """A tiny GPT. std rescales every weight so the random model is strongly context
    dependent (with the 0.02 init its predictions barely depend on the input, which would let
    a wrong window / cache still pass)."""
    torch.manual_seed(seed)
    m = GPT(n_codes, block_size, n_layer=2, n_head=2, n_embd=16, n_cond_tokens=n_cond_tokens)
    if std is not None:
        with torch.no_grad():
            for name, p in m.named_parameters():
                if p.dim() > 1:
                    p.normal_(0.0, std if name != "head.weight" else 1.0)
    return m.eval()


# --- the transformer -----------------------------------------------------------------------
def test_config_rebuilds_and_init():
    m = tiny_gpt()
    m2 = GPT(**m.config)
    assert m2.config == m.config and m2.tok_emb.weight.shape == (17, 16)
    assert m2.head.bias is None and m2.head.weight.shape == (16, 16)
    assert torch.all(m2.pos_emb == 0) and m2.pos_emb.shape == (1, 40, 16)
    assert torch.all(m2.blocks[0].attn.qkv.bias == 0)
    assert abs(m2.blocks[0].mlp[0].weight.std().item() - 0.02) < 0.004
    assert isinstance(m2.blocks[0].mlp[1], nn.GELU)


def test_causal_mask():
    m = tiny_gpt(std=0.3)
    idx = torch.randint(0, 17, (2, 12))
    idx2 = idx.clone()
    idx2[:, 7] = (idx[:, 7] + 1) % 17
    a, b = m(idx), m(idx2)
    assert torch.equal(a[:, :7], b[:, :7])  # earlier positions cannot see position 7
    assert not torch.allclose(a[:, 7:], b[:, 7:])  # later ones do


def test_forward_bad_inputs():
    m = tiny_gpt()
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 41, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        m(torch.tensor([[0, 17]]))
    with pytest.raises(ValueError, match="token ids"):
        m(torch.tensor([[-1, 3]]))
    cache = m.new_kv_cache(1)
    m(torch.zeros(1, 39, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 2, dtype=torch.long), cache)


def test_kv_cache_matches_full_forward():
    m = tiny_gpt(std=0.3)
    idx = torch.randint(0, 17, (3, 20))
    full = m(idx)
    cache = m.new_kv_cache(3)
    assert isinstance(cache, KVCache) and cache.k.shape == (2, 3, 2, 40, 8)
    parts = [m(idx[:, :5], cache)]  # prefill: causal within the 5 new tokens
    for t in range(5, 12):  # single-token steps
        parts.append(m(idx[:, t:t + 1], cache))
    parts.append(m(idx[:, 12:20], cache))  # several tokens after a non-empty cache
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    cache.reset()  # a reset cache behaves like a fresh one
    torch.testing.assert_close(m(idx[:, :9], cache), full[:, :9], atol=1e-5, rtol=1e-5)


@grades("top_k_filter", "top_p_filter")
def test_matches_official_mingpt():
    """Load the official minGPT weights with load_official_gpt (separate query/key/value fused
    into qkv) and compare against the official logits and samples recorded in official_small.pt."""
    d = torch.load(FIXTURE, weights_only=True)["gpt"]
    c, sd = d["config"], d["state_dict"]
    # the fixture is a bare minGPT state dict; a Lightning file nests it under transformer.*
    lightning = {"state_dict": {"transformer." + k: v for k, v in sd.items()}, "first_stage_model.x": 0}
    m = load_official_gpt(lightning, cond="sos", n_head=c["n_head"])
    assert m.config == dict(n_codes=c["vocab_size"], block_size=c["block_size"], n_layer=c["n_layer"],
                            n_head=c["n_head"], n_embd=c["n_embd"], n_cond_tokens=1)
    # our start token (id K) gets a copy of the official start token's row (code 0)
    assert torch.equal(m.tok_emb.weight[c["vocab_size"]], sd["tok_emb.weight"][0])
    idx = d["idx"]
    torch.testing.assert_close(m(idx[:, :-1]), d["logits"], atol=1e-5, rtol=1e-5)
    assert torch.equal(m.generate(idx[:, :3], 10, greedy=True), d["greedy_sample_with_past(prefix3,steps10)"])
    g = torch.Generator().manual_seed(17)
    out = m.generate(idx[:, :3], 10, top_k=5, top_p=0.9, generator=g)
    assert torch.equal(out, d["sampled_with_past(seed17,top_k5,top_p0.9)"])
    # Conditioning: our id K (start) / K + c (class c) must give the logits the official model
    # gives for code 0 / code c in that position (m itself matches the official logits above).
    K, official = c["vocab_size"], idx[:, :-1].clone()
    ours = official.clone()
    official[:, 0], ours[:, 0] = 0, K
    torch.testing.assert_close(m(ours), m(official), atol=1e-5, rtol=1e-5)
    m_class = load_official_gpt(sd, cond="class", n_classes=3, n_head=c["n_head"])
    official[:, 0], ours[:, 0] = 2, K + 2
    torch.testing.assert_close(m_class(ours), m(official), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="n_classes"):
        load_official_gpt(sd, cond="class", n_classes=0, n_head=c["n_head"])
    with pytest.raises(ValueError, match="blocks.1.attn.proj.bias"):
        load_official_gpt({k: v for k, v in sd.items() if k != "blocks.1.attn.proj.bias"}, n_head=c["n_head"])


# --- loss, pkeep, conditioning ---------------------------------------------------------------
@grades("gpt_loss")
def test_gpt_loss_hand_computed():
    K, n_cond = 4, 2
    seq = torch.tensor([[4, 5, 1, 3, 0]])  # 2 cond tokens, 3 image tokens
    logits = torch.randn(1, 4, K)
    # position t predicts seq[t + 1]; image targets 1, 3, 0 are predicted at positions 1, 2, 3
    logp = F.log_softmax(logits, -1)[0]
    hand = -(logp[1, 1] + logp[2, 3] + logp[3, 0]) / 3
    torch.testing.assert_close(gpt_loss(logits, seq, n_cond), hand)
    # position 0 would predict the 2nd conditioning token: it is not a target
    logits2 = logits.clone()
    logits2[:, 0] = torch.randn(K) * 10
    assert torch.equal(gpt_loss(logits2, seq, n_cond), gpt_loss(logits, seq, n_cond))
    logits2[:, 1, 0] += 5.0  # the last conditioning position predicts the first image token
    assert not torch.equal(gpt_loss(logits2, seq, n_cond), gpt_loss(logits, seq, n_cond))
    with pytest.raises(ValueError):
        gpt_loss(logits[:, :3], seq, n_cond)


def test_corrupt_tokens_fraction():
    K, pkeep = 8, 0.7
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, K, (200, 500), generator=g)
    out = corrupt_tokens(tokens, pkeep, K, generator=g)
    changed = (out != tokens).float().mean().item()
    expected = (1 - pkeep) * (1 - 1 / K)  # a random code equals the old one 1/K of the time
    assert abs(changed - expected) < 0.005
    assert out.min() >= 0 and out.max() < K and out.dtype == tokens.dtype
    assert torch.equal(corrupt_tokens(tokens, 1.0, K, generator=g), tokens)
    assert (corrupt_tokens(tokens, 0.0, K, generator=g) != tokens).float().mean() > 0.85
    assert torch.equal(tokens, torch.randint(0, K, (200, 500), generator=torch.Generator().manual_seed(0)))


@grades("cond_tokens")
def test_cond_tokens():
    m = tiny_gpt(n_codes=16)
    assert torch.equal(cond_tokens(m, None, 3, "cpu"), torch.full((3, 1), 16))
    mc = tiny_gpt(n_codes=16, n_cond_tokens=3)
    assert torch.equal(cond_tokens(mc, [0, 2, 1], 3, "cpu"), torch.tensor([[16], [18], [17]]))
    assert torch.equal(cond_tokens(mc, 1, 2, "cpu"), torch.tensor([[17], [17]]))
    with pytest.raises(ValueError, match="out of range"):
        cond_tokens(mc, [0, 3], 2, "cpu")
    with pytest.raises(ValueError, match="out of range"):
        cond_tokens(mc, -1, 2, "cpu")
    with pytest.raises(ValueError, match="needs labels"):
        cond_tokens(mc, None, 2, "cpu")
    with pytest.raises(ValueError):
        cond_tokens(mc, [0, 1], 3, "cpu")


# --- sampling ----------------------------------------------------------------------------------
def kept(filtered):
    return [torch.nonzero(r > float("-inf")).flatten().tolist() for r in filtered]


@grades("top_k_filter")
def test_top_k_filter():
    logits = torch.tensor([[1.0, 5.0, 3.0, -2.0, 4.0],
                           [0.0, 0.0, 9.0, 1.0, 0.5]])
    out = top_k_filter(logits, 2)
    assert kept(out) == [[1, 4], [2, 3]]
    assert out[0, 1] == 5.0 and out[0, 4] == 4.0  # kept values are unchanged
    assert kept(top_k_filter(logits, 1)) == [[1], [2]]
    assert kept(top_k_filter(logits, 10)) == [[0, 1, 2, 3, 4]] * 2  # k > V: no-op
    # boundary: ties with the k-th largest are all kept
    assert kept(top_k_filter(torch.tensor([[3.0, 1.0, 3.0, 2.0, 2.0]]), 2)) == [[0, 2]]
    assert kept(top_k_filter(torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]]), 2)) == [[0, 2, 3]]


@grades("top_p_filter")
def test_top_p_filter():
    probs = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05]])
    logits = probs.log()
    assert kept(top_p_filter(logits, 0.01)) == [[1]]  # the top token is always kept
    assert kept(top_p_filter(logits, 0.5 - 1e-4)) == [[1]]
    assert kept(top_p_filter(logits, 0.5 + 1e-4)) == [[1, 3]]
    assert kept(top_p_filter(logits, 0.8 - 1e-4)) == [[1, 3]]  # 0.5 + 0.3 reaches p
    assert kept(top_p_filter(logits, 0.8 + 1e-4)) == [[0, 1, 3]]
    assert kept(top_p_filter(logits, 0.92)) == [[0, 1, 2, 3, 4]]  # the 0.05 tie is kept together
    assert kept(top_p_filter(logits, 1.0)) == [[0, 1, 2, 3, 4]]
    # ties: four equal logits give exactly 1/4 each; none is strictly more likely than
    # another, so all are kept even though the top one alone reaches p = 0.25
    even = torch.tensor([[0.0, 0.0, 0.0, 0.0, float("-inf")]])
    assert kept(top_p_filter(even, 0.25)) == [[0, 1, 2, 3]]
    # two tied pairs: [0.4, 0.4, 0.1, 0.1]; p = 0.5 needs both 0.4s, not the 0.1s
    pairs = torch.tensor([[0.4, 0.1, 0.4, 0.1]]).log()
    assert kept(top_p_filter(pairs, 0.5)) == [[0, 2]]
    assert kept(top_p_filter(pairs, 0.81)) == [[0, 1, 2, 3]]
    # a big vocabulary where the nucleus is wider than the first top-64 look
    wide = torch.zeros(2, 1000)
    wide[0, :3] = 20.0
    assert kept(top_p_filter(wide, 0.5)) == [[0, 1, 2], list(range(1000))]
    row = torch.randn(3, 1000)
    out = top_p_filter(row, 0.9)
    pr = F.softmax(row, -1)
    for r in range(3):  # compare with a full-sort reference
        s, order = pr[r].sort(descending=True)
        n = int(((s.cumsum(0) - s) < 0.9).sum())
        assert set(kept(out[r:r + 1])[0]) == set(order[:n].tolist())


@grades("top_k_filter")
def test_greedy_and_temperature():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 10, generator=g)
    assert torch.equal(sample_logits(logits, greedy=True), logits.argmax(-1))
    assert torch.equal(sample_logits(logits, temperature=7.0, top_k=3, greedy=True), logits.argmax(-1))
    row = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(4000, 4)

    def top_freq(t):
        s = sample_logits(row, temperature=t, generator=torch.Generator().manual_seed(1))
        return (s == 0).float().mean().item()

    for t in (0.5, 1.0, 3.0):  # frequency of the top token follows softmax(logits / T)
        assert abs(top_freq(t) - F.softmax(row[0] / t, -1)[0].item()) < 0.03
    assert top_freq(0.5) > top_freq(1.0) > top_freq(3.0)
    s = sample_logits(row, top_k=2, generator=torch.Generator().manual_seed(1))
    assert set(s.tolist()) == {0, 1}
    with pytest.raises(ValueError):
        sample_logits(row, temperature=0.0)


@grades("top_k_filter", "top_p_filter")
def test_generate_cached_equals_uncached():
    m = tiny_gpt(std=0.3)
    prefix = torch.tensor([[16, 3, 5], [16, 1, 1]])
    for kw in (dict(), dict(temperature=0.8, top_k=5), dict(top_p=0.9), dict(greedy=True)):
        a = m.generate(prefix, 20, generator=torch.Generator().manual_seed(3), **kw)
        b = m.generate(prefix, 20, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
        assert a.shape == (2, 20) and torch.equal(a, b)
        assert a.min() >= 0 and a.max() < 16
    c = m.generate(prefix, 30, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(c, m.generate(prefix, 30, generator=torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError):
        m.generate(prefix, 39)  # 3 + 39 - 1 > 40


def test_generate_greedy_is_argmax_of_full_forward():
    m = tiny_gpt(std=0.3)
    prefix = torch.tensor([[16, 2]])
    out = m.generate(prefix, 8, greedy=True)
    seq = torch.cat([prefix, out], 1)
    assert torch.equal(m(seq[:, :-1])[:, 1:].argmax(-1), out)


# --- the sliding window ----------------------------------------------------------------------
@grades("window_start")
def test_window_start():
    assert [window_start(i, 32, 16) for i in (0, 8, 9, 20, 24, 25, 31)] == [0, 0, 1, 12, 16, 16, 16]
    assert all(window_start(i, 16, 16) == 0 for i in range(16))
    assert all(window_start(i, 10, 16) == 0 for i in range(10))
    for size, win in ((32, 16), (7, 5), (9, 4), (6, 4), (7, 4)):
        starts = [window_start(i, size, win) for i in range(size)]
        assert all(s <= i < s + win and 0 <= s <= size - win for i, s in enumerate(starts))
        assert starts == sorted(starts)


@grades("window_start", "cond_tokens", "top_k_filter")
def test_sliding_window_equals_generate_on_window_sized_grid():
    m = tiny_gpt(n_cond_tokens=3, std=0.3)
    cond = cond_tokens(m, [0, 2], 2, "cpu")
    calls = []
    m.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[1]))
    a = sample_sliding_window(m, cond, 4, 5, 4, 5, top_k=8, generator=torch.Generator().manual_seed(5))
    assert sum(calls) == 1 + 4 * 5 - 1  # one prefill of the cond token, then single tokens
    b = m.generate(cond, 20, top_k=8, generator=torch.Generator().manual_seed(5))
    assert a.shape == (2, 4, 5) and torch.equal(a.reshape(2, 20), b)


def naive_sliding_window(m, cond, h, w, wh, ww, generator):
    """Reference: one full uncached window forward per token."""
    B, n_cond = cond.shape
    grid = torch.zeros(B, h, w, dtype=torch.long)
    for i in range(h):
        for j in range(w):
            r0, c0 = window_start(i, h, wh), window_start(j, w, ww)
            window = grid[:, r0:r0 + wh, c0:c0 + ww].reshape(B, -1)
            logits = m(torch.cat([cond, window], 1))
            pos = n_cond - 1 + (i - r0) * ww + (j - c0)
            grid[:, i, j] = sample_logits(logits[:, pos], generator=generator)
    return grid


@grades("window_start", "cond_tokens")
def test_sliding_window_larger_grid_matches_naive():
    m = tiny_gpt(n_codes=16, block_size=17, std=0.3)
    cond = cond_tokens(m, None, 2, "cpu")
    with torch.no_grad():
        ref = naive_sliding_window(m, cond, 6, 7, 4, 4, torch.Generator().manual_seed(9))
    calls = []
    m.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[1]))
    out = sample_sliding_window(m, cond, 6, 7, 4, 4, generator=torch.Generator().manual_seed(9))
    assert out.shape == (2, 6, 7) and out.min() >= 0 and out.max() < 16
    assert torch.equal(out, ref)
    assert len(calls) == 42 and sum(calls) < 42 * 16  # cheaper than naive
    assert calls.count(1) > 0  # the cache is reused along the edge columns
    # a second model and seed
    m2 = tiny_gpt(n_codes=16, block_size=17, seed=1, std=0.3)
    with torch.no_grad():
        ref2 = naive_sliding_window(m2, cond, 5, 6, 4, 4, torch.Generator().manual_seed(2))
    out2 = sample_sliding_window(m2, cond, 5, 6, 4, 4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(out2, ref2)
    # a grid smaller than the window: the window shrinks to the grid, i.e. plain generate
    small = sample_sliding_window(m2, cond, 2, 3, 4, 4, generator=torch.Generator().manual_seed(2), progress=True)
    assert torch.equal(small.reshape(2, 6), m2.generate(cond, 6, generator=torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError, match="block_size"):
        sample_sliding_window(m, cond, 8, 8, 5, 5)


# --- training ----------------------------------------------------------------------------------
def test_optimizer_groups():
    m = tiny_gpt()
    opt = m.configure_optimizer(1e-3)
    decay, no_decay = opt.param_groups
    linear_w = {id(mod.weight) for mod in m.modules() if isinstance(mod, nn.Linear)}
    assert {id(p) for p in decay["params"]} == linear_w and len(linear_w) == 2 * 4 + 1
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in m.parameters()} - linear_w
    assert id(m.pos_emb) in {id(p) for p in no_decay["params"]}
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_training_lowers_loss():
    torch.manual_seed(0)
    m = GPT(n_codes=8, block_size=10, n_layer=2, n_head=2, n_embd=32, n_cond_tokens=2).train()
    labels = torch.tensor([0, 1, 0, 1])
    # two "images" of 9 tokens, one per class: after training the label decides the image
    images = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0, 1], [7, 7, 0, 0, 7, 7, 0, 0, 7]])[labels]
    seq = torch.cat([cond_tokens(m, labels, 4, "cpu"), images], 1)
    opt = m.configure_optimizer(3e-3)
    losses = []
    for _ in range(60):
        loss = gpt_loss(m(seq[:, :-1]), seq, n_cond=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 1.9 and losses[-1] < 0.3 * losses[0]


def test_sample_end_to_end_and_sliding_window(tiny_runs):
    root, _ = tiny_runs
    base = dict(sample.CONFIG, gpt_ckpt=str(root / "gpt" / "ckpt.pt"), device="cpu", num_samples=2)
    path = sample.sample(dict(base, class_label=1, out=str(root / "one_class.png")))
    assert Image.open(path).size == (2 + 2 * 18, 2 + 1 * 18)
    path = sample.sample(dict(base, out=str(root / "per_class.png")))  # one row per class
    assert Image.open(path).size == (2 + 2 * 18, 2 + 3 * 18)
    # 16 x 40 pixels = 8 x 20 tokens from a GPT trained on 8 x 8: the sliding window
    path = sample.sample(dict(base, class_label=0, width=40, out=str(root / "wide.png")))
    assert Image.open(path).size == (2 + 2 * 42, 2 + 1 * 18)
    Image.fromarray(np.full((20, 24, 3), 200, np.uint8)).save(root / "photo.png")
    path = sample.sample(dict(base, class_label=2, complete=str(root / "photo.png"), out=str(root / "done.png")))
    assert Image.open(path).size == (2 + 4 * 18, 2 + 1 * 18)  # original, reconstruction, 2 completions


def test_spatial_loss_ignores_every_condition_position():
    # [r, s] with a 2x2 condition grid r (4 tokens) and 3 image tokens s; K = 5 image codes
    m = GPT(n_codes=5, block_size=7, n_layer=1, n_head=1, n_embd=8, n_cond_tokens=3)
    r, s = torch.tensor([[[2, 0], [1, 2]]]), torch.tensor([[4, 0, 3]])
    seq = train_gpt.make_sequences(m, s, r, "spatial")
    assert seq.tolist() == [[7, 5, 6, 7, 4, 0, 3]]  # condition code c -> id K + c, then s
    # logits at positions 0..2 (which would predict r's tokens) are wild; from position 3 = len(r) - 1
    # on they are uniform over the 5 codes, so the loss must be exactly log 5 whatever the rest says
    logits = torch.zeros(1, 6, 5)
    logits[0, :3] = torch.randn(3, 5) * 100
    logits.requires_grad_(True)
    loss = gpt_loss(logits, seq, n_cond=4)
    assert loss.item() == pytest.approx(np.log(5))
    loss.backward()
    assert logits.grad[0, :3].abs().sum() == 0 and logits.grad[0, 3:].abs().sum() > 0
    with pytest.raises(ValueError, match=r"condition codes must be in \[0, 3\)"):
        spatial_cond_tokens(m, torch.tensor([[[3]]]))


class EchoCondition:
    """A stub GPT for the sliding window: its logits at the newest position pick the code
    1 + (the first condition token it sees - K), and it records the condition part of every
    sequence it is fed, so a test can check which condition window was visible for each token."""

    n_codes, block_size = 64, 100

    def __init__(self, n_cond):
        self.n_cond, self.seen = n_cond, []

    def new_kv_cache(self, batch_size):
        cache = KVCache(1, 1, 1, 1, 1, "cpu", torch.float32)  # only its length is used
        cache.seq = None
        return cache

    def __call__(self, idx, cache):
        cache.seq = idx if cache.length == 0 else torch.cat([cache.seq, idx], 1)
        cache.length += idx.size(1)
        self.seen.append(cache.seq[:, :self.n_cond].clone())
        logits = torch.full((idx.size(0), idx.size(1), self.n_codes), -1e9)
        logits[torch.arange(idx.size(0)), -1, 1 + cache.seq[:, 0] - self.n_codes] = 0.0
        return logits


@pytest.mark.parametrize("h, w, hc, wc, wh, ww, first", [
    # same grid size (semantic maps): the windows of the plain rule, along the width 0 0 1 2 3 4
    (2, 6, 2, 6, 2, 2, [0, 0, 1, 2, 3, 4]),
    # a condition grid half as fine (a low-res image): windows move in steps of 2 image tokens;
    # the 2x2 condition window starts at condition column 0 0 0 0 1 1 2 2
    (4, 8, 2, 4, 4, 4, [0, 0, 0, 0, 1, 1, 2, 2]),
])
def test_sliding_window_conditional_sampling_uses_the_condition_window_under_each_token(h, w, hc, wc, wh, ww, first):
    r = torch.arange(hc * wc).view(1, hc, wc)  # condition code = its raster position
    n_cond = (wh * hc // h) * (ww * wc // w)
    stub = EchoCondition(n_cond)
    grid = sample_sliding_window(stub, stub.n_codes + r, h, w, wh, ww)
    # every position written (the stub never writes 0), each from the first token of its window
    assert grid.tolist() == [[[1 + c for c in first]] * h]
    # and each token saw exactly the condition window under its image window, in raster order
    ratio = h // hc
    for k, seen in enumerate(stub.seen):
        i, j = divmod(k, w)
        r0, c0 = window_start(i // ratio, hc, wh // ratio), window_start(j // ratio, wc, ww // ratio)
        assert seen.tolist() == (stub.n_codes + r[:, r0:r0 + wh // ratio, c0:c0 + ww // ratio]).flatten(1).tolist()
    assert len(stub.seen) == h * w
    with pytest.raises(ValueError, match="does not tile"):
        sample_sliding_window(stub, stub.n_codes + torch.zeros(1, 3, 3, dtype=torch.long), 4, 8, 4, 4)


# =============================================================================
# train_gpt.py: the token cache and the loop


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A 2-step VQGAN and a class-conditional 3-step GPT on 16x16 shapes: checkpoints to sample from."""
    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    train_vqgan.train(tiny_train_config(root / "vqgan", max_steps=2, disc_start=10))
    gpt_config = dict(train_gpt.CONFIG, vqgan_ckpt=str(root / "vqgan" / "ckpt.pt"), out_dir=str(root / "gpt"),
                      max_images=64, n_layer=1, n_head=2, n_embd=16, batch_size=8, max_steps=3, eval_interval=3,
                      eval_batches=1, num_samples=3, conditional="class", device="cpu", warmup_steps=1)
    train_gpt.train(gpt_config)
    return root, gpt_config


def test_token_cache_is_reused_and_invalidated_when_the_vqgan_changes(tiny_runs, monkeypatch, tmp_path):
    root, gpt_config = tiny_runs
    caches = sorted((root / "gpt").glob("tokens_*.pt"))
    assert len(caches) == 1
    cache = torch.load(caches[0], weights_only=True)
    assert cache["train_tokens"].shape == (64, 8, 8) and cache["num_classes"] == 3
    # the cached grids are exactly the VQGAN's indices of the dataset's images
    vq = vqgan.vqgan_from_checkpoint(utils.load_checkpoint(gpt_config["vqgan_ckpt"], "vqgan")).eval()
    x = torch.stack([ShapesDataset(4, 16, seed=0)[i][0] for i in range(4)])
    assert torch.equal(vq.encode(x)[1], cache["train_tokens"][:4])
    # a second run reuses the file: the encoder never runs
    monkeypatch.setattr(train_gpt, "encode_dataset", lambda *a, **k: pytest.fail("encoded again"))
    vq = vqgan.vqgan_from_checkpoint(utils.load_checkpoint(gpt_config["vqgan_ckpt"], "vqgan"))
    data_config = utils.load_checkpoint(gpt_config["vqgan_ckpt"], "vqgan")["config"]
    again = train_gpt.load_token_cache(gpt_config, vq, data_config, torch.device("cpu"))
    assert torch.equal(again["train_tokens"], cache["train_tokens"])
    # a changed VQGAN checkpoint (one more training step) gets a new key, so the cache is rebuilt
    # (trained on in a copy: the fixture's GPT stays pinned to the fixture's VQGAN)
    monkeypatch.undo()
    shutil.copytree(root / "vqgan", tmp_path / "vqgan")
    train_vqgan.train(tiny_train_config(tmp_path / "vqgan", max_steps=3, disc_start=10, resume=True))
    train_gpt.load_token_cache(dict(gpt_config, vqgan_ckpt=str(tmp_path / "vqgan" / "ckpt.pt")), vq, data_config,
                               torch.device("cpu"))
    assert len(list((root / "gpt").glob("tokens_*.pt"))) == 2


def test_flipped_data_caches_both_orientations():
    class Flipping(torch.utils.data.Dataset):
        random_flip = True

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.arange(16.0).view(1, 1, 16).expand(3, 16, 16) / 8 - 1, i

    class Recorder:
        def encode(self, x):
            return None, x[:, 0, :1, :].long(), None

    tokens, labels = train_gpt.encode_dataset(Recorder(), Flipping(), 0, 8, "cpu", "test")
    assert len(tokens) == 4 and labels.tolist() == [0, 1, 0, 1]
    assert torch.equal(tokens[2], tokens[0].flip(-1))


def test_gpt_training_writes_checkpoints_and_a_sample_row_per_class(tiny_runs):
    root, _ = tiny_runs
    ckpt = utils.load_checkpoint(str(root / "gpt" / "ckpt.pt"), "gpt")
    assert ckpt["step"] == 3 and ckpt["class_names"] == list(SHAPE_NAMES) and ckpt["grid_hw"] == [8, 8]
    assert (root / "gpt" / "best.pt").exists() and (root / "gpt" / "samples_000003.png").exists()
    # one row per class in the sample grid: 3 classes x 1 sample, 16-pixel tiles with 2-pixel padding
    assert Image.open(root / "gpt" / "samples_000003.png").size == (2 + 1 * 18, 2 + 3 * 18)


def test_gpt_learning_rate_schedule():
    config = dict(train_gpt.CONFIG, lr=1.0, warmup_steps=10, max_steps=110)
    assert train_gpt.learning_rate(0, config) == pytest.approx(0.1)
    assert train_gpt.learning_rate(9, config) == pytest.approx(1.0)
    assert train_gpt.learning_rate(60, config) == pytest.approx(0.55)  # half-way down the cosine: 0.1 + 0.9 / 2
    assert train_gpt.learning_rate(110, config) == pytest.approx(0.1)
    # the VQGAN's: 100 warm-up steps by default (lr / 100 at step 0), the same cosine after them;
    # without warm-up the cosine starts at step 0; the paper preset keeps lr fixed
    vqgan_lr = lambda s, c: utils.lr_at(s, c["lr"], c["max_steps"], c["warmup_steps"], c["lr_schedule"])
    vq = dict(train_vqgan.CONFIG, lr=1.0, max_steps=1100)
    assert [vqgan_lr(s, vq) for s in (0, 99, 600, 1100)] == pytest.approx([0.01, 1.0, 0.55, 0.1])
    vq = dict(vq, warmup_steps=0, max_steps=100)
    assert [vqgan_lr(s, vq) for s in (0, 50, 100)] == pytest.approx([1.0, 0.55, 0.1])
    paper = train_vqgan.resolve_config(dict(preset="paper", lr=1.0, max_steps=100))
    assert [vqgan_lr(s, paper) for s in (0, 50, 100)] == [1.0, 1.0, 1.0]


def test_gpt_flags_are_checked():
    with pytest.raises(SystemExit, match="--conditional=pixels is not one of none, class"):
        train_gpt.resolve_config(dict(conditional="pixels"))
    with pytest.raises(SystemExit, match="not divisible"):
        train_gpt.resolve_config(dict(n_embd=30, n_head=4))
    with pytest.raises(SystemExit, match="no checkpoint at"):
        train_gpt.train(dict(train_gpt.CONFIG, vqgan_ckpt="/nonexistent/ckpt.pt", device="cpu"))


@pytest.fixture(scope="module")
def spatial_runs(tmp_path_factory):
    """A 2-step image VQGAN, a 2-step semantic condition VQGAN and a 2-step spatial GPT, 16x16 shapes."""
    root = tmp_path_factory.mktemp("spatial")
    torch.manual_seed(0)
    train_vqgan.train(tiny_train_config(root / "vqgan", max_steps=2, disc_start=10))
    train_vqgan.train(tiny_train_config(root / "cond", max_steps=2, condition="semantic", cond_classes=4))
    gpt_config = dict(train_gpt.CONFIG, vqgan_ckpt=str(root / "vqgan" / "ckpt.pt"), out_dir=str(root / "gpt"),
                      max_images=32, n_layer=1, n_head=2, n_embd=16, batch_size=8, max_steps=2, eval_interval=2,
                      eval_batches=1, num_samples=2, conditional="spatial", cond_vqgan_ckpt=str(root / "cond" / "ckpt.pt"),
                      device="cpu", warmup_steps=1)
    train_gpt.train(gpt_config)
    return root, gpt_config


def test_spatial_gpt_trains_on_cached_condition_grids_and_samples_any_size(spatial_runs, tmp_path, capsys):
    root, _ = spatial_runs
    ckpt = utils.load_checkpoint(str(root / "gpt" / "ckpt.pt"), "gpt")
    assert ckpt["conditional"] == "spatial" and ckpt["cond_grid_hw"] == [8, 8] and ckpt["cond_config"]["condition"] == "semantic"
    assert ckpt["model_config"]["block_size"] == 64 + 64 and ckpt["model_config"]["n_cond_tokens"] == 16
    cache = torch.load(next((root / "gpt").glob("tokens_*.pt")), weights_only=True)
    cond_vqgan = vqgan.vqgan_from_checkpoint(utils.load_checkpoint(str(root / "cond" / "ckpt.pt"), "vqgan"))
    maps = torch.stack([ShapesDataset(4, 16, seed=0)[i][2] for i in range(4)])
    assert torch.equal(cache["train_cond"][:4], cond_vqgan.eval().encode(data.one_hot_map(maps, 4))[1])
    base = dict(sample.CONFIG, gpt_ckpt=str(root / "gpt" / "ckpt.pt"), device="cpu", num_samples=2)
    path = sample.sample(dict(base, cond="scene", out=str(tmp_path / "wide.png")))  # 16 x 48: 3x the training width
    assert Image.open(path).size == (2 + 2 * 50, 2 + 2 * 18)  # rows of [map | sample]
    out = capsys.readouterr().out
    assert "foreground/background agreement with the map" in out
    assert re.search(r"^map score: \d+/\d+ \(\d+%\) of the map's shapes drawn in one colour as the class asked for", out, re.M), out
    labels = tmp_path / "map.png"
    Image.fromarray(np.pad(np.full((8, 8), 2, np.uint8), 4)).save(labels)  # a 16x16 map with one square
    path = sample.sample(dict(base, cond=str(labels), out=str(tmp_path / "one.png")))
    assert Image.open(path).size == (2 + 2 * 18, 2 + 2 * 18)


# =============================================================================
# sample.py: sampling, reconstruction, evaluation, the official checkpoints


def test_sample_errors_are_one_clear_line(tiny_runs, tmp_path):
    root, gpt_config = tiny_runs
    base = dict(sample.CONFIG, gpt_ckpt=str(root / "gpt" / "ckpt.pt"), device="cpu", num_samples=1,
                out=str(tmp_path / "x.png"))
    photo = tmp_path / "photo.png"
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(photo)
    other_vqgan = tmp_path / "k32" / "ckpt.pt"
    train_vqgan.train(tiny_train_config(tmp_path / "k32", max_steps=1, n_codes=32, disc_start=10))
    for overrides, words in [(dict(class_label=3), "--class_label=3 is out of range (this model knows 0 = circle"),
                             (dict(width=21), "not a multiple of the VQGAN's downsampling factor f=2"),
                             (dict(height=8), "smaller than the training size"),
                             (dict(gpt_ckpt=gpt_config["vqgan_ckpt"]), "is a vqgan checkpoint, not a gpt checkpoint"),
                             (dict(vqgan_ckpt=str(other_vqgan)), "has 32 codes but the GPT"),
                             (dict(complete=str(tmp_path / "nope.png"), class_label=0), "no such file"),
                             (dict(complete=str(photo), class_label=7), "--class_label=7 is out of range"),
                             (dict(top_p=0.0), "--top_p")]:
        with pytest.raises(SystemExit) as e:
            sample.sample(dict(base, **overrides))
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_sample_reconstruct_with_own_and_official_checkpoints(tiny_runs, tmp_path, capsys):
    root, _ = tiny_runs
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), np.uint8)).save(tmp_path / "photo.png")
    base = dict(sample.CONFIG, reconstruct=str(tmp_path / "photo.png"), device="cpu")
    # this project's checkpoint: the training size (16) by default, 8x8 tokens at f=2
    path = sample.sample(dict(base, vqgan_ckpt=str(root / "vqgan" / "ckpt.pt"), out=str(tmp_path / "own.png")))
    assert Image.open(path).size == (2 + 3 * 18, 2 + 18)  # image | tokens | reconstruction, 16x16 each
    assert "dB, 8x8 tokens of 16 codes" in capsys.readouterr().out
    tokens = np.asarray(Image.open(path).convert("RGB"))[2:18, 20:36].astype(int)
    assert (tokens == tokens.reshape(8, 2, 8, 2, 3)[:, :1, :, :1].repeat(2, 1).repeat(2, 3).reshape(16, 16, 3)).all()
    # an official-layout Lightning file with a pickled object beside the state dict
    official = str(tmp_path / "last.ckpt")
    torch.save(dict(official_layout(tiny_vqgan(), Discriminator(ndf=8, n_layers=2)), callbacks=PickledCallback()),
               official)
    path = sample.sample(dict(base, vqgan_ckpt=official, image_size=32, out=str(tmp_path / "official.png")))
    assert Image.open(path).size == (2 + 3 * 34, 2 + 34)
    out = capsys.readouterr().out
    assert "PSNR" in out and "dB, 16x16 tokens of 16 codes" in out
    for overrides, words in [(dict(vqgan_ckpt=""), "--reconstruct needs --vqgan_ckpt"),
                             (dict(vqgan_ckpt=str(root / "gpt" / "ckpt.pt")), "is a gpt checkpoint"),
                             (dict(vqgan_ckpt=official, image_size=33), "multiple of")]:
        with pytest.raises(SystemExit) as e:
            sample.sample(dict(base, **overrides))
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_token_picture_gives_each_code_one_colour_over_its_pixels():
    indices = torch.tensor([[[0, 1, 1], [2, 0, 1]]])
    picture = sample.token_picture(indices, 3, 2)
    assert picture.shape == (1, 3, 4, 6) and picture.min() >= -1 and picture.max() <= 1
    colour = lambda i, j: picture[0, :, 2 * i, 2 * j]
    assert torch.equal(picture[0, :, 2:4, 0:2], colour(1, 0)[:, None, None].expand(3, 2, 2))  # f x f squares
    assert torch.equal(colour(0, 0), colour(1, 1)) and torch.equal(colour(0, 1), colour(1, 2))  # same code, same colour
    assert not torch.equal(colour(0, 0), colour(0, 1)) and not torch.equal(colour(0, 0), colour(1, 0))


def official_transformer_layout(gpt, vqgan):
    """Our GPT and VQGAN under the official Net2NetTransformer key names (the inverse of the
    converter): separate query/key/value, causal-mask buffers, no rows for our own start token."""
    sd = {}
    for k, v in gpt.state_dict().items():
        if ".attn.qkv." in k:
            for name, part in zip(("query", "key", "value"), v.chunk(3)):
                sd["transformer." + k.replace("qkv", name)] = part
        elif k == "tok_emb.weight":
            sd["transformer." + k] = v[:gpt.n_codes]
        else:
            sd["transformer." + k] = v
    for i in range(gpt.config["n_layer"]):
        sd[f"transformer.blocks.{i}.attn.mask"] = torch.ones(1, 1, gpt.block_size, gpt.block_size).tril()
    sd.update({"first_stage_model." + k: v for k, v in vqgan.state_dict().items()})
    return {"state_dict": sd, "callbacks": PickledCallback()}


def test_sample_from_an_official_transformer_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    # f = 16 like the official VQGANs, so their 256x256 training crops are 16x16 = 256 tokens
    vqgan = VQGAN(ch=8, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1, attn_resolutions=(), resolution=256,
                  z_channels=8, embed_dim=4, n_codes=16)
    gpt = GPT(16, 257, n_layer=1, n_head=2, n_embd=16)
    path = str(tmp_path / "last.ckpt")
    torch.save(official_transformer_layout(gpt, vqgan), path)
    base = dict(sample.CONFIG, gpt_ckpt=path, n_head=2, num_samples=1, device="cpu", seed=3)
    out = sample.sample(dict(base, out=str(tmp_path / "official.png")))
    assert Image.open(out).size == (256, 256)  # one 16x16 grid of f=16 tokens, no grid padding for one image
    # the same tokens as our GPT gives: decode what generate() writes with the same seed
    model, _, _ = sample.load_models(base, torch.device("cpu"))
    cond = cond_tokens(model, None, 1, "cpu")
    ours = gpt.eval().generate(cond, 256, generator=torch.Generator().manual_seed(3))
    theirs = model.generate(cond, 256, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours, theirs)
    with pytest.raises(SystemExit, match="n_head=3 does not divide n_embd=16"):
        sample.sample(dict(base, n_head=3))
    # another grid: a block of 64 = 8x8 tokens, trained on 128x128 crops at f=16, samples 128x128
    torch.save(official_transformer_layout(GPT(16, 64, n_layer=1, n_head=2, n_embd=16), vqgan), path)
    assert Image.open(sample.sample(dict(base, out=str(tmp_path / "8x8.png")))).size == (128, 128)
    assert [sample.official_grid_side(b, 16) for b in (256, 1024, 257, 100, 3)] == [16, 32, 16, 10, 1]
    torch.save({"state_dict": {k: v for k, v in official_transformer_layout(gpt, vqgan)["state_dict"].items()
                               if not k.startswith("first_stage_model.")}}, path)
    with pytest.raises(SystemExit, match="no tensor 'encoder.conv_in.weight'"):
        sample.sample(base)


def test_animate_writes_a_small_gif_of_the_grid_filling_in(tiny_runs, tmp_path, capsys):
    root, _ = tiny_runs
    base = dict(sample.CONFIG, gpt_ckpt=str(root / "gpt" / "ckpt.pt"), device="cpu", num_samples=2, class_label=1,
                out=str(tmp_path / "s.png"))
    # 16x16 pixels = 8x8 tokens, the trained grid: a frame every ceil(64 / 30) = 3 tokens, plus the last one
    sample.sample(dict(base, animate=str(tmp_path / "a.gif")))
    gif = Image.open(tmp_path / "a.gif")
    assert gif.n_frames == 64 // 3 + 1 and gif.size == (2 + 2 * (64 + 2), 2 + 64 + 2)  # 2 samples enlarged 4x
    first = np.asarray(gif.convert("RGB")).astype(int)
    assert np.abs(first[40:66, 2:66] - 128).max() <= 1  # after 3 tokens the rows below are still grey
    # 16x40 pixels = 8x20 tokens: the sliding window, outlined in red where the token was sampled
    sample.sample(dict(base, width=40, animate=str(tmp_path / "wide.gif")))
    gif = Image.open(tmp_path / "wide.gif")
    assert gif.n_frames == 160 // 6 + 1 and gif.size == (2 + 2 * (160 + 2), 68)
    gif.seek(4)  # after 30 tokens: token 29 is (1, 9), its window starts at column 9 - 4 = 5 (8 pixels each)
    frame = np.asarray(gif.convert("RGB")).astype(int)
    for x, y in ((2 + 5 * 8, 30), (2 + 13 * 8 - 1, 30), (2 + 162 + 5 * 8, 30)):
        assert abs(frame[y, x] - np.array([255, 0, 0])).max() < 40, (x, y, frame[y, x])
    assert "wrote 27 frames of generation" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="needs a path ending in .gif"):
        sample.sample(dict(base, animate=str(tmp_path / "a.png")))


def test_foreground_agreement_by_hand():
    red, white, black = (torch.tensor(PALETTE[i], dtype=torch.float32) / 127.5 - 1 for i in (2, 1, 0))
    semantic = torch.tensor([[[0, 0], [1, 0]]]).expand(3, 2, 2)
    # sample 1: background red, red, white (a stray pixel); foreground white -> 3 of 4 agree
    # sample 2: the foreground pixel has the background colour -> 3 of 4; sample 3: all right, with noise
    pixels = [[red, red, white, white], [black, black, black, black], [red, red, white, red]]
    images = torch.stack([torch.stack(p).T.reshape(3, 2, 2) for p in pixels])
    images[2] += 0.1 * torch.randn(3, 2, 2)  # still nearest to its palette colour
    agreement = sample.foreground_agreement(images, semantic)
    assert agreement.tolist() == pytest.approx([0.75, 0.75, 1.0])


def test_spatial_conditioning_errors_are_one_clear_line(spatial_runs, tiny_runs, tmp_path):
    root, gpt_config = spatial_runs
    base = dict(sample.CONFIG, gpt_ckpt=str(root / "gpt" / "ckpt.pt"), device="cpu", num_samples=1,
                out=str(tmp_path / "x.png"))
    odd, high, rgb = tmp_path / "odd.png", tmp_path / "high.png", tmp_path / "rgb.png"
    Image.fromarray(np.zeros((16, 15), np.uint8)).save(odd)
    Image.fromarray(np.full((16, 16), 9, np.uint8)).save(high)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(rgb)
    cases = [(base, dict(cond=str(odd)), "is 15x16 pixels; both sides must be multiples of 2"),
             (base, dict(cond="scene", width=8), "smaller than the training size"),
             (base, dict(cond=str(high)), "has class id 9, out of range for 4 classes"),
             (base, dict(cond=str(rgb)), "is a mode-RGB image; a label map has one channel"),
             (base, dict(cond=str(tmp_path / "nope.png")), "no such file"),
             (base, {}, "this GPT is conditioned on semantic maps: give --cond=FILE or --cond=scene"),
             (base, dict(cond="scene", complete=str(odd)), "--complete is for unconditional and class-conditional"),
             (base, dict(cond="scene", cond_vqgan_ckpt=gpt_config["vqgan_ckpt"]), "is not a semantic condition VQGAN"),
             (dict(base, gpt_ckpt=str(tiny_runs[0] / "gpt" / "ckpt.pt")), dict(cond="scene"),
              "--cond is for spatially conditioned GPTs, and this one is class-conditional")]
    for config, overrides, words in cases:
        with pytest.raises(SystemExit) as e:
            sample.sample(dict(config, **overrides))
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
    # training: an image VQGAN as the condition, a missing partner flag, bad condition flags
    with pytest.raises(SystemExit, match="is an image VQGAN, not a condition VQGAN"):
        train_gpt.train(dict(gpt_config, cond_vqgan_ckpt=gpt_config["vqgan_ckpt"], out_dir=str(tmp_path / "g")))
    with pytest.raises(SystemExit, match="go together"):
        train_gpt.resolve_config(dict(conditional="spatial"))
    for flags, words in [(dict(condition="depth"), "--condition=depth is not one of semantic, lowres"),
                         (dict(condition="semantic", cond_classes=3), "the shapes have 4 classes"),
                         (dict(condition="semantic", data="cifar10"), "needs semantic maps"),
                         (dict(cond_data="labels"), "--cond_data is for --condition=semantic with --data=PATH"),
                         (dict(condition="lowres", lowres_factor=3), "must be >= 2 and divide --image_size=32"),
                         (dict(condition="lowres"), "= 8 is too small for a discriminator")]:
        with pytest.raises(SystemExit, match=words):
            train_vqgan.resolve_config(flags)
    assert train_vqgan.resolve_config(dict(condition="semantic"))["cond_classes"] == 4


def test_load_official_depth_to_image_transformer(tmp_path):
    # The official [r, s] model indexes ONE table with both grids' codes; build one (our GPT with
    # no conditioning rows stands in for the official minGPT) and convert it
    torch.manual_seed(0)
    official = GPT(16, 12, n_layer=1, n_head=2, n_embd=16, n_cond_tokens=0).eval()
    with torch.no_grad():
        official.pos_emb.normal_()
    vqgan = tiny_vqgan()
    ours = load_official_gpt(official_transformer_layout(official, vqgan), cond="spatial", n_classes=8, n_head=2).eval()
    assert ours.n_cond_tokens == 8 and ours.block_size == 12
    r, s = torch.randint(0, 8, (2, 2, 3)), torch.randint(0, 16, (2, 5))
    with torch.no_grad():
        theirs_logits = official(torch.cat([r.flatten(1), s], 1))
        our_logits = ours(torch.cat([spatial_cond_tokens(ours, r).flatten(1), s], 1))
    torch.testing.assert_close(our_logits, theirs_logits)
    # a condition VQGAN reading 3 channels is not a depth model: sample.py says so instead of guessing
    layout = official_transformer_layout(official, vqgan)
    layout["state_dict"].update({"cond_stage_model." + k: v for k, v in vqgan.state_dict().items()})
    torch.save(layout, tmp_path / "depth.ckpt")
    with pytest.raises(SystemExit, match="its condition VQGAN reads 3 channels"):
        sample.sample(dict(sample.CONFIG, gpt_ckpt=str(tmp_path / "depth.ckpt"), n_head=2, device="cpu"))


def test_eval_prints_every_metric_and_says_why_one_is_unavailable(tiny_runs, tmp_path, monkeypatch, capsys):
    root, _ = tiny_runs
    ckpt = str(root / "vqgan" / "ckpt.pt")
    sample.main(["--eval=true", f"--vqgan_ckpt={ckpt}", "--pretrained=false", "--eval_images=4", "--device=cpu"])
    out = capsys.readouterr().out
    assert "on 4 validation images of shapes (16x16)" in out
    for name in ("L1", "PSNR", "SSIM", "LPIPS", "codebook", "FID"):
        line = next(line for line in out.splitlines() if line.strip().startswith(name))
        assert any(c.isdigit() for c in line.split(name, 1)[1]), line
    assert "random weights: compare only" in out and "of 16 codes used, perplexity" in out
    # offline with --pretrained=true: LPIPS and FID say why, the other metrics still print
    def no_network(*args, **kwargs):
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    metrics = sample.evaluate_vqgan(dict(sample.CONFIG, vqgan_ckpt=ckpt, eval_images=4, device="cpu"))
    out = capsys.readouterr().out
    assert "PSNR" in out and "val_fid" not in metrics
    for name in ("LPIPS", "FID"):
        line = next(line for line in out.splitlines() if line.strip().startswith(name))
        assert "unavailable" in line and "--pretrained=false" in line
    for config, words in ((dict(vqgan_ckpt=""), "--eval needs --vqgan_ckpt"),
                          (dict(vqgan_ckpt=ckpt, eval_images=-1), "--eval_images=-1"),
                          (dict(vqgan_ckpt=ckpt, image_size=15, eval_images=2), "not a multiple")):
        with pytest.raises(SystemExit, match=words) as e:
            sample.evaluate_vqgan(dict(sample.CONFIG, device="cpu", pretrained=False, **config))
        assert "\n" not in str(e.value)


def test_sample_fid_compares_gpt_samples_with_validation_images(tiny_runs, tmp_path, capsys):
    root, gpt_config = tiny_runs
    out = str(tmp_path / "fid_samples.png")
    score = sample.sample_fid(dict(sample.CONFIG, gpt_ckpt=str(root / "gpt" / "ckpt.pt"), num_samples=4, eval_images=4,
                                   pretrained=False, device="cpu", out=out))
    assert np.isfinite(score) and score > 0
    assert "4 samples vs 4 validation images of shapes" in capsys.readouterr().out
    assert Image.open(out).size[0] > 16
    with pytest.raises(SystemExit, match="at least 2"):
        sample.sample_fid(dict(sample.CONFIG, gpt_ckpt=str(root / "gpt" / "ckpt.pt"), num_samples=1, device="cpu"))


def test_sample_from_an_official_depth_to_image_transformer(tmp_path):
    torch.manual_seed(0)
    # the official model: [r, s] of two 4x4 grids through one table (block 2 * 16 - 1 = 31), a
    # first stage with 16 codes and a 1-channel depth VQGAN with 8, both f = 2
    # (large weights, as in tiny_gpt(std=...): with the 0.02 init the samples barely depend on r)
    official = tiny_gpt(16, 31, n_cond_tokens=0, std=0.5)
    with torch.no_grad():
        official.pos_emb.normal_()
    vqgan, depth_vqgan = tiny_vqgan().eval(), tiny_vqgan(in_channels=1, n_codes=8).eval()
    layout = official_transformer_layout(official, vqgan)
    layout["state_dict"].update({"cond_stage_model." + k: v for k, v in depth_vqgan.state_dict().items()})
    ckpt = str(tmp_path / "depth.ckpt")
    torch.save(layout, ckpt)
    depth = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)  # H x W = the trained 4x4 grid
    Image.fromarray(depth).save(tmp_path / "depth.png")
    Image.fromarray(np.stack([depth] * 3, -1)).save(tmp_path / "depth_rgb.png")  # grey RGB: the same luminance
    base = dict(sample.CONFIG, gpt_ckpt=ckpt, n_head=2, num_samples=2, device="cpu", seed=5)
    out = sample.sample(dict(base, cond=str(tmp_path / "depth.png"), out=str(tmp_path / "a.png")))
    picture = np.array(Image.open(out))
    assert picture.shape == (2 + 2 * 10, 2 + 2 * 10, 3)  # 2 rows (samples) of [depth | sample], 8x8 + 2 px padding
    # column 1 is the depth map in grey; column 2 is what a hand loop over the converted GPT samples
    assert (picture[2:10, 2:10] == depth[..., None]).all()
    model = load_official_gpt(layout, cond="spatial", n_classes=8, n_head=2).eval()
    x = torch.from_numpy(depth).float()[None, None] / 255 * 2 - 1
    with torch.no_grad():
        r = depth_vqgan.encode(x)[1].expand(2, -1, -1)
        tokens = model.generate(spatial_cond_tokens(model, r).flatten(1), 16,
                                generator=torch.Generator().manual_seed(5)).view(2, 4, 4)
        expected = ((vqgan.decode_indices(tokens).clamp(-1, 1) + 1) / 2 * 255).permute(0, 2, 3, 1).numpy()
    got = np.stack([picture[2:10, 12:20], picture[12:20, 12:20]]).astype(float)
    assert np.abs(got - expected).max() <= 1.0  # rounding to 8 bits
    rgb = sample.sample(dict(base, cond=str(tmp_path / "depth_rgb.png"), out=str(tmp_path / "b.png")))
    assert (np.array(Image.open(rgb)) == picture).all()
    # one-line errors: a size the VQGANs cannot split into tokens, the built-in shapes, no condition
    Image.fromarray(depth[:, :7]).save(tmp_path / "odd.png")
    for flags, words in [(dict(cond=str(tmp_path / "odd.png")), "condition is 7x8 pixels; both sides must be multiples of 2"),
                         (dict(cond="scene"), "needs a depth map: --cond=DEPTH.png"),
                         (dict(cond=""), "conditioned on depth maps: give --cond=FILE$"),
                         (dict(cond=str(tmp_path / "none.png")), r"no such file \(give a depth PNG\)"),
                         (dict(cond=str(tmp_path / "depth.png"), cond_vqgan_ckpt=ckpt), "brings its own condition VQGAN")]:
        with pytest.raises(SystemExit, match=words) as e:
            sample.sample(dict(base, **flags))
        assert "\n" not in str(e.value)


def test_sample_refuses_a_vqgan_the_gpt_was_not_trained_on(tiny_runs, tmp_path):
    root, _ = tiny_runs
    gpt_ckpt = utils.load_checkpoint(str(root / "gpt" / "ckpt.pt"), "gpt")
    assert gpt_ckpt["vqgan_digest"] == utils.weights_digest(utils.load_checkpoint(gpt_ckpt["vqgan_ckpt"], "vqgan")["model"])
    # the GPT's VQGAN in another folder, and the GPT pointing there
    shutil.copytree(root / "vqgan", tmp_path / "vqgan")
    vq_path, gpt_path = str(tmp_path / "vqgan" / "ckpt.pt"), str(tmp_path / "gpt.pt")
    torch.save(dict(gpt_ckpt, vqgan_ckpt=vq_path), gpt_path)
    base = dict(sample.CONFIG, gpt_ckpt=gpt_path, device="cpu", num_samples=1, class_label=0,
                out=str(tmp_path / "x.png"))
    sample.sample(base)  # the same weights: wherever the file lies, it samples
    train_vqgan.train(tiny_train_config(tmp_path / "vqgan", max_steps=3, disc_start=10, resume=True))  # retrained
    message = one_error_line(lambda: sample.sample(base))
    assert f"the VQGAN {vq_path} is not the one the GPT {gpt_path} was trained on" in message
    # the same from the shell, and for a VQGAN given with --vqgan_ckpt
    (result,) = run_scripts(["sample.py", f"--gpt_ckpt={root / 'gpt' / 'ckpt.pt'}", f"--vqgan_ckpt={vq_path}",
                             "--device=cpu", f"--out={tmp_path / 'y.png'}"])
    assert_one_line_exit_2(result, f"the VQGAN {vq_path} is not the one the GPT {root / 'gpt' / 'ckpt.pt'}")


# =============================================================================
# bench.py


def test_bench_measurements_and_ratios():
    import bench
    env = dict(device="cpu", dtype="", threads=0, warmup=0, iters=1, uncached_tokens=5, grad_checkpointing=False,
               compile=False, peak_flops=0.0, lpips_pretrained=False, channels_last=False)
    r = bench.run_in_child(env, "gpt_sample", dict(model=dict(n_layer=1, n_head=2, n_embd=16, n_codes=32),
                                                   batch_size=2, grid=4))
    assert r["same_tokens"] and r["uncached_tokens"] == 5 and r["unit"] == "tok/s" and r["memory_mb"] > 0
    r = bench.run_in_child(env, "vqgan_step", dict(model=bench.VQGAN_TINY, image_size=16, batch_size=2,
                                                   lpips=False, after=True))
    assert r["value"] == pytest.approx(2 / r["seconds"])
    # ratio > 1 = faster than the official code: 1.22 s official vs 0.61 s ours is 2.00x; 294 vs 588 tok/s too
    row = bench.format_row("x", dict(value=52.5, unit="img/s", seconds=0.61, memory_mb=10), dict(official=1.22, unit="s"))
    assert row[3:5] == ["1.22 s/step", "2.00x"]
    row = bench.format_row("x", dict(value=588.0, unit="tok/s", seconds=1, memory_mb=10), dict(official=294.0, unit="tok/s"))
    assert row[4] == "2.00x"
    # the official figures are a 2-vCPU AVX-512 Xeon's, fp32, 2 threads: elsewhere no ratio is printed
    xeon, flags = "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", {"avx2", "avx512f"}
    cpu = torch.device("cpu")
    assert bench.baseline_mismatch(cpu, None, 2, xeon, flags) == ""
    assert "without AVX-512" in bench.baseline_mismatch(cpu, None, 2, "AMD EPYC", {"avx2"})
    assert "Xeon(R) Platinum 8375C CPU @ 2.90GHz without AVX-512" in bench.baseline_mismatch(cpu, None, 2, xeon, {"avx2"})
    assert "threads" in bench.baseline_mismatch(cpu, None, 1, xeon, flags)
    assert "fp32" in bench.baseline_mismatch(cpu, torch.bfloat16, 2, xeon, flags)
    assert "cuda" in bench.baseline_mismatch(torch.device("cuda"), torch.bfloat16, 2, xeon, flags)
    row = bench.format_row("x", dict(value=588.0, unit="tok/s", seconds=1, memory_mb=10),
                           dict(official=294.0, unit="tok/s"), comparable=False)
    assert row[3:5] == ["294 tok/s", "n/a: other machine"]
    assert all(name in bench.MEASUREMENTS for c in ("tiny", "shapes", "paper") for _, name, _, _ in bench.rows_for(c, 1))
    with pytest.raises(SystemExit, match="--config=huge"):
        bench.rows_for("huge", 1)


def test_bench_gpu_check_rows_and_targets():
    import bench
    rows = bench.rows_for("gpu", 1)
    assert all(name in bench.MEASUREMENTS for _, name, _, _ in rows) and len({r[0] for r in rows}) == len(rows)
    settings = lambda name: sorted((a["batch_size"], a["compile"], a.get("channels_last")) for _, n, a, _ in rows
                                   if n == name)
    assert settings("vqgan_step") == sorted((b, c, cl) for b in (4, 8) for c in (False, True) for cl in (False, True))
    assert settings("gpt_train") == sorted((b, c, None) for b in (2, 8) for c in (False, True))  # no channels-last
    assert settings("gpt_sample") == [(8, False, None), (8, True, None)]
    for _, name, a, _ in rows:
        if name == "vqgan_step":  # the paper VQGAN at 256x256, LPIPS on, after disc_start
            assert a["model"] == bench.VQGAN_PAPER and a["image_size"] == 256 and a["lpips"] and a["after"]
        else:  # 24 x 1024, 16 heads, vocabulary 1024; training fills block 512, sampling 16x16 both ways
            assert a["model"] == dict(n_layer=24, n_head=16, n_embd=1024, n_codes=1024)
            assert a["seq_len"] + 1 == 512 if name == "gpt_train" else a["grid"] == 16 and a["uncached_tokens"] == 256
    compiled = [a["compile"] for _, _, a, _ in rows]
    assert compiled == sorted(compiled)  # the slow-to-start compile rows last: --time_limit cuts those
    assert bench.bf16_peak_flops("NVIDIA H200") == bench.bf16_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert bench.bf16_peak_flops("Tesla T4") == 0.0

    def row(measurement, batch, **figures):
        return dict(label=f"{measurement} b{batch}", measurement=measurement, args=dict(batch_size=batch), **figures)
    gib = 1024  # MiB
    met = [row("vqgan_step", 4, memory_mb=11 * gib), row("vqgan_step", 8, memory_mb=20 * gib),
           row("gpt_train", 2, memory_mb=6 * gib, mfu=0.35), row("gpt_train", 8, memory_mb=20 * gib, mfu=0.45),
           row("gpt_sample", 8, value=1200.0, uncached_tok_s=100.0)]
    lines = bench.check_targets(met)  # the best row decides each target
    assert [passed for passed, _ in lines] == [True] * 4
    assert lines[0][1] == "PASS paper VQGAN batch>=4 peak memory < 12 GiB: 11.00 GiB (vqgan_step b4)"
    assert lines[1][1].endswith("6.00 GiB (gpt_train b2)") and lines[2][1].endswith("45.0% (gpt_train b8)")
    assert lines[3][1] == "PASS sampling 16x16: cached >= 10x uncached tok/s: 12.0x (gpt_sample b8)"
    missed = [row("vqgan_step", 4, memory_mb=12 * gib), row("vqgan_step", 1, memory_mb=gib),  # batch 1 does not count
              row("gpt_train", 2, error="OutOfMemoryError: CUDA out of memory."),  # failed rows neither
              row("gpt_sample", 8, value=900.0, uncached_tok_s=100.0)]
    lines = bench.check_targets(missed)
    assert [passed for passed, _ in lines] == [False] * 4
    assert lines[0][1] == "MISS paper VQGAN batch>=4 peak memory < 12 GiB: 12.00 GiB (vqgan_step b4)"
    assert lines[1][1] == "MISS paper GPT batch>=2 peak memory < 12 GiB: no row measured it"
    assert lines[2][1] == "MISS paper GPT training MFU >= 40%: no row measured it"
    assert lines[3][1].startswith("MISS sampling 16x16") and "9.0x" in lines[3][1]
    assert bench.check_targets([row("gpt_train", 2, memory_mb=gib, mfu=0.39)])[2][1].startswith("MISS paper GPT training MFU")
    assert bench.format_row("x", dict(error="OutOfMemoryError: CUDA out of memory."), None) == \
        ["x", "failed", "", "", "", "OutOfMemoryError: CUDA out of memory."]


def test_bench_gpu_check_refuses_without_cuda_and_bf16(monkeypatch, capsys):
    import bench
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a machine with a GPU
    for argv in (["--config=gpu", "--device=cpu"], ["--config=gpu"], ["--config=gpu", "--device=cuda"]):
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1
        assert err.startswith("error: the GPU check (--config=gpu) needs CUDA, and this run is not on it")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit) as e:  # refused before anything touches the (pretended) GPU
        bench.main(["--config=gpu", "--device=cuda", "--dtype=float32"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: the GPU check measures bf16 autocast, and this run is float32 " \
                                      "(--dtype=float32: use auto or bfloat16, on a GPU with bf16)\n"


def test_bench_a_failing_row_keeps_its_error_line():
    import bench
    env = dict(device="cpu", dtype="", threads=1, warmup=0, iters=1, uncached_tokens=1, grad_checkpointing=False,
               compile=False, peak_flops=0.0, lpips_pretrained=False, channels_last=False)
    r = bench.run_row(env, "nearest_code", dict(n_codes=-1, how="ours"), timeout=300)  # fails in the child
    assert r == dict(error="RuntimeError: Trying to create tensor with negative dimension -1: [-1, 256]")


# =============================================================================
# README.md and the course kit


def readme_equation_map():
    """The README table 'Where each equation lives': rows of (paper, [code names], [test names])."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")) as f:
        table = f.read().split("## Where each equation lives", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[1] != "paper" and not set(cells[1]) <= set("-"):
            rows.append((cells[1], re.findall(r"`([^`]+)`", cells[2]), re.findall(r"`([^`]+)`", cells[3])))
    return rows


def test_every_function_and_test_in_the_equation_map_exists():
    import importlib
    import inspect
    rows = readme_equation_map()
    assert len(rows) >= 15
    for paper, code, tests in rows:
        assert code and tests, f"README row '{paper}' names no function or no test"
        sources = []
        for name in code:  # `file.py:function`, then bare names from the same file
            if ":" in name:
                file, name = name.split(":")
                module = importlib.import_module(file[:-len(".py")])
            obj = module
            for part in name.split("."):
                obj = getattr(obj, part, None)
                assert obj is not None, f"README row '{paper}': {module.__name__}.py has no {name}"
            sources.append(inspect.getsource(obj))
        # a row about Eq. (N) points at code that says "Eq. (N)", so grep finds the same place
        eq = re.match(r"Eq\. \((\d+)\)", paper)
        if eq:
            assert any(f"Eq. ({eq.group(1)})" in src for src in sources), f"README row '{paper}': no Eq. comment"
        for test in tests:
            assert callable(globals().get(test)), f"README row '{paper}': test_all.py has no {test}"


def test_blanking_an_exercise_fails_exactly_its_grading_tests(tmp_path):
    every = sorted({t for tests in GRADED_BY.values() for t in tests})
    for name in ("codebook_loss", "top_p_filter"):
        folder = write_blanked_copy(name, str(tmp_path / name))
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider"] +
                             [f"test_all.py::{t}" for t in every], cwd=folder, capture_output=True, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="300"))
        failed = re.findall(r"^(?:FAILED|ERROR) test_all\.py::(\w+)", run.stdout, re.M)
        assert sorted(set(failed)) == sorted(GRADED_BY[name]), run.stdout[-3000:]
        # each failure is one line naming the missing equation, not a traceback into the function
        file, what = EXERCISES[name]
        assert run.stdout.count(f"Failed: exercise {file}:{name} is blank: write {what}") == len(failed)
    # the blanked copy keeps the comments above the body (the equation in words) and raises with its text
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "vqgan.py")) as f:
        source = blank_function(f.read(), "commitment_loss")
    assert "# Eq. (4), third term: beta * || sg[z_q] - E(x) ||^2" in source and "def codebook_loss(" in source
    namespace = {}
    exec(compile(source, "vqgan_blank.py", "exec"), namespace)
    with pytest.raises(NotImplementedError, match=r"Eq\. \(4\), commitment term"):
        namespace["commitment_loss"](torch.zeros(1), torch.zeros(1), 0.25)


def test_course_kit_lists_and_refuses_unknown_exercises(capsys):
    assert course_kit(["--list-exercises"]) == 0
    out = capsys.readouterr().out
    assert out.count("graded by: test_") == len(EXERCISES) and "vqgan.py:adaptive_weight" in out
    with pytest.raises(SystemExit, match="no exercise 'beta'"):
        course_kit(["--exercise=beta"])


if __name__ == "__main__":
    sys.exit(course_kit(sys.argv[1:]))

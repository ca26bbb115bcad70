"""
The VQGAN's training objective, Eq. (6), assembled from the terms in vqgan.py: one generator
step (E, G and the codebook against L_VQ + lambda * L_GAN) and one discriminator step (Eq. (5)
on the detached reconstruction). train_vqgan.py runs them in its loop; bench.py times them.

Every loss setting is an explicit argument: train_vqgan.loss_settings(config) is the one place
that turns the command line into them.
"""

import torch
import torch.distributed as dist

from utils import autocast, unwrap, unwrap_ddp
from vqgan import adaptive_weight, hinge_d_loss, hinge_g_loss, last_layer_grads, pixel_loss, semantic_rec_loss


def adam(params, lr, device):
    """Adam with the official VQGAN betas (0.5, 0.9) and no weight decay, one for E/G/codebook and
    one for D. fused=True updates every parameter in one kernel instead of a Python loop over them
    (several times faster on a CPU), the same update up to float rounding. (MPS keeps the loop:
    fused Adam arrived there later.)"""
    return torch.optim.Adam(params, lr=lr, betas=(0.5, 0.9), fused=device.type in ("cuda", "cpu"))


def discriminator_on(step, disc_start, semantic):
    # Before disc_start the discriminator neither runs nor trains (the official code runs it and
    # multiplies its loss by zero). A semantic condition VQGAN never uses it: its loss is
    # cross-entropy + VQ.
    return step >= disc_start and not semantic


def averaged_over_processes(*grads):
    """Under torchrun each process holds a shard of the batch; the gradients of the whole batch's
    mean loss are the mean of the shards' gradients. Averaging them before Eq. (7) gives every
    process the lambda one process would compute on the whole batch. One process: unchanged."""
    if not (dist.is_available() and dist.is_initialized()):
        return grads
    stacked = torch.stack(grads)
    dist.all_reduce(stacked)
    return tuple(stacked / dist.get_world_size())


def generator_step(model, disc, lpips, x, use_disc, *, semantic, pixel_loss_kind, perceptual_weight,
                   adaptive_lambda, disc_weight):
    """Eq. (6) for E, G and the codebook. -> (loss, x_hat, indices, logged numbers).

    use_disc: add lambda * L_GAN (discriminator_on). semantic: x is one-hot maps and x_hat per-pixel
    class logits (a condition VQGAN). pixel_loss_kind: 'l2' or 'l1'. perceptual_weight: LPIPS in
    L_rec (needs lpips). adaptive_lambda: Eq. (7), else lambda = disc_weight, fixed.
    """
    x_hat, indices, q_loss = model(x)
    if semantic:
        rec_loss = semantic_rec_loss(x_hat, x)
        return rec_loss + q_loss, x_hat, indices, dict(rec=rec_loss.item(), q=q_loss.item(), lam=0.0)
    # L_rec: per-pixel L2 or L1, plus LPIPS per image broadcast over its pixels (the official nll).
    rec = pixel_loss(x, x_hat, pixel_loss_kind)
    if perceptual_weight > 0:
        rec = rec + perceptual_weight * lpips(x, x_hat).view(-1, 1, 1, 1)
    rec_loss = rec.mean()
    loss = rec_loss + q_loss  # Eq. (4): L_rec + codebook term + beta * commitment term
    lam = torch.zeros(())
    if use_disc:
        # D scores the reconstruction; D's own weights are frozen here, so this step moves G only.
        # (Past DDP's wrapper: frozen weights have no gradients to average, and its reducer would
        # wait for them.)
        g_loss = hinge_g_loss(unwrap_ddp(disc)(x_hat))
        if adaptive_lambda:
            # Eq. (7); under autocast the two gradients come from the same fp32 master weights.
            rec_grad, gan_grad = averaged_over_processes(*last_layer_grads(rec_loss, g_loss, unwrap(model).last_layer))
            lam = adaptive_weight(rec_grad, gan_grad) * disc_weight
        else:  # the ablation: a fixed weight, whatever the two gradients' sizes
            lam = torch.tensor(float(disc_weight), device=x.device)
        loss = loss + lam * g_loss  # Eq. (6): L_VQ + lambda * L_GAN
    return loss, x_hat, indices, dict(rec=rec_loss.item(), q=q_loss.item(), lam=lam.item())


def discriminator_step(disc, x, x_hat):
    # Eq. (5) for D on the *detached* reconstruction: the D step never reaches the generator.
    # Real and fake go through D separately, as officially, so BatchNorm sees one kind at a time.
    return hinge_d_loss(disc(x), disc(x_hat.detach()))


def train_step(model, disc, lpips, opt_g, opt_d, scaler, x, lr, use_disc, losses, device, dtype):
    """One generator step, then (when use_disc) one discriminator step on the same x_hat.
    losses: generator_step's keyword arguments. -> (logged numbers, indices)."""
    for group in opt_g.param_groups + opt_d.param_groups:
        group["lr"] = lr
    disc.requires_grad_(False)  # the generator step must not leave gradients in D
    with autocast(device, dtype):
        loss, x_hat, indices, logs = generator_step(model, disc, lpips, x, use_disc, **losses)
    opt_g.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt_g)
    scaler.update()

    logs["d"] = 0.0
    if use_disc:  # before disc_start D costs nothing: no forward, no backward
        disc.requires_grad_(True)
        with autocast(device, dtype):
            d_loss = discriminator_step(disc, x, x_hat)
        opt_d.zero_grad(set_to_none=True)
        scaler.scale(d_loss).backward()
        scaler.step(opt_d)
        scaler.update()
        logs["d"] = d_loss.item()
    return logs, indices

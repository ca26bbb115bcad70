"""
Stage 1 of Taming Transformers (Esser, Rombach, Ommer, CVPR 2021), Sec. 3.1: the VQGAN.

    image x --Encoder E--> z_hat --quant_conv--> nearest code (Eq. 2) --post_quant_conv--> Decoder G --> x_hat

Read this file beside Sec. 3.1 of the paper. Every equation has one home here, named in a
comment you can grep for (`Eq. (2)`, `Eq. (4)`, `Eq. (5)`, `Eq. (7)`); each lives in a small
function of its own so it can be read, tested and (for coursework) rewritten in isolation.

The module names (encoder.down.0.block.1.conv2, quantize.embedding, ...) are the official
implementation's (CompVis/taming-transformers), on purpose: the paper's pretrained checkpoints
then load without renaming anything.

Images are float tensors (B, 3, H, W) scaled to [-1, 1].
"""


import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import utils  # plain plumbing: checked checkpoint loading

# The paper's configuration (every official VQGAN config: f16, K=1024, 256x256). It builds the
# same 72.1M-parameter autoencoder as the official code (discriminator and LPIPS not counted).
PAPER_CONFIG = dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                    resolution=256, z_channels=256, embed_dim=256, n_codes=1024)

# -----------------------------------------------------------------------------
# Building blocks (the official architecture, layer for layer)


def Normalize(channels):
    # GroupNorm(32, eps=1e-6) as in the paper's code. Small models here have channel counts like
    # 16 or 48 that 32 groups do not divide, so we take the largest group count <= 32 that does;
    # at the paper's widths (128, 256, 512) that is always 32, so the paper model is exact.
    groups = max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


def swish(x):
    # x * sigmoid(x), a.k.a. SiLU. The fused F.silu keeps one tensor for backward where the
    # written-out product keeps two (x and sigmoid(x)): a quarter less activation memory in
    # every ResnetBlock, and faster.
    return F.silu(x)


class ResnetBlock(nn.Module):
    # norm -> swish -> conv3x3, twice, plus a 1x1 shortcut when the width changes. (The official
    # block also has dropout; every official config sets it to 0, so it is left out.)
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    # Single-head self-attention over the h*w positions of a feature map, with 1x1 convs as the
    # query/key/value/output projections. It gives the decoder a global view at low resolution.
    def __init__(self, channels):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1 head, H*W positions, C)
        q, k, v = (t(h).reshape(B, 1, C, H * W).transpose(2, 3) for t in (self.q, self.k, self.v))
        # softmax(q k^T / sqrt(C)) v, computed by the fused kernel (no H*W x H*W matrix kept
        # around for backward on GPUs that have a memory-efficient kernel).
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(2, 3).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    # Stride-2 conv with the official asymmetric padding: pad one pixel on the right and bottom
    # only, then convolve without padding. (Symmetric padding would shift the grid by half a pixel
    # relative to the pretrained weights.)
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    # Nearest-neighbour x2 then a 3x3 conv: no checkerboard artefacts from transposed convs.
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def run_block(block, h, checkpointed):
    # Gradient checkpointing (--grad_checkpointing=true): keep only the block's input for backward
    # and recompute its insides there, trading one more forward of the block for its activations.
    return checkpoint(block, h, use_reentrant=False) if checkpointed and torch.is_grad_enabled() else block(h)


class Encoder(nn.Module):
    # E in the paper: x (B, 3, H, W) -> z_hat (B, z_channels, H/f, W/f), f = 2^(len(ch_mult)-1).
    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, in_channels=3):
        super().__init__()
        self.grad_checkpointing = False  # True: recompute each block in backward (saves memory)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in, res = ch, resolution
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(block_in, ch * mult))
                block_in = ch * mult
                if res in attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            if level != len(ch_mult) - 1:
                stage.downsample = Downsample(block_in)
                res //= 2
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, padding=1)

    def forward(self, x):
        ckpt = self.grad_checkpointing
        h = self.conv_in(x)
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = run_block(block, h, ckpt)
                if len(stage.attn) > 0:
                    h = run_block(stage.attn[i], h, ckpt)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        for block in (self.mid.block_1, self.mid.attn_1, self.mid.block_2):
            h = run_block(block, h, ckpt)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    # G in the paper: z_q (B, z_channels, h, w) -> x_hat (B, 3, h*f, w*f). The mirror of the
    # encoder with one extra ResnetBlock per level. No tanh at the end, as in the official code.
    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, out_channels=3):
        super().__init__()
        self.grad_checkpointing = False  # True: recompute each block in backward (saves memory)
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        stages = []
        for level in reversed(range(len(ch_mult))):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, ch * ch_mult[level]))
                block_in = ch * ch_mult[level]
                if res in attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            if level != 0:
                stage.upsample = Upsample(block_in)
                res *= 2
            stages.insert(0, stage)  # index by level, so the keys match the official `up.{level}`
        self.up = nn.ModuleList(stages)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z):
        ckpt = self.grad_checkpointing
        h = self.conv_in(z)
        for block in (self.mid.block_1, self.mid.attn_1, self.mid.block_2):
            h = run_block(block, h, ckpt)
        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                h = run_block(block, h, ckpt)
                if len(stage.attn) > 0:
                    h = run_block(stage.attn[i], h, ckpt)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


# -----------------------------------------------------------------------------
# Vector quantization: Eq. (2), the straight-through estimator, and the two terms of Eq. (4)


@torch.no_grad()  # argmin has no gradient: record no graph
def nearest_code(z, codebook):
    """Eq. (2): q(z_hat)_ij = argmin_k || z_hat_ij - z_k ||, for rows z (N, n_z), codebook (K, n_z).

    ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2, so all N x K distances come from one matmul; the
    naive (z[:, None] - e[None]).pow(2).sum(-1) would build an N x K x n_z tensor (gigabytes at
    the paper's sizes). ||z||^2 is the same for every k and could be dropped from the argmin;
    it is kept so that `d` is the true squared distance.
    """
    # addmm computes ||e||^2 - 2 z.e in one fused call into a single N x K buffer (the written-out
    # formula allocates three), and ||z||^2 is added in place: ~2x faster at K = 16384.
    d = torch.addmm(codebook.pow(2).sum(1), z, codebook.t(), alpha=-2.0)
    d += z.pow(2).sum(1, keepdim=True)
    return d.argmin(dim=1)


def straight_through(z_e, z_q):
    # argmin has no gradient. Forward: the value is z_q. Backward: d/dz_e of (z_e + const) = 1,
    # so the decoder's gradient at z_q is copied unchanged onto the encoder output z_e.
    return z_e + (z_q - z_e).detach()


def codebook_loss(z_e, z_q):
    # Eq. (4), second term: || sg[E(x)] - z_q ||^2. Only the codes move (toward the encoder
    # outputs that chose them). Mean over all elements, as the official code does.
    return F.mse_loss(z_q, z_e.detach())


def commitment_loss(z_e, z_q, beta):
    # Eq. (4), third term: beta * || sg[z_q] - E(x) ||^2. Only the encoder moves: it is asked to
    # commit to the code it picked instead of drifting away from the codebook.
    #
    # Errata. (1) One widely read summary of the paper prints this term as || sg[E(x)] - z_q ||^2, identical to the
    # codebook term: a typo. (2) The official VectorQuantizer2(legacy=True), which the official
    # VQModel always uses, puts beta on the *codebook* term instead:
    #     mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2)
    # (their README calls it a bug, issues #46 and #57). Here beta weights the commitment term,
    # as in VQ-VAE and the paper. With beta = 1 the two placements coincide.
    return beta * F.mse_loss(z_e, z_q.detach())


class VectorQuantizer(nn.Module):
    """The codebook: nearest-code lookup (Eq. 2), the straight-through gradient and the VQ loss (Eq. 4).

    n_codes K codes of code_dim numbers each. The paper (the default) looks the encoder output up
    as it is. Two later options (ViT-VQGAN, LlamaGen) change the space the lookup happens in:
      in_channels > 0: the input has in_channels channels; a 1x1 conv projects it down to code_dim
          before the lookup and another projects the chosen code back up after it.
      l2_codes: both the (projected) input and the codebook are l2-normalised before the lookup,
          so the nearest code is the one with the largest cosine similarity.
    Why these are used more evenly. With the paper's plain lookup, a code only moves when it wins
    (the codebook term of Eq. (4) pulls the winners toward their inputs), so a code that starts,
    or is left, outside the region the encoder outputs occupy never wins and never moves: it is
    dead for good. The encoder also changes the scale of its outputs freely, which can leave most
    of the codebook behind. On the unit sphere neither can happen: the scale is gone, every code is
    at distance <= 2 from every input, and the distance depends on the angle alone. A low dimension
    helps too: in 256 dimensions random directions are almost orthogonal, all distances crowd around
    the same value and the few codes that happen to align with the directions the encoder uses win
    everything; K codes on the sphere in 8 dimensions cover it densely, so most of them own a region
    of inputs. The projections learn which few directions of the encoder output are worth coding.
    The paper's state-dict keys (quantize.embedding.weight only) are unchanged when the options are off.
    """

    def __init__(self, n_codes, code_dim, beta=0.25, in_channels=0, l2_codes=False):
        super().__init__()
        self.n_codes, self.beta, self.l2_codes = n_codes, beta, l2_codes
        self.embedding = nn.Embedding(n_codes, code_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_codes, 1.0 / n_codes)  # official init
        if in_channels > 0:  # only then: the paper's checkpoints must load with exactly their keys
            self.proj_in = nn.Conv2d(in_channels, code_dim, 1)
            self.proj_out = nn.Conv2d(code_dim, in_channels, 1)
        self.recent = None  # the last training batch in lookup space, for restart_dead_codes

    def to_lookup_space(self, z_e):
        """Encoder output (B, C, h, w) -> rows (B*h*w, code_dim) in fp32, as the lookup sees them."""
        z = self.proj_in(z_e) if hasattr(self, "proj_in") else z_e
        # Distances and losses in fp32 even under autocast: in bf16 two codes a little apart
        # round to the same distance and the argmin picks arbitrarily between them.
        z = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        return F.normalize(z, dim=1) if self.l2_codes else z

    def codebook(self):
        """The codes (K, code_dim) in fp32, normalised like the inputs when l2_codes is on."""
        codes = self.embedding.weight.float()
        return F.normalize(codes, dim=1) if self.l2_codes else codes

    def from_lookup_space(self, z_q):
        # (B, code_dim, h, w) -> (B, C, h, w): back to the channels the decoder expects
        return self.proj_out(z_q) if hasattr(self, "proj_out") else z_q

    def forward(self, z_e):
        """z_e (B, C, h, w) -> z_q with straight-through gradient, indices (B, h, w), VQ loss."""
        B, _, h, w = z_e.shape
        z = self.to_lookup_space(z_e)  # fp32 rows (the projection, if any, runs under autocast)
        # Casting the inputs to fp32 is not enough: autocast would still run the distance matmul
        # in bf16, so it is switched off for the lookup and Eq. (4).
        with torch.autocast(z_e.device.type, enabled=False):
            codebook = self.codebook()
            # On unit vectors ||z - e||^2 = 2 - 2 cos(z, e): the nearest code is the most similar one.
            indices = nearest_code(z, codebook)
            z_q = codebook[indices]
            # Eq. (4) acts in the lookup space (for l2 codes: between unit vectors)
            loss = codebook_loss(z, z_q) + commitment_loss(z, z_q, self.beta)
        if self.training:
            self.recent = z.detach()
        z_q = straight_through(z, z_q).view(B, h, w, -1).permute(0, 3, 1, 2)
        return self.from_lookup_space(z_q), indices.view(B, h, w), loss

    def lookup(self, indices):
        # indices (B, h, w) -> z_q (B, C, h, w): decoding a GPT's token grid.
        return self.from_lookup_space(self.codebook()[indices].permute(0, 3, 1, 2))


# -----------------------------------------------------------------------------
# Codebook health: k-means initialisation and dead-code restarts (options, not in the paper)


def kmeans(x, k, iters=10, generator=None):
    """Rows x (N, D) -> k centroids (k, D): k-means++ seeding, then `iters` Lloyd iterations, fp32.

    k-means++ picks each new seed with probability proportional to its squared distance to the
    nearest seed so far, so well-separated clusters almost surely each get one. A centroid whose
    cluster empties keeps its old position (it is still a point of, or a mean of, the data).
    """
    x = x.float()
    if len(x) < k:
        raise ValueError(f"kmeans: {len(x)} points are too few for {k} centroids (give at least k points)")
    centroids = x[torch.randint(len(x), (1,), generator=generator, device=x.device)]
    d2 = (x - centroids[0]).pow(2).sum(1)
    for _ in range(1, k):
        weights = d2 if d2.sum() > 0 else torch.ones_like(d2)  # fewer distinct points than k: any will do
        new = x[torch.multinomial(weights, 1, generator=generator)]
        centroids = torch.cat([centroids, new])
        d2 = torch.minimum(d2, (x - new[0]).pow(2).sum(1))
    for _ in range(iters):
        assign = nearest_code(x, centroids)  # Eq. (2) is exactly k-means' assignment step
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
    return centroids


def distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@torch.no_grad()
def init_codebook_with_kmeans(quantizer, z_e, generator=None):
    """Set the codebook to k-means centroids of encoder outputs z_e (B, C, h, w), in lookup space.

    A randomly initialised codebook sits wherever the init put it, mostly away from the encoder's
    outputs; centroids of real outputs start every code where inputs are. With l2_codes the points
    are unit vectors and the lookup normalises the centroids again (spherical k-means, nearly)."""
    quantizer.embedding.weight.copy_(kmeans(quantizer.to_lookup_space(z_e), quantizer.n_codes, generator=generator))


@torch.no_grad()
def restart_dead_codes(quantizer, indices, code_age, max_age, optimizer=None):
    """Reset every code unused for the last `max_age` steps to a random recent encoder output.

    indices: the codes this step chose; code_age (K,) long, on the indices' device: steps since
    each code was last chosen, updated in place (keep it across steps; it is checkpointed).
    Returns how many codes were restarted. A restarted code sits exactly on an input the encoder
    produces now, so it wins at least that input next time and starts to be trained again.

    DDP: every rank must take the same decision, or the ranks' codebooks drift apart (DDP only
    averages gradients; it never re-syncs parameters). So the usage counts are summed over all ranks
    (a code used anywhere is alive) and the replacement vectors are rank 0's, broadcast to all.

    Adam: a dead code had zero gradient for max_age steps, so its moments have decayed by
    beta1^max_age and beta2^max_age: with this project's betas (0.5, 0.9) they are already ~0.
    With betas close to 1 (0.9, 0.999) the old second moment would survive and shrink the new
    code's first steps, so when given the optimizer we zero the restarted rows' Adam state:
    each restarted code starts like a fresh parameter.
    """
    counts = torch.bincount(indices.flatten(), minlength=quantizer.n_codes)
    if distributed():
        torch.distributed.all_reduce(counts)
    code_age += 1
    code_age[counts > 0] = 0
    dead = (code_age >= max_age).nonzero().flatten()
    if len(dead) == 0:
        return 0
    recent = quantizer.recent
    new = recent[torch.randint(len(recent), (len(dead),), device=recent.device)]
    if distributed():
        torch.distributed.broadcast(new, src=0)
    weight = quantizer.embedding.weight
    weight[dead] = new.to(weight.dtype)
    state = optimizer.state.get(weight, {}) if optimizer is not None else {}
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][dead] = 0
    code_age[dead] = 0
    return len(dead)


def codebook_usage(indices, n_codes):
    """Fraction of the K codes used in `indices`, and the perplexity exp(H(p)) of their histogram.

    Perplexity is the number of equally-used codes that would give the same entropy: K when
    every code is used equally, 1 when everything collapses onto one code.
    """
    return usage_from_counts(torch.bincount(indices.flatten(), minlength=n_codes))


def usage_from_counts(counts):
    """codebook_usage from the K code counts: (fraction of codes used, perplexity)."""
    counts = counts.double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return (counts > 0).double().mean().item(), entropy.exp().item()


# -----------------------------------------------------------------------------
# The VQGAN autoencoder


class VQGAN(nn.Module):
    # No defaults for the architecture: train_vqgan.py's CONFIG (or an official checkpoint's shapes)
    # is the one place they are chosen. beta, the channels and the codebook options default to the paper.
    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, embed_dim, n_codes,
                 beta=0.25, in_channels=3, out_channels=3, code_dim=0, l2_codes=False):
        super().__init__()
        # Plain values only: this dict goes into checkpoints, which hold no Python objects.
        self.config = dict(ch=ch, ch_mult=list(ch_mult), num_res_blocks=num_res_blocks,
                           attn_resolutions=list(attn_resolutions), resolution=resolution,
                           z_channels=z_channels, embed_dim=embed_dim, n_codes=n_codes, beta=beta,
                           in_channels=in_channels, out_channels=out_channels, code_dim=code_dim,
                           l2_codes=l2_codes)
        self.n_codes = n_codes
        self.downsample_factor = 2 ** (len(ch_mult) - 1)  # f in the paper
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, in_channels)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        # code_dim 0: the paper's lookup in the embed_dim space. code_dim D > 0: project embed_dim -> D
        # for the lookup and back (see VectorQuantizer). l2_codes: cosine-similarity lookup.
        if code_dim < 0:
            raise ValueError(f"VQGAN: code_dim must be 0 (off) or positive, got {code_dim}")
        self.quantize = VectorQuantizer(n_codes, code_dim or embed_dim, beta, in_channels=embed_dim if code_dim else 0,
                                        l2_codes=l2_codes)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, out_channels)

    def encode(self, x):
        """x (B, 3, H, W) -> z_q (B, embed_dim, H/f, W/f), indices (B, H/f, W/f), VQ loss (Eq. 4)."""
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, z_q):
        # Eq. (3): x_hat = G(z_q)
        return self.decoder(self.post_quant_conv(z_q))

    def decode_indices(self, indices):
        """A grid of code indices (B, h, w), e.g. written by the GPT, -> image (B, 3, h*f, w*f)."""
        return self.decode(self.quantize.lookup(indices))

    def forward(self, x):
        z_q, indices, q_loss = self.encode(x)
        return self.decode(z_q), indices, q_loss

    @property
    def last_layer(self):
        # G_L of Eq. (7): the adaptive weight compares gradients at this tensor.
        return self.decoder.conv_out.weight


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


# -----------------------------------------------------------------------------
# The patch discriminator and the adversarial part of the objective


class Discriminator(nn.Module):
    """PatchGAN (pix2pix's NLayerDiscriminator): one real/fake logit per overlapping patch.

    A 32x32 input gives a 2x2 grid of logits, a 256x256 one a 30x30 grid; each logit sees a
    70x70 receptive field, so D judges local texture and leaves global layout to L_rec.
    Layer indices inside `main` match the official keys (main.0, main.2, main.3, ...).
    """

    def __init__(self, in_channels=3, ndf=64, n_layers=3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1  # the last block keeps the resolution
            # No conv bias before BatchNorm: BN's own shift makes it redundant.
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.config = dict(in_channels=in_channels, ndf=ndf, n_layers=n_layers)
        for m in self.modules():  # the official (DCGAN) init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)


def hinge_d_loss(logits_real, logits_fake):
    # Eq. (5) in its hinge form, the discriminator's side. The paper writes the GAN loss as
    # log D(x) + log(1 - D(x_hat)); the official code (and we) use the hinge version
    #     L_D = 0.5 * ( mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))) )
    # because it saturates: logits already beyond the margin (D confident and right) give zero
    # loss and zero gradient, so D stops pushing and is less likely to overpower G.
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake):
    # Eq. (5), the generator's side: L_GAN(G) = -mean(D(x_hat)), make D score fakes as real.
    return -logits_fake.mean()


def pixel_loss(x, x_hat, kind):
    """The pixel term of L_rec, per pixel; the caller adds LPIPS per image and takes the mean.

    'l2': (x - x_hat)^2, Eq. (4)'s L_rec as the paper writes it, ||x - x_hat||^2. Its mean is the
    MSE that PSNR measures. Where the decoder cannot tell which side of an edge a pixel falls on,
    L2 makes it predict the mean of the two colours, whose expected squared error is half that of
    picking one of them.
    'l1': |x - x_hat|, the official code's choice (next to LPIPS, which the paper puts in place
    of L2): it predicts the median, one colour or the other, so edges are sharper and PSNR lower.
    """
    if kind == "l2":
        return (x - x_hat).pow(2)
    return (x - x_hat).abs()


def semantic_rec_loss(logits, one_hot):
    """L_rec of a condition VQGAN for semantic maps: per-pixel cross-entropy between the decoder's
    class logits (B, C, H, W) and the one-hot input map (B, C, H, W), mean over pixels. It
    replaces L1 + LPIPS + GAN: a map has classes, not colours. (The official segmentation VQGAN
    uses binary cross-entropy on each one-hot channel; softmax cross-entropy says that the
    classes exclude each other, and decoding takes their argmax either way.)"""
    return F.cross_entropy(logits, one_hot.argmax(1))


def adaptive_weight(rec_grad, gan_grad, delta=1e-6, max_weight=1e4):
    """Eq. (7): lambda = || grad_{G_L} L_rec || / ( || grad_{G_L} L_GAN || + delta ).

    rec_grad, gan_grad: the gradients of L_rec and L_GAN with respect to the decoder's last layer
    G_L (see last_layer_grads). The GAN gradient is rescaled to the size of the reconstruction
    gradient there, so neither term drowns the other whatever their raw scales. The paper uses
    delta = 1e-6 (the official code 1e-4). Clamped to [0, 1e4] and detached, as officially:
    lambda is a weight, not something to optimise. The caller multiplies by disc_weight.
    """
    weight = rec_grad.norm() / (gan_grad.norm() + delta)
    return weight.clamp(0.0, max_weight).detach()


def last_layer_grads(rec_loss, g_loss, last_layer):
    """The two gradients Eq. (7) compares, at G_L. retain_graph: the full backward still follows."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return rec_grad, gan_grad


def vqgan_from_checkpoint(ckpt, path="the checkpoint"):
    """A VQGAN built and filled from one of train_vqgan.py's checkpoint dicts (checked: a config
    that builds nothing or weights that do not fit it are one line naming `path`)."""
    return utils.build_from_checkpoint(VQGAN, ckpt, path)


def load_vqgan(path):
    """The VQGAN in the file at `path`: one of train_vqgan.py's checkpoints or an official
    taming-transformers one (a VQModel last.ckpt, loaded safely). Bad files are one line."""
    return vqgan_from_loaded(utils.load_checkpoint_file(path), path)


def vqgan_from_loaded(ckpt, path):
    """load_vqgan on an already loaded file (sample.py also reads its training size)."""
    if isinstance(ckpt, dict) and "kind" in ckpt:  # ours: written by train_vqgan.py
        return vqgan_from_checkpoint(utils.check_kind(ckpt, path, "vqgan"), path)
    try:
        return load_official_vqgan(utils.official_state_dict(ckpt, path))[0]
    except ValueError as e:
        raise SystemExit(f"error: {path}: {e}") from None


# -----------------------------------------------------------------------------
# The paper's pretrained checkpoints (CompVis/taming-transformers VQModel)


def _shape(sd, key):
    if key not in sd:
        raise ValueError(f"not an official VQGAN state dict: no tensor {key!r}")
    return tuple(sd[key].shape)


def _count(sd, prefix):
    # number of consecutive children prefix.0, prefix.1, ... present in the state dict
    n = 0
    while any(k.startswith(f"{prefix}.{n}.") for k in sd):
        n += 1
    return n


def vqgan_config_from_state_dict(sd):
    """The VQGAN constructor arguments of an official (or our own) state dict, from tensor
    shapes alone: no yaml needed. Works on `meta` tensors."""
    ch = _shape(sd, "encoder.conv_in.weight")[0]
    n_levels = _count(sd, "encoder.down")
    if n_levels == 0:
        raise ValueError("not an official VQGAN state dict: no encoder.down.0.* tensors")
    ch_mult = tuple(_shape(sd, f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in range(n_levels))
    # Attention resolutions only mean something relative to the input resolution, and the shapes
    # only say which levels have attention. Every official config is 256x256, so we pick 256
    # (or 2^(levels-1) if that is larger); any resolution with the same attention levels builds
    # the identical network (resolution appears nowhere else), so the choice changes nothing.
    resolution = max(256, 2 ** (n_levels - 1))
    attn_resolutions = tuple(resolution // 2 ** i for i in range(n_levels)
                             if f"encoder.down.{i}.attn.0.q.weight" in sd)
    n_codes, embed_dim = _shape(sd, "quantize.embedding.weight")
    return dict(ch=ch, ch_mult=ch_mult, num_res_blocks=_count(sd, "encoder.down.0.block"),
                attn_resolutions=attn_resolutions, resolution=resolution,
                z_channels=_shape(sd, "quant_conv.weight")[1], embed_dim=embed_dim, n_codes=n_codes,
                in_channels=_shape(sd, "encoder.conv_in.weight")[1],
                out_channels=_shape(sd, "decoder.conv_out.weight")[0])


def discriminator_config_from_state_dict(sd):
    """Discriminator arguments from its state dict (keys main.*): one BatchNorm per layer."""
    in_channels, ndf = _shape(sd, "main.0.weight")[1], _shape(sd, "main.0.weight")[0]
    n_layers = sum(k.startswith("main.") and k.endswith(".running_mean") for k in sd)
    return dict(in_channels=in_channels, ndf=ndf, n_layers=n_layers)


def load_strict(model, sd, what):
    """load_state_dict(strict) with a one-line ValueError naming what does not match."""
    problems = utils.state_dict_problems(model.state_dict(), sd)
    if problems:
        raise ValueError(f"{what} does not match the official layout ({problems})")
    # assign=True on a meta-built model: the checkpoint's tensors become the parameters, so a
    # paper-size model is never randomly initialised (seconds and a copy of its memory saved)
    model.load_state_dict(sd, strict=True, assign=True)
    return model


def load_official_vqgan(sd):
    """Official VQModel state dict (or the whole Lightning checkpoint dict) -> (VQGAN,
    Discriminator or None). Strict: every tensor used, every parameter filled, else ValueError.

    The official quantizer (VectorQuantizer2, legacy=True) put beta on the codebook term; the
    weights do not depend on that, and this VQGAN uses beta = 0.25 on the commitment term (see
    `commitment_loss`), which only matters if you continue training."""
    sd = sd.get("state_dict", sd)
    # loss.perceptual_loss.* is the frozen LPIPS (ours is lpips_lite); loss.discriminator.* is D
    model_sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}
    disc_sd = {k[len("loss.discriminator."):]: v for k, v in sd.items() if k.startswith("loss.discriminator.")}
    with torch.device("meta"):
        model = VQGAN(**vqgan_config_from_state_dict(model_sd))
    load_strict(model, model_sd, "VQGAN state dict")
    if not disc_sd:
        return model, None
    with torch.device("meta"):
        disc = Discriminator(**discriminator_config_from_state_dict(disc_sd))
    return model, load_strict(disc, disc_sd, "discriminator state dict (loss.discriminator.*)")

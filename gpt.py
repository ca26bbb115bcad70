"""
Stage 2 of Taming Transformers: a GPT over VQGAN code indices (Sec. 3.2).

The VQGAN turns an image into an h x w grid of code indices s_ij in {0..K-1}. Read in raster
order they are a sequence, and this file models it autoregressively:

    Eq. (8):  p(s) = prod_i p(s_i | s_<i)
    Eq. (9):  L_Transformer = E_x[ -log p(s) ]            (mean cross-entropy, `gpt_loss`)
    Eq. (10): p(s | c) = prod_i p(s_i | s_<i, c)          (conditioning tokens come first)

Vocabulary: ids 0..K-1 are image codes, ids K..K+n_cond_tokens-1 are conditioning tokens: one
start-of-sequence token (id K) for an unconditional model, or one token per class (class c ->
id K + c). The official code instead reuses the image-code embeddings for them (start token =
code 0, class c = code c); separate ids keep "a code" and "a label" from sharing a vector. The
head only predicts the K image codes: a conditioning token is never a target.

The model is the official minGPT (pre-LN blocks, learned position embedding, no dropout since
the official configs use 0), with one fused qkv Linear and a preallocated key/value cache for
fast sampling. Sampling (temperature, top-k, top-p) and the sliding window for grids larger
than the model (Sec. 3.2, Fig. 3) are at the bottom.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import utils  # plain plumbing: checked checkpoint loading
from vqgan import load_strict  # the same strict, one-line-error load as the VQGAN's

# -----------------------------------------------------------------------------------------
# The transformer


class KVCache:
    """Keys and values of every layer for the positions seen so far, in buffers preallocated
    for the whole block: (n_layer, B, n_head, block_size, head_dim). A step writes its new
    positions at [length, length + T) and attends to [0, length + T). The official
    `sample_with_past` torch.cat's the whole cache every token instead (~40% of its time)."""

    def __init__(self, n_layer, batch_size, n_head, block_size, head_dim, device, dtype):
        shape = (n_layer, batch_size, n_head, block_size, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled, the same for every layer

    def reset(self):
        self.length = 0  # no need to zero the buffers: nothing past `length` is ever read


def causal_mask(T, start, device=None):
    """Bool (T, start + T): new query i (absolute position start + i) may attend key j iff
    j <= start + i, i.e. every cached position and the new ones up to and including itself."""
    return torch.ones(T, start + T, dtype=torch.bool, device=device).tril(diagonal=start)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        assert n_embd % n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = n_head
        # one matmul for query, key and value (official: separate `query`, `key`, `value`
        # Linears; a converter stacks their weights in that order: q, k, v)
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x, kv=None, start=0):
        B, T, C = x.shape
        # (B, T, 3C) -> three (B, n_head, T, head_dim)
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if kv is None:
            mask, is_causal = None, True  # plain causal attention over the T positions
        else:
            # write the new keys/values into the cache, then attend to everything so far
            k_buf, v_buf = kv
            k_buf[:, :, start:start + T] = k
            v_buf[:, :, start:start + T] = v
            k, v = k_buf[:, :, :start + T], v_buf[:, :, :start + T]
            # SDPA's is_causal aligns the mask top-left, which is only right when nothing is
            # cached yet; a single new token may see everything, so it needs no mask at all.
            mask = causal_mask(T, start, x.device) if (start > 0 and T > 1) else None
            is_causal = start == 0 and T > 1
        # softmax(Q K^T / sqrt(d)) V with the causal mask, written out:
        #   att = (q @ k.transpose(-2, -1)) / sqrt(head_dim)        # (B, nh, T, S)
        #   att = att.masked_fill(~causal_mask(T, start), -inf)     # no peeking ahead
        #   y = softmax(att, dim=-1) @ v                            # (B, nh, T, head_dim)
        # SDPA computes the same thing with a fused kernel and without the (T, S) matrix.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        y = y.transpose(1, 2).reshape(B, T, C)  # re-assemble the heads side by side
        return self.proj(y)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x, kv=None, start=0):
        x = x + self.attn(self.ln1(x), kv, start)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, n_codes, block_size, n_layer=4, n_head=4, n_embd=128, n_cond_tokens=1):
        super().__init__()
        self.config = dict(n_codes=n_codes, block_size=block_size, n_layer=n_layer,
                           n_head=n_head, n_embd=n_embd, n_cond_tokens=n_cond_tokens)
        self.n_codes, self.block_size, self.n_cond_tokens = n_codes, block_size, n_cond_tokens
        self.tok_emb = nn.Embedding(n_codes + n_cond_tokens, n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, block_size, n_embd))  # zeros, as official
        self.blocks = nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, n_codes, bias=False)  # predicts image codes only
        self.grad_checkpointing = False  # True: recompute each block in backward (saves memory)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        # official minGPT: N(0, 0.02) for Linear and Embedding weights, zero biases;
        # LayerNorm keeps its (1, 0) default and pos_emb stays zero
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def new_kv_cache(self, batch_size):
        n_layer, n_head, n_embd = (self.config[k] for k in ("n_layer", "n_head", "n_embd"))
        return KVCache(n_layer, batch_size, n_head, self.block_size, n_embd // n_head,
                       self.pos_emb.device, self.pos_emb.dtype)

    def forward(self, idx, kv_cache=None):
        """idx (B, T) token ids -> logits (B, T, n_codes); logits[:, t] predict token t + 1.
        With a kv_cache, idx holds the next T positions after the cached ones."""
        B, T = idx.shape
        start = 0 if kv_cache is None else kv_cache.length
        if start + T > self.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.block_size}")
        # The id check costs two reductions and (on a GPU) a sync; it is skipped for the
        # single-token cached steps of sampling, whose ids come from our own sampler and are
        # image codes by construction. (nn.Embedding would still fail on CPU, less clearly.)
        if kv_cache is None or T > 1:
            vocab = self.n_codes + self.n_cond_tokens
            if T > 0 and (int(idx.min()) < 0 or int(idx.max()) >= vocab):
                raise ValueError(f"token ids must be in [0, {vocab}), got [{int(idx.min())}, {int(idx.max())}]")
        x = self.tok_emb(idx) + self.pos_emb[:, start:start + T]
        for i, block in enumerate(self.blocks):
            kv = None if kv_cache is None else (kv_cache.k[i], kv_cache.v[i])
            if self.grad_checkpointing and kv is None and torch.is_grad_enabled():
                # keep only the block's input for backward, recompute the rest there
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, kv, start)
        if kv_cache is not None:
            kv_cache.length += T
        return self.head(self.ln_f(x))

    def configure_optimizer(self, lr, weight_decay=0.01, betas=(0.9, 0.95)):
        """AdamW, weight decay on Linear weight matrices only. The official minGPT /
        Net2NetTransformer does the same: it decays nn.Linear weights and exempts biases,
        LayerNorm and Embedding weights and pos_emb (decaying those only pulls offsets, gains
        and lookup rows toward zero, which is not a useful prior)."""
        decay = [m.weight for m in self.modules() if isinstance(m, nn.Linear)]
        decay_ids = {id(p) for p in decay}
        no_decay = [p for p in self.parameters() if id(p) not in decay_ids]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        # fused: one kernel for all parameters instead of a Python loop over them (MPS keeps the loop)
        fused = self.head.weight.device.type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)

    @torch.no_grad()
    def generate(self, idx, n_new, temperature=1.0, top_k=None, top_p=None, greedy=False,
                 generator=None, use_cache=True):
        """Sample n_new image tokens after the prefix idx (B, T0): conditioning tokens, plus
        any known image tokens for completion. Returns (B, n_new).
        use_cache=True: one forward of the prefix, then one single-token forward per step
        (O(n) tokens through the model). use_cache=False recomputes the whole sequence for
        every token (O(n^2), the official `sample`); kept as the reference."""
        if idx.size(1) < 1 or idx.size(1) + n_new - 1 > self.block_size:
            raise ValueError(f"prefix of {idx.size(1)} + {n_new} new tokens does not fit block_size {self.block_size}")
        B, T0 = idx.shape
        seq = torch.cat([idx, idx.new_zeros(B, n_new)], dim=1)  # filled in as we go
        cache = self.new_kv_cache(B) if use_cache else None
        logits = self(idx, cache)[:, -1]
        for t in range(T0, T0 + n_new):
            seq[:, t] = sample_logits(logits, temperature, top_k, top_p, greedy, generator)
            if t + 1 < T0 + n_new:  # the last token is never fed back
                logits = (self(seq[:, t:t + 1], cache) if use_cache else self(seq[:, :t + 1]))[:, -1]
        return seq[:, T0:]


# -----------------------------------------------------------------------------------------
# Training: the sequence layout, the loss and pkeep


def cond_tokens(model, labels, batch_size, device):
    """(B, 1) conditioning ids: K (start token) when labels is None, else K + label."""
    # Eq. (10): p(s | c) = prod_i p(s_i | s_<i, c): c is simply the first token of the
    # sequence, so every image token attends to it. Unconditional = a fixed start token.
    K = model.n_codes
    if labels is None:
        if model.n_cond_tokens > 1:
            raise ValueError(f"class-conditional model ({model.n_cond_tokens} classes) needs labels")
        return torch.full((batch_size, 1), K, dtype=torch.long, device=device)
    labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
    if labels.numel() == 1:
        labels = labels.expand(batch_size)
    if labels.numel() != batch_size:
        raise ValueError(f"got {labels.numel()} labels for batch size {batch_size}")
    if int(labels.min()) < 0 or int(labels.max()) >= model.n_cond_tokens:
        raise ValueError(f"class label out of range [0, {model.n_cond_tokens}): got {labels.tolist()}")
    return (K + labels)[:, None]


def spatial_cond_tokens(model, cond_indices):
    """Eq. (10) with a spatial condition (Sec. 3.2): the index grid r (B, hc, wc) of the
    condition's own VQGAN -> its token ids K + r, same shape. Flattened in raster order and put
    before the image tokens they give the sequence [r, s], whose loss is taken on s only. r's codes
    are conditioning tokens with embeddings of their own (model.n_cond_tokens = the condition
    VQGAN's codebook size), so "condition code 5" and "image code 5" never share a vector."""
    if cond_indices.numel() and (int(cond_indices.min()) < 0 or int(cond_indices.max()) >= model.n_cond_tokens):
        raise ValueError(f"condition codes must be in [0, {model.n_cond_tokens}) (the condition VQGAN's codebook), "
                         f"got [{int(cond_indices.min())}, {int(cond_indices.max())}]")
    return model.n_codes + cond_indices


def gpt_loss(logits, seq, n_cond):
    """seq = [cond tokens (n_cond), image tokens (h*w)], logits = model(seq[:, :-1]).
    logits[:, t] predicts seq[:, t + 1]; the first image token is predicted at position
    n_cond - 1 (the last conditioning position). Conditioning tokens are never targets.
    With pkeep, feed the corrupted sequence to the model but pass the true one here."""
    # Eq. (8): p(s) = prod_i p(s_i | s_<i)   (with a condition, Eq. (10): p(s_i | s_<i, c)),
    #          so -log p(s) = sum_i -log p(s_i | s_<i) = sum of per-token cross-entropies.
    # Eq. (9): L_Transformer = E_x[-log p(s)], taken as the mean over image tokens and batch
    #          (the mean, not the sum, so the loss scale does not depend on h*w).
    if logits.size(1) != seq.size(1) - 1:
        raise ValueError(f"logits cover {logits.size(1)} positions, expected len(seq) - 1 = {seq.size(1) - 1}")
    pred = logits[:, n_cond - 1:]
    return F.cross_entropy(pred.reshape(-1, pred.size(-1)), seq[:, n_cond:].reshape(-1))


def corrupt_tokens(image_tokens, pkeep, n_codes, generator=None):
    """Official pkeep: each image token is replaced by a uniformly random code with probability
    1 - pkeep (the random code may happen to equal the original). Use the result as *input*
    only; the targets stay the true tokens, so the model learns to cope with its own mistakes."""
    if not 0.0 <= pkeep <= 1.0:
        raise ValueError(f"pkeep must be in [0, 1], got {pkeep}")
    dev = image_tokens.device
    replace = torch.rand(image_tokens.shape, generator=generator, device=dev) < 1.0 - pkeep
    random_codes = torch.randint(0, n_codes, image_tokens.shape, generator=generator, device=dev)
    return torch.where(replace, random_codes, image_tokens)


# -----------------------------------------------------------------------------------------
# Sampling


def top_k_filter(logits, k):
    """Keep the k largest logits per row, set the rest to -inf. Tokens tied with the k-th
    largest are all kept (so a tie can keep more than k): the result never depends on how
    topk orders equal values."""
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    kth = torch.topk(logits, min(k, logits.size(-1)), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits, p):
    """Nucleus filter: keep the smallest set of most likely tokens whose probability mass
    reaches p, set the rest to -inf. Exact rule: a token is kept iff the total probability of
    the tokens *strictly more likely* than it is < p. So the most likely token is always kept;
    a set whose mass equals p exactly is complete (the next token is dropped); tokens tied with
    the last kept one are kept too (again independent of tie order).
    Instead of sorting the whole vocabulary we look at the top 64 and double until they hold
    mass >= p (usually one small topk; at worst a full sort, which is still cheap next to the
    forward pass)."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    probs = F.softmax(logits, dim=-1)
    V, k = probs.size(-1), min(64, probs.size(-1))
    while True:
        top = torch.topk(probs, k, dim=-1).values  # sorted, descending
        if k == V or bool((top.sum(-1) >= p).all()):
            break
        k = min(2 * k, V)
    mass_before = top.cumsum(-1) - top  # mass of the tokens ranked above each one
    n_keep = (mass_before < p).sum(-1, keepdim=True)  # >= 1: mass_before[0] = 0 < p
    threshold = top.gather(-1, n_keep - 1)  # probability of the last kept token
    return logits.masked_fill(probs < threshold, float("-inf"))


def sample_logits(logits, temperature=1.0, top_k=None, top_p=None, greedy=False, generator=None):
    """logits (B, V) -> (B,) token ids. Greedy: argmax (temperature and filters cannot change
    it). Otherwise: divide by the temperature (<1 sharpens, >1 flattens), apply top-k then
    top-p, and draw from the softmax with `generator`."""
    if greedy:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature} (use greedy=True for argmax)")
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# -----------------------------------------------------------------------------------------
# High resolution: the sliding window (Sec. 3.2, Fig. 3)


def window_start(i, size, window):
    """First row (or column) of the window used to sample position i along an axis of `size`.
    The window rule (Sec. 3.2 / Fig. 3, official make_samples.py): i sits at local index
        local = i                          if i <= window // 2           (near the start edge)
                window - (size - i)        if size - i < window // 2     (near the end edge)
                window // 2                otherwise                     (centred)
    and start = i - local. If the grid is no larger than the window, the window is the grid."""
    if size <= window:
        return 0
    half = window // 2
    if i <= half:
        local = i
    elif size - i < half:
        local = window - (size - i)
    else:
        local = half
    # for even windows (the official 16) i - local never exceeds size - window; for odd ones the
    # rule above overshoots by one at size - i == half, so clamp the window inside the grid
    return min(i - local, size - window)


@torch.no_grad()
def sample_sliding_window(model, cond, h, w, window_h, window_w, temperature=1.0, top_k=None,
                          top_p=None, generator=None, progress=False, on_token=None):
    """Sample an h x w token grid with a model trained on window_h x window_w grids.
    on_token(grid, i, j, (r0, c0, window_h, window_w)), if given, is called after each token with
    the grid so far and the window it was sampled in (sample.py --animate draws frames with it).
    cond: (B, n_cond) conditioning ids seen before every window (start token or class), or
    (B, hc, wc) a spatial condition's ids on its own grid (`spatial_cond_tokens`): then each
    window sees the part of the condition under it, [r window, s window], the condition window
    moving with the image window. Returns (B, h, w).

    For each (i, j) in raster order the model sees [cond, window tokens in raster order] and
    the logits at position n_cond - 1 + local_i * window_w + local_j predict (i, j).
    Cost: the naive version runs one full window forward per token, (n_cond + hw - 1)
    positions each (~256 for a 16x16 window). Causality means only the prefix up to the
    needed position matters, so we feed just that (~half a window on average for a centred
    window), and while the window stays put between consecutive positions (always when the
    grid equals the window, and along the left/right edge columns otherwise) we keep a KV
    cache and feed a single token, exactly like `generate`. For a grid equal to the window this
    *is* `generate`: n_cond + h*w - 1 positions in total, and the same tokens for the same seed."""
    B = cond.size(0)
    window_h, window_w = min(window_h, h), min(window_w, w)  # a window cannot exceed the grid
    # A spatial condition's grid can be coarser than the image grid by an integer `ratio` (a
    # low-resolution image); the windows then move in steps of `ratio` image tokens, so the window
    # always covers whole condition tokens: the rule below is window_start on the condition grid.
    # Without a spatial condition, ratio = 1 and this is the plain rule.
    ratio = max(1, h // cond.size(1)) if cond.dim() == 3 else 1
    if cond.dim() == 3 and (cond.shape[1:] != (h // ratio, w // ratio) or h % ratio or w % ratio
                            or window_h % ratio or window_w % ratio):
        raise ValueError(f"a {tuple(cond.shape[1:])} condition grid does not tile the {h}x{w} image grid and its "
                         f"{window_h}x{window_w} window by one integer factor")
    n_cond = (window_h // ratio) * (window_w // ratio) if cond.dim() == 3 else cond.size(1)
    if n_cond + window_h * window_w - 1 > model.block_size:
        raise ValueError(f"{n_cond} cond + {window_h}x{window_w} window tokens exceed block_size {model.block_size}")
    grid = torch.zeros(B, h, w, dtype=torch.long, device=cond.device)
    cache = model.new_kv_cache(B)
    prev, tok = None, None  # (window row, window col, local index) and token of the previous position
    with tqdm(total=h * w, disable=not progress, unit="tok") as bar:
        for i in range(h):
            r0 = ratio * window_start(i // ratio, h // ratio, window_h // ratio)
            for j in range(w):
                c0 = ratio * window_start(j // ratio, w // ratio, window_w // ratio)
                n = (i - r0) * window_w + (j - c0)  # local raster index of (i, j)
                if prev == (r0, c0, n - 1):
                    # same window, next position: only the token sampled last is new
                    logits = model(tok[:, None], cache)
                else:
                    window = grid[:, r0:r0 + window_h, c0:c0 + window_w].reshape(B, -1)
                    prefix = cond if cond.dim() == 2 else cond[:, r0 // ratio:(r0 + window_h) // ratio,
                                                                c0 // ratio:(c0 + window_w) // ratio].reshape(B, -1)
                    cache.reset()
                    logits = model(torch.cat([prefix, window[:, :n]], dim=1), cache)
                tok = sample_logits(logits[:, -1], temperature, top_k, top_p, False, generator)
                grid[:, i, j] = tok
                prev = (r0, c0, n)
                bar.update(1)
                if on_token is not None:
                    on_token(grid, i, j, (r0, c0, window_h, window_w))
    return grid


# -----------------------------------------------------------------------------------------
# The paper's pretrained transformers (CompVis/taming-transformers Net2NetTransformer)


def _official_transformer_keys(sd):
    # A Lightning checkpoint's transformer lives under `transformer.*`, beside the VQGAN
    # (`first_stage_model.*`) and the conditioning stage; a bare minGPT state dict has no prefix.
    sd = sd.get("state_dict", sd)
    if any(k.startswith("transformer.") for k in sd):
        return {k[len("transformer."):]: v for k, v in sd.items() if k.startswith("transformer.")}
    return dict(sd)


def _fuse_attention(sd):
    """Official separate query/key/value Linears -> our fused qkv (stacked q, k, v, the order
    CausalSelfAttention splits them in); the official attn.mask buffers (a fixed causal mask)
    are dropped: SDPA builds the mask itself."""
    out = {}
    for k, v in sd.items():
        if ".attn.query." in k:
            parts = [sd.get(k.replace(".query.", f".{name}.")) for name in ("query", "key", "value")]
            if any(p is None for p in parts):
                raise ValueError(f"official GPT state dict has {k} but not its key/value partners")
            out[k.replace(".query.", ".qkv.")] = torch.cat(parts)
        elif not any(s in k for s in (".attn.key.", ".attn.value.", ".attn.mask")):
            out[k] = v
    return out


def load_official_gpt(sd, cond="sos", n_classes=0, n_head=16):
    """Official transformer state dict (or Lightning checkpoint dict) -> GPT computing the same
    logits. n_layer, n_embd, the vocabulary and block_size come from the tensor shapes; n_head
    does not (it only splits n_embd, no tensor shows it): give the config's value (16, the
    paper's, in every official transformer config).

    The official code feeds the start token as code 0 (cond="sos") or class c as code c
    (cond="class") through the image-code embedding table; our conditioning tokens have ids
    K.. of their own, so their rows are copies of those official rows. The same holds for a
    spatial condition (cond="spatial", e.g. the depth-to-image transformer): its condition
    VQGAN's indices r are fed as codes r of the one shared table, sequence [r, s]; give
    n_classes = that VQGAN's codebook size, and feed spatial_cond_tokens(r)."""
    if cond not in ("sos", "class", "spatial"):
        raise ValueError(f"cond must be 'sos', 'class' or 'spatial', got {cond!r}")
    sd = _official_transformer_keys(sd)
    for key in ("tok_emb.weight", "pos_emb"):
        if key not in sd:
            raise ValueError(f"not an official GPT state dict: no tensor {key!r}")
    vocab, n_embd = sd["tok_emb.weight"].shape
    n_cond = 1 if cond == "sos" else n_classes
    if cond != "sos" and not 1 <= n_classes <= vocab:
        raise ValueError(f"cond={cond!r} needs 1 <= n_classes <= {vocab} (the official labels are codes), got {n_classes}")
    sd = _fuse_attention(sd)
    sd["tok_emb.weight"] = torch.cat([sd["tok_emb.weight"], sd["tok_emb.weight"][:n_cond]])
    n_layer = 0
    while f"blocks.{n_layer}.ln1.weight" in sd:
        n_layer += 1
    if n_embd % n_head:
        raise ValueError(f"n_head={n_head} does not divide n_embd={n_embd} (give the config's n_head)")
    with torch.device("meta"):  # no random init of a paper-size model; the weights are assigned
        model = GPT(vocab, sd["pos_emb"].shape[1], n_layer, n_head, n_embd, n_cond_tokens=n_cond)
    return load_strict(model, sd, "GPT state dict")


def load_gpt(path, n_head=16, n_classes=0):
    """The GPT in the file at `path`: one of train_gpt.py's checkpoints or an official
    taming-transformers transformer (a Net2NetTransformer last.ckpt, loaded safely). For an
    official one, n_head and n_classes are what the weights do not show (see load_official_gpt);
    a depth-to-image file's condition codebook size is read from its cond_stage_model.*.
    Bad files are one line."""
    return gpt_from_loaded(utils.load_checkpoint_file(path), path, n_head, n_classes)


def gpt_from_loaded(ckpt, path, n_head=16, n_classes=0):
    """load_gpt on an already loaded file (sample.py also reads the rest of it)."""
    if isinstance(ckpt, dict) and "kind" in ckpt:  # ours: written by train_gpt.py
        return utils.build_from_checkpoint(GPT, utils.check_kind(ckpt, path, "gpt"), path)
    sd = utils.official_state_dict(ckpt, path)
    cond_codebook = sd.get("cond_stage_model.quantize.embedding.weight")
    try:
        if cond_codebook is not None:  # a spatial condition: its VQGAN's codes are the condition tokens
            return load_official_gpt(sd, cond="spatial", n_classes=cond_codebook.shape[0], n_head=n_head)
        return load_official_gpt(sd, cond="class" if n_classes else "sos", n_classes=n_classes, n_head=n_head)
    except ValueError as e:
        raise SystemExit(f"error: {path}: {e}") from None

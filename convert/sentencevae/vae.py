"""SentenceVAE sentence encoder and decoder (An et al. 2024, arXiv:2408.00655), built for a given LM.

    .venv/bin/python -m pytest tests/convert/sentencevae/test_vae_sllm.py -q

The encoder compresses one sentence's tokens into one vector in the LM's hidden size; the decoder
reconstructs the tokens from that vector (cross-attention to it) and ends with an end-of-sentence
token. Both share one token embedding, initialised from the LM's input embedding; the decoder's
LM head is tied to it. `convert/sentencevae/sllm.py` puts the LM's layers over these vectors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VAEConfig:
    """Sizes and special tokens of the encoder/decoder pair (saved with the export)."""

    vocab_size: int
    hidden_size: int
    pad_id: int
    bos_id: int
    """Decoder start token (also the LM's start-of-text token for perplexity)."""
    eos_id: int
    """End-of-sentence token emitted by the decoder."""
    max_sentence_tokens: int = 32
    encoder_layers: int = 1
    decoder_layers: int = 1
    heads: int = 4
    ffn_size: int = 512
    pooling: Literal["sum", "weighted"] = "weighted"
    dropout: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class SentenceEncoder(nn.Module):
    """Token embeddings + small Transformer encoder → masked pooling → LayerNorm → one vector."""

    def __init__(self, cfg: VAEConfig, embed: nn.Embedding) -> None:
        super().__init__()
        self.cfg, self.embed = cfg, embed
        self.pos = nn.Embedding(cfg.max_sentence_tokens, cfg.hidden_size)
        nn.init.normal_(self.pos.weight, std=0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.hidden_size, cfg.heads, cfg.ffn_size, cfg.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        # No nested-tensor fast path: it would make padded and unpadded batches take different kernels.
        self.layers = nn.TransformerEncoder(layer, cfg.encoder_layers, enable_nested_tensor=False)
        self.score = nn.Linear(cfg.hidden_size, 1) if cfg.pooling == "weighted" else None
        self.norm = nn.LayerNorm(cfg.hidden_size)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask: [N, L] (mask 1 for real tokens, every row non-empty) → [N, hidden]."""
        if ids.shape[1] > self.cfg.max_sentence_tokens:
            raise ValueError(f"sentence of {ids.shape[1]} tokens > max_sentence_tokens={self.cfg.max_sentence_tokens}")
        mask = mask.bool()
        x = self.embed(ids) + self.pos.weight[: ids.shape[1]]
        h = self.layers(x, src_key_padding_mask=~mask)
        if self.score is None:
            pooled = (h * mask.unsqueeze(-1)).sum(1)
        else:
            w = self.score(h).squeeze(-1).masked_fill(~mask, float("-inf")).softmax(-1)
            pooled = torch.einsum("nl,nlh->nh", w, h)
        return self.norm(pooled)


class KVCache:
    """Per-layer self-attention keys/values plus the cross-attention keys/values of the memory."""

    def __init__(self, n_layers: int) -> None:
        self.self_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers
        self.cross_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers

    @property
    def length(self) -> int:
        return 0 if self.self_kv[0] is None else self.self_kv[0][0].shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.self_kv + self.cross_kv if kv for t in kv)


class DecoderLayer(nn.Module):
    """Pre-norm block: causal self-attention (cacheable), cross-attention to the memory, MLP."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.heads, self.dropout = cfg.heads, cfg.dropout
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(h), nn.LayerNorm(h), nn.LayerNorm(h)
        self.qkv, self.self_out = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.q, self.kv, self.cross_out = nn.Linear(h, h), nn.Linear(h, 2 * h), nn.Linear(h, h)
        self.mlp = nn.Sequential(nn.Linear(h, cfg.ffn_size), nn.GELU(), nn.Linear(cfg.ffn_size, h))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        n, t, h = x.shape
        return x.view(n, t, self.heads, h // self.heads).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        n, _, t, d = x.shape
        return x.transpose(1, 2).reshape(n, t, self.heads * d)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, cache: KVCache | None, i: int) -> torch.Tensor:
        drop = self.dropout if self.training else 0.0
        q, k, v = (self._split(t) for t in self.qkv(self.ln1(x)).chunk(3, dim=-1))
        past = 0
        if cache is not None:
            if cache.self_kv[i] is not None:
                past = cache.self_kv[i][0].shape[2]
                k = torch.cat([cache.self_kv[i][0], k], dim=2)
                v = torch.cat([cache.self_kv[i][1], v], dim=2)
            cache.self_kv[i] = (k, v)
        t = q.shape[2]
        if past == 0:
            attn = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=t > 1)
        else:  # new queries sit at positions past..past+t-1 and see keys up to their own position
            allowed = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(past)
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=drop)
        x = x + self.self_out(self._merge(attn))

        if cache is not None and cache.cross_kv[i] is not None:
            mk, mv = cache.cross_kv[i]
        else:
            mk, mv = (self._split(t) for t in self.kv(memory).chunk(2, dim=-1))
            if cache is not None:
                cache.cross_kv[i] = (mk, mv)
        cross = F.scaled_dot_product_attention(self._split(self.q(self.ln2(x))), mk, mv, dropout_p=drop)
        x = x + self.cross_out(self._merge(cross))
        return x + self.mlp(self.ln3(x))


class SentenceDecoder(nn.Module):
    """Small causal Transformer decoder from a sentence vector to the sentence's tokens + EOS."""

    def __init__(self, cfg: VAEConfig, embed: nn.Embedding) -> None:
        super().__init__()
        self.cfg, self.embed = cfg, embed
        self.pos = nn.Embedding(cfg.max_sentence_tokens + 1, cfg.hidden_size)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size)
        # Learned log-temperature of the tied head: LM embeddings are small (std ~0.02 at init), so
        # unscaled logits LN(x)·e stay near 0 and a 30k-way softmax learns slowly. `init_logit_scale`
        # sets it so the initial logits have unit scale; training moves it from there.
        self.logit_scale = nn.Parameter(torch.zeros(()))

    @torch.no_grad()
    def init_logit_scale(self) -> None:
        weight = self.embed.weight
        if not weight.is_meta:
            rms = weight.float().pow(2).mean().sqrt().clamp_min(1e-6)
            self.logit_scale.fill_(float(-torch.log(rms * self.cfg.hidden_size**0.5)))

    def forward(self, ids: torch.Tensor, memory: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """ids [N, T] (starting with BOS when uncached), memory [N, H] or [N, M, H] → logits [N, T, V]."""
        if memory.dim() == 2:
            memory = memory.unsqueeze(1)
        start = cache.length if cache is not None else 0
        if start + ids.shape[1] > self.cfg.max_sentence_tokens + 1:
            raise ValueError(f"decoder positions {start + ids.shape[1]} > max_sentence_tokens + 1")
        x = self.embed(ids) + self.pos.weight[start : start + ids.shape[1]]
        for i, layer in enumerate(self.layers):
            x = layer(x, memory, cache, i)
        return (self.norm(x) @ self.embed.weight.T) * self.logit_scale.exp()  # head tied to the shared embedding

    def teacher_forced(self, sentences: torch.Tensor, lengths: torch.Tensor,
                       memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [N, L+1, V] for targets [N, L+1] = tokens then EOS then padding (-100)."""
        n, length = sentences.shape
        bos = torch.full((n, 1), self.cfg.bos_id, dtype=sentences.dtype, device=sentences.device)
        logits = self(torch.cat([bos, sentences], dim=1), memory)
        pos = torch.arange(length + 1, device=sentences.device)
        targets = torch.cat([sentences, torch.full_like(bos, -100)], dim=1)
        targets = torch.where(pos < lengths[:, None], targets, -100)
        targets = torch.where(pos == lengths[:, None], self.cfg.eos_id, targets)
        return logits, targets

    @torch.no_grad()
    def generate(
        self,
        memory: torch.Tensor,
        max_tokens: int | None = None,
        *,
        use_cache: bool = True,
        temperature: float = 0.0,
        min_tokens: int = 0,
        generator: torch.Generator | None = None,
        cache_bytes: list[int] | None = None,
    ) -> list[list[int]]:
        """Greedy (temperature 0) or sampled decoding of each vector's sentence, EOS excluded.

        `min_tokens` forbids EOS before that many tokens; `cache_bytes`, when given, receives the
        decoder cache size at its largest.
        """
        max_tokens = min(max_tokens or self.cfg.max_sentence_tokens, self.cfg.max_sentence_tokens)
        n = memory.shape[0]
        seq = torch.full((n, 1), self.cfg.bos_id, dtype=torch.long, device=memory.device)
        done = torch.zeros(n, dtype=torch.bool, device=memory.device)
        cache = KVCache(len(self.layers)) if use_cache else None
        for _ in range(max_tokens + 1):
            logits = self(seq[:, -1:] if use_cache else seq, memory, cache)[:, -1].float()
            if seq.shape[1] <= min_tokens:
                logits[:, self.cfg.eos_id] = float("-inf")
            if temperature > 0:
                nxt = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator).squeeze(1)
            else:
                nxt = logits.argmax(-1)
            if seq.shape[1] > max_tokens:  # the cap is reached: this step may only end the sentence
                nxt = torch.full_like(nxt, self.cfg.eos_id)
            nxt = torch.where(done, self.cfg.eos_id, nxt)
            done |= nxt == self.cfg.eos_id
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            if done.all():
                break
        if cache_bytes is not None and cache is not None:
            cache_bytes.append(cache.nbytes())
        out = []
        for row in seq[:, 1:].tolist():
            out.append(row[: row.index(self.cfg.eos_id)] if self.cfg.eos_id in row else row)
        return out


def build_embedding(lm_embedding: nn.Embedding, cfg: VAEConfig) -> nn.Embedding:
    """A trainable copy of the LM's input embedding (the LM keeps its own)."""
    embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=None)
    with torch.no_grad():
        embed.weight.copy_(lm_embedding.weight[: cfg.vocab_size])
    return embed


def focal_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, gamma: float) -> torch.Tensor:
    """Mean over non-ignored targets of (1 - p)^gamma · CE (gamma 0 is plain cross-entropy)."""
    flat, tgt = logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)
    ce = F.cross_entropy(flat, tgt, ignore_index=-100, reduction="none")
    keep = tgt != -100
    if gamma > 0:
        ce = (1 - torch.exp(-ce)).pow(gamma) * ce
    return ce[keep].sum() / keep.sum().clamp_min(1)

"""SentenceVAE's sentence-level LM (SLLM) and the whole converted model (encoder, decoder, SLLM).

    .venv/bin/python -m pytest tests/convert/sentencevae/test_vae_sllm.py -q

The SLLM is the pretrained LM's decoder stack run over sentence vectors through `inputs_embeds`,
so transformers builds the causal mask (and positions: rotary for Llama, learned for GPT-2) itself.
The reference implementation runs the layers with no mask, so position j sees the sentence it is
asked to predict; here output j only depends on the start vector and sentences 1..j.
Output j is the predicted vector of sentence j+1 plus a stop logit ("the passage ends here").
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, PreTrainedModel

from athanor.convert.sentencevae.vae import SentenceDecoder, SentenceEncoder, VAEConfig, build_embedding

CONFIG_NAME = "sentencevae_config.json"
WEIGHTS_NAME = "sentencevae.safetensors"
LM_DIR = "sllm"


class SentenceLM(nn.Module):
    """Causal LM layers over sentence vectors → next-sentence vectors and stop logits."""

    def __init__(self, base: PreTrainedModel, hidden_size: int, start: torch.Tensor, in_scale: float = 1.0) -> None:
        super().__init__()
        self.lm = base
        self.start = nn.Parameter(start.detach().clone().float())
        # Encoder vectors are LayerNorm-ed (unit scale); the LM expects its own embedding scale.
        self.inp = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        with torch.no_grad():
            self.inp.weight.copy_(torch.eye(hidden_size) * in_scale)
            self.out.weight.copy_(torch.eye(hidden_size))
            self.inp.bias.zero_()
            self.out.bias.zero_()
        self.out_norm = nn.LayerNorm(hidden_size)
        self.stop = nn.Linear(hidden_size, 1)

    def step(
        self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None, cache=None, use_cache: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, object]:
        """Run the LM on already-projected inputs [B, T, H] → (vectors [B,T,H], stop logits [B,T], cache)."""
        dtype = next(self.lm.parameters()).dtype
        out = self.lm(
            inputs_embeds=embeds.to(dtype),
            attention_mask=attention_mask,
            cache=cache,
            use_cache=use_cache,
        )
        h = out.last_hidden_state.float()
        return self.out_norm(self.out(h)), self.stop(h).squeeze(-1), out.cache

    def embed_inputs(self, vectors: torch.Tensor, with_start: bool) -> torch.Tensor:
        x = self.inp(vectors)
        if with_start:
            start = self.start.expand(x.shape[0], 1, -1).to(x.dtype)
            x = torch.cat([start, x], dim=1)
        return x

    def forward(self, vectors: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """vectors [B, S, H], mask [B, S] (right padding) → predictions and stop logits at S+1 positions.

        Output 0 (start vector only) predicts sentence 1; output j predicts sentence j+1.
        """
        b, s, _ = vectors.shape
        if mask is None:
            mask = torch.ones(b, s, dtype=torch.long, device=vectors.device)
        full = torch.cat([torch.ones_like(mask[:, :1]), mask.long()], dim=1)
        pred, stop, _ = self.step(self.embed_inputs(vectors, True), attention_mask=full)
        return pred, stop


def base_of(lm: PreTrainedModel) -> PreTrainedModel:
    """The decoder stack of a causal LM (LlamaModel, GPT2Model, OPTModel, ...) without its LM head."""
    base = lm.base_model
    if base is lm:
        raise TypeError(f"{type(lm).__name__} has no separate base model to run over sentence vectors")
    return base


class SentenceVAEModel(nn.Module):
    """The converted model: shared embedding, sentence encoder, sentence decoder and SLLM."""

    def __init__(self, cfg: VAEConfig, sllm: SentenceLM, embed: nn.Embedding | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = embed if embed is not None else nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.encoder = SentenceEncoder(cfg, self.embed)
        self.decoder = SentenceDecoder(cfg, self.embed)
        self.sllm = sllm

    @classmethod
    def from_lm(cls, lm: PreTrainedModel, cfg: VAEConfig) -> SentenceVAEModel:
        """Build from a causal LM: embeddings copied, decoder stack deep-copied (the LM stays intact)."""
        lm_embed = lm.get_input_embeddings()
        embed = build_embedding(lm_embed, cfg)
        start_id = cfg.bos_id if cfg.bos_id < lm_embed.weight.shape[0] else 0
        weight = lm_embed.weight.detach()
        scale = 1.0 if weight.is_meta else float(weight.float().pow(2).mean().sqrt())
        sllm = SentenceLM(copy.deepcopy(base_of(lm)), cfg.hidden_size, lm_embed.weight[start_id], scale)
        model = cls(cfg, sllm, embed)
        model.decoder.init_logit_scale()
        return model

    def encode(self, sentences: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """sentences [N, L] right-padded, lengths [N] → vectors [N, H]."""
        mask = torch.arange(sentences.shape[1], device=sentences.device) < lengths[:, None]
        return self.encoder(sentences, mask)

    def encode_passages(self, sent: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """sent [B, S, L], lengths [B, S] (0 for padding sentences) → vectors [B, S, H] (zeros at padding)."""
        b, s, _ = sent.shape
        valid = lengths > 0
        vectors = torch.zeros(b, s, self.cfg.hidden_size, device=sent.device)
        if valid.any():
            vectors[valid] = self.encode(sent[valid], lengths[valid]).to(vectors.dtype)
        return vectors

    def save_pretrained(self, out_dir: Path, tokenizer=None) -> Path:
        """Write config, encoder/decoder/heads weights, the LM stack (LoRA merged) and the tokenizer."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        lm = self.sllm.lm
        if hasattr(lm, "merge_and_unload"):  # peft: fold the adapters into the weights for export
            lm = copy.deepcopy(lm).merge_and_unload()
        lm.save_pretrained(out_dir / LM_DIR)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if not k.startswith("sllm.lm.")}
        for alias in ("encoder.embed.weight", "decoder.embed.weight"):  # the same tensor as embed.weight
            state.pop(alias, None)
        save_file(state, str(out_dir / WEIGHTS_NAME))
        (out_dir / CONFIG_NAME).write_text(json.dumps(self.cfg.to_dict(), indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)
        return out_dir

    @classmethod
    def from_pretrained(cls, path: str | Path) -> SentenceVAEModel:
        path = Path(path)
        cfg = VAEConfig(**json.loads((path / CONFIG_NAME).read_text()))
        base = AutoModel.from_pretrained(path / LM_DIR)
        sllm = SentenceLM(base, cfg.hidden_size, torch.zeros(cfg.hidden_size))
        model = cls(cfg, sllm)
        missing, unexpected = model.load_state_dict(load_file(str(path / WEIGHTS_NAME)), strict=False)
        aliases = ("encoder.embed.weight", "decoder.embed.weight")  # saved once, as embed.weight
        missing = [k for k in missing if not k.startswith("sllm.lm.") and k not in aliases]
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not match the config (missing {missing}, unexpected {unexpected})")
        return model.eval()

"""SentenceVAE training: batches of segmented passages, the two-stage LightningModule, LM pre-training.

    .venv/bin/python -m pytest tests/distill/sentencevae/test_sentencevae.py -q

Stage 1 (steps < stage1_steps) trains the shared embedding, encoder and decoder on reconstruction.
Stage 2 freezes them and trains the SLLM (or its LoRA adapters): output j must be a vector from
which the frozen decoder reproduces sentence j+1 (cross-entropy through the decoder), plus a
stop/continue logit and, optionally, a pull towards the encoder's own vector of sentence j+1.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F

from athanor.convert.sentencevae.sllm import SentenceVAEModel
from athanor.convert.sentencevae.vae import focal_cross_entropy
from athanor.distill.lm_pretrain import bos_padded, pretrain_lm  # noqa: F401 (re-exported)
from athanor.distill.sentencevae.config import SentenceVAEArgs
from athanor.distill.spec import TrainSpec

log = logging.getLogger(__name__)

Passage = list[list[int]]
"""One passage: the token ids of each of its sentences."""


def collate(passages: Sequence[Passage], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Passages → {'sent': [B, S, L] right-padded ids, 'lengths': [B, S] (0 = no sentence)}."""
    s = max(len(p) for p in passages)
    length = max(len(t) for p in passages for t in p)
    sent = torch.full((len(passages), s, length), pad_id, dtype=torch.long)
    lengths = torch.zeros(len(passages), s, dtype=torch.long)
    for b, passage in enumerate(passages):
        for j, tokens in enumerate(passage):
            sent[b, j, : len(tokens)] = torch.tensor(tokens)
            lengths[b, j] = len(tokens)
    return {"sent": sent, "lengths": lengths}


def reconstruction_outputs(model: SentenceVAEModel,
                           batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1: decoder logits and targets for every sentence of the batch, from its own vector."""
    valid = batch["lengths"] > 0
    sent, lengths = batch["sent"][valid], batch["lengths"][valid]
    return model.decoder.teacher_forced(sent, lengths, model.encode(sent, lengths))


def sllm_outputs(model: SentenceVAEModel, batch: dict[str, torch.Tensor],
                 grad_encoder: bool = False) -> dict[str, torch.Tensor]:
    """Stage 2: next-sentence predictions decoded through the decoder, with their targets.

    Returns logits/targets over every sentence (tokens + EOS, the first sentence included), stop
    logits/targets at the S+1 SLLM positions (1 where the passage ends), and predicted and encoded
    vectors for each real sentence.
    """
    sent, lengths = batch["sent"], batch["lengths"]
    valid = lengths > 0
    with torch.set_grad_enabled(grad_encoder and torch.is_grad_enabled()):
        vectors = model.encode_passages(sent, lengths)
    pred, stop = model.sllm(vectors, valid.long())
    pred = pred[:, :-1][valid]  # output j-1 predicts sentence j
    logits, targets = model.decoder.teacher_forced(sent[valid], lengths[valid], pred)
    count = valid.sum(1)
    pos = torch.arange(stop.shape[1], device=stop.device)
    stop_targets = (pos[None] == count[:, None]).float()
    stop_mask = pos[None] <= count[:, None]
    return {
        "logits": logits,
        "targets": targets,
        "stop_logits": stop[stop_mask],
        "stop_targets": stop_targets[stop_mask],
        "pred": pred,
        "target_vectors": vectors[valid],
    }


class SentenceVAEModule(L.LightningModule):
    """Both stages in one module: the stage follows the optimizer step count."""

    def __init__(self, model: SentenceVAEModel, args: SentenceVAEArgs, train: TrainSpec) -> None:
        super().__init__()
        self.model, self.args, self.train_spec = model, args, train
        self.stage1_steps = min(args.stage1_steps, train.max_steps)

    @property
    def stage(self) -> int:
        """1 (reconstruction) for the first `stage1_steps` optimizer steps, then 2 (SLLM)."""
        return 1 if self.global_step < self.stage1_steps else 2

    def _vae_modules(self) -> list[torch.nn.Module]:
        """What stage 1 trains and stage 2 freezes."""
        return [self.model.embed, self.model.encoder, self.model.decoder]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        gamma = self.args.focal_gamma if self.args.loss == "focal" else 0.0
        if self.stage == 1:
            logits, targets = reconstruction_outputs(self.model, batch)
            loss = focal_cross_entropy(logits, targets, gamma)
            acc = (logits.argmax(-1) == targets)[targets != -100].float().mean()
            self.log_dict({"train/recon_loss": loss, "train/recon_acc": acc, "train/stage": 1.0}, prog_bar=True)
            return loss
        for module in self._vae_modules():  # frozen in stage 2: gradients still flow through them
            module.requires_grad_(False)
        out = sllm_outputs(self.model, batch)
        token_loss = focal_cross_entropy(out["logits"], out["targets"], gamma)
        stop_loss = F.binary_cross_entropy_with_logits(out["stop_logits"], out["stop_targets"])
        embed_loss = F.mse_loss(out["pred"], out["target_vectors"].detach())
        loss = token_loss + self.args.stop_loss_weight * stop_loss + self.args.embed_loss_weight * embed_loss
        self.log_dict(
            {"train/next_sentence_loss": token_loss, "train/stop_loss": stop_loss, "train/embed_loss": embed_loss,
             "train/stage": 2.0},
            prog_bar=True,
        )
        return loss

    def configure_optimizers(self) -> dict:
        """One AdamW, two parameter groups with their own warm-up/decay: VAE in stage 1, SLLM in stage 2."""
        # The embedding is shared by encoder and decoder: deduplicate by identity.
        vae_params = list({id(p): p for m in self._vae_modules() for p in m.parameters() if p.requires_grad}.values())
        sllm_params = [p for p in self.model.sllm.parameters() if p.requires_grad]
        t = self.train_spec
        groups = [{"params": vae_params, "lr": t.lr}, {"params": sllm_params, "lr": t.lr * self.args.sllm_lr_scale}]
        optimizer = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
        s1, total, warm = self.stage1_steps, t.max_steps, t.warmup_steps

        def ramp(step: int, start: int, end: int) -> float:
            if step < start or step >= end:
                return 0.0
            local = step - start
            if warm and local < warm:
                return (local + 1) / warm
            return max(0.0, (end - step) / max(end - start - warm, 1))

        lambdas = [lambda s: ramp(s, 0, s1), lambda s: ramp(s, s1, total)]
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

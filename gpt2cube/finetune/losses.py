"""The fine-tuning loss, computed a chunk of positions at a time through the output head.

GPT-2's head is the big part of a small model (50,257 x 256 against 4.7 M weights in the
reference's six blocks), and a batch of 8 x 512 positions has 206 M logits: materialising them,
their log-softmax and a teacher's (distillation) costs gigabytes of memory traffic and page
faults per step (measured on 2 cores: 11-12 s a step, against 4 s without the teacher). Here
the blocks run once, their final hidden states are detached, and the head, softmax, CE and KL
run over `chunk` positions at a time, each chunk's backward accumulating into the hidden
states' gradient (and into the head's, when it trains); one backward through the blocks
follows. The sum of the chunks' losses is the loss over all positions, exactly as one pass.

    loss = sum_i w_i [(1 - a) CE_i(student, target) + a T^2 KL_i(softmax(teacher / T) || softmax(student / T))]

with w_i the batch's position weights (uniform 1/N unless the task gives them; they sum to 1).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass


@dataclass
class HeadLoss:
    model: object
    teacher: object | None = None
    distill_weight: float = 0.0
    temperature: float = 1.0
    device: str = "cpu"
    bf16: bool = False
    chunk: int = 512

    def _autocast(self):
        import torch

        return torch.autocast(self.device, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def _hidden(self, model, b):
        """Final hidden states (after ln_f) at the scored positions, (N, E)."""
        with self._autocast():
            h = model.transformer(b.ids.to(self.device)).last_hidden_state
        return h.reshape(-1, h.shape[-1])[b.scored.to(self.device)]

    def _logits(self, model, h):
        with self._autocast():
            return model.lm_head(h).float()

    def _chunk_loss(self, h, th, targets, w):
        """The chunk's share of the loss: its positions' weighted losses (w sums to 1 over the batch)."""
        import torch
        import torch.nn.functional as F

        logits = self._logits(self.model, h)
        if th is None:
            return (F.cross_entropy(logits, targets, reduction="none") * w).sum()
        a, T = self.distill_weight, self.temperature
        with torch.no_grad():
            log_pt = F.log_softmax(self._logits(self.teacher, th) / T, -1)
            pt = log_pt.exp()
            entropy = -(pt * log_pt).sum(-1)
        # KL(p_t || p_s) = CE(p_s; soft target p_t) - H(p_t): one log-softmax of the student and
        # one fused soft-target cross-entropy instead of kl_div's extra passes over (N, V).
        if T == 1.0:  # CE and KL merge into one soft target: (1 - a) one-hot + a p_t
            target = pt.mul_(a)
            target[torch.arange(len(targets), device=targets.device), targets] += 1 - a
            return ((F.cross_entropy(logits, target, reduction="none") - a * entropy) * w).sum()
        ce = F.cross_entropy(logits, targets, reduction="none")
        kl = F.cross_entropy(logits / T, pt, reduction="none") - entropy
        return (((1 - a) * ce + a * T * T * kl) * w).sum()

    def backward(self, b) -> float:
        """Loss of batch `b`, its gradients accumulated into the model's parameters."""
        import torch

        h = self._hidden(self.model, b)
        hd = h.detach().requires_grad_(True)
        th = None
        if self.teacher is not None and self.distill_weight > 0:
            with torch.no_grad():
                th = self._hidden(self.teacher, b)
        targets = b.targets.to(self.device)
        n, total = len(targets), 0.0
        w = (torch.full((n,), 1.0 / n) if b.weights is None else b.weights).to(self.device, torch.float32)
        for i in range(0, n, self.chunk):
            part = self._chunk_loss(hd[i : i + self.chunk], None if th is None else th[i : i + self.chunk],
                                    targets[i : i + self.chunk], w[i : i + self.chunk])
            part.backward()
            total += float(part.detach())
        h.backward(hd.grad.to(h.dtype))
        return total

    def nll(self, b) -> float:
        """Mean cross-entropy at the scored positions (no gradients)."""
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            h = self._hidden(self.model, b)
            targets = b.targets.to(self.device)
            return sum(float(F.cross_entropy(self._logits(self.model, h[i : i + self.chunk]),
                                             targets[i : i + self.chunk], reduction="sum"))
                       for i in range(0, len(targets), self.chunk)) / len(targets)

    def scored_logits(self, b):
        """Logits at the scored positions, (N, V) float32 (no gradients; for few positions)."""
        import torch

        with torch.no_grad():
            return self._logits(self.model, self._hidden(self.model, b))

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

    def _logits(self, model, h, weight=None):
        import torch.nn.functional as F

        with self._autocast():
            return (model.lm_head(h) if weight is None else F.linear(h, weight)).float()

    def _chunk_loss(self, h, weight, th, targets, w):
        """The chunk's share of the loss: its positions' weighted losses (w sums to 1 over the batch)."""
        import torch
        import torch.nn.functional as F

        logits = self._logits(self.model, h, weight)
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

    def loss(self, b):
        """Loss of batch `b` as a scalar tensor with its graph: the blocks' forward once, the head
        chunk by chunk (`_ChunkedHead`), so one backward (DDP's, FSDP's) follows one forward."""
        import torch

        h = self._hidden(self.model, b)
        th = None
        if self.teacher is not None and self.distill_weight > 0:
            with torch.no_grad():
                th = self._hidden(self.teacher, b)
        targets = b.targets.to(self.device)
        n = len(targets)
        w = (torch.full((n,), 1.0 / n) if b.weights is None else b.weights).to(self.device, torch.float32)
        return _ChunkedHead.apply(h, self.model.lm_head.weight, self, th, targets, w)

    def backward(self, b) -> float:
        """Loss of batch `b`, its gradients accumulated into the model's parameters."""
        loss = self.loss(b)
        loss.backward()
        return float(loss.detach())

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


def _chunked_head():
    import torch

    class ChunkedHead(torch.autograd.Function):
        """The head's loss over (N, E) hidden states, `chunk` positions at a time: the forward
        computes each chunk's loss and its gradients (hidden states, head weight) at once and keeps
        only the gradients; the backward scales them by the incoming gradient. Nothing of size
        (N, V) outlives its chunk, and the head runs once."""

        @staticmethod
        def forward(ctx, h, weight, head, th, targets, w):
            train_w = weight.requires_grad
            gh = torch.zeros_like(h)
            gw = torch.zeros_like(weight, dtype=torch.float32) if train_w else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            wd = weight.detach().requires_grad_(train_w)
            with torch.enable_grad():
                for i in range(0, len(targets), head.chunk):
                    hc = h[i : i + head.chunk].detach().requires_grad_(True)
                    part = head._chunk_loss(hc, wd, None if th is None else th[i : i + head.chunk],
                                            targets[i : i + head.chunk], w[i : i + head.chunk])
                    grads = torch.autograd.grad(part, [hc, wd] if train_w else [hc])
                    gh[i : i + head.chunk] = grads[0]
                    if train_w:
                        gw += grads[1]
                    total += part.detach()
            ctx.save_for_backward(gh, *([gw] if train_w else []))
            ctx.train_w = train_w
            return total

        @staticmethod
        def backward(ctx, g):
            gh, *rest = ctx.saved_tensors
            gw = (rest[0] * g).to(rest[0].dtype) if ctx.train_w else None
            return gh * g, gw, None, None, None, None

    return ChunkedHead


class _ChunkedHead:
    _fn = None

    @classmethod
    def apply(cls, *args):
        if cls._fn is None:
            cls._fn = _chunked_head()
        return cls._fn.apply(*args)

"""The demo's workload: a small GPT trained with AdamW on random batches.

Token and position embeddings, pre-norm transformer blocks, a final LayerNorm and an lm_head tied
to the token embedding (one storage behind two state-dict keys), initialised as GPT-2 is. Its
state after a step, ``{'model': ..., 'optim': ..., 'step': n}``, is what the demo stages.

Training is deterministic, so that a run resumed from a checkpoint can be compared with one
that never stopped, bit for bit: the weights come from ``Setup.seed``, and the batch of step
``n`` is a function of the seed and ``n`` alone (:func:`batch_for`), not of a generator's
position. The model has no dropout, so no random state needs to be checkpointed besides the
step; :meth:`Trainer.restore` puts a checkpoint's model, optimizer and step back.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["GPT", "Setup", "Trainer", "batch_for"]


@dataclass(frozen=True)
class Setup:
    """The model's sizes and the training loop's batches."""

    layers: int
    width: int
    heads: int
    vocab: int
    context: int
    batch: int
    device: str
    seed: int


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4x MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.attn_qkv = nn.Linear(width, 3 * width)
        self.attn_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp_fc = nn.Linear(width, 4 * width)
        self.mlp_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv: torch.Tensor = self.attn_qkv(self.ln_1(x))
        q, k, v = (
            part.view(batch, tokens, self.heads, width // self.heads).transpose(1, 2)
            for part in qkv.split(width, dim=2)
        )
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(attended.transpose(1, 2).reshape(batch, tokens, width))
        hidden: torch.Tensor = F.gelu(self.mlp_fc(self.ln_2(x)))
        out: torch.Tensor = x + self.mlp_proj(hidden)
        return out


class GPT(nn.Module):
    """A GPT-2-shaped language model."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, width)
        self.pos_emb = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied: one storage behind two state-dict keys
        self.apply(_init_weights)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x: torch.Tensor = self.tok_emb(tokens) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        logits: torch.Tensor = self.lm_head(self.ln_f(x))
        return logits


def _init_weights(module: nn.Module) -> None:
    # GPT-2's initialisation: with PyTorch's N(0, 1) embeddings the tied lm_head starts with
    # huge logits and a loss in the hundreds instead of about ln(vocab).
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def batch_for(setup: Setup, step: int) -> torch.Tensor:
    """The tokens of training step ``step`` (1-based): the same for every run with this seed.

    A generator seeded from ``(seed, step)`` rather than one running generator: a resumed run
    draws step ``n``'s batch without replaying the batches before it.
    """
    generator = torch.Generator().manual_seed(setup.seed * 1_000_003 + step)
    return torch.randint(setup.vocab, (setup.batch, setup.context + 1), generator=generator)


def _deterministic_cuda() -> None:
    """Make CUDA training repeat bit for bit (a resumed run is compared with an unbroken one).

    cuBLAS needs a fixed workspace, set before its first use in the process; kernels without
    a deterministic variant warn rather than fail.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


class Trainer:
    """The model, its AdamW optimizer and random batches; one call of :meth:`step` trains."""

    def __init__(self, setup: Setup) -> None:
        torch.manual_seed(setup.seed)  # the weights are drawn on the CPU, then moved
        self.setup = setup
        self.device = torch.device(setup.device)
        if self.device.type == "cuda":
            _deterministic_cuda()
        self.model = GPT(setup.vocab, setup.width, setup.layers, setup.heads, setup.context).to(
            self.device
        )
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-4, weight_decay=0.1)
        self.steps_done = 0

    def step(self) -> float:
        """One training step on the batch of the next step (:func:`batch_for`); its loss."""
        setup = self.setup
        tokens = batch_for(setup, self.steps_done + 1).to(self.device)
        with self._one_host_thread():
            with self._attention():
                logits = self.model(tokens[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, setup.vocab), tokens[:, 1:].reshape(-1))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        self.steps_done += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the step's time, not its launch time
        return float(loss.detach())

    @contextlib.contextmanager
    def _one_host_thread(self) -> Iterator[None]:
        """On the CPU, the step's operators on one thread.

        Why: a matrix product split over several threads adds in an order that depends on how
        many it gets, and MKL may use fewer than it was given on a loaded machine. A killed
        job's step, run beside its own checkpoint's copies and writes, once came out 2 ULPs
        off the unbroken run's (the full test suite on 2 cores), and the demo compares them
        bit for bit.
        """
        if self.device.type != "cpu":
            yield
            return
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def _attention(self) -> contextlib.AbstractContextManager[None]:
        # On a GPU the fused attention kernels' backward passes may add in any order; the
        # plain one (matrix products and a softmax) gives the same bits on every run.
        if self.device.type == "cuda":
            return sdpa_kernel(SDPBackend.MATH)
        return contextlib.nullcontext()

    def snapshot(self) -> dict[str, Any]:
        """What a training loop checkpoints: the model, the optimizer and the step."""
        return {
            "model": self.model.state_dict(),
            "optim": self.optimizer.state_dict(),
            "step": self.steps_done,
        }

    def restore(self, checkpoint: Any) -> None:
        """Continue from ``checkpoint`` (a :meth:`snapshot` loaded back): weights, AdamW, step."""
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optim"])
        self.steps_done = int(checkpoint["step"])

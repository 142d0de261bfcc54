"""astage for Lightning: a ``CheckpointIO`` plugin that stages checkpoints and writes them behind.

``Trainer(plugins=[astage.lightning.AstageCheckpointIO()])``: each save returns once the
checkpoint's tensors are in reusable host buffers, and a background thread writes the file in
Lightning's own format (``torch.save``), which ``load_from_checkpoint``, ``trainer.fit(ckpt_path=)``
and ``torch.load`` read as usual. Needs Lightning (``pip install 'astage[lightning]'``); see
``docs/lightning.md``.
"""

from ._plugin import AstageCheckpointIO, CheckpointIOStats

__all__ = ["AstageCheckpointIO", "CheckpointIOStats"]

"""The training steps the CPU benchmarks time, written once per library.

Softmax cross-entropy and Adam (lr 1e-3) on batches from ``next_batch()`` (float32 images, int64
labels as NumPy arrays). gpucnn has two: its Trainer's ``train_step`` and the library loop a user
writes (forward, loss, backward with ``input_grad=False``, ``step()``); neither computes a gradient
for the images, as PyTorch's does not.
"""
from __future__ import annotations


def gpucnn_adam_step(model, next_batch):
    """A function running one gpucnn training step of ``model`` and returning its loss: the step of
    gpucnn's Trainer (Adam fused over flat buffers; on two cores the batch split with a worker process)."""
    from gpucnn import optim
    from gpucnn.train import Trainer
    trainer = Trainer(model, optim.Adam(list(model.parameters()), lr=1e-3), device="cpu")

    def step():
        x, y = next_batch()
        loss, _ = trainer.train_step(x, y)
        return float(loss)
    return step


def gpucnn_loop_step(model, next_batch):
    """A function running one training step of ``model`` as a user's own loop does, in this process."""
    from gpucnn import ops, optim
    opt = optim.Adam(list(model.parameters()), lr=1e-3)

    def step():
        x, y = next_batch()
        opt.zero_grad()
        loss, probs = ops.softmax_cross_entropy(model(x), y)
        model.backward(ops.softmax_cross_entropy_backward(probs, y), input_grad=False)
        opt.step()
        return float(loss)
    return step


def torch_adam_step(torch, model, next_batch):
    """A function running one PyTorch training step of ``model`` and returning its loss."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        x, y = next_batch()
        opt.zero_grad()
        loss = loss_fn(model(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        opt.step()
        return float(loss.detach())
    return step

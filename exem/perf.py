"""Speed-ups of training that leave the maths as it is.

The switches ``model.torch_compile`` and ``model.channels_last`` are ``True``, ``False`` or ``"auto"`` (on when
training on a CUDA GPU); :func:`frozen` spares the weight-gradient work of networks that are not being trained.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch
from torch import nn

__all__ = ["AUTO", "PerfSwitches", "compile_or_eager", "frozen", "switch", "switch_on"]

log = logging.getLogger(__name__)

AUTO = "auto"
# Compiled variants Dynamo keeps per network code before it runs that code eagerly for good (its default is 8). A
# bf16 CycleGAN training step gave 6 for the generator (float32 and bfloat16 inputs, with and without grad, a smaller
# last validation batch) and 3 for the discriminator (frozen and trainable): `TORCH_LOGS=recompiles`, on the CPU.
RECOMPILE_LIMIT = 32


def switch(name: str, value: bool | str) -> bool | str:
    """A performance switch: True, False or ``"auto"``; one-line ValueError naming ``model.<name>`` otherwise."""
    if isinstance(value, bool) or value == AUTO:
        return value
    raise ValueError(f"model.{name} must be true, false or {AUTO!r}, got {value!r}")


def switch_on(value: bool | str, device: torch.device) -> bool:
    """Whether a switch is on when training on ``device`` (``"auto"``: on a CUDA device)."""
    return device.type == "cuda" if value == AUTO else bool(value)


@contextlib.contextmanager
def frozen(*nets: nn.Module) -> Iterator[None]:
    """Parameters of ``nets`` need no gradients inside the block (no weight-gradient work); restored after."""
    params = [p for net in nets for p in net.parameters()]
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, saved, strict=True):
            p.requires_grad_(flag)


def compile_or_eager(net: nn.Module, backend: str | object = "inductor") -> None:
    """Compile ``net`` in place (its ``__call__``; state-dict keys unchanged) so that a compilation failure falls
    back to eager with one warning instead of ending the run.

    Compilation happens at the first call (and again for new input shapes): a failure there
    (``torch._dynamo`` / inductor raise a ``TorchDynamoException``) logs one warning, un-compiles ``net`` and
    repeats the call eagerly; later calls run eagerly. Errors of the network itself pass through.

    The backward graph is compiled in that same call, not lazily at the first ``backward()`` (AOTAutograd's
    default), so that its failures fall back too instead of escaping from the training step. Calls through ``net``
    may compile up to :data:`RECOMPILE_LIMIT` variants of its code (Dynamo's own limit, 8, is near what a training
    step needs; past it Dynamo would run the code eagerly without a word from exem).
    """
    from torch._dynamo import config as dynamo_config
    from torch._dynamo.exc import TorchDynamoException
    from torch._functorch import config as functorch_config

    compiled = torch.compile(net._call_impl, backend=backend)

    def call(*args: object, **kwargs: object) -> object:
        limit = max(RECOMPILE_LIMIT, int(dynamo_config.recompile_limit))
        try:
            with (
                functorch_config.patch(force_non_lazy_backward_lowering=True),
                dynamo_config.patch(recompile_limit=limit),
            ):
                return compiled(*args, **kwargs)
        except TorchDynamoException as exc:
            first = " ".join(str(exc).split())[:200]
            log.warning("torch.compile failed for %s (%s); running it eagerly", type(net).__name__, first)
            net._compiled_call_impl = None  # nn.Module.__call__ goes back to the eager path
            return net._call_impl(*args, **kwargs)

    net._compiled_call_impl = call  # what nn.Module.compile sets: __call__ uses it when present


class PerfSwitches:
    """A model's ``torch_compile`` and ``channels_last`` switches, and what :meth:`apply` has done to its networks.

    ``channels_last``: the networks' 5-D weights (and, by the model, the batches) in ``torch.channels_last_3d``.
    ``torch_compile``: each network compiled in place (``nn.Module.compile``, so state-dict keys stay as they are).
    """

    def __init__(self, torch_compile: bool | str = AUTO, channels_last: bool | str = False) -> None:
        self.torch_compile = switch("torch_compile", torch_compile)
        self.channels_last = switch("channels_last", channels_last)
        self.channels_last_active = False
        self.compiled = False

    def apply(self, nets: Sequence[nn.Module], device: torch.device | str) -> None:
        """Apply the switches that are on for ``device`` to ``nets``; idempotent."""
        device = torch.device(device)
        if switch_on(self.channels_last, device) and not self.channels_last_active:
            for net in nets:
                net.to(memory_format=torch.channels_last_3d)
            self.channels_last_active = True
        if switch_on(self.torch_compile, device) and not self.compiled:
            for net in nets:
                compile_or_eager(net)
            self.compiled = True
        log.debug(
            "performance switches on %s: channels_last_3d=%s, torch.compile=%s",
            device,
            self.channels_last_active,
            self.compiled,
        )

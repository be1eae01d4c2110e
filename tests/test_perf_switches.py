"""Training-speed switches keep the maths: channels_last, activation checkpointing, torch.compile, optimizers,
frozen discriminators in the generator step, no host syncs in the step, Lightning vs a plain loop."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from exem.models import AnisotropicUNet3D
from exem.module import ExEMModule

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WIDTHS = [4, 8, 16]
PATCH = (2, 32, 32)


def tiny_module(**kwargs: Any) -> ExEMModule:
    torch.manual_seed(0)
    generator = {"widths": WIDTHS, **kwargs.pop("generator", {})}
    return ExEMModule(
        generator=generator,
        discriminator={"num_scales": 1, "base_filters": 4},
        loss={"lambda_content": 50.0, "content_decay_steps": 100},
        optimizer={"lr": 1e-3, **kwargs.pop("optimizer", {})},  # betas: the published (0.5, 0.999)
        **kwargs,
    )


def tiny_batches(n: int, batch: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [
        (torch.rand(batch, 1, *PATCH, generator=g), torch.rand(batch, 1, *PATCH, generator=g))
        for _ in range(n)
    ]


def run_steps(module: ExEMModule, n: int = 2) -> list[dict[str, torch.Tensor]]:
    module.optimize_for("cpu")
    optimizers, _ = module.configure_optimizers()
    return [module.train_batch(a, b, optimizers)[0] for a, b in tiny_batches(n)]


def assert_same_training(ours: list[dict], theirs: list[dict], a: ExEMModule, b: ExEMModule) -> None:
    for o, t in zip(ours, theirs, strict=True):
        assert o.keys() == t.keys()
        for key in o:
            torch.testing.assert_close(o[key], t[key], rtol=1e-5, atol=1e-7)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        # Conv biases in front of the discriminators' InstanceNorm have no gradient in exact arithmetic; Adam
        # turns their rounding noise into steps of size lr, so they are not compared.
        if name.startswith("D_") and name.endswith(".bias"):
            continue
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------ channels_last


def test_channels_last_keeps_the_maths() -> None:
    plain, fast = tiny_module(), tiny_module(channels_last=True)
    ours = run_steps(fast)
    weight = fast.G_AB.tripleconv2.conv2.weight
    assert weight.is_contiguous(memory_format=torch.channels_last_3d) and not weight.is_contiguous()
    assert_same_training(ours, run_steps(plain), fast, plain)
    # the state dict keeps its keys and values: checkpoints load either way
    plain.load_state_dict(fast.state_dict())


def test_auto_switches_stay_off_on_cpu() -> None:
    module = tiny_module(channels_last="auto", torch_compile="auto")
    module.optimize_for("cpu")
    assert module.G_AB.tripleconv2.conv2.weight.is_contiguous()
    assert not module.perf.compiled


def test_bad_switch_value_is_a_one_line_error() -> None:
    with pytest.raises(ValueError, match=r"model\.torch_compile must be true, false or 'auto', got 'yes'"):
        tiny_module(torch_compile="yes")


# ---------------------------------------------------------------------------- activation checkpointing


def _count_block_calls(net: AnisotropicUNet3D) -> list[int]:
    calls = [0]
    net.tripleconv2.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_activation_checkpointing_gives_the_same_outputs_and_gradients() -> None:
    torch.manual_seed(0)
    plain = AnisotropicUNet3D(widths=WIDTHS)
    ckpt = AnisotropicUNet3D(widths=WIDTHS, activation_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    calls = _count_block_calls(ckpt)
    x = torch.rand(2, 1, *PATCH)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = plain(x1), ckpt(x2)
    torch.testing.assert_close(y2, y1, rtol=0, atol=0)
    (y1**2).mean().backward()
    (y2**2).mean().backward()
    assert calls[0] == 2  # the level ran again in the backward pass: it was checkpointed
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-8)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-8, msg=name)


def test_activation_checkpointing_is_idle_without_gradients() -> None:
    net = AnisotropicUNet3D(widths=WIDTHS, activation_checkpointing=True)
    calls = _count_block_calls(net)
    with torch.no_grad():
        net(torch.rand(1, 1, *PATCH))
    assert calls[0] == 1


def test_activation_checkpointing_from_the_model_config() -> None:
    plain, ckpt = tiny_module(), tiny_module(generator={"activation_checkpointing": True})
    assert ckpt.G_AB.activation_checkpointing and ckpt.G_BA.activation_checkpointing
    assert_same_training(run_steps(ckpt), run_steps(plain), ckpt, plain)


# ----------------------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, {"fused": True}),
        ({"grad_clip": 1.0}, {"foreach": True}),
        ({"optimizer": {"foreach": False}}, {"foreach": False}),
        ({"optimizer": {"fused": False}}, {"fused": False}),
        ({"optimizer": {"_target_": "torch.optim.AdamW"}}, {"fused": True}),
        ({"optimizer": {"_target_": "torch.optim.RMSprop"}}, {"foreach": True}),  # no fused kernel
    ],
)
def test_optimizer_kernels(kwargs: dict, expected: dict) -> None:
    optimizers, _ = tiny_module(**kwargs).configure_optimizers()
    for opt in optimizers:
        for key, value in expected.items():
            assert bool(opt.defaults[key]) is value


def test_grad_clip_in_a_plain_loop() -> None:
    clipped, free = tiny_module(grad_clip=1e-3), tiny_module()
    a, b = run_steps(clipped), run_steps(free)
    assert float((a[-1]["total"] - b[-1]["total"]).abs()) > 0  # clipping changed the update


# ------------------------------------------------------------------------------------- the step itself


def test_each_step_trains_only_its_own_networks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The G step freezes both discriminators (no weight gradients for them); each D step freezes every other
    network, so that DDP all-reduces only the trained one's gradients (exem/ddp.py). All restored after."""
    module = tiny_module()
    nets = ("G_AB", "G_BA", "D_A", "D_B")
    seen: list[tuple[bool, ...]] = []
    step = ExEMModule._step

    def spy(self: ExEMModule, opt: Any, loss: torch.Tensor) -> None:
        seen.append(tuple(any(p.requires_grad for p in getattr(self, n).parameters()) for n in nets))
        step(self, opt, loss)

    monkeypatch.setattr(ExEMModule, "_step", spy)
    run_steps(module, n=1)
    assert seen == [  # G step, D_A step, D_B step
        (True, True, False, False),
        (False, False, True, False),
        (False, False, False, True),
    ]
    assert all(p.requires_grad for p in module.parameters())  # restored after each step


class _ScalarReads(TorchDispatchMode):
    """Counts reads of tensor values by the host (``.item()``, ``float(t)``, ``int(t)``, ``if t:``)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("pool", [0, 4])
def test_the_step_never_reads_device_values(pool: int) -> None:
    """On a GPU every host read of a tensor value waits for the device; the step makes none (while the replay
    pool fills; once full, it draws on torch's CPU generator, which costs the device nothing)."""
    module = tiny_module(replay_buffer_size=pool)
    module.optimize_for("cpu")
    optimizers, _ = module.configure_optimizers()
    (a, b), *_ = tiny_batches(1, batch=2)
    with _ScalarReads() as reads:
        module.train_batch(a, b, optimizers)
    assert reads.count == 0


# ------------------------------------------------------------------------------------------- Lightning


def test_lightning_fit_equals_the_plain_loop_and_logs_at_intervals(tmp_path: Path) -> None:
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    data = [{"lm": a, "em": b} for a, b in tiny_batches(4)]
    loader = DataLoader(data, batch_size=None)
    lit, plain = tiny_module(), tiny_module()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=3 * len(data),
        max_epochs=1,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=2,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(lit, train_dataloaders=loader)
    run_steps_on = plain.configure_optimizers()[0]
    for batch in data:
        plain.train_batch(batch["lm"], batch["em"], run_steps_on)
    assert lit.batch_step == plain.batch_step == len(data)
    for p, q in zip(lit.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)

    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    logged = [int(r["step"]) for r in rows if r.get("train/G_total")]
    assert logged == [1, 3]  # every 2nd batch (Lightning counts batches from 0 in the log)
    keys = {k for r in rows for k, v in r.items() if v}
    assert {"train/G_cycle", "train/G_content", "train/D_A", "train/D_B", "train/content_weight"} <= keys


# --------------------------------------------------------------------------------------- torch.compile


@pytest.mark.slow
def test_torch_compile_keeps_the_maths() -> None:
    plain, compiled = tiny_module(), tiny_module(torch_compile=True)
    ours = run_steps(compiled)
    assert compiled.perf.compiled
    assert set(compiled.state_dict()) == set(plain.state_dict())  # nn.Module.compile keeps the keys
    assert_same_training(ours, run_steps(plain), compiled, plain)


# ------------------------------------------------------------------------------------------------ data


@pytest.mark.parametrize(
    ("setting", "device", "pinned"), [(None, "cuda", True), (None, "cpu", False), (False, "cuda", False)]
)
def test_pinned_memory_follows_the_training_device(setting: bool | None, device: str, pinned: bool) -> None:
    from types import SimpleNamespace

    from exem.data import ExEMDataModule

    dm = ExEMDataModule(lm={"path": "lm.zarr"}, em={"path": "em.zarr"}, pin_memory=setting)
    assert dm._loader_kwargs()["pin_memory"] is False  # no trainer yet
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
    assert dm._loader_kwargs()["pin_memory"] is pinned


def test_a_compile_failure_falls_back_to_eager_with_one_warning(caplog) -> None:
    """torch.compile errors (here a backend that always fails) do not end the run: one warning, then eager."""
    from exem.models import AnisotropicUNet3D
    from exem.perf import compile_or_eager

    def failing_backend(gm, example_inputs):  # noqa: ANN001, ANN202
        raise RuntimeError("no compiler here")

    torch.manual_seed(0)
    net = AnisotropicUNet3D(widths=(2, 4)).eval()
    x = torch.rand(1, 1, 2, 16, 16)
    with torch.no_grad():
        expected = net(x)
        compile_or_eager(net, backend=failing_backend)
        assert net._compiled_call_impl is not None
        with caplog.at_level("WARNING", logger="exem.perf"):
            first, second = net(x), net(x)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    warnings = [r for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1 and "running it eagerly" in warnings[0].getMessage()
    assert net._compiled_call_impl is None  # eager from then on


def test_a_backward_compile_failure_also_falls_back_to_eager(caplog) -> None:
    """AOTAutograd compiles the backward lazily, at the first backward(): a failure there escaped from the
    training step. It is now compiled in the forward call, where the fallback catches it."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from exem.models import AnisotropicUNet3D
    from exem.perf import compile_or_eager

    def failing_backward(gm, example_inputs):  # noqa: ANN001, ANN202
        raise RuntimeError("no backward compiler here")

    backend = aot_autograd(
        fw_compiler=lambda gm, _: make_boxed_func(gm.forward), bw_compiler=failing_backward
    )
    x = torch.rand(1, 1, 2, 16, 16)
    grads = []
    for compiled in (False, True):
        torch.manual_seed(0)
        net = AnisotropicUNet3D(widths=(2, 4))
        if compiled:
            compile_or_eager(net, backend=backend)
        with caplog.at_level("WARNING", logger="exem.perf"):
            net(x).square().mean().backward()
        grads.append([p.grad for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    assert sum("torch.compile failed" in r.getMessage() for r in caplog.records) == 1
    assert net._compiled_call_impl is None


class _Affine(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1


def test_a_compiled_network_keeps_compiling_past_dynamos_default_recompile_limit(caplog) -> None:
    """Input dtypes, grad modes and requires_grad give a network many compiled variants (a bf16 CycleGAN step needs
    ~7); past Dynamo's default limit of 8 it ran eagerly for good. 16 variants here all compile."""
    from exem.perf import RECOMPILE_LIMIT, compile_or_eager

    graphs = []

    def counting(gm, example_inputs):  # noqa: ANN001, ANN202
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        net = _Affine()
        compile_or_eager(net, backend=counting)
        variants = list(
            itertools.product(
                (torch.float32, torch.float64, torch.bfloat16, torch.float16), (False, True), (False, True)
            )
        )
        with caplog.at_level("WARNING"):
            for dtype, requires_grad, grad_mode in variants:
                x = torch.ones(2, 3, dtype=dtype, requires_grad=requires_grad)
                with torch.set_grad_enabled(grad_mode):
                    assert torch.equal(net(x).detach(), torch.full((2, 3), 3.0, dtype=dtype))
        assert len(graphs) == len(variants) == 16 <= RECOMPILE_LIMIT
        assert not [r for r in caplog.records if "recompile_limit" in r.getMessage()]
        assert torch._dynamo.config.recompile_limit == 8  # the process-wide setting is left alone
    finally:
        torch._dynamo.reset()


def test_compile_is_on_by_default_on_cuda_only() -> None:
    """model.torch_compile defaults to auto (YAML and code): on for a CUDA device, off on the CPU."""
    from exem.perf import PerfSwitches, switch_on

    switches = PerfSwitches()
    assert switches.torch_compile == "auto" and switches.channels_last is False
    assert switch_on(switches.torch_compile, torch.device("cuda")) is True
    assert switch_on(switches.torch_compile, torch.device("cpu")) is False
    from omegaconf import OmegaConf

    from exem.config import CONF_DIR

    assert OmegaConf.load(f"{CONF_DIR}/model/exem.yaml").torch_compile == "auto"

"""Multi-process correctness on the CPU: 2-process DDP training (gloo) through ``exem-train``.

A probe callback (written to a temporary module and added with ``+callbacks.probe=…``) records, on every rank and
after every batch, a hash of all weights, the sample ids and patch origins the rank drew (from its sampler) and a
hash of every patch it trained on, and which process wrote checkpoints, image panels and logs. The test then
checks: the ranks agree on the weights after each step; no sample and no patch is drawn twice (across ranks or
steps); only rank 0 writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.conftest import BIN, DEMO_FAST, cli_env

PROBE = textwrap.dedent(
    '''
    """Records what each DDP rank does, one JSON line per event, in <out_dir>/rank<r>.jsonl."""
    import hashlib
    import json
    from pathlib import Path

    import lightning as L
    import torch


    def digest(t: torch.Tensor) -> str:
        return hashlib.sha1(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


    class Probe(L.Callback):
        def __init__(self, out_dir: str) -> None:
            self.out_dir = Path(out_dir)
            self.rank = 0

        def record(self, **row) -> None:
            with (self.out_dir / f"rank{self.rank}.jsonl").open("a") as fh:
                fh.write(json.dumps(row) + "\\n")

        def setup(self, trainer, pl_module, stage) -> None:
            self.rank = trainer.global_rank
            self.out_dir.mkdir(parents=True, exist_ok=True)
            import exem.module

            real_panel = exem.module.save_panel

            def panel(*args, **kwargs):
                self.record(event="write", what="panel")
                return real_panel(*args, **kwargs)

            exem.module.save_panel = panel
            real_fit = exem.module.fit_from_datamodule

            def fit(*args, **kwargs):
                self.record(event="content_fit")
                return real_fit(*args, **kwargs)

            exem.module.fit_from_datamodule = fit
            io = trainer.strategy.checkpoint_io
            real_save = io.save_checkpoint

            def save(checkpoint, path, *args, **kwargs):
                self.record(event="write", what="checkpoint", path=str(path))
                return real_save(checkpoint, path, *args, **kwargs)

            io.save_checkpoint = save
            self.record(
                event="setup", world=trainer.world_size, io=type(io).__name__,
                loggers=[type(lg.experiment).__name__ for lg in trainer.loggers],
            )

        def on_train_start(self, trainer, pl_module) -> None:
            self.record(event="content_groups", groups=pl_module.content_groups.as_config())

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            sampler = trainer.train_dataloader.sampler
            dataset = trainer.datamodule.train_dataset
            ids = list(sampler.ids(sampler.epoch))
            origins = [dataset.sample_coords(i) for i in ids]
            self.record(event="epoch", epoch=trainer.current_epoch, sampler=type(sampler).__name__, ids=ids,
                        origins=[[o["lm"], o["em"]] for o in origins])

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.record(event="batch", lm=[digest(x) for x in batch["lm"]], em=[digest(x) for x in batch["em"]])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            state = pl_module.state_dict()
            h = hashlib.sha1()
            for key in sorted(state):
                if key.startswith(("G_AB.", "G_BA.", "D_A.", "D_B.")):
                    h.update(key.encode())
                    h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
            self.record(event="step", batch_step=pl_module.batch_step, weights=h.hexdigest())
    '''
)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_two_process_ddp_agrees_shards_and_writes_once(synthetic_dir: Path, tmp_path: Path) -> None:
    probe_dir = tmp_path / "probe_module"
    probe_dir.mkdir()
    (probe_dir / "exem_ddp_probe.py").write_text(PROBE)
    out_dir, run_dir = tmp_path / "events", tmp_path / "run"
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(probe_dir), env.get("PYTHONPATH")]))
    args = [
        *DEMO_FAST,
        "data.samples_per_epoch=8",  # 4 per rank: 2 batches of 2 per rank and epoch
        "data.patch_size=[4,32,32]",
        "model.generator.widths=[4,8,16]",
        "model.discriminator.base_filters=4",
        "trainer.max_steps=12",  # 4 batches = 2 epochs
        "callbacks.model_checkpoint.every_n_train_steps=6",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"+callbacks.probe={{_target_:exem_ddp_probe.Probe,out_dir:{out_dir}}}",
        f"paths.data_dir={synthetic_dir}",
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.run(
        [str(BIN / "exem-train"), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    ranks = [read(out_dir / f"rank{r}.jsonl") for r in (0, 1)]

    # set-up: two processes, each with exem's atomic checkpoint IO; a real logger only on rank 0
    setups = [[e for e in events if e["event"] == "setup"][0] for events in ranks]
    assert [s["world"] for s in setups] == [2, 2]
    assert {s["io"] for s in setups} == {"AtomicCheckpointIO"}
    assert setups[0]["loggers"] == ["ExperimentWriter"] and setups[1]["loggers"] == ["_DummyExperiment"]

    # rank 0 alone fits the content groups; every rank trains with its fit
    fits = [[e for e in events if e["event"] == "content_fit"] for events in ranks]
    assert [len(f) for f in fits] == [1, 0]
    groups = [[e["groups"] for e in events if e["event"] == "content_groups"] for events in ranks]
    assert len(groups[0]) == 1 and groups[0] == groups[1]

    # the ranks agree on all weights after every step
    steps = [[(e["batch_step"], e["weights"]) for e in events if e["event"] == "step"] for events in ranks]
    assert [s for s, _ in steps[0]] == [1, 2, 3, 4]
    assert steps[0] == steps[1]
    assert len({w for _, w in steps[0]}) == 4  # and the weights do change

    # each rank draws other samples: no id, no patch origin and no patch content twice
    epochs = [[e for e in events if e["event"] == "epoch"] for events in ranks]
    assert all(e["sampler"] == "EpochSampler" for ep in epochs for e in ep)  # sharded by exem, not re-wrapped
    for e0, e1 in zip(*epochs, strict=True):
        assert e0["epoch"] == e1["epoch"] and len(e0["ids"]) == len(e1["ids"]) == 4
        assert not set(e0["ids"]) & set(e1["ids"])
        assert sorted(e0["ids"] + e1["ids"]) == list(range(8 * e0["epoch"], 8 * e0["epoch"] + 8))
        origins = [json.dumps(o) for o in e0["origins"] + e1["origins"]]
        assert len(set(origins)) == len(origins)
    patches = [d for events in ranks for e in events if e["event"] == "batch" for d in e["lm"] + e["em"]]
    assert len(patches) == 2 * 4 * 2 * 2  # ranks × batches × batch size × (A, B)
    assert len(set(patches)) == len(patches)

    # only rank 0 writes checkpoints and image panels
    writes = [[e for e in events if e["event"] == "write"] for events in ranks]
    assert writes[1] == []
    assert {w["what"] for w in writes[0]} == {"checkpoint", "panel"}
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "last.ckpt",
        "step00000006.ckpt",
        "step00000012.ckpt",
    ]
    csv_files = sorted(p.relative_to(run_dir) for p in run_dir.rglob("metrics.csv"))
    assert csv_files == [Path("csv/metrics.csv")]
    lines = (run_dir / "csv" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    step_col, loss_col = header.index("step"), header.index("train/G_total")
    logged = [ln.split(",")[step_col] for ln in lines[1:] if ln.split(",")[loss_col]]
    assert logged == ["0", "1", "2", "3"]  # one row per step: a single writer

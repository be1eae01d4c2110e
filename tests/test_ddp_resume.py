"""DDP training with replay pools resumes exactly: each rank gets its own pools back from the checkpoint (the state
dict holds only rank 0's). 2 processes (gloo, torchrun) on the CPU."""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch

from exem.replay import RANK_POOLS_KEY, ReplayBuffer, load_rank_pools, save_rank_pools
from tests.conftest import torchrun_ranks

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import hashlib, json, os, sys
    sys.path.insert(0, sys.argv[1])
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import DDPStrategy
    from torch.utils.data import DataLoader, Dataset
    from benchmarks.bench_train import SIZES, model_config
    from exem.module import ExEMModule

    out, batches, ckpt = sys.argv[2], int(sys.argv[3]), sys.argv[4]
    patch = (4, 32, 32)


    class RankPatches(Dataset):
        # one batch per epoch; each rank always trains on its own patches, whatever the order
        def __len__(self):
            return int(os.environ["WORLD_SIZE"])

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(int(os.environ["RANK"]))
            return {"lm": torch.rand((1, *patch), generator=g), "em": torch.rand((1, *patch), generator=g)}


    L.seed_everything(0)
    config = model_config(SIZES["tiny"], "fp32")
    config["replay_buffer_size"] = int(os.environ.get("TEST_REPLAY", "2"))
    module = ExEMModule(**config)
    # a checkpoint after the second batch (3 optimizer steps per batch), as a training run saves them
    saver = ModelCheckpoint(dirpath=out, filename="{step}", every_n_train_steps=6, save_top_k=-1)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(find_unused_parameters=True), max_steps=3 * batches,
        logger=False, callbacks=[saver], enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=DataLoader(RankPatches(), batch_size=1), ckpt_path=ckpt or None)
    digests = {"nets": hashlib.sha1(), "pools": hashlib.sha1()}
    for name, t in sorted(module.state_dict().items()):
        digests["pools" if name.startswith("pool_") else "nets"].update(
            name.encode() + t.detach().contiguous().numpy().tobytes()
        )
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
        json.dump({**{k: h.hexdigest() for k, h in digests.items()}, "batch_step": module.batch_step}, f)
    """
)


def train(tmp_path: Path, name: str, batches: int, ckpt: Path | None = None) -> list[dict]:
    out = tmp_path / name
    out.mkdir()
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    return torchrun_ranks(script, str(REPO), str(out), str(batches), str(ckpt or ""), out=out)


def test_ddp_training_with_replay_pools_resumes_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    whole = train(tmp_path, "whole", 4)
    ckpt = tmp_path / "whole" / "step=6.ckpt"  # after 2 of the 4 batches
    saved = torch.load(ckpt, weights_only=True)[RANK_POOLS_KEY]
    assert set(saved) == {"pool_A", "pool_B"} and saved["pool_A"].shape[0] == 2
    assert not torch.equal(
        saved["pool_A"][0], saved["pool_A"][1]
    )  # the ranks' pools differ (their own fakes)
    resumed = train(tmp_path, "resumed", 4, ckpt)
    assert resumed[0]["batch_step"] == whole[0]["batch_step"] == 4
    assert whole[0]["nets"] == whole[1]["nets"]  # the ranks agree on the weights
    assert resumed[0]["nets"] == resumed[1]["nets"] == whole[0]["nets"]
    assert [r["pools"] for r in resumed] == [r["pools"] for r in whole]  # each rank's own pools
    assert whole[0]["pools"] != whole[1]["pools"]


class FakeStrategy:
    """``all_gather`` of a 2-rank run in one process: this rank's tensor and a copy plus one as the other's."""

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        return torch.stack([t, t + 1])


def test_each_rank_loads_its_own_pool_and_another_world_size_wraps_around(caplog) -> None:
    pools = {"pool_A": ReplayBuffer(2), "pool_B": ReplayBuffer(2)}
    for pool in pools.values():
        pool(torch.zeros((2, 1, 1, 2, 2)))  # filled
    checkpoint: dict = {"state_dict": {"pool_A.images": pools["pool_A"].images.clone()}}
    save_rank_pools(checkpoint, pools, FakeStrategy(), world=2)
    for rank, value in ((0, 0.0), (1, 1.0)):
        copy = {**checkpoint, "state_dict": dict(checkpoint["state_dict"])}
        load_rank_pools(copy, rank, world=2)
        assert torch.equal(copy["state_dict"]["pool_A.images"], torch.full((2, 1, 1, 2, 2), value))
        assert torch.equal(copy["state_dict"]["pool_B.images"], torch.full((2, 1, 1, 2, 2), value))
    load_rank_pools(checkpoint, 2, world=3)  # rank 2 of 3: saved rank 0's
    assert torch.equal(checkpoint["state_dict"]["pool_A.images"], torch.zeros((2, 1, 1, 2, 2)))
    assert "does not continue the saved one exactly" not in caplog.text  # warned by rank 0 only
    load_rank_pools(checkpoint, 0, world=3)
    assert "come from 2 ranks and this run has 3" in caplog.text


def test_nothing_is_gathered_for_one_rank_or_pools_that_are_off() -> None:
    pools = {"pool_A": ReplayBuffer(0), "pool_B": ReplayBuffer(0)}
    checkpoint: dict = {}
    save_rank_pools(checkpoint, pools, FakeStrategy(), world=2)
    on = {"pool_A": ReplayBuffer(2)}
    on["pool_A"](torch.zeros((1, 1, 1, 2, 2)))
    save_rank_pools(checkpoint, on, FakeStrategy(), world=1)
    assert checkpoint == {}

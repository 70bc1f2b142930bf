"""The whole loop on an SDXL-family UNet (issue 17, item 4): teacher -> Lightning DMD2 LoRA student -> ComfyUI LoRA
file -> ComfyUI's own LoraLoaderModelOnly on the teacher checkpoint in ComfyUI's format -> FewstepSamplerDMD in a
real ComfyUI server == the core student's sample; the same student -> ONNX -> torch-free runtime == again.

The UNet is the smallest that ComfyUI's model detection accepts as SDXL-family (``real_archs.comfy_sdxl_config``:
60.6 M parameters, detected as KOALA_700M, an SDXL subclass), random-initialised. Its text conditioning is
precomputed embeddings (2048-wide tokens, a 1280 pooled embedding, SDXL's six size ids), given to ComfyUI by a
test-only node (``tests/comfy_nodes/fewstep_test_cond``) as CLIPTextEncodeSDXL would. The checkpoint is converted to
ComfyUI's (ldm) key names with ComfyUI's own ``comfy.utils.unet_to_diffusers`` map (the fixture's, not fewstep's).

Tolerances: the three paths run the same float32 weights but different kernels (ComfyUI's own UNet and attention
with the LoRA merged into the weights; diffusers with peft's separate LoRA matmuls; onnxruntime), so they agree to
float32 round-off through ~40 layers, not bit for bit: measured on ComfyUI 0.3.75, max |difference| / max |sample|
= 3.5e-7 (ComfyUI + LoRA vs core student), 3.9e-7 (teachers), 7.0e-7 (ONNX runtime vs core), with max |sample| 43.8.
The bound ``REL_TOL`` = 2e-5 leaves ~30x room for other kernels / thread counts and is still 3000x below what the
trained LoRA changes in the sample (6.1e-2, asserted > 10 x REL_TOL so the LoRA cannot be a no-op).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import real_archs as ra
import torch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TESTS = Path(__file__).resolve().parent
SEED = 1234
#: max |difference| / max |sample| allowed between two paths (float32 round-off through the UNet, see above)
REL_TOL = 2e-5


def _ldm_state_dict(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The diffusers UNet's weights under ComfyUI's (ldm) names, mapped with ComfyUI's own table."""
    import comfy.utils

    cfg = {"num_res_blocks": [1, 1, 1], "channel_mult": [1, 1, 1], "transformer_depth": [0, 2, 5],
           "transformer_depth_output": [0] * 6, "transformer_depth_middle": -2}
    table = comfy.utils.unet_to_diffusers(cfg)
    sd = net.state_dict()
    missing = sorted(k for k in sd if k not in table)
    assert not missing, f"ComfyUI's map lacks {missing[:5]}"
    return {"model.diffusion_model." + table[k]: v.detach().clone().contiguous() for k, v in sd.items()}


def _graph(cond_file: Path, lora: str | None) -> dict:
    model = ["1", 0]
    g = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": "teacher.safetensors", "weight_dtype": "default"}},
         "3": {"class_type": "FewstepTestConditioning", "inputs": {"path": str(cond_file), "width": 64, "height": 64}},
         "4": {"class_type": "FewstepSamplerDMD", "inputs": {}},
         "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}
    if lora:
        g["2"] = {"class_type": "LoraLoaderModelOnly",
                  "inputs": {"model": ["1", 0], "lora_name": lora, "strength_model": 1.0}}
        model = ["2", 0]
    g["5"] = {"class_type": "FewstepTimestepSchedule", "inputs": {"model": model, "timesteps": "999",
                                                                  "unit": "timestep"}}
    g["7"] = {"class_type": "SamplerCustom", "inputs": {
        "model": model, "add_noise": True, "noise_seed": SEED, "cfg": 1.0, "positive": ["3", 0],
        "negative": ["3", 0], "sampler": ["4", 0], "sigmas": ["5", 0], "latent_image": ["6", 0]}}
    g["8"] = {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "lora" if lora else "t"}}
    return g


def _comfy_sample(url: str, workdir: Path, graph: dict, prefix: str) -> torch.Tensor:
    import comfy_client
    from safetensors.torch import load_file

    entry = comfy_client.run(url, graph, timeout=600)
    assert entry.get("status", {}).get("status_str") == "success", comfy_client.error_message(entry)
    files = sorted((workdir / "output").glob(f"{prefix}_*.latent"))
    assert files, f"SaveLatent wrote nothing under {workdir / 'output'}"
    return load_file(str(files[-1]))["latent_tensor"].float()


def test_train_export_comfyui_onnx_loop(comfy_root, tmp_path):
    import comfyui_env
    import diffusers
    import distill_tiny
    from safetensors.torch import save_file

    from fewstep.callbacks import DMD2Distillation, OnnxExport, StudentExport
    from fewstep.core.conditioning import cond_index
    from fewstep.core.export.runtime import OnnxDenoiser, generate
    from fewstep.core.models.diffusers_adapters import diffusers_denoiser
    from fewstep.core.sampling.samplers import get_sampler

    # ---- the teacher and its ComfyUI-format checkpoint
    torch.manual_seed(0)
    net = ra._structure(diffusers.UNet2DConditionModel(**ra.comfy_sdxl_config()), 0)
    assert 55e6 < ra.n_params(net) < 65e6
    workdir = tmp_path / "comfy"
    (workdir / "models" / "diffusion_models").mkdir(parents=True)
    (workdir / "models" / "loras").mkdir(parents=True)
    save_file(_ldm_state_dict(net), str(workdir / "models" / "diffusion_models" / "teacher.safetensors"))
    teacher = diffusers_denoiser(net)
    pool, null = ra.sdxl_pool(2, 2048, 1280, 4, 8, seed=0)

    # ---- Lightning DMD2 with a peft LoRA student on the text embeddings, exported by the callbacks
    module = DMD2Distillation(teacher, (4, 8, 8), student="lora", lora_rank=4, guidance_scale=2.0, critic_ratio=1,
                              num_classes=None, cond_pool=pool, null=null, batch_size=1, lr=2e-2, seed=0)
    export = StudentExport(tmp_path / "student.safetensors")
    onnx_cb = OnnxExport(tmp_path / "student.onnx", weights="last", verify=False)
    distill_tiny.trainer(module, 2, callbacks=[export, onnx_cb]).fit(module)
    lora_file = next(p for p in export.written if p.name.endswith("_lora.safetensors"))
    from safetensors import safe_open

    with safe_open(str(lora_file), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("lora_unet_") for k in keys), keys[:3]
    (workdir / "models" / "loras" / "student_lora.safetensors").symlink_to(lora_file)

    # ---- the core student's (and teacher's) one-step sample from ComfyUI's noise for SEED
    c = cond_index(pool, [0])
    cond_file = tmp_path / "cond.safetensors"
    save_file({"encoder_hidden_states": c["encoder_hidden_states"].contiguous(),
               "text_embeds": c["text_embeds"].contiguous()}, str(cond_file))
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(SEED))  # comfy.sample.prepare_noise
    ms = module.model_sampling
    sigmas = torch.tensor([float(ms.sigma_max), 0.0])
    x = ms.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), max_denoise=True)
    with torch.no_grad():
        core = get_sampler("dmd")(module.student, x, sigmas, extra_args=dict(c), disable=True)
        core_teacher = get_sampler("dmd")(module.teacher, x, sigmas, extra_args=dict(c), disable=True)
    scale = float(core.abs().max())
    lora_effect = float((core - core_teacher).abs().max()) / scale
    assert lora_effect > 10 * REL_TOL, f"the trained LoRA changes the sample by only {lora_effect:.2e} (relative)"

    # ---- ComfyUI: UNETLoader -> LoraLoaderModelOnly -> FewstepSamplerDMD in SamplerCustom, on a real server
    nodes = {"fewstep": TESTS.parent, "fewstep_test_cond": TESTS / "comfy_nodes" / "fewstep_test_cond"}
    with comfyui_env.comfyui_server(comfy_root, custom_nodes=nodes, workdir=workdir) as url:
        comfy_student = _comfy_sample(url, workdir, _graph(cond_file, "student_lora.safetensors"), "lora")
        comfy_teacher = _comfy_sample(url, workdir, _graph(cond_file, None), "t")
    sdxl_scale = 0.13025  # ComfyUI's SDXL latent format: the saved latent is the model-space sample / 0.13025
    d_student = float((comfy_student * sdxl_scale - core).abs().max()) / scale
    d_teacher = float((comfy_teacher * sdxl_scale - core_teacher).abs().max()) / scale
    print(f"\nloop: lora effect {lora_effect:.3e}, comfy-core student {d_student:.3e}, teacher {d_teacher:.3e} "
          f"(relative to max |x0| = {scale:.3f})", file=sys.stderr)
    assert d_teacher < REL_TOL, f"ComfyUI's teacher differs from the core teacher by {d_teacher:.2e}"
    assert d_student < REL_TOL, f"ComfyUI + LoRA differs from the core student by {d_student:.2e}"

    # ---- ONNX: the student exported by OnnxExport, sampled by the torch-free runtime
    model = OnnxDenoiser(onnx_cb.result.path)
    onnx_x = generate(model, cond={k: v.numpy() for k, v in c.items()}, noise=noise.numpy(),
                      sigmas=sigmas.numpy(), sampler="dmd")
    d_onnx = float((torch.from_numpy(onnx_x) - core).abs().max()) / scale
    print(f"loop: onnx-core student {d_onnx:.3e}", file=sys.stderr)
    assert d_onnx < REL_TOL, f"the ONNX runtime's student differs from the core student by {d_onnx:.2e}"
    for big in (onnx_cb.result.path, tmp_path / "student.safetensors",
                workdir / "models" / "diffusion_models" / "teacher.safetensors"):  # ~240 MB each; pytest keeps tmp dirs
        Path(big).unlink(missing_ok=True)

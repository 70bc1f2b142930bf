"""fewstep's example workflows: their API-format definitions, and the frontend round trip that makes the UI format.

``workflows/api/<name>.json`` (API format, what ``POST /prompt`` takes) is generated from the graphs below;
``workflows/<name>.json`` (UI format, what ComfyUI's template browser lists from a pack's ``workflows/`` folder and
the frontend loads) is made by the ComfyUI frontend itself: it loads the API graph (``app.loadApiJson``, which also
lays it out) and serialises it (``app.graph.serialize()``), so the UI files match the frontend version exactly.
``<name>.jpg`` next to a UI workflow is its thumbnail in the template browser (digits workflows: their own output).

Regenerate everything (needs the ComfyUI fixture, Debian ``chromium`` and ``pip install playwright``)::

    python tests/workflow_tools.py                  # API + UI + thumbnails (starts its own server)
    python tests/workflow_tools.py --api-only       # API files only (no browser)
    python tests/workflow_tools.py --ui-only URL    # API + UI from a running server, thumbnails kept
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO_ROOT / "workflows"
API_DIR = WORKFLOWS / "api"
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


class Graph:
    """A tiny API-format graph builder: ``g.add(class_type, title, **inputs)`` returns the node id."""

    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, Any]] = {}

    def add(self, class_type: str, title: str | None = None, **inputs: Any) -> str:
        nid = str(len(self.nodes) + 1)
        self.nodes[nid] = {"inputs": inputs, "class_type": class_type}
        if title:  # without one the frontend shows the node's display name
            self.nodes[nid]["_meta"] = {"title": title}
        return nid

    @staticmethod
    def out(nid: str, index: int = 0) -> list:
        return [nid, index]


# --------------------------------------------------------------------------------------- embedded (CPU, CI)

TEACHER = "digits_dit_teacher"


def _digits(name: str, digit: int, seed: int, sampler: tuple[str, dict], sigmas: tuple[str, dict] | None,
            cfg: float = 2.0, batch: int = 8, second_model: str | None = None,
            patches: list[tuple[str, str, dict]] = (), model_name: str = TEACHER) -> dict:
    """A digits graph: loader -> ``patches`` (each ``(class_type, title, inputs)``, a node taking ``model`` and
    giving a MODEL first) -> CFGGuider -> SamplerCustomAdvanced -> image."""
    g, o = Graph(), Graph.out
    short = model_name.removeprefix("digits_").removeprefix("dit_")
    model = g.add("FewstepDigitsModelLoader", f"Digits model ({short})", model_name=model_name)
    for class_type, title, inputs in patches:
        model = g.add(class_type, title, model=o(model), **inputs)
    cond = g.add("FewstepDigitsClassCondition", f"Digit {digit}", digit=digit)
    latent = g.add("FewstepDigitsEmptyLatent", "Empty digits latent", batch_size=batch)
    guider = g.add("CFGGuider", "CFG guider", model=o(model), positive=o(cond, 0), negative=o(cond, 1), cfg=cfg)
    noise = g.add("RandomNoise", "Noise", noise_seed=seed)
    s_type, s_inputs = sampler
    if second_model:
        distilled = g.add("FewstepDigitsModelLoader", f"Distilled model ({second_model.removeprefix('digits_')})",
                          model_name=second_model)
        s_inputs = {"distilled_model": o(distilled), **s_inputs}
    samp = g.add(s_type, None, **s_inputs)
    if sigmas is None:  # schedule search
        sig = g.add("FewstepScheduleSearch", "Schedule search", model=o(model), positive=o(cond, 0),
                    negative=o(cond, 1), latent_image=o(latent), sampler_name="euler", nfe=4, cfg=cfg, seed=0,
                    search_batch=2, grid_size=8, refine_rounds=0, reference_substeps=2)
        g.add("PreviewAny", "Search report", source=o(sig, 1))
    else:
        sig = g.add(sigmas[0], None, **{"model": o(model), **sigmas[1]})
    out = g.add("SamplerCustomAdvanced", "Sample", noise=o(noise), guider=o(guider), sampler=o(samp),
                sigmas=o(sig, 0), latent_image=o(latent))
    img = g.add("FewstepDigitsLatentToImage", "Digits to image", samples=o(out, 0), scale=4)
    g.add("SaveImage", "Save", images=o(img), filename_prefix=f"fewstep/{name}")
    return g.nodes


FOUR_STEPS = ("FewstepTimestepSchedule", {"timesteps": "999,749,499,249", "unit": "timestep"})
#: the shipped students (``core/models/weights/digits_dit_*.json``) and the timesteps they were distilled for
CONSISTENCY_4 = "digits_consistency_4step"
CONSISTENCY_4_STEPS = "999,749.25,499.5,249.75"
DMD2_1 = "digits_dmd2_1step"
KARRAS_8 = ("BasicScheduler", {"scheduler": "karras", "steps": 8, "denoise": 1.0})


def embedded_workflows() -> dict[str, dict]:
    """Workflows on the embedded digits model: one per node family, all run on a CPU with no download."""
    return {**sampler_workflows(), **cache_workflows(), **attention_workflows(), **guidance_workflows(),
            **onnx_workflows()}


KARRAS_24 = ("BasicScheduler", {"scheduler": "karras", "steps": 24, "denoise": 1.0})


def cache_workflows() -> dict[str, dict]:
    """Cache nodes (nodes/caches.py) on the embedded model: the teacher at 24 dpmpp_2m/karras steps with EasyCache
    on the whole network (about half the model calls skipped) and First-Block-Cache on its blocks."""
    dpmpp_2m = ("KSamplerSelect", {"sampler_name": "dpmpp_2m"})
    common = {"forecast": "none", "start_percent": 0.0, "end_percent": 1.0, "max_skips": 0, "calibration": "auto"}
    step = ("FewstepStepCache", "Step cache (EasyCache)",
            {"method": "easycache", "threshold": 0.2, "cfg_reuse": 0.0, **common})
    block = ("FewstepBlockCache", "Block cache (First-Block-Cache)",
             {"method": "first_block", "threshold": 0.2, "head_blocks": 1, "interval": 2, "delta_blocks": 0,
              "boundary": 0.5, **common})
    return {
        "fewstep_digits_step_cache": _digits("fewstep_digits_step_cache", 2, 21, dpmpp_2m, KARRAS_24,
                                             patches=[step]),
        "fewstep_digits_block_cache": _digits("fewstep_digits_block_cache", 6, 22, dpmpp_2m, KARRAS_24,
                                              patches=[block]),
    }


def attention_workflows() -> dict[str, dict]:
    """Sparse-attention node (nodes/attention.py) on the embedded model: 16-token blocks (4x4 tiles of its 8x8
    token grid), the first 25% of the steps dense."""
    def sparse(pattern: str, density: float) -> tuple[str, str, dict]:
        return ("FewstepSparseAttention", f"Sparse attention ({pattern.replace('_', ' ')})",
                {"pattern": pattern, "density": density, "mass": 0.9, "block_size": 16, "dense_first_percent": 25.0,
                 "self_attention_only": True, "backend": "auto"})

    return {
        "fewstep_digits_sparse_attention_sliding_tile": _digits(
            "fewstep_digits_sparse_attention_sliding_tile", 5, 11,
            ("FewstepSamplerTeacher", {"sampler_name": "uni_pc"}), KARRAS_8, patches=[sparse("sliding_tile", 0.5)]),
        "fewstep_digits_sparse_attention_top_k": _digits(
            "fewstep_digits_sparse_attention_top_k", 6, 12,
            ("FewstepSamplerTeacher", {"sampler_name": "uni_pc"}), KARRAS_8, patches=[sparse("top_k", 0.5)]),
    }


AGD_ADAPTER = "digits_agd_adapter.safetensors"


def guidance_workflows() -> dict[str, dict]:
    """Guidance-adapter node (nodes/guidance.py) on the embedded model: guidance by the shipped AGD adapter, so the
    guider runs at cfg 1 (one model pass per step)."""
    return {
        "fewstep_digits_guidance_adapter": _digits(
            "fewstep_digits_guidance_adapter", 4, 13, ("FewstepSamplerTeacher", {"sampler_name": "dpmpp_2m"}),
            KARRAS_8, cfg=1.0,
            patches=[("FewstepGuidanceAdapterLoader", "Guidance adapter (AGD)",
                      {"adapter_name": AGD_ADAPTER, "guidance_scale": 2.0})]),
    }


def onnx_workflows() -> dict[str, dict]:
    """ONNX export / loader nodes (nodes/onnx.py) on the embedded model: export a digits MODEL to ONNX and sample the
    written file in the same prompt (the export node's path feeds the loader's ``path`` input, so the file need not
    exist when the prompt is submitted), on onnxruntime."""

    def exported(name: str, model_name: str, digit: int, seed: int, sampler: tuple[str, dict],
                 sigmas: tuple[str, dict], export: dict, cfg: float = 1.0, batch: int = 8) -> dict:
        g, o = Graph(), Graph.out
        short = model_name.removeprefix("digits_").removeprefix("dit_")
        torch_model = g.add("FewstepDigitsModelLoader", f"Digits model ({short})", model_name=model_name)
        sig = g.add(sigmas[0], None, **{"model": o(torch_model), **sigmas[1]})
        path = g.add("FewstepOnnxExport", "Export to ONNX", model=o(torch_model),
                     filename_prefix=f"fewstep/onnx/{short}", sigmas=o(sig), **export)
        model = g.add("FewstepOnnxLoader", "Load the ONNX file", onnx_name="from path input", path=o(path),
                      guidance_scale=0.0, threads=0)
        cond = g.add("FewstepDigitsClassCondition", f"Digit {digit}", digit=digit)
        latent = g.add("FewstepDigitsEmptyLatent", "Empty digits latent", batch_size=batch)
        guider = g.add("CFGGuider", "CFG guider", model=o(model), positive=o(cond, 0), negative=o(cond, 1), cfg=cfg)
        noise = g.add("RandomNoise", "Noise", noise_seed=seed)
        samp = g.add(sampler[0], None, **sampler[1])
        out = g.add("SamplerCustomAdvanced", "Sample (onnxruntime)", noise=o(noise), guider=o(guider),
                    sampler=o(samp), sigmas=o(sig, 0), latent_image=o(latent))
        img = g.add("FewstepDigitsLatentToImage", "Digits to image", samples=o(out, 0), scale=4)
        g.add("SaveImage", "Save", images=o(img), filename_prefix=f"fewstep/{name}")
        return g.nodes

    student = ("FewstepTimestepSchedule", {"timesteps": CONSISTENCY_4_STEPS, "unit": "timestep"})
    return {
        # the shipped 4-step consistency student, with its distilled timesteps recorded in the file
        "fewstep_digits_onnx_student": exported(
            "fewstep_digits_onnx_student", CONSISTENCY_4, 4, 31, ("FewstepSamplerFlowMap", {}), student,
            {"sampler": "euler", "schedule": "from sigmas input", "steps": 4, "cfg": 1.0, "fp16": False}),
        # the teacher with classifier-free guidance 2 folded into the graph: one ONNX call per step at cfg 1
        "fewstep_digits_onnx_teacher_cfg": exported(
            "fewstep_digits_onnx_teacher_cfg", TEACHER, 5, 32, ("FewstepSamplerTeacher", {"sampler_name": "uni_pc"}),
            KARRAS_8, {"sampler": "dpmpp_2m", "schedule": "from sigmas input", "steps": 8, "cfg": 2.0,
                       "fp16": False}),
    }


def sampler_workflows() -> dict[str, dict]:
    """Sampler and schedule nodes on the embedded model."""
    return {
        "fewstep_digits_lcm": _digits("fewstep_digits_lcm", 3, 1, ("FewstepSamplerLCM", {}), FOUR_STEPS),
        "fewstep_digits_tcd": _digits("fewstep_digits_tcd", 7, 2, ("FewstepSamplerTCD", {"gamma": 0.3}), FOUR_STEPS),
        "fewstep_digits_dmd": _digits("fewstep_digits_dmd", 5, 3, ("FewstepSamplerDMD", {}), FOUR_STEPS),
        "fewstep_digits_flow_map": _digits("fewstep_digits_flow_map", 1, 4, ("FewstepSamplerFlowMap", {}), KARRAS_8),
        "fewstep_digits_onestep": _digits("fewstep_digits_onestep", 0, 5, ("FewstepSamplerOneStep", {}),
                                          ("FewstepTimestepSchedule", {"timesteps": "999", "unit": "timestep"})),
        "fewstep_digits_hybrid": _digits(
            "fewstep_digits_hybrid", 8, 6,
            ("FewstepSamplerHybrid", {"base_steps": 2, "base_sampler": "euler", "distilled_sampler": "flow_map",
                                      "distilled_cfg": 1.0}),
            ("FewstepTimestepSchedule", {"timesteps": f"999,874,{CONSISTENCY_4_STEPS.split(',', 1)[1]}",
                                         "unit": "timestep"}),
            second_model=CONSISTENCY_4),
        # the shipped students alone: guidance is distilled in, so cfg 1 (one model pass per step)
        "fewstep_digits_student_consistency_4step": _digits(
            "fewstep_digits_student_consistency_4step", 4, 9, ("FewstepSamplerFlowMap", {}),
            ("FewstepTimestepSchedule", {"timesteps": CONSISTENCY_4_STEPS, "unit": "timestep"}), cfg=1.0,
            model_name=CONSISTENCY_4),
        "fewstep_digits_student_dmd2_1step": _digits(
            "fewstep_digits_student_dmd2_1step", 9, 10, ("FewstepSamplerOneStep", {}),
            ("FewstepTimestepSchedule", {"timesteps": "999", "unit": "timestep"}), cfg=1.0, model_name=DMD2_1),
        "fewstep_digits_teacher_uni_pc": _digits("fewstep_digits_teacher_uni_pc", 2, 7,
                                                 ("FewstepSamplerTeacher", {"sampler_name": "uni_pc"}), KARRAS_8),
        "fewstep_digits_schedule_search": _digits("fewstep_digits_schedule_search", 6, 8,
                                                  ("FewstepSamplerTeacher", {"sampler_name": "euler"}), None),
    }


# ---------------------------------------------------------------------------- SD1.5 / SDXL / Flux templates


def _text_to_image(name: str, loader: dict, sampler: tuple[str, dict], sigmas: tuple[str, dict], cfg: float,
                   size: int, prompt: str, lora: str | None = None, negative: str = "blurry, low quality",
                   hybrid_lora: str | None = None) -> dict:
    g, o = Graph(), Graph.out
    if loader["kind"] == "checkpoint":
        ckpt = g.add("CheckpointLoaderSimple", "Load checkpoint", ckpt_name=loader["ckpt"])
        model, clip, vae = o(ckpt, 0), o(ckpt, 1), o(ckpt, 2)
    else:  # flux: separate diffusion model, text encoders and VAE
        model = o(g.add("UNETLoader", "Load diffusion model", unet_name=loader["unet"], weight_dtype="default"))
        clip = o(g.add("DualCLIPLoader", "Load text encoders", clip_name1=loader["t5"], clip_name2=loader["clip_l"],
                       type="flux", device="default"))
        vae = o(g.add("VAELoader", "Load VAE", vae_name=loader["vae"]))
    base_model = model
    if lora:
        model = o(g.add("LoraLoaderModelOnly", "Distillation LoRA", model=model, lora_name=lora, strength_model=1.0))
    pos = g.add("CLIPTextEncode", "Prompt", text=prompt, clip=clip)
    neg = g.add("CLIPTextEncode", "Negative prompt", text=negative, clip=clip)
    positive = o(pos)
    if loader["kind"] == "flux":
        positive = o(g.add("FluxGuidance", "Flux guidance", conditioning=positive, guidance=loader.get("guidance",
                                                                                                       3.5)))
    latent_node = "EmptySD3LatentImage" if loader["kind"] == "flux" else "EmptyLatentImage"
    latent = g.add(latent_node, "Empty latent", width=size, height=size, batch_size=1)
    guider = g.add("CFGGuider", "CFG guider (base model)" if hybrid_lora else "CFG guider", model=model,
                   positive=positive, negative=o(neg), cfg=cfg)
    noise = g.add("RandomNoise", "Noise", noise_seed=42)
    s_type, s_inputs = sampler
    if hybrid_lora:  # the guider's (base) model samples the first steps, the LoRA-distilled model the rest
        distilled = g.add("LoraLoaderModelOnly", "Distilled model (LoRA)", model=base_model, lora_name=hybrid_lora,
                          strength_model=1.0)
        s_inputs = {"distilled_model": o(distilled), **s_inputs}
    samp = g.add(s_type, None, **s_inputs)
    if sigmas[0] == "FewstepScheduleSearch":
        sig = g.add("FewstepScheduleSearch", "Schedule search", model=model, positive=positive, negative=o(neg),
                    latent_image=o(latent), **sigmas[1])
        g.add("PreviewAny", "Search report", source=o(sig, 1))
    else:
        sig = g.add(sigmas[0], None, model=model, **sigmas[1])
    out = g.add("SamplerCustomAdvanced", "Sample", noise=o(noise), guider=o(guider), sampler=o(samp),
                sigmas=o(sig, 0), latent_image=o(latent))
    img = g.add("VAEDecode", "Decode", samples=o(out, 0), vae=vae)
    g.add("SaveImage", "Save", images=o(img), filename_prefix=f"fewstep/{name}")
    return g.nodes


@dataclass(frozen=True)
class ModelFile:
    """A public model file the templates name: ``name`` as ComfyUI lists it (relative to its models folder, i.e.
    ``huggingface-cli download <repo> <file> --local-dir models/<folder>[/<subfolder>]``), where it comes from."""

    name: str
    folder: str
    repo: str
    file: str


#: every model file the SD1.5 / SDXL / Flux templates name: published Hugging Face files, unrenamed (the two
#: LoRAs published as pytorch_lora_weights.safetensors sit in a subfolder named after their repository)
MODEL_FILES: dict[str, ModelFile] = {
    "sd15": ModelFile("v1-5-pruned-emaonly-fp16.safetensors", "checkpoints", "Comfy-Org/stable-diffusion-v1-5-archive",
                      "v1-5-pruned-emaonly-fp16.safetensors"),
    "sdxl": ModelFile("sd_xl_base_1.0.safetensors", "checkpoints", "stabilityai/stable-diffusion-xl-base-1.0",
                      "sd_xl_base_1.0.safetensors"),
    "lcm_lora_sd15": ModelFile("lcm-lora-sdv1-5/pytorch_lora_weights.safetensors", "loras",
                               "latent-consistency/lcm-lora-sdv1-5", "pytorch_lora_weights.safetensors"),
    "tcd_lora_sdxl": ModelFile("TCD-SDXL-LoRA/pytorch_lora_weights.safetensors", "loras", "h1t/TCD-SDXL-LoRA",
                               "pytorch_lora_weights.safetensors"),
    "dmd2_lora_sdxl": ModelFile("dmd2_sdxl_4step_lora_fp16.safetensors", "loras", "tianweiy/DMD2",
                                "dmd2_sdxl_4step_lora_fp16.safetensors"),
    "flux_schnell": ModelFile("flux1-schnell.safetensors", "diffusion_models", "black-forest-labs/FLUX.1-schnell",
                              "flux1-schnell.safetensors"),
    "flux_dev": ModelFile("flux1-dev.safetensors", "diffusion_models", "black-forest-labs/FLUX.1-dev",
                          "flux1-dev.safetensors"),
    "t5xxl": ModelFile("t5xxl_fp8_e4m3fn.safetensors", "text_encoders", "comfyanonymous/flux_text_encoders",
                       "t5xxl_fp8_e4m3fn.safetensors"),
    "clip_l": ModelFile("clip_l.safetensors", "text_encoders", "comfyanonymous/flux_text_encoders",
                        "clip_l.safetensors"),
    "flux_vae": ModelFile("ae.safetensors", "vae", "black-forest-labs/FLUX.1-schnell", "ae.safetensors"),
}
SD15 = {"kind": "checkpoint", "ckpt": MODEL_FILES["sd15"].name}
SDXL = {"kind": "checkpoint", "ckpt": MODEL_FILES["sdxl"].name}
FLUX_SCHNELL = {"kind": "flux", "unet": MODEL_FILES["flux_schnell"].name, "t5": MODEL_FILES["t5xxl"].name,
                "clip_l": MODEL_FILES["clip_l"].name, "vae": MODEL_FILES["flux_vae"].name}
FLUX_DEV = {**FLUX_SCHNELL, "unet": MODEL_FILES["flux_dev"].name, "guidance": 3.5}
PROMPT = "a photo of a red fox in the snow, detailed fur, soft morning light"


def template_workflows() -> dict[str, dict]:
    """The same graphs for SD1.5 / SDXL / Flux users (need their checkpoints; not run in CI)."""
    return {
        "fewstep_sd15_lcm_lora": _text_to_image(
            "fewstep_sd15_lcm_lora", SD15, ("FewstepSamplerLCM", {}),
            ("FewstepTimestepSchedule", {"timesteps": "999,759,499,259", "unit": "timestep"}), 1.5, 512, PROMPT,
            lora=MODEL_FILES["lcm_lora_sd15"].name),
        "fewstep_sdxl_dmd2_4step": _text_to_image(
            "fewstep_sdxl_dmd2_4step", SDXL, ("FewstepSamplerDMD", {}),
            ("FewstepTimestepSchedule", {"timesteps": "999,749,499,249", "unit": "timestep"}), 1.0, 1024, PROMPT,
            lora=MODEL_FILES["dmd2_lora_sdxl"].name),
        "fewstep_sdxl_tcd_lora": _text_to_image(
            "fewstep_sdxl_tcd_lora", SDXL, ("FewstepSamplerTCD", {"gamma": 0.3}),
            ("FewstepTimestepSchedule", {"timesteps": "999,759,499,259", "unit": "timestep"}), 1.0, 1024, PROMPT,
            lora=MODEL_FILES["tcd_lora_sdxl"].name),
        "fewstep_sdxl_hybrid_base_to_dmd2": _text_to_image(
            "fewstep_sdxl_hybrid_base_to_dmd2", SDXL,
            ("FewstepSamplerHybrid", {"base_steps": 2, "base_sampler": "dpmpp_2m", "distilled_sampler": "dmd",
                                      "distilled_cfg": 1.0}),
            ("FewstepTimestepSchedule", {"timesteps": "999,899,749,499,249", "unit": "timestep"}), 5.0, 1024,
            PROMPT, hybrid_lora=MODEL_FILES["dmd2_lora_sdxl"].name),
        "fewstep_flux_schnell_any_step": _text_to_image(
            "fewstep_flux_schnell_any_step", FLUX_SCHNELL, ("FewstepSamplerFlowMap", {}),
            ("BasicScheduler", {"scheduler": "simple", "steps": 4, "denoise": 1.0}), 1.0, 1024, PROMPT),
        "fewstep_flux_dev_schedule_search": _text_to_image(
            "fewstep_flux_dev_schedule_search", FLUX_DEV, ("FewstepSamplerTeacher", {"sampler_name": "euler"}),
            ("FewstepScheduleSearch", {"sampler_name": "euler", "nfe": 8, "cfg": 1.0, "seed": 0, "search_batch": 2,
                                       "grid_size": 24, "refine_rounds": 1, "reference_substeps": 4}),
            1.0, 1024, PROMPT),
    }


def all_workflows() -> dict[str, dict]:
    return {**embedded_workflows(), **template_workflows()}


def write_api(directory: Path = API_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, graph in all_workflows().items():
        path = directory / f"{name}.json"
        path.write_text(json.dumps(graph, indent=2) + "\n")
        paths.append(path)
    return paths


def load_api(name: str) -> dict:
    return json.loads((API_DIR / f"{name}.json").read_text())


def is_embedded(graph: dict) -> bool:
    """Runs on the embedded model alone (CPU, no download)?"""
    return any(n["class_type"] == "FewstepDigitsModelLoader" for n in graph.values())


def requested(graph: dict) -> tuple[int, int]:
    """(digit, batch size) an embedded workflow asks for."""
    digit = next(n["inputs"]["digit"] for n in graph.values() if n["class_type"] == "FewstepDigitsClassCondition")
    batch = next(n["inputs"]["batch_size"] for n in graph.values() if n["class_type"] == "FewstepDigitsEmptyLatent")
    return digit, batch


# ----------------------------------------------------------------------------------------------- frontend


def chromium_path() -> str | None:
    import shutil

    for cand in CHROMIUM_CANDIDATES:
        if Path(cand).exists():
            return cand
    return shutil.which("chromium")


WAIT_APP_JS = "() => !!(window.app && window.app.graph && window.LiteGraph && " \
              "LiteGraph.registered_node_types['FewstepSamplerLCM'])"

API_TO_UI_JS = """async ([api, name]) => {
  await window.app.loadApiJson(api, name);
  for (const node of window.app.graph._nodes) {
    for (const w of node.widgets ?? []) {
      if (w.name === 'control_after_generate') w.value = 'fixed';  // examples keep their seeds
    }
  }
  return JSON.stringify(window.app.graph.serialize());  // JSON drops undefined (playwright would send null)
}"""

UI_TO_API_JS = """async (ui) => {
  await window.app.loadGraphData(ui, true, true, 'roundtrip');
  const p = await window.app.graphToPrompt();
  return JSON.stringify(p.output);
}"""


def open_app(page: Any, url: str, timeout_ms: float = 90_000) -> None:
    page.goto(url, wait_until="domcontentloaded", timeout=timeout_ms)
    page.wait_for_function(WAIT_APP_JS, timeout=timeout_ms)


def api_to_ui(page: Any, api: dict, name: str) -> dict:
    return json.loads(page.evaluate(API_TO_UI_JS, [api, name]))


def ui_to_api(page: Any, ui: dict) -> dict:
    return json.loads(page.evaluate(UI_TO_API_JS, ui))


def strip_meta(api: dict) -> dict:
    """API graph without titles (``_meta``), for comparisons."""
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}


def _thumbnail(images: list[Path], out: Path, cols: int = 2, size: int = 256) -> None:
    """A square grid of a workflow's first output images as its template-browser thumbnail."""
    from PIL import Image

    tiles = [Image.open(p).convert("RGB") for p in images[: cols * cols]]
    w, h = tiles[0].size
    grid = Image.new("RGB", (cols * w, cols * h))
    for i, tile in enumerate(tiles):
        grid.paste(tile, ((i % cols) * w, (i // cols) * h))
    grid.resize((size, size), Image.NEAREST).save(out, quality=92)


def _make_ui(url: str, thumbs: dict[str, list[Path]]) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        open_app(page, url)
        for name, graph in all_workflows().items():
            ui = api_to_ui(page, graph, name)
            (WORKFLOWS / f"{name}.json").write_text(json.dumps(ui, indent=2) + "\n")
            if name in thumbs:
                _thumbnail(thumbs[name], WORKFLOWS / f"{name}.jpg")
        browser.close()


def _main(argv: list[str]) -> int:
    unknown = [a for a in argv if a.startswith("-") and a not in ("--api-only", "--ui-only")]
    if unknown or ("--ui-only" in argv and argv.index("--ui-only") + 1 >= len(argv)):
        print(__doc__)
        return 0 if set(unknown) <= {"-h", "--help"} else 2
    paths = write_api()
    print(f"wrote {len(paths)} API workflows to {API_DIR}")
    if "--api-only" in argv:
        return 0
    if "--ui-only" in argv:
        _make_ui(argv[argv.index("--ui-only") + 1], {})
        print(f"wrote UI workflows to {WORKFLOWS}")
        return 0
    import tempfile
    import time
    import urllib.request

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import comfyui_env

    root = comfyui_env.ensure_comfyui()
    with tempfile.TemporaryDirectory(prefix="fewstep-wf-") as tmp, \
            comfyui_env.comfyui_server(root, custom_nodes={"fewstep": REPO_ROOT}, workdir=Path(tmp)) as url:
        thumbs: dict[str, list[Path]] = {}
        for name, graph in embedded_workflows().items():
            req = urllib.request.Request(f"{url}/prompt", data=json.dumps({"prompt": graph}).encode(),
                                         headers={"Content-Type": "application/json"})
            pid = json.load(urllib.request.urlopen(req))["prompt_id"]
            while True:
                hist = json.load(urllib.request.urlopen(f"{url}/history/{pid}"))
                if pid in hist and hist[pid]["status"].get("completed") is not None:
                    break
                time.sleep(0.5)
            images = [img for out in hist[pid]["outputs"].values() for img in out.get("images", [])]
            if images:
                thumbs[name] = [Path(tmp) / "output" / i["subfolder"] / i["filename"] for i in images]
        _make_ui(url, thumbs)
    print(f"wrote UI workflows and {len(thumbs)} thumbnails to {WORKFLOWS}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

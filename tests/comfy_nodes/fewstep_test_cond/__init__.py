"""A test-only ComfyUI node pack: CONDITIONING from precomputed SDXL embeddings in a safetensors file.

The whole-loop test (tests/test_real_loop.py) has no text encoder for its tiny SDXL-family UNet; this node turns the
file's ``encoder_hidden_states`` (1, L, 2048) and ``text_embeds`` (1, 1280) into the CONDITIONING that ComfyUI's
CLIPTextEncodeSDXL would make (cross-attention tokens plus ``pooled_output`` and the size/crop entries SDXL's
``encode_adm`` reads). Not part of fewstep.
"""

from safetensors.torch import load_file


class FewstepTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"path": ("STRING", {"default": ""}), "width": ("INT", {"default": 64}),
                             "height": ("INT", {"default": 64})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, path, width, height):
        t = load_file(path)
        extra = {"pooled_output": t["text_embeds"], "width": width, "height": height, "crop_w": 0, "crop_h": 0,
                 "target_width": width, "target_height": height}
        return ([[t["encoder_hidden_states"], extra]],)


NODE_CLASS_MAPPINGS = {"FewstepTestConditioning": FewstepTestConditioning}

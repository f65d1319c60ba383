"""Checkpoint files and folders -> flashstep models and LoRAs.

    unet = flashstep.load_model("sd-turbo", arch="unet", device="cuda", dtype=torch.float16)
    parts = load_components("v1-5-pruned-emaonly.safetensors")     # unet, vae, text_encoder
    spec = flashstep.load_lora("pytorch_lora_weights.safetensors")  # -> LoRASpec
    adapter = flashstep.load_lora("osediff.pkl")                    # -> OSEDiffAdapter

Layouts: diffusers pipeline and component folders, original single-file SD / SDXL checkpoints, bare
component files, Real-ESRGAN / SwinIR ``.pth``, peft / diffusers / kohya LoRAs, the OSEDiff and S3Diff
``.pkl``. Files are read with safetensors or ``torch.load(weights_only=True)``, never plain pickle;
every failure is a :class:`LoaderError` naming the file.
"""
from .adapters_pkl import DegradationMLPs, MLPWeights, OSEDiffAdapter, S3DiffAdapter
from .detect import ARCHS, Component, PathContents, inspect_path
from .files import LoaderError, read_file, read_state_dict
from .load_model import load_components, load_lora, load_model
from .lora_files import load_lora_components

__all__ = [
    "ARCHS", "Component", "DegradationMLPs", "LoaderError", "MLPWeights", "OSEDiffAdapter", "PathContents",
    "S3DiffAdapter", "inspect_path", "load_components", "load_lora", "load_lora_components", "load_model",
    "read_file", "read_state_dict",
]

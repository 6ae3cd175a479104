"""Interoperability with the diffusers ecosystem: LoRA files (export and import) for SD, SDXL, SD3 and FLUX
pipelines, merged checkpoints, LoRA approximations of other methods."""
from visionpeft.interop.diffusers_lora import FORMATS, LoraFactors, export_lora, lora_factors
from visionpeft.interop.lora_import import import_lora, read_lora_file
from visionpeft.interop.merged import export_lora_approximation, lora_approximation, save_merged

__all__ = ["FORMATS", "LoraFactors", "export_lora", "import_lora", "lora_factors", "read_lora_file",
           "export_lora_approximation", "lora_approximation", "save_merged"]

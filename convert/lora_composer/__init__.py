"""LoRA-Composer surgery: the region-aware attention processor (`processor.py`) and the loading of several
concept LoRAs into one U-Net (`adapters.py`).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/convert/test_lora_composer.py -q
"""

from athanor.convert.lora_composer.adapters import adapter_bytes, load_concept_adapters
from athanor.convert.lora_composer.processor import (
    ATTENTION_PROJECTIONS,
    LORA_FILE,
    Box,
    Composition,
    Region,
    RegionalAttnProcessor,
    attach,
    composed,
    detach,
)

__all__ = ["ATTENTION_PROJECTIONS", "LORA_FILE", "Box", "Composition", "Region", "RegionalAttnProcessor", "attach",
           "composed", "detach", "adapter_bytes", "load_concept_adapters"]

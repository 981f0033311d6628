"""SplitFT: adaptive federated split fine-tuning of LLMs with LoRA."""

import logging as _logging

__version__ = "0.1.0"

# PEFT imports bitsandbytes (client.base_dtype int8/nf4) when it is installed,
# and bitsandbytes' CPU backend then warns that it could not fetch an optional
# kernel from the Hugging Face hub (the `kernels` package): SplitFT never
# downloads at run time, so the warning only says what was meant.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

"""Model domain: loading LFM2-VL models and processors (Hub id or local folder), attaching and merging LoRA adapters."""

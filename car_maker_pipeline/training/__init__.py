"""Training domain: LoRA fine-tuning of LFM2-VL into a car-maker classifier (TRL SFTTrainer + PEFT)."""

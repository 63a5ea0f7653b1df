"""Fine-tuning and alignment: SFT, LoRA, DPO/IPO and distillation, on the one training loop."""

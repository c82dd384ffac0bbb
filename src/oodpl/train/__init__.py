"""Training stages: meta-training of the general reward model (metatrain) with its checkpoints, the Bradley-Terry
reward-model fit (rm_train), the field's reward models (field_rms) and the dpo baseline."""

"""apt: Adversarial Post-Training toolkit."""

"""`kubetune server`: the control plane — OpenAI's fine-tuning API and a dashboard over every run."""

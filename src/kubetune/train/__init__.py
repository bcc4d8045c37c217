"""Training: batch sizing, model + PEFT setup, Trainer wiring, callbacks, resume, torchrun launcher."""

"""After training: methods that improve or compress a generator that is already trained (guided distillation,
Neon). Each lives in its own module and runs through the shared trainer, sampler and pipeline."""

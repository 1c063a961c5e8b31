"""Denoising stage: inference engine and derived-series builder (imports torch; never used by receive)."""

"""Commands of the denoising core (placeholder until the denoising-core issue lands)."""

import argparse


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add no commands yet."""

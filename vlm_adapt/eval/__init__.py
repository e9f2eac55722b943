"""Evaluating a saved checkpoint on any dataset (`vlm-adapt eval`)."""

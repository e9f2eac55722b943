"""vlm_adapt: parameter-efficient adaptation of CLIP, every method run and measured the same way."""

__version__ = "0.1.0"

"""The synthetic shapes world: deterministic images, captions and CIR benchmarks in official layouts."""

from zscir.data.synthetic.writer import SynthConfig, generate_world, world_manifest

__all__ = ["SynthConfig", "generate_world", "world_manifest"]

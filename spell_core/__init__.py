"""spell_core: the SPELL self-play engine (model, sampler, roles, loop, trainer, CLI)."""
__version__ = "0.1.0"

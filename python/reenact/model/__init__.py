"""Encoders, correspondence, generator, discriminator and losses."""

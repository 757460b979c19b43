"""Thin Ray shells around the engines; `ray.remote` is applied in the wiring code (`sari_ray.actors.wiring`)."""

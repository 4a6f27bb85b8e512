"""Registered modules are imported by threestudio_mv.find()."""

"""Registered systems are imported by threestudio_mv.find()."""

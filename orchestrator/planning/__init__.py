"""From a config and checkpoint headers to a Plan: layout, vocabularies, compatibility. Pure."""

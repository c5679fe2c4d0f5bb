"""Shortcut discovery, flagging and attention prompting on a user's classifier (`spurious`, `flag`, `prompt`)."""

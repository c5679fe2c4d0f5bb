"""The planted-shortcut benchmark (METHOD.md §4): data sets with a class-tied synthetic cue, the small ViTs
trained on them (``build``) and the scores of discovery against the known cue (``evaluate``)."""

"""Evaluation of adapted generative models (``visionpeft.eval.subject``: DreamBooth's DINO, CLIP-I and CLIP-T)."""

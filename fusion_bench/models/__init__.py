"""Reusable model surgery and wrappers (CLIP helpers, zero-shot heads, ...)."""

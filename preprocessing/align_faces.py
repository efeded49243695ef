"""`python preprocessing/align_faces.py` is `python -m sparse_embed.preprocessing.align_faces`."""

from sparse_embed.preprocessing.align_faces import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    main()

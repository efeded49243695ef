"""`python preprocessing/msceleb_to_jpeg.py` is `python -m sparse_embed.preprocessing.msceleb_to_jpeg`."""

from sparse_embed.preprocessing.msceleb_to_jpeg import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    main()

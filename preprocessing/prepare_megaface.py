"""`python preprocessing/prepare_megaface.py` is `python -m sparse_embed.preprocessing.prepare_megaface`."""

from sparse_embed.preprocessing.prepare_megaface import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    main()

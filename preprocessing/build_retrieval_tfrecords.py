"""`python preprocessing/build_retrieval_tfrecords.py` is
`python -m sparse_embed.preprocessing.build_retrieval_tfrecords`."""

from sparse_embed.preprocessing.build_retrieval_tfrecords import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    main()

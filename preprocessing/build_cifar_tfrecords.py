"""`python preprocessing/build_cifar_tfrecords.py` is
`python -m sparse_embed.preprocessing.build_cifar_tfrecords`."""

from sparse_embed.preprocessing.build_cifar_tfrecords import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    main()

"""Bytes in and out: object storage, credentials, image and mask codecs, the read+decode stage."""

"""Offline tokenizers for the tiny pipelines: every printable ASCII character is a token, so no prompt is
"unknown" and no vocabulary file is needed."""


def byte_vocabulary() -> list[str]:
    return [chr(c) for c in range(32, 127)]

"""The one base class of nanoseek's user-facing errors: each message names what is wrong and how to fix it."""


class NanoseekError(Exception):
    pass

from neuronx_distributed._limits import placeholder_getattr as _placeholder_getattr


def get_platform_target() -> str:
    return "trn1"


__getattr__ = _placeholder_getattr(__name__)

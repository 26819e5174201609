"""The spelling of shapes, dtypes and devices in every op's messages, as Python prints them
("(12, 4)", "torch.float32", "cuda:0"), mirroring csrc/common/checks.h, so that a fake kernel and
its C++ twin raise word-for-word the same error."""


def shape_str(t):
    return str(tuple(t.shape))


def check_same_device(name, t, like, like_name):
    if t.device != like.device:
        raise ValueError(
            f"{name} must be on the device of {like_name} ({like.device}), got {t.device}"
        )
